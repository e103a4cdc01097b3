"""How a price is read from a trained adapter: greedy constrained decoding against the median of sampled prices
(`scoring.method: median`) and the branch mean (`scoring.method: branch`), on a finished study's COMPLETE trials,
their kept adapters and the study's test rows (with `--extra N`, also N rows of the source that no split took: more
rows, less noise). Each line gives one trial's MAE each way, the error on the expensive rows (above the 80th
percentile of the prices), the seconds each read-out took, and the paired difference with greedy and its 95%
bootstrap interval.

  python bench/quality.py --sources builtin:diamonds --workdir /tmp/q      # a study to read from, then:
  python bench/readout.py --storage sqlite:////tmp/q/diamonds-tuner.db --sweep /tmp/q/diamonds-runs/sweep.yaml
  python bench/readout.py ... --readouts median:15,median:31,branch:3x2 --seed 1 --trials 0 --extra 300
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
    ap.add_argument("--readouts", default="median:31,branch:3x2",
                    help="comma-separated read-outs beside greedy: median:SAMPLES, branch:TOPKxPLACES")
    ap.add_argument("--seed", type=int, default=0, help="the median read-out's sampling seed")
    ap.add_argument("--trials", help="comma-separated trial numbers (default: every COMPLETE trial)")
    ap.add_argument("--extra", type=int, default=0, help="also score this many rows that no split took")
    args = ap.parse_args()

    import optuna
    import yaml

    from quality import dollars, paired_difference, unused_rows
    from tuner import artifacts, inference
    from tuner.batches import fit_rows
    from tuner.config import parse_config
    from tuner.prepare import prepare
    from tuner.scoring import PriceScorer, price_metrics

    cfg = parse_config(yaml.safe_load(Path(args.sweep).read_text()), args.sweep)
    ready = prepare(cfg)
    study = optuna.load_study(study_name=cfg.study.name, storage=args.storage)
    store = artifacts.open_store(artifacts.location(args.storage), create=False)
    readouts = [("greedy", {"method": "greedy"})]
    for item in filter(None, args.readouts.split(",")):
        kind, _, arg = item.partition(":")
        if kind == "median":
            readouts.append((f"median of {arg}", {"method": "median", "samples": int(arg)}))
        elif kind == "branch":
            k, places = (int(x) for x in arg.split("x"))
            readouts.append((f"branch {k}x{places}", {"method": "branch", "branch_top_k": k, "branch_places": places}))
        else:
            raise SystemExit(f"--readouts {item!r}: expected median:SAMPLES or branch:TOPKxPLACES")
    spec = cfg.data
    extra = unused_rows(spec, args.extra) if args.extra else []
    only = {int(x) for x in args.trials.split(",")} if args.trials else None
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        if only is not None and t.number not in only:
            continue
        model = t.params.get("model") or next(iter(ready.resolved))
        lengths = ready.max_lengths()
        max_length = lengths[model] if lengths else t.params["max_length"]
        splits, _ = ready.fitted(model, max_length)
        test = splits.test + fit_rows(ready.tokenizers[model], extra, max_length, spec)[0]
        dear = sorted(e.price for e in test)[int(0.8 * len(test))]
        with tempfile.TemporaryDirectory() as tmp:
            predictor = inference.load(str(artifacts.extract_adapter(store, t, Path(tmp) / "adapter")))
            errors = {}
            parts = [f"trial {t.number} (stored {dollars(t.value)}), {len(test)} rows"]
            for label, kw in readouts:
                scorer = PriceScorer(predictor.base.tokenizer, max_price=ready.splits.max_price,
                                     batch_size=cfg.scoring.batch_size, seed=args.seed, **kw)
                t0 = time.perf_counter()
                values = [p.value for p in scorer.predict(predictor.model, [e.prompt for e in test]).predictions]
                secs = time.perf_counter() - t0
                m = price_metrics(values, [e.price for e in test])
                errors[label] = {e.row_id: abs((v or 0.0) - e.price) for v, e in zip(values, test)}
                dear_mae = statistics.mean(errors[label][e.row_id] for e in test if e.price >= dear)
                parts.append(f"{label} {dollars(m['mae'])} (RMSLE {m['rmsle']:.3f}, above {dollars(dear)} "
                             f"{dollars(dear_mae)}, {secs:.0f} s)")
                emit({"bench": "readout", "trial": t.number, "readout": label, "mae": round(m["mae"], 2),
                      "rmsle": round(m["rmsle"], 4), "dear_mae": round(dear_mae, 2), "seconds": round(secs, 1),
                      "rows": len(test), "seed": args.seed})
            for label, _ in readouts[1:]:
                diff, low, high = paired_difference(errors[label], errors["greedy"])
                parts.append(f"{label} minus greedy {dollars(diff)} a row ({dollars(low)} to {dollars(high)})")
            print("; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
