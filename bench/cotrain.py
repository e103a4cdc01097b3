"""Training throughput, in one run on one device: (a) the original recipe's trial (trl SFTTrainer, batch 4,
gradient checkpointing, r=32 on q/k/v/o, as ../shared/bench/seed_recipe_gpu.py runs it), (b) tuner's single trial
with sized steps at the same effective batch, (c) K trials co-trained on one base (each batch 4, its own r, lr,
dropout and optimizer). Rows/s of trial work (all trials' rows per second of wall time, steady state), peak memory,
and the ratio to (a). The last line is the summary.

  python bench/cotrain.py                                          # CPU, built-in SmolLM2, 4-bit, K = 1 2 4
  python bench/cotrain.py --model random:8b --device cuda --ks 4,8,16 --recipe-from $OUT/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import diamond_rows, emit, resolve

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def trial_params(i: int, args):
    from tuner.space import TrialParams

    ranks = [32, 16, 8, 64]
    return TrialParams(r=ranks[i % len(ranks)] if i else 32, alpha=2 * (ranks[i % len(ranks)] if i else 32),
                       dropout=0.1, target_set="attention", target_modules=TARGETS, quant_bits=args.bits,
                       learning_rate=1e-4 * (1 + i % 3), epochs=1, batch_size=args.batch, grad_accum=1,
                       max_length=182, optimizer="paged_adamw_32bit", scheduler="cosine", warmup_ratio=0.03,
                       weight_decay=0.001, max_grad_norm=0.3, seed=42 + i, max_steps=args.steps + args.warmup)


class Clock:
    """Step end times of every run; steady state starts once every run has done `warmup` steps."""

    def __init__(self, warmup: int, sync):
        self.warmup, self.sync, self.times = warmup, sync, {}

    def on_step(self, run, record):
        self.sync()
        self.times.setdefault(run.name, []).append(time.perf_counter())

    def on_evaluate(self, run, step):
        return False

    def on_checkpoint(self, run, step, path):
        pass

    def rows_per_s(self, batch: int) -> float:
        start = max(t[self.warmup - 1] for t in self.times.values())
        end = max(t[-1] for t in self.times.values())
        rows = sum(batch * sum(1 for x in t if x > start) for t in self.times.values())
        return rows / (end - start)


def run_ours(base, rows, k: int, args, sync, checkpointing, fused: bool = True) -> dict:
    import torch

    from tuner.loop import train_group
    from tuner.train import TrialRun

    if base.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(args.warmup, sync)
    runs = [TrialRun(f"bench-{k}-{i}", trial_params(i, args), rows, Path("/nonexistent"), hooks=clock)
            for i in range(k)]
    t = time.perf_counter()
    train_group(base, runs, gradient_checkpointing=checkpointing, fused=fused)
    wall = time.perf_counter() - t
    bad = [r.status for r in runs if r.status != "completed"]
    assert not bad, bad
    peak = torch.cuda.max_memory_allocated() / 2**30 if base.device.startswith("cuda") else None
    return {"rows_per_s": round(clock.rows_per_s(args.batch), 2), "peak_gb": round(peak, 2) if peak else None,
            "wall_s": round(wall, 1), "execution": runs[0].plan.to_dict()}


def run_recipe(resolved, splits, args) -> dict:
    """The seed recipe: trl SFTTrainer + peft, batch 4, gradient checkpointing, the recipe's optimizer."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tuner.models import load_base

    base = load_base(resolved, args.bits, args.device)
    cuda = base.device.startswith("cuda")
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **k):
            torch.cuda.synchronize() if cuda else None
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **k):
            torch.cuda.synchronize() if cuda else None
            times.append(time.perf_counter() - self.t)

    ds = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in splits.train])
    cfg = SFTConfig(output_dir="/tmp/bench_recipe", max_steps=args.steps + args.warmup,
                    per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    optim="paged_adamw_32bit" if cuda else "adamw_torch", learning_rate=1e-4,
                    lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.001, max_grad_norm=0.3, bf16=cuda,
                    max_length=182, logging_steps=10, save_strategy="no", report_to="none",
                    gradient_checkpointing=True, use_cpu=not cuda, dataloader_num_workers=0)
    tr = SFTTrainer(model=base.model, train_dataset=ds, processing_class=base.tokenizer, args=cfg,
                    peft_config=LoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, target_modules=list(TARGETS),
                                           task_type="CAUSAL_LM"), callbacks=[Timer()])
    tr.train()
    steady = sorted(times[args.warmup:]) or times
    med = steady[len(steady) // 2]
    return {"rows_per_s": round(args.batch / med, 2), "s_per_step_med": round(med, 4)}


def profile(base, rows, args, sync) -> None:
    """Where a co-training step's time goes: operators by device time, and kernel launches per step."""
    import os

    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if base.device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        run_ours(base, rows, args.profile_k, args, sync, "auto")
    steps = args.steps + args.warmup
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaMemcpyAsync"))
    sort = "self_cuda_time_total" if base.device.startswith("cuda") else "self_cpu_time_total"
    text = (f"profile K={args.profile_k}, {steps} steps: {launches / steps:.0f} kernel launches and "
            f"{syncs / steps:.0f} copies/syncs per step\n" + events.table(sort_by=sort, row_limit=25))
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "profile.txt").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per trial, after the warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of every configuration; medians")
    ap.add_argument("--ks", default="2,4", help="co-training group sizes")
    ap.add_argument("--recipe-from", help="take (a) from seed_recipe_gpu.py's results.jsonl instead of running it")
    ap.add_argument("--shape", default=None, help="shape name to look up in --recipe-from (e.g. 8b)")
    ap.add_argument("--skip-recipe", action="store_true")
    ap.add_argument("--profile-k", type=int, default=0, help="after the measurements, profile one group of this size "
                                                              "(torch.profiler; a table to $OUT/profile.txt)")
    ap.add_argument("--modes", default="auto", help="co-training modes to measure: auto, fused, interleaved "
                                                   "(comma-separated; auto = fused)")
    args = ap.parse_args()

    import torch

    from tuner.models import load_base

    resolved = resolve(args.model)
    ks = [int(k) for k in args.ks.split(",") if k]
    need = args.batch * (args.steps + args.warmup)
    splits = diamond_rows(max(need, 64), 8)
    results = {}
    if args.recipe_from:
        for line in Path(args.recipe_from).read_text().splitlines():
            d = json.loads(line)
            if d.get("variant") == "seed4" and (args.shape is None or d.get("shape") == args.shape):
                results["a"] = {"rows_per_s": d["rows_per_s"], "peak_gb": d.get("peak_gb"), "source": "seed_recipe_gpu"}
    elif not args.skip_recipe:
        results["a"] = run_recipe(resolved, splits, args)
    if "a" in results:
        emit({"bench": "cotrain", "variant": "a_recipe", **results["a"]})

    base = load_base(resolved, args.bits, args.device)
    sync = torch.cuda.synchronize if base.device.startswith("cuda") else (lambda: None)
    from tuner.batches import encode

    rows, _ = encode(base.tokenizer, splits.train, 182)
    modes = [m for m in args.modes.split(",") if m]
    configs = [("b", 1, True)] + [(f"c{k}" + ("" if mode == "auto" else f" {mode}"), k, mode != "interleaved")
                                  for k in ks for mode in modes]
    # Alternating rounds: on a shared 2-core machine one run's rate moves by 15%; each round measures every
    # configuration once, and the summary takes medians (rates, and each round's ratio to the single trial).
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in configs}
    for rnd in range(args.rounds):
        for key, k, fused in configs:
            r = run_ours(base, rows, k, args, sync, "auto", fused=fused)
            runs[key].append(r)
            line = {"bench": "cotrain", "variant": "b_single_sized" if key == "b" else "c_cotrain", "k": k,
                    "round": rnd, **r}
            if key != "b":
                line.update(mode=r["execution"]["cotrain_mode"], rows_per_s_per_trial=round(r["rows_per_s"] / k, 2))
            emit(line)
    for key, rs in runs.items():
        rates = [r["rows_per_s"] for r in rs]
        ratios = [r["rows_per_s"] / b["rows_per_s"] for r, b in zip(rs, runs["b"])]
        results[key] = {**rs[-1], "rows_per_s": round(statistics.median(rates), 2),
                        "vs_single": round(statistics.median(ratios), 2), "rounds": rates,
                        "peak_gb": max((r["peak_gb"] or 0 for r in rs), default=0) or None}
    if args.profile_k:
        profile(base, rows, args, sync)
    a = results.get("a", {}).get("rows_per_s")
    parts = [f"(a) recipe {a} rows/s" if a else "(a) not run"]
    for key, r in results.items():
        if key == "a":
            continue
        label = "(b) single" if key == "b" else f"(c) K={key[1:]}" + \
            (f" {r['execution']['cotrain_mode']}" if " " not in key else "")
        ratio = f" = {r['rows_per_s'] / a:.1f}x (a)" if a else ""
        single = f", {r['vs_single']:.2f}x (b)" if key != "b" else ""
        mem = f", peak {r['peak_gb']} GB" if r.get("peak_gb") else ""
        parts.append(f"{label} {r['rows_per_s']} rows/s{ratio}{single}{mem}")
    rounds = f", medians of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"cotrain: model={args.model} bits={args.bits} device={base.device} batch {args.batch}/trial{rounds}: "
          + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
