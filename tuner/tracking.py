"""Weights & Biases: one run per trial, grouped by study.

Without an API key W&B runs offline: the run is written under the study's output folder and can be uploaded later
with `wandb sync`. With a key and `mode: auto`, the W&B server is probed first (a TCP connection, a few seconds at
most, once per process): an unreachable server, or a run that cannot start online, makes the run offline with a
one-line warning instead of waiting out W&B's own timeouts and failing the trial; a tracking outage never fails
training. W&B's own caches are kept inside the output folder too unless the user set them. Knows nothing
of training internals: it is handed dictionaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import WandbSpec


def resolve_mode(spec: WandbSpec) -> str:
    if spec.mode != "auto":
        return spec.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


PROBE_TIMEOUT = 5.0  # seconds: W&B's own wait for an unreachable server is 90 s and more, per run
_probed: dict[str, str | None] = {}  # server URL -> None (reachable) or why not; probed once per process


def server_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when a TCP connection to the W&B server at `url` opens within `timeout` seconds, else why not. Behind
    an HTTP(S) proxy the server is not probed (the connection would go through the proxy): W&B is left to try."""
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None
    if url not in _probed:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                _probed[url] = None
        except (OSError, ValueError) as exc:
            _probed[url] = f"{type(exc).__name__}: {str(exc)[:120] or 'no answer'}"
    return _probed[url]


def choose_mode(spec: WandbSpec) -> tuple[str, str | None]:
    """The mode a run starts in, and why it is offline when online was wanted (None otherwise). Only `auto` with
    an API key is degraded: an explicit `mode: online` is the user's choice (W&B's own errors then say why)."""
    mode = resolve_mode(spec)
    if mode == "online" and spec.mode == "auto":
        why = unreachable(server_url())
        if why is not None:
            return "offline", f"cannot reach {server_url()} ({why})"
    return mode, None


def _keep_caches_inside(root: Path) -> None:
    # Under root/wandb, the folder W&B writes its runs to; a root/.wandb folder would be taken for that instead.
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        if var not in os.environ:
            path = root / "wandb" / "_cache" / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)


_warned: set[str] = set()


@dataclass
class RunInfo:
    mode: str
    run_id: str | None = None
    url: str | None = None
    dir: str | None = None  # the run's local folder (offline: what `wandb sync` uploads)
    error: str | None = None  # an online run that stopped logging part-way (the trial trained on)

    def to_attrs(self) -> dict:
        return {"wandb_mode": self.mode, "wandb_run_id": self.run_id, "wandb_url": self.url, "wandb_dir": self.dir,
                "wandb_error": self.error}


class TrialTracker:
    """A W&B run for one trial. With mode `disabled` every call is a no-op and `info.run_id` stays None."""

    def __init__(self, spec: WandbSpec, *, study: str, trial_number: int, config: dict, root: Path,
                 tags: list[str] | None = None, warn: Callable[[str], None] | None = None):
        self.mode, why = choose_mode(spec)
        self.run, self.warn = None, warn
        self.info = RunInfo(self.mode)
        if self.mode == "disabled":
            return
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        _keep_caches_inside(root)

        def start():
            return wandb.init(
                project=spec.project, entity=spec.entity, group=study, name=f"{study}/trial-{trial_number}",
                job_type="trial", config=config, dir=str(root), mode=self.mode, tags=tags, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                        x_disable_stats=True, x_disable_machine_info=True),
            )

        try:
            self.run = start()
        except Exception as exc:
            if self.mode != "online" or spec.mode != "auto":
                raise
            self.mode, why = "offline", f"the online run did not start ({type(exc).__name__}: {str(exc)[:160]})"
            self.run = start()
        if why is not None and warn is not None and why not in _warned:  # once per process and reason
            _warned.add(why)
            warn(f"W&B: {why}; runs are written offline under {root / 'wandb'} (upload them with `wandb sync`)")
        self.info = RunInfo(self.mode, self.run.id, getattr(self.run, "url", None) if self.mode == "online" else None,
                            str(Path(self.run.dir).parent))

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is not None:
            try:
                self.run.log(data, step=step)
            except Exception as exc:
                self._lost(exc)

    def summary(self, data: dict) -> None:
        if self.run is not None:
            try:
                for k, v in data.items():
                    self.run.summary[k] = v
            except Exception as exc:
                self._lost(exc)

    def _lost(self, exc: Exception, close: bool = True) -> None:
        """An online run that fails part-way (the network went, the server refused) stops being logged, with one
        warning and `wandb_error` on the trial; the trial trains on. Offline writes are local files: their errors
        are the disk's, and raise."""
        if self.mode != "online":
            raise exc
        self.info.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        run, self.run = self.run, None
        if self.warn is not None:
            self.warn(f"W&B: run {self.info.run_id} stopped logging ({self.info.error}); the trial trains on "
                      f"without it")
        if close:  # let W&B close what it can; an outage may make this fail too
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def finish(self, exit_code: int = 0) -> RunInfo:
        """Flush and close. Offline, raises if W&B could not write the run: a trial is only COMPLETE with its run
        written. Online, an outage is recorded (`wandb_error`) and said, never raised."""
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:
                self._lost(exc, close=False)  # `finish` itself failed: not tried again
            self.run = None
            if self.mode == "offline":
                files = list(Path(self.info.dir).glob("*.wandb")) if self.info.dir else []
                if not files:
                    raise RuntimeError(f"W&B offline run {self.info.run_id} left no .wandb file in {self.info.dir}")
        return self.info
