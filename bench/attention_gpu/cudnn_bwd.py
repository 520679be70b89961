#!/usr/bin/env python3
"""Backward peer for `flashgpt bench attention --device cuda`: torch SDPA's cuDNN backend, the
backward alone (torch.autograd.grad of the forward's output, the graph kept), on the rows of the
CLI's table (bf16, hidden 2048, 16k tokens, seqlen 512..16k, d 64 and 128, causal and not, plus
the model shape batch 64 x 12 heads x 512, d 64, causal, with dropout 0.1 and without), and the
bf16 matmul peak of the card (8192^3 torch.matmul). FLOPs as the CLI counts them: 2.5x the
forward's 4 b h s^2 d (halved when causal). Each row without dropout is checked against SDPA's
math backend at one head (dQ, dK, dV) before it is timed; times are medians of CUDA-event runs.
A row cuDNN refuses (e.g. dropout on an older cuDNN) is reported and written with no time.
With --ours, also prints the joined table (bwd_table.py) against the CLI's attention_cuda.csv.

    python3 bench/attention_gpu/cudnn_bwd.py --out DIR [--ours DIR/attention_cuda.csv]"""
import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cudnn_fwd import time_ms  # the same CUDA-event median as the forward peer (this folder)


def rows(seqlens, head_dims=(64, 128)):
    out = []
    for d in head_dims:
        for causal in (False, True):
            for s in seqlens:
                out.append((16384 // s, 2048 // d, s, d, causal, 0.0))
    if 64 in head_dims:
        out.append((64, 12, 512, 64, True, 0.1))
        out.append((64, 12, 512, 64, True, 0.0))
    return out


def backward_row(backend, name, batch, heads, s, d, causal, dropout, min_time_s):
    """One row's backward under an SDPA backend: torch.autograd.grad of the forward's output (the
    graph kept), bf16, (batch, s, heads, d) inputs. Returns (ms, TFLOP/s, err); err is the
    largest relative error of dQ, dK, dV against SDPA's math backend at one head (rows without
    dropout; 0 with dropout). Exits where they disagree; a row the backend refuses raises its
    RuntimeError. FLOPs as the CLI counts them: 2.5x the forward's 4 b h s^2 d (halved when
    causal). fa2_bwd.py times its rows with it too."""
    dev = torch.device("cuda")
    q, k, v = (torch.randn(batch, s, heads, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(batch, s, heads, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    flops = 2.5 * 4.0 * batch * heads * s * s * d / (2 if causal else 1)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, dropout_p=dropout)

    def fn():
        return torch.autograd.grad(out, (q, k, v), g, retain_graph=True)

    grads = fn()
    err = 0.0
    if dropout == 0.0:
        q1, k1, v1 = (t[:1, :, :1].detach().float().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            o1 = F.scaled_dot_product_attention(q1.transpose(1, 2), k1.transpose(1, 2), v1.transpose(1, 2),
                                                is_causal=causal)
        want = torch.autograd.grad(o1, (q1, k1, v1), g[:1, :1].float())
        for got_t, want_t in zip(grads, want):
            got1 = got_t[:1, :, :1].float()
            err = max(err, ((got1 - want_t).norm() / want_t.norm()).item())
        if not err < 3e-2:
            sys.exit(f"{name} backward disagrees with the math backend at b{batch} h{heads} s{s} d{d} "
                     f"causal {causal}: {err}")
    ms = time_ms(fn, min_time_s)
    return ms, flops / (ms * 1e-3) / 1e12, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--min-time-s", type=float, default=0.3)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128", help="the head dims of the table's rows (the model rows with 64)")
    ap.add_argument("--ours", help="the CLI's attention_cuda.csv: print the joined table too")
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
    for batch, heads, s, d, causal, dropout in rows([int(x) for x in args.seqlens.split(",")],
                                                      tuple(int(x) for x in args.head_dims.split(","))):
        try:
            ms, tf, err = backward_row(SDPBackend.CUDNN_ATTENTION, "cuDNN", batch, heads, s, d, causal, dropout,
                                       args.min_time_s)
            results.append((batch, heads, s, d, int(causal), dropout, f"{ms:.4f}", f"{tf:.1f}"))
            print(f"{batch:>5} {heads:>5} {s:>6} {d:>4} {'yes' if causal else 'no':>6} {dropout:>4.1f} {ms:9.3f} ms "
                  f"{tf:8.1f} TF/s  err {err:.1e}", flush=True)
        except RuntimeError as e:
            print(f"{batch:>5} {heads:>5} {s:>6} {d:>4} {'yes' if causal else 'no':>6} {dropout:>4.1f} refused: "
                  f"{str(e).splitlines()[0][:120]}", flush=True)
            results.append((batch, heads, s, d, int(causal), dropout, "", ""))
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cudnn_bwd.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "matmul_peak_tflops", "batch", "heads", "seqlen", "head_dim", "causal", "dropout",
                    "bwd_ms", "bwd_tflops"])
        for r in results:
            w.writerow([torch.cuda.get_device_name(), f"{peak:.1f}", *r])
    os.replace(path + ".tmp", path)
    if args.ours:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bwd_table
        bwd_table.print_table(args.ours, path)


if __name__ == "__main__":
    main()
