"""Sweeps that survive: real worker processes killed with SIGKILL and SIGINT, several workers on one study
(SQLite and PostgreSQL), out-of-memory recovery, and memory that does not grow from trial to trial."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_sweep, tuner_cmd
from tuner.config import load_config
from tuner.loop import Faults
from tuner.worker import WorkerOptions, run_worker

KILL_SWEEP = dict(trials=2, train_rows=32, wandb="disabled", hb=1, grace=4,
                  train_extra=", checkpoint_every: 2, cotrain: 1")


def _start(sweep: Path, url: str, cwd: Path, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    fh = open(log, "w")
    env = {**os.environ, "TUNER_PLAIN_OUTPUT": "1"}
    return subprocess.Popen(tuner_cmd() + ["run", str(sweep), "--storage", url] + (extra or []), cwd=cwd,
                            stdout=fh, stderr=subprocess.STDOUT, env=env)


def _wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 400) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sorted(root.glob("trial-0000/checkpoints/step-*"))
        if found:
            return found[-1]
        assert proc.poll() is None, "the worker ended before writing a checkpoint"
        time.sleep(0.5)
    raise AssertionError("no checkpoint appeared")


def _trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_sigkill_mid_trial_then_another_worker_resumes_it(tmp_path):
    sweep = tiny_sweep(tmp_path, name="kill", **KILL_SWEEP)
    url = f"sqlite:///{tmp_path}/s.db"
    first = _start(sweep, url, tmp_path, tmp_path / "w1.log")
    ckpt = _wait_for_checkpoint(tmp_path / "runs" / "kill", first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert [t.state for t in _trials(url, "kill")] == [TrialState.RUNNING]  # a dead worker's trial

    t0 = time.time()
    second = _start(sweep, url, tmp_path, tmp_path / "w2.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "w2.log").read_text()
    log = (tmp_path / "w2.log").read_text()
    trials = _trials(url, "kill")
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.COMPLETE) == 2  # the budget, with the retry counted once
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "worker_lost"  # #15: a SIGKILLed trial says why it failed
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["fail_reason"] is None and retry.user_attrs["retry_reason"] == "worker_lost"
    resumed = retry.user_attrs["resumed_from_step"]
    assert resumed >= int(ckpt.name.removeprefix("step-")) > 0
    assert retry.user_attrs["steps"] == 8 and retry.user_attrs["mae"] > 0
    assert "resumed from step" in log
    print(f"\nkill/resume: killed after checkpoint {ckpt.name}; retry trial {retry.number} resumed from step "
          f"{resumed} of 8, mae {retry.user_attrs['mae']:.0f}; second worker took {time.time() - t0:.0f} s")


def test_sigint_checkpoints_exits_cleanly_and_resumes(tmp_path):
    sweep = tiny_sweep(tmp_path, name="int", **KILL_SWEEP)
    url = f"sqlite:///{tmp_path}/s.db"
    first = _start(sweep, url, tmp_path, tmp_path / "w1.log")
    _wait_for_checkpoint(tmp_path / "runs" / "int", first)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130
    log = (tmp_path / "w1.log").read_text()
    assert "stopping after this step" in log and "run the same command again to resume" in log
    assert "Traceback" not in log
    [t0] = _trials(url, "int")[:1]
    assert t0.state == TrialState.FAIL and t0.user_attrs["fail_reason"] == "interrupted"
    step = t0.user_attrs["checkpoint_step"]
    assert step >= 2
    assert [t.state for t in _trials(url, "int")][1:] == [TrialState.WAITING]  # handed back, never left RUNNING

    second = _start(sweep, url, tmp_path, tmp_path / "w2.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "w2.log").read_text()
    trials = _trials(url, "int")
    retry = trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    # #15: a retry that completes is not `interrupted`; why it was retried is kept apart
    assert retry.user_attrs["fail_reason"] is None and retry.user_attrs["retry_reason"] == "interrupted"
    assert retry.user_attrs["resumed_from_step"] == step
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    print(f"\nSIGINT/resume: checkpoint at step {step}; retry resumed from step {retry.user_attrs['resumed_from_step']}")


def test_workers_that_open_a_new_postgresql_database_at_once_all_get_it(pg_url):
    """Seen in CI: four workers started together on a new PostgreSQL database all created Optuna's tables, and one
    exited 2 with `IntegrityError: duplicate key value violates unique constraint "pg_type_typname_nsp_index"`.
    Eight openings at once, on a fresh database: every one gets the storage."""
    import threading

    from tuner.storage import open_storage

    barrier, errors, opened = threading.Barrier(8), [], []

    def open_one():
        barrier.wait()
        try:
            opened.append(open_storage(pg_url))
        except Exception as exc:  # collected: a thread's exception would not fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(opened) == 8, errors
    for storage in opened:
        storage.engine.dispose()


def test_a_lost_table_creation_race_is_retried_and_other_errors_are_not(pg_url, monkeypatch):
    """The race above, made certain: the first opening meets PostgreSQL's catalog violation and is tried again after
    a short wait; an error that is not that race is said at once."""
    import sqlalchemy as sa

    from tuner import storage as store
    from tuner.errors import StorageError

    real, calls, waits = optuna.storages.RDBStorage, [], []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.IntegrityError("CREATE TABLE studies", {}, Exception(
                'duplicate key value violates unique constraint "pg_type_typname_nsp_index"\nDETAIL: ...'))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(store.time, "sleep", waits.append)
    store.open_storage(pg_url).engine.dispose()
    assert len(calls) == 2 and waits == [0.5]

    def refused(*args, **kwargs):
        calls.append(1)
        raise sa.exc.OperationalError("connect", {}, Exception('password authentication failed for user "x"'))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", refused)
    with pytest.raises(StorageError, match="password authentication failed"):
        store.open_storage(pg_url)
    assert len(calls) == 1 and waits == [0.5]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_workers_share_one_budget_exactly(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path}/s.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    sweep = tiny_sweep(tmp_path, name="many", trials=6, train_rows=8, test_rows=8, wandb="disabled")
    res = subprocess.run(tuner_cmd() + ["run", str(sweep), "--storage", url, "--workers", "4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    trials = _trials(url, "many")
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials), out
    for needle in ("database is locked", "Traceback", "error:"):
        assert needle not in out, out
    workers = {line.split("]")[0] for line in out.splitlines() if line.startswith("[worker ")}
    assert len(workers) == 4
    assert "leaderboard: many" in out


def test_injected_oom_is_retried_with_half_the_micro_batch(tmp_path):
    sweep = tiny_sweep(tmp_path, name="oom", trials=1, wandb="disabled")
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(sweep), WorkerOptions(storage_url=url, faults=Faults(oom_at_step=2)))
    [t] = _trials(url, "oom")
    assert t.state == TrialState.COMPLETE, t.user_attrs
    ex = t.user_attrs["execution"]
    assert ex["oom_halvings"] == 1 and ex["micro_batch"] == 2 and t.user_attrs["effective_batch"] == 4
    assert t.user_attrs["steps"] == 4


def test_oom_that_persists_fails_the_trial_and_the_worker_goes_on(tmp_path):
    sweep = tiny_sweep(tmp_path, name="oom2", trials=2, wandb="disabled")
    url = f"sqlite:///{tmp_path}/s.db"
    faults = Faults(oom_at_step=1, oom_always=True)
    report = run_worker(load_config(sweep), WorkerOptions(storage_url=url, faults=faults))
    assert report.states == {0: "FAIL", 1: "FAIL"}
    for t in _trials(url, "oom2"):
        assert t.user_attrs["fail_reason"] == "oom" and "micro-batch 2" in t.user_attrs["fail_detail"]


def test_memory_does_not_grow_over_five_trials(tmp_path):
    sweep = tiny_sweep(tmp_path, name="mem", trials=5, train_rows=8, test_rows=8, wandb="disabled",
                       quant="{choices: [4, 8]}")
    # Every trial the same size (the largest of the tiny sweep's): a first trial at r 8 on attention and a later one
    # at r 16 on all linear layers differ by about 500 MB of RSS that the allocator keeps (seen: +507 MB at the
    # first large trial, flat after it), which is not a leak. The base still switches between 4 and 8 bits.
    sweep.write_text(sweep.read_text().replace("r: {min: 8, max: 16}", "r: 16").replace(
        "target_modules: {choices: [attention, attention+mlp]}", "target_modules: attention+mlp"))
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(sweep), WorkerOptions(storage_url=url))
    rss = [t.user_attrs["rss_mb"] for t in _trials(url, "mem")]
    bits = [t.params.get("quant_bits") for t in _trials(url, "mem")]
    assert len(rss) == 5 and all(t.state == TrialState.COMPLETE for t in _trials(url, "mem"))
    print(f"\nRSS after each of 5 trials (MB): {rss}; their bits: {bits}")
    # A leak accumulates, so the last trial is compared with the first; one trial's transient peak (seen: +205 MB on
    # the fourth of five, back to -34 MB on the fifth, on an AVX512-BF16 machine) is only bounded.
    assert rss[-1] - rss[0] < 150, rss
    assert max(rss) - rss[0] < 300, rss
