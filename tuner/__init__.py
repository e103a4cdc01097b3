"""tuner: sweep orchestrator and experiment tracker for LoRA/QLoRA price-prediction fine-tunes.

The Python API (`tuner.run`, `tuner.load`, `tuner.predict`) is in `tuner.api`; every name here is imported lazily,
so `import tuner` loads no training stack and changes no environment variable, warning filter or logger.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "run", "load", "predict", "RunResult", "Study", "Trial"]


def __getattr__(name: str):
    if name in ("run", "load", "predict", "RunResult", "Study", "Trial"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
