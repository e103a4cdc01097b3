"""One trial's training: `TrialRun` (its adapter, optimizer, scheduler, step schedule, history and evaluations),
how the optimizer and schedule are built, and the `ExecutionPlan` that records how its steps were executed.

The math of a step is the recipe's SFTTrainer step: causal LM loss on the completion tokens only (the price and
the end-of-sequence token), summed over the effective batch and divided by its number of completion tokens, AdamW
(weight decay on every LoRA weight), a warmup + decay schedule, gradient clipping at `max_grad_norm`. A run's step
may be cut into micro-batches; which rows go together is not part of the math. `loop.train_group` drives any number
of runs on one base; a run knows nothing of the others.

How a step is executed (micro-batch size, gradient checkpointing) never changes what it computes; it is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import checkpoints, lora
from .batches import Encoded, micro_batches, step_schedule, steps_per_epoch
from .errors import TrialFailure
from .space import TrialParams


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str,
                   b_params: list[torch.nn.Parameter] | None = None, b_ratio: float = 1.0):
    """Returns (optimizer, implementation note). With `b_params` and a `b_ratio` other than 1 (LoRA+), those
    parameters (the B matrices) are a second group stepped at `b_ratio` x lr; the schedule scales both groups alike.

    paged_adamw_32bit is AdamW's update with the optimizer state paged to CPU memory under GPU memory pressure, and a
    LoRA's state is small; torch's AdamW runs it, fused into one kernel per trial on a GPU. bitsandbytes' version
    launches a kernel and runs Python per parameter tensor (256 of them for q/k/v/o of an 8B model), which is what
    co-training 16 trials on an H200 spent much of each step on. The note records what ran."""
    if b_params is not None and b_ratio != 1.0:
        ids = {id(p) for p in b_params}
        params = [{"params": [p for p in params if id(p) not in ids], "lr": lr},
                  {"params": list(b_params), "lr": lr * b_ratio}]
        opt, note = make_optimizer(name, params, lr, weight_decay, device)
        return opt, f"{note}, LoRA+ (B at {b_ratio:g}x the learning rate)"
    cuda = device.startswith("cuda")
    if name in ("adamw_torch", "paged_adamw_32bit"):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                fused=cuda or None)
        note = "torch.optim.AdamW" + ("(fused=True)" if cuda else "")
        if name == "paged_adamw_32bit":
            note += " (the same update, unpaged: a LoRA's optimizer state is small)"
        return opt, note
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        if not device.startswith("cuda"):
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), \
                "bnb.optim.AdamW8bit (paging is CUDA-only; same update)"
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay), "bnb.optim.PagedAdamW8bit"
    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "bnb.optim.AdamW8bit"
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay), "torch.optim.SGD"
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(name: str, optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_scheduler

    warmup = math.ceil(warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps), warmup


# ---------------------------------------------------------------------------------------------------------------
# One trial's run


@dataclass
class Evaluation:
    """What an evaluation hook returns: the validation value (lower is better unless the run maximizes) and
    whether the pruner wants the trial stopped."""

    value: float | None
    prune: bool = False


class RunHooks(Protocol):
    """What the loop tells the outside world. Implemented by the study layer; the loop knows nothing of storage."""

    def on_step(self, run: "TrialRun", record: dict) -> None: ...
    def on_evaluate(self, run: "TrialRun", step: int) -> "Evaluation | bool": ...  # bool: prune, no value
    def on_checkpoint(self, run: "TrialRun", step: int, path: Path) -> None: ...


class NullHooks:
    def on_step(self, run, record):
        pass

    def on_evaluate(self, run, step):
        return False

    def on_checkpoint(self, run, step, path):
        pass


@dataclass
class ExecutionPlan:
    """How steps are executed. Never part of the math: recorded on the trial."""

    micro_batch: int
    gradient_checkpointing: bool = False
    oom_halvings: int = 0
    oom_events: int = 0
    attention: str | None = None
    group_size: int = 1  # most trials this one was co-trained with, itself included
    cotrain_mode: str = "fused"  # fused: one base pass over every trial's rows; interleaved: one pass per trial
    padded_tokens: int = 0  # positions computed, padding included
    real_tokens: int = 0
    dequantized_once: bool = False  # 4-bit weights dequantized once per layer, not per use (models.dequantize_once)

    def to_dict(self) -> dict:
        waste = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return {"micro_batch": self.micro_batch, "gradient_checkpointing": self.gradient_checkpointing,
                "oom_halvings": self.oom_halvings, "oom_events": self.oom_events, "attention": self.attention,
                "group_size": self.group_size, "cotrain_mode": self.cotrain_mode,
                "padding_fraction": round(waste, 4), "dequantized_once": self.dequantized_once}


@dataclass
class TrialRun:
    name: str
    params: TrialParams
    rows: list[Encoded]
    run_dir: Path
    hooks: RunHooks = field(default_factory=NullHooks)
    plan: ExecutionPlan | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    maximize: bool = False  # the validation value's direction (hit rate); MAE and RMSLE minimize
    # Who may resume from checkpoints in run_dir: the trial's retries, not a study that was deleted and created again
    # under the same name and output folder. None: any checkpoint there (tests, benches).
    owner: str | None = None
    overfit_drop: float = 0.15  # relative training-loss drop across an epoch boundary that flags memorisation
    # The adapter to start from instead of peft's init (`study.extend`: the best trial's kept adapter); a checkpoint of
    # this run's own, when it resumes, comes after it.
    init_state: dict | None = field(default=None, repr=False)
    # state
    status: str = "pending"  # pending, running, completed, failed, pruned, interrupted
    error: Exception | None = None
    step: int = 0
    ticks: int = 0  # forward passes this run took part in: seeds its dropout masks
    resumed_from_step: int = 0
    history: list[dict] = field(default_factory=list)
    adapter: lora.Adapter | None = None
    optimizer_note: str = ""
    warmup_steps: int = 0
    train_seconds: float = 0.0
    rows_seen: int = 0
    tokens_seen: int = 0
    skipped_checkpoints: list[str] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {step, epoch, value}
    best: dict | None = None  # the evaluation with the best value; its adapter is what the trial keeps
    kept: dict | None = None  # set at completion: which step's adapter the trial ended with, and why
    _best_state: dict | None = field(default=None, repr=False)
    _schedule: list[list[int]] = field(default_factory=list, repr=False)
    _micro_index: int = 0  # micro-batch within the current step
    _micro_batches: list[list[int]] = field(default_factory=list, repr=False)
    _step_tokens: int = 0
    _step_loss: float = 0.0
    _optimizer: object = None
    _scheduler: object = None
    _checked_after_eval: bool = True

    # -- set-up ---------------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return len(self._schedule)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def start(self, model, device: str) -> None:
        p = self.params
        if not self.rows:
            raise TrialFailure("no_data", "no training rows left after dropping rows longer than max_length")
        self._schedule = step_schedule(len(self.rows), p)
        if self.plan is None:
            self.plan = ExecutionPlan(micro_batch=p.batch_size)
        self.adapter = lora.attach(model, self.name, r=p.r, alpha=p.alpha, dropout=p.dropout,
                                   target_modules=list(p.target_modules), seed=p.seed, use_rslora=p.use_rslora)
        self._optimizer, self.optimizer_note = make_optimizer(p.optimizer, self.adapter.parameters(), p.learning_rate,
                                                              p.weight_decay, device, self.adapter.b_parameters(),
                                                              p.loraplus_ratio)
        self._scheduler, self.warmup_steps = make_scheduler(p.scheduler, self._optimizer, self.total_steps,
                                                            p.warmup_ratio)
        if self.init_state is not None:
            self.adapter.load_state_dict(self.init_state)
            self.init_state = None
        self._resume()
        self.status = "running"
        self.begin_step()

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint of this trial, if there is one."""
        found = checkpoints.resume(self.checkpoint_root, self.owner, self.adapter, self._optimizer, self._scheduler,
                                   self.skipped_checkpoints)
        if found is None:
            return
        state, best_state = found
        self.step = self.resumed_from_step = int(state["step"])
        self.ticks = int(state["ticks"])
        self.history = list(state["history"])
        self.evals = list(state.get("evals", []))
        # The best evaluation counts only while its adapter is still there to be kept.
        self.best = state.get("best") if best_state is not None else None
        self._best_state = best_state

    def begin_step(self) -> None:
        if self.step >= self.total_steps:
            return
        rows = self._schedule[self.step]
        self._micro_batches = micro_batches(rows, self.rows, self.plan.micro_batch)
        self._micro_index = 0
        self._step_tokens = sum(self.rows[i].n_completion for i in rows)
        self._step_loss = 0.0
        self._step_t0 = time.perf_counter()

    def restart_step(self) -> None:
        """Drop the partial accumulation of the current step (after an OOM) and start it again."""
        self.adapter.zero_grad()
        self.begin_step()

    @property
    def step_tokens(self) -> int:
        """Completion tokens of the current optimizer step: every micro-batch's loss is divided by it."""
        return self._step_tokens

    def release(self) -> None:
        """The run has left its group: its optimizer state and its best adapter's copy are garbage (a refilling group
        keeps every run it saw until it ends, and an 8B model's copy at r 32 is about 100 MB)."""
        self._optimizer = self._scheduler = None
        self._best_state = None

    def next_micro(self) -> list[Encoded]:
        return [self.rows[i] for i in self._micro_batches[self._micro_index]]

    # -- after a forward/backward ----------------------------------------------------------------------------------
    def after_micro(self, loss_sum: float, rows: int, tokens: int) -> bool:
        """Account for one micro-batch. Returns True when this run finished an optimizer step."""
        self._step_loss += loss_sum
        self.rows_seen += rows
        self.tokens_seen += tokens
        self._micro_index += 1
        return self._micro_index >= len(self._micro_batches)

    def grad_norm(self) -> torch.Tensor:
        """The total gradient norm, left on the device: the loop reads every stepping run's norm in one transfer
        (a transfer per run would wait for the GPU once per co-trained trial)."""
        return torch.nn.utils.get_total_norm([p.grad for p in self.adapter.parameters()])

    def check_gradients(self, norm: torch.Tensor, norm_f: float) -> float:
        """Clip (what clip_grad_norm_ does, with the norm computed already), and refuse a dead adapter. B's
        gradient is (x A^T)^T g with A random, so it is zero exactly when no gradient reaches the layer; A's
        gradient is B^T g, zero while B is still at its initial zeros (the first step, or longer under warmup), so
        it is only required once B has moved. Checked on the first two steps and on the first step after each
        evaluation (scoring runs no-grad forwards, which is when the CPU repacking trap of bitsandbytes cuts
        gradients)."""
        params = self.adapter.parameters()
        torch.nn.utils.clip_grads_with_norm_(params, self.params.max_grad_norm, norm)
        if not math.isfinite(norm_f):
            raise TrialFailure("nan_grad", f"gradient norm {norm_f} at step {self.step + 1}")
        if self.step < 2 or not self._checked_after_eval:
            # One transfer for all layers: a bool() per tensor would wait for the GPU 2 x 128 times for an 8B model.
            flags = torch.stack([t for w in self.adapter.weights.values() for t in (
                w.lora_Bt.grad.any(), w.lora_Bt.detach().any(), w.lora_A.grad.any())]).view(-1, 3).tolist()
            dead = [path for path, (b_grad, b_moved, a_grad) in zip(self.adapter.weights, flags)
                    if not b_grad or (b_moved and not a_grad)]
            if dead:
                when = "after an evaluation pass" if not self._checked_after_eval else f"at step {self.step + 1}"
                raise TrialFailure("zero_grad", f"{len(dead)} of {len(self.adapter.weights)} adapted layers got "
                                   f"zero gradient {when} (first: {dead[0]})")
            self._checked_after_eval = True
        return norm_f

    def optimizer_step(self, grad_norm: float) -> dict:
        lr = self._scheduler.get_last_lr()[0]
        self._optimizer.step()
        self._scheduler.step()
        self.adapter.zero_grad()
        self.step += 1
        loss = self._step_loss / max(self._step_tokens, 1)
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "epoch": self.params.epochs * self.step / max(self.total_steps, 1),
                  "step_seconds": time.perf_counter() - self._step_t0}
        self.history.append(record)
        return record

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.rows), self.params)

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_every) or self.params.epochs > 1

    def due_eval(self) -> bool:
        """Every `eval_every` steps, at every epoch's end when there are several, and at the last step whenever
        the run evaluates at all (so that the last adapter can be compared with the best)."""
        if not self.evaluates:
            return False
        if self.done:
            return True
        every = bool(self.eval_every) and self.step % self.eval_every == 0
        return every or (self.params.epochs > 1 and self.step % self.steps_per_epoch == 0)

    def on_whole_validation(self) -> bool:
        """Whether this step's evaluation scores the whole validation split (at an epoch's end when there are
        several, and at the last step) rather than its first `eval_rows` (every `eval_every` steps)."""
        return self.done or (self.params.epochs > 1 and self.step % self.steps_per_epoch == 0)

    def record_eval(self, value: float | None) -> None:
        self._checked_after_eval = False  # scoring ran no-grad forwards: check the gradients at the next step
        if value is None or not math.isfinite(value):
            return
        epoch = math.ceil(self.step / self.steps_per_epoch)
        entry = {"step": self.step, "epoch": epoch, "value": value, "whole": self.on_whole_validation()}
        self.evals.append(entry)
        # Only an evaluation on the whole validation split may choose the adapter the trial keeps; those every
        # `eval_every` steps serve pruning and the curves. On 32 rows they mislead, and under a cosine schedule the
        # last adapter is the one to beat: in the default study (diamonds) trial 3 read $871 at step 150 and $925 at
        # its last, and kept step 150, which scored $1,566 on the test rows against the last one's $1,031; trial 0
        # kept step 200 ($1,191 against $1,221). Mixing the two sizes would also compare different rows.
        if not entry["whole"]:
            return
        # A tie goes to the later adapter: it has trained more, and on a small validation set equal values are
        # common (a tie kept step 200 of 250 in a default study, which then scored 33% worse on the test rows).
        better = self.best is None or (value >= self.best["value"] if self.maximize else value <= self.best["value"])
        if better:
            self.best = entry
            self._best_state = self.adapter.state_dict()
            if self.checkpoint_every or self.params.epochs > 1:
                self._save_best_on_disk()

    def keep_best(self) -> None:
        """At completion: end with the best adapter evaluated on the whole validation split (the best epoch's, when
        there are several), not necessarily the last one."""
        last = self.evals[-1] if self.evals and self.evals[-1]["step"] == self.step else None
        if self.best is None:
            self.kept = {"step": self.step, "reason": "last (no evaluation)"}
            return
        if self.best["step"] != self.step and self._best_state is not None:
            self.adapter.load_state_dict(self._best_state)
            self.kept = {**self.best, "reason": "best validation value", "last": last}
        elif sum(bool(e.get("whole")) for e in self.evals) == 1:
            self.kept = {**self.best, "reason": "last (the only evaluation on the whole validation split)"}
        else:
            self.kept = {**self.best, "reason": "last is best", "last": last}

    def epoch_boundaries(self) -> list[dict]:
        """Training loss just before and just after each epoch boundary (means over a few steps). A sharp drop
        when the rows come round again is memorisation, not learning; it is flagged above `overfit_drop`."""
        per = self.steps_per_epoch
        losses = [h["loss"] for h in self.history]
        k = max(1, min(5, per // 4))
        out = []
        for epoch in range(1, self.params.epochs):
            b = epoch * per
            if b + k > len(losses) or b - k < 0:
                break
            before = sum(losses[b - k:b]) / k
            after = sum(losses[b:b + k]) / k
            drop = (before - after) / before if before > 0 else 0.0
            out.append({"epoch": epoch + 1, "step": b, "loss_before": before, "loss_after": after,
                        "drop": drop, "flagged": drop > self.overfit_drop})
        return out

    def _save_best_on_disk(self) -> None:
        checkpoints.save_best(self.checkpoint_root, self._best_state, self.best["step"], self.best["value"])

    def due_checkpoint(self) -> bool:
        return bool(self.checkpoint_every) and self.step % self.checkpoint_every == 0 and not self.done

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save_checkpoint(self, base_name: str, final: bool = False) -> Path:
        """`final`: the last step's checkpoint, a resume point only (neither pushed nor archived: the trial's kept
        adapter is the end of training); it does not push an earlier one out of the `keep_checkpoints` newest."""
        state = {"step": self.step, "ticks": self.ticks, "history": self.history, "evals": self.evals,
                 "best": self.best, "optimizer": self._optimizer.state_dict(),
                 "scheduler": self._scheduler.state_dict(), "params": self.params.to_dict()}
        return checkpoints.write(self.checkpoint_root, self.step, adapter=self.adapter, base_name=base_name,
                                 owner=self.owner, state=state, keep=self.keep_checkpoints + final,
                                 best_step=self.best["step"] if self.best else None)

    def stats(self) -> dict:
        secs = max(self.train_seconds, 1e-9)
        return {"train_seconds": self.train_seconds, "rows_per_s": self.rows_seen / secs,
                "tokens_per_s": self.tokens_seen / secs, "steps": self.step, "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from_step, "optimizer_impl": self.optimizer_note,
                "warmup_steps": self.warmup_steps, "execution": self.plan.to_dict() if self.plan else None,
                "evaluations": self.evals, "kept": self.kept, "epoch_boundaries": self.epoch_boundaries(),
                "overfit_epochs": [b["epoch"] for b in self.epoch_boundaries() if b["flagged"]]}
