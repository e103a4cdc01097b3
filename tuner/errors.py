"""Exceptions that carry a reason a user can act on.

`TrialFailure.reason` is a short machine-readable tag (``zero_grad``, ``nan_loss``, ``oom`` ...) that ends up in the
trial's user attributes, so that `tuner status` and optuna-dashboard show why a trial failed.
"""

from __future__ import annotations


class TunerError(Exception):
    """An error the CLI reports in one line, with exit code 2 (bad input) unless `exit_code` says otherwise."""

    exit_code = 2


class ConfigError(TunerError):
    """A sweep file that does not validate. The message names the file, the key and what is expected."""

    def __init__(self, file: str, key: str | None, expected: str, got: object = None, *, has_got: bool = False):
        self.file, self.key, self.expected, self.got = file, key, expected, got
        where = f"{file}: {key}" if key else file
        tail = f", got {got!r}" if has_got else ""
        super().__init__(f"{where}: expected {expected}{tail}")


class StorageError(TunerError):
    """The study storage cannot be reached, opened, or does not hold what was asked for."""


class DataError(TunerError):
    """The data source cannot be read, or too many of its rows are unusable."""


class TrialFailure(Exception):
    """A trial that cannot produce a trustworthy result. Never scored; the reason is recorded on the trial."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class TrialPruned(Exception):
    """Raised by the training loop when the pruner stops a trial; carries the step it stopped at."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"pruned at step {step} (validation value {value:.4g})")


class Interrupted(Exception):
    """SIGINT/SIGTERM: the loop stopped at a step boundary. `checkpoint_step` is None if nothing was written."""

    def __init__(self, checkpoint_step: int | None):
        self.checkpoint_step = checkpoint_step
        super().__init__(f"interrupted (checkpoint at step {checkpoint_step})")


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal stopped the worker at once, after it handed back the trials it held. `left_running`: the
    numbers of those the storage would not take back (they stay RUNNING until their heartbeat goes stale)."""

    def __init__(self, left_running: list[int]):
        self.left_running = left_running
        super().__init__(f"stopped at once; left RUNNING: {left_running}")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit`: a database driver's error spans lines (SQL, parameters,
    a link), and what the terminal is told about it is one line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:limit]}"
