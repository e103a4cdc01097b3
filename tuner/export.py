"""Machine-readable output: `--format json|csv` on `tuner status`, `best` and `report`, and `tuner export`.

What a script reads is what a user reads in the tables: the same rows (`fmt.trial_row`), the same duration
(`fmt.trial_duration`), `r` never `r_exp` (`fmt.user_params`). JSON has no NaN or infinity (a value that is not a
finite number is `null`), and times are ISO 8601 strings. CSV has one header line; every row starts with `kind`
(`trial`, `baseline`, `importance`, ...), so that one file can carry the leaderboard and its baselines.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import optuna

from . import fmt
from .errors import TunerError

FORMATS = ("table", "json", "csv")
EXPORT_SUFFIXES = (".csv", ".parquet")
# Metrics a trial records on its user attributes, in the order an export lists them.
METRICS = ("mae", "rmsle", "hit_rate", "parse_fail_rate", "off_grammar_rate", "n")


def clean(v: Any) -> Any:
    """A value JSON (and any strict parser) takes: NaN and infinities become None, datetimes ISO strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def dumps(obj: Any) -> str:
    return json.dumps(clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def to_csv(rows: Iterable[dict]) -> str:
    """Rows of differing keys in one table: the header is every key in first-seen order; lists and mappings are
    JSON text in their cell."""
    rows = list(rows)
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in clean(r).items()})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


# ---------------------------------------------------------------------------------------------------------------
# What each command says


def leaderboard_records(rows: list[dict], baseline_rows: list[dict]) -> list[dict]:
    """The leaderboard (report.trial_rows / report.leaderboard) and its baselines, one record each."""
    out = [{"kind": "trial", **{k: r[k] for k in ("number", "state", "best", "value", "model", "r", "alpha",
                                                  "dropout", "targets", "bits", "learning_rate", "mae", "rmsle",
                                                  "hit_rate", "duration_s", "note")}} for r in rows]
    out += [{"kind": "baseline", "name": b["key"], "label": b["label"], "mae": b["mae"], "rmsle": b["rmsle"],
             "hit_rate": b["hit_rate"]} for b in baseline_rows]
    return out


def status(study: optuna.Study, promos: list[dict]) -> dict:
    from .report import baseline_rows, trial_rows
    from .study import best_trial, baselines

    best = best_trial(study)
    return {"study": study.study_name, "objective": study.user_attrs.get("objective", "mae"),
            "direction": study.direction.name.lower(),
            "best_trial": best.number if best else None,
            "verdict": (fmt.verdict(study.user_attrs.get("objective", "mae"), study.direction.name == "MAXIMIZE",
                                    best.value, baselines(study)) if best else None),
            "leaderboard": leaderboard_records(trial_rows(study), baseline_rows(study)),
            "promotions": [promotion_record(p) for p in promos]}


def promotion_record(p: dict) -> dict:
    return {"trial": p["trial_number"], "checkpoint_step": p.get("checkpoint_step"), "kind": p.get("kind"),
            "target": p["target"], "revision": p.get("revision"), "tag": p.get("tag"),
            "created_at": p.get("created_at")}


def best(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    return {"study": study.study_name, "objective": study.user_attrs.get("objective", "mae"),
            "number": trial.number, "value": trial.value, "params": fmt.user_params(trial.params),
            "duration_s": fmt.trial_duration(trial), "attrs": dict(trial.user_attrs)}


def best_rows(record: dict) -> list[dict]:
    """`tuner best --format csv`: one key/value row per parameter and attribute, as the table lists them."""
    rows = [{"kind": "trial", "key": k, "value": record[k]} for k in ("number", "value", "duration_s")]
    rows += [{"kind": "param", "key": k, "value": v} for k, v in sorted(record["params"].items())]
    rows += [{"kind": "attr", "key": k, "value": v} for k, v in sorted(record["attrs"].items())]
    return rows


def report(rep) -> dict:
    imp = rep.importances
    return {"study": rep.study, "objective": rep.objective, "direction": rep.direction, "states": rep.states,
            "leaderboard": leaderboard_records(rep.leaderboard, rep.baselines),
            "importances": {"evaluator": imp.evaluator, "trials": imp.trials, "values": imp.values,
                            "note": imp.note},
            "best": rep.best,
            "charts": [{"name": c.name, "title": c.title, "drawn": c.png is not None, "note": c.note}
                       for c in rep.charts]}


def report_rows(record: dict) -> list[dict]:
    """`tuner report --format csv`: the leaderboard rows, then one row per parameter importance."""
    imp = record["importances"]
    return record["leaderboard"] + [{"kind": "importance", "name": k, "importance": v,
                                     "evaluator": imp["evaluator"], "trials": imp["trials"]}
                                    for k, v in imp["values"].items()]


# ---------------------------------------------------------------------------------------------------------------
# tuner export


def trial_records(study: optuna.Study) -> list[dict]:
    """Every trial, one flat record: number, state, value, the parameters (sampled or fixed, as `param_*`), the
    metrics, duration and times, why it failed or was pruned."""
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = fmt.trial_row(t, None)
        rec: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value}
        params = {"model": row["model"], "r": row["r"], "alpha": row["alpha"], "dropout": row["dropout"],
                  "target_set": row["targets"], "quant_bits": row["bits"], "learning_rate": row["learning_rate"],
                  "use_rslora": a.get("use_rslora")}
        params.update(fmt.user_params(t.params))
        params.pop("target_modules", None)  # the set's name, already `target_set`
        rec.update({f"param_{k}": v for k, v in params.items()})
        rec.update({m: a.get(m) for m in METRICS})
        rec.update({"duration_s": fmt.trial_duration(t), "datetime_start": t.datetime_start,
                    "datetime_complete": t.datetime_complete, "steps": a.get("steps"),
                    "fail_reason": a.get("fail_reason"), "pruned_at_step": a.get("pruned_at_step"),
                    "retry_of": a.get("retry_of"), "note": row["note"]})
        out.append(clean(rec))
    return out


def export(study: optuna.Study, out: str | Path) -> Path:
    """Write every trial to `out` (.csv or .parquet, told by the suffix). Returns the path written."""
    path = Path(out).expanduser()
    if path.suffix not in EXPORT_SUFFIXES:
        raise TunerError(f"--out {out}: expected a file name ending in {' or '.join(EXPORT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise TunerError(f"--out {out}: the folder {path.parent} does not exist")
    records = trial_records(study)
    if path.suffix == ".csv":
        path.write_text(to_csv(records) if records else "number,state,value\n")
        return path
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    for col in ("datetime_start", "datetime_complete"):
        if col in frame:
            frame[col] = pd.to_datetime(frame[col])
    try:
        frame.to_parquet(path, index=False)
    except ImportError as exc:  # pandas writes parquet through pyarrow (installed with datasets)
        raise TunerError(f"--out {out}: cannot write parquet here ({exc}); write a .csv instead") from None
    return path
