"""Weights & Biases: one run per trial, grouped by study.

Without an API key W&B runs offline: the run is written under the study's output folder and can be uploaded later
with `wandb sync`. W&B's own caches are kept inside the output folder too unless the user set them. Knows nothing
of training internals: it is handed dictionaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import WandbSpec


def resolve_mode(spec: WandbSpec) -> str:
    if spec.mode != "auto":
        return spec.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _keep_caches_inside(root: Path) -> None:
    # Under root/wandb, the folder W&B writes its runs to; a root/.wandb folder would be taken for that instead.
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        if var not in os.environ:
            path = root / "wandb" / "_cache" / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)


@dataclass
class RunInfo:
    mode: str
    run_id: str | None = None
    url: str | None = None
    dir: str | None = None  # the run's local folder (offline: what `wandb sync` uploads)

    def to_attrs(self) -> dict:
        return {"wandb_mode": self.mode, "wandb_run_id": self.run_id, "wandb_url": self.url, "wandb_dir": self.dir}


class TrialTracker:
    """A W&B run for one trial. With mode `disabled` every call is a no-op and `info.run_id` stays None."""

    def __init__(self, spec: WandbSpec, *, study: str, trial_number: int, config: dict, root: Path,
                 tags: list[str] | None = None):
        self.mode = resolve_mode(spec)
        self.run = None
        self.info = RunInfo(self.mode)
        if self.mode == "disabled":
            return
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        _keep_caches_inside(root)
        self.run = wandb.init(
            project=spec.project, entity=spec.entity, group=study, name=f"{study}/trial-{trial_number}",
            job_type="trial", config=config, dir=str(root), mode=self.mode, tags=tags, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                    x_disable_stats=True, x_disable_machine_info=True),
        )
        self.info = RunInfo(self.mode, self.run.id, getattr(self.run, "url", None) if self.mode == "online" else None,
                            str(Path(self.run.dir).parent))

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> RunInfo:
        """Flush and close. Raises if W&B could not write the run: a trial is only COMPLETE with its run written."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
            if self.mode == "offline":
                files = list(Path(self.info.dir).glob("*.wandb")) if self.info.dir else []
                if not files:
                    raise RuntimeError(f"W&B offline run {self.info.run_id} left no .wandb file in {self.info.dir}")
        return self.info
