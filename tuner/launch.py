"""`tuner run --workers N`: N worker processes on this machine, sharing one study through its storage.

Each worker is an ordinary `tuner run` process (so a worker on another machine is the same command), with
TUNER_WORKER_INDEX set (it offsets the sampler's seed), pinned to one GPU round-robin from `--gpus`, and on the CPU
given its share of the cores: N processes each running as many threads as there are cores would spend their time
waiting on each other. Signals are passed on to every worker; their lines are prefixed with the worker index. The caller prints the
leaderboard once they are done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def worker_command(args, index: int) -> list[str]:
    # The storage URL may hold a password: it goes to the workers in their environment (TUNER_STORAGE, read by
    # `tuner run` as its default), never on a command line, which every user of the machine can read in `ps`.
    cmd = [sys.executable, "-m", "tuner.cli", "run", args.sweep, "--workers", "1"]
    for flag, value in (("--trials", args.trials), ("--timeout", args.timeout),
                        ("--deadline", getattr(args, "deadline", None)), ("--study", args.study),
                        ("--device", args.device), ("--artifacts", getattr(args, "artifacts", None))):
        if value is not None:
            cmd += [flag, str(value)]
    if args.force:
        cmd.append("--force")
    for item in getattr(args, "set", None) or []:  # every worker reads the same overridden sweep
        cmd += ["--set", item]
    return cmd


def worker_env(index: int, n: int, gpus: list[str] | None, storage: str) -> dict:
    env = {**os.environ, "TUNER_WORKER_INDEX": str(index), "TUNER_PLAIN_OUTPUT": "1", "TUNER_STORAGE": storage}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        threads = max(1, (os.cpu_count() or 1) // n)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env["TUNER_TORCH_THREADS"] = str(threads)
    return env


def launch_workers(args) -> int:
    n = args.workers
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    procs: list[subprocess.Popen] = []
    pumps = []
    for i in range(n):
        p = subprocess.Popen(worker_command(args, i), env=worker_env(i, n, gpus, args.storage),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[worker {i}] "), daemon=True)
        t.start()
        pumps.append(t)
        if i == 0:
            time.sleep(2)  # let the first worker create the study and its tables before the others race for it

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    print(f"{n} workers finished with exit codes {codes}", flush=True)
    if any(c == 130 for c in codes):
        return 130
    return max(codes)
