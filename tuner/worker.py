"""The worker: take trials from the study until its budget is spent, group the ones that share a base, and hand
each group to the training loop.

A trial is acquired from the waiting queue (a retry of a trial whose worker died, or one enqueued by hand) or asked
fresh once a budget slot is claimed, so that several workers never overshoot the budget. A worker (one `tuner run`
process) keeps its loaded base between groups, heartbeats every trial it holds, and never leaves a trial RUNNING:
on SIGINT/SIGTERM the loop checkpoints and the trial is handed back for a retry; a second signal exits at once
after the same bookkeeping: whatever it interrupts (loading the base, scoring a baseline, training, the final
scoring, saving artifacts), every trial this worker holds and has not told is handed back before the process ends,
and a hand-back or `tell` under way is finished first (`Stopper.shielded`). What happens to a trial once it trains
is `outcome`'s; signals, heartbeats and memory are `runtime`'s.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryFailedTrialCallback
from optuna.trial import TrialState

from . import artifacts, checkpoints, fmt, lora, models, places
from . import storage as store
from .baselines import ensure_base_model, ensure_classical, ensure_median, record_fits
from .batches import auto_reason, encode, fit_rows
from .config import MAX_TRIALS, SweepConfig, check_study_name
from .errors import StoppedAtOnce, TunerError, one_line
from .loop import NO_FAULTS, Faults, train_group
from .outcome import TrialContext, TrialOutcome
from .prepare import prepare
from .runtime import BaseCache, Heartbeat, NullReporter, Reporter, Stopper, release_memory
from .space import TrialParams, sample, scaled_rate_notes
from .study import (ask, fail_stale_trials, frozen, frozen_by_number, open_study, pop_waiting, running_elsewhere,
                    tell, trial_id, with_retries)
from .train import TrialRun


@dataclass
class WorkerOptions:
    storage_url: str = store.DEFAULT_STORAGE
    study_name: str | None = None
    trials: int | None = None  # global budget; None: the sweep file's
    timeout: float | None = None
    deadline: float | None = None  # None: the sweep file's study.deadline
    device: str | None = None
    force: bool = False
    wait_for_others: bool = True
    artifacts: str | None = None  # the artifact store folder; None: the sweep's study.artifacts, else the default
    faults: Faults = NO_FAULTS  # tests only: faults the training loop injects into itself


@dataclass
class WorkerReport:
    study_name: str
    ran: list[int] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0


@dataclass
class Acquired:
    trial: optuna.Trial
    slot: int | None
    root_number: int  # the first trial of a retry chain: its folder holds the checkpoints
    retry_of: int | None
    params: TrialParams | None = None  # sampled once the trial is acquired
    extension: "Extension | None" = None  # `study.extend`: what this trial trains further, and on which rows


CPU_AUTO_COTRAIN = 2


def estimate_trial_bytes(config, params: TrialParams) -> float:
    """Activation memory of one trial's micro-batch without gradient checkpointing, bf16, generously rounded up
    (about 18 hidden-sized and 4 MLP-sized tensors per layer per token), plus its LoRA weights and AdamW state."""
    tokens = params.batch_size * params.max_length
    per_layer = 18 * config.hidden_size + 4 * config.intermediate_size
    lora = params.r * (config.hidden_size * 2) * 4 * config.num_hidden_layers * 16
    return 2.0 * tokens * per_layer * config.num_hidden_layers + lora


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
        self.budget = cfg.study.trials if opts.trials is None else opts.trials
        self.stopper = Stopper(self.reporter)
        self.bases = BaseCache(capacity=1, cpu_bf16=cfg.train.cpu_bf16)
        self._encoded: dict[tuple, tuple] = {}
        self._mine: set[int] = set()
        self._held: dict[int, Acquired] = {}  # acquired and not yet known to be told or handed back
        self._errors_in_a_row = 0
        self._pending: Acquired | None = None  # acquired for the next group (it needs another base)
        self._extending = False  # `_extend` is taking its own queued trial
        self._beats = contextlib.ExitStack()  # the current group's heartbeats

    # -- set-up: everything that can fail on bad input fails here, before a model is loaded --------------------
    def prepare(self) -> None:
        """Data, models and token budgets are checked before the storage is opened: bad input leaves no study
        behind (one made with a wrong data path would refuse the corrected run as another search)."""
        cfg = self.cfg
        check_study_name(self.opts.study_name)
        if self.opts.trials is not None and not 1 <= self.opts.trials <= MAX_TRIALS:  # 0 must not mean "the file's"
            raise TunerError(f"trials: expected an integer from 1 to {MAX_TRIALS}, got {self.opts.trials}")
        if len(cfg.study.enqueue) > self.budget:  # queued trials run even past the budget
            raise TunerError(f"trials: expected at least the {len(cfg.study.enqueue)} trials of study.enqueue, "
                             f"got {self.budget}")
        if os.environ.get("TUNER_TORCH_THREADS"):  # set by --workers: this process's share of the cores
            import torch

            torch.set_num_threads(int(os.environ["TUNER_TORCH_THREADS"]))
        store.check_url(self.opts.storage_url)
        self.ready = prepare(cfg)
        self._say_fits()
        self.retry = RetryFailedTrialCallback(max_retry=cfg.study.max_retries)
        self.storage = store.open_storage(self.opts.storage_url, heartbeat_interval=cfg.study.heartbeat_interval,
                                          grace_period=cfg.study.grace_period, retry_callback=self.retry)
        existing = [s for s in optuna.get_all_study_summaries(self.storage) if s.study_name == self.study_name]
        busy = bool(existing) and bool(optuna.load_study(study_name=self.study_name, storage=self.storage)
                                       .get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        self.study = open_study(cfg, self.storage, self.study_name, force=self.opts.force,
                                seed_offset=_seed_offset(busy), train_rows=len(self.ready.splits.train))
        if existing and cfg.study.enqueue:  # said, not silently skipped: the queue is filled only at creation
            self.reporter.message(f"study.enqueue: study {self.study_name} already existed, so its first trials "
                                  f"were queued when it was created and are not queued again")
        elif not existing:
            for line in scaled_rate_notes(cfg, len(self.ready.splits.train)):
                self.reporter.message(line)
        self.device = models.pick_device(self.opts.device)
        runs = places.runs_root(self.opts.storage_url, cfg.study.output_dir)
        self.out_root = runs / self.study_name
        if self.study.user_attrs.get(places.RUNS_ATTR) != str(runs):  # where `tuner clean` looks
            self.study.set_user_attr(places.RUNS_ATTR, str(runs))
        self.reporter.message(f"run folders (checkpoints, W&B offline runs) in {self.out_root}")
        self.store_dir = artifacts.location(self.opts.storage_url, self.opts.artifacts or cfg.study.artifacts)
        self.hub_token: str | None = None
        if cfg.tracking.hub.push_checkpoints:
            from huggingface_hub import get_token

            self.hub_token = get_token()
            if not self.hub_token:
                self.reporter.message("tracking.hub.push_checkpoints: no Hugging Face token (HF_TOKEN or `hf auth "
                                      "login`); checkpoints are kept locally and not pushed")
        ensure_median(self.study, self.ready.splits)
        ensure_classical(self.study, self.ready.splits)
        record_fits(self.study, self.ready)

    def _say_fits(self) -> None:
        """How the rows fit each token budget, in the run output; a loud warning where most descriptions lose much."""
        for model, rec in self.ready.auto_lengths.items():
            self.reporter.message(f"train.max_length auto for {model}: {auto_reason(rec)}")
        for (model, budget), (_, fit) in self.ready.fits.items():
            name = "" if self.cfg.model.is_fixed else f"{model}: "
            if fit.loud:
                self.reporter.warning(f"{name}{fit.warning()}")
            else:
                self.reporter.message(f"{name}{fit.line()}")
        if self.ready.token_budget and self.ready.token_budget["rows"] < self.ready.token_budget["of"]:
            self.reporter.message(self.ready.token_budget["line"])

    # -- the main loop ------------------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        report = WorkerReport(self.study_name)
        self._t0 = time.time()
        self.heartbeat = Heartbeat(self.storage, self.cfg.study.heartbeat_interval)
        self.stopper.install()
        try:
            while not self.stopper.requested and not self._out_of_time():
                # Every trial of a group heartbeats from its acquisition until the group ends.
                with contextlib.ExitStack() as self._beats:
                    first = self._pending or self._next()
                    self._pending = None
                    if first is None:
                        if self.opts.wait_for_others and running_elsewhere(self.study, self._mine):
                            # A trial of another worker may still fail and come back as a retry.
                            time.sleep(min(5, self.cfg.study.heartbeat_interval))
                            continue
                        break
                    self._beats.enter_context(self.heartbeat.beating(trial_id(first.trial)))
                    self._record(report, self._run_group(first))
            why = self._out_of_time()
            if why:
                self.reporter.message(why)
            if self.cfg.study.extend.enabled and not self.stopper.requested:
                self._extend(report)
            report.interrupted = self.stopper.requested
        except BaseException as exc:
            left = self._give_back_held(exc)
            if isinstance(exc, KeyboardInterrupt):
                raise StoppedAtOnce(left) from None
            raise
        else:
            self._give_back_held(None)  # a trial acquired for a next group that never started
        finally:
            with self.stopper.shielded(reraise=False):
                self.heartbeat.close()
                self.bases.clear()
            self.stopper.uninstall()
            report.seconds = time.time() - self._t0
        return report

    def _give_back_held(self, exc: BaseException | None) -> list[int]:
        """Hand back every trial this worker acquired and that is still RUNNING in the storage: the one acquired
        for a next group (`exc` None), or, when the worker stops on an exception (a second Ctrl-C at any point),
        every one it holds, with the step of its newest checkpoint. Returns the numbers the storage would not take
        back."""
        left = []
        with self.stopper.shielded(reraise=False):  # a third Ctrl-C does not cut the bookkeeping short
            for number, got in list(self._held.items()):
                step = self._newest_checkpoint(got)
                if exc is None:
                    reason, detail = "not_started", "the worker stopped before it started"
                elif isinstance(exc, KeyboardInterrupt):
                    reason = "interrupted"
                    detail = ("stopped at once by a second signal; retried from its checkpoint at step "
                              f"{step}" if step is not None else "stopped at once by a second signal; retried")
                else:
                    reason = "worker_error"
                    detail = f"its worker stopped on {type(exc).__name__}: {str(exc)[:300]}; retried"
                outcome = self._hand_back(got, reason, detail, step)
                if outcome == "running":
                    left.append(number)
                elif outcome == "handed_back" and exc is not None:
                    self.reporter.trial_ended(number, "INTERRUPTED", {"fail_reason": reason, "checkpoint_step": step})
        return left

    def _newest_checkpoint(self, got: Acquired) -> int | None:
        steps = checkpoints.adapters(self.out_root / f"trial-{got.root_number:04d}" / "checkpoints")
        return max(steps) if steps else None

    def _timeout(self) -> float | None:
        """`--timeout` on the command line, else the sweep's `study.timeout`."""
        return self.opts.timeout if self.opts.timeout is not None else self.cfg.study.timeout

    def _out_of_time(self) -> str | None:
        """Why no new trial may start now (`timeout` passed, or `deadline` too near for a trial), else None."""
        elapsed = time.time() - self._t0
        limit = self._timeout()
        if limit is not None and elapsed > limit:
            return f"timeout reached ({limit:.0f} s): no new trials"
        deadline = self._deadline()
        if deadline is None:
            return None
        ended = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return deadline_reason(elapsed, deadline, trial_estimate(t for t in ended if t.number in self._mine))

    def _deadline(self) -> float | None:
        return self.opts.deadline if self.opts.deadline is not None else self.cfg.study.deadline

    # -- the minutes the deadline leaves ------------------------------------------------------------------------
    def _extend(self, report: WorkerReport) -> None:
        """`study.extend`: once no whole trial fits before the deadline, train the best trial this worker ran
        further, from its kept adapter, on train rows no trial has seen, for the steps the time left holds. It is
        one more trial of the study (user attributes `extends` and `extension`), scored and kept like any other."""
        ext, deadline = self.cfg.study.extend, self._deadline()
        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number in self._mine]
        parents = [t for t in done if t.user_attrs.get("extends") is None]
        if not parents or len(parents) < len(done):  # nothing to extend, or extended already
            return
        parent = (max if self.cfg.study.direction == "maximize" else min)(parents, key=lambda t: t.value)
        params = sample(optuna.trial.FixedTrial(parent.params), self.cfg, self.ready.modules, self.ready.max_lengths())
        left = deadline - (time.time() - self._t0)
        plan = plan_extension(left, parent.user_attrs, len(self.ready.splits.test), len(self.ready.splits.spare),
                              params.effective_batch, ext.min_steps)
        if isinstance(plan, str):
            self.reporter.message(f"study.extend: trial {parent.number} not trained further: {plan}")
            return
        if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.reporter.message("study.extend: a trial is waiting (a retry or one queued by hand): it comes first")
            return
        steps = plan
        tok = self.ready.tokenizers[params.model]
        fitted, cuts, unfit = fit_rows(tok, self.ready.splits.spare[:steps * params.effective_batch],
                                       params.max_length, self.cfg.data)
        steps = len(fitted) // params.effective_batch  # a row that cannot fit at all is counted below, not trained
        if steps < ext.min_steps:
            self.reporter.message(f"study.extend: trial {parent.number} not trained further: {len(unfit)} new rows "
                                  f"cannot fit {params.max_length} tokens, {steps} steps left")
            return
        rows, _ = encode(tok, fitted[:steps * params.effective_batch], params.max_length)
        with tempfile.TemporaryDirectory(prefix="tuner-extend-") as tmp:
            adapter = artifacts.extract_adapter(artifacts.open_store(self.store_dir), parent, Path(tmp) / "parent")
            _, state = lora.load_adapter_state(adapter)
        lr = parent.user_attrs.get("learning_rate", params.learning_rate) * ext.lr_ratio
        record = {"of": parent.number, "steps": steps, "rows": len(rows), "learning_rate": lr,
                  "cut": len(cuts), "unfit": len(unfit), "seconds_left": round(left, 1)}
        self.study.enqueue_trial(parent.params, user_attrs={"extends": parent.number, "extension": record},
                                 skip_if_exists=False)
        with contextlib.ExitStack() as self._beats:
            self._extending = True
            try:
                got = self._next()
            finally:
                self._extending = False
            if got is None or got.trial.user_attrs.get("extends") != parent.number:  # not ours: handed back at exit
                if got is not None:
                    self._pending = got
                return
            got.params = replace(got.params, learning_rate=lr, max_steps=steps)
            got.trial.set_user_attr("learning_rate", lr)
            got.extension = Extension(parent.number, rows, state)
            objective = self.cfg.study.objective
            self.reporter.message(f"study.extend: {fmt.secs(left)} left: trial {parent.number} "
                                  f"({objective.upper() if objective != 'hit_rate' else 'hit rate'} "
                                  f"{fmt.objective_value(objective, parent.value)}) trained {steps} more steps on "
                                  f"{len(rows)} train rows no trial has seen, at lr {lr:.3g}, as trial "
                                  f"{got.trial.number}")
            self._beats.enter_context(self.heartbeat.beating(trial_id(got.trial)))
            self._record(report, self._run_group(got))

    def _record(self, report: WorkerReport, states: dict[int, str]) -> None:
        for number, state in states.items():
            report.ran.append(number)
            report.states[number] = state
            self._held.pop(number, None)  # told or handed back by its outcome (or said it could not)

    # -- acquiring trials ---------------------------------------------------------------------------------------
    def _next(self) -> Acquired | None:
        """Acquire a trial and sample its parameters; a trial whose set-up fails is failed here, visibly."""
        while True:
            with self.stopper.shielded():  # asked and recorded as held, or not asked: never RUNNING unheld
                got = self._acquire()
            if got is None:
                return None
            if got.trial.user_attrs.get("extends") is not None and not self._extending:
                # A retry of an extension (its worker stopped or died): it trained in minutes that its own run left,
                # from its parent's adapter; started again from scratch it would be a plain trial under that name.
                self._hand_back(got, "not_retried", "a study.extend trial is not retried: it runs only in the "
                                "minutes its own run's deadline left", None, retry=False)
                self.reporter.trial_ended(got.trial.number, "FAIL", {"fail_reason": "not_retried"})
                continue
            try:
                got.params = self._describe(got)
                return got
            except Exception as exc:
                self._trial_error(got, exc)

    def _acquire(self) -> Acquired | None:
        """A trial waiting in the queue (a retry, or one enqueued by hand), else a fresh one if a budget slot is
        free. Fresh trials are only created after a slot is claimed, so several workers never overshoot."""
        fail_stale_trials(self.study, self.cfg.study.grace_period)
        slot = None
        waiting = pop_waiting(self.study)
        if waiting is None:
            slot = store.claim_slot(self.storage.engine, self.study_name, self.budget)
            if slot is None:
                return None
            trial = ask(self.study)  # may still pop a trial queued since: handled below
        else:
            trial = optuna.Trial(self.study, waiting)
        retry_of = RetryFailedTrialCallback.retried_trial_number(frozen(self.study, trial_id(trial)))
        if retry_of is not None:
            if slot is not None:  # a retry holds the slot of the trial it retries
                store.release_slot(self.storage.engine, self.study_name, slot)
                slot = None
            history = RetryFailedTrialCallback.retry_history(frozen(self.study, trial_id(trial)))
            root = history[0] if history else retry_of
        else:
            root = trial.number
            if slot is None:  # enqueued by hand: counted against the budget while slots are left
                slot = store.claim_slot(self.storage.engine, self.study_name, self.budget)
            if slot is not None:
                store.bind_slot(self.storage.engine, self.study_name, slot, trial.number)
        self._mine.add(trial.number)
        self._beats.enter_context(self.heartbeat.beating(trial_id(trial)))
        got = self._held[trial.number] = Acquired(trial, slot, root, retry_of)
        return got

    def _describe(self, got: Acquired) -> TrialParams:
        trial = got.trial
        params = sample(trial, self.cfg, self.ready.modules, self.ready.max_lengths())
        # Every trial's values, fixed or sampled, so that a reader of the trial alone sees them all.
        for key, value in (("r", params.r), ("alpha", params.alpha), ("dropout", params.dropout),
                           ("learning_rate", params.learning_rate), ("quant_bits", params.quant_bits),
                           ("target_set", params.target_set),
                           ("target_modules_resolved", list(params.target_modules)),
                           ("effective_batch", params.effective_batch), ("device", self.device),
                           ("model", params.model), ("number_loss", params.number_loss)):
            trial.set_user_attr(key, value)
        if got.retry_of is not None:
            trial.set_user_attr("retry_of", got.retry_of)
            # A retry is made with the failed trial's user attributes: its failure is kept as why it was retried,
            # not left as the retry's own (a retry that completes is not `interrupted`).
            inherited = trial.user_attrs
            if inherited.get("fail_reason") is not None:
                trial.set_user_attr("retry_reason", inherited["fail_reason"])
            for key in ("fail_reason", "fail_detail", "checkpoint_step"):
                if inherited.get(key) is not None:
                    trial.set_user_attr(key, None)
        return params

    # -- groups -------------------------------------------------------------------------------------------------
    def _run_group(self, first: Acquired) -> dict[int, str]:
        """Train `first` and, when co-training, up to K-1 more trials that share its base, taking new trials from
        the study as places free up. A trial that needs another base waits for the next group."""
        runs: list[TrialRun] = []
        try:
            resolved, bits = self.ready.resolved[first.params.model], first.params.quant_bits
            if not self.bases.has(resolved, bits, self.device):
                self.reporter.message(f"loading the base model {first.params.model} ({bits}-bit) on {self.device}")
            base = self.bases.get(resolved, bits, self.device)
            splits, _ = self.ready.fitted(first.params.model, first.params.max_length)
            if not self.stopper.requested:  # stopping: the loop hands the trial back at once; the baseline waits
                ensure_base_model(self.study, base, first.params.model, fixed_model=self.cfg.model.is_fixed,
                                  scorer=self.ready.scorers[first.params.model], splits=splits,
                                  reporter=self.reporter)
            runs.append(self._make_run(first, base))
        except Exception as exc:
            self._trial_error(first, exc)
            return {first.trial.number: "FAIL"}
        capacity = self._group_size(base, first.params)
        try:
            supply = functools.partial(self._supply, first.params.model, base, runs) if capacity > 1 else None
            train_group(base, runs, supplier=supply,
                        stop=self.stopper, on_done=lambda run: run.hooks.finalize(run), capacity=capacity,
                        gradient_checkpointing=self.cfg.train.gradient_checkpointing,
                        fused=self.cfg.train.cotrain_mode != "interleaved", faults=self.opts.faults)
            self._errors_in_a_row = 0
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the loop failed every trial it held (reason `error`); stop if it repeats
            self.reporter.message(f"training failed: {type(exc).__name__}: {exc}")
            self._errors_in_a_row += 1
            if self._errors_in_a_row >= 3:
                raise
        finally:
            release_memory(self.device)
        return {run.hooks.trial.number: run.hooks.state for run in runs}

    def _supply(self, model: str, base: models.Base, runs: list[TrialRun], free: int) -> list[TrialRun]:
        """Up to `free` more trials for the group; the first that needs another base ends the supply."""
        out: list[TrialRun] = []
        while len(out) < free and self._pending is None and not self.stopper.requested and not self._out_of_time():
            nxt = self._next()
            if nxt is None:
                break
            if (nxt.params.model, nxt.params.quant_bits) != (model, base.bits):
                self._pending = nxt  # needs another base: it starts the next group
                break
            try:
                out.append(self._make_run(nxt, base))
            except Exception as exc:
                self._trial_error(nxt, exc)
        runs.extend(out)
        return out

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

    def _make_run(self, got: Acquired, base: models.Base) -> TrialRun:
        trial, params = got.trial, got.params
        trial.set_user_attr("quantization", models.describe_quantization(params.quant_bits, base.dtype))
        splits, fit = self.ready.fitted(params.model, params.max_length)
        trial.set_user_attr("fit", fit.summary())
        rows, too_long = (got.extension.rows, 0) if got.extension else self._rows_for(params.model,
                                                                                       params.max_length)
        if too_long:  # fitting cut every description to the budget: a row left too long is a bug, said loudly
            trial.set_user_attr("rows_too_long", too_long)
            self.reporter.warning(f"trial {trial.number}: {too_long} fitted rows are still longer than "
                                  f"{params.max_length} tokens and were left out")
        ctx = TrialContext(study=self.study, cfg=self.cfg, splits=splits,
                           scorer=self.ready.scorers[params.model], store_dir=self.store_dir, reporter=self.reporter,
                           device=self.device, hub_token=self.hub_token, runs_root=self.out_root.parent,
                           shield=self.stopper.shielded)
        outcome = TrialOutcome(ctx, trial, params, base, root_number=got.root_number, retry_of=got.retry_of,
                               hand_back=functools.partial(self._hand_back, got))
        return TrialRun(name=f"trial-{trial.number}", params=params, rows=rows,
                        run_dir=self.out_root / f"trial-{got.root_number:04d}", hooks=outcome,
                        # An extension is not compared at a step with trials that started from scratch: no pruning.
                        eval_every=None if got.extension else self.cfg.train.eval_every,
                        init_state=got.extension.state if got.extension else None,
                        checkpoint_every=self.cfg.train.checkpoint_every,
                        keep_checkpoints=self.cfg.train.keep_checkpoints, overfit_drop=self.cfg.train.overfit_drop,
                        maximize=self.cfg.study.direction == "maximize", owner=self._checkpoint_owner(got))

    def _rows_for(self, model: str, max_length: int):
        key = (model, max_length)
        if key not in self._encoded:
            splits, _ = self.ready.fitted(model, max_length)
            self._encoded[key] = encode(self.ready.tokenizers[model], splits.train, max_length)
        return self._encoded[key]

    def _checkpoint_owner(self, got: Acquired) -> str:
        """Written into each checkpoint: only retries of the same trial resume from it. The root trial's start time
        tells a study apart from an earlier one that was deleted and created again under the same name and output
        folder (same trial numbers, same folders), and every worker reads the same value from the storage."""
        root = frozen_by_number(self.study, got.root_number)
        started = root.datetime_start.isoformat() if root.datetime_start else "unknown"
        return f"{self.study.study_name}/trial-{got.root_number}/{started}"

    # -- giving trials back -------------------------------------------------------------------------------------
    def _trial_error(self, got: Acquired, exc: Exception) -> None:
        detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        self._hand_back(got, "error", detail, None, retry=False)
        self.reporter.trial_ended(got.trial.number, "FAIL", {"fail_reason": "error",
                                                             "fail_detail": f"{type(exc).__name__}: {exc}"})
        if isinstance(exc, TunerError):
            raise exc

    def _hand_back(self, got: Acquired, reason: str, detail: str, step: int | None, retry: bool = True) -> str:
        """Mark the trial FAIL with its reason, and (for interruptions) enqueue a retry with the same parameters,
        which will resume from the trial's latest checkpoint. A second signal waits until this is written. Returns
        "handed_back", "finished" (it was told already) or "running" (the storage would not take it, said on the
        terminal: it stays RUNNING until its heartbeat goes stale)."""
        with self.stopper.shielded():
            outcome = self._write_hand_back(got, reason, detail, step, retry)
        if outcome != "running":
            self._held.pop(got.trial.number, None)
        return outcome

    def _write_hand_back(self, got: Acquired, reason: str, detail: str, step: int | None, retry: bool) -> str:
        trial = got.trial

        def mark() -> bool:
            if frozen(self.study, trial_id(trial)).state != TrialState.RUNNING:
                return False  # already told (the training loop's own bookkeeping ran first)
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("fail_detail", detail[-2000:])
            if step is not None:
                trial.set_user_attr("checkpoint_step", step)
            tell(self.study, trial, state=TrialState.FAIL, skip_if_finished=True)
            return True

        try:
            told = with_retries(mark)
        except optuna.exceptions.UpdateFinishedTrialError:
            return "finished"
        except Exception as exc:  # said, not swallowed
            self.reporter.warning(f"trial {trial.number}: could not hand it back to the storage ({one_line(exc)}); "
                                  f"it stays RUNNING until its heartbeat goes stale "
                                  f"(grace period {self.cfg.study.grace_period} s), then a worker fails and "
                                  f"retries it")
            return "running"
        if told and retry:
            try:
                with_retries(lambda: self.retry(self.study, frozen(self.study, trial_id(trial))))
            except Exception as exc:
                self.reporter.warning(f"trial {trial.number}: FAIL recorded, but its retry could not be queued "
                                      f"({one_line(exc)}); enqueue it again by hand")
        return "handed_back" if told else "finished"


def run_worker(cfg: SweepConfig, opts: WorkerOptions, reporter: Reporter | None = None) -> WorkerReport:
    worker = Worker(cfg, opts, reporter)
    worker.prepare()
    return worker.run()


def trial_estimate(ended) -> float | None:
    """Seconds a whole trial takes on this worker, from the trials it has seen end (COMPLETE or PRUNED): the longest
    of them, each scaled to all its steps (a pruned one stopped early, a resumed one started late; a new trial cannot
    know it will be pruned). A trial's time in its group (`run_s`), not its `duration_s`: the first trial of a worker
    also waited for the base to load and the base-model baseline (on Ames 5m04s against 4m28s for the next one).
    None before any has ended."""
    longest = None
    for t in ended:
        a = t.user_attrs
        took, steps, total = a.get("run_s") or a.get("duration_s"), a.get("steps"), a.get("total_steps")
        ran = (steps or 0) - (a.get("resumed_from_step") or 0)
        if took and total and ran > 0:
            longest = max(longest or 0.0, took * total / ran)
    return longest


def deadline_reason(elapsed: float, deadline: float, took: float | None) -> str | None:
    """Why no new trial may start `elapsed` seconds into a run with this deadline, when a trial takes `took` seconds
    here (None: no trial has ended yet, so the next one starts while the deadline is ahead)."""
    if elapsed >= deadline:
        return f"deadline {fmt.secs(deadline)} reached: no new trials"
    if took is not None and elapsed + took > deadline:
        return (f"deadline {fmt.secs(deadline)}: {fmt.secs(deadline - elapsed)} left, and a trial takes up to "
                f"{fmt.secs(took)} here: no new trials")
    return None



@dataclass
class Extension:
    parent: int  # the trial trained further
    rows: list  # its new rows, encoded
    state: dict  # its kept adapter's weights, where training starts


def plan_extension(left: float, parent: dict, test_rows: int, spare_rows: int, batch: int,
                   min_steps: int) -> int | str:
    """Steps of `study.extend` that fit in `left` seconds, from the parent trial's own timings (its seconds per step,
    and its test scoring at its rows per second, a tenth more), with a margin for its set-up and saving and for
    steps slower than the parent's (15 s and 10% of the time left); capped by the spare rows in whole batches. A
    string says why there is no room. With 5% and 10 s, an Ames extension (76 steps at 2.49 s where its parent took
    2.34, its scoring 52 s against 47) ended 8 s past a 14.5-minute deadline."""
    ran = (parent.get("steps") or 0) - (parent.get("resumed_from_step") or 0)
    if ran <= 0 or not parent.get("train_seconds") or not parent.get("score_rows_per_s"):
        return "its timings are not recorded"
    per_step = parent["train_seconds"] / ran
    scoring = test_rows / parent["score_rows_per_s"]
    steps = int((left - 1.1 * scoring - 15 - 0.1 * left) // per_step)
    by_rows = spare_rows // batch
    if by_rows < min_steps:
        return f"{spare_rows} train rows no trial has seen, {by_rows} steps (study.extend.min_steps {min_steps})"
    if steps < min_steps:
        return (f"{fmt.secs(max(left, 0))} left holds {max(steps, 0)} steps of {per_step:.2f} s and the test scoring "
                f"({fmt.secs(scoring)}) (study.extend.min_steps {min_steps})")
    return min(steps, by_rows)
