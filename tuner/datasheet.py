"""`tuner data SWEEP`: what a study will train on, said before any training. Rows read and skipped, the splits,
token lengths against the budget and the cutting that will happen, the price distribution, and the test MAE of
the constant and classical baselines, the numbers a fine-tune has to beat. Unusable data is refused (DataError)
by the same checks a run makes, so this is also the quickest way to find out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .baselines import classical
from .batches import auto_reason, row_length
from .config import SweepConfig
from .fmt import money, short_model
from .prepare import prepare
from .scoring import constant_baseline
from .space import scaled_rate_notes


@dataclass
class Datasheet:
    source: str
    rows_read: int
    skipped: dict[str, int]
    sizes: dict[str, int]
    prices: list[float]  # train, validation and test
    lengths: dict[str, dict] = field(default_factory=dict)  # per model: percentiles and the fit
    token_budget: dict | None = None  # what data.train_tokens kept
    median_mae: float = 0.0
    classical_mae: float = 0.0
    classical_seconds: float = 0.0
    first_trials: list[str] = field(default_factory=list)  # study.enqueue's scaled rates on these rows


def build(cfg: SweepConfig) -> Datasheet:
    ready = prepare(cfg)
    s = ready.splits
    rows = s.train + s.val + s.test
    sheet = Datasheet(s.source, s.rows_read, dict(s.skipped), {"train": len(s.train), "validation": len(s.val),
                                                               "test": len(s.test)}, [e.price for e in rows],
                      token_budget=ready.token_budget)
    for model, tok in ready.tokenizers.items():
        lengths = np.array([row_length(tok, e.prompt, e.completion) for e in rows])
        budgets = sorted({b for (m, b) in ready.fits if m == model})
        sheet.lengths[model] = {"p5": int(np.percentile(lengths, 5)), "p50": int(np.percentile(lengths, 50)),
                                "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max()),
                                "auto": ready.auto_lengths.get(model),
                                "fits": [f"WARNING: {fit.warning()}" if fit.loud else fit.line()
                                         for fit in (ready.fits[(model, b)][1] for b in budgets)]}
    truths = [e.price for e in s.test]
    sheet.median_mae = constant_baseline(s.train_median, truths)["mae"]
    c = classical(s.train, s.val, s.test)
    sheet.classical_mae, sheet.classical_seconds = c["mae"], c["seconds"]
    sheet.first_trials = scaled_rate_notes(cfg, len(s.train))
    return sheet


def histogram(prices: list[float], bins: int = 8, width: int = 40) -> list[str]:
    """Prices in log-spaced bins (prices span orders of magnitude), one bar per bin."""
    lo, hi = math.log10(min(prices)), math.log10(max(prices))
    edges = np.logspace(lo, hi, bins + 1) if hi > lo else np.array([min(prices), max(prices) + 1])
    counts, _ = np.histogram(prices, bins=edges)
    top = max(counts.max(), 1)
    return [f"  {money(a):>10} - {money(b):>10}  {'#' * max(1 if n else 0, round(width * n / top)):<{width}} {n}"
            for a, b, n in zip(edges[:-1], edges[1:], counts)]


def render(sheet: Datasheet, cfg: SweepConfig) -> list[str]:
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in sorted(sheet.skipped.items())) or "none"
    lines = [f"data: {sheet.source}: {sheet.rows_read:,} rows read; skipped: {skipped}",
             "splits: " + ", ".join(f"{k} {v}" for k, v in sheet.sizes.items())]
    if sheet.token_budget:
        lines.append(sheet.token_budget["line"])
    budget = "auto" if cfg.train.max_length.value == "auto" else cfg.train.max_length.describe()
    for model, ln in sheet.lengths.items():
        name = "" if cfg.model.is_fixed else f"{short_model(model)}: "
        lines.append(f"{name}tokens per row (prompt + price): 5% {ln['p5']}, median {ln['p50']}, 95% {ln['p95']}, "
                     f"longest {ln['max']}; train.max_length {budget}")
        if ln["auto"]:
            a = ln["auto"]
            lines.append(f"{name}max_length auto picks {auto_reason(a)}")
        lines += [f"{name}{line}" for line in ln["fits"]]
    q = np.percentile(sheet.prices, [0, 25, 50, 75, 100])
    lines.append("prices: min {}, 25% {}, median {}, 75% {}, max {}".format(*(money(v) for v in q)))
    lines += histogram(sheet.prices)
    lines.append(f"test MAE of the baselines: constant train median {money(sheet.median_mae)}; classical (TF-IDF + "
                 f"ridge) {money(sheet.classical_mae)} ({sheet.classical_mae / sheet.median_mae:.0%} of the constant, "
                 f"fitted in {sheet.classical_seconds:.1f} s)")
    return lines + sheet.first_trials
