"""What a worker checks and loads before its first trial, so that bad input fails before a model is loaded: the
data splits, and every model the sweep may pick (resolved, its linear layers matched against every target set, its
tokenizer read), with a price scorer per model."""

from __future__ import annotations

from dataclasses import dataclass

from . import models
from .config import ModelSpec, SweepConfig
from .data import Splits, load_splits
from .errors import TunerError
from .scoring import PriceScorer


@dataclass
class Prepared:
    splits: Splits
    resolved: dict[str, models.ResolvedModel]  # by model key
    modules: dict[str, set[str]]  # each model's linear layer names
    tokenizers: dict[str, object]
    scorers: dict[str, PriceScorer]


def prepare(cfg: SweepConfig) -> Prepared:
    splits = load_splits(cfg.data)
    out = Prepared(splits, {}, {}, {}, {})
    for i, spec in enumerate(cfg.model.options):
        where = f"model[{i}] {spec.key!r}" if not cfg.model.is_fixed else f"model {spec.key!r}"
        resolved, modules, tok = check_model(cfg, spec, where)
        out.resolved[spec.key], out.modules[spec.key], out.tokenizers[spec.key] = resolved, modules, tok
        out.scorers[spec.key] = PriceScorer(tok, max_price=splits.max_price, batch_size=cfg.scoring.batch_size,
                                            method=cfg.scoring.method, top_k=cfg.scoring.top_k)
    return out


def check_model(cfg: SweepConfig, spec: ModelSpec, where: str) -> tuple[models.ResolvedModel, set[str], object]:
    """Resolve one model, match every target set of the sweep against its layers and read its tokenizer; any
    failure is a TunerError naming the model."""
    try:
        resolved = models.resolve_model(spec)
        modules = models.linear_module_names(resolved)
        for name in cfg.search.target_modules.values():
            models.resolve_targets(cfg.search.target_set(name), modules, name)
        tok = models.load_tokenizer(resolved)
    except TunerError as exc:
        raise TunerError(f"{where}: {str(exc).removeprefix(f'model {spec.name!r}: ')}") from None
    except Exception as exc:
        raise TunerError(f"{where}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    return resolved, modules, tok
