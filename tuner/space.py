"""The search space: an `optuna.Trial` (or any object with the same `suggest_*` methods) to `TrialParams`.

The rank is sampled as its exponent (an integer, so the sampler keeps the order 8 < 16 < 32) and recorded as `r`,
the value users see, in the trial's user attributes. Fixed settings are not suggested at all: they do not clutter
the parameter table, and changing one in the YAML is a different study (see `space_signature`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .config import Dim, SweepConfig


class Suggester(Protocol):
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class TrialParams:
    """Everything that defines one trial's math. `target_modules` is resolved against the model."""

    r: int
    alpha: float
    dropout: float
    target_set: str
    target_modules: tuple[str, ...]
    quant_bits: int
    learning_rate: float
    epochs: int
    batch_size: int  # rows per optimizer step per gradient-accumulation step; effective = batch_size * grad_accum
    grad_accum: int
    max_length: int
    optimizer: str
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    max_steps: int | None = None
    model: str = ""

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialParams":
        d = dict(d)
        d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


def _suggest(trial: Suggester, name: str, dim: Dim, kind: type) -> Any:
    if dim.kind == "fixed":
        return dim.value
    if dim.kind == "choices":
        return trial.suggest_categorical(name, list(dim.choices))
    if kind is int:
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)


def sample(trial: Suggester, cfg: SweepConfig,
           available_modules: "set[str] | dict[str, set[str]] | None" = None) -> TrialParams:
    """Draw one trial's parameters. `available_modules` (the model's linear layer names, or per model key) resolves
    target sets; a set that matches nothing was refused at study start, so here it only narrows the list."""
    s, t = cfg.search, cfg.train
    model = cfg.model.keys()[0] if cfg.model.is_fixed else trial.suggest_categorical("model", cfg.model.keys())
    ranks = s.r.values()
    if len(ranks) == 1:
        r = ranks[0]
    else:
        r = 2 ** trial.suggest_int("r_exp", int(math.log2(ranks[0])), int(math.log2(ranks[-1])))
    if s.alpha.value is not None:
        alpha = float(s.alpha.value)
    else:
        alpha = float(_suggest(trial, "alpha_ratio", s.alpha.ratio, float)) * r
    target_set = _suggest(trial, "target_modules", s.target_modules, str)
    wanted = s.target_set(target_set)
    if isinstance(available_modules, dict):
        available_modules = available_modules[model]
    modules = tuple(m for m in wanted if available_modules is None or m in available_modules)
    return TrialParams(
        r=r,
        alpha=alpha,
        dropout=float(_suggest(trial, "dropout", s.dropout, float)),
        target_set=target_set,
        target_modules=modules,
        quant_bits=int(_suggest(trial, "quant_bits", s.quant_bits, int)),
        learning_rate=float(_suggest(trial, "learning_rate", s.learning_rate, float)),
        epochs=int(_suggest(trial, "epochs", t.epochs, int)),
        batch_size=int(_suggest(trial, "batch_size", t.batch_size, int)),
        grad_accum=int(_suggest(trial, "grad_accum", t.grad_accum, int)),
        max_length=int(_suggest(trial, "max_length", t.max_length, int)),
        optimizer=_suggest(trial, "optimizer", t.optimizer, str),
        scheduler=_suggest(trial, "scheduler", t.scheduler, str),
        warmup_ratio=float(_suggest(trial, "warmup_ratio", t.warmup_ratio, float)),
        weight_decay=float(_suggest(trial, "weight_decay", t.weight_decay, float)),
        max_grad_norm=float(_suggest(trial, "max_grad_norm", t.max_grad_norm, float)),
        seed=t.seed,
        max_steps=t.max_steps,
        model=model,
    )


def space_signature(cfg: SweepConfig) -> dict:
    """What makes two studies comparable: the search space, the fixed training settings, the model and the data.
    Stored on the study; a run whose file differs is refused (unless forced) with the difference named."""
    def dim(d: Dim) -> Any:
        return d.describe()

    s, t, data = cfg.search, cfg.train, cfg.data
    return {
        "model": cfg.model.keys() if not cfg.model.is_fixed else cfg.model.options[0].name,
        "model_revision": cfg.model.revision,
        "data": {"source": data.source, "train_rows": data.train_rows, "val_rows": data.val_rows,
                 "test_rows": data.test_rows, "seed": data.seed, "text_column": data.text_column,
                 "price_column": data.price_column},
        "objective": cfg.study.objective,
        "r": [s.r.min, s.r.max],
        "alpha": s.alpha.value if s.alpha.value is not None else {"ratio": dim(s.alpha.ratio)},
        "dropout": dim(s.dropout), "target_modules": dim(s.target_modules),
        "target_sets": {k: s.target_set(k) for k in s.target_modules.values()},
        "quant_bits": dim(s.quant_bits), "learning_rate": dim(s.learning_rate),
        "train": {k: dim(getattr(t, k)) for k in ("epochs", "batch_size", "grad_accum", "max_length", "optimizer",
                                                    "scheduler", "warmup_ratio", "weight_decay", "max_grad_norm")}
                 | {"seed": t.seed, "max_steps": t.max_steps},
    }


def signature_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two signatures: 'search.r: [8, 64] -> [8, 32]'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += signature_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def signature_hash(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]
