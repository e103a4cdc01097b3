"""Scoring throughput: the original one-row loop (`generate(max_new_tokens=3)` per row, as in the recipe) against
tuner's batched constrained scorer, on the same model and rows, in one run. The last line is the summary.

  python bench/score.py                                   # CPU, built-in SmolLM2, 4-bit
  python bench/score.py --model random:8b --device cuda --batch 256 --rows 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import diamond_rows, emit, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin", help="builtin, a folder, or random:tiny|1b|8b")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    ap.add_argument("--device", default=None)
    ap.add_argument("--rows", type=int, default=128, help="rows for tuner's scorer")
    ap.add_argument("--one-row-rows", type=int, default=24, help="rows for the one-row loop (it is slow)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of each; the medians are compared")
    ap.add_argument("--check", action="store_true", help="also compare predictions with one-row greedy generate")
    args = ap.parse_args()

    import torch

    from tuner.models import load_base
    from tuner.scoring import PriceScorer, one_row_generate, parse_price

    resolved = resolve(args.model)
    # The identity check needs fp32 where the CPU would otherwise compute in bf16: bf16 logits tie exactly often
    # enough (seen on the untrained base's decimal digits) that argmax then depends on summation order.
    exact = {"cpu_bf16": False} if args.check and args.bits == 16 else {}
    base = load_base(resolved, args.bits, args.device, **exact)
    model, tok = base.model, base.tokenizer
    splits = diamond_rows(64, max(args.rows, args.one_row_rows))
    prompts = [e.prompt for e in splits.test]
    sync = torch.cuda.synchronize if base.device.startswith("cuda") else (lambda: None)

    scorer = PriceScorer(tok, max_price=splits.max_price, batch_size=args.batch)
    with torch.no_grad():
        one_row_generate(model, tok, prompts[0], 3)  # warm-up
    scorer.predict(model, prompts[: args.batch])  # warm-up

    # Rounds alternate between the two so that drift in the machine's speed (other load, clocks) hits both alike;
    # each side's median round is compared.
    ones, tuners = [], []
    for r in range(args.repeats):
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            for p in prompts[: args.one_row_rows]:
                one_row_generate(model, tok, p, 3)
            sync()
            ones.append(args.one_row_rows / (time.perf_counter() - t))
        run = scorer.predict(model, prompts[: args.rows])
        tuners.append(run.rows_per_s)
        emit({"bench": "score", "round": r, "one_row_rows_per_s": round(ones[-1], 2),
              "tuner_rows_per_s": round(tuners[-1], 2), "decode_steps": run.new_tokens})
    one, tuner = statistics.median(ones), statistics.median(tuners)
    emit({"bench": "score", "method": "one_row_generate_3tok", "rows": args.one_row_rows, "rows_per_s": round(one, 2)})
    emit({"bench": "score", "method": "tuner_scorer", "rows": args.rows, "batch": args.batch,
          "rows_per_s": round(tuner, 2)})
    agree = None
    if args.check:
        n = min(args.one_row_rows, args.rows)
        budget = scorer.max_int_digits + 3
        ref = [parse_price(one_row_generate(model, tok, p, budget)) for p in prompts[:n]]
        agree = sum(a == b.value for a, b in zip(ref, run.predictions[:n]))
        emit({"bench": "score", "check_rows": n, "identical_predictions": agree})
    ratio = tuner / one
    print(f"score: model={args.model} bits={args.bits} device={base.device} one_row={one:.2f} rows/s "
          f"tuner={tuner:.2f} rows/s (batch {args.batch}, {args.rows} rows; medians of {args.repeats} alternating "
          f"rounds) ratio={ratio:.1f}x"
          + (f" identical={agree}/{min(args.one_row_rows, args.rows)}" if agree is not None else ""), flush=True)


if __name__ == "__main__":
    main()
