#!/usr/bin/env python3
"""Our tiled CPU attention (fp32) against PyTorch's CPU scaled_dot_product_attention.

For each shape, `--repeats` times in turn (ours, torch, ours, torch, ...: on a shared machine
the load then falls on both alike), runs `flashgpt bench attention --device cpu` for that one
N as a child process (argument vector), which validates the tiled kernel against our reference
before it times it and writes attention_cpu_timing.csv (the fastest of repeated runs), then
times torch's SDPA on the same shape in this process: the forward, and the backward alone
(torch.autograd.grad with retain_graph on one saved forward), the fastest of repeated runs too.
Reports the median over the repeats of each. Nothing of torch's output is checked here: our
bench already checked ours against our reference, and torch is the yardstick, not the subject.

Prints one table: shape, ours fwd/bwd ms, torch fwd/bwd ms, torch/ours (> 1: ours is faster).

  /work/torchenv/bin/python bench/attention_cpu/torch_sdpa_cpu.py --flashgpt build/flashgpt
"""
import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flashgpt", default="build/flashgpt", help="the flashgpt executable")
    p.add_argument("--threads", type=int, default=2, help="threads for both (OpenMP and torch)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--min-seqlen", type=int, default=256)
    p.add_argument("--max-seqlen", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4, help="batch x heads work items share the cores")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement, both sides")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side per shape (median)")
    p.add_argument("--csv", help="also write the table here")
    return p.parse_args()


def run_ours(a, head_dim, causal, n, out_dir):
    # One N; no naive reference (N=1 is below it); the IO sweep stays (the plot needs its rows).
    cmd = [a.flashgpt, "bench", "attention", "--device", "cpu", "--out", out_dir,
           "--head-dim", str(head_dim), "--batch", str(a.batch), "--heads", str(a.heads),
           "--min-seqlen", str(n), "--max-seqlen", str(n),
           "--naive-max-seqlen", "1", "--io-max-seqlen", str(n), "--min-time", str(a.min_time),
           "--threads", str(a.threads)]
    if causal:
        cmd.append("--causal")
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    with open(os.path.join(out_dir, "attention_cpu_timing.csv")) as f:
        row = next(csv.DictReader(f))
        return float(row["tiled_fwd_s"]), float(row["tiled_bwd_s"])


def time_best(fn, min_time):
    fn()  # warm-up: torch's first call of a shape (and autograd's first backward) is far slower
    best, total, reps = float("inf"), 0.0, 0
    while reps < 20 and (reps < 1 or total < min_time):
        start = time.perf_counter()
        fn()
        t = time.perf_counter() - start
        best, total, reps = min(best, t), total + t, reps + 1
    return best


def run_torch(a, torch, head_dim, causal, n):
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(7)
    shape = (a.batch, a.heads, n, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    d_o = torch.randn(shape, generator=gen)
    with torch.no_grad():
        fwd = time_best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), a.min_time)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    bwd = time_best(lambda: torch.autograd.grad(o, (q, k, v), d_o, retain_graph=True), a.min_time)
    return fwd, bwd


def main():
    a = parse_args()
    import torch
    torch.set_num_threads(a.threads)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
    rows = []
    header = f"{'d':>4} {'causal':>6} {'N':>6} | {'ours fwd':>9} {'torch fwd':>9} {'t/o':>5} | " \
             f"{'ours bwd':>9} {'torch bwd':>9} {'t/o':>5}"
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch} x heads {a.heads}, fp32, ms "
          f"(median of {a.repeats} alternating runs, each the fastest of its repeats); t/o = torch / ours, "
          "> 1: ours is faster")
    print(header)
    print("-" * len(header))
    sizes = []
    n = a.min_seqlen
    while n <= a.max_seqlen:
        sizes.append(n)
        n *= 2
    for head_dim in a.head_dims:
        for causal in causals:
            for n in sizes:
                ours, theirs = [], []
                for _ in range(a.repeats):
                    with tempfile.TemporaryDirectory() as out_dir:
                        ours.append(run_ours(a, head_dim, causal, n, out_dir))
                    theirs.append(run_torch(a, torch, head_dim, causal, n))
                of, ob = (statistics.median(x[i] for x in ours) for i in (0, 1))
                tf, tb = (statistics.median(x[i] for x in theirs) for i in (0, 1))
                rows.append((head_dim, int(causal), n, of, ob, tf, tb))
                print(f"{head_dim:>4} {('yes' if causal else 'no'):>6} {n:>6} | {of * 1e3:>9.2f} {tf * 1e3:>9.2f} "
                      f"{tf / of:>5.2f} | {ob * 1e3:>9.2f} {tb * 1e3:>9.2f} {tb / ob:>5.2f}", flush=True)
    if a.csv:
        with open(a.csv + ".tmp", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["head_dim", "causal", "n", "ours_fwd_s", "ours_bwd_s", "torch_fwd_s", "torch_bwd_s"])
            w.writerows(rows)
        os.replace(a.csv + ".tmp", a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
