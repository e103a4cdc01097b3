"""The baselines every trial is shown beside, scored on the same test rows with the same metrics: the constant
train-median price, and each base model without fine-tuning. Stored on the study (`study.set_baseline`)."""

from __future__ import annotations

import optuna

from . import models
from .data import Splits
from .runtime import Reporter
from .scoring import PriceScorer, constant_baseline, price_metrics
from .study import baselines, set_baseline


def ensure_median(study: optuna.Study, splits: Splits) -> None:
    """The constant train-median price, once per study (with the data summary it came from)."""
    if "median" in baselines(study):
        return
    truths = [e.price for e in splits.test]
    set_baseline(study, "median", {**constant_baseline(splits.train_median, truths), "value": splits.train_median})
    study.set_user_attr("data", splits.summary())


def base_model_key(model: str, bits: int, fixed_model: bool) -> str:
    """`base_model_4bit` for a study of one model; with several, the model's name is in the key."""
    if fixed_model:
        return f"base_model_{bits}bit"
    slug = "".join(c if c.isalnum() else "_" for c in model.split(":")[-1].split("/")[-1]).strip("_")
    return f"base_model_{slug}_{bits}bit"


def ensure_base_model(study: optuna.Study, base: models.Base, model: str, *, fixed_model: bool,
                      scorer: PriceScorer, splits: Splits, reporter: Reporter) -> None:
    """The base model without fine-tuning, scored once per study, model and quantization."""
    key = base_model_key(model, base.bits, fixed_model)
    if key in baselines(study):
        return
    reporter.message(f"scoring the base model {model} ({base.bits}-bit, no fine-tuning) on {len(splits.test)} test "
                     f"rows for the baseline")
    run = scorer.predict(base.model, [e.prompt for e in splits.test])
    metrics = price_metrics([p.value for p in run.predictions], [e.price for e in splits.test])
    metrics["rows_per_s"] = run.rows_per_s
    metrics["model"] = model
    set_baseline(study, key, metrics)
