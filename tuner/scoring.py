"""Price scoring: batched constrained greedy decoding, the branch-mean, sampled-median and expected-value read-outs,
metrics and baselines.

Knows nothing of Optuna or of how a model was trained: it takes a causal LM, a tokenizer and prompts, and the
name of the adapter to score (`lora.routing` gives it the rows).

The greedy scorer decodes what a price can be and nothing else: digits, at most one decimal point with at most two
decimals, and the end. Every row of a batch stops as soon as its number is complete, and the batch stops when every
row has. Rows are scored in fixed-size batches (quantized kernels are not batch-invariant: a row's prediction must
not depend on free memory), left-padded behind a shared prefix: the longest token prefix all prompts share is run
once and its key/value cache reused by every batch, since the recipe's prompts all begin with the same question.
When the constraint overrides the model's own top choice it is counted (`off_grammar_rate`), never hidden.

The branch read-out (`method: branch`) splits each row at the first `branch_places` places of its number into the
`branch_top_k` likeliest tokens there, reads every branch greedily to its end and answers the mean of those prices
weighted by each branch's probability at the split places. Greedy decoding commits to the likeliest leading digit
even when the model is torn between, say, 4,800 and 5,200, or 9,400 and 10,400 (a 9 or a 1 first); an error there
is most of a row's error, and the weighted mean hedges it. Deterministic, and about branch_top_k ** branch_places
times greedy's decode steps, with each prompt read once.

The median read-out (`method: median`) draws `samples` prices per row from the model's distribution under the same
constraint and answers their median: the point that minimises the expected absolute error under that distribution,
where greedy decoding takes the likeliest digit at each place in turn. Each row's prompt is read once and its cache
copied to its samples; the draws are seeded by the batch, so a row reads the same price every time.

Metrics follow the original evaluator: absolute error in dollars, squared log error (log(truth+1) - log(pred+1)),
and a hit when the error is under $40 or under 20% of the truth. A prediction that does not parse is counted in
`parse_fail_rate` and scored as the original did, as a price of 0.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import lora

HIT_ABS, HIT_REL = 40.0, 0.20
NEAR_ABS, NEAR_REL = 80.0, 0.40
DECIMALS = 2


@dataclass
class Prediction:
    text: str  # what was decoded after the prompt
    value: float | None  # None: no number (scored as 0, counted as a parse failure)
    off_grammar_steps: int = 0  # steps where the constraint overrode the model's top token


@dataclass
class ScoreRun:
    predictions: list[Prediction]
    seconds: float
    rows_per_s: float
    batch_size: int
    new_tokens: int  # decode steps taken, summed over batches


def parse_price(text: str) -> float | None:
    """The original evaluator's parse (commas dropped, first number), but a miss is None rather than 0."""
    m = re.search(r"[-+]?\d*\.\d+|\d+", text.replace(",", ""))
    return float(m.group()) if m else None


def color_of(pred: float, truth: float) -> str:
    err = abs(pred - truth)
    if err < HIT_ABS or err / truth < HIT_REL:
        return "green"
    if err < NEAR_ABS or err / truth < NEAR_REL:
        return "orange"
    return "red"


def price_metrics(values: Sequence[float | None], truths: Sequence[float]) -> dict:
    """MAE, RMSLE, hit rate (green), parse failures; unparseable predictions count as 0 like the original."""
    if len(values) != len(truths) or not truths:
        raise ValueError("need as many predictions as truths, and at least one")
    preds = np.array([0.0 if v is None else float(v) for v in values])
    truth = np.asarray(truths, dtype=float)
    err = np.abs(preds - truth)
    sle = (np.log(truth + 1) - np.log(np.clip(preds, 0, None) + 1)) ** 2
    colors = [color_of(p, t) for p, t in zip(preds, truth)]
    n = len(truth)
    return {"mae": float(err.mean()), "rmsle": float(math.sqrt(sle.mean())),
            "hit_rate": colors.count("green") / n, "near_rate": colors.count("orange") / n,
            "parse_fail_rate": sum(v is None for v in values) / n, "n": n}


# A trial whose most common answer covers at least this share of the test rows has not learned to read the
# descriptions: measured on a fp32 CPU, a default trial's kept adapter answered $1,333 on 74 of 100 diamonds and
# $13,333 on 21, a 65% MAE that looked like modest learning.
COLLAPSE_SHARE = 0.5


def answer_spread(values: Sequence[float | None]) -> dict:
    """How varied the answers are: the number of distinct prices, the most common one and the share of rows that
    got it (unparseable answers count as one answer, None)."""
    if not values:
        raise ValueError("need at least one prediction")
    counts: dict[float | None, int] = {}
    for v in values:
        key = None if v is None else round(float(v), 2)
        counts[key] = counts.get(key, 0) + 1
    top, n_top = max(counts.items(), key=lambda kv: (kv[1], -1 if kv[0] is None else kv[0]))
    return {"distinct_answers": len(counts), "top_answer": top, "top_answer_share": n_top / len(values)}


def collapse_line(spread: dict, rows: int) -> str | None:
    """A warning when one answer covers most rows (`COLLAPSE_SHARE`), else None."""
    share = spread.get("top_answer_share")
    if share is None or share < COLLAPSE_SHARE:
        return None
    top = spread["top_answer"]
    what = "no parseable price" if top is None else f"${top:,.0f}"
    return (f"{round(share * rows)} of {rows} test answers are {what} ({spread['distinct_answers']} distinct "
            f"answers): the adapter barely reads the descriptions")


def constant_baseline(value: float, truths: Sequence[float]) -> dict:
    return price_metrics([value] * len(truths), truths)


# ---------------------------------------------------------------------------------------------------------------
# Token classes for constrained decoding


@dataclass
class NumberVocab:
    """Which tokens can extend a price: pure digit strings, a decimal point (optionally followed by digits)."""

    digit_len: torch.Tensor  # [vocab] number of digits if the token is all digits, else 0
    dot_digits: torch.Tensor  # [vocab] -1 if not a '.'-token, else the number of digits after the point
    eos_ids: list[int]
    text: list[str] = field(repr=False, default_factory=list)


_VOCAB_CACHE: dict[int, NumberVocab] = {}


def number_vocab(tokenizer) -> NumberVocab:
    key = id(tokenizer)
    if key in _VOCAB_CACHE:
        return _VOCAB_CACHE[key]
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    digit_len = torch.zeros(n, dtype=torch.long)
    dot_digits = torch.full((n,), -1, dtype=torch.long)
    for i, t in enumerate(texts):
        if t.isascii() and t.isdigit():
            digit_len[i] = len(t)
        elif t.startswith(".") and (len(t) == 1 or (t[1:].isascii() and t[1:].isdigit())) and len(t) - 1 <= DECIMALS:
            dot_digits[i] = len(t) - 1
    eos = tokenizer.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos))
    vocab = NumberVocab(digit_len, dot_digits, eos_ids, texts)
    _VOCAB_CACHE[key] = vocab
    return vocab


def max_integer_digits(max_price: float) -> int:
    """Token budget for the integer part: the digits of the largest price the data allows, plus one, so a model can
    still overshoot by an order of magnitude (and be scored for it) but never ramble."""
    return len(str(int(max_price))) + 1


# ---------------------------------------------------------------------------------------------------------------


def _rows_of(adapter: str | None, rows: int) -> list[tuple]:
    """`lora.routing`'s segments for a batch of one adapter's rows (none: the base model alone)."""
    return [(adapter, 0, rows)] if adapter else []


def _cache_kw(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; older 5.x (as on the GPU image) only know the former."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(res):
    cache = res.get("cache") if hasattr(res, "get") else None
    return cache if cache is not None else res["past_key_values"]


def _median_of(samples: list[Prediction]) -> Prediction:
    """One row's answer from its sampled prices: the (lower) median, which minimises the expected absolute error
    under the model's own distribution and, being one of the samples, keeps its decoded text. Samples that read as
    no number are left out; if all are, the row has no number."""
    read = sorted((p for p in samples if p.value is not None), key=lambda p: p.value)
    return read[(len(read) - 1) // 2] if read else samples[0]


def _branch_mean(branches: list[Prediction], weights: list[float]) -> Prediction:
    """One row's answer from its branches: the mean of their prices weighted by each branch's probability at the
    places where it was split (renormalised over the branches that read as a number). The first branch is the
    greedy read: its text and constraint count are the row's, its value the mean."""
    read = [(p.value, w) for p, w in zip(branches, weights) if p.value is not None and w > 0]
    total = sum(w for _, w in read)
    value = sum(v * w for v, w in read) / total if total > 0 else None
    return Prediction(text=branches[0].text, value=value, off_grammar_steps=branches[0].off_grammar_steps)


def _common_prefix(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class PriceScorer:
    """Batched, constrained price decoding (greedy or the median of samples; or the expected-value read-out) on any
    causal LM."""

    def __init__(self, tokenizer, *, max_price: float, batch_size: int = 32, method: str = "greedy",
                 top_k: int = 10, samples: int = 31, seed: int = 0, share_prefix: bool = True,
                 branch_top_k: int = 3, branch_places: int = 2):
        self.tok = tokenizer
        self.samples = samples if method == "median" else 1
        self.branch = (branch_top_k, branch_places) if method == "branch" else None
        self.seed = seed
        self.batch_size = batch_size
        self.method = method
        self.top_k = top_k
        self.share_prefix = share_prefix
        self.max_int_digits = max_integer_digits(max_price)
        self.vocab = number_vocab(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.vocab.eos_ids[0]

    @torch.no_grad()
    def predict(self, model, prompts: Sequence[str], adapter: str | None = None, *,
                greedy: bool = False) -> ScoreRun:
        """Each prompt's price. `greedy`: read greedily whatever the method (validation: see `TrialOutcome`)."""
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        ids = [self.tok(p)["input_ids"] for p in prompts]
        out: list[Prediction | None] = [None] * len(prompts)
        steps = 0
        # Longest first, in fixed-size batches: a deterministic function of the rows, with little padding.
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        decodes = self.method in ("greedy", "median", "branch")
        samples = 1 if greedy else self.samples
        branch = None if greedy else self.branch
        # Decoded sequences per row: its samples, or its branches (k at each of the first places).
        width = samples if branch is None else branch[0] ** branch[1]
        prefix_len = _common_prefix(ids) if self.share_prefix and decodes else 0
        prefix_len = min(prefix_len, min((len(s) for s in ids), default=1) - 1)  # leave every row a suffix
        prefix_cache = None
        if prefix_len > 0:
            pre = torch.tensor([ids[0][:prefix_len]], device=device)
            with lora.routing(model, _rows_of(adapter, 1)):
                res = model(input_ids=pre, use_cache=True, logits_to_keep=1, **{_cache_kw(model): None})
            prefix_cache = _out_cache(res)
        try:
            # `batch_size` counts decoded sequences: with samples, fewer rows at a time (each row's samples share its
            # prompt's cache, copied once per sample), so that memory stays what greedy reading takes.
            per_batch = max(1, self.batch_size // width)
            for b in range(0, len(order), per_batch):
                idx = order[b:b + per_batch]
                batch = [ids[i][prefix_len:] for i in idx]
                # Each row's samples follow it in the batch (see `_decode`): the routing covers all of them.
                with lora.routing(model, _rows_of(adapter, len(batch) * width)):
                    if decodes:
                        gen = None
                        if samples > 1:  # seeded by the batch's place: the same rows read the same prices
                            gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + b)
                        preds, n = self._decode(model, batch, prefix_len, prefix_cache, device, samples, gen, branch)
                        steps += n
                        if samples > 1:
                            preds = [_median_of(preds[r * samples:(r + 1) * samples]) for r in range(len(batch))]
                    else:
                        preds = self._expected_value(model, batch, device)
                for i, p in zip(idx, preds):
                    out[i] = p
        finally:
            if was_training:
                model.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        return ScoreRun(out, secs, len(prompts) / secs if secs > 0 else float("inf"), self.batch_size, steps)

    def _left_pad(self, seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        return input_ids.to(device), mask.to(device)

    def _decode(self, model, seqs, prefix_len, prefix_cache, device, samples: int = 1,
                generator: torch.Generator | None = None,
                branch: tuple[int, int] | None = None) -> tuple[list[Prediction], int]:
        """Constrained decoding of each row's price: greedy, or with a generator `samples` prices per row drawn from
        the model's distribution over what a price can be (rows r*samples to (r+1)*samples-1 are row r's), or with
        `branch` (k, places) each row split into its top k tokens at each of the first places and every branch read
        greedily to its end, answered as their probability-weighted mean (`_branch_mean`)."""
        rows = len(seqs)
        input_ids, mask = self._left_pad(seqs, device)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(rows)
            mask = torch.cat([torch.ones((rows, prefix_len), dtype=mask.dtype, device=device), mask], dim=1)
        else:
            cache = None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        width = input_ids.shape[1]
        kw = _cache_kw(model)
        res = model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, -width:],
                    use_cache=True, logits_to_keep=1, **{kw: cache})
        cache = _out_cache(res)
        logits = res.logits[:, -1, :].float()
        if generator is not None and samples > 1:
            # The prompt is read once per row; only the few decode steps run per sample.
            k = samples
            logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
            positions = positions.repeat_interleave(k, 0)
            cache.batch_repeat_interleave(k)
            rows *= k

        digit_len = self.vocab.digit_len.to(device)
        dot_digits = self.vocab.dot_digits.to(device)
        is_eos = torch.zeros_like(digit_len, dtype=torch.bool)
        is_eos[self.vocab.eos_ids] = True
        int_digits = torch.zeros(rows, dtype=torch.long, device=device)  # digits before the point
        dec_digits = torch.full((rows,), -1, dtype=torch.long, device=device)  # -1: no point yet
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        off = torch.zeros(rows, dtype=torch.long, device=device)
        tokens: list[torch.Tensor] = []
        weight = torch.ones(rows, device=device)  # branch: the probability of the tokens forced so far
        steps = 0
        next_pos = positions[:, -1]
        while True:
            before_point = dec_digits < 0
            # allowed[r, v]: token v keeps row r's text a price
            room_int = (self.max_int_digits - int_digits)[:, None]
            allow_digits = (digit_len[None, :] > 0) & torch.where(
                before_point[:, None], digit_len[None, :] <= room_int,
                digit_len[None, :] <= (DECIMALS - dec_digits.clamp(min=0))[:, None])
            allow_dot = (dot_digits[None, :] >= 0) & before_point[:, None] & (int_digits > 0)[:, None]
            allow_eos = is_eos[None, :] & torch.ones_like(before_point)[:, None]
            allowed = allow_digits | allow_dot | allow_eos
            masked = logits.masked_fill(~allowed, float("-inf"))
            top = masked.argmax(-1)
            off += ((logits.argmax(-1) != top) & ~done).long()
            if branch is not None and steps < branch[1]:
                # Every row becomes k rows, one per top token; a row already ended keeps its weight in its first copy.
                k = branch[0]
                top_p, top_i = torch.softmax(masked, -1).topk(k, dim=-1)
                top_p = torch.where(done[:, None], torch.eye(k, device=device)[0].expand(rows, k), top_p)
                choice, weight = top_i.reshape(-1), (weight[:, None] * top_p).reshape(-1)
                tokens = [t.repeat_interleave(k, 0) for t in tokens]
                mask, next_pos = mask.repeat_interleave(k, 0), next_pos.repeat_interleave(k, 0)
                int_digits, dec_digits = int_digits.repeat_interleave(k, 0), dec_digits.repeat_interleave(k, 0)
                done, off, before_point = (done.repeat_interleave(k, 0), off.repeat_interleave(k, 0),
                                           before_point.repeat_interleave(k, 0))
                cache.batch_repeat_interleave(k)
                rows *= k
            elif generator is None:
                choice = top
            else:
                choice = torch.multinomial(torch.softmax(masked, -1), 1, generator=generator).squeeze(1)
            choice = torch.where(done, torch.full_like(choice, self.pad_id), choice)
            tokens.append(choice)
            steps += 1
            c_digits, c_dot = digit_len[choice], dot_digits[choice]
            ended = is_eos[choice]
            int_digits = torch.where(before_point & ~done, int_digits + c_digits, int_digits)
            dec_digits = torch.where(~before_point & ~done, dec_digits + c_digits, dec_digits)
            dec_digits = torch.where((c_dot >= 0) & ~done, c_dot, dec_digits)
            done = done | ended | (dec_digits >= DECIMALS)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            next_pos = next_pos + 1
            res = model(input_ids=choice[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, logits_to_keep=1, **{kw: cache})
            cache = _out_cache(res)
            logits = res.logits[:, -1, :].float()
        gen = torch.stack(tokens, dim=1).tolist()
        preds = []
        for r in range(rows):
            text = ""
            for t in gen[r]:
                if t in self.vocab.eos_ids or (t == self.pad_id and text):
                    break
                text += self.vocab.text[t]
            preds.append(Prediction(text=text, value=parse_price(text), off_grammar_steps=int(off[r])))
        if branch is not None:
            per = branch[0] ** branch[1]
            w = weight.tolist()
            preds = [_branch_mean(preds[r * per:(r + 1) * per], w[r * per:(r + 1) * per]) for r in range(len(seqs))]
        return preds, steps

    def _expected_value(self, model, seqs, device) -> list[Prediction]:
        """The course's read-out for tokenizers with multi-digit number tokens: one forward pass, the probability-
        weighted mean of the top-k next tokens that read as numbers."""
        rows = len(seqs)
        input_ids, mask = self._left_pad(seqs, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        preds = []
        for r in range(rows):
            num, den, parts = 0.0, 0.0, []
            for p, i in zip(top_p[r].tolist(), top_i[r].tolist()):
                s = self.vocab.text[i].strip()
                if s and s.replace(".", "", 1).isdigit():
                    num += p * float(s)
                    den += p
                    parts.append(f"{s}:{p:.3f}")
            value = num / den if den > 0 else None
            preds.append(Prediction(text=" ".join(parts), value=value))
        return preds


def one_row_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The original recipe's scorer: one row, plain greedy `generate`. Used as the reference in tests and benches."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, num_return_sequences=1)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
