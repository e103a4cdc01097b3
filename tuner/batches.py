"""Rows to batches: tokenize a prompt and its completion, order every optimizer step's rows, and pad a tick's
micro-batches into tensors.

Rows are left-padded with explicit position ids, which gives the same values as right padding and puts every
completion at the end, so the LM head runs over the last few positions only (on SmolLM2 its 49k-wide vocabulary is
a fifth of the compute otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch

from .data import Example
from .space import TrialParams


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


def micro_batches(step_rows: list[int], rows: list[Encoded], micro_batch: int) -> list[list[int]]:
    """One optimizer step's rows cut into micro-batches. Which micro-batch a row lands in is not part of the math
    (the step sums over all of them), so rows of similar length go together and pad less."""
    if micro_batch < len(step_rows):
        step_rows = sorted(step_rows, key=lambda i: len(rows[i].input_ids))
    return [step_rows[i:i + micro_batch] for i in range(0, len(step_rows), micro_batch)]


class Batch(NamedTuple):
    """One tick's rows, left-padded. Each part (one run's micro-batch) is a segment of consecutive rows, with the
    length its rows pad to alone, so that its dropout masks do not depend on its neighbours."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor  # the last `completion` positions of each row; -100 where a row's completion is shorter
    segments: list[tuple[str, int, int, int]]  # (run name, first row, end row, its own padded length)
    completion: int


def collate(parts: list[tuple[str, list[Encoded]]], pad_id: int, device) -> Batch:
    """Left-pad every row to the longest; one segment per named part."""
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
    for name, es in parts:
        segments.append((name, start, start + len(es), max(len(e.input_ids) for e in es)))
        start += len(es)
    return Batch(ids.to(device), mask.to(device), positions.to(device), labels.to(device), segments, comp)
