"""What a run checks and loads before a study is created or opened, so that bad input fails before anything is
stored or a model is loaded: the data splits, every model the sweep may pick (resolved, its linear layers matched
against every target set, its tokenizer read), `max_length: auto` resolved per model, and the rows fitted to each
token budget the sweep can use. A price scorer per model comes with it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import models
from .batches import Fit, auto_max_length, fit_splits, row_length
from .config import ModelSpec, SweepConfig, min_total_steps
from .data import Splits, load_splits
from .errors import DataError, TunerError
from .scoring import PriceScorer


@dataclass
class Prepared:
    cfg: SweepConfig
    splits: Splits  # as read: full descriptions (what the classical baseline reads)
    resolved: dict[str, models.ResolvedModel] = field(default_factory=dict)  # by model key
    modules: dict[str, set[str]] = field(default_factory=dict)  # each model's linear layer names
    tokenizers: dict[str, object] = field(default_factory=dict)
    scorers: dict[str, PriceScorer] = field(default_factory=dict)
    auto_lengths: dict[str, dict] = field(default_factory=dict)  # model -> what `max_length: auto` chose, and why
    fits: dict[tuple[str, int], tuple[Splits, Fit]] = field(default_factory=dict)
    token_budget: dict | None = None  # what `data.train_tokens` kept; None when it is not set

    def max_lengths(self) -> dict[str, int] | None:
        """Each model's resolved `max_length: auto`, for `space.sample`; None when max_length is not auto."""
        return {m: rec["value"] for m, rec in self.auto_lengths.items()} or None

    def fitted(self, model: str, max_length: int) -> tuple[Splits, Fit]:
        """The splits with every description cut to fit `max_length` for `model`'s tokenizer (made once)."""
        key = (model, max_length)
        if key not in self.fits:
            self.fits[key] = fit_splits(self.tokenizers[model], self.splits, max_length, self.cfg.data)
        return self.fits[key]


def prepare(cfg: SweepConfig) -> Prepared:
    out = Prepared(cfg, load_splits(cfg.data))
    for i, spec in enumerate(cfg.model.options):
        where = f"model[{i}] {spec.key!r}" if not cfg.model.is_fixed else f"model {spec.key!r}"
        resolved, modules, tok = check_model(cfg, spec, where)
        out.resolved[spec.key], out.modules[spec.key], out.tokenizers[spec.key] = resolved, modules, tok
        # ScoringSpec's fields are PriceScorer's keyword arguments, one for one.
        out.scorers[spec.key] = PriceScorer(tok, max_price=out.splits.max_price, **cfg.scoring.model_dump())
    resolve_auto(out)
    take_token_budget(out)
    fit_every_budget(out)
    return out


def resolve_auto(ready: Prepared) -> None:
    """`max_length: auto` per model, from the token lengths of every row as read."""
    dim = ready.cfg.train.max_length
    if dim.kind == "fixed" and dim.value == "auto":
        for model, tok in ready.tokenizers.items():
            ready.auto_lengths[model] = auto_max_length(tok, ready.splits, ready.cfg.train.max_length_cap)


def fit_every_budget(ready: Prepared) -> None:
    """Fit the rows to every budget the sweep names, so that data that cannot fit is refused now. Of a range, its
    lowest budget (the one that cuts most); the others are fitted when a trial draws them."""
    dim = ready.cfg.train.max_length
    for model in ready.tokenizers:
        if model in ready.auto_lengths:
            budgets = [ready.auto_lengths[model]["value"]]
        else:
            budgets = {"choices": list(dim.choices), "fixed": [dim.value]}.get(dim.kind, [dim.low])
        for budget in budgets:
            ready.fitted(model, int(budget))


def largest_budget(ready: Prepared, model: str) -> int:
    """The longest row (in tokens) a trial of this sweep can train `model` on."""
    if model in ready.auto_lengths:  # resolved by `resolve_auto`
        return int(ready.auto_lengths[model]["value"])
    return int(max(ready.cfg.train.max_length.values()))


def take_token_budget(ready: Prepared) -> None:
    """`data.train_tokens`: keep the first train rows whose tokens, each at most its longest budget, add up to the
    limit, the same rows for every model and budget of the sweep (trials that trained on different rows could not
    be compared). The splits, so their fits and the baselines, hold the kept rows only; what was left out is recorded
    for the run output and `tuner data`. Refused when not one row fits, or too few for train.eval_every."""
    limit, train = ready.cfg.data.train_tokens, ready.splits.train
    if limit is None:
        return
    keep, lengths = len(train), {}
    for model, tok in ready.tokenizers.items():
        top, total, lengths[model] = largest_budget(ready, model), 0, []
        for e in train[:keep]:  # rows past the limit are not tokenized
            n = min(row_length(tok, e.prompt, e.completion), top)
            if total + n > limit:
                break
            total += n
            lengths[model].append(n)
        keep = len(lengths[model])
    tokens = max(sum(ln[:keep]) for ln in lengths.values())
    longest = max(largest_budget(ready, m) for m in lengths)
    if keep == 0:
        raise DataError(f"data.train_tokens {limit:,}: not one train row fits (a row here takes up to {longest} "
                        f"tokens); raise data.train_tokens")
    ev = ready.cfg.train.eval_every
    if ev is not None and ev >= min_total_steps(ready.cfg, keep):
        raise DataError(f"data.train_tokens {limit:,} keeps {keep} train rows, {min_total_steps(ready.cfg, keep)} "
                        f"optimizer steps, and train.eval_every is {ev}: raise data.train_tokens or lower "
                        f"train.eval_every, or the trials never evaluate")
    n = len(train)
    line = (f"data.train_tokens {limit:,}: " + (f"all {n} train rows fit ({tokens:,} tokens)" if keep == n else
            f"a trial trains on the first {keep} of {n} train rows ({tokens:,} tokens, rows of up to {longest}); "
            f"the baselines fit the same {keep}"))
    ready.token_budget = {"train_tokens": limit, "rows": keep, "of": n, "tokens": tokens, "line": line}
    # The rows held back stay first in line for `study.extend`, before the rows no split took.
    ready.splits = replace(ready.splits, train=train[:keep], spare=train[keep:] + ready.splits.spare)


def check_model(cfg: SweepConfig, spec: ModelSpec, where: str) -> tuple[models.ResolvedModel, set[str], object]:
    """Resolve one model, match every target set of the sweep against its layers and read its tokenizer; any
    failure is a TunerError naming the model."""
    try:
        resolved = models.resolve_model(spec)
        modules = models.linear_module_names(resolved)
        for name in cfg.search.target_modules.values():
            models.resolve_targets(cfg.search.target_set(name), modules, name)
        tok = models.load_tokenizer(resolved)
        nl = cfg.train.number_loss
        if not (nl.is_fixed and nl.value == 0):
            from .loop import digit_table

            if digit_table(tok) is None:
                raise TunerError(f"model {spec.name!r}: train.number_loss needs a tokenizer with one token for "
                                 f"each digit 0-9, and this one has none for some digit; set train.number_loss: 0")
    except TunerError as exc:
        raise TunerError(f"{where}: {str(exc).removeprefix(f'model {spec.name!r}: ')}") from None
    except Exception as exc:
        raise TunerError(f"{where}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    return resolved, modules, tok
