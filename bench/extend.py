"""What `study.extend` buys: a finished trial's kept adapter trained further on rows no split took (or, with
`--same-rows`, on its own train rows again), at each of `--lr` times its rate with its own warmup and schedule, each
scored against the adapter as kept on its test rows plus `--held` rows no split took (the last of the seeded order,
as bench/quality.py's held-out rows), with the paired difference and its 95% bootstrap interval.

  python bench/quality.py --sources builtin:diamonds --workdir /tmp/q     # a study to start from, then:
  python bench/extend.py --storage sqlite:////tmp/q/diamonds-tuner.db --sweep /tmp/q/diamonds-runs/sweep.yaml \\
      --trial 0 --rows 400 --lr 1.0,0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="the study's storage URL")
    ap.add_argument("--sweep", required=True, help="the sweep file the study ran")
    ap.add_argument("--trial", type=int, default=0, help="the COMPLETE trial whose kept adapter is trained further")
    ap.add_argument("--rows", type=int, default=400, help="rows to train on (steps: rows / the trial's batch)")
    ap.add_argument("--lr", default="1.0", help="comma-separated factors of the trial's learning rate")
    ap.add_argument("--held", type=int, default=300, help="rows no split took, scored beside the test rows")
    ap.add_argument("--same-rows", action="store_true", help="train on the trial's own first --rows train rows")
    ap.add_argument("--out", default=None, help="where the adapters go (default: a temporary folder)")
    args = ap.parse_args()

    import optuna
    import yaml

    from quality import dollars, held_out_errors, paired_difference, unused_rows
    from tuner import artifacts, lora
    from tuner.batches import encode, fit_rows
    from tuner.config import parse_config
    from tuner.loop import train_one
    from tuner.models import load_base, release
    from tuner.prepare import prepare
    from tuner.space import TrialParams
    from tuner.train import TrialRun

    cfg = parse_config(yaml.safe_load(Path(args.sweep).read_text()), args.sweep)
    study = optuna.load_study(study_name=cfg.study.name, storage=args.storage)
    store = artifacts.open_store(artifacts.location(args.storage), create=False)
    out = Path(args.out or tempfile.mkdtemp(prefix="tuner-extend-"))
    parent = Path(artifacts.extract_adapter(store, study.trials[args.trial], out / "parent"))
    p0 = TrialParams.from_dict(json.loads((parent / "tuner.json").read_text())["params"])
    ready = prepare(cfg)
    model = next(iter(ready.resolved))
    max_length = ready.max_lengths()[model]
    tok = ready.tokenizers[model]
    splits, _ = ready.fitted(model, max_length)
    rows = splits.test + fit_rows(tok, unused_rows(cfg.data, args.held), max_length, cfg.data)[0]
    t0 = time.time()
    kept = held_out_errors(parent, rows)
    kept_mae = sum(kept.values()) / len(rows)
    print(f"trial {args.trial} as kept: {dollars(kept_mae)} on {len(rows)} rows ({time.time() - t0:.0f} s)", flush=True)
    # The spare rows from the front of the seeded order, as study.extend takes them (never the held-out tail).
    fresh = splits.train[:args.rows] if args.same_rows else fit_rows(tok, ready.splits.spare[:args.rows], max_length,
                                                                     cfg.data)[0]
    _, state = lora.load_adapter_state(parent)
    base = load_base(ready.resolved[model], p0.quant_bits, "cpu")
    encoded, _ = encode(base.tokenizer, fresh, p0.max_length)
    for i, factor in enumerate(float(x) for x in args.lr.split(",")):
        p = dataclasses.replace(p0, learning_rate=p0.learning_rate * factor)
        name = f"extend{i}"

        def save(run, name=name, p=p):
            folder = lora.save_adapter(run.adapter, out / name, base.resolved.name, base.resolved.revision)
            artifacts.adapter_info(cfg, splits, p, base, "extend", args.trial).write(folder)

        t1 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            run = train_one(base, TrialRun(name, p, encoded, Path(tmp), checkpoint_every=None, init_state=state),
                            on_done=save)
        secs = time.time() - t1
        errors = held_out_errors(out / name, rows)
        diff, low, high = paired_difference(errors, kept)
        print(f"{'own' if args.same_rows else 'new'} rows {len(encoded)}, {run.step} steps at {factor:g}x "
              f"({p.learning_rate:.3g}), {secs:.0f} s: {dollars(sum(errors.values()) / len(rows))} against "
              f"{dollars(kept_mae)} as kept; minus kept {dollars(diff)} a row ({dollars(low)} to {dollars(high)})",
              flush=True)
    release(base)


if __name__ == "__main__":
    main()
