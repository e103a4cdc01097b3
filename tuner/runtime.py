"""What a worker process needs around its trials: signals, heartbeats, the loaded bases it keeps, memory given
back between trials, and the `Reporter` through which it talks to the terminal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Protocol

from . import models
from .space import TrialParams


# ---------------------------------------------------------------------------------------------------------------
# What the worker tells the terminal (implemented by the CLI)


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...  # what makes a result doubtful: said loudly
    def trial_started(self, number: int, params: TrialParams, total_steps: int, note: str) -> None: ...
    def trial_step(self, number: int, record: dict, total_steps: int) -> None: ...
    def trial_ended(self, number: int, state: str, attrs: dict) -> None: ...


class NullReporter:
    def message(self, text):
        pass

    def warning(self, text):
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
    """First SIGINT/SIGTERM: finish the step, checkpoint, hand the trial back. Second: stop at once, after the
    trials this worker holds are handed back. Inside `shielded()` (a hand-back, a `tell`) a second signal waits
    until the block is done, so that a trial is never left half-written or RUNNING by the signal's timing."""

    def __init__(self, reporter: Reporter):
        self.requested = False
        self.reporter = reporter
        self._old: dict = {}
        self._shields = 0
        self._deferred = False

    def __call__(self) -> bool:
        """Whether a stop was asked (the training loop asks before every tick). A second signal that a finalizer
        swallowed (`_unraisable`) is raised here, outside any shielded block: as if it had landed here."""
        if self._deferred and not self._shields:
            self._deferred = False
            raise KeyboardInterrupt
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            if self._shields:
                if not self._deferred:
                    self.reporter.message(f"{signal.Signals(signum).name}: stopping once the trial being "
                                          f"recorded is written")
                self._deferred = True
                return
            raise KeyboardInterrupt
        self.requested = True
        self.reporter.message(f"{signal.Signals(signum).name}: stopping after this step (checkpoint, then the trial "
                              f"is handed back for a retry); send it again to stop at once")

    @contextlib.contextmanager
    def shielded(self, reraise: bool = True):
        """A block that a second signal does not cut: it is raised as KeyboardInterrupt when the block ends
        (`reraise`), or only remembered (the caller is stopping at once already)."""
        self._shields += 1
        try:
            yield
        finally:
            self._shields -= 1
        if reraise and self._deferred and not self._shields:
            self._deferred = False
            raise KeyboardInterrupt

    def _unraisable(self, info) -> None:
        """A second signal's KeyboardInterrupt that lands in a finalizer (a weakref callback while the garbage
        collector runs: seen in SQLAlchemy's class registry) cannot stop anything there; Python would print it as a
        traceback and go on. It is remembered instead, and raised at the loop's next check (`__call__`) or when the
        next shielded block ends, whichever comes first."""
        if isinstance(info.exc_value, KeyboardInterrupt) and self.requested:
            self._deferred = True
            return
        self._old_unraisable(info)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
            self._old_unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._old:
            sys.unraisablehook = self._old_unraisable
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

    @contextlib.contextmanager
    def beating(self, trial_id: int):
        """Heartbeats for one trial while the block runs, as Optuna's `_run_trial` holds one around a trial."""
        self.add(trial_id)
        try:
            yield
        finally:
            self.remove(trial_id)

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
# Bases kept between trials, memory given back


class BaseCache:
    """Loaded bases by (model, revision, bits, device). Holds at most `capacity`; the least recently used goes."""

    def __init__(self, capacity: int = 1, cpu_bf16="auto"):
        self.capacity, self.cpu_bf16 = capacity, cpu_bf16
        self._bases: dict[tuple, models.Base] = {}
        self.loads = 0

    def has(self, resolved: models.ResolvedModel, bits: int, device: str) -> bool:
        return (resolved.key, bits, device) in self._bases

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
