"""Studies: create or resume one from a sweep config, keep its search space honest, and read trials back.

Everything a user sees about a study is stored in Optuna's own tables: the sweep's signature and baselines as study
user attributes, a trial's derived values, metrics and locations as trial user attributes (so that optuna-dashboard
shows them with no help from tuner).
"""

from __future__ import annotations

import json
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import SweepConfig
from .errors import StorageError, TunerError
from .space import enqueued_params, grid_space, signature_diff, signature_hash, space_signature

optuna.logging.set_verbosity(optuna.logging.WARNING)

SIGNATURE_ATTR = "tuner_signature"
BASELINES_ATTR = "baselines"


def make_sampler(cfg: SweepConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    s = cfg.study.sampler
    seed = None if s.seed is None else s.seed + seed_offset
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg), seed=seed)
    # constant_liar: with several workers, running trials count as bad guesses so that workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=True)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    p = cfg.study.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1 if p.min_resource == "auto" else p.min_resource,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def open_study(cfg: SweepConfig, storage, name: str | None = None, *, force: bool = False,
               seed_offset: int = 0, train_rows: int | None = None) -> optuna.Study:
    """Create the study, or load it and check that this sweep file describes the same search (model, data, space,
    fixed settings, objective). A different one is refused with the differences named, unless `force`.
    `train_rows`: the rows a trial trains on, which a queued trial's scaled learning rate is resolved on."""
    name = name or cfg.study.name
    study = optuna.create_study(study_name=name, storage=storage, sampler=make_sampler(cfg, seed_offset),
                                pruner=make_pruner(cfg), direction=cfg.study.direction, load_if_exists=True)
    if study.direction.name.lower() != cfg.study.direction:
        raise TunerError(f"study {name!r} exists and {study.direction.name.lower()}s; this sweep's objective "
                         f"{cfg.study.objective!r} would {cfg.study.direction} (use --study NAME for a new study)")
    new = space_signature(cfg)
    old = study.user_attrs.get(SIGNATURE_ATTR)
    if old is None:
        study.set_user_attr(SIGNATURE_ATTR, new)
        study.set_user_attr("objective", cfg.study.objective)
        study.set_user_attr("sweep_file", cfg.source_file)
        study.set_user_attr("config", json.loads(cfg.model_dump_json(exclude={"source_file"})))
        study.set_user_attr("model", cfg.model.name)
        # The sweep's first trials (its prior): queued once, on creation. Another worker creating the same study at
        # the same moment finds them queued and does not queue them twice.
        for params in enqueued_params(cfg, train_rows):
            study.enqueue_trial(params, skip_if_exists=True)
    elif old != new:
        diff = signature_diff(old, new)
        if not force:
            raise TunerError(f"study {name!r} exists with a different search space: " + "; ".join(diff)
                             + " (use --force to run with this file anyway, or --study NAME for a new study)")
        history = study.user_attrs.get("signature_changes", [])
        study.set_user_attr("signature_changes", history + [{"from": signature_hash(old), "to": signature_hash(new),
                                                             "diff": diff}])
        study.set_user_attr(SIGNATURE_ATTR, new)
    return study


def load_study(storage, name: str | None) -> optuna.Study:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise StorageError("the storage holds no study yet (run `tuner run SWEEP.yaml` first)")
        else:
            raise TunerError(f"the storage holds several studies; name one: {', '.join(names)}")
    if name not in names:
        raise TunerError(f"no study {name!r} in this storage" + (f" (studies: {', '.join(names)})" if names else ""))
    return optuna.load_study(study_name=name, storage=storage)


# ---------------------------------------------------------------------------------------------------------------
# Reading trials back


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def baselines(study: optuna.Study) -> dict[str, dict]:
    return dict(study.user_attrs.get(BASELINES_ATTR, {}))


def set_baseline(study: optuna.Study, key: str, metrics: dict) -> None:
    """Merged into the study's `baselines` attribute, plus flat `baseline_<key>_<metric>` attributes that
    optuna-dashboard shows as they are."""
    current = baselines(study)
    current[key] = metrics
    study.set_user_attr(BASELINES_ATTR, current)
    for m in ("mae", "rmsle", "hit_rate"):
        if m in metrics:
            study.set_user_attr(f"baseline_{key}_{m}", metrics[m])


def running_elsewhere(study: optuna.Study, mine: set[int]) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
               if t.number not in mine)


# ---------------------------------------------------------------------------------------------------------------
# Optuna internals. tuner runs trials outside `study.optimize` (a group of trials trains at once, on a base that
# outlives them), which Optuna's public API does not serve in full; every private name it touches is here.


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a live trial (heartbeats, state changes and retries are keyed by it). `Trial` keeps it
    private; `FrozenTrial._trial_id` likewise."""
    return trial._trial_id


def frozen(study: optuna.Study, tid: int) -> FrozenTrial:
    """A trial as the storage holds it now. `Study.get_trials` reads every trial; the storage reads one, and the
    study's storage is private."""
    return study._storage.get_trial(tid)


def frozen_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """A trial by its number, read from the storage (the study's id in the storage is private)."""
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask`, which warns that heartbeats are meant for `Study.optimize`: tuner's worker beats for every
    trial it holds itself (`runtime.Heartbeat`), so the warning says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def pop_waiting(study: optuna.Study) -> int | None:
    """A WAITING trial (a retry, or one enqueued by hand) moved to RUNNING for this worker, or None; as
    `Study._pop_waiting_trial_id` does inside `ask`, which is private. The RUNNING transition is atomic in the
    storage, so a queued trial goes to exactly one worker."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def tell(study: optuna.Study, trial, values=None, state: TrialState | None = None, **kwargs) -> None:
    """`study.tell` for trials run outside `study.optimize` (all of tuner's). GridSampler.after_trial calls
    `study.stop()` once the grid is used up, and `stop()` raises outside `optimize()`; Optuna writes the trial's state
    regardless (in a `finally`), so the exception would report a finished trial as failed. Worker loops stop on
    their own budget, so marking the tell as "inside the loop" only lets `stop()` set its flag."""
    local = study._thread_local
    inside = local.in_optimize_loop
    local.in_optimize_loop = True
    try:
        study.tell(trial, values, state=state, **kwargs)
    finally:
        local.in_optimize_loop = inside


def fail_stale_trials(study: optuna.Study, grace_period: int) -> None:
    """Optuna's `fail_stale_trials`, with a reason recorded first. A trial whose worker was SIGKILLed or lost stops
    heartbeating; Optuna fails it without a word, so the trial would carry no `fail_reason`. Its ids come from the
    storage's private `_get_stale_trial_ids`: no public API lists stale trials without failing them."""
    storage = study._storage
    get_stale = getattr(storage, "_get_stale_trial_ids", None)
    for tid in (get_stale(study._study_id) if get_stale is not None else []):
        try:
            storage.set_trial_user_attr(tid, "fail_reason", "worker_lost")
            storage.set_trial_user_attr(tid, "fail_detail", f"no heartbeat for over {grace_period} s: its worker "
                                                            f"was killed or lost; retried from its last checkpoint")
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            pass
    optuna.storages.fail_stale_trials(study)


STORAGE_WAITS = (1.0, 3.0)  # seconds between the attempts of a write that must not be lost


def with_retries(write, waits: tuple[float, ...] = STORAGE_WAITS):
    """`write()`, tried again after each wait while the storage fails (a dropped connection, a locked SQLite file).
    A trial that is already finished is not an error to retry. The last failure is raised for the caller to say."""
    import time

    for wait in (*waits, None):
        try:
            return write()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise
        except Exception:
            if wait is None:
                raise
            time.sleep(wait)
