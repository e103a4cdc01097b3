"""A real sweep, end to end, through the command line: SQLite and PostgreSQL storage, W&B offline files, the
status and best commands, resuming a study and refusing a changed one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna
import pytest

from optuna.trial import TrialState

from conftest import REPO, tiny_sweep, tuner_cmd
from wandb_files import summary as wandb_summary


def cli(args, cwd: Path, timeout=900, env=None):
    res = subprocess.run(tuner_cmd() + args, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return res


def test_sweep_on_sqlite_end_to_end(tmp_path):
    sweep = tiny_sweep(tmp_path, name="e2e", trials=2, quant="{choices: [4, 8]}")
    # The sweep's prior: trial 0 trains these values (the rest sampled), trial 1 is the sampler's. Its rate is given
    # at 16 steps and moves to this data's 4: 1e-3 * sqrt(16 / 4).
    sweep.write_text(sweep.read_text().replace(
        "grace_period: 120}", "grace_period: 120, enqueue: [{r: 16, learning_rate: {value: 0.001, at_steps: 16}, "
                              "quant_bits: 4}]}"))
    url = f"sqlite:///{tmp_path}/studies.db"
    res = cli(["run", str(sweep), "--storage", url], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("study.enqueue[0].learning_rate: 0.001 at 16 steps is 0.002 at this data's 4 (times sqrt(16/4)"
            in res.stdout + res.stderr)
    assert "leaderboard: e2e" in res.stdout and "baseline: constant train median" in res.stdout

    study = optuna.load_study(study_name="e2e", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2
    assert {k: trials[0].params[k] for k in ("r", "learning_rate", "quant_bits")} == {
        "r": 16, "learning_rate": 0.002, "quant_bits": 4}
    for t in trials:
        a = t.user_attrs
        assert a["r"] in (8, 16) and a["alpha"] == 2 * a["r"]
        assert a["target_set"] in ("attention", "attention+mlp") and a["target_modules_resolved"]
        assert t.params["quant_bits"] in (4, 8) and a["quantization"]["bits"] == t.params["quant_bits"]
        assert 1e-3 <= t.params["learning_rate"] <= 3e-3 and 0 <= t.params["dropout"] <= 0.1
        assert t.value == a["mae"] and a["rmsle"] > 0 and 0 <= a["hit_rate"] <= 1 and a["n"] == 16
        assert a["trainable_params"] > 0 and a["steps"] == 4 and a["parse_fail_rate"] <= 1
        assert 0 < a["run_s"] < a["duration_s"]  # the base's loading and baseline are before its group
        adapter = Path(a["adapter_path"])
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        # The W&B offline run holds what was logged, not just a folder.
        run_files = list(Path(a["wandb_dir"]).glob("run-*.wandb"))
        assert len(run_files) == 1 and a["wandb_run_id"] in run_files[0].name
        w = wandb_summary(run_files[0])
        assert w["run"]["group"] == "e2e" and w["run"]["name"] == f"e2e/trial-{t.number}"
        assert [h["train/loss"] for h in w["history"] if "train/loss" in h][-1] == pytest.approx(a["loss_last"])
        assert len([h for h in w["history"] if "train/loss" in h]) == 4
        assert w["summary"]["test/mae"] == pytest.approx(a["mae"])
        assert w["config"]["learning_rate"] == pytest.approx(t.params["learning_rate"])
    base = study.user_attrs["baselines"]
    assert set(base) >= {"median", "base_model_4bit"} or set(base) >= {"median", "base_model_8bit"}
    assert base["median"]["n"] == 16

    status = cli(["status", "e2e", "--storage", url], tmp_path)
    assert status.returncode == 0
    out = status.stdout
    for t in trials:
        assert f"${t.user_attrs['mae']:,.0f}" in out
    assert "COMPLETE *" in out and "baseline: constant train median" in out and "baseline: base model" in out
    assert "attention" in out

    best = cli(["best", "e2e", "--storage", url], tmp_path)
    assert best.returncode == 0 and f"best trial {study.best_trial.number}" in best.stdout
    assert "adapter_path" in best.stdout and "param learning_rate" in best.stdout

    # Running again continues the same study up to the new global budget. Under a 2-second deadline the new
    # worker's first trial starts (the deadline is ahead, and no trial has ended to say how long one takes), but no
    # second one, neither beside it (loading the base takes longer than that) nor after it, though the budget
    # allows two more. How the estimate stops a trial before the deadline: the tests of `deadline_reason` below.
    more = cli(["run", str(sweep), "--storage", url, "--trials", "4", "--deadline", "2s"], tmp_path)
    assert more.returncode == 0, more.stderr
    assert "study.enqueue: study e2e already existed" in more.stdout + more.stderr  # not queued twice, and said
    assert len(optuna.load_study(study_name="e2e", storage=url).trials) == 3
    assert "deadline 0m02s reached: no new trials" in more.stdout, more.stdout

    # A different search space under the same name is refused, naming the difference; --force runs it.
    changed = tiny_sweep(tmp_path, name="e2e", trials=3, quant="16")
    res = cli(["run", str(changed), "--storage", url], tmp_path)
    assert res.returncode == 2 and "quant_bits" in res.stderr and "--force" in res.stderr
    assert 'quant_bits: "{choices: [4, 8]}" -> "16"' in res.stderr


def test_sweep_on_postgresql(tmp_path, pg_url):
    # The sweep's own study.timeout is honoured (as --timeout is): a budget of 3 trials, but after 2 seconds no new
    # trial starts, so only the first runs (loading the base alone takes longer than that).
    sweep = tiny_sweep(tmp_path, name="pg", trials=3, wandb="disabled")
    sweep.write_text(sweep.read_text().replace("grace_period: 120}", "grace_period: 120, timeout: 2s}"))
    res = cli(["run", str(sweep), "--storage", pg_url], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "timeout reached (2 s): no new trials" in res.stdout
    study = optuna.load_study(study_name="pg", storage=pg_url)
    [t] = study.trials
    assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["wandb_mode"] == "disabled"
    assert "wandb_run_id" not in t.user_attrs or t.user_attrs["wandb_run_id"] is None
    status = cli(["status", "--storage", pg_url], tmp_path)
    assert status.returncode == 0 and "COMPLETE *" in status.stdout


def test_default_sweep_is_the_measured_one():
    """The README's run command must finish in about 15 minutes on 2 CPU cores, and the defaults are the ones the
    README's measurements chose: pruning on validation MAE, all linear layers, batch 4, lengths from the data."""
    from tuner.config import load_config

    cfg = load_config(REPO / "sweeps" / "default.yaml")
    # A trial starts only while it would end by the deadline, which leaves start-up and the leaderboard inside 15
    # minutes; the first trial always starts, at about 0.4 s per row of training on a fp32-only CPU (2.5 rows/s
    # measured), so one trial's training alone must stay well within them.
    assert cfg.study.deadline is not None and cfg.study.deadline <= 14.5 * 60 and cfg.study.timeout is None
    assert cfg.data.train_rows * 0.4 <= 7 * 60
    # Pruning on validation MAE, but never of the two queued trials (the median pruner waits for two trials to
    # end): successive halving cut the second of them by a 32-row reading that ranks trials by chance.
    assert cfg.study.pruner.type == "median" and cfg.train.eval_every is not None
    assert cfg.study.pruner.n_startup_trials == len(cfg.study.enqueue) == 2
    assert cfg.study.pruner.n_warmup_steps % cfg.train.eval_every == 0  # the first reading asked falls on an evaluation
    # No cut past half a trial (PrunerSpec.until): the first reading asked, at least, falls before it.
    assert cfg.study.pruner.until == 0.5 and cfg.study.pruner.n_warmup_steps <= 0.5 * cfg.data.train_rows / 4
    assert cfg.search.target_modules.value == "attention+mlp" and cfg.train.batch_size.value == 4
    assert cfg.train.max_length.value == "auto" and cfg.study.trials >= 3
    # One trial at a time on the CPU (co-training these trials gained no rows/s there, and each ran at half speed), a
    # learning-rate range around the measured best that excludes 3.3e-3 (54-62%) and the diverged 5.7e-3,
    # and the measured best rate, moved to the data's steps, as the first trials.
    assert cfg.train.cotrain == 1
    assert 1e-3 <= cfg.search.learning_rate.low and cfg.search.learning_rate.high < 3.3e-3
    from tuner.space import enqueued_params

    assert [e["r"] for e in cfg.study.enqueue] == [8, 16]
    rates = [[round(p["learning_rate"], 5) for p in enqueued_params(cfg, rows)] for rows in (1000, 351)]
    assert rates == [[1.5e-3, 1.5e-3], [2.5e-3, 2.5e-3]]  # 250 steps (diamonds), 88 (Ames listings)
    # The number-token loss on (cross-entropy alone collapsed to a few answers: README's table).
    assert cfg.train.number_loss.value == 0.5
    # Prices read as the branch mean, 3 likeliest digits at each of the first 2 places (README, "Scoring").
    assert (cfg.scoring.method, cfg.scoring.branch_top_k, cfg.scoring.branch_places) == ("branch", 3, 2)
    # The deadline's last minutes train the best trial further on new rows, at its own rate (README).
    assert cfg.study.extend.enabled and cfg.study.extend.lr_ratio == 1.0


def test_the_default_pruner_never_cuts_the_queued_trials_and_cuts_a_later_one_behind_them():
    """The default's pruner, as the study makes it, on readings at the default's evaluation steps: the second queued
    trial, far behind the first at step 100, goes on (successive halving cut it there in four studies of five); once
    both have ended, a trial behind their median at step 100 stops, one ahead goes on, and none is asked past half."""
    from tuner.config import load_config
    from tuner.study import make_pruner

    cfg = load_config(REPO / "sweeps" / "default.yaml")
    study = optuna.create_study(pruner=make_pruner(cfg))
    total = cfg.data.train_rows // cfg.train.batch_size.value  # 250 optimizer steps
    steps = range(cfg.train.eval_every, total + 1, cfg.train.eval_every)

    def reported(trial, value_at_100):
        for step in steps:
            if step > cfg.study.pruner.until * total:  # as outcome.on_evaluate: not asked past `until`
                return False
            trial.report(value_at_100 * (2.0 if step < 100 else 1.0), step)
            if trial.should_prune():
                return step
        return False

    first, second = study.ask(), study.ask()
    assert reported(first, 1_200.0) is False
    assert reported(second, 3_000.0) is False  # 2.5 times behind the first at step 100: still not cut
    study.tell(first, 1_200.0)
    study.tell(second, 1_300.0)
    behind, ahead = study.ask(), study.ask()
    # Their median at step 100 is $2,100. Not cut at step 50 (n_warmup_steps), where a model still learns prices.
    assert reported(behind, 4_000.0) == 100
    assert reported(ahead, 1_000.0) is False


def test_the_default_token_limit_keeps_every_diamond_and_bounds_long_listings():
    """data.train_tokens in the default: every diamonds row trains (the measured 1,000-row default), while the Ames
    listings, three times longer, are held to about as many tokens, so pointing the default at long text keeps a
    trial's time (README: 22 minutes for one trial without it)."""
    from tuner.config import load_config
    from tuner.prepare import prepare

    cfg = load_config(REPO / "sweeps" / "default.yaml")
    diamonds = prepare(cfg)
    assert diamonds.token_budget["rows"] == diamonds.token_budget["of"] == cfg.data.train_rows
    ames = prepare(load_config(REPO / "sweeps" / "default.yaml", ["data.source=builtin:ames"]))
    kept = ames.token_budget
    assert kept["of"] == cfg.data.train_rows and 300 <= kept["rows"] <= 400 and len(ames.splits.train) == kept["rows"]
    assert kept["tokens"] <= cfg.data.train_tokens < 1.2 * diamonds.token_budget["tokens"]


def test_a_trial_is_estimated_from_the_longest_ended_one_scaled_to_all_its_steps():
    """`study.deadline`'s estimate: a pruned trial stopped early and a resumed one started late are scaled to all
    their steps, since a new trial cannot know it will be pruned; trials without a duration are not guesses."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from tuner.worker import trial_estimate

    def ended(state, **attrs):
        return create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                            params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)}, user_attrs=attrs)

    assert trial_estimate([]) is None
    assert trial_estimate([ended(TrialState.COMPLETE, duration_s=200.0, steps=250, total_steps=250)]) == 200.0
    pruned = ended(TrialState.PRUNED, duration_s=60.0, steps=50, total_steps=250)  # 1.2 s a step: 300 s in all
    assert trial_estimate([ended(TrialState.COMPLETE, duration_s=200.0, steps=250, total_steps=250), pruned]) == 300
    resumed = ended(TrialState.COMPLETE, duration_s=100.0, steps=250, total_steps=250, resumed_from_step=150)
    assert trial_estimate([resumed]) == 250.0
    assert trial_estimate([ended(TrialState.PRUNED, steps=50, total_steps=250)]) is None  # no duration recorded
    # The time in its group, where recorded: a worker's first trial also waited for the base and its baseline.
    first = ended(TrialState.COMPLETE, duration_s=304.0, run_s=268.0, steps=88, total_steps=88)
    assert trial_estimate([first]) == 268.0


def test_the_deadline_stops_a_trial_that_would_end_after_it():
    from tuner.worker import deadline_reason

    assert deadline_reason(0.0, 870.0, None) is None  # nothing has ended yet: the first trial starts
    assert deadline_reason(400.0, 870.0, 220.0) is None  # 400 + 220 s ends before 870
    assert deadline_reason(700.0, 870.0, 220.0) == ("deadline 14m30s: 2m50s left, and a trial takes up to 3m40s "
                                                    "here: no new trials")
    assert deadline_reason(870.0, 870.0, None) == "deadline 14m30s reached: no new trials"

