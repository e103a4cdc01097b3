"""The group loop: any number of `TrialRun`s trained together on one frozen base, read top to bottom in `run`.

Every tick each active run contributes its next micro-batch; the base runs once over the concatenated rows (fused)
or once per run (interleaved); each run's loss is taken over its own rows only and normalised by the completion
tokens of its own optimizer step, so its gradients are exactly the ones it would get alone. A run whose step is
complete clips its own gradients and steps its own optimizer and scheduler. Runs finish, fail or get pruned
independently (an error raised for one run after its step, in its hooks or its checkpoint, fails that run
only), and `supplier` hands in new runs as places free up. One run is the ordinary case.

    admit ──> tick: collate ─> forward ─> per-run loss ─> backward ─> step the runs whose step is complete
      ^                                                                 │ hooks: progress, checkpoint, evaluation
      └──────── supplier(free places) <── finish (on_done, detach) <────┘ done, failed, pruned

Out of memory: "auto" gradient checkpointing turns on first; after that each run's micro-batch is halved once
(its accumulation doubles, so the step's math is unchanged); a run already halved fails with reason `oom`.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import lora
from .batches import collate
from .errors import Interrupted, TrialFailure, TrialPruned, one_line
from .models import dequantized_layers, repacked_layers
from .train import TrialRun


def digit_table(tokenizer) -> torch.Tensor | None:
    """[vocab] the digit each single-digit token stands for, -1 for every other token; None when the tokenizer has
    no token for some digit 0-9 (the number-token loss needs all ten)."""
    vocab = tokenizer.get_vocab()
    table = torch.full((max(len(tokenizer), max(vocab.values()) + 1),), -1, dtype=torch.long)
    for d in range(10):
        ids = tokenizer.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            return None
        table[ids[0]] = d
    return table


@functools.lru_cache(maxsize=None)  # one per device, made once: the loss reads it every step (never written)
def leading_digit_distance(device=None) -> torch.Tensor:
    """[10, 10] the distance between two leading digits: how far apart their numbers' log-mantissas lie on the
    circle log10(x) mod 1 (at each digit's middle, d + 0.5), times 10 to sit on the scale of the other digits'
    |d - y|. On that circle 9 and 1 are neighbours, as 9,400 and 10,400 are; 1 and 2 lie further apart than 8
    and 9, as relative price does. A leading 0 is never a price's: 5 from every digit, the circle's farthest."""
    mid = torch.log10(torch.arange(10, dtype=torch.float32, device=device) + 0.5)
    gap = (mid[None, :] - mid[:, None]).abs()
    dist = 10 * torch.minimum(gap, 1 - gap)
    dist[0, :] = dist[:, 0] = 5.0
    dist[0, 0] = 0.0
    return dist


def number_token_loss(logits: torch.Tensor, labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-token number loss (NTL-WAS, Zausinger et al., "Regress, Don't Guess", 2025): at a label that is a digit,
    the expected distance between the predicted digit and the true one, sum_d p(d) dist(d, y), with p the model's
    distribution over the ten digit tokens; 0 elsewhere. Cross-entropy treats a 4 for a 5 as wrong as a 9; this
    term grades it. dist is |d - y|, except at each row's first scored token (the price's leading digit), where it is
    `leading_digit_distance`. logits [..., T, vocab], labels [..., T] (a row's completion along the last axis; -100:
    not scored), table from `digit_table`."""
    table = table.to(labels.device)  # the loop keeps it there: no copy per step
    # The token of 0, of 1, ... of 9, found on the device: `nonzero` would wait for the GPU on every step.
    ids = (table[None, :] == torch.arange(10, device=table.device)[:, None]).int().argmax(-1)
    truth = torch.where(labels >= 0, table[labels.clamp(min=0)], torch.full_like(labels, -1))
    p = torch.softmax(logits[..., ids].float(), dim=-1)
    y = truth.clamp(min=0)
    dist = (torch.arange(10, device=logits.device) - y.unsqueeze(-1)).abs().to(p.dtype)
    # The leading digit's place is decided only later, by how many digits follow, so |d - y| there is not price
    # distance: the 9 of 9,400 and the 1 of 10,400 are 8 apart. Graded by it, the stones that straddle $10,000 were
    # pulled to middle digits (16 of the 21 test stones over $8,000 answered $4,455 or $4,555); left to
    # cross-entropy alone, every answer of one trial began with the commonest leading digit, 1 (README, "What a trial
    # is").
    scored = labels >= 0
    leading = scored & ~F.pad(scored[..., :-1], (1, 0), value=False)
    dist = torch.where(leading.unsqueeze(-1), leading_digit_distance(logits.device)[y].to(p.dtype), dist)
    return torch.where(truth >= 0, (p * dist).sum(-1), torch.zeros((), dtype=p.dtype, device=p.device))


@dataclass(frozen=True)
class Faults:
    """Faults the loop injects into itself, for tests of the paths that handle them: the loss of step
    `nan_at_step` is made not finite, and the framework's own out-of-memory error is raised at step
    `oom_at_step` (once per run, or on every attempt with `oom_always`), or at any pass over more than
    `oom_over_rows` rows (a device with room for that many). The default injects nothing."""

    nan_at_step: int | None = None
    oom_at_step: int | None = None
    oom_always: bool = False
    oom_over_rows: int | None = None

    def loss(self, run: TrialRun, loss: float | None) -> float | None:
        return float("nan") if self.nan_at_step is not None and run.step + 1 == self.nan_at_step else loss

    def before_forward(self, run: TrialRun) -> None:
        if self.oom_at_step is not None and run.step + 1 == self.oom_at_step \
                and (self.oom_always or run.plan.oom_halvings == 0):
            raise torch.OutOfMemoryError(f"injected out-of-memory at step {self.oom_at_step}")

    def before_pass(self, rows: int) -> None:
        if self.oom_over_rows is not None and rows > self.oom_over_rows:
            raise torch.OutOfMemoryError(f"injected out-of-memory: {rows} rows in one pass, room for "
                                         f"{self.oom_over_rows}")


NO_FAULTS = Faults()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


class GroupLoop:
    """One base, one group of runs. `on_done(run)` is called while the run's adapter is still attached (to score
    and save it), then the adapter is removed. Gradient checkpointing: "auto" starts without it (faster) and turns
    it on at the first out-of-memory error; True/False force it."""

    def __init__(self, base, *, supplier: Callable[[int], list[TrialRun]] | None = None,
                 stop: Callable[[], bool] | None = None, on_done: Callable[[TrialRun], None] | None = None,
                 gradient_checkpointing: bool | str = "auto", capacity: int | None = None, fused: bool = True,
                 faults: Faults = NO_FAULTS):
        self.base, self.model, self.device = base, base.model, base.device
        self.supplier, self.stop, self.on_done = supplier, stop, on_done
        self.auto_checkpointing = gradient_checkpointing == "auto"
        self.checkpointing = gradient_checkpointing is True
        self.capacity, self.fused, self.faults = capacity, fused, faults
        self.attention = getattr(self.model.config, "_attn_implementation", None)
        self.dequantized_once = dequantized_layers(self.model) > 0
        self._digits: torch.Tensor | None = None  # `digit_table`, made when a run first asks for the number loss
        self.active: list[TrialRun] = []
        self.seen: list[TrialRun] = []
        # The micro-batch a halving brought the group to: a trial that joins later starts there, not at its full
        # batch, or its first pass would run out of memory again and fail the trials halved already.
        self.micro_cap: int | None = None

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self, runs: list[TrialRun]) -> list[TrialRun]:
        """Train `runs` (and whatever the supplier hands in) until each completes, fails or is pruned."""
        self.capacity = self.capacity or len(runs)
        self._set_checkpointing(self.checkpointing)
        self.admit(runs)
        try:
            while True:
                if self.supplier is not None and len(self.active) < self.capacity:
                    self.admit(self.supplier(self.capacity - len(self.active)))
                if not self.active:
                    break
                if self.stop is not None and self.stop():
                    self._interrupt_all()
                    break
                self.tick()
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, but every run is handed back
            self._end_all("interrupted", lambda exc: Interrupted(None))
            raise
        except BaseException as exc:  # a bug or an infrastructure error: fail what is running, visibly
            self._end_all("failed", lambda e: TrialFailure("error", f"{type(e).__name__}: {e}"), exc)
            raise
        finally:
            lora.release_masks(self.model)
            if self.checkpointing:
                self._set_checkpointing(False)
            self.model.eval()
        return self.seen

    def admit(self, new: list[TrialRun]) -> None:
        for run in new or []:
            self.seen.append(run)
            try:
                run.start(self.model, self.device)
            except TrialFailure as exc:
                run.status, run.error = "failed", exc
                self.finish(run)
                continue
            run.plan.gradient_checkpointing = self.checkpointing
            run.plan.attention = self.attention
            run.plan.dequantized_once = self.dequantized_once
            run.plan.cotrain_mode = "fused" if self.fused else "interleaved"
            if self.micro_cap is not None and run.plan.micro_batch > self.micro_cap:
                run.plan.micro_batch = self.micro_cap
                run.begin_step()  # the current step's micro-batches again, at the cap
            if run.done:  # resumed from a checkpoint at the last step
                self._complete(run)
                continue
            self.active.append(run)

    def finish(self, run: TrialRun) -> None:
        """The run leaves the group: its outcome is handled while its adapter is attached, then it is detached."""
        if run in self.active:
            self.active.remove(run)
        try:
            if self.on_done is not None:
                self.on_done(run)
        finally:
            if run.adapter is not None:
                lora.detach(self.model, run.adapter)
            run.release()

    def tick(self) -> None:
        """One micro-batch of every active run: forward, backward, and an optimizer step for each run whose step
        is now complete."""
        for run in self.active:
            run.plan.group_size = max(run.plan.group_size, len(self.active))
        parts = [(run, run.next_micro()) for run in self.active]
        oom = None
        try:
            losses, elapsed = self._forward_backward_all(parts)
        except BaseException as exc:
            if not _is_oom(exc):
                raise
            # Only its text leaves this block: the exception's traceback holds the failed pass's frames and with them
            # its activations and dropout masks, which must be freed before the retry (gigabytes at K=16 on a GPU).
            oom = f"{type(exc).__name__}: {str(exc)[:200]}"
        if oom is not None:
            self.handle_oom(oom)
            return
        stepping = []
        for (run, rows), loss, secs in zip(parts, losses, elapsed):
            run.train_seconds += secs
            loss = self.faults.loss(run, loss)
            if loss is None or not math.isfinite(loss):
                self._fail(run, TrialFailure("nan_loss", f"loss is not finite at step {run.step + 1}"))
                continue
            if run.after_micro(loss, len(rows), sum(len(e.input_ids) for e in rows)):
                stepping.append(run)
        # Every stepping run's gradient norm in one transfer: one per run would wait for the GPU each time.
        norms = [run.grad_norm() for run in stepping]
        for run, norm, norm_f in zip(stepping, norms, torch.stack(norms).tolist() if norms else []):
            try:
                self.step_run(run, norm, norm_f)
            except (TrialFailure, TrialPruned) as exc:
                run.status = "pruned" if isinstance(exc, TrialPruned) else "failed"
                run.error = exc
                self.finish(run)
            except Exception as exc:  # one trial's hook or checkpoint error (storage, disk, a bug) is its own
                if run not in self.active:  # it failed while leaving the group: not a trial's error
                    raise
                reason = "oom" if _is_oom(exc) else "error"
                self._fail(run, TrialFailure(reason, f"at step {run.step}: {one_line(exc, 500)}"))

    def step_run(self, run: TrialRun, norm: torch.Tensor, norm_f: float) -> None:
        """The optimizer step of one run, then what follows it: progress, checkpoint, evaluation, the end."""
        record = run.optimizer_step(run.check_gradients(norm, norm_f))
        run.hooks.on_step(run, record)
        if run.due_checkpoint():
            path = run.save_checkpoint(self.base.resolved.name)
            run.hooks.on_checkpoint(run, run.step, path)
        if run.due_eval():
            self._evaluate(run)
        if run.done:
            if run.checkpoint_every:
                # After the final evaluation, so that a retry resumes with every evaluation: an interruption while
                # the trial is scored on the test rows or its artifacts are saved does not cost its training.
                run.save_checkpoint(self.base.resolved.name, final=True)
            self._complete(run)
            return
        run.begin_step()

    def _evaluate(self, run: TrialRun) -> None:
        result = run.hooks.on_evaluate(run, run.step)
        value, prune = (None, result) if isinstance(result, bool) or result is None else (result.value, result.prune)
        run.record_eval(value)
        repacked = repacked_layers(self.model)
        if repacked:
            raise TrialFailure("repacked_base", f"{len(repacked)} 4-bit layers were repacked for inference by "
                               f"bitsandbytes after an evaluation pass at step {run.step} (first: {repacked[0]}); "
                               f"gradients through them are cut, so training on would be wrong")
        if prune and not run.done:
            raise TrialPruned(run.step, float("nan") if value is None else value)

    # -- forward and backward --------------------------------------------------------------------------------------
    def _forward_backward_all(self, parts) -> tuple[list[float | None], list[float]]:
        """Fused: one pass over every run's rows (its time split evenly); interleaved: one pass per run."""
        t0 = time.perf_counter()
        for run, _ in parts:
            self.faults.before_forward(run)
        if self.fused:
            losses = self._forward_backward(parts)
            return losses, [(time.perf_counter() - t0) / len(parts)] * len(parts)
        losses, elapsed = [], []
        for part in parts:
            t1 = time.perf_counter()
            losses += self._forward_backward([part])
            elapsed.append(time.perf_counter() - t1)
        return losses, elapsed

    def _forward_backward(self, parts) -> list[float | None]:
        """One forward over every run's micro-batch and one backward of the sum of their losses. Each run's loss is
        its summed token loss over its own rows divided by its step's completion tokens; a run whose loss is not
        finite is left out of the backward (None) so that it cannot touch anyone's gradients."""
        device = self.device
        self.faults.before_pass(sum(len(rows) for _, rows in parts))
        batch = collate([(run.name, rows) for run, rows in parts], self.base.tokenizer.pad_token_id, device)
        width = batch.input_ids.shape[1]
        for (run, rows), (_, s, e, _) in zip(parts, batch.segments):
            run.ticks += 1
            run.plan.padded_tokens += (e - s) * width
            run.plan.real_tokens += sum(len(x.input_ids) for x in rows)
        self.model.train()
        # The backward runs inside the routing too: gradient checkpointing recomputes forwards there.
        with lora.routing(self.model, batch.segments, ticks={run.name: run.ticks for run, _ in parts}):
            # On CUDA the recipe trained under bf16 autocast (SFTConfig bf16=True): the LoRA matmuls run in bf16 too.
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.positions, logits_to_keep=batch.completion + 1)
            logits = out.logits[:, :-1, :].float()
            token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                         ignore_index=-100, reduction="none").view(batch.labels.shape)
            seg_of_row = torch.tensor([i for i, (_, s, e, _) in enumerate(batch.segments) for _ in range(s, e)],
                                      device=device)
            weights = [run.params.number_loss for run, _ in parts]
            if any(weights):  # each run's own weight on its own rows
                if self._digits is None:
                    self._digits = digit_table(self.base.tokenizer)
                    self._digits = None if self._digits is None else self._digits.to(device)
                if self._digits is None:  # `prepare` refuses such a sweep; a direct caller gets the reason
                    raise ValueError("train.number_loss needs a tokenizer with one token for each digit 0-9")
                per_row = torch.tensor(weights, device=device, dtype=token_loss.dtype)[seg_of_row]
                token_loss = token_loss + per_row[:, None] * number_token_loss(logits, batch.labels, self._digits)
            # Every run's summed loss in one tensor, read in one transfer after the backward is queued: a transfer
            # per run, or one before the backward, would wait for the GPU.
            seg_sums = token_loss.new_zeros(len(parts)).index_add_(0, seg_of_row, token_loss.sum(dim=1))
            # A run whose loss is not finite gets weight 0 through masked_fill (NaN * 0 would still be NaN), so its
            # rows send no gradient to anyone else; NaN stays inside its own rows, which only its own adapter reads.
            weights = torch.tensor([1.0 / max(run.step_tokens, 1) for run, _ in parts], device=device)
            (seg_sums.masked_fill(~torch.isfinite(seg_sums.detach()), 0.0) * weights).sum().backward()
        return [v if math.isfinite(v) else None for v in seg_sums.detach().tolist()]

    # -- out of memory, stopping, failing ----------------------------------------------------------------------------
    def handle_oom(self, cause: str) -> None:
        """Redo the current step of every run, with gradient checkpointing on ("auto", first time) or with half the
        micro-batch; a run that was already halved once, or is at one row, fails with reason `oom`. `cause` is the
        error's text (called after its except block, so the failed pass is garbage)."""
        self._clear_partial_steps()
        if self.auto_checkpointing and not self.checkpointing:
            self._set_checkpointing(True)
            for run in self.active:
                run.plan.gradient_checkpointing = True
                run.plan.oom_events += 1
                run.restart_step()
            return
        for run in list(self.active):
            if run.plan.oom_halvings >= 1 or run.plan.micro_batch <= 1:
                self._fail(run, TrialFailure("oom", f"out of memory at step {run.step + 1} with micro-batch "
                                                    f"{run.plan.micro_batch} ({cause})"))
                continue
            run.plan.micro_batch = max(1, run.plan.micro_batch // 2)
            self.micro_cap = min(self.micro_cap or run.plan.micro_batch, run.plan.micro_batch)
            run.plan.oom_halvings += 1
            run.plan.oom_events += 1
            run.restart_step()

    def _clear_partial_steps(self) -> None:
        for run in self.active:
            if run.adapter is not None and run.adapter.weights:
                run.adapter.zero_grad()
        lora.release_masks(self.model)  # the failed pass's dropout masks, which its backward never released
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _interrupt_all(self) -> None:
        """Stop at the last completed step with a checkpoint there, so the retry resumes instead of starting over."""
        for run in list(self.active):
            step = None
            if run.step > 0 and run.adapter is not None:
                run.save_checkpoint(self.base.resolved.name)
                step = run.step
            run.status, run.error = "interrupted", Interrupted(step)
            self.finish(run)

    def _end_all(self, status: str, error: Callable[[BaseException | None], Exception],
                 cause: BaseException | None = None) -> None:
        for run in list(self.active):
            run.status, run.error = status, error(cause)
            self.finish(run)

    def _complete(self, run: TrialRun) -> None:
        run.keep_best()
        run.status = "completed"
        self.finish(run)

    def _fail(self, run: TrialRun, exc: TrialFailure) -> None:
        run.status, run.error = "failed", exc
        self.finish(run)

    def _set_checkpointing(self, on: bool) -> None:
        # transformers 5 renamed gradient to activation checkpointing (the old names warn on every call)
        if on and not self.model.is_activation_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif not on and self.model.is_activation_checkpointing:
            self.model.activation_checkpointing_disable()
            # Enabling added a hook that makes the embeddings' output require grad; transformers removes it only for
            # a peft-loaded model, which tuner's adapters are not. Left on the cached base it would outlive this
            # group, and every later enable would add another.
            self.model.disable_input_require_grads()
        self.checkpointing = on


def train_group(base, runs: list[TrialRun], **options) -> list[TrialRun]:
    """Train `runs` together on `base` (see `GroupLoop` for the options). Returns every run that took part.

    `fused` (the default) runs the frozen base once over every run's rows; otherwise each run's micro-batch takes
    its own pass in the same tick. bench/cotrain.py (SmolLM2, 4-bit, batch 4 per trial, medians of 3 alternating
    rounds) on a 2-core AVX512-BF16 CPU: fused K=2 and K=4 1.14x and 1.16x the rows/s of one trial, interleaved
    1.05x and 1.03x (earlier code on 2 fp32 cores: fused 1.23x and 1.41x)."""
    return GroupLoop(base, **options).run(list(runs))


def train_one(base, run: TrialRun, **options) -> TrialRun:
    train_group(base, [run], **options)
    return run

