"""Issue #15, hardening: no file read runs code, no path read from the database is trusted, no secret is shown, and
every input ends in exit 0 or exit 2 with a one-line message. Each test is the reproduction the issue gives."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest

from conftest import tiny_sweep, tuner, trial_params


def _one_line_error(res, *needles: str) -> str:
    """Exit 2, one `error:` line, no traceback; the error line, which must contain every needle."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for n in needles:
        assert n in errors[0], out
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. A checkpoint file must not run code


class _RunsCode:
    """Unpickled in full, this calls os.system: what a writer of a shared output_dir could leave there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["raw pickle", "torch.save"])
def test_checkpoint_that_would_run_code_is_refused_as_unreadable(base16, diamonds, tmp_path, form):
    import torch

    from tuner.batches import encode
    from tuner.loop import train_one
    from tuner.train import TrialRun

    rows, _ = encode(base16.tokenizer, diamonds.train[:24], 182)
    p = trial_params(quant_bits=16, dropout=0.0)
    run = TrialRun("c", p, rows, tmp_path / "run", checkpoint_every=2, keep_checkpoints=2)
    train_one(base16, run, stop=lambda: run.step >= 5)
    state = tmp_path / "run" / "checkpoints" / "step-000005" / "train_state.pt"
    marker = tmp_path / "code-ran"
    if form == "raw pickle":
        state.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:
        torch.save({"step": 5, "payload": _RunsCode(marker)}, state)

    again = TrialRun("c", p, rows, tmp_path / "run")
    train_one(base16, again)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert again.resumed_from_step == 4 and again.status == "completed"
    assert "step-000005" in again.skipped_checkpoints[0] and "unreadable" in again.skipped_checkpoints[0]


# ---------------------------------------------------------------------------------------------------------------
# 2. Paths read from the database are not trusted


def _hand_made_study(tmp_path: Path, name: str = "s", **attrs) -> tuple[str, optuna.Study]:
    """A study with one COMPLETE trial, made through Optuna's API (no training: these tests read a study back)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path}/studies.db"
    study = optuna.create_study(study_name=name, storage=url)
    trial = study.ask()
    for k, v in {"mae": 100.0, **attrs}.items():
        trial.set_user_attr(k, v)
    study.tell(trial, 100.0)
    return url, study


def test_report_reads_no_store_the_database_names(tmp_path):
    """Before: `tuner report` read `artifact_store` from the study and copied the file that `scatter_artifact_id`
    named there into index.html."""
    url, study = _hand_made_study(tmp_path / "db", scatter_artifact_id="secret.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_bytes(b"PRIVATE-KEY-MATERIAL")
    study.set_user_attr("artifact_store", str(elsewhere))
    res = tuner(["report", "s", "--storage", url, "--out", str(tmp_path / "rep")], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "PRIVATE-KEY-MATERIAL" not in html and "UFJJVkFURS1LRVktTUFURVJJQUw" not in html  # nor base64 of it
    assert f"artifacts: {tmp_path / 'db' / 'artifacts'}" in out and "not trusted" in out
    assert not (tmp_path / "db" / "artifacts").exists()  # a reader creates nothing


@pytest.mark.parametrize("bad_id", ["../../elsewhere/secret.txt", "/etc/hostname", "a/../../x", ""])
def test_artifact_ids_that_leave_the_store_are_refused(tmp_path, bad_id):
    from tuner import artifacts

    store = artifacts.open_store(tmp_path / "store")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("x")
    trial = optuna.trial.create_trial(value=1.0, user_attrs={artifacts.SCATTER_ATTR: bad_id})
    with pytest.raises(artifacts.ArtifactError):
        artifacts.fetch(store, trial, artifacts.SCATTER_ATTR, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_artifact_link_out_of_the_store_is_refused(tmp_path):
    from tuner import artifacts

    store_dir = tmp_path / "store"
    store = artifacts.open_store(store_dir)
    (tmp_path / "secret.txt").write_text("x")
    (store_dir / "0b6a1c1e-link").symlink_to(tmp_path / "secret.txt")
    trial = optuna.trial.create_trial(value=1.0, user_attrs={artifacts.SCATTER_ATTR: "0b6a1c1e-link"})
    with pytest.raises(artifacts.ArtifactError, match="outside the artifact store"):
        artifacts.fetch(store, trial, artifacts.SCATTER_ATTR, tmp_path / "out.png")


def test_dashboard_creates_no_folder_the_database_names(tmp_path):
    """Before: `tuner dashboard` ran `mkdir -p` on the study's `artifact_store` attribute."""
    from tuner.dashboard import create
    from tuner.storage import open_storage

    url, study = _hand_made_study(tmp_path / "db")
    target = tmp_path / "made" / "by" / "attacker"
    study.set_user_attr("artifact_store", str(target))
    board = create(open_storage(url), url, host="127.0.0.1", port=0)
    board.server.server_close()
    assert not target.exists() and not (tmp_path / "made").exists()
    assert board.artifact_dir == tmp_path / "db" / "artifacts" and not board.artifact_dir.exists()
    assert "no artifacts are shown" in board.store_note


@pytest.mark.parametrize("where", ["sweep", "--study"])
@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/abs"])
def test_study_name_that_would_leave_output_dir_is_refused(tmp_path, where, name):
    sweep = tiny_sweep(tmp_path, name=name if where == "sweep" else "ok", trials=1)
    if where == "sweep":  # YAML-quote it
        sweep.write_text(sweep.read_text().replace(f"name: {name},", f"name: '{name}',"))
    args = ["run", str(sweep), "--storage", f"sqlite:///{tmp_path}/s.db"]
    res = tuner(args + (["--study", name] if where == "--study" else []), tmp_path, timeout=120)
    _one_line_error(res, "study name", "one plain folder name")
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_study_name_too_long_for_postgresql_is_refused_before_the_study_exists(tmp_path, pg_url):
    """Before: a 600-character name was a `StringDataRightTruncation` traceback from PostgreSQL."""
    sweep = tiny_sweep(tmp_path, name="ok", trials=1)
    res = tuner(["run", str(sweep), "--storage", pg_url, "--study", "n" * 600], tmp_path, timeout=120)
    _one_line_error(res, "--study", "at most 200 characters")
    assert optuna.get_all_study_summaries(pg_url) == []


def _study_with_adapter_artifact(tmp_path: Path, artifact_id: str | None, content: bytes | None) -> str:
    from tuner import artifacts

    url, _ = _hand_made_study(tmp_path, **{artifacts.ADAPTER_ATTR: artifact_id})
    store = tmp_path / "artifacts"
    store.mkdir()
    if content is not None:
        (store / artifact_id).write_bytes(content)
    return url


@pytest.mark.parametrize("artifact_id, content, needle", [
    ("0f2d5a9e-9a7c-4a43-8f1e-2c9b8f3d1a77", b"this is not a zip archive", "not a readable zip archive"),
    ("../../../etc/passwd", None, "not a valid artifact id"),
    ("/etc/passwd", None, "not a valid artifact id"),
])
def test_promote_with_a_bad_adapter_artifact_is_one_line_exit_2(tmp_path, artifact_id, content, needle):
    """Before: a `BadZipFile` / `ValueError: Invalid artifact_id` traceback."""
    url = _study_with_adapter_artifact(tmp_path, artifact_id, content)
    res = tuner(["promote", "s", "--trial", "0", "--to", str(tmp_path / "out"), "--storage", url], tmp_path)
    _one_line_error(res, needle)
    assert not (tmp_path / "out").exists()


def test_a_copied_study_folder_works_as_it_is_from_another_directory(swept, tmp_path):
    """Issue #16's first bullet: studies.db and artifacts/ copied elsewhere are read there, not from the path the
    original run recorded."""
    from tuner import artifacts
    from tuner.dashboard import create
    from tuner.storage import open_storage

    copy = tmp_path / "moved" / "study"
    url = swept.copy(copy / "studies.db")
    shutil.copytree(swept.store, copy / "artifacts")
    best = swept.study().best_trial
    scatter = best.user_attrs[artifacts.SCATTER_ATTR]
    # The copy's chart differs from the original's, so that the report shows which one it read.
    (copy / "artifacts" / scatter).write_bytes((swept.store / scatter).read_bytes() + b"copy")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    res = tuner(["report", "shared", "--storage", url, "--out", str(tmp_path / "rep")], elsewhere)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert f"artifacts: {copy / 'artifacts'}" in out and str(swept.store) in out  # the recorded one: a hint
    assert (tmp_path / "rep" / "best-scatter.png").read_bytes().endswith(b"copy")

    board = create(open_storage(url), url, host="127.0.0.1", port=0)
    board.server.server_close()
    assert board.artifact_dir == copy / "artifacts"

    res = tuner(["promote", "shared", "--to", str(tmp_path / "promoted"), "--storage", url], elsewhere)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "promoted" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 4. The database password never shows


PASSWORD = "S3cretPW-9d8c7b"


@pytest.mark.parametrize("url, shown", [
    (f"postgresql://tuner:{PASSWORD}@db.example:5432/studies", "postgresql://tuner:***@db.example:5432/studies"),
    (f"postgresql://:{PASSWORD}@db.example/studies", "postgresql://:***@db.example/studies"),
    (f"postgresql://tuner:p@{PASSWORD}@db.example/studies", "postgresql://tuner:***@db.example/studies"),
    (f"postgresql://tuner@db.example/studies?password={PASSWORD}&sslmode=require",
     "postgresql://tuner@db.example/studies?password=***&sslmode=require"),
    (f"postgresql://tuner@db.example/studies?sslmode=require&sslpassword={PASSWORD}",
     "postgresql://tuner@db.example/studies?sslmode=require&sslpassword=***"),
    (f"mysql+pymysql://tuner:{PASSWORD}@db.example/studies?charset=utf8mb4",
     "mysql+pymysql://tuner:***@db.example/studies?charset=utf8mb4"),
    (f"tuner:{PASSWORD}@db.example/studies", "(the value given is not a URL"),
    ("sqlite:///studies.db", "sqlite:///studies.db"),
])
def test_mask_url_hides_the_password_in_every_form(url, shown):
    from tuner.storage import mask_url

    assert PASSWORD not in mask_url(url) and mask_url(url).startswith(shown)


@pytest.mark.parametrize("url, needle", [
    (f"postgresql://tuner:{PASSWORD}@127.0.0.1:1/studies", "cannot open storage postgresql://tuner:***@127.0.0.1:1"),
    (f"postgresql://:{PASSWORD}@127.0.0.1:1/studies", "cannot open storage postgresql://:***@127.0.0.1:1"),
    (f"postgresql://tuner:p@{PASSWORD}@127.0.0.1:1/studies", "holds an '@'; write it as %40"),
    (f"postgresql://tuner@127.0.0.1:1/studies?password={PASSWORD}", "password=***"),
    (f"postgresql://tuner:{PASSWORD}@127.0.0.1:notaport/studies", "the port must be a number"),
    (f"tuner:{PASSWORD}@127.0.0.1/studies", "not a database URL"),
])
def test_storage_errors_show_no_password_and_no_traceback(tmp_path, url, needle):
    """Before: the empty user, the '@' and ?password= forms were shown whole, a string that is not a URL was echoed,
    and a port that is not a number was a ValueError traceback."""
    for args in (["status", "s", "--storage", url], ["report", "s", "--storage", url]):
        res = tuner(args, tmp_path, timeout=120)
        line = _one_line_error(res, needle)
        assert PASSWORD not in res.stdout + res.stderr, line
    sweep = tiny_sweep(tmp_path, trials=1)
    res = tuner(["run", str(sweep), "--storage", url], tmp_path, timeout=300)
    _one_line_error(res, needle)
    assert PASSWORD not in res.stdout + res.stderr


def test_help_does_not_print_the_password_from_tuner_storage(tmp_path):
    """Before: `TUNER_STORAGE='postgresql://tuner:S3cretPW@…' tuner run --help` printed it as the default."""
    for command in ("run", "status", "report", "dashboard", "promote", "best"):
        res = tuner([command, "--help"], tmp_path, env={"TUNER_STORAGE": f"postgresql://tuner:{PASSWORD}@db/x"})
        assert res.returncode == 0 and PASSWORD not in res.stdout + res.stderr, res.stdout
        assert "postgresql://tuner:***@db/x" in " ".join(res.stdout.split())


def test_workers_get_the_storage_url_in_their_environment_not_argv():
    """Before: `--workers N` put the URL on each child's command line, where `ps` shows it to every user."""
    import argparse

    from tuner.launch import worker_command, worker_env

    url = f"postgresql://tuner:{PASSWORD}@db/x"
    args = argparse.Namespace(sweep="s.yaml", storage=url, trials=3, timeout=None, study=None, device=None,
                              force=False, artifacts=None)
    assert not any(PASSWORD in part for part in worker_command(args, 0))
    assert worker_env(0, 2, None, url)["TUNER_STORAGE"] == url
