"""Several epochs: validation at every epoch's end, the best checkpoint kept (not the last), the epoch-boundary
drop of the training loss flagged with its numbers, and test metrics for the kept adapter."""

from __future__ import annotations

import functools
from pathlib import Path

import optuna
import pytest
import torch

from conftest import tiny_sweep, trial_params
from tuner.batches import encode
from tuner.config import load_config
from tuner.loop import train_one
from tuner.train import Evaluation, TrialRun
from tuner.worker import WorkerOptions, run_worker


# Three epochs on q and v, a constant schedule, no dropout, decay, warmup or clipping to blur the curves.
params = functools.partial(trial_params, dropout=0.0, target_modules=("q_proj", "v_proj"), epochs=3,
                           scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, seed=3)


def test_the_best_evaluated_adapter_is_kept_not_the_last(base16, diamonds, tmp_path):
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)  # 2 steps per epoch, 3 epochs
    values = iter([3.0, 5.0, 4.0])
    snapshots = {}

    class Hooks:
        def on_step(self, run, record):
            pass

        def on_evaluate(self, run, step):
            snapshots[step] = run.adapter.state_dict()
            return Evaluation(next(values))

        def on_checkpoint(self, run, step, path):
            pass

    final = {}
    run = TrialRun("e", params(), rows, tmp_path, hooks=Hooks(), checkpoint_every=1)
    train_one(base16, run, on_done=lambda r: final.update(r.adapter.state_dict()))
    assert [e["step"] for e in run.evals] == [2, 4, 6] and [e["epoch"] for e in run.evals] == [1, 2, 3]
    assert run.kept["step"] == 2 and run.kept["epoch"] == 1 and run.kept["last"]["step"] == 6
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[6][k]) for k in final)
    # The best one survives checkpoint rotation (the newest three are kept), for `tuner promote --checkpoint`; the
    # last step's (a resume point for an interrupted final scoring, #15) pushes none of them out.
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000003", "step-000004", "step-000005", "step-000006"]
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()


def test_a_tie_keeps_the_later_adapter(base16, diamonds, tmp_path):
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)
    values = iter([3.0, 5.0, 3.0])

    class Hooks:
        def on_step(self, run, record):
            pass

        def on_evaluate(self, run, step):
            return Evaluation(next(values))

        def on_checkpoint(self, run, step, path):
            pass

    run = TrialRun("t", params(), rows, tmp_path, hooks=Hooks(), checkpoint_every=None)
    train_one(base16, run)
    assert run.kept["step"] == 6 and run.kept["reason"] == "last is best"


def test_epoch_boundaries_are_measured_and_flagged(base16, diamonds):
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)
    run = TrialRun("m", params(epochs=3, learning_rate=5e-3), rows, Path("/unused"))
    train_one(base16, run)
    losses = [h["loss"] for h in run.history]
    bounds = run.epoch_boundaries()
    assert [b["epoch"] for b in bounds] == [2, 3]
    for b in bounds:  # one step each side: 2 steps per epoch
        assert b["loss_before"] == losses[b["step"] - 1] and b["loss_after"] == losses[b["step"]]
        assert b["drop"] == pytest.approx((b["loss_before"] - b["loss_after"]) / b["loss_before"])
        assert b["flagged"] == (b["drop"] > 0.15)
    assert run.stats()["overfit_epochs"] == [b["epoch"] for b in bounds if b["flagged"]]


def test_the_flag_is_the_drop_across_the_boundary_not_the_trend():
    """Ten steps per epoch, means over the five steps each side of a boundary."""
    run = TrialRun("s", params(epochs=3, batch_size=1), [None] * 10, Path("/unused"))  # 10 steps per epoch
    smooth = [2.0 - 0.02 * i for i in range(30)]  # steady learning: about 5% across a boundary
    run.history = [{"loss": v} for v in smooth]
    assert [b["flagged"] for b in run.epoch_boundaries()] == [False, False]
    memorised = [2.0] * 10 + [1.2] * 10 + [0.7] * 10  # the rows come round again: sharp drops
    run.history = [{"loss": v} for v in memorised]
    bounds = run.epoch_boundaries()
    assert [b["flagged"] for b in bounds] == [True, True]
    assert bounds[0]["loss_before"] == 2.0 and bounds[0]["loss_after"] == 1.2 and bounds[0]["drop"] == pytest.approx(0.4)


def test_two_epoch_trial_records_kept_checkpoint_and_flag(tmp_path):
    sweep = tiny_sweep(tmp_path, name="ep", trials=1, train_rows=16, wandb="disabled",
                       train_extra=", epochs: 2, checkpoint_every: 2, cotrain: 1")
    url = f"sqlite:///{tmp_path}/s.db"
    run_worker(load_config(sweep), WorkerOptions(storage_url=url))
    [t] = optuna.load_study(study_name="ep", storage=url).trials
    a = t.user_attrs
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert [e["step"] for e in a["evaluations"]] == [4, 8] and sorted(t.intermediate_values) == [4, 8]
    assert a["kept"]["step"] in (4, 8) and a["kept"]["epoch"] in (1, 2)
    best = min(a["evaluations"], key=lambda e: e["value"])
    assert a["kept"]["step"] == best["step"]
    [boundary] = a["epoch_boundaries"]
    assert boundary["epoch"] == 2 and boundary["loss_before"] > 0 and "drop" in boundary
    assert a["overfit_epochs"] == ([2] if boundary["flagged"] else [])
    assert t.value == a["mae"]
    print(f"\ntwo-epoch run: evaluations {a['evaluations']}; kept {a['kept']}; boundary {boundary}")


def test_a_mid_epoch_evaluation_does_not_choose_the_kept_adapter(base16, diamonds, tmp_path):
    """Evaluations every `eval_every` steps score a few validation rows, for pruning and the curves; only the whole
    split (epoch ends, the last step) chooses what the trial keeps. One epoch: the last adapter, however good an
    earlier subset reading looked."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:12], 182)  # 3 steps, one epoch
    values = iter([1.0, 2.0, 9.0])
    whole = []

    class Hooks:
        def on_step(self, run, record):
            pass

        def on_evaluate(self, run, step):
            whole.append(run.on_whole_validation())
            return Evaluation(next(values))

        def on_checkpoint(self, run, step, path):
            pass

    run = TrialRun("m", params(epochs=1), rows, tmp_path, hooks=Hooks(), eval_every=1, checkpoint_every=None)
    train_one(base16, run)
    assert [e["step"] for e in run.evals] == [1, 2, 3] and whole == [False, False, True]
    assert [e["whole"] for e in run.evals] == whole
    assert run.kept["step"] == 3 and run.kept["value"] == 9.0
    assert run.kept["reason"] == "last (the only evaluation on the whole validation split)"
    assert run.best["step"] == 3
