"""The Python API, for notebooks and scripts: `tuner.run`, `tuner.load`, `tuner.predict`.

The same machinery as the CLI (`worker.run_worker`, `study.load_study`, `predict.load`), returning typed objects
instead of printing tables. Each call runs inside `quiet.scoped()`: library chatter is turned down while it runs
and every environment variable, warning filter and logger level is the caller's again afterwards. Errors are
`tuner.errors.TunerError` with the same one-line messages the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import TunerError

DEFAULT_STORAGE = "sqlite:///studies.db"


@dataclass(frozen=True)
class Trial:
    """One trial as `tuner status` shows it: every parameter (sampled or fixed, `r` never `r_exp`), its metrics
    on the test rows, its one duration, and why it ended if it did not complete."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # the study objective
    params: dict[str, Any]
    metrics: dict[str, Any]  # mae, rmsle, hit_rate, parse_fail_rate (None where not scored)
    duration_s: float | None
    note: str
    adapter_path: Path | None  # the kept adapter on this machine (None once `tuner clean` removed it)
    attrs: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Study:
    name: str
    storage: str
    objective: str
    direction: str  # minimize | maximize
    trials: list[Trial]
    baselines: dict[str, dict]  # key -> {mae, rmsle, hit_rate}: median, classical, base model
    best: Trial | None

    @property
    def best_adapter(self) -> Path | None:
        """The best trial's kept adapter folder on this machine (peft's files and `tuner.json`): give it to
        `tuner.predict`, `PeftModel.from_pretrained`, or `tuner promote`."""
        return self.best.adapter_path if self.best else None


@dataclass(frozen=True)
class RunResult:
    study: Study
    ran: list[int]  # trial numbers this call trained
    interrupted: bool
    seconds: float


def _config(sweep: Any, overrides: Sequence[str]):
    from .config import SweepConfig, load_config, parse_config

    if isinstance(sweep, SweepConfig):
        if overrides:
            raise TunerError("overrides apply to a sweep file or mapping, not to a SweepConfig")
        return sweep
    if isinstance(sweep, dict):
        from . import overrides as ov

        data = ov.apply(sweep, overrides, [k for k in SweepConfig.model_fields if k != "source_file"])
        return parse_config(data, "<dict>")
    if isinstance(sweep, (str, Path)):
        return load_config(sweep, list(overrides))
    raise TunerError(f"sweep: expected a path, a mapping or a SweepConfig, got {type(sweep).__name__}")


def run(sweep: Any, *, trials: int | None = None, storage: str = DEFAULT_STORAGE, study: str | None = None,
        overrides: Iterable[str] = (), timeout: float | None = None, deadline: float | None = None,
        device: str | None = None, force: bool = False) -> RunResult:
    """Create or resume the study of `sweep` (a YAML path, a mapping shaped like the file, or a `SweepConfig`)
    and run trials until its budget (`trials`, else the sweep's `study.trials`) is spent, or its `timeout` or
    `deadline` (seconds; else the sweep's) says no new trial may start. `overrides`: the CLI's `--set KEY=VALUE`
    items."""
    from .quiet import scoped

    with scoped():
        from .worker import WorkerOptions, run_worker

        cfg = _config(sweep, list(overrides))
        opts = WorkerOptions(storage_url=storage, study_name=study, trials=trials, timeout=timeout,
                             deadline=deadline, device=device, force=force)
        report = run_worker(cfg, opts)
        loaded = _load(report.study_name, storage)
    return RunResult(study=loaded, ran=list(report.ran), interrupted=report.interrupted, seconds=report.seconds)


def load(study: str | None = None, storage: str = DEFAULT_STORAGE) -> Study:
    """A study read back: typed trials, its baselines, the best trial and its adapter's path."""
    from .quiet import scoped

    with scoped():
        return _load(study, storage)


def _load(name: str | None, storage: str) -> Study:
    from . import fmt
    from .export import METRICS
    from .storage import open_storage
    from .study import baselines, best_trial, load_study

    st = load_study(open_storage(storage), name)
    best = best_trial(st)
    trials = []
    for t in st.get_trials(deepcopy=False):
        row = fmt.trial_row(t, best.number if best else None)
        params = {"model": row["model"], "r": row["r"], "alpha": row["alpha"], "dropout": row["dropout"],
                  "target_set": row["targets"], "quant_bits": row["bits"], "learning_rate": row["learning_rate"]}
        params.update({k: v for k, v in fmt.user_params(t.params).items() if k != "target_modules"})
        kept = t.user_attrs.get("adapter_path")
        trials.append(Trial(number=t.number, state=t.state.name, value=t.value, params=params,
                            metrics={m: t.user_attrs.get(m) for m in METRICS}, duration_s=fmt.trial_duration(t),
                            note=row["note"],
                            adapter_path=Path(kept) if kept and Path(kept).is_dir() else None,
                            attrs=dict(t.user_attrs)))
    by_number = {t.number: t for t in trials}
    return Study(name=st.study_name, storage=storage, objective=st.user_attrs.get("objective", "mae"),
                 direction=st.direction.name.lower(), trials=trials, baselines=baselines(st),
                 best=by_number[best.number] if best else None)


def predict(adapter: str | Path, texts: str | Sequence[str], *, revision: str | None = None,
            base: str | None = None, device: str | None = None) -> list[float | None]:
    """Prices for `texts` from an adapter folder or Hub repository (as `tuner predict`); None where the model
    answered no number. Loads the base each call: keep `tuner.inference.load(...)` for many calls."""
    from .quiet import scoped

    if isinstance(texts, str):
        texts = [texts]
    with scoped():
        from .inference import load as load_predictor

        predictor = load_predictor(str(adapter), revision=revision, base=base, device=device)
        return [p.value for p in predictor.predict(list(texts))]
