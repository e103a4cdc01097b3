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


def test_number_loss_is_searched_validated_and_left_out_of_old_signatures():
    """train.number_loss came after studies existed: at 0 the signature is what it was; set, it is in it; a range
    is sampled; negative weights are refused."""
    from tuner.config import ConfigErrors

    assert "number_loss" not in space_signature(parse_config({}))["train"]
    assert space_signature(parse_config({"train": {"number_loss": 0.5}}))["train"]["number_loss"] == "0.5"  # described
    assert sample(_study().ask(), parse_config({"train": {"number_loss": 0.5}})).number_loss == 0.5
    trial = _study().ask()
    p = sample(trial, parse_config({"train": {"number_loss": {"low": 0.1, "high": 1.0}}}))
    assert 0.1 <= p.number_loss <= 1.0 and trial.params["number_loss"] == p.number_loss
    assert sample(_study().ask(), parse_config({})).number_loss == 0.0
    with pytest.raises(ConfigErrors, match=r"train\.number_loss"):
        parse_config({"train": {"number_loss": -1}})


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



def test_a_queued_rate_given_at_a_number_of_steps_moves_to_the_datas_steps(tmp_path):
    """`learning_rate: {value, at_steps}` in study.enqueue: the rate measured best at that many optimizer steps, times
    sqrt(at_steps / steps) for the steps this data gives a trial, held to the searched range; refused at parse time
    when malformed, outside the range, or when the trial's steps are not known before it runs."""
    from tuner.config import ConfigErrors
    from tuner.space import enqueued_params, queued_steps, scaled_rate_notes
    from tuner.study import open_study, pop_waiting

    space = {"r": {"min": 8, "max": 16}, "learning_rate": {"low": 1e-3, "high": 4e-3, "log": True}}
    scaled = {"value": 1.5e-3, "at_steps": 250}
    cfg = parse_config({"search": space, "train": {"batch_size": 4, "grad_accum": 2},
                        "study": {"name": "s", "enqueue": [{"r": 8, "learning_rate": scaled}, {"r": 16}]}})
    assert queued_steps(cfg, cfg.study.enqueue[0], 1000) == 125  # 1,000 rows, 8 per step
    [p] = [e["learning_rate"] for e in enqueued_params(cfg, 500)[:1]]
    assert p == pytest.approx(1.5e-3 * (250 / 63) ** 0.5)  # 500 rows: 63 steps
    assert enqueued_params(cfg, 4000)[0]["learning_rate"] == pytest.approx(1.5e-3 / 2 ** 0.5)  # 500 steps
    assert enqueued_params(cfg, 40000)[0]["learning_rate"] == 1e-3  # 5,000 steps: the floor
    assert enqueued_params(cfg, 8)[0]["learning_rate"] == 4e-3  # one step: the ceiling
    assert scaled_rate_notes(cfg, 500) == ["study.enqueue[0].learning_rate: 0.0015 at 250 steps is 0.00299 at this "
                                           "data's 63 (times sqrt(250/63), within the searched range)"]
    assert scaled_rate_notes(cfg, 8) == ["study.enqueue[0].learning_rate: 0.0015 at 250 steps is 0.004 at this "
                                         "data's 1 (times sqrt(250/1), 0.0237, held to search.learning_rate's high "
                                         "0.004)"]
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(cfg, url, train_rows=500)
    p = sample(optuna.Trial(study, pop_waiting(study)), cfg)
    assert p.r == 8 and p.learning_rate == pytest.approx(1.5e-3 * (250 / 63) ** 0.5)

    bad = [({"value": 1.5e-3}, r"learning_rate: expected a number in \[0\.001, 0\.004\], or \{value: RATE, at_steps"),
           ({"value": "fast", "at_steps": 250}, r"learning_rate: expected .*, or \{value: RATE, at_steps: STEPS\}"),
           ({"value": 1.5e-3, "at_steps": 0}, r"learning_rate: expected .*, or \{value: RATE, at_steps: STEPS\}"),
           ({"value": 1.5e-3, "at_steps": 2.5}, r"learning_rate: expected .*, or \{value: RATE, at_steps: STEPS\}"),
           ({"value": 1e-2, "at_steps": 250},
            r"learning_rate\.value: expected a value in \[0\.001, 0\.004\], got 0\.01")]
    for value, needle in bad:
        with pytest.raises(ConfigErrors, match=r"study\.enqueue\[0\]\." + needle):
            parse_config({"search": space, "study": {"enqueue": [{"learning_rate": value}]}})
    with pytest.raises(ConfigErrors, match=r"study\.enqueue\[0\]\.dropout: expected a number in \[0, 0\.1\]"):
        parse_config({"search": space | {"dropout": {"low": 0, "high": 0.1}},
                      "study": {"enqueue": [{"dropout": {"value": 0.05, "at_steps": 10}}]}})
    with pytest.raises(ConfigErrors, match=r"study\.enqueue\[0\]\.learning_rate: expected one of \[0\.001, 0\.002\] "
                                           r"\(a scaled rate needs a range\)"):
        parse_config({"search": {"learning_rate": {"choices": [1e-3, 2e-3]}},
                      "study": {"enqueue": [{"learning_rate": scaled}]}})
    # A searched batch makes the steps unknown unless the queued trial sets it.
    loose = {"search": space, "train": {"batch_size": {"choices": [4, 8]}}}
    with pytest.raises(ConfigErrors, match=r"study\.enqueue\[0\]\.learning_rate: expected a fixed rate, since "
                                           r"train\.batch_size is searched and this trial does not set it"):
        parse_config(loose | {"study": {"enqueue": [{"learning_rate": scaled}]}})
    cfg = parse_config(loose | {"study": {"enqueue": [{"learning_rate": scaled, "batch_size": 8}]}})
    assert queued_steps(cfg, cfg.study.enqueue[0], 1000) == 125

def test_enqueued_first_trials_are_checked_against_the_space_and_run_first(tmp_path):
    """`study.enqueue`: the sweep's prior, its first trials. A value the space could not draw, or a setting the sweep
    does not search, is refused naming the key; a new study queues them once, and the worker's path (pop the
    waiting trial, sample it) trains exactly those values with the rest sampled."""
    from tuner.config import ConfigErrors
    from tuner.study import open_study, pop_waiting

    space = {"r": {"min": 8, "max": 32}, "learning_rate": {"low": 1e-3, "high": 5e-3, "log": True},
             "target_modules": {"choices": ["attention", "attention+mlp"]}, "quant_bits": 4,
             "loraplus_ratio": {"choices": [1, 4]}}
    bad = ({"quant_bits": 8}, {"learning_rate": 1e-2}, {"target_modules": "mlp"}, {"r": 12}, {"nonsense": 1},
           {"learning_rate": "fast"}, {"learning_rate": float("nan")})
    needles = [r"study\.enqueue\[0\]\.quant_bits: expected a setting this sweep searches \(.*learning_rate",
               r"study\.enqueue\[0\]\.learning_rate: expected a value in \[0\.001, 0\.005\], got 0\.01",
               r"study\.enqueue\[0\]\.target_modules: expected one of \['attention', 'attention\+mlp'\]",
               r"study\.enqueue\[0\]\.r: expected one of \[8, 16, 32\], got 12",
               r"study\.enqueue\[0\]\.nonsense: expected a setting this sweep searches",
               r"study\.enqueue\[0\]\.learning_rate: expected a number in \[0\.001, 0\.005\], got 'fast'",
               r"study\.enqueue\[0\]\.learning_rate: expected a number in \[0\.001, 0\.005\], got nan"]
    for entry, needle in zip(bad, needles):
        with pytest.raises(ConfigErrors, match=needle):
            parse_config({"search": space, "study": {"enqueue": [entry]}})
    with pytest.raises(ConfigErrors, match=r"study\.enqueue: expected at most study\.trials \(1\) first trials, got 2"):
        parse_config({"search": space, "study": {"trials": 1, "enqueue": [{"r": 8}, {"r": 16}]}})

    prior = {"r": 16, "learning_rate": "2e-3", "loraplus_ratio": 4}  # "2e-3": YAML 1.1 reads it as a string
    cfg = parse_config({"search": space, "study": {"name": "q", "enqueue": [prior]}})
    url = f"sqlite:///{tmp_path}/s.db"
    study = open_study(cfg, url)
    open_study(cfg, url)  # opened again (a second run, a second worker): queued once
    [waiting] = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    p = sample(optuna.Trial(study, pop_waiting(study)), cfg)
    assert (p.r, p.learning_rate, p.loraplus_ratio) == (16, 2e-3, 4.0)
    assert p.target_set in ("attention", "attention+mlp") and p.alpha == 32  # sampled, and alpha 2r
    assert pop_waiting(study) is None
