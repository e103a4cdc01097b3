"""Library chatter that says nothing actionable to a tuner user, turned down where tuner is the program.

Importing tuner changes nothing global. The CLI (`cli.main`) calls `configure_cli()` once for its own process; the
Python API (`tuner.api`) wraps each call in `scoped()`, which puts every variable, filter and level back as it was.
Real problems still surface as exceptions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# Read when the libraries act (tokenizers at a fork, W&B at `init`) or are imported (transformers' verbosity).
ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true", "TRANSFORMERS_VERBOSITY": "error"}
# Progress bars that write carriage-return updates into logs: off where the output is not a terminal.
PROGRESS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
LOGGERS = {
    # bitsandbytes looks for a Hub kernel used only by its AVX512-BF16 repacking path, which tuner turns off.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # 8-bit layers cast their input to float16 by design; said once per forward, per layer.
    "bitsandbytes.autograd._functions": logging.ERROR,
    "transformers": logging.ERROR,
}
# Optuna's experimental-feature notices for the heartbeat and artifact APIs tuner relies on deliberately.
WARNINGS = (r".*is experimental \(supported from", r"Argument ``.*`` is an experimental feature")


def interactive() -> bool:
    return sys.stderr.isatty()


def _apply(progress: bool) -> None:
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if not progress:
        for k, v in PROGRESS_ENV.items():
            os.environ.setdefault(k, v)
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not progress:
        _libraries_progress(False)


def _libraries_progress(on: bool) -> None:
    """The switches of libraries already imported (their environment variables are read at import)."""
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        (hub.enable_progress_bars if on else hub.disable_progress_bars)()
    tl = sys.modules.get("transformers.utils.logging")
    if tl is not None:
        (tl.enable_progress_bar if on else tl.disable_progress_bar)()


def configure_cli() -> None:
    """For the `tuner` process itself: quiet libraries; no third-party progress bars unless stderr is a terminal
    (tuner's own progress display is on stdout and draws nothing when it is not one)."""
    _apply(progress=interactive())


@contextlib.contextmanager
def scoped():
    """The same settings for the length of one API call, then everything as the caller had it."""
    saved_env = {k: os.environ.get(k) for k in (*ENV, *PROGRESS_ENV)}
    saved_levels = {name: logging.getLogger(name).level for name in LOGGERS}
    with warnings.catch_warnings():
        _apply(progress=True)  # a notebook keeps its download bars; only chatter is turned down
        try:
            yield
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
