"""`tuner clean STUDY`: remove the run folders of a study's finished trials on this machine.

A run folder (`trial-NNNN/` under the study's runs folder, `places.runs_root`) holds what a retry resumes from and
the kept adapter while the trial trains; once every trial that uses it has finished (COMPLETE, PRUNED or FAIL with
no retry waiting or running), everything worth keeping is in the study and its artifact store. A folder shared by
a retry chain (a retry trains in its first trial's folder) is kept while any trial of the chain may still run. W&B's
offline runs (`wandb/` beside the run folders) are W&B's to sync and are left alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from . import places

UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


@dataclass
class Cleaned:
    folder: Path  # the study's run folders
    how: str  # why this folder: given, recorded on the study, or the default beside the storage
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # a trial of its chain is running or waiting
    freed: int = 0  # bytes


def root_number(t: optuna.trial.FrozenTrial) -> int:
    """The trial whose folder this trial trains in: the first of its retry chain."""
    history = RetryHeartbeatStaleTrialCallback.retry_history(t)
    return history[0] if history else t.number


def locate(study: optuna.Study, storage_url: str, given: str | None) -> tuple[Path, str]:
    """`--runs DIR`, else the folder the study recorded when it is on this machine, else the default beside the
    storage; which one, and why, is said."""
    if given:
        return Path(given).expanduser().resolve(), "given by --runs"
    default = places.runs_root(storage_url)
    recorded = study.user_attrs.get(places.RUNS_ATTR)
    if recorded and Path(recorded).is_dir():
        return Path(recorded), "recorded on the study"
    if recorded and Path(recorded) != default:
        return default, f"the default beside the storage (the recorded {recorded} is not on this machine)"
    return default, "the default beside the storage"


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def clean(study: optuna.Study, storage_url: str, runs: str | None = None, dry_run: bool = False) -> Cleaned:
    base, how = locate(study, storage_url, runs)
    out = Cleaned(base / study.study_name, how)
    busy: set[int] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state in UNFINISHED:
            busy.add(root_number(t))
    if not out.folder.is_dir():
        return out
    for folder in sorted(out.folder.glob("trial-*")):
        number = folder.name.removeprefix("trial-")
        if not folder.is_dir() or not number.isdigit():
            continue  # not a run folder tuner made
        if int(number) in busy:
            out.kept.append(folder)
            continue
        out.freed += _size(folder)
        out.removed.append(folder)
        if not dry_run:
            shutil.rmtree(folder)
    return out
