"""The baselines every trial is shown beside, scored on the same test rows with the same metrics: the constant
train-median price, a classical text regressor trained on the same training rows, and each base model without
fine-tuning. Stored on the study (`study.set_baseline`), so the leaderboard, the report, W&B and the model card
show them. A fine-tune is only worth its cost where it beats the strongest of them.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
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


CLASSICAL = "classical"
CLASSICAL_METHOD = "TF-IDF (word 1-2 grams, character 2-5 grams) + ridge regression on log price"
RIDGE_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def classical(train: Sequence, val: Sequence, test: Sequence) -> dict:
    """What a practitioner would try first on price-from-text: word and character n-gram TF-IDF with ridge regression
    on log price, fitted on the training rows, its penalty chosen on the validation rows by MAE, scored on the test
    rows. It reads the whole description (it has no token budget); seconds on a CPU."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_union

    t0 = time.perf_counter()
    # Numbers such as "0.30" stay whole words: in a price table they carry most of the signal.
    vec = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w[\w.]*\b"),
                     TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))
    x = vec.fit_transform([e.text for e in train])
    y = np.log1p([e.price for e in train])
    x_val, val_prices = vec.transform([e.text for e in val]), np.array([e.price for e in val])
    best = None
    for alpha in RIDGE_ALPHAS:
        model = Ridge(alpha=alpha).fit(x, y)
        mae = float(np.mean(np.abs(np.expm1(model.predict(x_val)) - val_prices)))
        if best is None or mae < best[0]:
            best = (mae, alpha, model)
    _, alpha, model = best
    predicted = np.clip(np.expm1(model.predict(vec.transform([e.text for e in test]))), 0, None)
    metrics = price_metrics([float(v) for v in predicted], [e.price for e in test])
    return {**metrics, "method": CLASSICAL_METHOD, "alpha": alpha, "train_rows": len(train),
            "seconds": round(time.perf_counter() - t0, 2)}


def ensure_classical(study: optuna.Study, splits: Splits) -> None:
    if CLASSICAL not in baselines(study):
        set_baseline(study, CLASSICAL, classical(splits.train, splits.val, splits.test))


def record_fits(study: optuna.Study, ready) -> None:
    """How the rows were fitted to each token budget (what `max_length: auto` chose, what `data.train_tokens`
    kept), on the study, where `tuner status` and the dashboard read it."""
    fits = dict(study.user_attrs.get("fits", {}))
    fits.update({f"{model}@{budget}": fit.summary() for (model, budget), (_, fit) in ready.fits.items()})
    study.set_user_attr("fits", fits)
    if ready.auto_lengths:
        study.set_user_attr("max_length_auto", ready.auto_lengths)
    if ready.token_budget:
        study.set_user_attr("token_budget", ready.token_budget)


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
