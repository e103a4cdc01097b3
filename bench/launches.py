"""Kernel launches per co-training tick, on the CPU: on a GPU, co-training K small-batch trials is bound by the
host launching kernels, not by the GPU running them, so the count of operators dispatched per tick is what decides
whether K trials cost more than one. The model is a Llama with the 8B shape's 32 layers and tiny widths; the
optimizer and gradient clipping run as they do on CUDA (fused AdamW, foreach clipping), so every operator counted is
a kernel launch there or a view. Bench trials as in bench/cotrain.py (q/k/v/o, ranks 8-64, dropout 0.1).

  python bench/launches.py                 # K = 1, 4, 16; the last line is the summary
  python bench/launches.py --top 20        # and the most frequent operators
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from pathlib import Path

from common import diamond_rows, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,4,16")
    ap.add_argument("--steps", type=int, default=4, help="ticks counted, after 3 warm-up steps")
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import tuner.train as train
    from tuner import batches, loop
    from cotrain import trial_params
    from tuner.models import load_base

    # As on CUDA: make_optimizer fuses AdamW there, and clip_grad_norm_'s helpers use foreach kernels.
    train.make_optimizer = lambda name, params, lr, wd, device: (
        torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True), "fused")
    torch.nn.utils.get_total_norm = functools.partial(torch.nn.utils.get_total_norm, foreach=True)
    torch.nn.utils.clip_grads_with_norm_ = functools.partial(torch.nn.utils.clip_grads_with_norm_, foreach=True)
    torch.nn.utils.clip_grad_norm_ = functools.partial(torch.nn.utils.clip_grad_norm_, foreach=True)
    torch.set_num_threads(1)
    base = load_base(resolve("random:narrow"), 16, "cpu", cpu_bf16=False)
    from tuner import lora

    lora.router_of(base.model).per_row = "stacked"  # CUDA's path (the CPU's default runs a LoRA per trial)
    rows, _ = batches.encode(base.tokenizer, diamond_rows(64, 8).train, 182)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.on = collections.Counter(), False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on:
                self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    class Window(train.NullHooks):
        """Counts from the first run's 3rd step to its (3 + steps)th: whole ticks of steady state (every run checks
        its gradients for dead layers on its first two steps)."""

        def __init__(self, counter, first):
            self.counter, self.first, self.seen = counter, first, 0

        def on_step(self, run, record):
            if run.name == self.first:
                self.seen += 1
                self.counter.on = 3 <= self.seen < 3 + args.steps

    class P:  # what trial_params reads
        bits, batch, warmup = 16, 4, 3
        steps = args.steps

    per_k = {}
    for k in [int(x) for x in args.ks.split(",") if x]:
        counter = Count()
        window = Window(counter, f"k{k}-0")
        runs = [train.TrialRun(f"k{k}-{i}", trial_params(i, P), rows, Path("/nonexistent"), hooks=window)
                for i in range(k)]
        t = time.perf_counter()
        with counter:
            loop.train_group(base, runs, gradient_checkpointing=False, fused=True)
        assert all(r.status == "completed" for r in runs), [r.status for r in runs]
        per_k[k] = sum(counter.ops.values()) / args.steps
        print(f"K={k}: {per_k[k]:.0f} operators per tick ({per_k[k] / k:.0f} per trial), "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for name, n in counter.ops.most_common(args.top):
            print(f"    {n / args.steps:8.0f} {name}")
    first = min(per_k)
    print("launches: 32-layer narrow Llama, fused co-training, operators per tick: "
          + "; ".join(f"K={k} {v:.0f} ({v / per_k[first]:.2f}x K={first})" for k, v in per_k.items()), flush=True)


if __name__ == "__main__":
    main()
