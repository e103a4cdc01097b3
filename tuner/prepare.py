"""What a run checks and loads before a study is created or opened, so that bad input fails before anything is
stored or a model is loaded: the data splits, every model the sweep may pick (resolved, its linear layers matched
against every target set, its tokenizer read), `max_length: auto` resolved per model, and the rows fitted to each
token budget the sweep can use. A price scorer per model comes with it."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import models
from .batches import Fit, auto_max_length, fit_splits
from .config import ModelSpec, SweepConfig
from .data import Splits, load_splits
from .errors import TunerError
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
        out.scorers[spec.key] = PriceScorer(tok, max_price=out.splits.max_price, batch_size=cfg.scoring.batch_size,
                                            method=cfg.scoring.method, top_k=cfg.scoring.top_k)
    fit_every_budget(out)
    return out


def fit_every_budget(ready: Prepared) -> None:
    """Resolve `max_length: auto` per model and fit the rows to every budget the sweep names, so that data that
    cannot fit is refused now. Of a range, its lowest budget (the one that cuts most); the others are fitted when
    a trial draws them."""
    dim = ready.cfg.train.max_length
    for model, tok in ready.tokenizers.items():
        if dim.kind == "fixed" and dim.value == "auto":
            ready.auto_lengths[model] = auto_max_length(tok, ready.splits, ready.cfg.train.max_length_cap)
            budgets = [ready.auto_lengths[model]["value"]]
        else:
            budgets = {"choices": list(dim.choices), "fixed": [dim.value]}.get(dim.kind, [dim.low])
        for budget in budgets:
            ready.fitted(model, int(budget))


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
