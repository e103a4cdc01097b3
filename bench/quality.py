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
(one trial's MAE on 100 rows moves by about a third with the rows drawn). The test rows also chose each side's best
trial, which flatters both; `--held-out N` (300 by default) scores the two chosen adapters again on N rows that no
split took, outside the clock, and gives that verdict too.

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


def unused_rows(spec, n: int) -> list:
    """`n` rows of the source (`spec`: a DataSpec) that no split took: the last `n` of data.load_splits' seeded
    order, never trained on, validated on, or used to choose a trial. `study.extend` trains on the spare rows from
    the front of that order (`Splits.spare`), so these are the rows it reaches last (`check_unseen`). Not yet fitted
    to a token budget."""
    import numpy as np

    from tuner.data import _clean, _read_source

    good, _ = _clean(_read_source(spec), spec, "")
    taken = spec.train_rows + spec.val_rows + (0 if spec.test_split else spec.test_rows)
    if len(good) - taken < n:
        raise SystemExit(f"{spec.source}: {len(good) - taken} rows no split took, fewer than the {n} asked for")
    order = np.random.RandomState(spec.seed).permutation(len(good))
    return [good[i] for i in order[len(good) - n:]]


def check_unseen(study, spec, n: int) -> None:
    """The held-out rows were not trained on by tuner's `study.extend` trial (it takes spare rows from the front)."""
    from tuner.data import load_splits

    spare = len(load_splits(spec).spare)
    for t in study.get_trials(deepcopy=False):
        ext = t.user_attrs.get("extension")
        if ext and ext["rows"] + ext.get("unfit", 0) > spare - n:
            raise SystemExit(f"trial {t.number} (study.extend) trained on rows the held-out set holds")


def held_out_rows(cfg, n: int) -> list:
    """`unused_rows`, fitted to the budget the study's rows were fitted to (train.max_length: auto)."""
    from tuner.batches import fit_rows
    from tuner.prepare import prepare

    ready = prepare(cfg)
    model = next(iter(ready.resolved))
    lengths = ready.max_lengths()
    if not lengths:
        raise SystemExit("--held-out needs the sweep's train.max_length: auto (the budget its rows were fitted to)")
    return fit_rows(ready.tokenizers[model], unused_rows(cfg.data, n), lengths[model], cfg.data)[0]


def held_out_errors(adapter: Path, rows: list) -> dict:
    """A saved adapter's absolute error per row id on `rows`, read as its tuner.json says (the sweep's read-out)."""
    from tuner import inference, models

    predictor = inference.load(str(adapter))
    values = [x.value for x in predictor.scorer.predict(predictor.model, [e.prompt for e in rows]).predictions]
    models.release(predictor.base)
    return {e.row_id: abs((v or 0.0) - e.price) for v, e in zip(values, rows)}


def score_rows(scorer, model, adapter: str, rows: list) -> tuple[dict, dict]:
    """An adapter's price metrics on `rows` and its absolute error per row id (in the rows' order). As the metrics
    and tuner's predictions file score them: an answer that is not a number counts as 0."""
    from tuner.scoring import price_metrics

    res = scorer.predict(model, [e.prompt for e in rows], adapter=adapter)
    metrics = price_metrics([x.value for x in res.predictions], [e.price for e in rows])
    return metrics, {e.row_id: abs((x.value or 0.0) - e.price) for x, e in zip(res.predictions, rows)}


def run_tuner(cfg_dict: dict, url: str, out_dir: Path) -> tuple[float, float, dict, dict, Path]:
    """tuner's default study, run by the `tuner` command of the Python running this bench (`tuner run`, exactly as a
    user runs it; from a fresh venv, the installed wheel). Returns (best test MAE, wall seconds, its baselines, the
    best trial's error per test row, its adapter extracted from the study's artifact store)."""
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
    from tuner import artifacts

    store = artifacts.open_store(artifacts.location(url), create=False)
    adapter = artifacts.extract_adapter(store, study.best_trial, out_dir / "best-adapter")
    return study.best_value, wall, study.user_attrs["baselines"], best_trial_errors(study, url), Path(adapter)


def run_plain(cfg_dict: dict, url: str, budget_s: float, keep: Path) -> tuple[float | None, int, dict, Path | None]:
    """A plain Optuna loop: TPE over tuner's search space, each trial trained alone to its last step and scored on
    the test rows. No pruning, no co-training, no intermediate evaluation. Trials that end after `budget_s` do not
    count. Each trial's adapter is saved under `keep` (with its tuner.json, as tuner saves one). Returns (best test
    MAE within the budget, trials counted, that trial's error per test row, its adapter folder)."""
    import optuna

    from tuner import artifacts, lora
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
    ended: list[tuple[float, float, dict, Path]] = []  # (seconds since start, test MAE, error per test row, adapter)

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
            # Saving takes a fraction of a second; tuner's study saves each trial's adapter too, on its clock.
            folder = lora.save_adapter(run.adapter, keep / f"trial-{trial.number}", base.resolved.name,
                                       base.resolved.revision)
            artifacts.adapter_info(cfg, splits, p, base, "plain", trial.number).write(folder)

        with tempfile.TemporaryDirectory() as tmp:
            train_one(base, TrialRun(f"plain-{trial.number}", p, rows, Path(tmp), checkpoint_every=None),
                      on_done=score)
        ended.append((time.time() - t0, scores["mae"], scores["errors"], keep / f"trial-{trial.number}"))
        return scores["mae"]

    study = optuna.create_study(study_name="plain", storage=url, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.study.sampler.seed,
                                                                   n_startup_trials=cfg.study.sampler.n_startup_trials))
    def no_time_left(study: optuna.Study, _trial) -> None:
        # A trial that cannot end within the budget would not count: stop rather than train it (same result, sooner).
        if not ended:
            return
        ends = [at for at, *_ in ended]
        longest = max(b - a for a, b in zip([0.0] + ends, ends))
        if time.time() - t0 + longest > budget_s:
            study.stop()

    study.optimize(objective, timeout=budget_s, callbacks=[no_time_left])
    for key in list(bases):
        release(bases.pop(key))
    within = [(mae, errors, folder) for at, mae, errors, folder in ended if at <= budget_s]
    best = min(within, key=lambda x: x[0]) if within else (None, {}, None)
    return best[0], len(within), best[1], best[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="builtin:diamonds,builtin:ames")
    ap.add_argument("--workdir", help="keep the studies here (default: a temporary folder)")
    ap.add_argument("--seeds", help="comma-separated seeds, each a draw: train.seed and the sampler's seed, for both "
                    "approaches (default: one draw at the sweep's 42 and 0). One trial's MAE moves by about 15 points "
                    "with the seed, more than the approaches differ, so judge by several")
    ap.add_argument("--seed", type=int, help="one seed (as --seeds with one)")
    ap.add_argument("--held-out", type=int, default=300, help="also judge the two best adapters on this many rows "
                    "that no split took (the test rows chose them; 0: skip)")
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
                cfg["study"].update(trials=2, timeout=None, deadline=None, pruner={"type": "none"},
                                    extend={"enabled": False})
                cfg["data"].update(train_rows=16, val_rows=8, test_rows=8)
                cfg["train"].update(eval_every=None, eval_rows=8, max_length_cap=96)
            best, wall, base, best_errors, best_adapter = run_tuner(cfg, f"sqlite:///{work}/{tag}-tuner.db",
                                                                    work / f"{tag}-runs")
            plain, counted, plain_errors, plain_adapter = run_plain(cfg, f"sqlite:///{work}/{tag}-plain.db", wall,
                                                                    work / f"{tag}-plain-adapters")
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
            held = None
            if args.held_out and plain_adapter is not None:
                # The test rows chose each approach's best trial (as a study does), so they flatter both; rows that
                # chose nothing judge them without that bias, and more rows narrow the interval. Outside the clock.
                import optuna

                from tuner.config import parse_config

                parsed = parse_config(cfg, "<bench quality>")
                tuner_study = optuna.load_study(study_name=cfg["study"]["name"],
                                                storage=f"sqlite:///{work}/{tag}-tuner.db")
                check_unseen(tuner_study, parsed.data, args.held_out)
                rows = held_out_rows(parsed, args.held_out)
                t_err, p_err = held_out_errors(best_adapter, rows), held_out_errors(plain_adapter, rows)
                t_mae, p_mae = (sum(e.values()) / len(e) for e in (t_err, p_err))
                diff, low, high = paired_difference(t_err, p_err)
                held = "tuner lower" if high < 0 else "plain TPE lower" if low > 0 else "a tie"
                emit({"bench": "quality_held_out", "source": source, "rows": len(rows), "tuner_mae": round(t_mae, 2),
                      "plain_mae": round(p_mae, 2), "diff": round(diff, 2), "low": round(low, 2),
                      "high": round(high, 2), "seed": cfg["train"]["seed"]})
                print(f"  the same two adapters on {len(rows)} held-out rows: tuner {dollars(t_mae)} "
                      f"({t_mae / median:.0%} of the median), plain TPE {dollars(p_mae)} ({p_mae / median:.0%}): "
                      f"{held} (tuner minus plain {dollars(diff)} a row, 95% interval {dollars(low)} to "
                      f"{dollars(high)})", flush=True)
            elif args.held_out:
                held = "tuner lower"
            draws.append((best / median, None if plain is None else plain / median, verdict, held))
        wins, losses = (sum(d[2] == w for d in draws) for w in ("tuner lower", "plain TPE lower"))
        plain_mean = [d[1] for d in draws if d[1] is not None]
        line = (f"{source}: tuner lower in {wins}, plain TPE lower in {losses}, a tie in "
                f"{len(draws) - wins - losses} of {len(draws)} draw{'s' * (len(draws) > 1)}")
        if args.held_out:
            h_wins, h_losses = (sum(d[3] == w for d in draws) for w in ("tuner lower", "plain TPE lower"))
            line += f" (on held-out rows: {h_wins}, {h_losses}, {len(draws) - h_wins - h_losses})"
        summary.append(line + f"; best MAE of the median, mean: tuner {sum(d[0] for d in draws) / len(draws):.0%}, "
                       "plain TPE " + (f"{sum(plain_mean) / len(plain_mean):.0%}" if plain_mean else "none ended"))
    print(f"quality ({cpu_note()}): " + "; ".join(summary), flush=True)


if __name__ == "__main__":
    main()
