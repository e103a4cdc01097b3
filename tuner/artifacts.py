"""Per-trial artifacts in Optuna's artifact store: the adapter (a zip of its peft folder), the test predictions (CSV)
and a truth-vs-prediction scatter chart (PNG). optuna-dashboard shows them in its trial view; `tuner report`,
`tuner promote` and `tuner predict` read them back.

The store is a folder (Optuna's `FileSystemArtifactStore`): `--artifacts DIR` or `study.artifacts` in the sweep
file, else `artifacts/` next to the SQLite file, else `./artifacts` for a database server. A reader (`report`,
`promote`, `dashboard`) uses `--artifacts DIR` or that default, never a path read from the database: anyone who can
write the database could otherwise point a reader at any folder. Where a worker wrote is still recorded on the study
(user attribute `artifact_store`) as a hint, which a reader only mentions when it differs. A study folder copied
elsewhere (studies.db and artifacts/ beside it) therefore works as it is. A trial records its artifacts' ids as user
attributes (`adapter_artifact_id`, ...), the values a user looks up in the dashboard; an id is a plain file name
inside the store (Optuna's uuids), anything else is refused.

An adapter folder carries `tuner.json` beside peft's files: what the adapter was trained on and how it is prompted
and scored (base model and revision, quantization, prompt, price range, hyperparameters), so that it can be used
without the study that made it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import optuna
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import TunerError

STORE_ATTR = "artifact_store"
ADAPTER_ATTR = "adapter_artifact_id"
PREDICTIONS_ATTR = "predictions_artifact_id"
SCATTER_ATTR = "scatter_artifact_id"
CHECKPOINTS_ATTR = "checkpoints_artifact_id"  # one archive: step-000020/, step-000040/, ... each an adapter folder
CHECKPOINT_STEPS_ATTR = "checkpoint_steps"  # the steps in that archive
INFO_FILE = "tuner.json"
INFO_FORMAT = "tuner-adapter/1"
# What identifies a base model's architecture; an adapter only fits a base that agrees on all of them.
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")


class ArtifactError(TunerError):
    """An artifact a command needs is not recorded, or not in the store."""


# ---------------------------------------------------------------------------------------------------------------
# Where the store is


def default_location(storage_url: str) -> Path:
    from .storage import parse_url

    url = parse_url(storage_url)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().resolve().parent / "artifacts"
    return Path("artifacts").resolve()


def location(storage_url: str, configured: str | None = None) -> Path:
    return Path(configured).expanduser().resolve() if configured else default_location(storage_url)


def location_for_studies(studies: Sequence[optuna.Study | optuna.study.StudySummary], storage_url: str,
                         override: str | None = None) -> Path:
    """The store a reader uses: `override` (--artifacts), else the default beside the database. What the studies
    recorded is not used (see the module's docstring); `recorded_elsewhere` says when it differs."""
    if override:
        return Path(override).expanduser().resolve()
    return default_location(storage_url)


def recorded_elsewhere(studies: Sequence[optuna.Study | optuna.study.StudySummary], used: Path) -> list[str]:
    """The stores the studies say their worker wrote to, where they are not `used`: for a note, never for a read."""
    recorded = {str(s.user_attrs.get(STORE_ATTR)) for s in studies if s.user_attrs.get(STORE_ATTR)}
    return sorted(r for r in recorded if Path(r).expanduser().resolve() != Path(used).resolve())


def store_note(studies, used: Path) -> str:
    """One line for a reader: which store it reads, and where the worker said it wrote when that is elsewhere."""
    other = recorded_elsewhere(studies, used)
    line = f"artifacts: {used}"
    if other:
        line += (f" (the study records {', '.join(other)} as where its worker wrote; that path is not trusted: "
                 f"pass --artifacts DIR to read it)")
    return line


# Optuna names artifacts by uuid4; an id is one plain file name inside the store, nothing that could leave it.
_ARTIFACT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ConfinedStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file-system store that refuses, with an ArtifactError, an id that is not a plain file name or a
    file that resolves (through a link) outside the store. Ids come from the database, which is input too."""

    def _get_filepath(self, artifact_id: str) -> Path:
        check_artifact_id(artifact_id)
        path = Path(self._base_path) / artifact_id
        base = os.path.realpath(self._base_path)
        if os.path.commonpath([base, os.path.realpath(path)]) != base:
            raise ArtifactError(f"artifact {artifact_id}: resolves outside the artifact store {self._base_path}")
        return path


def check_artifact_id(artifact_id: object) -> str:
    if not isinstance(artifact_id, str) or not _ARTIFACT_ID.fullmatch(artifact_id) or ".." in artifact_id:
        raise ArtifactError(f"artifact id {str(artifact_id)[:80]!r} is not a valid artifact id (a plain file name "
                            f"in the store, as Optuna's uuids are)")
    return artifact_id


def open_store(path: Path, create: bool = True) -> ConfinedStore:
    """The store at `path`; a reader (`create=False`) is told when the folder is not there instead of making it."""
    path = Path(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise ArtifactError(f"artifact store {path} does not exist (--artifacts DIR names another)")
    return ConfinedStore(str(path))


# ---------------------------------------------------------------------------------------------------------------
# What an adapter folder says about itself


class AdapterInfo(BaseModel):
    """`tuner.json`: everything needed to use an adapter without its study."""

    model_config = ConfigDict(extra="forbid")

    format: str = INFO_FORMAT
    base_model: str
    base_revision: str | None = None
    base_fingerprint: dict[str, Any]
    quantization: dict[str, Any]
    question: str
    answer_prefix: str
    max_price: float
    scoring: dict[str, Any]
    params: dict[str, Any]
    data: dict[str, Any]
    study: str
    trial: int
    checkpoint_step: int | None = None  # set on a training checkpoint; None on the trial's kept adapter

    @field_validator("scoring")
    @classmethod
    def _scoring(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The file may come from anyone's Hub repository; the scorer sizes its work by these settings.
        from .config import ScoringSpec

        return ScoringSpec.from_record(v).model_dump()

    @property
    def bits(self) -> int:
        return int(self.quantization["bits"])

    def write(self, folder: Path) -> Path:
        path = Path(folder) / INFO_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: Path, where: str) -> "AdapterInfo":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{where}: cannot read {INFO_FILE} ({type(exc).__name__}: {exc})") from None
        if raw.get("format") != INFO_FORMAT:
            raise ArtifactError(f"{where}: {INFO_FILE} has format {raw.get('format')!r}, expected {INFO_FORMAT!r}")
        try:
            return cls(**raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ArtifactError(f"{where}: {INFO_FILE}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def adapter_info(cfg, splits, params, base, study_name: str, trial_number: int) -> AdapterInfo:
    """`tuner.json` for a trial's adapter, from the sweep config, the data splits, the trial's parameters and the
    loaded base it trained on."""
    from .models import describe_quantization

    return AdapterInfo(base_model=base.resolved.name, base_revision=base.resolved.revision,
                       base_fingerprint=base_fingerprint(base.model.config),
                       quantization=describe_quantization(base.bits, base.dtype), question=cfg.data.question,
                       answer_prefix=cfg.data.answer_prefix, max_price=splits.max_price,
                       scoring=cfg.scoring.model_dump(), params=params.to_dict(), data=splits.summary(),
                       study=study_name, trial=trial_number)


def base_fingerprint(config) -> dict[str, Any]:
    """The architecture facts of a transformers config that an adapter's shapes depend on."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d.get(k) for k in FINGERPRINT_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Predictions table and scatter chart


def prediction_rows(examples: Sequence, predictions: Sequence) -> list[dict]:
    """One row per test example: id, description excerpt, truth, prediction, error and colour. A prediction that
    is not a number is left empty and scored as 0, as the metrics do."""
    from .scoring import color_of

    rows = []
    for ex, p in zip(examples, predictions, strict=True):
        value = p.value
        scored = 0.0 if value is None else float(value)
        text = " ".join(ex.text.split())
        rows.append({"row_id": ex.row_id, "description": text if len(text) <= 100 else text[:99] + "…",
                     "truth": float(ex.price), "prediction": value, "error": abs(scored - ex.price),
                     "color": color_of(scored, ex.price), "decoded": p.text})
    return rows


PREDICTION_COLUMNS = ("row_id", "description", "truth", "prediction", "error", "color", "decoded")


def write_predictions_csv(rows: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PREDICTION_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "prediction": "" if r["prediction"] is None else f"{r['prediction']:g}",
                        "truth": f"{r['truth']:g}", "error": f"{r['error']:.2f}"})
    return path


def read_predictions_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        out = []
        for r in csv.DictReader(fh):
            out.append({**r, "row_id": int(r["row_id"]), "truth": float(r["truth"]), "error": float(r["error"]),
                        "prediction": float(r["prediction"]) if r["prediction"] else None})
        return out


COLORS = {"green": "#2ca02c", "orange": "#ff7f0e", "red": "#d62728"}
LEGEND = {"green": "hit: error < $40 or < 20%", "orange": "near: < $80 or < 40%", "red": "miss"}


def scatter_png(rows: Sequence[dict], metrics: dict, title: str, path: Path) -> Path:
    """Truth against prediction on log axes, coloured by the original evaluator's rule. Rows without a positive
    prediction cannot sit on a log axis; they are counted in the legend instead of being moved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [r for r in rows if r["prediction"] is not None and r["prediction"] > 0]
    for color in ("green", "orange", "red"):
        pts = [r for r in shown if r["color"] == color]
        if not pts:
            continue
        ax.scatter([r["truth"] for r in pts], [r["prediction"] for r in pts], s=18, c=COLORS[color],
                   label=f"{LEGEND[color]} ({len(pts)})", alpha=0.85, edgecolors="none")
    values = [r["truth"] for r in rows] + [r["prediction"] for r in shown]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="#888888", linewidth=1, linestyle="--", label="prediction = truth")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("true price ($)")
    ax.set_ylabel("predicted price ($)")
    hidden = len(rows) - len(shown)
    if hidden:
        ax.plot([], [], " ", label=f"not shown: {hidden} without a positive number")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"{title}\nMAE ${metrics['mae']:,.2f}   RMSLE {metrics['rmsle']:.3f}   "
                 f"hits {metrics['hit_rate']:.1%}   (n={len(rows)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Adapter archive


def zip_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return path


def unzip_folder(path: Path, dest: Path, what: str = "adapter archive") -> Path:
    dest = Path(dest)
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                # An archive from a shared store must not write outside its folder.
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ArtifactError(f"{what} {path}: unsafe member {name!r}")
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ArtifactError(f"{what} {path}: not a readable zip archive ({type(exc).__name__}: {exc})") from None
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Writing a trial's artifacts (the worker) and reading them back (the commands)


def save_trial_artifacts(trial: optuna.Trial, study: optuna.Study, store_dir: Path, adapter_dir: Path,
                         info: AdapterInfo, examples: Sequence, predictions: Sequence, metrics: dict) -> dict:
    """Write `tuner.json` into the adapter folder, upload the three artifacts, record the store on the study.
    Returns the trial user attributes that name the artifacts."""
    info.write(adapter_dir)
    store = open_store(store_dir)
    rows = prediction_rows(examples, predictions)
    n = trial.number
    with tempfile.TemporaryDirectory(prefix="tuner-artifacts-") as tmp:
        tmp = Path(tmp)
        files = {
            PREDICTIONS_ATTR: (write_predictions_csv(rows, tmp / f"trial-{n}-predictions.csv"), "text/csv"),
            SCATTER_ATTR: (scatter_png(rows, metrics, f"{study.study_name}, trial {n}: test set",
                                       tmp / f"trial-{n}-scatter.png"), "image/png"),
            ADAPTER_ATTR: (zip_folder(adapter_dir, tmp / f"trial-{n}-adapter.zip"), "application/zip"),
        }
        ids = upload_all(store, trial, files)
    if study.user_attrs.get(STORE_ATTR) != str(store_dir):
        study.set_user_attr(STORE_ATTR, str(store_dir))
    return ids


def upload_all(store, trial: optuna.Trial, files: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """Upload every file, or none: a failure part-way removes what this call already put in the store, so that a
    trial never leaves some of its artifacts behind (their ids are recorded only once all are there)."""
    ids: dict[str, str] = {}
    try:
        for attr, (path, mime) in files.items():
            ids[attr] = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path),
                                                         study_or_trial=trial, mimetype=mime)
    except BaseException:
        remove_all(store, ids.values())
        raise
    return ids


def remove_all(store, ids) -> None:
    """Remove these artifacts' files from the store; one already gone is no error."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    for aid in ids:
        try:
            store.remove(aid)
        except (ArtifactNotFound, OSError):
            pass


def artifact_id(trial: optuna.trial.FrozenTrial, attr: str) -> str:
    what = {ADAPTER_ATTR: "adapter", PREDICTIONS_ATTR: "predictions", SCATTER_ATTR: "scatter chart",
            CHECKPOINTS_ATTR: "checkpoints"}[attr]
    value = trial.user_attrs.get(attr)
    if not value:
        raise ArtifactError(f"trial {trial.number} has no {what} artifact recorded ({attr} is not set)")
    try:
        return check_artifact_id(value)
    except ArtifactError as exc:
        raise ArtifactError(f"trial {trial.number}: {attr}: {exc}") from None


def fetch(store, trial: optuna.trial.FrozenTrial, attr: str, dest: Path) -> Path:
    """Copy one of the trial's artifacts to `dest`; a clear error if the store lost it."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    aid = artifact_id(trial, attr)
    try:
        with store.open_reader(aid) as reader, open(dest, "wb") as writer:
            shutil.copyfileobj(reader, writer)
    except (ArtifactNotFound, IsADirectoryError, NotADirectoryError):
        Path(dest).unlink(missing_ok=True)
        raise ArtifactError(f"trial {trial.number}: artifact {aid} ({attr}) is missing from the artifact store "
                            f"{getattr(store, '_base_path', '')}") from None
    except ArtifactError as exc:
        Path(dest).unlink(missing_ok=True)
        raise ArtifactError(f"trial {trial.number}: {attr}: {exc}") from None
    return Path(dest)


def extract_adapter(store, trial: optuna.trial.FrozenTrial, dest: Path) -> Path:
    """The trial's adapter folder, unpacked from its archive into `dest` (created; must not exist)."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="tuner-adapter-") as tmp:
        archive = fetch(store, trial, ADAPTER_ATTR, Path(tmp) / "adapter.zip")
        unzip_folder(archive, dest, f"trial {trial.number}: adapter artifact {artifact_id(trial, ADAPTER_ATTR)}")
    for needed in ("adapter_config.json", "adapter_model.safetensors", INFO_FILE):
        if not (dest / needed).is_file():
            raise ArtifactError(f"trial {trial.number}: the adapter archive has no {needed}")
    return dest



# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints (`tuner promote --checkpoint STEP`)


def save_checkpoints_artifact(trial: optuna.Trial, store_dir: Path, adapters: dict[int, Path],
                              info: AdapterInfo) -> dict:
    """The trial's retained checkpoints as one archive in the store (the run folder is local to the machine that
    trained; the store is what every machine of a study shares). Each carries its own `tuner.json`."""
    if not adapters:
        return {CHECKPOINT_STEPS_ATTR: []}
    store = open_store(store_dir)
    with tempfile.TemporaryDirectory(prefix="tuner-checkpoints-") as tmp:
        staged = Path(tmp) / "checkpoints"
        for step, folder in sorted(adapters.items()):
            dest = staged / f"step-{step:06d}"
            shutil.copytree(folder, dest)
            info.model_copy(update={"checkpoint_step": step}).write(dest)
        archive = zip_folder(staged, Path(tmp) / f"trial-{trial.number}-checkpoints.zip")
        aid = upload_all(store, trial, {CHECKPOINTS_ATTR: (archive, "application/zip")})[CHECKPOINTS_ATTR]
    return {CHECKPOINTS_ATTR: aid, CHECKPOINT_STEPS_ATTR: sorted(adapters)}


def extract_checkpoint(store, trial: optuna.trial.FrozenTrial, step: int, dest: Path) -> Path:
    """One checkpoint's adapter folder (with its `tuner.json`) into `dest`, which must not exist."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="tuner-checkpoint-") as tmp:
        archive = fetch(store, trial, CHECKPOINTS_ATTR, Path(tmp) / "checkpoints.zip")
        unzip_folder(archive, Path(tmp) / "all",
                     f"trial {trial.number}: checkpoints artifact {artifact_id(trial, CHECKPOINTS_ATTR)}")
        folder = Path(tmp) / "all" / f"step-{step:06d}"
        if not folder.is_dir():
            raise ArtifactError(f"trial {trial.number}: the checkpoints archive has no step {step}")
        shutil.copytree(folder, dest)
    return dest
