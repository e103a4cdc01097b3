"""How a price is read from a trained adapter: greedy constrained decoding against the median of sampled prices
(`scoring.method: median`), on a finished study's COMPLETE trials, their kept adapters and the study's test rows.
Each line gives one trial's test MAE both ways, the error on the expensive rows (above the 80th percentile of the test
prices), the seconds each read-out took, and the paired difference with its 95% bootstrap interval.

  python bench/quality.py --sources builtin:diamonds --workdir /tmp/q      # a study to read from, then:
  python bench/readout.py --storage sqlite:////tmp/q/diamonds-tuner.db --sweep /tmp/q/diamonds-runs/sweep.yaml
  python bench/readout.py ... --samples 15,31 --seed 1 --trials 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="the study's storage URL")
    ap.add_argument("--sweep", required=True, help="the sweep file the study ran (its data and test rows)")
    ap.add_argument("--samples", default="15,31", help="comma-separated sample counts for the median read-out")
    ap.add_argument("--seed", type=int, default=0, help="the median read-out's sampling seed")
    ap.add_argument("--trials", help="comma-separated trial numbers (default: every COMPLETE trial)")
    args = ap.parse_args()

    import optuna
    import yaml

    from quality import dollars, paired_difference
    from tuner import artifacts, inference
    from tuner.config import parse_config
    from tuner.prepare import prepare
    from tuner.scoring import PriceScorer, price_metrics

    cfg = parse_config(yaml.safe_load(Path(args.sweep).read_text()), args.sweep)
    ready = prepare(cfg)
    study = optuna.load_study(study_name=cfg.study.name, storage=args.storage)
    store = artifacts.open_store(artifacts.location(args.storage), create=False)
    counts = [int(x) for x in args.samples.split(",")]
    only = {int(x) for x in args.trials.split(",")} if args.trials else None
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        if only is not None and t.number not in only:
            continue
        model = t.params.get("model") or next(iter(ready.resolved))
        lengths = ready.max_lengths()
        splits, _ = ready.fitted(model, lengths[model] if lengths else t.params["max_length"])
        test = splits.test
        dear = sorted(e.price for e in test)[int(0.8 * len(test))]
        with tempfile.TemporaryDirectory() as tmp:
            predictor = inference.load(str(artifacts.extract_adapter(store, t, Path(tmp) / "adapter")))
            errors, parts = {}, [f"trial {t.number} (stored {dollars(t.value)})"]
            for k in [1] + counts:
                scorer = PriceScorer(predictor.base.tokenizer, max_price=ready.splits.max_price,
                                     batch_size=cfg.scoring.batch_size, method="greedy" if k == 1 else "median",
                                     samples=k, seed=args.seed)
                t0 = time.perf_counter()
                values = [p.value for p in scorer.predict(predictor.model, [e.prompt for e in test]).predictions]
                secs = time.perf_counter() - t0
                m = price_metrics(values, [e.price for e in test])
                errors[k] = {e.row_id: abs((v or 0.0) - e.price) for v, e in zip(values, test)}
                dear_mae = statistics.mean(errors[k][e.row_id] for e in test if e.price >= dear)
                label = "greedy" if k == 1 else f"median of {k}"
                parts.append(f"{label} {dollars(m['mae'])} (RMSLE {m['rmsle']:.3f}, above {dollars(dear)} "
                             f"{dollars(dear_mae)}, {secs:.0f} s)")
                emit({"bench": "readout", "trial": t.number, "readout": label, "mae": round(m["mae"], 2),
                      "rmsle": round(m["rmsle"], 4), "dear_mae": round(dear_mae, 2), "seconds": round(secs, 1),
                      "seed": args.seed})
            for k in counts:
                diff, low, high = paired_difference(errors[k], errors[1])
                parts.append(f"median of {k} minus greedy {dollars(diff)} a row ({dollars(low)} to {dollars(high)})")
            print("; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
