"""Intermediate evaluation and pruning on real trials; non-finite losses fail a trial with its reason."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_sweep
from tuner.config import load_config, parse_config
from tuner.errors import ConfigError
from tuner.loop import Faults
from tuner.worker import WorkerOptions, run_worker


def test_median_pruner_stops_bad_trials_and_keeps_their_curves(tmp_path):
    # A grid over one good and three hopeless learning rates, one trial at a time (cotrain 1). The grid sampler's
    # seeded order puts the good one (listed third) first; each hopeless trial is then worse than the median of the
    # completed trials at its first evaluation and is pruned there. Step 4, not 2: by step 2 the good trial has
    # not yet moved its validation MAE. 3e-3, not 5e-3: 5e-3 sits at the edge of divergence (its MAE rose to 31k by
    # step 8) and moved its step-4 MAE by 0.2% under sdpa attention and not at all under eager; 3e-3 moves it by
    # 2% (6129 -> 6018) under either.
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(_grid_sweep(tmp_path, "[1.0e-7, 2.0e-7, 3.0e-3, 3.0e-7]", "n_startup_trials: 1")),
               WorkerOptions(storage_url=url))
    study = optuna.load_study(study_name="prune", storage=url)
    trials = study.trials
    assert trials[0].params["learning_rate"] == 3.0e-3, "the grid's seeded order changed"
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE] + [TrialState.PRUNED] * 3, [(t.state, t.intermediate_values)
                                                                       for t in trials]
    for t in trials:
        assert t.intermediate_values, t.number
        assert "fail_reason" not in t.user_attrs, (t.number, t.user_attrs.get("fail_detail"))  # the grid's last tell
        if t.state == TrialState.PRUNED:
            stop = t.user_attrs["pruned_at_step"]
            assert stop == max(t.intermediate_values) == 4 and t.user_attrs["steps"] == 4
            # Optuna keeps a pruned trial's last intermediate value as its value; it is never scored on test.
            assert t.value == t.intermediate_values[stop] and "mae" not in t.user_attrs
            assert t.value > trials[0].intermediate_values[4]
            # Its checkpoints (steps 2 and 4: checkpoint_every 2) went when it was pruned: nothing resumes it.
            assert (tmp_path / "runs" / "prune" / f"trial-{t.number:04d}").is_dir()
            assert not list((tmp_path / "runs" / "prune" / f"trial-{t.number:04d}").rglob("step-*")), t.number
        else:
            assert sorted(t.intermediate_values) == [4, 8] and t.user_attrs["steps"] == 8
            assert t.value == t.user_attrs["mae"]  # the objective is the test split's, not the last validation


def _grid_sweep(tmp_path, rates: str, pruner: str):
    """One trial at a time over a grid of learning rates, 8 steps each, evaluated at steps 4 and 8."""
    sweep = tiny_sweep(tmp_path, name="prune", trials=rates.count(",") + 1, train_rows=32, wandb="disabled",
                       train_extra=", eval_every: 4, eval_rows: 8, cotrain: 1, checkpoint_every: 2")
    text = sweep.read_text().replace("learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}",
                                     f"learning_rate: {{choices: {rates}}}")
    text = text.replace("r: {min: 8, max: 16}", "r: 8").replace("dropout: {low: 0.0, high: 0.1}", "dropout: 0.0")
    text = text.replace("target_modules: {choices: [attention, attention+mlp]}", "target_modules: attention")
    text = text.replace("study: {name: prune,", "study: {sampler: {type: grid, seed: 0}, "
                        f"pruner: {{type: median, {pruner}}}, name: prune,")
    sweep.write_text(text)
    return sweep


def test_a_trial_past_the_pruners_until_share_runs_to_its_end(tmp_path):
    # The hopeless rate of the test above, behind the good one at step 4, but step 4 is half of its 8 steps and the
    # pruner asks only until 40% of them: it is never asked, and trains and is scored to its end.
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(_grid_sweep(tmp_path, "[1.0e-7, 3.0e-3]", "n_startup_trials: 1, until: 0.4")),
               WorkerOptions(storage_url=url))
    good, hopeless = optuna.load_study(study_name="prune", storage=url).trials
    assert good.params["learning_rate"] == 3.0e-3, "the grid's seeded order changed"
    assert hopeless.intermediate_values[4] > good.intermediate_values[4]  # the median pruner would stop it here
    assert hopeless.state == TrialState.COMPLETE and sorted(hopeless.intermediate_values) == [4, 8]
    assert hopeless.user_attrs["steps"] == 8 and "pruned_at_step" not in hopeless.user_attrs


def test_non_finite_loss_fails_the_trial_with_its_reason(tmp_path):
    sweep = tiny_sweep(tmp_path, name="nan", trials=2, wandb="disabled")
    url = f"sqlite:///{tmp_path}/s.db"
    report = run_worker(load_config(sweep), WorkerOptions(storage_url=url, faults=Faults(nan_at_step=2)))
    assert report.states == {0: "FAIL", 1: "FAIL"}
    for t in optuna.load_study(study_name="nan", storage=url).trials:
        assert t.state == TrialState.FAIL and t.value is None
        assert t.user_attrs["fail_reason"] == "nan_loss" and "step 2" in t.user_attrs["fail_detail"]
        assert "mae" not in t.user_attrs


def test_evaluation_interval_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"train.eval_every: expected fewer steps than the shortest run .* \(4 "):
        parse_config({"data": {"train_rows": 32}, "train": {"batch_size": {"choices": [4, 8]}, "eval_every": 4}},
                     "s.yaml")


@pytest.mark.parametrize("kind", ["median", "successive_halving", "hyperband"])
def test_every_pruner_is_selectable(kind):
    from tuner.study import make_pruner

    cfg = parse_config({"study": {"pruner": {"type": kind}}, "train": {"eval_every": 5}})
    assert type(make_pruner(cfg)).__name__.lower().startswith(kind.split("_")[0])
