#!/usr/bin/env python3
"""Forward-only peer for `flashgpt bench attention --device cuda`: torch SDPA with the cuDNN
backend on the same rows (bf16, hidden 2048, 16k tokens, seqlen 512..16k, d 64 and 128, causal
and not, plus the model shape batch 64 x 12 heads x 512, d 64, causal, no dropout), and the bf16
matmul peak of the card (8192^3 torch.matmul), so that a table can give each kernel's fraction of
it. Needs only torch (no flashgpt binding). Inputs are [batch, seqlen, heads, d] tensors viewed as
[batch, heads, seqlen, d], as bench_attention.py hands them to SDPA. Each row is checked against
SDPA's math backend at one head before it is timed; times are medians of CUDA-event runs.

    python3 bench/attention_gpu/cudnn_fwd.py --out DIR   # writes DIR/cudnn_fwd.csv
    python3 bench/attention_gpu/cudnn_fwd.py --out DIR --head-dim 128   # the d128 rows alone"""
import argparse
import csv
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, min_time_s=0.3):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    reps = max(5, min(1000, int(min_time_s * 1e3 / one)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rows(head_dims):
    out = []
    for d in head_dims:
        for causal in (False, True):
            s = 512
            while s <= 16384:
                out.append((16384 // s, 2048 // d, s, d, causal))
                s *= 2
    if 64 in head_dims:
        out.append((64, 12, 512, 64, True))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--min-time-s", type=float, default=0.3)
    ap.add_argument("--head-dim", type=int, choices=(64, 128), help="only this head dim's rows (default: both)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: torch.matmul(a, b), args.min_time_s)
    peak = 2 * 8192**3 / (mm_ms * 1e-3) / 1e12
    del a, b
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print(f"bf16 matmul 8192^3: {peak:.1f} TFLOP/s")
    results = []
    for batch, heads, s, d, causal in rows((args.head_dim,) if args.head_dim else (64, 128)):
        q, k, v = (torch.randn(batch, s, heads, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        got = fn()[:1, :1].float()
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(qt[:1, :1].float(), kt[:1, :1].float(), vt[:1, :1].float(),
                                                  is_causal=causal)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 2e-2:
            sys.exit(f"cuDNN disagrees with the math backend at b{batch} h{heads} s{s} d{d} causal {causal}: {err}")
        ms = time_ms(fn, args.min_time_s)
        flops = 4.0 * batch * heads * s * s * d / (2 if causal else 1)
        tf = flops / (ms * 1e-3) / 1e12
        results.append((batch, heads, s, d, int(causal), ms, tf))
        print(f"{batch:>5} {heads:>5} {s:>6} {d:>4} {'yes' if causal else 'no':>6} {ms:9.3f} ms {tf:8.1f} TF/s  err {err:.1e}",
              flush=True)
        del q, k, v, qt, kt, vt, got
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "cudnn_fwd.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "matmul_peak_tflops", "batch", "heads", "seqlen", "head_dim", "causal", "fwd_ms",
                    "fwd_tflops"])
        for r in results:
            w.writerow([torch.cuda.get_device_name(), f"{peak:.1f}", *r])
    os.replace(tmp, os.path.join(args.out, "cudnn_fwd.csv"))


if __name__ == "__main__":
    main()
