"""Command line: `tuner run | status | best | ...`. Flags, exit codes and what the terminal shows.

Exit codes: 0 done, 1 a trial or command failed unexpectedly, 2 bad input (sweep file, storage, arguments; always
before any model is loaded), 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import TunerError

# Piped output (CI logs, `| tee`) gets room for the whole trials table instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def _duration_arg(text: str) -> float:
    from .config import _duration

    try:
        return _duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fmt_money(v) -> str:
    return "-" if v is None else f"${v:,.0f}"


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def _fmt_secs(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# Progress while a worker runs


class RichReporter:
    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 transient=True)
        self.tasks: dict[int, int] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def message(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/dim]")

    def trial_started(self, number, params, total_steps, note):
        desc = (f"trial {number}: r={params.r} alpha={params.alpha:g} {params.target_set} {params.quant_bits}-bit "
                f"lr={params.learning_rate:.2g}")
        self.progress.console.print(f"[bold]{desc}[/bold]  {total_steps} steps" + (f" ({note})" if note else ""))
        self.tasks[number] = self.progress.add_task(desc, total=total_steps, info="")

    def trial_step(self, number, record, total_steps):
        task = self.tasks.get(number)
        if task is not None:
            self.progress.update(task, completed=record["step"],
                                 info=f"loss {record['loss']:.3f}  {record['step_seconds']:.1f}s/step")

    def trial_ended(self, number, state, attrs):
        task = self.tasks.pop(number, None)
        if task is not None:
            self.progress.remove_task(task)
        dur = _fmt_secs(attrs.get("duration_s"))
        if state == "COMPLETE":
            line = (f"[green]trial {number} COMPLETE[/green]  MAE {_fmt_money(attrs.get('mae'))}  "
                    f"RMSLE {_fmt(attrs.get('rmsle'))}  hits {_fmt(attrs.get('hit_rate'), '.0%')}  ({dur})")
        elif state == "PRUNED":
            line = f"[yellow]trial {number} PRUNED[/yellow] at step {attrs.get('pruned_at_step')}  ({dur})"
        elif state == "INTERRUPTED":
            line = (f"[yellow]trial {number} stopped[/yellow]: checkpoint at step {attrs.get('checkpoint_step')}; "
                    f"it will resume on the next `tuner run`")
        else:
            line = f"[red]trial {number} FAILED[/red] ({attrs.get('fail_reason')}): {attrs.get('fail_detail', '')}"
        self.progress.console.print(line)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def trials_table(study, title: str | None = None) -> Table:
    from .study import baselines, trial_rows

    objective = study.user_attrs.get("objective", "mae")
    table = Table(title=title or f"study {study.study_name} (objective: {objective}, "
                                 f"{study.direction.name.lower()})", show_lines=False)
    for col in ("#", "state", "r", "alpha", "dropout", "targets", "bits", "lr", "MAE", "RMSLE", "hits", "time",
                "note"):
        table.add_column(col, justify="right" if col not in ("state", "targets", "note") else "left")
    for row in trial_rows(study):
        a, p = row.attrs, row.params
        note = ""
        if row.state == "FAIL":
            note = str(a.get("fail_reason", ""))
        elif row.state == "PRUNED":
            note = f"pruned at step {a.get('pruned_at_step', '?')}"
        if a.get("resumed_from_step"):
            note = (note + " " if note else "") + f"resumed from step {a['resumed_from_step']}"
        if a.get("promoted"):
            note = (note + " " if note else "") + "promoted"
        if a.get("overfit_epochs"):
            note = (note + " " if note else "") + "overfit"
        state = row.state + (" *" if row.is_best else "")
        style = "bold green" if row.is_best else None
        table.add_row(str(row.number), state, _fmt(a.get("r")), _fmt(a.get("alpha"), "g"),
                      _fmt(p.get("dropout", a.get("dropout")), ".3f") if "dropout" in p else "fixed",
                      str(a.get("target_set", p.get("target_modules", "-"))),
                      str(p.get("quant_bits", "fixed")),
                      _fmt(p.get("learning_rate"), ".2e") if "learning_rate" in p else "fixed",
                      _fmt_money(a.get("mae")), _fmt(a.get("rmsle"), ".3f"), _fmt(a.get("hit_rate"), ".0%"),
                      _fmt_secs(row.duration_s), note, style=style)
    for key, m in sorted(baselines(study).items()):
        label = {"median": "baseline: train median"}.get(key, f"baseline: {key.replace('_', ' ')}")
        table.add_row("", label, "", "", "", "", "", "", _fmt_money(m.get("mae")), _fmt(m.get("rmsle"), ".3f"),
                      _fmt(m.get("hit_rate"), ".0%"), "", "", style="dim")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_run(args) -> int:
    from .config import load_config
    from .storage import mask_url
    from .worker import WorkerOptions, run_worker

    cfg = load_config(args.sweep)
    if args.workers and args.workers > 1:
        from .launch import launch_workers

        return launch_workers(args)
    opts = WorkerOptions(storage_url=args.storage, study_name=args.study, trials=args.trials, timeout=args.timeout,
                         device=args.device, force=args.force)
    name = args.study or cfg.study.name
    console.print(f"study [bold]{name}[/bold] in {mask_url(args.storage)}; budget "
                  f"{args.trials or cfg.study.trials} trials; sweep {args.sweep}")
    t0 = time.time()
    with RichReporter() as reporter:
        report = run_worker(cfg, opts, reporter)
    from .storage import open_storage
    from .study import load_study

    study = load_study(open_storage(args.storage), name)
    console.print(trials_table(study, title=f"leaderboard: {name}"))
    _print_verdict(study)
    console.print(f"this worker ran {len(report.ran)} trial(s) in {_fmt_secs(time.time() - t0)}")
    if report.interrupted:
        console.print("[yellow]stopped by a signal; run the same command again to resume[/yellow]")
        return 130
    return 0


def _print_verdict(study) -> None:
    from .study import baselines, best_trial

    best = best_trial(study)
    base = baselines(study)
    if best is None:
        console.print("no COMPLETE trial yet")
        return
    obj = study.user_attrs.get("objective", "mae")
    parts = [f"best: trial {best.number}, {obj} {_fmt(best.value, ',.4g')}"]
    for key, m in sorted(base.items()):
        if obj in m:
            better = best.value < m[obj] if study.direction.name == "MINIMIZE" else best.value > m[obj]
            parts.append(f"{'beats' if better else 'does NOT beat'} {key.replace('_', ' ')} ({_fmt(m[obj], ',.4g')})")
    console.print("; ".join(parts))


def cmd_status(args) -> int:
    from .storage import open_storage, promotions
    from .study import load_study

    storage = open_storage(args.storage)
    study = load_study(storage, args.study)
    console.print(trials_table(study))
    _print_verdict(study)
    promos = promotions(storage.engine, study.study_name)
    for p in promos:
        console.print(f"promoted: trial {p['trial_number']} -> {p['target']}"
                      + (f" @ {p['revision'][:12]}" if p.get("revision") else "")
                      + (f" (checkpoint {p['checkpoint_step']})" if p.get("checkpoint_step") else ""))
    return 0


def cmd_best(args) -> int:
    import json

    from .storage import open_storage
    from .study import best_trial, load_study

    study = load_study(open_storage(args.storage), args.study)
    best = best_trial(study)
    if best is None:
        raise TunerError(f"study {study.study_name!r} has no COMPLETE trial yet")
    console.print(f"[bold]study {study.study_name}: best trial {best.number}[/bold] "
                  f"({study.user_attrs.get('objective', 'mae')} = {_fmt(best.value, ',.4g')})")
    table = Table(show_header=False)
    table.add_column("key")
    table.add_column("value")
    for k, v in sorted(best.params.items()):
        table.add_row(f"param {k}", str(v))
    for k, v in sorted(best.user_attrs.items()):
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .storage import DEFAULT_STORAGE

    default_storage = os.environ.get("TUNER_STORAGE", DEFAULT_STORAGE)
    p = argparse.ArgumentParser(prog="tuner", description="LoRA/QLoRA sweeps for price prediction")
    sub = p.add_subparsers(dest="command", required=True)

    def storage_arg(sp):
        sp.add_argument("--storage", default=default_storage,
                        help=f"SQLAlchemy URL of the study storage (default {default_storage})")

    r = sub.add_parser("run", help="create or resume a study and run trials")
    r.add_argument("sweep", help="sweep YAML file")
    r.add_argument("--trials", type=int, help="global trial budget for the study (all workers together)")
    r.add_argument("--timeout", type=_duration_arg, help="stop starting trials after this long (90s, 30m, 2h)")
    r.add_argument("--study", help="study name (overrides the sweep file)")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    r.add_argument("--force", action="store_true", help="run even if the study's search space differs")
    r.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    r.add_argument("--gpus", help="comma-separated GPU ids; workers are pinned round-robin")
    storage_arg(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="trials table with metrics and baselines")
    s.add_argument("study", nargs="?")
    storage_arg(s)
    s.set_defaults(func=cmd_status)

    b = sub.add_parser("best", help="the best trial in full")
    b.add_argument("study", nargs="?")
    storage_arg(b)
    b.set_defaults(func=cmd_best)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TunerError as exc:
        for line in str(exc).splitlines():
            err_console.print(f"[red]error:[/red] {line}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]stopped at once; the storage is consistent (trials handed back for retry)[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
