"""`study.extend`: the minutes a deadline leaves, spent training the best trial further on train rows no trial has
seen. Its plan from the parent's own timings, its refusal without a deadline, the start from the parent's kept
adapter, and a real study in which it runs, recorded as one more trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from conftest import tiny_sweep, trial_params, tuner
from tuner import lora
from tuner.train import TrialRun
from tuner.worker import plan_extension

PARENT = {"steps": 250, "train_seconds": 250.0, "score_rows_per_s": 2.0}  # 1 s a step, 100 test rows in 50 s


def test_the_plan_fits_the_time_left_after_the_test_scoring_and_a_margin():
    # 300 s left: 55 s of scoring (50 s and a tenth), 15 s and 10% (30 s) of margin, 200 steps of 1 s.
    assert plan_extension(300.0, PARENT, 100, 10_000, 4, 25) == 200
    assert plan_extension(300.0, PARENT, 100, 400, 4, 25) == 100  # the spare rows, in whole batches
    # A resumed parent's seconds are those of the steps it ran.
    resumed = {**PARENT, "resumed_from_step": 125, "train_seconds": 125.0}
    assert plan_extension(300.0, resumed, 100, 10_000, 4, 25) == 200
    assert plan_extension(80.0, PARENT, 100, 10_000, 4, 25) == ("1m20s left holds 1 steps of 1.00 s and the test "
                                                                 "scoring (0m50s) (study.extend.min_steps 25)")
    assert plan_extension(10.0, PARENT, 100, 10_000, 4, 25).startswith("0m10s left holds 0 steps")
    assert plan_extension(300.0, PARENT, 100, 90, 4, 25) == ("90 train rows no trial has seen, 22 steps "
                                                              "(study.extend.min_steps 25)")
    assert plan_extension(300.0, {"steps": 0}, 100, 10_000, 4, 25) == "its timings are not recorded"


def test_extend_needs_a_deadline():
    from tuner.config import parse_config
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"study\.extend\.enabled: expected study\.deadline to be set too"):
        parse_config({"study": {"extend": {"enabled": True}}}, "s.yaml")
    cfg = parse_config({"study": {"deadline": "10m", "extend": {"enabled": True, "lr_ratio": 0.5}}}, "s.yaml")
    assert cfg.study.extend.lr_ratio == 0.5 and cfg.study.extend.min_steps == 25
    with pytest.raises(ConfigError, match=r"study\.extend\.lr_ratio"):
        parse_config({"study": {"deadline": "10m", "extend": {"enabled": True, "lr_ratio": 0}}}, "s.yaml")


def test_a_run_starts_from_its_init_state_not_from_peft_init(base16, diamonds, tmp_path):
    from tuner.batches import encode

    p = trial_params(max_steps=1)
    rows, _ = encode(base16.tokenizer, diamonds.train[:4], p.max_length)
    donor = lora.attach(base16.model, "donor", r=p.r, alpha=p.alpha, dropout=p.dropout,
                        target_modules=list(p.target_modules), seed=99)
    state = {k: torch.randn_like(v) for k, v in donor.state_dict().items()}  # B not zero: a trained adapter
    lora.detach(base16.model, donor)
    run = TrialRun("ext", p, rows, tmp_path, init_state=state)
    run.start(base16.model, "cpu")
    try:
        now = run.adapter.state_dict()
        assert all(torch.equal(now[k], state[k]) for k in state)
        assert run.init_state is None  # not kept: a retry resumes from its own checkpoints
    finally:
        lora.detach(base16.model, run.adapter)


def test_the_best_trial_is_trained_further_on_rows_no_trial_has_seen(tmp_path, diamonds):
    # 40 rows make the splits (16 train, 8 validation, 16 test); the 12 after them are the spare rows: 3 steps.
    rows = diamonds.train + diamonds.val + diamonds.test
    data = tmp_path / "prices.csv"
    pd.DataFrame({"text": [e.text for e in rows[:52]],
                  "price": [e.price for e in rows[:52]]}).to_csv(data, index=False)
    sweep = tiny_sweep(tmp_path, name="ext", trials=1, wandb="disabled")
    text = sweep.read_text().replace("data: {", f"data: {{source: {data}, ").replace(
        "grace_period: 120}", "grace_period: 120, deadline: 10m, extend: {enabled: true, lr_ratio: 0.5, "
                              "min_steps: 2}}")
    sweep.write_text(text)
    url = f"sqlite:///{tmp_path}/studies.db"
    res = tuner(["run", str(sweep), "--storage", url], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    study = optuna.load_study(study_name="ext", storage=url)
    parent, ext = study.get_trials()
    assert parent.state == ext.state == optuna.trial.TrialState.COMPLETE
    assert "extends" not in parent.user_attrs and parent.user_attrs["steps"] == 4
    a = ext.user_attrs
    assert a["extends"] == 0 and ext.params == parent.params
    assert a["extension"]["steps"] == 3 and a["extension"]["rows"] == 12 and a["steps"] == 3
    assert a["learning_rate"] == pytest.approx(0.5 * parent.params["learning_rate"])
    assert a["kept"]["reason"] == "last (no evaluation)" and not a.get("evaluations")  # never pruned
    assert "study.extend: " in out and "trial 0 (MAE" in out and "trained 3 more steps on 12 train rows" in out
    status = tuner(["status", "ext", "--storage", url], tmp_path)
    assert "trial 0 +3 steps on 12 new rows" in status.stdout, status.stdout
    # Its value is not its settings': parameter importances leave it out.
    from tuner.report import importances

    assert importances(study).trials == 1
    # The tuner.json beside its adapter says what it trained at.
    from tuner import artifacts

    folder = artifacts.extract_adapter(artifacts.open_store(tmp_path / "artifacts", create=False), ext,
                                       tmp_path / "ext-adapter")
    import json

    info = json.loads((Path(folder) / "tuner.json").read_text())
    assert info["params"]["max_steps"] == 3 and info["params"]["learning_rate"] == pytest.approx(a["learning_rate"])

    # An extension interrupted and queued again is not trained from scratch under its name: it fails, said so.
    study.enqueue_trial(parent.params, user_attrs={"extends": 0, "extension": a["extension"]})
    again = tuner(["run", str(sweep), "--storage", url, "--trials", "2"], tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    last = optuna.load_study(study_name="ext", storage=url).get_trials()[-1]
    assert last.state == optuna.trial.TrialState.FAIL and last.user_attrs["fail_reason"] == "not_retried"
