"""A study's report: leaderboard with the baselines, parameter importances, optimisation history, intermediate
values and the best trial's scatter chart.

`build` reads everything from the study (and the best trial's chart from the artifact store) into a `Report`;
`write_html` renders it as one self-contained HTML file (images embedded) plus the PNGs beside it. The CLI prints
the same tables to a terminal.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from . import artifacts
from .artifacts import ArtifactError
from .fmt import LEFT_COLUMNS, baseline_cells, baseline_row, columns, param_name, row_cells, trial_row, user_params
from .study import baselines, best_trial


@dataclass
class Chart:
    name: str  # file name without .png
    title: str
    png: bytes | None
    note: str = ""  # why there is no chart, or what to know about it


@dataclass
class Importances:
    values: dict[str, float]  # parameter -> importance, largest first; empty when it could not be computed
    trials: int  # COMPLETE trials the evaluator looked at
    evaluator: str
    note: str = ""


@dataclass
class Report:
    study: str
    objective: str
    direction: str
    created: str
    states: dict[str, int]
    leaderboard: list[dict]
    baselines: list[dict]
    importances: Importances
    best: dict | None
    charts: list[Chart] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Reading the study


def trial_rows(study: optuna.Study) -> list[dict]:
    """Every trial's leaderboard row (`fmt.trial_row`), by number."""
    best = best_trial(study)
    return [trial_row(t, best.number if best else None) for t in study.get_trials(deepcopy=False)]


def leaderboard(study: optuna.Study) -> list[dict]:
    """COMPLETE trials best first, then the others by number."""
    rows = trial_rows(study)
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: sign * r["value"])
    return done + [r for r in rows if r["state"] != "COMPLETE"]


def baseline_rows(study: optuna.Study) -> list[dict]:
    return [baseline_row(key, m) for key, m in sorted(baselines(study).items())]


def importances(study: optuna.Study) -> Importances:
    """Optuna's default evaluator over the COMPLETE trials; with fewer than two there is nothing to compare. A
    `study.extend` trial is left out: its value is its parent's settings trained on more rows, not those settings'."""
    ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in ended if t.user_attrs.get("extends") is None]
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    name = type(evaluator).__name__
    if len(complete) < 2:
        return Importances({}, len(complete), name, f"needs at least 2 COMPLETE trials, the study has {len(complete)}"
                           + (" besides its study.extend trials" if len(ended) > len(complete) else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            level = optuna.logging.get_verbosity()  # no "A new study created in memory" line in the report
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            try:
                view = optuna.create_study(directions=study.directions)
            finally:
                optuna.logging.set_verbosity(level)
            view.add_trials(complete)
            values = optuna.importance.get_param_importances(view, evaluator=evaluator)
    except (ValueError, RuntimeError) as exc:
        return Importances({}, len(complete), name, f"not computed: {exc}")
    note = "few trials: treat these as a hint, not a finding" if len(complete) < 10 else ""
    return Importances({param_name(k): v for k, v in values.items()}, len(complete), name, note)


def build(study: optuna.Study, store=None, store_problem: str = "no artifact store given") -> Report:
    """`store_problem`: why `store` is None, said where the best trial's chart would be."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    best = best_trial(study)
    report = Report(study=study.study_name, objective=study.user_attrs.get("objective", "mae"),
                    direction=study.direction.name.lower(), created=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    states=states, leaderboard=leaderboard(study), baselines=baseline_rows(study),
                    importances=importances(study),
                    best=None if best is None else {"number": best.number, "value": best.value,
                                                    "params": user_params(best.params),
                                                    "attrs": {k: v for k, v in best.user_attrs.items()}})
    report.charts = [history_chart(study, report), intermediate_chart(study, report),
                     importance_chart(report), best_scatter(study, best, store, store_problem)]
    return report


# ---------------------------------------------------------------------------------------------------------------
# Charts


def _figure(w=7.0, h=4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def history_chart(study: optuna.Study, report: Report) -> Chart:
    from matplotlib.ticker import MaxNLocator

    title = f"optimisation history ({report.objective})"
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return Chart("history", title, None, "no COMPLETE trial yet")
    done.sort(key=lambda t: t.number)
    better = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    running, best_so_far = [], None
    for t in done:
        best_so_far = t.value if best_so_far is None else better(best_so_far, t.value)
        running.append(best_so_far)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([t.number for t in done], [t.value for t in done], "o", color="#1f77b4", label="trial")
    ax.step([t.number for t in done], running, where="post", color="#d62728", label="best so far")
    for i, b in enumerate(report.baselines):
        v = b.get(report.objective)
        if v is not None and math.isfinite(v):
            ax.axhline(v, color=["#7f7f7f", "#bcbd22", "#17becf", "#9467bd"][i % 4], linestyle="--", linewidth=1,
                       label=f"baseline: {b['label']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(report.objective)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, alpha=0.3)
    return Chart("history", title, _png(fig))


def intermediate_chart(study: optuna.Study, report: Report) -> Chart:
    from matplotlib.ticker import MaxNLocator

    title = f"validation {report.objective} during training"
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if not trials:
        return Chart("intermediate", title, None, "no intermediate values (set train.eval_every to evaluate while "
                                                  "training)")
    fig = _figure()
    ax = fig.add_subplot()
    for t in trials:
        steps = sorted(t.intermediate_values)
        style = {"PRUNED": ":", "FAIL": "--"}.get(t.state.name, "-")
        ax.plot(steps, [t.intermediate_values[s] for s in steps], style, marker=".",
                label=f"trial {t.number} ({t.state.name.lower()})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {report.objective}")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, alpha=0.3)
    return Chart("intermediate", title, _png(fig))


def importance_chart(report: Report) -> Chart:
    imp = report.importances
    title = f"parameter importances ({imp.evaluator}, {imp.trials} COMPLETE trials)"
    if not imp.values:
        return Chart("importances", title, None, imp.note)
    names = list(imp.values)[::-1]
    fig = _figure(7, 0.6 * len(names) + 1.5)
    ax = fig.add_subplot()
    ax.barh(names, [imp.values[n] for n in names], color="#1f77b4")
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(title, fontsize=10)
    return Chart("importances", title, _png(fig), imp.note)


def best_scatter(study: optuna.Study, best, store, store_problem: str) -> Chart:
    if best is None:
        return Chart("best-scatter", "best trial: test predictions", None, "no COMPLETE trial yet")
    title = f"best trial ({best.number}): test predictions"
    if store is None:
        return Chart("best-scatter", title, None, store_problem)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = artifacts.fetch(store, best, artifacts.SCATTER_ATTR, Path(tmp) / "scatter.png")
        except ArtifactError as exc:
            return Chart("best-scatter", title, None, str(exc))
        return Chart("best-scatter", title, path.read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.best td { font-weight: bold; background: #eef8ee; } tr.baseline td { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 0.9rem; }
"""


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None, left=()) -> str:
    head = "".join(f'<th class="{"l" if i in left else ""}">{html.escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for j, r in enumerate(rows):
        cls = f' class="{classes[j]}"' if classes and classes[j] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i in left else ""}">{html.escape(c)}</td>'
                                            for i, c in enumerate(r)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Report) -> str:
    with_model = any(r["model_sampled"] for r in report.leaderboard)
    headers = columns(with_model)
    rows = [row_cells(r, with_model) for r in report.leaderboard] + [baseline_cells(b, with_model)
                                                                     for b in report.baselines]
    classes = ["best" if r["best"] else "" for r in report.leaderboard] + ["baseline"] * len(report.baselines)
    states = ", ".join(f"{n} {s}" for s, n in sorted(report.states.items()))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tuner report: {html.escape(report.study)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Study {html.escape(report.study)}</h1>",
             f"<p>objective: {html.escape(report.objective)} ({report.direction}); trials: {html.escape(states)}; "
             f"report made {report.created}</p>"]
    if report.best:
        b = report.best
        parts.append(f"<p>best: trial {b['number']}, {report.objective} {b['value']:,.4g}</p>")
    left = {i for i, h in enumerate(headers) if h in LEFT_COLUMNS}
    parts += ["<h2>Leaderboard</h2>", _table(headers, rows, classes, left=left)]
    imp = report.importances
    parts.append(f"<h2>Parameter importances</h2><p class='note'>{html.escape(imp.evaluator)} (Optuna's default "
                 f"evaluator) over {imp.trials} COMPLETE trial(s). {html.escape(imp.note)}</p>")
    if imp.values:
        parts.append(_table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp.values.items()],
                            left={0}))
    for chart in report.charts:
        parts.append(f"<h2>{html.escape(chart.title[0].upper() + chart.title[1:])}</h2>")
        if chart.png is not None:
            data = base64.b64encode(chart.png).decode()
            parts.append(f"<img alt='{html.escape(chart.title)}' src='data:image/png;base64,{data}'>")
        if chart.note:
            parts.append(f"<p class='note'>{html.escape(chart.note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Report, out_dir: Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for chart in report.charts:
        if chart.png is not None:
            (out / f"{chart.name}.png").write_bytes(chart.png)
    index = out / "index.html"
    index.write_text(render_html(report))
    return index
