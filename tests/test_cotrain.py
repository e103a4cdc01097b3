"""Many trials, one base: a co-trained trial equals the same trial alone, a NaN stays with its trial, the group
refills as trials leave, sized steps keep the math, and a reused base gives a fresh process's result."""

from __future__ import annotations

import os
import subprocess
import types
import weakref
from pathlib import Path

import optuna
import pytest
import torch

from conftest import tiny_sweep, trial_params, tuner_cmd
from tuner import lora
from tuner.space import TrialParams
from tuner.batches import encode
from tuner.loop import Faults, GroupLoop, train_group, train_one
from tuner.train import ExecutionPlan, TrialRun


params = trial_params  # conftest's defaults: r=8 on q/k/v/o, 16-bit, dropout 0.1, warmup 0.1


class Losses:
    def __init__(self):
        self.by_run = {}

    def on_step(self, run, record):
        self.by_run.setdefault(run.name, []).append(record["loss"])

    def on_evaluate(self, run, step):
        return False

    def on_checkpoint(self, run, step, path):
        pass


TRIALS = {
    "a": params(r=8, alpha=16, dropout=0.1, learning_rate=2e-3, seed=1),
    # b alone adds the number-token loss: its weight applies to its own rows only.
    "b": params(r=16, alpha=8, dropout=0.05, learning_rate=1e-3, seed=2, target_set="attention+mlp", number_loss=0.5,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "c": params(r=4, alpha=4, dropout=0.0, learning_rate=3e-3, seed=3, target_set="qv",
                target_modules=("q_proj", "v_proj"), optimizer="sgd", scheduler="linear"),
}


_ALONE: dict[tuple, tuple[Losses, dict]] = {}


@pytest.mark.parametrize("batches,fused,per_row", [((4, 4, 4), True, "stacked"), ((4, 2, 4), True, "stacked"),
                                                   ((4, 2, 4), True, "segments"), ((4, 2, 4), False, "auto")],
                         ids=["stacked-equal-batches", "stacked-mixed-batches", "segments", "interleaved"])
def test_cotrained_trial_equals_the_same_trial_alone(base16, diamonds, batches, fused, per_row):
    """fp32 on the CPU. Fused, one base pass over every trial's rows, with each row through its own adapter's slot
    of the stacked weights (CUDA's default) or each trial's rows through its own adapter (the CPU's), with equal
    or mixed micro-batches; alone, a trial takes the plain matmul. Interleaved: one base pass per trial in the same
    loop."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    specs = {name: TrialParams.from_dict({**p.to_dict(), "batch_size": b})
             for (name, p), b in zip(TRIALS.items(), batches)}
    if batches not in _ALONE:  # the trials alone are the same for every variant with these batches: train once
        alone, alone_w = Losses(), {}
        for name, p in specs.items():
            train_one(base16, TrialRun(name, p, rows, Path("/unused"), hooks=alone),
                      on_done=lambda r: alone_w.__setitem__(r.name, r.adapter.state_dict()))
        _ALONE[batches] = alone, alone_w
    alone, alone_w = _ALONE[batches]
    together, together_w = Losses(), {}
    runs = [TrialRun(name, p, rows, Path("/unused"), hooks=together) for name, p in specs.items()]
    lora.router_of(base16.model).per_row = per_row
    try:
        train_group(base16, runs, on_done=lambda r: together_w.__setitem__(r.name, r.adapter.state_dict()),
                    fused=fused)
    finally:
        lora.router_of(base16.model).per_row = "auto"
    assert all(r.status == "completed" for r in runs)
    assert runs[0].plan.group_size == 3
    assert runs[0].plan.cotrain_mode == ("fused" if fused else "interleaved")
    for name in specs:
        assert together.by_run[name] == pytest.approx(alone.by_run[name], rel=1e-5, abs=1e-6), name
        # Adam divides by the root of the squared-gradient average, so for weights whose gradient is near zero
        # float noise in the last bits moves the update: compare weights at the scale of a few updates' noise.
        worst = max(float((together_w[name][k] - v).abs().max()) for k, v in alone_w[name].items())
        scale = max(float(v.abs().max()) for v in alone_w[name].values())
        assert worst < 1e-3 * scale + 1e-6, (name, worst, scale)
    assert together.by_run["a"] != pytest.approx(together.by_run["b"], rel=1e-3)  # they did train differently


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "interleaved"])
def test_nan_in_one_trial_fails_that_trial_alone(base16, diamonds, fused):
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    seen = Losses()

    class Poisoned(TrialRun):
        def start(self, model, device):
            super().start(model, device)
            with torch.no_grad():
                next(iter(self.adapter.weights.values())).lora_B.fill_(float("nan"))

    bad = Poisoned("bad", TRIALS["a"], rows, Path("/unused"), hooks=seen)
    good = TrialRun("good", TRIALS["b"], rows, Path("/unused"), hooks=seen)
    train_group(base16, [bad, good], fused=fused)
    assert bad.status == "failed" and bad.error.reason == "nan_loss"
    assert good.status == "completed" and len(seen.by_run["good"]) == 4
    alone = Losses()
    train_one(base16, TrialRun("good", TRIALS["b"], rows, Path("/unused"), hooks=alone))
    assert seen.by_run["good"] == pytest.approx(alone.by_run["good"], rel=1e-5)


def test_the_group_refills_as_trials_leave(base16, diamonds):
    """The late trial takes the slot the short one left, with a larger rank: every layer's stacks grow while the
    long trial is mid-way, and the long trial still trains exactly as it would alone."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    seen_losses = Losses()
    short = TrialRun("short", params(max_steps=2), rows, Path("/unused"), hooks=seen_losses)
    long = TrialRun("long", params(seed=5), rows, Path("/unused"), hooks=seen_losses)
    queue = [TrialRun("late", params(seed=6, r=32, alpha=32, max_steps=3), rows, Path("/unused"), hooks=seen_losses)]
    asked = []

    def supply(free):
        asked.append(free)
        return [queue.pop()] if queue else []

    seen = train_group(base16, [short, long], supplier=supply, capacity=2, fused=True)
    assert [r.name for r in seen] == ["short", "long", "late"]
    assert all(r.status == "completed" for r in seen) and asked[0] == 1
    assert seen[2].plan.group_size == 2
    alone = Losses()
    train_one(base16, TrialRun("long", params(seed=5), rows, Path("/unused"), hooks=alone))
    assert seen_losses.by_run["long"] == pytest.approx(alone.by_run["long"], rel=1e-5)


def test_dropout_masks_survive_recomputation(base16, diamonds):
    """With dropout, gradient checkpointing recomputes each layer's forward in the backward: it must see the masks
    of the forward it recomputes, or the gradients belong to another model."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    p = params(dropout=0.1, max_steps=3)
    plain, recomputed = Losses(), Losses()
    train_one(base16, TrialRun("x", p, rows, Path("/unused"), hooks=plain), gradient_checkpointing=False)
    run = TrialRun("x", p, rows, Path("/unused"), hooks=recomputed)
    train_one(base16, run, gradient_checkpointing=True)
    assert run.plan.gradient_checkpointing
    assert recomputed.by_run["x"] == pytest.approx(plain.by_run["x"], rel=1e-5)
    assert lora.router_of(base16.model)._masks is None  # an 8B model's masks take gigabytes: none are kept
    no_dropout = Losses()
    train_one(base16, TrialRun("x", params(dropout=0.0, max_steps=3), rows, Path("/unused"), hooks=no_dropout))
    assert no_dropout.by_run["x"][1:] != pytest.approx(plain.by_run["x"][1:], rel=1e-4)  # the masks did something


def test_sized_steps_keep_the_math(base16, diamonds):
    """Micro-batches of 2 with accumulation and gradient checkpointing give the loss curve of plain batches of 8."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:32], 182)
    p = params(batch_size=8, dropout=0.0)
    plain, sized = Losses(), Losses()
    train_one(base16, TrialRun("x", p, rows, Path("/unused"), hooks=plain), gradient_checkpointing=False)
    run = TrialRun("x", p, rows, Path("/unused"), hooks=sized)
    run.plan = ExecutionPlan(micro_batch=2)
    train_one(base16, run, gradient_checkpointing=True)
    assert run.plan.gradient_checkpointing and run.plan.micro_batch == 2
    assert sized.by_run["x"] == pytest.approx(plain.by_run["x"], rel=1e-5)


def test_checkpointing_an_oom_turned_on_leaves_nothing_on_the_cached_base(base16, diamonds):
    """`gradient_checkpointing: auto` turns checkpointing on at the first out-of-memory error and off when the group
    ends. The worker keeps the base for its next group, so nothing the switch added may stay on it: transformers'
    enable hooks the embeddings (their output then requires grad) and its disable removes that hook only for a
    peft-loaded model, which tuner's adapters are not."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)
    embeddings = base16.model.get_input_embeddings()
    hooks = len(embeddings._forward_hooks)
    for _ in range(2):  # a second group on the same base: no hook piles up either
        run = TrialRun("ckpt", params(dropout=0.0), rows, Path("/unused"))
        train_one(base16, run, gradient_checkpointing="auto", faults=Faults(oom_at_step=1))
        assert run.status == "completed" and run.plan.gradient_checkpointing and run.plan.oom_events >= 1
        assert not base16.model.is_activation_checkpointing
        assert len(embeddings._forward_hooks) == hooks


def test_an_oom_inside_the_forward_frees_the_failed_pass_before_the_retry(base16, diamonds, monkeypatch):
    """An out-of-memory error raised deep in the forward: when the step is redone, the failed pass's activations
    and dropout masks are garbage (held by the exception's traceback, they would take gigabytes on a GPU at K=16)."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)
    seen = {}

    def fail_once(module, args, out):
        if "activation" not in seen:
            seen["activation"] = weakref.ref(out[0] if isinstance(out, tuple) else out)
            raise torch.OutOfMemoryError("injected inside the forward")

    clear = GroupLoop._clear_partial_steps

    def cleared(self):
        clear(self)
        seen["alive"] = seen["activation"]() is not None
        seen["masks"] = lora.router_of(self.model)._masks

    monkeypatch.setattr(GroupLoop, "_clear_partial_steps", cleared)
    hook = base16.model.model.layers[-1].register_forward_hook(fail_once)
    try:
        run = TrialRun("oom", params(dropout=0.1), rows, Path("/unused"))
        train_one(base16, run, gradient_checkpointing=False)
    finally:
        hook.remove()
    assert run.status == "completed" and run.plan.oom_events == 1 and run.plan.micro_batch == 2
    assert seen["alive"] is False and seen["masks"] is None


def test_a_trial_that_joins_after_a_halving_starts_at_the_halved_micro_batch(base16, diamonds):
    """Room for 5 rows a pass: two trials of batch 4 run out of memory and both halve to 2. When one ends, the trial
    that takes its place starts at 2 rows too; at its full 4 it would run out again, and the trial that had halved
    once already would fail."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:16], 182)
    first = [TrialRun("a", params(dropout=0.0, max_steps=2), rows, Path("/unused")),
             TrialRun("b", params(dropout=0.0, max_steps=4), rows, Path("/unused"))]
    queue = [TrialRun("c", params(dropout=0.0, max_steps=2), rows, Path("/unused"))]
    seen = train_group(base16, first, supplier=lambda room: [queue.pop()] if queue and room else [], capacity=2,
                       gradient_checkpointing=False, faults=Faults(oom_over_rows=5))
    assert [(r.name, r.status, r.plan.micro_batch) for r in seen] == [("a", "completed", 2), ("b", "completed", 2),
                                                                       ("c", "completed", 2)]
    assert [r.plan.oom_events for r in seen] == [1, 1, 0]


def test_a_run_that_left_its_group_keeps_no_copies(base16, diamonds):
    """A refilling group holds every run it saw until it ends: what a run no longer needs once scored is dropped."""
    rows, _ = encode(base16.tokenizer, diamonds.train[:8], 182)

    class Evaluated(Losses):
        def on_evaluate(self, run, step):
            return types.SimpleNamespace(value=float(step), prune=False)

    copies = []
    run = TrialRun("x", params(dropout=0.0), rows, Path("/unused"), hooks=Evaluated(), eval_every=1)
    train_one(base16, run, on_done=lambda r: copies.append(r._best_state is not None))
    assert copies == [True]  # the best evaluation's copy, there while the run was scored
    assert run._best_state is None and run._optimizer is None and not run.adapter.weights


def test_reused_base_gives_a_fresh_processs_result(tmp_path):
    """Two identical trials, one after the other in one worker (the second on the reused base), against the
    same trial in a fresh process: the same adapter and the same metrics."""
    fixed = ("search:\n  r: 8\n  dropout: 0.05\n  target_modules: attention\n  quant_bits: 4\n"
             "  learning_rate: 2.0e-3\n")

    def sweep(folder: Path, name: str, trials: int) -> Path:
        folder.mkdir()
        path = tiny_sweep(folder, name=name, trials=trials, wandb="disabled", train_extra=", cotrain: 1")
        text = path.read_text()
        text = text[: text.index("search:")] + fixed + text[text.index("train:"):]
        path.write_text(text)
        return path

    results = {}
    for name, trials in (("reuse", 2), ("fresh", 1)):
        folder = tmp_path / name
        url = f"sqlite:///{folder}/s.db"
        res = subprocess.run(tuner_cmd() + ["run", str(sweep(folder, name, trials)), "--storage", url],
                             cwd=tmp_path, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "TUNER_PLAIN_OUTPUT": "1"})
        assert res.returncode == 0, res.stdout + res.stderr
        results[name] = optuna.load_study(study_name=name, storage=url).trials
    from safetensors.torch import load_file

    reused, fresh = results["reuse"][1], results["fresh"][0]
    assert reused.user_attrs["mae"] == fresh.user_attrs["mae"]
    a = load_file(str(Path(reused.user_attrs["adapter_path"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(fresh.user_attrs["adapter_path"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
