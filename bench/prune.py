"""Pruning: the same seeded study with and without a pruner on the embedded default, in one run. Prints the
optimizer steps each spent and the best value each found; the last line is the summary.

  python bench/prune.py                                  # CPU: sweeps/default.yaml, 12 trials each (about 46 min)
  python bench/prune.py --workdir /tmp/prune --pruner median   # keeps both studies; reruns only the pruned one
  python bench/prune.py --model random:1b --device cuda  # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from common import emit, resolve


def run_study(cfg_dict: dict, label: str, device: str | None, workdir: Path) -> dict:
    import optuna

    from tuner.config import parse_config
    from tuner.worker import WorkerOptions, run_worker

    cfg = parse_config(cfg_dict, f"<bench {label}>")
    url = f"sqlite:///{workdir}/{label}.db"
    fingerprint = json.dumps(cfg_dict, sort_keys=True, default=str)
    t0 = time.time()
    study = _finished(url, cfg.study.name, fingerprint, cfg.study.trials)
    reused = study is not None
    if study is None:
        run_worker(cfg, WorkerOptions(storage_url=url, device=device))
        study = optuna.load_study(study_name=cfg.study.name, storage=url)
        study.set_user_attr("bench_config", fingerprint)
    steps = sum(int(t.user_attrs.get("steps", 0)) for t in study.trials)
    states = [t.state.name for t in study.trials]
    out = {"bench": "prune", "study": label, "trials": len(study.trials), "pruned": states.count("PRUNED"),
           "complete": states.count("COMPLETE"), "optimizer_steps": steps, "best_value": study.best_value,
           "best_trial": study.best_trial.number, "seconds": round(time.time() - t0, 1), "reused": reused,
           "steps_per_trial": [int(t.user_attrs.get("steps", 0)) for t in study.trials]}
    emit(out)
    return out


def _finished(url: str, name: str, fingerprint: str, trials: int):
    """A study this bench already ran to the end with the very same settings (kept with --workdir), or None."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return None
    done = [t for t in study.trials if t.state.is_finished()]
    if study.user_attrs.get("bench_config") == fingerprint and len(done) == trials == len(study.trials):
        return study
    optuna.delete_study(study_name=name, storage=url)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default=str(Path(__file__).resolve().parent.parent / "sweeps" / "default.yaml"))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--pruner", default="successive_halving", choices=("median", "successive_halving", "hyperband"))
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--min-resource", type=int, default=5)
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--n-startup-trials", type=int, default=2, help="median pruner only")
    ap.add_argument("--workdir", default=None,
                    help="keep both studies here (SQLite); a later run with identical settings reuses a finished one, "
                         "so that only the side whose settings changed runs again")
    ap.add_argument("--model", default=None, help="override the sweep's model: builtin, a folder or random:SHAPE")
    ap.add_argument("--device", default=None)
    ap.add_argument("--train-rows", type=int, default=None, help="override data.train_rows (shorter trials)")
    args = ap.parse_args()

    base = yaml.safe_load(Path(args.sweep).read_text())
    base.setdefault("study", {})["trials"] = args.trials
    base.setdefault("tracking", {})["wandb"] = {"mode": "disabled"}
    base.setdefault("train", {})["eval_every"] = args.eval_every
    base["train"]["eval_rows"] = min(base.get("data", {}).get("val_rows", 64), 32)
    if args.train_rows:
        base.setdefault("data", {})["train_rows"] = args.train_rows
    if args.model:
        base["model"] = {"name": resolve(args.model).path}
    if args.pruner == "median":
        pruner = {"type": "median", "n_startup_trials": args.n_startup_trials}
    else:
        pruner = {"type": args.pruner, "min_resource": args.min_resource, "reduction_factor": args.reduction_factor}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        plain = {**base, "study": {**base["study"], "name": "unpruned", "output_dir": str(work / "runs"),
                                   "pruner": {"type": "none"}}}
        pruned = {**base, "study": {**base["study"], "name": "pruned", "output_dir": str(work / "runs"),
                                    "pruner": pruner}}
        a = run_study(plain, "unpruned", args.device, work)
        b = run_study(pruned, "pruned", args.device, work)
    share = b["optimizer_steps"] / a["optimizer_steps"]
    gap = (b["best_value"] - a["best_value"]) / abs(a["best_value"])
    print(f"prune: {args.trials} trials each, pruner={args.pruner} eval_every={args.eval_every}: "
          f"unpruned {a['optimizer_steps']} steps best {a['best_value']:.4g}; pruned {b['optimizer_steps']} steps "
          f"({share:.0%}) best {b['best_value']:.4g} ({gap:+.1%} vs unpruned); {b['pruned']} of {b['trials']} pruned"
          + ("; unpruned study reused from --workdir" if a["reused"] else ""),
          flush=True)


if __name__ == "__main__":
    main()
