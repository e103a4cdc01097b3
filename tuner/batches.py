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


# ---------------------------------------------------------------------------------------------------------------
# Fitting rows to the token budget


# Every description losing more than this to its budget means the data cannot be told apart at that budget.
REFUSE_CUT_FRACTION = 0.9


@dataclass(frozen=True)
class Cut:
    row_id: int
    removed: int  # description tokens cut away
    kept: int  # description tokens left

    @property
    def fraction(self) -> float:
        return self.removed / max(self.removed + self.kept, 1)


@dataclass
class Fit:
    """How one split set was fitted to `max_length`: which descriptions were cut, and by how much."""

    max_length: int
    rows: int
    cuts: list[Cut]
    warn_fraction: float

    @property
    def heavily_cut(self) -> int:
        return sum(c.fraction > self.warn_fraction for c in self.cuts)

    @property
    def loud(self) -> bool:
        """Most rows lose more than `warn_fraction` of their description."""
        return self.heavily_cut > self.rows / 2

    def line(self) -> str:
        if not self.cuts:
            return f"all {self.rows} rows fit {self.max_length} tokens; no description cut"
        removed = sorted(c.removed for c in self.cuts)
        return (f"{len(self.cuts)} of {self.rows} descriptions cut to fit {self.max_length} tokens; median cut "
                f"{removed[len(removed) // 2]} tokens, largest {removed[-1]}; {self.heavily_cut} lost more than "
                f"{self.warn_fraction:.0%} of their description")

    def warning(self) -> str | None:
        """The loud line, where most descriptions lose much of themselves; None otherwise."""
        if not self.loud:
            return None
        return (f"{self.line()}: most descriptions lose more than {self.warn_fraction:.0%} of their text; raise "
                f"train.max_length (or max_length_cap with auto) to keep more of it")

    def summary(self) -> dict:
        removed = sorted(c.removed for c in self.cuts)
        return {"max_length": self.max_length, "rows": self.rows, "cut": len(self.cuts),
                "median_cut_tokens": removed[len(removed) // 2] if removed else 0,
                "max_cut_tokens": removed[-1] if removed else 0, "heavily_cut": self.heavily_cut,
                "warn_fraction": self.warn_fraction, "line": self.line()}


def row_length(tokenizer, prompt: str, completion: str) -> int:
    """Tokens of a training row as `encode` makes it: prompt and completion, then end-of-sequence."""
    return len(tokenizer(prompt + completion)["input_ids"]) + 1


def fit_example(tokenizer, ex: Example, max_length: int, spec) -> tuple[Example, Cut | None]:
    """The row with its description cut (never the question, the answer prefix or the price) so that it fits
    `max_length`, as the original recipe capped each description at a token budget. Raises ValueError when even an
    empty description would not fit."""
    from .data import prompt_parts

    over = row_length(tokenizer, ex.prompt, ex.completion) - max_length
    if over <= 0:
        return ex, None
    head, body, tail = prompt_parts(ex.text, spec)
    ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    keep = len(ids) - over
    while keep > 0:
        # Decoding a prefix can end inside a character or merge differently: measure again, cut more if needed.
        cut = tokenizer.decode(ids[:keep]).rstrip()
        prompt = head + cut + tail
        over = row_length(tokenizer, prompt, ex.completion) - max_length
        if over <= 0:
            return Example(ex.row_id, ex.text, ex.price, prompt, ex.completion), Cut(ex.row_id, len(ids) - keep, keep)
        keep -= over
    raise ValueError(f"row {ex.row_id}: the prompt without its description needs more than {max_length} tokens")


def fit_rows(tokenizer, examples: list[Example], max_length: int, spec) -> tuple[list[Example], list[Cut], list[int]]:
    """Every row fitted to the budget, the cuts made, and the ids of rows that cannot fit at all."""
    out, cuts, unfit = [], [], []
    for ex in examples:
        try:
            fitted, cut = fit_example(tokenizer, ex, max_length, spec)
        except ValueError:
            unfit.append(ex.row_id)
            continue
        out.append(fitted)
        if cut is not None:
            cuts.append(cut)
    return out, cuts, unfit


def fit_splits(tokenizer, splits, max_length: int, spec):
    """`splits` (train, validation, test alike, so the scorer sees prompts cut as the model trained on them) fitted
    to `max_length`, and the `Fit` that says what was cut. A row that cannot fit at all is named in a DataError,
    never dropped; so is data whose every description would lose nearly all of itself."""
    from dataclasses import replace

    from .errors import DataError

    parts, cuts, unfit = {}, [], []
    for name in ("train", "val", "test"):
        parts[name], c, u = fit_rows(tokenizer, getattr(splits, name), max_length, spec)
        cuts, unfit = cuts + c, unfit + u
    if unfit:
        raise DataError(f"train.max_length {max_length}: {len(unfit)} rows do not fit even with their description "
                        f"cut to nothing (row ids {', '.join(map(str, unfit[:5]))}{', ...' if len(unfit) > 5 else ''}); "
                        f"the question, answer prefix and price alone are longer: raise train.max_length")
    rows = len(splits.train) + len(splits.val) + len(splits.test)
    fit = Fit(max_length, rows, cuts, spec.cut_warn_fraction)
    if len(cuts) == rows and all(c.fraction > REFUSE_CUT_FRACTION for c in cuts):
        raise DataError(f"data.source {spec.source!r}: every description is longer than any budget it gets here: "
                        f"to fit train.max_length {max_length} each would lose more than "
                        f"{REFUSE_CUT_FRACTION:.0%} of itself; raise train.max_length or shorten the texts")
    return replace(splits, **parts), fit


def auto_max_length(tokenizer, splits, cap: int) -> dict:
    """`max_length: auto`: the row length that leaves 95% of all rows (train, validation and test) uncut, at most
    `cap`; the longest row instead when that costs at most a quarter more tokens, since cutting a short description
    by a token or two saves nothing and may cut off a fact. Rows longer than the cap have their descriptions cut to
    it like any others (said in the run output, loudly when most lose much); rows that cannot fit even so are
    refused by the fitting, by row id."""
    rows = splits.train + splits.val + splits.test
    lengths = sorted(row_length(tokenizer, e.prompt, e.completion) for e in rows)
    p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    value = lengths[-1] if lengths[-1] <= 1.25 * p95 else p95
    return {"value": min(value, cap), "p95": p95, "cap": cap, "longest": lengths[-1]}


def auto_reason(rec: dict) -> str:
    """Why `max_length: auto` chose what it chose, in words (run output and `tuner data`)."""
    why = ("every row fits" if rec["value"] == rec["longest"] else f"the cap; 95% of rows need {rec['p95']}"
           if rec["value"] == rec["cap"] else f"95% of rows fit {rec['p95']}")
    return f"{rec['value']} tokens ({why}; longest row {rec['longest']}, cap {rec['cap']})"
