"""The worker loop: take trials from the study until its budget is spent, train each, record the outcome.

A worker (one `tuner run` process) keeps its loaded base models between trials, heartbeats its running trials,
retries trials whose worker died (from their last checkpoint), and never leaves a trial RUNNING: on SIGINT/SIGTERM
it checkpoints and hands the trial back for a retry; a second signal exits at once after the same bookkeeping.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryFailedTrialCallback
from optuna.trial import TrialState

from . import artifacts, lora, models, storage as store
from .config import SweepConfig
from .data import Splits, load_splits
from .errors import Interrupted, TrialFailure, TunerError
from .scoring import PriceScorer, constant_baseline, price_metrics
from .space import TrialParams, sample
from .study import baselines, open_study, running_elsewhere, set_baseline, tell
from .tracking import TrialTracker
from .train import Evaluation, TrialRun, encode, train_group

warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


# ---------------------------------------------------------------------------------------------------------------
# What the worker tells the terminal (implemented by the CLI)


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int, params: TrialParams, total_steps: int, note: str) -> None: ...
    def trial_step(self, number: int, record: dict, total_steps: int) -> None: ...
    def trial_ended(self, number: int, state: str, attrs: dict) -> None: ...


class NullReporter:
    def message(self, text):
        pass

    def trial_started(self, number, params, total_steps, note):
        pass

    def trial_step(self, number, record, total_steps):
        pass

    def trial_ended(self, number, state, attrs):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Signals and heartbeats


class Stopper:
    """First SIGINT/SIGTERM: finish the step, checkpoint, hand the trial back. Second: exit now."""

    def __init__(self, reporter: Reporter):
        self.requested = False
        self.reporter = reporter
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reporter.message(f"{signal.Signals(signum).name}: stopping after this step (checkpoint, then the trial "
                              f"is handed back for a retry); send it again to stop at once")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Heartbeat:
    """Records a heartbeat for every trial this worker runs, from a thread, so that long steps do not look dead."""

    def __init__(self, storage, interval: int):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tuner-heartbeat", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for tid in ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # a missed beat is recovered by the next one; the grace period covers several
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# Bases kept between trials


class BaseCache:
    """Loaded bases by (model, revision, bits, device). Holds at most `capacity`; the least recently used goes."""

    def __init__(self, capacity: int = 1, cpu_bf16="auto"):
        self.capacity, self.cpu_bf16 = capacity, cpu_bf16
        self._bases: dict[tuple, models.Base] = {}
        self.loads = 0

    def get(self, resolved: models.ResolvedModel, bits: int, device: str) -> models.Base:
        key = (resolved.key, bits, device)
        if key in self._bases:
            base = self._bases.pop(key)
            self._bases[key] = base
            return base
        while len(self._bases) >= self.capacity:
            old_key = next(iter(self._bases))
            models.release(self._bases.pop(old_key))
        base = models.load_base(resolved, bits, device, cpu_bf16=self.cpu_bf16)
        self.loads += 1
        self._bases[key] = base
        return base

    def clear(self) -> None:
        for key in list(self._bases):
            models.release(self._bases.pop(key))


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WorkerOptions:
    storage_url: str = store.DEFAULT_STORAGE
    study_name: str | None = None
    trials: int | None = None  # global budget; None: the sweep file's
    timeout: float | None = None
    device: str | None = None
    force: bool = False
    wait_for_others: bool = True


@dataclass
class WorkerReport:
    study_name: str
    ran: list[int] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0


CPU_AUTO_COTRAIN = 2


def estimate_trial_bytes(config, params: TrialParams) -> float:
    """Activation memory of one trial's micro-batch without gradient checkpointing, bf16, generously rounded up
    (about 18 hidden-sized and 4 MLP-sized tensors per layer per token), plus its LoRA weights and AdamW state."""
    tokens = params.batch_size * params.max_length
    per_layer = 18 * config.hidden_size + 4 * config.intermediate_size
    lora = params.r * (config.hidden_size * 2) * 4 * config.num_hidden_layers * 16
    return 2.0 * tokens * per_layer * config.num_hidden_layers + lora


@dataclass
class Prepared:
    got: "Acquired"
    params: TrialParams


@dataclass
class Acquired:
    trial: optuna.Trial
    slot: int | None
    root_number: int  # the first trial of a retry chain: its folder holds the checkpoints
    retry_of: int | None


def _seed_offset(study_exists_with_running: bool) -> int:
    for var in ("TUNER_WORKER_INDEX", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    # Two workers with the same sampler seed would propose the same first trials.
    return os.getpid() if study_exists_with_running else 0


class Worker:
    def __init__(self, cfg: SweepConfig, opts: WorkerOptions, reporter: Reporter | None = None):
        self.cfg, self.opts = cfg, opts
        self.reporter = reporter or NullReporter()
        self.study_name = opts.study_name or cfg.study.name
        self.budget = opts.trials or cfg.study.trials
        self.stopper = Stopper(self.reporter)
        self.bases = BaseCache(capacity=1, cpu_bf16=cfg.train.cpu_bf16)
        self._encoded: dict[tuple, tuple] = {}
        self._mine: set[int] = set()
        self._errors_in_a_row = 0

    # -- set-up: everything that can fail on bad input fails here, before a model is loaded --------------------
    def prepare(self) -> None:
        cfg = self.cfg
        if os.environ.get("TUNER_TORCH_THREADS"):  # set by --workers: this process's share of the cores
            import torch

            torch.set_num_threads(int(os.environ["TUNER_TORCH_THREADS"]))
        self.retry = RetryFailedTrialCallback(max_retry=cfg.study.max_retries)
        self.storage = store.open_storage(self.opts.storage_url, heartbeat_interval=cfg.study.heartbeat_interval,
                                          grace_period=cfg.study.grace_period, retry_callback=self.retry)
        existing = [s for s in optuna.get_all_study_summaries(self.storage) if s.study_name == self.study_name]
        busy = bool(existing) and bool(optuna.load_study(study_name=self.study_name, storage=self.storage)
                                       .get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        self.study = open_study(cfg, self.storage, self.study_name, force=self.opts.force,
                                seed_offset=_seed_offset(busy))
        self.splits: Splits = load_splits(cfg.data)
        # Every model the sweep may pick is resolved, read and checked before any trial starts.
        self.resolved: dict[str, models.ResolvedModel] = {}
        self.modules: dict[str, set[str]] = {}
        self.scorers: dict[str, PriceScorer] = {}
        self.tokenizers: dict[str, object] = {}
        for i, spec in enumerate(cfg.model.options):
            where = f"model[{i}] {spec.key!r}" if not cfg.model.is_fixed else f"model {spec.key!r}"
            try:
                resolved = models.resolve_model(spec)
                modules = models.linear_module_names(resolved)
                for name in cfg.search.target_modules.values():
                    models.resolve_targets(cfg.search.target_set(name), modules, name)
                tok = models.load_tokenizer(resolved)
            except TunerError as exc:
                raise TunerError(f"{where}: {str(exc).removeprefix(f'model {spec.name!r}: ')}") from None
            except Exception as exc:
                raise TunerError(f"{where}: cannot be loaded ({type(exc).__name__}: {exc})") from None
            self.resolved[spec.key], self.modules[spec.key], self.tokenizers[spec.key] = resolved, modules, tok
            self.scorers[spec.key] = PriceScorer(tok, max_price=self.splits.max_price,
                                                 batch_size=cfg.scoring.batch_size, method=cfg.scoring.method,
                                                 top_k=cfg.scoring.top_k)
        self.device = models.pick_device(self.opts.device)
        self.out_root = Path(cfg.study.output_dir) / self.study_name
        self.hub_token: str | None = None
        if cfg.tracking.hub.push_checkpoints:
            from huggingface_hub import get_token

            self.hub_token = get_token()
            if not self.hub_token:
                self.reporter.message("tracking.hub.push_checkpoints: no Hugging Face token (HF_TOKEN or `hf auth "
                                      "login`); checkpoints are kept locally and not pushed")
        truths = [e.price for e in self.splits.test]
        if "median" not in baselines(self.study):
            set_baseline(self.study, "median", {**constant_baseline(self.splits.train_median, truths),
                                                "value": self.splits.train_median})
            self.study.set_user_attr("data", self.splits.summary())

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        report = WorkerReport(self.study_name)
        self._t0 = time.time()
        self.heartbeat = Heartbeat(self.storage, self.cfg.study.heartbeat_interval)
        self.stopper.install()
        self._pending: Prepared | None = None
        try:
            while not self.stopper.requested and not self._timed_out():
                first = self._pending or self._next()
                self._pending = None
                if first is None:
                    if self.opts.wait_for_others and running_elsewhere(self.study, self._mine):
                        # A trial of another worker may still fail and come back as a retry.
                        time.sleep(min(5, self.cfg.study.heartbeat_interval))
                        continue
                    break
                for number, state in self._run_group(first).items():
                    report.ran.append(number)
                    report.states[number] = state
            if self._timed_out():
                self.reporter.message(f"timeout reached ({self.opts.timeout:.0f} s): no new trials")
            report.interrupted = self.stopper.requested
        finally:
            if self._pending is not None:  # acquired but never started: give it back untouched
                self._hand_back(self._pending.got, "not_started", "the worker stopped before it started", None)
            self.stopper.uninstall()
            self.heartbeat.close()
            self.bases.clear()
            report.seconds = time.time() - self._t0
        return report

    def _timed_out(self) -> bool:
        return self.opts.timeout is not None and time.time() - self._t0 > self.opts.timeout

    def _acquire(self) -> Acquired | None:
        """A trial waiting in the queue (a retry, or one enqueued by hand), else a fresh one if a budget slot is
        free. Fresh trials are only created after a slot is claimed, so several workers never overshoot."""
        optuna.storages.fail_stale_trials(self.study)
        slot = None
        trial_id = self._pop_waiting()
        if trial_id is None:
            slot = store.claim_slot(self.storage.engine, self.study_name, self.budget)
            if slot is None:
                return None
            trial = self.study.ask()  # may still pop a trial queued since: handled below
        else:
            trial = optuna.Trial(self.study, trial_id)
        frozen = self.storage.get_trial(trial._trial_id)
        retry_of = RetryFailedTrialCallback.retried_trial_number(frozen)
        if retry_of is not None:
            if slot is not None:  # a retry holds the slot of the trial it retries
                store.release_slot(self.storage.engine, self.study_name, slot)
                slot = None
            history = RetryFailedTrialCallback.retry_history(frozen)
            root = history[0] if history else retry_of
        else:
            root = trial.number
            if slot is None:  # enqueued by hand: counted against the budget while slots are left
                slot = store.claim_slot(self.storage.engine, self.study_name, self.budget)
            if slot is not None:
                store.bind_slot(self.storage.engine, self.study_name, slot, trial.number)
        self._mine.add(trial.number)
        self.heartbeat.add(trial._trial_id)
        return Acquired(trial, slot, root, retry_of)

    def _pop_waiting(self) -> int | None:
        """Like `Study.ask`'s queue pop, through the public storage API: the RUNNING transition is atomic, so a
        queued trial goes to exactly one worker."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if self.storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return t._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def _rows_for(self, model: str, max_length: int):
        key = (model, max_length)
        if key not in self._encoded:
            self._encoded[key] = encode(self.tokenizers[model], self.splits.train, max_length)
        return self._encoded[key]

    def _next(self) -> "Prepared | None":
        """Acquire a trial and sample its parameters; a trial whose set-up fails is failed here, visibly."""
        while True:
            got = self._acquire()
            if got is None:
                return None
            try:
                return Prepared(got, self._describe(got))
            except Exception as exc:
                self._trial_error(got, exc)

    def _describe(self, got: Acquired) -> TrialParams:
        trial = got.trial
        params = sample(trial, self.cfg, self.modules)
        for key, value in (("r", params.r), ("alpha", params.alpha), ("target_set", params.target_set),
                           ("target_modules_resolved", list(params.target_modules)),
                           ("effective_batch", params.effective_batch), ("device", self.device),
                           ("model", params.model)):
            trial.set_user_attr(key, value)
        if got.retry_of is not None:
            trial.set_user_attr("retry_of", got.retry_of)
        return params

    def _checkpoint_owner(self, got: Acquired) -> str:
        """Written into each checkpoint: only retries of the same trial resume from it. The root trial's start time
        tells a study apart from an earlier one that was deleted and created again under the same name and output
        folder (same trial numbers, same folders), and every worker reads the same value from the storage."""
        storage, study_id = self.study._storage, self.study._study_id
        root = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, got.root_number))
        started = root.datetime_start.isoformat() if root.datetime_start else "unknown"
        return f"{self.study.study_name}/trial-{got.root_number}/{started}"

    def _make_run(self, prep: "Prepared", base: models.Base) -> TrialRun:
        trial, params = prep.got.trial, prep.params
        trial.set_user_attr("quantization", models.describe_quantization(params.quant_bits, base.dtype))
        rows, too_long = self._rows_for(params.model, params.max_length)
        if too_long:
            trial.set_user_attr("rows_too_long", too_long)
        job = TrialJob(self, prep.got, params, base, time.time())
        run = TrialRun(name=f"trial-{trial.number}", params=params, rows=rows,
                       run_dir=self.out_root / f"trial-{prep.got.root_number:04d}", hooks=job,
                       eval_every=self.cfg.train.eval_every, checkpoint_every=self.cfg.train.checkpoint_every,
                       keep_checkpoints=self.cfg.train.keep_checkpoints, overfit_drop=self.cfg.train.overfit_drop,
                       maximize=self.cfg.study.direction == "maximize", owner=self._checkpoint_owner(prep.got))
        job.run = run
        return run

    def _run_group(self, first: "Prepared") -> dict[int, str]:
        """Train `first` and, when co-training, up to K-1 more trials that share its base, taking new trials from
        the study as places free up. A trial that needs another base waits for the next group."""
        runs: list[TrialRun] = []
        try:
            base = self.bases.get(self.resolved[first.params.model], first.params.quant_bits, self.device)
            self._ensure_base_baseline(base, first.params.model)
            runs.append(self._make_run(first, base))
        except Exception as exc:
            self._trial_error(first.got, exc)
            return {first.got.trial.number: "FAIL"}
        capacity = self._group_size(base, first.params)

        def supply(free: int) -> list[TrialRun]:
            out: list[TrialRun] = []
            while len(out) < free and self._pending is None and not self.stopper.requested \
                    and not self._timed_out():
                nxt = self._next()
                if nxt is None:
                    break
                if (nxt.params.model, nxt.params.quant_bits) != (first.params.model, base.bits):
                    self._pending = nxt  # needs another base: it starts the next group
                    break
                try:
                    out.append(self._make_run(nxt, base))
                except Exception as exc:
                    self._trial_error(nxt.got, exc)
            runs.extend(out)
            return out

        try:
            train_group(base, list(runs), supplier=supply if capacity > 1 else None, stop=self.stopper,
                        on_done=lambda run: run.hooks.finalize(run), capacity=capacity,
                        gradient_checkpointing=self.cfg.train.gradient_checkpointing,
                        fused=self.cfg.train.cotrain_mode != "interleaved")
            self._errors_in_a_row = 0
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the loop failed every trial it held (reason `error`); stop if it repeats
            self.reporter.message(f"training failed: {type(exc).__name__}: {exc}")
            self._errors_in_a_row += 1
            if self._errors_in_a_row >= 3:
                raise
        finally:
            for run in runs:
                self.heartbeat.remove(run.hooks.trial._trial_id)
            release_memory(self.device)
        return {run.hooks.trial.number: run.hooks.state for run in runs}

    def _group_size(self, base: models.Base, params: TrialParams) -> int:
        """How many trials train together on one base. `auto`: on a GPU, as many as free memory holds by a
        conservative estimate (at most 16); on the CPU, 2 (bench/cotrain.py on a 2-core bf16 CPU: fused K=2 1.14x
        the rows/s of one trial, K=4 1.16x: little more for twice the memory and a longer wait per trial)."""
        setting = self.cfg.train.cotrain
        if setting != "auto":
            return int(setting)
        if not base.device.startswith("cuda"):
            return CPU_AUTO_COTRAIN
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(base.device))
        need = estimate_trial_bytes(base.model.config, params)
        return max(1, min(16, int(free * 0.6 // need)))

    def _trial_error(self, got: Acquired, exc: Exception) -> None:
        detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        self._hand_back(got, "error", detail, None, retry=False)
        self.reporter.trial_ended(got.trial.number, "FAIL", {"fail_reason": "error",
                                                                "fail_detail": f"{type(exc).__name__}: {exc}"})
        self.heartbeat.remove(got.trial._trial_id)
        if isinstance(exc, TunerError):
            raise exc

    def baseline_key(self, model: str, bits: int) -> str:
        if self.cfg.model.is_fixed:
            return f"base_model_{bits}bit"
        slug = "".join(c if c.isalnum() else "_" for c in model.split(":")[-1].split("/")[-1]).strip("_")
        return f"base_model_{slug}_{bits}bit"

    def _ensure_base_baseline(self, base: models.Base, model: str) -> None:
        key = self.baseline_key(model, base.bits)
        if key in baselines(self.study):
            return
        self.reporter.message(f"scoring the base model {model} ({base.bits}-bit, no fine-tuning) on "
                              f"{len(self.splits.test)} test rows for the baseline")
        run = self.scorers[model].predict(base.model, [e.prompt for e in self.splits.test])
        metrics = price_metrics([p.value for p in run.predictions], [e.price for e in self.splits.test])
        metrics["rows_per_s"] = run.rows_per_s
        metrics["model"] = model
        set_baseline(self.study, key, metrics)

    def _hand_back(self, got: Acquired, reason: str, detail: str, step: int | None, retry: bool = True) -> None:
        """Mark the trial FAIL with its reason, and (for interruptions) enqueue a retry with the same parameters,
        which will resume from the trial's latest checkpoint. Never leaves it RUNNING."""
        trial = got.trial
        try:
            if self.storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                return  # already told (the training loop's own bookkeeping ran first)
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_detail", detail[-2000:])
            if step is not None:
                trial.set_user_attr("checkpoint_step", step)
            tell(self.study, trial, state=TrialState.FAIL, skip_if_finished=True)
            if retry:
                self.retry(self.study, self.study._storage.get_trial(trial._trial_id))
        except Exception:  # storage unreachable while stopping: the heartbeat grace period will fail it instead
            pass


class TrialJob:
    """One trial's link between the training loop and the study: progress, evaluation + pruning, the end."""

    def __init__(self, worker: Worker, got: Acquired, params: TrialParams, base: models.Base, t0: float):
        self.w, self.got, self.params, self.base, self.t0 = worker, got, params, base, t0
        self.trial = got.trial
        self.state = "pending"
        self.run: TrialRun | None = None
        cfg = worker.cfg
        self.tracker = TrialTracker(cfg.tracking.wandb, study=worker.study_name, trial_number=self.trial.number,
                                    config={**params.to_dict(), "study": worker.study_name,
                                            "trial": self.trial.number, "retry_of": got.retry_of},
                                    root=Path(cfg.study.output_dir))
        self.trial.set_user_attr("wandb_run_id", self.tracker.info.run_id)
        self.trial.set_user_attr("wandb_mode", self.tracker.info.mode)
        self._started = False
        self._pushed: dict[str, str] = {}
        self._push_errors: list[str] = []

    # RunHooks
    def on_step(self, run: TrialRun, record: dict) -> None:
        if not self._started:
            self._started = True
            note = f"resumed from step {run.resumed_from_step}" if run.resumed_from_step else ""
            if run.resumed_from_step:
                self.trial.set_user_attr("resumed_from_step", run.resumed_from_step)
            if run.skipped_checkpoints:
                self.trial.set_user_attr("skipped_checkpoints", run.skipped_checkpoints)
                self.w.reporter.message(f"trial {self.trial.number}: skipped unreadable checkpoint(s): "
                                        + "; ".join(run.skipped_checkpoints))
            self.trial.set_user_attr("trainable_params", run.adapter.trainable_parameters)
            self.w.reporter.trial_started(self.trial.number, self.params, run.total_steps, note)
        self.tracker.log({"train/loss": record["loss"], "train/lr": record["lr"],
                          "train/grad_norm": record["grad_norm"], "train/epoch": record["epoch"]}, step=record["step"])
        self.w.reporter.trial_step(self.trial.number, record, run.total_steps)

    def on_evaluate(self, run: TrialRun, step: int) -> Evaluation:
        """The validation subset (every `eval_every` steps) or the whole validation split (at epoch ends and at
        the end, where it decides which adapter the trial keeps)."""
        cfg = self.w.cfg
        at_epoch_end = run.params.epochs > 1 and (step % run.steps_per_epoch == 0 or run.done)
        rows = self.w.splits.val if at_epoch_end or run.done else self.w.splits.val[: cfg.train.eval_rows]
        res = self.w.scorers[self.params.model].predict(self.base.model, [e.prompt for e in rows], adapter=run.name)
        metrics = price_metrics([p.value for p in res.predictions], [e.price for e in rows])
        value = metrics[cfg.study.objective]
        self.trial.report(value, step)
        self.tracker.log({f"val/{k}": v for k, v in metrics.items() if k != "n"}, step=step)
        return Evaluation(value, prune=not run.done and self.trial.should_prune())

    def on_checkpoint(self, run: TrialRun, step: int, path: Path) -> None:
        self.trial.set_user_attr("last_checkpoint_step", step)
        hub = self.w.cfg.tracking.hub
        if not hub.push_checkpoints:
            return
        if not self.w.hub_token:
            self.trial.set_user_attr("hub_push", "skipped: no Hugging Face token")
            return
        from .promote import PromoteError, push_checkpoint

        # The chain's first trial names the repository, so that a retry resuming this trial pushes beside it.
        repo = f"{hub.repo}-trial-{self.got.root_number}"
        info = artifacts.adapter_info(self.w.cfg, self.w.splits, self.params, self.base, self.w.study_name,
                                      self.trial.number).model_copy(update={"checkpoint_step": step})
        try:
            commit = push_checkpoint(path / "adapter", info, repo, token=self.w.hub_token)
        except PromoteError as exc:  # the Hub's trouble is not the trial's: say it, record it, train on
            self._push_errors.append(f"step {step}: {exc}")
            self.trial.set_user_attr("hub_push_errors", self._push_errors)
            self.w.reporter.message(f"trial {self.trial.number}: checkpoint at step {step} not pushed: {exc}")
            return
        self._pushed[str(step)] = commit
        self.trial.set_user_attr("hub_checkpoints", {"repo": repo, "commits": self._pushed})

    # the end
    def finalize(self, run: TrialRun) -> None:
        trial, w = self.trial, self.w
        attrs = {**run.stats(), "duration_s": time.time() - self.t0, **memory_attrs(w.device)}
        attrs["loss_first"] = run.history[0]["loss"] if run.history else None
        attrs["loss_last"] = run.history[-1]["loss"] if run.history else None
        if run.resumed_from_step:
            attrs["resumed_from_step"] = run.resumed_from_step
        try:
            if run.status == "completed":
                self._complete(run, attrs)
                self.state = "COMPLETE"
            elif run.status == "pruned":
                attrs["pruned_at_step"] = run.step
                self._set_attrs(attrs)
                self.tracker.summary({"state": "pruned", "pruned_at_step": run.step})
                self.tracker.finish()
                tell(w.study, trial, state=TrialState.PRUNED)
                self.state = "PRUNED"
            elif run.status == "interrupted":
                step = run.error.checkpoint_step if isinstance(run.error, Interrupted) else None
                self._set_attrs(attrs)
                self.tracker.finish(exit_code=1)
                w._hand_back(self.got, "interrupted", "stopped by a signal; retried from its checkpoint", step)
                self.state = "INTERRUPTED"
                attrs.update(fail_reason="interrupted", checkpoint_step=step)
            else:
                err = run.error
                reason = err.reason if isinstance(err, TrialFailure) else "error"
                attrs.update(fail_reason=reason, fail_detail=str(err))
                self._set_attrs(attrs)
                self.tracker.summary({"state": "failed", "fail_reason": reason})
                self.tracker.finish(exit_code=1)
                tell(w.study, trial, state=TrialState.FAIL)
                self.state = "FAIL"
        except Exception as exc:  # the trial's outcome could not be written in full: it is not COMPLETE
            attrs.update(fail_reason="finalize_error", fail_detail=f"{type(exc).__name__}: {exc}")
            try:
                self._set_attrs(attrs)
                tell(w.study, trial, state=TrialState.FAIL, skip_if_finished=True)
            except Exception:
                pass
            self.state = "FAIL"
        w.reporter.trial_ended(trial.number, self.state, attrs)

    def _set_attrs(self, attrs: dict) -> None:
        for k, v in attrs.items():
            if v is not None:
                self.trial.set_user_attr(k, v)

    def _complete(self, run: TrialRun, attrs: dict) -> None:
        w = self.w
        test = w.splits.test
        res = w.scorers[self.params.model].predict(self.base.model, [e.prompt for e in test], adapter=run.name)
        metrics = price_metrics([p.value for p in res.predictions], [e.price for e in test])
        metrics["off_grammar_rate"] = sum(p.off_grammar_steps > 0 for p in res.predictions) / len(test)
        metrics["score_rows_per_s"] = res.rows_per_s
        adapter_dir = run.run_dir / "adapter"
        lora.save_adapter(run.adapter, adapter_dir, self.base.resolved.name, self.base.resolved.revision)
        info = artifacts.adapter_info(w.cfg, w.splits, self.params, self.base, w.study_name, self.trial.number)
        store_dir = artifacts.location(w.opts.storage_url, w.cfg.study.artifacts)
        attrs.update(artifacts.save_trial_artifacts(self.trial, w.study, store_dir, adapter_dir, info, test,
                                                    res.predictions, metrics))
        attrs.update(artifacts.save_checkpoints_artifact(self.trial, store_dir,
                                                         artifacts.checkpoint_adapters(run.checkpoint_root), info))
        attrs.update(metrics)
        attrs["adapter_path"] = str(adapter_dir.resolve())
        self.tracker.summary({f"test/{k}": v for k, v in metrics.items()})
        info = self.tracker.finish()
        attrs.update({k: v for k, v in info.to_attrs().items() if v is not None})
        self._set_attrs(attrs)
        tell(w.study, self.trial, metrics[w.cfg.study.objective])


def release_memory(device: str) -> None:
    """Between trials: collect the trial's tensors, give CUDA's cached blocks back, and ask glibc to return freed
    heap pages, so that a worker running hundreds of trials stays at the size it had after the first."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def memory_attrs(device: str) -> dict:
    import psutil
    import torch

    out = {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    return out


def run_worker(cfg: SweepConfig, opts: WorkerOptions, reporter: Reporter | None = None) -> WorkerReport:
    worker = Worker(cfg, opts, reporter)
    worker.prepare()
    return worker.run()
