"""A trial's training checkpoints on disk: write one, resume from the newest readable one, keep the best adapter.

A checkpoint is a folder `step-NNNNNN/` under the run's `checkpoints/`: the adapter in peft's format, the
optimizer, scheduler and loop state, and `owner.txt`, which says which trial wrote it. Only retries of that trial
resume from it; a study deleted and created again under the same name and output folder has other owners, and
their folders are removed rather than resumed. Folders are written under a temporary name and renamed into place,
so a half-written checkpoint is never taken for a finished one. `best.safetensors` beside them holds the adapter
with the best value on the whole validation split (an epoch's end), which the trial ends with.

The loop state is read with `torch.load(weights_only=True)`: tensors and plain values only. A run folder may be
shared between machines, and a full unpickle would run whatever code a file there names; a state that needs more
than tensors and plain values is refused as unreadable, like a corrupted one.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

from . import lora

PREFIX = "step-"
STATE_FILE = "train_state.pt"
OWNER_FILE = "owner.txt"
BEST_FILE = "best.safetensors"

# Per-parameter optimizer state that has its parameter's shape (torch's AdamW and SGD, bitsandbytes' state1/2).
_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")


def read_owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER_FILE).read_text().strip()
    except OSError:
        return None


def folder_for(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def write(root: Path, step: int, *, adapter: lora.Adapter, base_name: str, owner: str | None, state: dict,
          keep: int, best_step: int | None) -> Path:
    """Write step `step`'s checkpoint (once), then drop all but the newest `keep` and the best one."""
    final = folder_for(root, step)
    if (final / STATE_FILE).exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora.save_adapter(adapter, tmp / "adapter", base_name)
    if owner is not None:
        (tmp / OWNER_FILE).write_text(owner)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for folder in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        if best_step is not None and folder.name == folder_for(root, best_step).name:
            continue  # the best one stays: `tuner promote --checkpoint` may want it
        shutil.rmtree(folder, ignore_errors=True)
    return final


class UnreadableCheckpoint(Exception):
    """A state file that is not tensors and plain values (or not a torch file at all)."""


def load_state(path: Path) -> dict:
    """A checkpoint's loop state, tensors and plain values only: never code (see the module's docstring)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnreadableCheckpoint(f"unreadable {path.name}, refused ({type(exc).__name__}: {first[:160]})") from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"unreadable {path.name}, refused (a {type(state).__name__}, not a mapping)")
    return state


def _check_state_shapes(optimizer) -> None:
    """torch's load_state_dict matches state to parameters by position, not shape: a checkpoint whose state does
    not fit (written before B was held transposed as [r, out]) would load, then fail at the first step."""
    for p, state in optimizer.state.items():
        for key in _SHAPED_STATE:
            v = state.get(key)
            if torch.is_tensor(v) and v.shape != p.shape:
                raise ValueError(f"optimizer state {key} has shape {tuple(v.shape)}, its parameter "
                                 f"{tuple(p.shape)}")


def resume(root: Path, owner: str | None, adapter: lora.Adapter, optimizer, scheduler,
           skipped: list[str]) -> tuple[dict, dict | None] | None:
    """Load the newest readable checkpoint of `owner` into the adapter, optimizer and scheduler. Returns (its loop
    state, the best adapter's weights or None), or None to start fresh. A corrupted checkpoint is skipped with a
    note in `skipped`, falling back to the one before it; another owner's are removed. `owner` None: any."""
    foreign = []
    for folder in sorted(root.glob(f"{PREFIX}*"), reverse=True):
        if owner is not None:
            found = read_owner(folder)
            if found != owner:
                foreign.append(folder)
                skipped.append(f"{folder.name}: written by {found or 'an unknown run'}, not by this trial; removed")
                continue
        try:
            state = load_state(folder / STATE_FILE)
            _, tensors = lora.load_adapter_state(folder / "adapter")
            adapter.load_state_dict(tensors)
            optimizer.load_state_dict(state["optimizer"])
            _check_state_shapes(optimizer)
            scheduler.load_state_dict(state["scheduler"])
        except Exception as exc:  # any unreadable piece makes the whole checkpoint unusable
            skipped.append(f"{folder.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        _remove_foreign(root, foreign, owner)
        return state, (load_best(root) if state.get("best") is not None else None)
    _remove_foreign(root, foreign, owner)
    return None


def _remove_foreign(root: Path, foreign: list[Path], owner: str | None) -> None:
    """Another run's checkpoints would otherwise count as this trial's newest and push its own out."""
    for folder in foreign:
        shutil.rmtree(folder, ignore_errors=True)
    own = [f for f in root.glob(f"{PREFIX}*") if read_owner(f) == owner]
    if foreign and not own:
        (root / BEST_FILE).unlink(missing_ok=True)


def save_best(root: Path, weights: dict[str, torch.Tensor], step: int, value: float) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".best-{os.getpid()}.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp),
              metadata={"step": str(step), "value": repr(value)})
    os.replace(tmp, root / BEST_FILE)


def load_best(root: Path) -> dict[str, torch.Tensor] | None:
    path = root / BEST_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def adapters(root: Path) -> dict[int, Path]:
    """Step -> adapter folder of every complete checkpoint a trial still has on disk."""
    out = {}
    for folder in sorted(Path(root).glob(f"{PREFIX}*")):
        adapter = folder / "adapter"
        if (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
            out[int(folder.name.removeprefix(PREFIX))] = adapter
    return out


def discard(root: Path) -> int:
    """Remove a run's checkpoints (every `step-*` folder and `best.safetensors`) once a COMPLETE trial has archived
    them in the artifact store (a checkpoint is kept once, there) or a trial was pruned. Returns the bytes freed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    freed = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return freed

