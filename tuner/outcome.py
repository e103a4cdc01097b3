"""What happens to one trial while and after it trains: progress, evaluation and pruning, checkpoints pushed, and at
the end its scoring, artifacts, W&B run and `tell`. The training loop calls a `TrialOutcome` through `RunHooks`;
the worker calls `finalize` when the run leaves its group.

An outcome is handed a narrow `TrialContext` (the study, the data, the scorer, where artifacts go, how to hand a
trial back), never the worker: it knows what a trial needs, not how trials are acquired or scheduled.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import optuna
from optuna.trial import TrialState

from . import artifacts, checkpoints, lora, models
from .config import SweepConfig
from .data import Splits
from .errors import Interrupted, TrialFailure, one_line
from .runtime import Reporter, memory_attrs
from .scoring import PriceScorer, answer_spread, collapse_line, price_metrics
from .space import TrialParams
from .study import baselines, tell, with_retries
from .tracking import TrialTracker
from .train import Evaluation, TrialRun

# hand_back(reason, detail, checkpoint step, retry): mark the trial FAIL and, for an interruption, queue its retry;
# returns "handed_back", "finished" (told already) or "running" (the storage would not take it).
HandBack = Callable[[str, str, "int | None", bool], str]


@dataclass
class TrialContext:
    """What one trial's outcome needs from the worker that runs it."""

    study: optuna.Study
    cfg: SweepConfig
    splits: Splits
    scorer: PriceScorer
    store_dir: Path  # the artifact store
    reporter: Reporter
    device: str
    runs_root: Path  # the study's run folders' parent (`places.runs_root`); W&B writes its runs under it
    hub_token: str | None = None
    # Around each `tell` and the attributes written with it: a second Ctrl-C waits for the block (Stopper.shielded).
    shield: Callable[[], ContextManager] = contextlib.nullcontext

    @property
    def study_name(self) -> str:
        return self.study.study_name


class TrialOutcome:
    """One trial's link between the training loop and the study."""

    def __init__(self, ctx: TrialContext, trial: optuna.Trial, params: TrialParams, base: models.Base, *,
                 root_number: int, retry_of: int | None, hand_back: HandBack):
        self.ctx, self.trial, self.params, self.base = ctx, trial, params, base
        self.root_number, self.hand_back = root_number, hand_back
        self.t0 = time.time()
        self.state = "pending"
        self.tracker = TrialTracker(ctx.cfg.tracking.wandb, study=ctx.study_name, trial_number=trial.number,
                                    config={**params.to_dict(), "study": ctx.study_name, "trial": trial.number,
                                            "retry_of": retry_of},
                                    root=ctx.runs_root, warn=ctx.reporter.warning)
        trial.set_user_attr("wandb_run_id", self.tracker.info.run_id)
        trial.set_user_attr("wandb_mode", self.tracker.info.mode)
        self._started = False
        self._pushed: dict[str, str] = {}
        self._push_errors: list[str] = []
        self._hub_unreachable = False

    # -- RunHooks ------------------------------------------------------------------------------------------------------
    def on_step(self, run: TrialRun, record: dict) -> None:
        if not self._started:
            self._on_first_step(run)
        self.tracker.log({"train/loss": record["loss"], "train/lr": record["lr"],
                          "train/grad_norm": record["grad_norm"], "train/epoch": record["epoch"]}, step=record["step"])
        self.ctx.reporter.trial_step(self.trial.number, record, run.total_steps)

    def _on_first_step(self, run: TrialRun) -> None:
        self._started = True
        note = f"resumed from step {run.resumed_from_step}" if run.resumed_from_step else ""
        if run.resumed_from_step:
            self.trial.set_user_attr("resumed_from_step", run.resumed_from_step)
        if run.skipped_checkpoints:
            self.trial.set_user_attr("skipped_checkpoints", run.skipped_checkpoints)
            self.ctx.reporter.message(f"trial {self.trial.number}: skipped unreadable checkpoint(s): "
                                      + "; ".join(run.skipped_checkpoints))
        self.trial.set_user_attr("trainable_params", run.adapter.trainable_parameters)
        self.ctx.reporter.trial_started(self.trial.number, self.params, run.total_steps, note)

    def on_evaluate(self, run: TrialRun, step: int) -> Evaluation:
        """The validation subset (every `eval_every` steps) or the whole validation split (at epoch ends and at
        the end, where it decides which adapter the trial keeps)."""
        cfg, splits = self.ctx.cfg, self.ctx.splits
        rows = splits.val if run.on_whole_validation() else splits.val[: cfg.train.eval_rows]
        # Read greedily even under `scoring.method: median`: these readings only rank trials for the pruner and draw
        # the curves, and drawing prices five times a trial would cost a quarter of its time on a CPU.
        res = self.ctx.scorer.predict(self.base.model, [e.prompt for e in rows], adapter=run.name, greedy=True)
        metrics = price_metrics([p.value for p in res.predictions], [e.price for e in rows])
        value = metrics[cfg.study.objective]
        self.trial.report(value, step)
        self.tracker.log({f"val/{k}": v for k, v in metrics.items() if k != "n"}, step=step)
        # Past `pruner.until` of its steps a trial is not asked about: it runs to its end (see PrunerSpec.until).
        askable = not run.done and step <= cfg.study.pruner.until * run.total_steps
        return Evaluation(value, prune=askable and self.trial.should_prune())

    def on_checkpoint(self, run: TrialRun, step: int, path: Path) -> None:
        self.trial.set_user_attr("last_checkpoint_step", step)
        hub = self.ctx.cfg.tracking.hub
        if not hub.push_checkpoints:
            return
        if not self.ctx.hub_token:
            self.trial.set_user_attr("hub_push", "skipped: no Hugging Face token")
            return
        if self._hub_unreachable:  # said once; each later push would wait on the network again
            return
        from .promote import PromoteError, push_checkpoint

        # The chain's first trial names the repository, so that a retry resuming this trial pushes beside it.
        repo = f"{hub.repo}-trial-{self.root_number}"
        info = self._adapter_info().model_copy(update={"checkpoint_step": step})
        try:
            commit = push_checkpoint(path / "adapter", info, repo, token=self.ctx.hub_token)
        except PromoteError as exc:  # the Hub's trouble is not the trial's: record it, say it once, train on
            self._push_errors.append(f"step {step}: {exc}")
            self.trial.set_user_attr("hub_push_errors", self._push_errors)
            self._hub_unreachable = str(exc).startswith("could not reach the Hub")
            if self._hub_unreachable:
                self.trial.set_user_attr("hub_push", f"stopped at step {step}: the Hub could not be reached; "
                                                     f"checkpoints kept locally and in the artifact store")
            if len(self._push_errors) == 1:
                later = ("its later checkpoints are not pushed" if self._hub_unreachable
                         else "later ones are tried, failures recorded on the trial")
                self.ctx.reporter.warning(f"trial {self.trial.number}: checkpoint at step {step} not pushed ({exc}); "
                                          f"training goes on; {later}")
            return
        self._pushed[str(step)] = commit
        self.trial.set_user_attr("hub_checkpoints", {"repo": repo, "commits": self._pushed})

    # -- the end -------------------------------------------------------------------------------------------------------
    def finalize(self, run: TrialRun) -> None:
        """Record the run's end on the trial, whatever it was; a trial whose outcome cannot be written in full is
        not COMPLETE."""
        attrs = {**run.stats(), **memory_attrs(self.ctx.device)}
        attrs["loss_first"] = run.history[0]["loss"] if run.history else None
        attrs["loss_last"] = run.history[-1]["loss"] if run.history else None
        if run.resumed_from_step:
            attrs["resumed_from_step"] = run.resumed_from_step
        try:
            end = {"completed": self._complete, "pruned": self._pruned,
                   "interrupted": self._interrupted}.get(run.status, self._failed)
            self.state = end(run, attrs)
        except Exception as exc:
            attrs.update(fail_reason="finalize_error", fail_detail=f"{type(exc).__name__}: {exc}")

            def record() -> None:
                self._set_attrs(attrs)
                tell(self.ctx.study, self.trial, state=TrialState.FAIL, skip_if_finished=True)

            try:
                with self.ctx.shield():
                    with_retries(record)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
            except Exception as store_exc:  # said, not swallowed: its heartbeat going stale fails it later
                self.ctx.reporter.warning(f"trial {self.trial.number}: could not record its failure in the storage "
                                          f"({one_line(store_exc)}); it stays RUNNING "
                                          f"until its heartbeat goes stale")
            self.state = "FAIL"
        self.ctx.reporter.trial_ended(self.trial.number, self.state, attrs)

    def _complete(self, run: TrialRun, attrs: dict) -> str:
        """Score the kept adapter on the test split, save it and its artifacts, close the W&B run, then tell."""
        ctx, test = self.ctx, self.ctx.splits.test
        res = ctx.scorer.predict(self.base.model, [e.prompt for e in test], adapter=run.name)
        metrics = price_metrics([p.value for p in res.predictions], [e.price for e in test])
        metrics["off_grammar_rate"] = sum(p.off_grammar_steps > 0 for p in res.predictions) / len(test)
        metrics["score_rows_per_s"] = res.rows_per_s
        spread = answer_spread([p.value for p in res.predictions])  # on the trial, not a metric: see `collapse_line`
        collapsed = collapse_line(spread, len(test))
        if collapsed:
            ctx.reporter.warning(f"trial {self.trial.number}: {collapsed}")
        adapter_dir = run.run_dir / "adapter"
        lora.save_adapter(run.adapter, adapter_dir, self.base.resolved.name, self.base.resolved.revision)
        info = self._adapter_info()
        saved = artifacts.save_trial_artifacts(self.trial, ctx.study, ctx.store_dir, adapter_dir, info, test,
                                               res.predictions, metrics)
        try:
            # The last step's checkpoint is a resume point only: the kept adapter above is the end of training.
            kept = {s: p for s, p in checkpoints.adapters(run.checkpoint_root).items() if s < run.total_steps}
            saved.update(artifacts.save_checkpoints_artifact(self.trial, ctx.store_dir, kept, info))
        except BaseException:  # all of a trial's artifacts or none: the three above go too
            artifacts.remove_all(artifacts.open_store(ctx.store_dir), [v for k, v in saved.items()
                                                                       if k.endswith("_artifact_id")])
            raise
        attrs.update(saved)
        attrs.update(metrics)
        attrs.update(spread, collapsed=collapsed is not None)
        attrs["adapter_path"] = str(adapter_dir.resolve())
        self.tracker.summary({f"test/{k}": v for k, v in metrics.items()})
        # The baselines beside the trial's own numbers, where a W&B user compares runs.
        self.tracker.summary({f"baseline/{key}/{m}": b[m] for key, b in baselines(ctx.study).items()
                              for m in ("mae", "rmsle", "hit_rate") if m in b})
        attrs.update({k: v for k, v in self.tracker.finish().to_attrs().items() if v is not None})
        with ctx.shield():
            self._set_attrs(attrs)
            tell(ctx.study, self.trial, metrics[ctx.cfg.study.objective])
        self._discard_checkpoints(run)
        return "COMPLETE"

    def _discard_checkpoints(self, run: TrialRun) -> None:
        """A COMPLETE trial's checkpoints are in the artifact store now (`save_checkpoints_artifact`), and a PRUNED
        trial's are never used: nothing resumes from either, so the run folder's copies go. The kept adapter of a
        COMPLETE trial stays (`adapter_path`); `tuner clean` removes whole run folders."""
        try:
            checkpoints.discard(run.checkpoint_root)
        except OSError as exc:  # the trial is told already; a folder left behind is worth a line, not a failure
            self.ctx.reporter.message(f"trial {self.trial.number}: could not remove {run.checkpoint_root}: {exc}")

    def _pruned(self, run: TrialRun, attrs: dict) -> str:
        attrs["pruned_at_step"] = run.step
        self.tracker.summary({"state": "pruned", "pruned_at_step": run.step})
        self.tracker.finish()
        with self.ctx.shield():
            self._set_attrs(attrs)
            tell(self.ctx.study, self.trial, state=TrialState.PRUNED)
        # Nothing resumes or promotes a pruned trial: its checkpoints would be dead weight (in the measured default
        # study, 255 of about 343 MB were the checkpoints of its two pruned trials).
        self._discard_checkpoints(run)
        return "PRUNED"

    def _interrupted(self, run: TrialRun, attrs: dict) -> str:
        step = run.error.checkpoint_step if isinstance(run.error, Interrupted) else None
        if step is None:  # stopped at once (no checkpoint written then): the retry resumes from its newest one
            on_disk = checkpoints.adapters(run.checkpoint_root)
            step = max(on_disk) if on_disk else None
        self._set_attrs(attrs)
        self.tracker.finish(exit_code=1)
        self.hand_back("interrupted", "stopped by a signal; retried from its checkpoint", step, True)
        attrs.update(fail_reason="interrupted", checkpoint_step=step)
        return "INTERRUPTED"

    def _failed(self, run: TrialRun, attrs: dict) -> str:
        err = run.error
        reason = err.reason if isinstance(err, TrialFailure) else "error"
        attrs.update(fail_reason=reason, fail_detail=str(err))
        self.tracker.summary({"state": "failed", "fail_reason": reason})
        self.tracker.finish(exit_code=1)
        with self.ctx.shield():
            self._set_attrs(attrs)
            tell(self.ctx.study, self.trial, state=TrialState.FAIL)
        return "FAIL"

    def _set_attrs(self, attrs: dict) -> None:
        """Written just before `tell`: `duration_s` is measured here, so that it covers test scoring and artifacts
        and is the one duration the run line, `tuner status`, the report and the card show (`fmt.trial_duration`)."""
        for k, v in attrs.items():
            if v is not None and k != "duration_s":
                self.trial.set_user_attr(k, v)
        attrs["duration_s"] = self.duration()  # last, so that only `tell` itself falls outside it
        self.trial.set_user_attr("duration_s", attrs["duration_s"])
        # From joining its group (base loaded, baseline scored) to here: what one more trial costs this worker,
        # without the loading that only a worker's first trial waits for (`worker.trial_estimate`).
        attrs["run_s"] = time.time() - self.t0
        self.trial.set_user_attr("run_s", attrs["run_s"])

    def duration(self) -> float:
        """Seconds since the trial's start in the study (`datetime_start`, local time as Optuna records it)."""
        import datetime as dt

        started = self.trial.datetime_start
        return (dt.datetime.now() - started).total_seconds() if started else time.time() - self.t0

    def _adapter_info(self) -> artifacts.AdapterInfo:
        return artifacts.adapter_info(self.ctx.cfg, self.ctx.splits, self.params, self.base, self.ctx.study_name,
                                      self.trial.number)
