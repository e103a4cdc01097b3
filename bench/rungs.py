"""What the pruner's rung knows: a pool of trials of the default sweep, each trained to its end, read at the rung
(step 100) on the 32 validation rows the pruner reads, on 160 validation rows and on the test rows, and scored on the
test rows at the end. Prints the rank correlation of each reading with the final test MAE, the final MAE by rank and
by queued/drawn trial, and simulated studies at the default's deadline (tuner: the two queued trials first, then
draws from the pool, with and without successive halving; a plain loop: draws only, no pruning, no evaluations, at
tuner's wall time). The last line is the summary.

  python bench/rungs.py --pool /tmp/rungs --trials 13        # about 5 minutes a trial on 2 AVX512-BF16 cores
  python bench/rungs.py --pool /tmp/rungs --trials 0         # only the analysis of the trials already there

The pool's trials differ in their training seed (100 + i), so drawing from it stands for studies with other seeds.
Its validation split is 160 rows (the default's 32 as its first rows), which moves 128 rows out of training: its
trials are not the default study's trials, only like them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics as st
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import emit
from quality import default_sweep, score_rows

RUNG = 100
# The order the pool grows in: the default's two queued trials (a fixed rate: diamonds has 250 steps), then draws.
ORDER = ["q0", "q1", "R", "R", "q0", "q1", "R", "R", "R", "R", "q0", "q1"] + ["R"] * 40


def collect(pool: Path, trials: int, queued: list[dict]) -> None:
    import optuna

    from tuner.batches import encode
    from tuner.config import parse_config
    from tuner.loop import train_one
    from tuner.models import load_base
    from tuner.prepare import prepare
    from tuner.space import sample
    from tuner.train import Evaluation, TrialRun

    cfg_d = default_sweep("builtin:diamonds")
    cfg_d["study"].pop("pruner", None)
    cfg_d["study"].pop("enqueue", None)
    cfg_d["data"]["val_rows"] = 160
    cfg = parse_config(cfg_d, "<bench rungs>")
    ready = prepare(cfg)
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=11))
    base = None
    for i, kind in enumerate(ORDER[:trials]):
        trial = sampler_study.ask()  # draws in a fixed order, so that an interrupted pool grows the same way
        path = pool / f"t{i:02d}.json"
        p = sample(trial, cfg, ready.modules, ready.max_lengths())
        if path.exists():
            continue
        if kind != "R":
            q = queued[int(kind[1])]
            lr = q["learning_rate"]["value"] if isinstance(q["learning_rate"], dict) else q["learning_rate"]
            p = replace(p, r=q["r"], alpha=2 * q["r"], dropout=q["dropout"], learning_rate=lr)
        p = replace(p, seed=100 + i)
        if base is None:
            base = load_base(ready.resolved[p.model], p.quant_bits, "cpu")
        splits, _ = ready.fitted(p.model, p.max_length)
        rows, _ = encode(base.tokenizer, splits.train, p.max_length)
        scorer = ready.scorers[p.model]
        rec: dict = {"i": i, "kind": kind, "r": p.r, "dropout": p.dropout, "lr": p.learning_rate, "seed": p.seed}

        def score(run, rows_):
            metrics, errors = score_rows(scorer, base.model, run.name, rows_)
            return metrics["mae"], list(errors.values())

        class Hooks:
            def on_step(self, run, record):
                pass

            def on_checkpoint(self, run, step, path):
                pass

            def on_evaluate(self, run, step):
                if step == RUNG:
                    rec["val160_rung"], errors = score(run, splits.val)
                    rec["val32_rung"] = sum(errors[:32]) / 32  # the rows the default's pruner reads
                    rec["test_rung"], _ = score(run, splits.test)
                    rec["train_s_rung"] = run.train_seconds
                return Evaluation(None)  # no value: the trial keeps its last adapter

        def at_end(run):
            rec["val160_end"], _ = score(run, splits.val)
            rec["test_end"], _ = score(run, splits.test)

        with tempfile.TemporaryDirectory() as tmp:
            run = TrialRun(f"rung-{i}", p, rows, Path(tmp), hooks=Hooks(), eval_every=RUNG, checkpoint_every=None)
            train_one(base, run, on_done=at_end)
        rec.update(train_s=run.train_seconds, status=run.status)
        path.write_text(json.dumps(rec))
        print(json.dumps(rec), flush=True)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=xs.__getitem__)
        r = [0] * len(xs)
        for k, i in enumerate(order):
            r[i] = k
        return r
    return st.correlation(ranks(a), ranks(b))


def keeps(value: float, at_rung: list[float]) -> bool:
    """Optuna's successive halving at reduction factor 2 (`_is_trial_promotable_to_next_rung`): in the better half
    of the trials that reached the rung, itself included, and the best of them while fewer than four have."""
    ranked = sorted(at_rung + [value])
    return value <= ranked[max(len(ranked) // 2 - 1, 0)]


def simulate(pool: list[dict], reading: str | None, draws: int = 4000, deadline: float = 870.0) -> dict:
    """Studies drawn from the pool. tuner: a trial starts while the longest so far would end by the deadline; a
    full trial costs its training plus about 20 s of evaluations, a cut one its training to the rung. plain: draws
    only, 8 s of test scoring each, at tuner's wall time. Best = the lowest test MAE among completed trials."""
    queued = [[t for t in pool if t["kind"] == k] for k in ("q0", "q1")]
    drawn = [t for t in pool if t["kind"] == "R"]
    rng = random.Random(0)
    tuner_best, plain_best, lower = [], [], 0
    for _ in range(draws):
        seq = [rng.choice(queued[0]), rng.choice(queued[1])] + [rng.choice(drawn) for _ in range(8)]
        now, longest, done, rung = 45.0, 0.0, [], []
        for t in seq:
            if done and now + longest > deadline:
                break
            cut = reading is not None and not keeps(t[reading], rung)
            if reading is not None:
                rung.append(t[reading])
            cost = t["train_s_rung"] + 4 if cut else t["train_s"] + 20
            now, longest = now + cost, max(longest, cost)
            if not cut:
                done.append(t["test_end"])
        budget, spent, plain, longest = now, 30.0, [], 0.0
        for t in (rng.choice(drawn) for _ in range(8)):
            if plain and spent + longest > budget:
                break
            spent += t["train_s"] + 8
            longest = max(longest, t["train_s"] + 8)
            if spent <= budget:
                plain.append(t["test_end"])
        tuner_best.append(min(done))
        plain_best.append(min(plain) if plain else float("inf"))
        lower += min(done) < (min(plain) if plain else float("inf"))
    return {"tuner_mean_best": round(st.mean(tuner_best)), "plain_mean_best": round(st.mean(plain_best)),
            "p_tuner_lower": round(lower / draws, 2)}


def analyze(pool_dir: Path) -> None:
    pool = [json.loads(p.read_text()) for p in sorted(pool_dir.glob("t*.json"))]
    pool = [t for t in pool if t["status"] == "completed"]
    end = [t["test_end"] for t in pool]
    for t in sorted(pool, key=lambda t: t["test_end"]):
        print(f"trial {t['i']:2d} {t['kind']:2s} r {t['r']:2d} lr {t['lr']:.2e} dropout {t['dropout']:.2f}: at step "
              f"{RUNG} ${t['val32_rung']:,.0f} (32 val) ${t['val160_rung']:,.0f} (160 val) ${t['test_rung']:,.0f} "
              f"(test); at the end ${t['test_end']:,.0f} (test), {t['train_s']:.0f} s")
    corr = {k: round(spearman([t[k] for t in pool], end), 2)
            for k in ("val32_rung", "val160_rung", "test_rung", "val160_end")}
    emit({"bench": "rungs", "trials": len(pool), "spearman_with_final_test_mae": corr})
    for key, group in (("r", (8, 16)), ("kind", ("q0", "q1", "R"))):
        for g in group:
            xs = [t["test_end"] for t in pool if t[key] == g]
            if xs:
                emit({"bench": "rungs", key: g, "trials": len(xs), "mean_test_mae": round(st.mean(xs)),
                      "test_maes": sorted(round(x) for x in xs)})
    sims = {}
    for reading in (None, "val32_rung", "val160_rung", "test_rung"):
        sims[reading or "no pruning"] = sim = simulate(pool, reading)
        emit({"bench": "rungs", "simulated": f"successive halving on {reading}" if reading else "no pruning", **sim})
    print(f"summary: {len(pool)} trials; rank correlation with the final test MAE at step {RUNG}: 32 validation rows "
          f"{corr['val32_rung']}, 160 rows {corr['val160_rung']}, the test rows {corr['test_rung']}; at the end, 160 "
          f"validation rows {corr['val160_end']}. Simulated mean best: no pruning ${sims['no pruning']['tuner_mean_best']:,}, "
          f"halving on 32 rows ${sims['val32_rung']['tuner_mean_best']:,} (plain loop "
          f"${sims['no pruning']['plain_mean_best']:,}); P(tuner lower) {sims['val32_rung']['p_tuner_lower']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True, help="a folder: one JSON file per trial, kept between runs")
    ap.add_argument("--trials", type=int, default=13, help="grow the pool to this many trials (0: analyze only)")
    args = ap.parse_args()
    pool = Path(args.pool)
    pool.mkdir(parents=True, exist_ok=True)
    if args.trials:
        queued = default_sweep("builtin:diamonds")["study"]["enqueue"]
        collect(pool, args.trials, queued)
    analyze(pool)


if __name__ == "__main__":
    sys.exit(main())
