"""The search space: r doubles from 8 and is sampled as `r` itself (what optuna-dashboard shows), alpha follows r, fixed settings are not
suggested, and a changed sweep is recognised."""

from __future__ import annotations

import optuna
import pytest

from tuner.config import parse_config
from tuner.space import sample, signature_diff, space_signature


def _study():
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


def test_rank_is_a_power_of_two_sampled_as_r():
    cfg = parse_config({"search": {"r": {"min": 8, "max": 64}}})
    study = _study()
    seen = set()
    for _ in range(30):
        trial = study.ask()
        p = sample(trial, cfg)
        assert p.r in {8, 16, 32, 64} and p.alpha == 2 * p.r
        assert trial.params["r"] == p.r and "r_exp" not in trial.params
        assert isinstance(trial.distributions["r"], optuna.distributions.CategoricalDistribution)
        seen.add(p.r)
        study.tell(trial, 1.0)
    assert seen == {8, 16, 32, 64}


def test_alpha_ratio_sampled_and_fixed_settings_not_suggested():
    cfg = parse_config({"search": {"r": 16, "alpha": {"ratio": {"choices": [1, 4]}}, "dropout": 0.05},
                        "train": {"batch_size": {"choices": [4, 8]}}})
    trial = _study().ask()
    p = sample(trial, cfg, available_modules={"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"})
    assert p.alpha in (16.0, 64.0) and p.r == 16 and p.dropout == 0.05
    assert set(trial.params) == {"alpha_ratio", "batch_size"}
    assert p.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert p.effective_batch == p.batch_size


def test_target_sets_narrow_to_what_the_model_has():
    cfg = parse_config({"search": {"target_modules": "attention+mlp"}})
    p = sample(_study().ask(), cfg, available_modules={"q_proj", "v_proj", "down_proj"})
    assert p.target_modules == ("q_proj", "v_proj", "down_proj")


def test_signature_diff_names_what_changed():
    a = space_signature(parse_config({"search": {"r": {"min": 8, "max": 64}}}))
    b = space_signature(parse_config({"search": {"r": {"min": 8, "max": 32}}, "train": {"epochs": 2}}))
    diff = signature_diff(a, b)
    assert "r: [8, 64] -> [8, 32]" in diff and "train.epochs: \"1\" -> \"2\"" in diff
    assert signature_diff(a, a) == []


def test_tell_on_the_last_grid_point_outside_optimize(tmp_path):
    """GridSampler stops the study when its grid is used up, and Optuna's stop() raises outside optimize(): the last
    trial of every grid sweep was reported as a failure although its state was written."""
    from optuna.trial import TrialState

    from tuner.study import tell

    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    grid = {"x": [1, 2]}
    plain = optuna.create_study(storage=storage, study_name="plain", sampler=optuna.samplers.GridSampler(grid))
    trials = [plain.ask() for _ in range(2)]
    for t in trials:
        t.suggest_categorical("x", [1, 2])
    plain.tell(trials[0], 1.0)
    with pytest.raises(RuntimeError, match="Study.stop"):
        plain.tell(trials[1], 2.0)

    study = optuna.create_study(storage=storage, study_name="tuner", sampler=optuna.samplers.GridSampler(grid))
    trials = [study.ask() for _ in range(2)]
    for t in trials:
        t.suggest_categorical("x", [1, 2])
    tell(study, trials[0], 1.0)
    tell(study, trials[1], state=TrialState.PRUNED)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert not study._thread_local.in_optimize_loop


def test_loraplus_ratio_is_searched_validated_and_left_out_of_old_signatures():
    """LoRA+ is a later setting: at its default (1, plain LoRA) a sweep's signature is what it was before it existed,
    so older studies still match; searched, it is a suggested float; outside [1, 1024] the file is refused."""
    from tuner.config import ConfigErrors

    plain = space_signature(parse_config({}))
    assert "loraplus_ratio" not in plain
    searched = parse_config({"search": {"loraplus_ratio": {"low": 4, "high": 32, "log": True}}})
    assert "loraplus_ratio" in space_signature(searched)
    trial = _study().ask()
    p = sample(trial, searched)
    assert 4 <= p.loraplus_ratio <= 32 and trial.params["loraplus_ratio"] == p.loraplus_ratio
    assert sample(_study().ask(), parse_config({})).loraplus_ratio == 1.0
    with pytest.raises(ConfigErrors, match=r"search\.loraplus_ratio"):
        parse_config({"search": {"loraplus_ratio": 0.5}})
