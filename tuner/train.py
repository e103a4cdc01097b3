"""Training: LoRA adapters on one frozen base, in one loop you can read top to bottom.

A `TrialRun` is one trial's training: its adapter, optimizer, scheduler, data order and history. `train_group`
trains any number of them on one base at once (one run is the ordinary case). Every tick each active run
contributes its next micro-batch; the base runs once over the concatenated rows; each run's loss is taken over its
own rows only and normalised by the completion tokens of its own optimizer step, so its gradients are exactly the
ones it would get alone. A run whose step is complete clips its own gradients and steps its own optimizer and
scheduler. Runs finish, fail or get pruned independently, and `supplier` may hand in new runs as places free up.

The math of a step is the recipe's SFTTrainer step: causal LM loss on the completion tokens only (the price and
the end-of-sequence token), summed over the effective batch and divided by its number of completion tokens, AdamW
(weight decay on every LoRA weight), a warmup + decay schedule, gradient clipping at `max_grad_norm`. Rows are
left-padded with explicit position ids, which gives the same values as right padding and puts every completion at
the end, so the LM head runs over the last few positions only (on SmolLM2 its 49k-wide vocabulary is a fifth of the
compute otherwise).

How a step is executed (micro-batch size, gradient checkpointing) never changes what it computes; it is recorded.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F

from . import lora
from .data import Example
from .errors import Interrupted, TrialFailure, TrialPruned
from .models import repacked_layers
from .space import TrialParams

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "train_state.pt"
OWNER_FILE = "owner.txt"


def _read_owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER_FILE).read_text().strip()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    n_prompt: int  # tokens before the completion; the loss covers input_ids[n_prompt:]

    @property
    def n_completion(self) -> int:
        return len(self.input_ids) - self.n_prompt


def encode(tokenizer, examples: Iterable[Example], max_length: int) -> tuple[list[Encoded], int]:
    """Tokenize prompt and prompt+completion the way trl's SFTTrainer does (the completion starts where the two
    diverge; an end-of-sequence token is appended). Rows longer than `max_length` are dropped and counted: cutting
    them would cut the price, which is the only thing the loss looks at."""
    eos = tokenizer.eos_token_id
    out, too_long = [], 0
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        pc = tokenizer(ex.prompt + ex.completion)["input_ids"]
        n = 0
        while n < min(len(p), len(pc)) and p[n] == pc[n]:
            n += 1
        ids = tuple(pc) + (eos,)
        if len(ids) > max_length:
            too_long += 1
            continue
        out.append(Encoded(ids, n))
    return out, too_long


def step_schedule(n_rows: int, params: TrialParams) -> list[list[int]]:
    """Row indices of every optimizer step, all epochs: a seeded permutation per epoch, cut into effective batches
    (the last one of an epoch may be smaller, as with the Trainer's default), capped at `max_steps`."""
    steps: list[list[int]] = []
    eff = params.effective_batch
    for epoch in range(params.epochs):
        g = torch.Generator().manual_seed(params.seed * 1000 + epoch)
        perm = torch.randperm(n_rows, generator=g).tolist()
        steps += [perm[i:i + eff] for i in range(0, n_rows, eff)]
    if params.max_steps is not None:
        steps = steps[: params.max_steps]
    return steps


def steps_per_epoch(n_rows: int, params: TrialParams) -> int:
    return math.ceil(n_rows / params.effective_batch)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str):
    """Returns (optimizer, implementation note).

    paged_adamw_32bit is AdamW's update with the optimizer state paged to CPU memory under GPU memory pressure, and a
    LoRA's state is small; torch's AdamW runs it, fused into one kernel per trial on a GPU. bitsandbytes' version
    launches a kernel and runs Python per parameter tensor (256 of them for q/k/v/o of an 8B model), which is what
    co-training 16 trials on an H200 spent much of each step on. The note records what ran."""
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


# Per-parameter optimizer state that has its parameter's shape (torch's AdamW and SGD, bitsandbytes' state1/2).
_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")


def _check_state_shapes(optimizer) -> None:
    """torch's load_state_dict matches state to parameters by position, not shape: a checkpoint whose state does
    not fit (written before B was held transposed as [r, out]) would load, then fail at the first step."""
    for p, state in optimizer.state.items():
        for key in _SHAPED_STATE:
            v = state.get(key)
            if torch.is_tensor(v) and v.shape != p.shape:
                raise ValueError(f"optimizer state {key} has shape {tuple(v.shape)}, its parameter "
                                 f"{tuple(p.shape)}")


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

    def to_dict(self) -> dict:
        waste = 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0
        return {"micro_batch": self.micro_batch, "gradient_checkpointing": self.gradient_checkpointing,
                "oom_halvings": self.oom_halvings, "oom_events": self.oom_events, "attention": self.attention,
                "group_size": self.group_size, "cotrain_mode": self.cotrain_mode,
                "padding_fraction": round(waste, 4)}


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
                                   target_modules=list(p.target_modules), seed=p.seed)
        self._optimizer, self.optimizer_note = make_optimizer(p.optimizer, self.adapter.parameters(), p.learning_rate,
                                                              p.weight_decay, device)
        self._scheduler, self.warmup_steps = make_scheduler(p.scheduler, self._optimizer, self.total_steps,
                                                            p.warmup_ratio)
        self._resume()
        self.status = "running"
        self._begin_step()

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint; a corrupted one is skipped with a note, falling back to the
        one before it or to a fresh start."""
        foreign = []
        for folder in sorted(self.checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
            if self.owner is not None:
                owner = _read_owner(folder)
                if owner != self.owner:
                    foreign.append(folder)
                    self.skipped_checkpoints.append(f"{folder.name}: written by {owner or 'an unknown run'}, "
                                                    f"not by this trial; removed")
                    continue
            try:
                state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
                _, tensors = lora.load_adapter_state(folder / "adapter")
                self.adapter.load_state_dict(tensors)
                self._optimizer.load_state_dict(state["optimizer"])
                _check_state_shapes(self._optimizer)
                self._scheduler.load_state_dict(state["scheduler"])
            except Exception as exc:  # any unreadable piece makes the whole checkpoint unusable
                self.skipped_checkpoints.append(f"{folder.name}: {type(exc).__name__}: {exc}"[:300])
                continue
            self._remove(foreign)
            self.step = self.resumed_from_step = int(state["step"])
            self.ticks = int(state["ticks"])
            self.history = list(state["history"])
            self.evals = list(state.get("evals", []))
            self.best = state.get("best")
            best_file = self.checkpoint_root / "best.safetensors"
            if self.best is not None and best_file.is_file():
                from safetensors.torch import load_file

                self._best_state = load_file(str(best_file))
            elif self.best is not None:
                self.best = None  # its adapter is gone: only what can be kept counts
            return
        self._remove(foreign)

    def _remove(self, foreign: list[Path]) -> None:
        """Another run's checkpoints would otherwise count as this trial's newest and push its own out."""
        for folder in foreign:
            shutil.rmtree(folder, ignore_errors=True)
        own = [f for f in self.checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*") if _read_owner(f) == self.owner]
        if foreign and not own:
            (self.checkpoint_root / "best.safetensors").unlink(missing_ok=True)

    def _begin_step(self) -> None:
        if self.step >= self.total_steps:
            return
        rows = self._schedule[self.step]
        mb = self.plan.micro_batch
        if mb < len(rows):
            # Which micro-batch a row lands in is not part of the math (the step sums over all of them), so rows of
            # similar length go together and pad less.
            rows = sorted(rows, key=lambda i: len(self.rows[i].input_ids))
        self._micro_batches = [rows[i:i + mb] for i in range(0, len(rows), mb)]
        self._micro_index = 0
        self._step_tokens = sum(self.rows[i].n_completion for i in rows)
        self._step_loss = 0.0
        self._step_t0 = time.perf_counter()

    def restart_step(self) -> None:
        """Drop the partial accumulation of the current step (after an OOM) and start it again."""
        self.adapter.zero_grad()
        self._begin_step()

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

    def record_eval(self, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        epoch = math.ceil(self.step / self.steps_per_epoch)
        entry = {"step": self.step, "epoch": epoch, "value": value}
        self.evals.append(entry)
        better = self.best is None or (value > self.best["value"] if self.maximize else value < self.best["value"])
        if better:
            self.best = entry
            self._best_state = self.adapter.state_dict()
            if self.checkpoint_every or self.params.epochs > 1:
                self._save_best_on_disk()

    def keep_best(self) -> None:
        """At completion: end with the best evaluated adapter, not necessarily the last one."""
        last = self.evals[-1] if self.evals and self.evals[-1]["step"] == self.step else None
        if self.best is None:
            self.kept = {"step": self.step, "reason": "last (no evaluation)"}
            return
        if self.best["step"] != self.step and self._best_state is not None:
            self.adapter.load_state_dict(self._best_state)
            self.kept = {**self.best, "reason": "best validation value", "last": last}
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
        from safetensors.torch import save_file

        folder = self.checkpoint_root
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".best-{os.getpid()}.safetensors"
        save_file({k: v.contiguous() for k, v in self._best_state.items()}, str(tmp),
                  metadata={"step": str(self.best["step"]), "value": repr(self.best["value"])})
        os.replace(tmp, folder / "best.safetensors")

    def due_checkpoint(self) -> bool:
        return bool(self.checkpoint_every) and self.step % self.checkpoint_every == 0 and not self.done

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save_checkpoint(self, base_name: str) -> Path:
        final = self.checkpoint_root / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if (final / STATE_FILE).exists():
            return final
        tmp = self.checkpoint_root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora.save_adapter(self.adapter, tmp / "adapter", base_name)
        if self.owner is not None:
            (tmp / OWNER_FILE).write_text(self.owner)
        torch.save({"step": self.step, "ticks": self.ticks, "history": self.history, "evals": self.evals,
                    "best": self.best, "optimizer": self._optimizer.state_dict(),
                    "scheduler": self._scheduler.state_dict(), "params": self.params.to_dict()}, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(self.checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*"))[: -self.keep_checkpoints]
        best_step = self.best["step"] if self.best else None
        for folder in old:
            if best_step is not None and folder.name == f"{CHECKPOINT_PREFIX}{best_step:06d}":
                continue  # the best one stays: `tuner promote --checkpoint` may want it
            shutil.rmtree(folder, ignore_errors=True)
        return final

    def latest_checkpoint_step(self) -> int | None:
        found = sorted(self.checkpoint_root.glob(f"{CHECKPOINT_PREFIX}*"))
        return int(found[-1].name.removeprefix(CHECKPOINT_PREFIX)) if found else None

    def stats(self) -> dict:
        secs = max(self.train_seconds, 1e-9)
        return {"train_seconds": self.train_seconds, "rows_per_s": self.rows_seen / secs,
                "tokens_per_s": self.tokens_seen / secs, "steps": self.step, "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from_step, "optimizer_impl": self.optimizer_note,
                "warmup_steps": self.warmup_steps, "execution": self.plan.to_dict() if self.plan else None,
                "evaluations": self.evals, "kept": self.kept, "epoch_boundaries": self.epoch_boundaries(),
                "overfit_epochs": [b["epoch"] for b in self.epoch_boundaries() if b["flagged"]]}


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _collate(parts: list[tuple[TrialRun, list[Encoded]]], pad_id: int, device):
    """Left-pad every row to the longest; one segment per run. Each segment also carries its own padded length
    (what the run's micro-batch would be padded to alone), so its dropout masks do not depend on its neighbours."""
    rows = [e for _, es in parts for e in es]
    width = max(len(e.input_ids) for e in rows)
    comp = max(e.n_completion for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), comp), -100, dtype=torch.long)
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        mask[i, width - n:] = 1
        labels[i, comp - e.n_completion:] = torch.tensor(e.input_ids[e.n_prompt:])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    segments, start = [], 0
    for run, es in parts:
        own = max(len(e.input_ids) for e in es)
        segments.append((run.name, start, start + len(es), own))
        start += len(es)
    return (ids.to(device), mask.to(device), positions.to(device), labels.to(device), segments, comp)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def _injected_nan(run: TrialRun, loss: float | None) -> float | None:
    """Test hook: TUNER_INJECT_NAN_AT_STEP=N makes the loss of step N not finite, as a diverging run's would be."""
    at = os.environ.get("TUNER_INJECT_NAN_AT_STEP")
    return float("nan") if at and run.step + 1 == int(at) else loss


def _injected_oom(run: TrialRun) -> None:
    """Test hook: TUNER_INJECT_OOM_AT_STEP=N raises the framework's own OOM error when a run that has not yet
    halved its micro-batch reaches step N; `N:always` raises it on every attempt at step N."""
    at = os.environ.get("TUNER_INJECT_OOM_AT_STEP")
    if not at:
        return
    step, _, mode = at.partition(":")
    if run.step + 1 == int(step) and (mode == "always" or run.plan.oom_halvings == 0):
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step} (TUNER_INJECT_OOM_AT_STEP)")


def train_group(base, runs: list[TrialRun], *, supplier: Callable[[int], list[TrialRun]] | None = None,
                stop: Callable[[], bool] | None = None,
                on_done: Callable[[TrialRun], None] | None = None,
                gradient_checkpointing: bool | str = "auto", capacity: int | None = None,
                fused: bool = True) -> list[TrialRun]:
    """Train `runs` together on `base` until each completes, fails or is pruned. `supplier(free)` is asked for up
    to `free` more runs whenever one leaves (`capacity`, default len(runs), is the group's size). `on_done(run)` is
    called while the run's adapter is still attached (to score and save it), then the adapter is removed.

    Gradient checkpointing: "auto" starts without it (faster) and turns it on at the first out-of-memory error,
    before any micro-batch is halved; True/False force it.

    `fused` (the default) runs the frozen base once over every run's rows; otherwise each run's micro-batch takes
    its own pass in the same tick. bench/cotrain.py (SmolLM2, 4-bit, batch 4 per trial, medians of 3 alternating
    rounds) on a 2-core AVX512-BF16 CPU: fused K=2 and K=4 1.14x and 1.16x the rows/s of one trial, interleaved
    1.05x and 1.03x (earlier code on 2 fp32 cores: fused 1.23x and 1.41x). Returns every run that took part."""
    model, device = base.model, base.device
    router = lora.router_of(model)
    pad_id = base.tokenizer.pad_token_id
    capacity = capacity or len(runs)
    active: list[TrialRun] = []
    seen: list[TrialRun] = []
    group = {"checkpointing": gradient_checkpointing is True, "auto": gradient_checkpointing == "auto",
             "attention": getattr(model.config, "_attn_implementation", None)}

    def admit(new: list[TrialRun]) -> None:
        for run in new:
            seen.append(run)
            try:
                run.start(model, device)
            except TrialFailure as exc:
                run.status, run.error = "failed", exc
                finish(run)
                continue
            run.plan.gradient_checkpointing = group["checkpointing"]
            run.plan.attention = group["attention"]
            run.plan.cotrain_mode = "fused" if fused else "interleaved"
            if run.done:  # resumed from a checkpoint at the last step
                run.keep_best()
                run.status = "completed"
                finish(run)
                continue
            active.append(run)

    def finish(run: TrialRun) -> None:
        if run in active:
            active.remove(run)
        try:
            if on_done is not None:
                on_done(run)
        finally:
            if run.adapter is not None:
                lora.detach(model, run.adapter)
            run._optimizer = run._scheduler = None

    def set_checkpointing(on: bool) -> None:
        # transformers 5 renamed gradient to activation checkpointing (the old names warn on every call)
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
        group["checkpointing"] = on

    set_checkpointing(group["checkpointing"])
    admit(runs)
    try:
        while True:
            if supplier is not None and len(active) < capacity:
                new = supplier(capacity - len(active))
                if new:
                    admit(new)
            if not active:
                break
            if stop is not None and stop():
                for run in list(active):
                    _interrupt(run, base)
                    finish(run)
                break
            for run in active:
                run.plan.group_size = max(run.plan.group_size, len(active))
            parts = [(run, run.next_micro()) for run in active]
            t0 = time.perf_counter()
            try:
                for run, _ in parts:
                    _injected_oom(run)
                if fused:
                    losses = _forward_backward(model, router, parts, pad_id, device)
                    elapsed = [(time.perf_counter() - t0) / len(parts)] * len(parts)
                else:
                    losses, elapsed = [], []
                    for part in parts:
                        t1 = time.perf_counter()
                        losses += _forward_backward(model, router, [part], pad_id, device)
                        elapsed.append(time.perf_counter() - t1)
            except BaseException as exc:
                if not _is_oom(exc):
                    raise
                if group["auto"] and not group["checkpointing"]:
                    _clear_partial_steps(active, device)
                    set_checkpointing(True)
                    for run in active:
                        run.plan.gradient_checkpointing = True
                        run.plan.oom_events += 1
                        run.restart_step()
                else:
                    _recover_from_oom(active, finish, exc, device)
                continue
            stepping = []
            for (run, es), loss, secs in zip(parts, losses, elapsed):
                run.train_seconds += secs
                loss = _injected_nan(run, loss)
                if loss is None or not math.isfinite(loss):
                    run.status = "failed"
                    run.error = TrialFailure("nan_loss", f"loss is not finite at step {run.step + 1}")
                    finish(run)
                    continue
                if run.after_micro(loss, len(es), sum(len(e.input_ids) for e in es)):
                    stepping.append(run)
            norms = [run.grad_norm() for run in stepping]
            for run, norm, norm_f in zip(stepping, norms, torch.stack(norms).tolist() if norms else []):
                try:
                    grad_norm = run.check_gradients(norm, norm_f)
                    record = run.optimizer_step(grad_norm)
                    run.hooks.on_step(run, record)
                    if run.due_checkpoint():
                        path = run.save_checkpoint(base.resolved.name)
                        run.hooks.on_checkpoint(run, run.step, path)
                    if run.due_eval():
                        result = run.hooks.on_evaluate(run, run.step)
                        value, prune = (None, result) if isinstance(result, bool) or result is None \
                            else (result.value, result.prune)
                        run.record_eval(value)
                        run._checked_after_eval = False
                        repacked = repacked_layers(base.model)
                        if repacked:
                            raise TrialFailure("repacked_base", f"{len(repacked)} 4-bit layers were repacked for "
                                               f"inference by bitsandbytes after an evaluation pass at step "
                                               f"{run.step} (first: {repacked[0]}); gradients through them are "
                                               f"cut, so training on would be wrong")
                        if prune and not run.done:
                            raise TrialPruned(run.step, float("nan") if value is None else value)
                    if run.done:
                        run.keep_best()
                        run.status = "completed"
                        finish(run)
                        continue
                    run._begin_step()
                except (TrialFailure, TrialPruned) as exc:
                    run.status = "pruned" if isinstance(exc, TrialPruned) else "failed"
                    run.error = exc
                    finish(run)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, but every trial is handed back
        for run in list(active):
            run.status, run.error = "interrupted", Interrupted(None)
            finish(run)
        raise
    except BaseException as exc:  # a bug or an infrastructure error: fail what is running, visibly
        for run in list(active):
            run.status = "failed"
            run.error = TrialFailure("error", f"{type(exc).__name__}: {exc}")
            finish(run)
        raise
    finally:
        router.segments = []
        router.release_masks()
        if group["checkpointing"]:
            set_checkpointing(False)
        model.eval()
    return seen


def _forward_backward(model, router: lora.Router, parts, pad_id: int, device) -> list[float | None]:
    """One forward over every run's micro-batch and one backward of the sum of their losses. Each run's loss is
    its summed token loss over its own rows divided by its step's completion tokens; a run whose loss is not finite
    is left out of the backward (None) so that it cannot touch anyone's gradients."""
    ids, mask, positions, labels, segments, comp = _collate(parts, pad_id, device)
    router.segments = [(name, s, e) for name, s, e, _ in segments]
    router.own_lengths = {name: own for name, _, _, own in segments}
    for run, _ in parts:
        run.ticks += 1
        router.ticks[run.name] = run.ticks
    width = ids.shape[1]
    for (run, es), (_, s, e, _) in zip(parts, segments):
        run.plan.padded_tokens += (e - s) * width
        run.plan.real_tokens += sum(len(x.input_ids) for x in es)
    model.train()
    # On CUDA the recipe trained under bf16 autocast (SFTConfig bf16=True): the LoRA matmuls run in bf16 too.
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=comp + 1)
    logits = out.logits[:, :-1, :].float()
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                 reduction="none").view(labels.shape)
    # Every run's summed loss in one tensor, read in one transfer after the backward is queued: a transfer per run,
    # or one before the backward, would wait for the GPU.
    seg_of_row = torch.tensor([i for i, (_, s, e, _) in enumerate(segments) for _ in range(s, e)], device=device)
    seg_sums = token_loss.new_zeros(len(parts)).index_add_(0, seg_of_row, token_loss.sum(dim=1))
    # A run whose loss is not finite gets weight 0 through masked_fill (NaN * 0 would still be NaN), so its rows
    # send no gradient to anyone else; NaN stays inside its own rows, which only its own adapter reads.
    weights = torch.tensor([1.0 / max(run._step_tokens, 1) for run, _ in parts], device=device)
    (seg_sums.masked_fill(~torch.isfinite(seg_sums.detach()), 0.0) * weights).sum().backward()
    router.release_masks()
    return [v if math.isfinite(v) else None for v in seg_sums.detach().tolist()]


def _clear_partial_steps(active: list[TrialRun], device) -> None:
    for run in active:
        if run.adapter is not None and run.adapter.weights:
            run.adapter.zero_grad()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _recover_from_oom(active: list[TrialRun], finish, exc: BaseException, device) -> None:
    """Halve every run's micro-batch (its accumulation doubles, so the step's math is unchanged) and redo the
    current step; a run that was already halved once, or is at one row, fails with reason `oom`."""
    _clear_partial_steps(active, device)
    for run in list(active):
        if run.plan.oom_halvings >= 1 or run.plan.micro_batch <= 1:
            run.status = "failed"
            run.error = TrialFailure("oom", f"out of memory at step {run.step + 1} with micro-batch "
                                            f"{run.plan.micro_batch} ({type(exc).__name__}: {str(exc)[:200]})")
            finish(run)
            continue
        run.plan.micro_batch = max(1, run.plan.micro_batch // 2)
        run.plan.oom_halvings += 1
        run.plan.oom_events += 1
        run.restart_step()


def _interrupt(run: TrialRun, base) -> None:
    """Stop at the last completed step with a checkpoint there, so the retry resumes instead of starting over."""
    step = None
    if run.step > 0 and run.adapter is not None:
        run.save_checkpoint(base.resolved.name)
        step = run.step
    run.status = "interrupted"
    run.error = Interrupted(step)


def train_one(base, run: TrialRun, *, stop=None, on_done=None, gradient_checkpointing: bool | str = "auto") -> TrialRun:
    train_group(base, [run], stop=stop, on_done=on_done, gradient_checkpointing=gradient_checkpointing)
    return run
