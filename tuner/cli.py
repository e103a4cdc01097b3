"""Command line: `tuner run | status | best | ...`. Flags, exit codes and what the terminal shows.

Exit codes: 0 done, 1 a trial or command failed unexpectedly, 2 bad input (sweep file, storage, arguments; always
before any model is loaded), 130 stopped by a signal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import fmt
from .errors import TunerError

# Piped output (CI logs, `| tee`) gets room for the whole trials table instead of rich's 80-column default.
console = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 160)


def _int_between(lo: int, hi: int):
    """An argparse type: an integer from lo to hi, or a one-line usage error that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            # Not echoed: a value given to the wrong flag may be a URL with a password.
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {value}")
        return value

    return parse


def _duration_arg(text: str) -> float:
    from .config import _duration

    try:
        return _duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    def warning(self, text: str) -> None:
        self.progress.console.print(f"[bold yellow]WARNING:[/bold yellow] [yellow]{text}[/yellow]", soft_wrap=True)

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
        dur = fmt.secs(attrs.get("duration_s"))
        if state == "COMPLETE":
            line = (f"[green]trial {number} COMPLETE[/green]  MAE {fmt.money(attrs.get('mae'))}  "
                    f"RMSLE {fmt.num(attrs.get('rmsle'))}  hits {fmt.pct(attrs.get('hit_rate'))}  ({dur})")
        elif state == "PRUNED":
            line = f"[yellow]trial {number} PRUNED[/yellow] at step {attrs.get('pruned_at_step')}  ({dur})"
        elif state == "INTERRUPTED":
            step = attrs.get("checkpoint_step")
            line = (f"[yellow]trial {number} stopped[/yellow]: checkpoint at step {step}; it will resume on the next "
                    f"`tuner run`" if step is not None else f"[yellow]trial {number} stopped[/yellow] before its "
                    f"first checkpoint; handed back, it starts again on the next `tuner run`")
        else:
            line = f"[red]trial {number} FAILED[/red] ({attrs.get('fail_reason')}): {attrs.get('fail_detail', '')}"
        self.progress.console.print(line)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def leaderboard_table(title: str, rows: list[dict], baseline_rows: list[dict]) -> Table:
    """The leaderboard as `tuner status`, `tuner run` and `tuner report` print it (report.leaderboard's rows)."""
    with_model = any(r["model_sampled"] for r in rows)  # one fixed model needs no column
    table = Table(title=title, show_lines=False)
    for col in fmt.columns(with_model):
        table.add_column(col, justify="left" if col in fmt.LEFT_COLUMNS else "right", no_wrap=col == "model")
    for r in rows:
        table.add_row(*fmt.row_cells(r, with_model), style="bold green" if r["best"] else None)
    for b in baseline_rows:
        table.add_row(*fmt.baseline_cells(b, with_model), style="dim")
    return table


def trials_table(study, title: str | None = None) -> Table:
    from .report import baseline_rows, trial_rows

    objective = study.user_attrs.get("objective", "mae")
    return leaderboard_table(title or f"study {study.study_name} (objective: {objective}, "
                                      f"{study.direction.name.lower()})", trial_rows(study), baseline_rows(study))


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_run(args) -> int:
    from .config import check_study_name, load_config
    from .storage import mask_url
    from .worker import WorkerOptions, run_worker

    cfg = load_config(args.sweep, args.set)
    check_study_name(args.study)
    if args.dry_run:
        return _dry_run(cfg, args)
    if args.workers and args.workers > 1:
        from .launch import launch_workers

        code = launch_workers(args)
        try:
            print_leaderboard(args.storage, args.study or cfg.study.name)
        except Exception as exc:  # the workers' own exit codes say what went wrong; the table is a courtesy
            console.print(f"(no leaderboard: {exc})")
        return code
    opts = WorkerOptions(storage_url=args.storage, study_name=args.study, trials=args.trials, timeout=args.timeout,
                         deadline=args.deadline, device=args.device, force=args.force, artifacts=args.artifacts)
    name = args.study or cfg.study.name
    console.print(f"study [bold]{name}[/bold] in {mask_url(args.storage)}; budget "
                  f"{args.trials or cfg.study.trials} trials; sweep {args.sweep}")
    # How test prices are read moves every number on the leaderboard: said before the first of them.
    console.print(f"test prices read as {fmt.readout(cfg.scoring.model_dump())}", markup=False, soft_wrap=True)
    t0 = time.time()
    with RichReporter() as reporter:
        report = run_worker(cfg, opts, reporter)
    console.print(f"this worker ran {len(report.ran)} trial(s) in {fmt.secs(time.time() - t0)}")
    if not os.environ.get("TUNER_PLAIN_OUTPUT"):  # launched by --workers: the launcher prints the leaderboard
        print_leaderboard(args.storage, name)
    return closing(report, args.storage, name)


def closing(report, storage_url: str, name: str) -> int:
    """The run's exit code, said in its last lines: 130 after a signal; 1 when this worker completed no trial and
    at least one of its trials failed (with the failures counted by reason); else 0."""
    from collections import Counter

    from .storage import open_storage
    from .study import load_study

    if report.interrupted:
        console.print("[yellow]stopped by a signal; run the same command again to resume[/yellow]")
        return 130
    failed = sorted(n for n, state in report.states.items() if state == "FAIL")
    if not failed or "COMPLETE" in report.states.values():
        return 0
    try:
        study = load_study(open_storage(storage_url, create=False), name)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        reasons = Counter(str(trials[n].user_attrs.get("fail_reason") or "unknown") if n in trials else "unknown"
                          for n in failed)
    except TunerError:  # the storage went away: the count still stands
        reasons = Counter({"unknown (storage unreachable)": len(failed)})
    counted = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common())
    console.print(f"[red]this worker completed no trial; {len(failed)} failed: {counted}[/red]", soft_wrap=True)
    return 1


def _dry_run(cfg, args) -> int:
    """`tuner run --dry-run`: the sweep file, the study name, the storage URL, the model and data names checked, and
    what a run would do printed; nothing is loaded, connected to or created."""
    from .space import space_signature
    from .storage import mask_url, parse_url

    parse_url(args.storage)
    name = args.study or cfg.study.name
    budget = args.trials or cfg.study.trials
    console.print(f"dry run: study {name} in {mask_url(args.storage)}; budget {budget} trials; "
                  f"{args.workers} worker(s); sweep {args.sweep}", markup=False, soft_wrap=True)
    console.print(f"model: {cfg.model.name}; data: {cfg.data.source} ({cfg.data.train_rows} train, "
                  f"{cfg.data.val_rows} validation, {cfg.data.test_rows} test rows); objective {cfg.study.objective} "
                  f"({cfg.study.direction}); sampler {cfg.study.sampler.type}; pruner {cfg.study.pruner.type}",
                  markup=False, soft_wrap=True)
    sig = space_signature(cfg)
    for key in ("r", "alpha", "target_modules", "dropout", "quant_bits", "learning_rate"):
        if key in sig:
            console.print(f"  {key}: {sig[key]}", markup=False, soft_wrap=True)
    for key, value in sig["train"].items():
        console.print(f"  train.{key}: {value}", markup=False, soft_wrap=True)
    for i, params in enumerate(cfg.study.enqueue):
        console.print(f"  first trial {i} (study.enqueue, if the study is new): "
                      + ", ".join(f"{k}={v}" if not isinstance(v, dict) else
                                  f"{k}={v.get('value')} at {v.get('at_steps')} steps (scaled to the data's steps)"
                                  for k, v in params.items()), markup=False, soft_wrap=True)
    console.print("nothing was loaded, connected to or created", markup=False)
    return 0


def print_leaderboard(storage_url: str, name: str) -> None:
    from .storage import open_storage
    from .study import load_study

    study = load_study(open_storage(storage_url, create=False), name)
    console.print(trials_table(study, title=f"leaderboard: {name}"))
    _print_fits(study)
    _print_verdict(study)


def _print_verdict(study) -> None:
    """The line a user reads last: the best trial against every baseline, strongest first."""
    from .study import baselines, best_trial

    best = best_trial(study)
    if best is None:
        console.print("no COMPLETE trial yet")
        return
    obj = study.user_attrs.get("objective", "mae")
    line = fmt.verdict(obj, study.direction.name == "MAXIMIZE", best.value, baselines(study))
    if best.user_attrs.get("collapsed"):  # its number would read as modest learning; it is not
        a = best.user_attrs
        line += (f"; its answers collapsed ({a.get('top_answer_share', 0):.0%} of the test rows got one price, "
                 f"{a.get('distinct_answers')} distinct)")
    console.print(f"[bold]{line}[/bold] (trial {best.number})", soft_wrap=True)


def _print_fits(study) -> None:
    """How the rows were fitted to each token budget the study used."""
    for key, fit in sorted(study.user_attrs.get("fits", {}).items()):
        model, _, _ = key.rpartition("@")
        name = "" if len(study.user_attrs.get("fits", {})) == 1 else f"{fmt.short_model(model)}: "
        console.print(f"data: {name}{fit.get('line', '')}", soft_wrap=True)
    budget = study.user_attrs.get("token_budget")
    if budget and budget["rows"] < budget["of"]:
        console.print(f"data: {budget['line']}", soft_wrap=True)


def cmd_data(args) -> int:
    from .config import load_config
    from .datasheet import build, render

    cfg = load_config(args.sweep, args.set)
    for line in render(build(cfg), cfg):
        console.print(line, soft_wrap=True, markup=False)
    return 0


def cmd_status(args) -> int:
    from .storage import open_storage, promotions
    from .study import load_study

    storage = open_storage(args.storage, create=False)
    study = load_study(storage, args.study)
    promos = promotions(storage.engine, study.study_name)
    if args.format != "table":
        from . import export

        record = export.status(study, promos)
        _emit(args.format, record, lambda: record["leaderboard"])
        return 0
    console.print(trials_table(study))
    _print_fits(study)
    _print_verdict(study)
    for p in promos:
        # A Hub commit id is shortened as git does; a local folder is shown whole (its "revision" is its path).
        where = (f" @ {p['revision'][:12]}" if p.get("kind") == "hub" and p.get("revision") else "")
        console.print(f"promoted: trial {p['trial_number']}"
                      + (f" checkpoint {p['checkpoint_step']}" if p.get("checkpoint_step") is not None else "")
                      + f" -> {p['target']}" + where
                      + (f" tag {p['tag']}" if p.get("tag") else "")
                      + f" ({p['created_at']:%Y-%m-%d %H:%M})", soft_wrap=True)
    return 0


def _emit(form: str, record, rows) -> None:
    """Machine-readable output on stdout, nothing else there: `record` as JSON, or `rows()` as CSV."""
    from . import export

    sys.stdout.write(export.dumps(record) if form == "json" else export.to_csv(rows()))
    sys.stdout.flush()


def cmd_best(args) -> int:
    import json

    from .storage import open_storage
    from .study import best_trial, load_study

    study = load_study(open_storage(args.storage, create=False), args.study)
    best = best_trial(study)
    if best is None:
        raise TunerError(f"study {study.study_name!r} has no COMPLETE trial yet")
    if args.format != "table":
        from . import export

        record = export.best(study, best)
        _emit(args.format, record, lambda: export.best_rows(record))
        return 0
    console.print(f"[bold]study {study.study_name}: best trial {best.number}[/bold] "
                  f"({study.user_attrs.get('objective', 'mae')} = {fmt.num(best.value, ',.4g')})")
    table = Table(show_header=False)
    table.add_column("key")
    table.add_column("value")
    for k, v in sorted(fmt.user_params(best.params).items()):
        table.add_row(f"param {k}", str(v))
    dur = fmt.trial_duration(best)
    table.add_row("duration", fmt.secs(dur) + (f" ({dur:.0f} s, start to recorded outcome)" if dur is not None
                                               else ""))
    for k, v in sorted(best.user_attrs.items()):
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard import create
    from .storage import mask_url, open_storage

    storage = open_storage(args.storage, create=False)
    board = create(storage, args.storage, host=args.host, port=args.port, artifacts_dir=args.artifacts,
                   writes=args.writes)
    console.print(f"optuna-dashboard for {mask_url(args.storage)} ({len(board.studies)} studies)")
    if board.exposed:
        err_console.print(f"[bold yellow]WARNING:[/] listening on {args.host}, not only on this machine: anyone who "
                          f"can reach the port sees every study, without a login"
                          + ("; read-only (--allow-writes to permit changes)" if board.read_only else
                             "; and can change or delete them (--allow-writes)"), soft_wrap=True, markup=True)
    if board.read_only:
        console.print("read-only: requests that would change a study are refused", markup=False)
    console.print(board.store_note, soft_wrap=True, markup=False)
    console.print(f"open {board.url}  (Ctrl-C to stop)", soft_wrap=True)
    sys.stdout.flush()
    board.serve()
    console.print("dashboard stopped")
    return 0


def cmd_report(args) -> int:
    from . import artifacts
    from .report import build, write_html
    from .storage import open_storage
    from .study import load_study

    study = load_study(open_storage(args.storage, create=False), args.study)
    store_dir = artifacts.location_for_studies([study], args.storage, args.artifacts)
    # With --format json|csv stdout is for scripts: the note goes to stderr.
    (console if args.format == "table" else err_console).print(artifacts.store_note([study], store_dir),
                                                              soft_wrap=True, markup=False)
    try:
        store, problem = artifacts.open_store(store_dir, create=False), ""
    except artifacts.ArtifactError as exc:  # the tables and charts from the database still make a report
        store, problem = None, str(exc)
    rep = build(study, store, problem)
    if args.format != "table":
        from . import export

        record = export.report(rep)
        if args.out:
            write_html(rep, args.out)  # the files; stdout stays machine-readable
        _emit(args.format, record, lambda: export.report_rows(record))
        return 0
    console.print(leaderboard_table(f"study {rep.study}: leaderboard (objective {rep.objective}, {rep.direction})",
                                    rep.leaderboard, rep.baselines))
    imp = rep.importances
    if imp.values:
        it = Table(title=f"parameter importances ({imp.evaluator}, over {imp.trials} COMPLETE trials)")
        it.add_column("parameter")
        it.add_column("importance", justify="right")
        for k, v in imp.values.items():
            it.add_row(k, f"{v:.3f}")
        console.print(it)
    console.print(f"parameter importances rest on {imp.trials} COMPLETE trial(s)" + (f": {imp.note}" if imp.note
                                                                                      else ""))
    for chart in rep.charts:
        if chart.png is None:
            console.print(f"[dim]{chart.title}: {chart.note}[/dim]")
    if args.out:
        index = write_html(rep, args.out)
        pngs = sorted(p.name for p in index.parent.glob("*.png"))
        console.print(f"wrote {index} and {', '.join(pngs) or 'no charts'}")
    return 0


def cmd_promote(args) -> int:
    from . import artifacts
    from .promote import promote
    from .storage import open_storage
    from .study import load_study

    storage = open_storage(args.storage, create=False)
    study = load_study(storage, args.study)
    store_dir = artifacts.location_for_studies([study], args.storage, args.artifacts)
    console.print(artifacts.store_note([study], store_dir), soft_wrap=True, markup=False)
    trial, pub = promote(storage, study, trial_number=args.trial, store_dir=store_dir, repo=args.repo, to=args.to,
                         public=args.public, message=args.revision_message, checkpoint=args.checkpoint)
    what = f"trial {trial.number}" + (f" (checkpoint at step {args.checkpoint})" if args.checkpoint is not None else "")
    if pub.kind == "hub":
        from .promote import checkpoint_tag

        tag = f", tag {checkpoint_tag(trial.number, args.checkpoint)}" if args.checkpoint is not None else ""
        console.print(f"promoted {what} of study {study.study_name} to {pub.url} "
                      f"({'private' if pub.private else 'public'}), commit {pub.revision}{tag}", soft_wrap=True)
    else:
        console.print(f"promoted {what} of study {study.study_name} to {pub.target}", soft_wrap=True)
    return 0


def cmd_predict(args) -> int:
    from .inference import describe, load, read_rows, write_rows
    from .scoring import price_metrics

    if (args.description is None) == (args.file is None):
        raise TunerError("give a description or --file rows.csv (one of the two)")
    texts, prices = ([args.description], None) if args.file is None else read_rows(args.file, args.text_column,
                                                                                       args.price_column)
    predictor = load(args.adapter, revision=args.revision, base=args.base, device=args.device)
    console.print(f"[dim]adapter {predictor.source.describe()}: {describe(predictor.info)}[/dim]", soft_wrap=True)
    if predictor.note:
        console.print(f"[yellow]note:[/yellow] {predictor.note}", soft_wrap=True)
    preds = predictor.predict(texts)
    table = Table(show_header=True)
    table.add_column("#", justify="right")
    table.add_column("price", justify="right")
    if prices is not None:
        table.add_column("truth", justify="right")
    table.add_column("description")
    for i, (t, p) in enumerate(zip(texts, preds)):
        price = "no number" if p.value is None else f"${p.value:,.2f}"
        excerpt = " ".join(t.split())
        excerpt = excerpt if len(excerpt) <= 90 else excerpt[:89] + "…"
        table.add_row(str(i + 1), price, *([f"${prices[i]:,.2f}"] if prices is not None else []), excerpt)
    console.print(table)
    if prices is not None:
        m = price_metrics([p.value for p in preds], prices)
        console.print(f"MAE {fmt.money(m['mae'])}  RMSLE {fmt.num(m['rmsle'], '.3f')}  hits {fmt.pct(m['hit_rate'])}"
                      f"  parse failures {fmt.pct(m['parse_fail_rate'])}  (n={m['n']})")
    if args.out:
        console.print(f"wrote {write_rows(args.out, texts, preds, prices)}")
    return 0


def cmd_export(args) -> int:
    from .export import export
    from .storage import open_storage
    from .study import load_study

    study = load_study(open_storage(args.storage), args.study)
    path = export(study, args.out)
    console.print(f"wrote {len(study.get_trials(deepcopy=False))} trial(s) of study {study.study_name} to {path}",
                  soft_wrap=True)
    return 0


def cmd_clean(args) -> int:
    from .clean import clean
    from .storage import open_storage
    from .study import load_study

    study = load_study(open_storage(args.storage), args.study)
    done = clean(study, args.storage, runs=args.runs, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    console.print(f"run folders of study {study.study_name}: {done.folder} ({done.how})", soft_wrap=True)
    console.print(f"{verb} {len(done.removed)} run folder(s) of finished trials, {done.freed / 1e6:.1f} MB"
                  + (f"; kept {len(done.kept)} whose trial is running or waiting for a retry: "
                     + ", ".join(p.name for p in done.kept) if done.kept else ""), soft_wrap=True)
    return 0


def cmd_init(args) -> int:
    from .starter import write_starter

    path = write_starter(args.path, gpu=args.gpu, force=args.force)
    what = "the GPU recipe: Llama 3.1 8B, 4-bit" if args.gpu else "the CPU default: SmolLM2-135M on diamonds"
    console.print(f"wrote {path} ({what}); run it with `tuner run {path}`", soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import MAX_TRIALS
    from .storage import DEFAULT_STORAGE, mask_url

    default_storage = os.environ.get("TUNER_STORAGE", DEFAULT_STORAGE)
    from . import __version__

    p = argparse.ArgumentParser(prog="tuner", description="LoRA/QLoRA sweeps for price prediction")
    p.add_argument("--version", action="version", version=f"tuner {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def set_arg(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key, e.g. --set search.r=16 --set study.trials=8 (VALUE is YAML; "
                             "repeatable; validated like the file)")

    def format_arg(sp):
        sp.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="table for people (default); json or csv on stdout for scripts")

    def study_arg(sp):
        sp.add_argument("study", nargs="?", help="study name (default: the only study in the storage)")

    def storage_arg(sp):
        sp.add_argument("--storage", default=default_storage,
                        help=f"SQLAlchemy URL of the study storage (default: $TUNER_STORAGE, else {DEFAULT_STORAGE}; "
                             f"now {mask_url(default_storage)})")

    r = sub.add_parser("run", help="create or resume a study and run trials")
    r.add_argument("sweep", help="sweep YAML file (`tuner init` writes a starter)")
    set_arg(r)
    r.add_argument("--trials", type=_int_between(1, MAX_TRIALS),
                   help="global trial budget for the study (all workers together)")
    r.add_argument("--timeout", type=_duration_arg, help="stop starting trials after this long (90s, 30m, 2h)")
    r.add_argument("--deadline", type=_duration_arg, help="end by then: start a trial only while the longest one "
                                                          "seen so far would still end in time (15m, 2h)")
    r.add_argument("--study", help="study name (overrides the sweep file)")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    r.add_argument("--force", action="store_true", help="run even if the study's search space differs")
    r.add_argument("--dry-run", action="store_true", help="check the sweep file, names and storage URL and say what "
                                                           "would run; load, connect to and create nothing")
    r.add_argument("--workers", type=_int_between(1, 256), default=1, help="worker processes on this machine")
    r.add_argument("--gpus", help="comma-separated GPU ids; workers are pinned round-robin")
    r.add_argument("--artifacts", help="artifact store folder (default: the sweep's study.artifacts, else "
                                       "artifacts/ next to the SQLite file, ./artifacts for a database server)")
    storage_arg(r)
    r.set_defaults(func=cmd_run)

    dt = sub.add_parser("data", help="what a sweep will train on: rows, splits, token lengths and cutting, prices, "
                                     "baseline MAEs (before any training)")
    dt.add_argument("sweep", help="sweep YAML file")
    set_arg(dt)
    dt.set_defaults(func=cmd_data)

    s = sub.add_parser("status", help="trials table with metrics and baselines")
    study_arg(s)
    format_arg(s)
    storage_arg(s)
    s.set_defaults(func=cmd_status)

    b = sub.add_parser("best", help="the best trial in full")
    study_arg(b)
    format_arg(b)
    storage_arg(b)
    b.set_defaults(func=cmd_best)

    def artifacts_arg(sp):
        sp.add_argument("--artifacts", help="artifact store folder (default: artifacts/ next to the SQLite file, "
                                            "./artifacts for a database server; a path recorded in the database "
                                            "is never used)")

    d = sub.add_parser("dashboard", help="optuna-dashboard on the storage, with the trials' artifacts")
    d.add_argument("--port", type=_int_between(0, 65535), default=8080,
                   help="port (default 8080; 0 picks a free one)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w = d.add_mutually_exclusive_group()
    w.add_argument("--read-only", dest="writes", action="store_const", const=False, default=None,
                   help="refuse every request that would change a study (the default off 127.0.0.1)")
    w.add_argument("--allow-writes", dest="writes", action="store_const", const=True,
                   help="permit changes (notes, tells, deletions) on any address")
    storage_arg(d)
    artifacts_arg(d)
    d.set_defaults(func=cmd_dashboard)

    rp = sub.add_parser("report", help="leaderboard, importances, history and the best trial's chart")
    study_arg(rp)
    rp.add_argument("--out", help="write index.html (images embedded) and the PNGs to this folder")
    format_arg(rp)
    storage_arg(rp)
    artifacts_arg(rp)
    rp.set_defaults(func=cmd_report)

    pr = sub.add_parser("promote", help="publish a trial's adapter (with a model card) to the Hub or a folder")
    study_arg(pr)
    pr.add_argument("--trial", type=int, help="trial number (default: the best trial)")
    pr.add_argument("--repo", help="Hub repository OWNER/NAME")
    pr.add_argument("--to", help="write the folder here instead of uploading it")
    pr.add_argument("--public", action="store_true", help="create the Hub repository public (default: private)")
    pr.add_argument("--revision-message", help="commit message on the Hub")
    pr.add_argument("--checkpoint", type=int, metavar="STEP",
                    help="publish the trial's training checkpoint at this step instead of its kept adapter "
                         "(tagged trial-N-step-STEP on the Hub)")
    storage_arg(pr)
    artifacts_arg(pr)
    pr.set_defaults(func=cmd_promote)

    pd = sub.add_parser("predict", help="prices from a promoted adapter (Hub repository or folder)")
    pd.add_argument("description", nargs="?", help="a product description")
    pd.add_argument("--adapter", required=True, help="Hub repository OWNER/NAME or a local folder")
    pd.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    pd.add_argument("--base", help="base model to load instead of the one the adapter names (same architecture)")
    pd.add_argument("--file", help="CSV file with a text column (and optionally a price column)")
    pd.add_argument("--text-column", default="text", help="the --file column with the descriptions (default text)")
    pd.add_argument("--price-column", default="price",
                    help="the --file column with true prices, if any (default price): adds MAE, RMSLE and hits")
    pd.add_argument("--out", help="write the predictions to this CSV file")
    pd.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    pd.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="every trial (params, metrics, state, durations) to a .csv or .parquet file")
    study_arg(ex)
    ex.add_argument("--out", required=True, help="file to write: trials.csv or trials.parquet")
    storage_arg(ex)
    ex.set_defaults(func=cmd_export)

    cl = sub.add_parser("clean", help="remove the run folders (checkpoints, kept adapters) of finished trials on "
                                      "this machine; the study and its artifact store keep everything")
    study_arg(cl)
    cl.add_argument("--runs", help="the runs folder to clean (default: the one the study recorded, else runs/ "
                                   "beside the SQLite file)")
    cl.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    storage_arg(cl)
    cl.set_defaults(func=cmd_clean)

    it = sub.add_parser("init", help="write a starter sweep file with comments")
    it.add_argument("path", nargs="?", default="sweep.yaml", help="file to write (default sweep.yaml)")
    it.add_argument("--gpu", action="store_true",
                    help="the GPU recipe (Llama 3.1 8B, 4-bit NF4, the pricer data) instead of the CPU default")
    it.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    it.set_defaults(func=cmd_init)
    return p


def main(argv: list[str] | None = None) -> int:
    from .quiet import configure_cli

    configure_cli()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TunerError as exc:
        from rich.markup import escape

        for line in str(exc).splitlines():  # escaped: a message quotes user input, which may look like markup
            err_console.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        left = getattr(exc, "left_running", None)
        if left:  # the worker has said why, trial by trial
            err_console.print(f"[yellow]stopped at once; trial(s) {', '.join(map(str, left))} could not be handed "
                              f"back and stay RUNNING until their heartbeat goes stale[/]", soft_wrap=True)
        else:
            err_console.print("[yellow]stopped at once; the storage is consistent (trials handed back for retry)[/]")
        _STOPPED_AT_ONCE.append(130)
        return 130


# A second Ctrl-C raises KeyboardInterrupt wherever the main thread is. Seen in 1 of 4 second Ctrl-Cs while the model
# loads (one core): `main` caught it and returned 130, yet the process died by SIGINT, as CPython ends it when it
# judges an interrupt unhandled (it does so for one that leaves code a C extension ran through PyRun_String; a
# `<string>` frame was seen there). The exit handler registered first runs last, after every other handler and
# after the threads are joined: it leaves with the code `main` returned.
_STOPPED_AT_ONCE: list[int] = []


def _leave_with_the_code() -> None:
    if _STOPPED_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_STOPPED_AT_ONCE[0])


def entry() -> None:
    """The `tuner` command and `python -m tuner.cli` (tests call `main` in their own process instead)."""
    import atexit

    atexit.register(_leave_with_the_code)
    sys.exit(main())


if __name__ == "__main__":
    entry()
