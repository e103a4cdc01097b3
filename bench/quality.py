"""Quality at equal wall time: tuner's default study against a plain Optuna TPE loop over the same search space
(each trial trained alone to the end, no pruning, no co-training), on diamonds and on the Ames listings, in one run
on one machine. Each approach's best test MAE is printed as a fraction of the constant-median and classical
(TF-IDF + ridge) baselines; the last line is the summary.

  python bench/quality.py                                   # both data sets, the default sweep (about 1 hour)
  python bench/quality.py --sources builtin:diamonds --workdir /tmp/q   # keeps the studies to look at
  python bench/quality.py --seeds 0,1,2                     # three draws per data set (about 3 hours)

Equal wall time: tuner's default study runs first, to its own budget; its wall time W is then the plain loop's
budget (its clock starts before it reads the data, as tuner's does), and only plain trials that ended within W
count. Both take their best trial by its test MAE, which is how a study's value is defined (see README, "What a
trial is"). A draw's verdict is paired: the two best trials' absolute errors on the same test rows, their mean
difference and its 95% bootstrap interval. Only an interval that excludes zero is a win; otherwise the draw is a tie
(one trial's MAE on 100 rows moves by about a third with the rows drawn).

What the plain loop does not get is what tuner's default adds to a bare Optuna study: the sweep's queued first trials
(`study.enqueue`: the measured best settings, the learning rate moved to the data's number of steps) and pruning on
validation MAE. Both score each trial's last step (one epoch: tuner keeps the last adapter). The plain loop is TPE
alone over the same space, as a user of Optuna without tuner would run it.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import emit

HERE = Path(__file__).resolve().parent


def cpu_note() -> str:
    try:
        bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        bf16 = False
    return f"{os.cpu_count()} cores, {'AVX512-BF16' if bf16 else 'no AVX512-BF16'} ({platform.machine()})"


def default_sweep(source: str) -> dict:
    cfg = yaml.safe_load((HERE.parent / "sweeps" / "default.yaml").read_text())
    cfg["data"]["source"] = source  # only the data source changes, as a user pointing the default at their data
    return cfg


def paired_difference(a: dict, b: dict, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a's minus b's absolute error over the test rows both scored, with its 95% bootstrap interval (rows
    drawn with replacement, the same rows for both: a paired comparison)."""
    rows = sorted(set(a) & set(b))
    if not rows:
        raise ValueError("the two approaches scored no test row in common")
    diffs = [a[r] - b[r] for r in rows]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(draws))
    return sum(diffs) / len(diffs), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def dollars(x: float) -> str:
    return f"{'-' if x < 0 else ''}${abs(x):,.0f}"


def best_trial_errors(study, url: str) -> dict:
    """Absolute error per test row (row id) of the study's best trial, from its predictions in the artifact store."""
    from tuner import artifacts

    store = artifacts.open_store(artifacts.location(url), create=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = artifacts.fetch(store, study.best_trial, artifacts.PREDICTIONS_ATTR, Path(tmp) / "predictions.csv")
        return {r["row_id"]: float(r["error"]) for r in artifacts.read_predictions_csv(path)}


def score_rows(scorer, model, adapter: str, rows: list) -> tuple[dict, dict]:
    """An adapter's price metrics on `rows` and its absolute error per row id (in the rows' order). As the metrics
    and tuner's predictions file score them: an answer that is not a number counts as 0."""
    from tuner.scoring import price_metrics

    res = scorer.predict(model, [e.prompt for e in rows], adapter=adapter)
    metrics = price_metrics([x.value for x in res.predictions], [e.price for e in rows])
    return metrics, {e.row_id: abs((x.value or 0.0) - e.price) for x, e in zip(res.predictions, rows)}


def run_tuner(cfg_dict: dict, url: str, out_dir: Path) -> tuple[float, float, dict, dict]:
    """tuner's default study, run by the `tuner` command of the Python running this bench (`tuner run`, exactly as a
    user runs it; from a fresh venv, the installed wheel). Returns (best test MAE, wall seconds, its baselines, the
    best trial's error per test row)."""
    import optuna

    cfg_dict = copy.deepcopy(cfg_dict)
    cfg_dict["study"]["output_dir"] = str(out_dir)
    cfg_dict.setdefault("tracking", {})["wandb"] = {"mode": "disabled"}
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = out_dir / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    log = out_dir / "tuner-run.log"
    t0 = time.time()
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(sweep), "--storage", url],
                             stdout=fh, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    lines = log.read_text().splitlines()
    print("\n".join(lines[-3:]), flush=True)  # the run's own closing lines
    if res.returncode != 0:
        raise SystemExit(f"tuner run exited {res.returncode}; see {log}")
    study = optuna.load_study(study_name=cfg_dict["study"]["name"], storage=url)
    return study.best_value, wall, study.user_attrs["baselines"], best_trial_errors(study, url)


def run_plain(cfg_dict: dict, url: str, budget_s: float) -> tuple[float | None, int, dict]:
    """A plain Optuna loop: TPE over tuner's search space, each trial trained alone to its last step and scored on
    the test rows. No pruning, no co-training, no intermediate evaluation. Trials that end after `budget_s` do not
    count. Returns (best test MAE within the budget, trials counted, that trial's error per test row)."""
    import optuna

    from tuner.batches import encode
    from tuner.config import parse_config
    from tuner.loop import train_one
    from tuner.models import load_base, release
    from tuner.prepare import prepare
    from tuner.space import sample
    from tuner.train import TrialRun

    cfg_dict = copy.deepcopy(cfg_dict)
    cfg_dict["study"].pop("pruner", None)
    cfg = parse_config(cfg_dict, "<bench quality: plain>")
    # The clock starts before the data is read and tokenized, as tuner's wall time includes its own (a plain user
    # reads the data too); it does not pay for tuner's baselines, which the plain loop has none of.
    t0 = time.time()
    ready = prepare(cfg)
    bases: dict = {}
    ended: list[tuple[float, float, dict]] = []  # (seconds since start, test MAE, error per test row)

    def objective(trial: optuna.Trial) -> float:
        p = sample(trial, cfg, ready.modules, ready.max_lengths())
        key = (p.model, p.quant_bits)
        if key not in bases:
            for old in list(bases):
                release(bases.pop(old))
            bases[key] = load_base(ready.resolved[p.model], p.quant_bits, "cpu")
        base = bases[key]
        splits, _ = ready.fitted(p.model, p.max_length)
        rows, _ = encode(base.tokenizer, splits.train, p.max_length)
        scores: dict = {}

        def score(run):
            metrics, scores["errors"] = score_rows(ready.scorers[p.model], base.model, run.name, splits.test)
            scores.update(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            train_one(base, TrialRun(f"plain-{trial.number}", p, rows, Path(tmp), checkpoint_every=None),
                      on_done=score)
        ended.append((time.time() - t0, scores["mae"], scores["errors"]))
        return scores["mae"]

    study = optuna.create_study(study_name="plain", storage=url, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.study.sampler.seed,
                                                                   n_startup_trials=cfg.study.sampler.n_startup_trials))
    def no_time_left(study: optuna.Study, _trial) -> None:
        # A trial that cannot end within the budget would not count: stop rather than train it (same result, sooner).
        if not ended:
            return
        ends = [at for at, _, _ in ended]
        longest = max(b - a for a, b in zip([0.0] + ends, ends))
        if time.time() - t0 + longest > budget_s:
            study.stop()

    study.optimize(objective, timeout=budget_s, callbacks=[no_time_left])
    for key in list(bases):
        release(bases.pop(key))
    within = [(mae, errors) for at, mae, errors in ended if at <= budget_s]
    best = min(within, key=lambda x: x[0]) if within else (None, {})
    return best[0], len(within), best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="builtin:diamonds,builtin:ames")
    ap.add_argument("--workdir", help="keep the studies here (default: a temporary folder)")
    ap.add_argument("--seeds", help="comma-separated seeds, each a draw: train.seed and the sampler's seed, for both "
                    "approaches (default: one draw at the sweep's 42 and 0). One trial's MAE moves by about 15 points "
                    "with the seed, more than the approaches differ, so judge by several")
    ap.add_argument("--seed", type=int, help="one seed (as --seeds with one)")
    ap.add_argument("--smoke", action="store_true", help="2 trials on a few rows: checks the bench runs, measures nothing")
    args = ap.parse_args()
    seeds: list[int | None] = ([int(x) for x in args.seeds.split(",")] if args.seeds else
                               [args.seed] if args.seed is not None else [None])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tuner-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    summary = []
    for source in args.sources.split(","):
        slug = source.split(":")[-1].replace("/", "_").replace(".", "_")
        draws = []  # (tuner, plain) best MAE as a fraction of the constant median; plain None if no trial ended
        for seed in seeds:
            cfg = default_sweep(source)
            tag = slug if seed is None else f"{slug}-seed{seed}"
            if seed is not None:
                cfg["train"]["seed"] = cfg["study"]["sampler"]["seed"] = seed
            if args.smoke:
                cfg["study"].update(trials=2, timeout=None, deadline=None, pruner={"type": "none"})
                cfg["data"].update(train_rows=16, val_rows=8, test_rows=8)
                cfg["train"].update(eval_every=None, eval_rows=8, max_length_cap=96)
            best, wall, base, best_errors = run_tuner(cfg, f"sqlite:///{work}/{tag}-tuner.db", work / f"{tag}-runs")
            plain, counted, plain_errors = run_plain(cfg, f"sqlite:///{work}/{tag}-plain.db", wall)
            median, classical = base["median"]["mae"], base["classical"]["mae"]
            for label, value in (("tuner default", best), ("plain TPE", plain)):
                emit({"bench": "quality", "source": source, "approach": label, "best_mae": value,
                      "of_median": None if value is None else round(value / median, 3),
                      "of_classical": None if value is None else round(value / classical, 3),
                      "seed": cfg["train"]["seed"], "sampler_seed": cfg["study"]["sampler"]["seed"],
                      "wall_s": round(wall),
                      "plain_trials_counted": counted if label == "plain TPE" else None})
            # One trial's MAE on 100 rows moves by about a third either way with the rows drawn, so a lower number
            # is a win only when the paired interval of the difference excludes zero; otherwise it is a tie.
            if plain is None:
                verdict, interval = "tuner lower", "no plain trial ended in time"
            else:
                diff, low, high = paired_difference(best_errors, plain_errors)
                verdict = "tuner lower" if high < 0 else "plain TPE lower" if low > 0 else "a tie"
                interval = (f"tuner minus plain {dollars(diff)} a row, 95% interval {dollars(low)} to "
                            f"{dollars(high)}")
            print(f"{source}, seeds {cfg['train']['seed']}/{cfg['study']['sampler']['seed']} (train/sampler): tuner "
                  f"{best / median:.0%} of the median, "
                  f"{best / classical:.0%} of the classical; plain TPE "
                  + ("no trial ended in time" if plain is None else f"{plain / median:.0%} and {plain / classical:.0%}")
                  + f" in {wall / 60:.1f} min each ({verdict}: {interval})", flush=True)
            draws.append((best / median, None if plain is None else plain / median, verdict))
        wins, losses = (sum(v == w for _, _, v in draws) for w in ("tuner lower", "plain TPE lower"))
        plain_mean = [p for _, p, _ in draws if p is not None]
        summary.append(f"{source}: tuner lower in {wins}, plain TPE lower in {losses}, a tie in "
                       f"{len(draws) - wins - losses} of {len(draws)} draw{'s' * (len(draws) > 1)}; best MAE of "
                       f"the median, mean: tuner {sum(t for t, _, _ in draws) / len(draws):.0%}, plain TPE "
                       + (f"{sum(plain_mean) / len(plain_mean):.0%}" if plain_mean else "none ended"))
    print(f"quality ({cpu_note()}): " + "; ".join(summary), flush=True)


if __name__ == "__main__":
    main()
