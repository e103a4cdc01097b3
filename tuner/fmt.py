"""How numbers and trials read, wherever a user reads them: the terminal, `tuner report`, the model card. One set of
formatters and one leaderboard row, so that a trial's numbers agree with each other everywhere."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState


def num(v: Any, spec: str = ".3g") -> str:
    """`-` for no value, `nan` for NaN, else `format(v, spec)`."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def money(v: float | None, cents: bool = False) -> str:
    return "-" if v is None else (f"${v:,.2f}" if cents else f"${v:,.0f}")


def pct(v: float | None, decimals: int = 0) -> str:
    return "-" if v is None else f"{v:.{decimals}%}"


def secs(s: float | None) -> str:
    """`4m36s`, `1h02m`."""
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def short_model(key: str) -> str:
    """A local folder by its last component, a Hub id or builtin name as it is (with any @revision)."""
    name, _, rev = str(key).partition("@")
    if name.startswith(("/", ".", "~")):
        name = Path(name).name
    return name + (f"@{rev}" if rev else "")


# ---------------------------------------------------------------------------------------------------------------
# The leaderboard


def trial_duration(t: FrozenTrial) -> float | None:
    """A trial's one duration: from its start in the study (when a worker took it) to the moment its outcome was
    recorded, test scoring and artifacts included. The worker writes it as `duration_s` just before `tell`; the
    run line, `tuner status`, the report, the export and the card all read it here. A trial that ended without
    one (failed before it trained) falls back to the study's own start and end, which span it plus the moment
    `tell` takes to record the end."""
    if t.user_attrs.get("duration_s") is not None:
        return float(t.user_attrs["duration_s"])
    if t.datetime_complete and t.datetime_start:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return None


def user_params(params: dict) -> dict:
    """A trial's sampled parameters as a user writes them. Studies made before the rank was sampled as `r` hold its
    exponent `r_exp`; it reads as `r` here too."""
    out = {}
    for k, v in params.items():
        if k == "r_exp":
            out["r"] = 2 ** int(v)
        else:
            out[k] = v
    return out


def param_name(name: str) -> str:
    """`r_exp` -> `r`; every other parameter keeps its name."""
    return "r" if name == "r_exp" else name


def trial_note(t: FrozenTrial) -> str:
    a = t.user_attrs
    notes = []
    if t.state == TrialState.FAIL:
        notes.append(str(a.get("fail_reason", "")))
    elif t.state == TrialState.PRUNED:
        notes.append(f"pruned at step {a.get('pruned_at_step', '?')}")
    if a.get("resumed_from_step"):
        notes.append(f"resumed from step {a['resumed_from_step']}")
    if a.get("extends") is not None:
        e = a.get("extension") or {}
        notes.append(f"trial {a['extends']} +{e.get('steps', '?')} steps on {e.get('rows', '?')} new rows")
    if a.get("promoted"):
        notes.append("promoted")
    if a.get("overfit_epochs"):
        notes.append("overfit")
    if a.get("collapsed"):
        notes.append(f"collapsed ({a.get('top_answer_share', 0):.0%} one answer)")
    return " ".join(n for n in notes if n)


def trial_row(t: FrozenTrial, best_number: int | None) -> dict:
    """One trial as the leaderboard shows it. A setting sampled by the study is in `params`; a fixed one is read
    from the trial's user attributes, where the worker records every trial's values."""
    a, p = t.user_attrs, t.params
    bits = p.get("quant_bits", a.get("quant_bits", (a.get("quantization") or {}).get("bits")))
    return {"number": t.number, "state": t.state.name, "best": t.number == best_number, "value": t.value,
            "model": p.get("model", a.get("model")), "model_sampled": "model" in p, "r": a.get("r"), "alpha": a.get("alpha"),
            "dropout": p.get("dropout", a.get("dropout")), "targets": a.get("target_set", p.get("target_modules")),
            "bits": bits,
            # An extension trains at its own rate (study.extend.lr_ratio), recorded on it; its params are its parent's.
            "learning_rate": (a.get("learning_rate") if a.get("extends") is not None
                              else p.get("learning_rate", a.get("learning_rate"))), "mae": a.get("mae"),
            "rmsle": a.get("rmsle"), "hit_rate": a.get("hit_rate"), "duration_s": trial_duration(t),
            "note": trial_note(t)}


LEADERBOARD_COLUMNS = ["#", "state", "model", "r", "alpha", "dropout", "targets", "bits", "lr", "MAE", "RMSLE",
                       "hits", "time", "note"]
LEFT_COLUMNS = {"state", "model", "targets", "note"}


def columns(with_model: bool) -> list[str]:
    """The leaderboard's headers; a study of one model has no model column."""
    return [c for c in LEADERBOARD_COLUMNS if with_model or c != "model"]


def row_cells(r: dict, with_model: bool) -> list[str]:
    cells = [str(r["number"]), r["state"] + (" *" if r["best"] else "")]
    cells += [short_model(r["model"] or "-")] if with_model else []
    return cells + [num(r["r"], "d"), num(r["alpha"], "g"), num(r["dropout"], ".3f"), str(r["targets"] or "-"),
                    num(r["bits"], "d"), num(r["learning_rate"], ".2e"), money(r["mae"]), num(r["rmsle"], ".3f"),
                    pct(r["hit_rate"]), secs(r["duration_s"]), r["note"]]


def readout(scoring: dict) -> str:
    """How a price was read, in words: a `scoring` record as `ScoringSpec.model_dump` writes it (a sweep's, or an
    adapter's tuner.json, which `AdapterInfo` completes)."""
    method = scoring["method"]
    if method == "branch":
        return (f"the branch mean (the top {scoring['branch_top_k']} tokens at each of the first "
                f"{scoring['branch_places']} places, each branch read greedily, weighted by probability)")
    if method == "median":
        return f"the median of {scoring['samples']} sampled prices"
    if method == "expected_value":
        return f"the expected value of the top {scoring['top_k']} number tokens"
    return "greedy decoding"


def baseline_label(key: str) -> str:
    return {"median": "constant train median", "classical": "classical (TF-IDF + ridge)"}.get(key,
                                                                                             key.replace("_", " "))


def baseline_row(key: str, m: dict) -> dict:
    return {"key": key, "label": baseline_label(key), "mae": m.get("mae"), "rmsle": m.get("rmsle"),
            "hit_rate": m.get("hit_rate")}


def objective_value(objective: str, v: float | None) -> str:
    return money(v) if objective == "mae" else pct(v) if objective == "hit_rate" else num(v, ".3f")


def verdict(objective: str, maximize: bool, best: float, baselines: dict[str, dict]) -> str:
    """How the best trial compares with each baseline, strongest first: 'best MAE $1,180: 69% of the classical
    baseline (TF-IDF + ridge), 37% of the constant train median'. A ratio for an error, points for a hit rate."""
    scored = [(key, b[objective]) for key, b in baselines.items() if b.get(objective) is not None]
    scored.sort(key=lambda kv: -kv[1] if maximize else kv[1])
    parts = []
    for key, value in scored:
        beats = best > value if maximize else best < value
        if maximize:
            part = f"{(best - value) * 100:+.0f} points on the {baseline_label(key)} ({pct(value)})"
        else:
            part = f"{best / value:.0%} of the {baseline_label(key)}" if value > 0 else f"the {baseline_label(key)} 0"
        parts.append(part + ("" if beats else " (does NOT beat it)"))
    head = f"best {objective.upper() if objective != 'hit_rate' else 'hit rate'} {objective_value(objective, best)}"
    return head + (": " + ", ".join(parts) if parts else " (no baseline recorded)")


def baseline_cells(b: dict, with_model: bool) -> list[str]:
    blank = len(columns(with_model)) - 7  # between the label and the metrics
    return ["", f"baseline: {b['label']}"] + [""] * blank + [money(b["mae"]), num(b["rmsle"], ".3f"),
                                                               pct(b["hit_rate"]), "", ""]
