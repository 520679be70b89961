#!/usr/bin/env python3
"""FlashAttention-2 backward peer for `flashgpt bench attention --device cuda --head-dim D`: torch
SDPA's FLASH_ATTENTION backend (FA2), the backward alone (torch.autograd.grad of the forward's
output, the graph kept), on the CLI's rows for the head dims given (bf16, hidden 2048 so heads =
2048 // d, 16k tokens, the seqlens given, causal and not). FLOPs as the CLI counts them: 2.5x the
forward's 4 b h s^2 d (halved when causal). Each row is checked against SDPA's math backend at
one head (dQ, dK, dV) before it is timed; times are medians of CUDA-event runs (cudnn_bwd.backward_row).
A row the backend refuses is reported and written with no time. The analogue of cudnn_bwd.py.

    python3 bench/attention_gpu/fa2_bwd.py --out DIR --head-dims 96,32 [--seqlens 512,1024]"""
import argparse
import csv
import os

import torch
from torch.nn.attention import SDPBackend

from cudnn_bwd import backward_row  # the cuDNN peer's row: the same inputs, check and timing (this folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--head-dims", default="96,32")
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--min-time-s", type=float, default=0.1)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    results = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            for s in (int(x) for x in args.seqlens.split(",")):
                batch, heads = 16384 // s, 2048 // d
                try:
                    ms, tf, err = backward_row(SDPBackend.FLASH_ATTENTION, "FA2", batch, heads, s, d, causal, 0.0,
                                               args.min_time_s)
                    results.append((batch, heads, s, d, int(causal), 0.0, f"{ms:.4f}", f"{tf:.1f}"))
                    print(f"{batch:>5} {heads:>5} {s:>6} {d:>4} {'yes' if causal else 'no':>6} {ms:9.3f} ms "
                          f"{tf:8.1f} TF/s  err {err:.1e}", flush=True)
                except RuntimeError as e:
                    print(f"{batch:>5} {heads:>5} {s:>6} {d:>4} {'yes' if causal else 'no':>6} refused: "
                          f"{str(e).splitlines()[0][:120]}", flush=True)
                    results.append((batch, heads, s, d, int(causal), 0.0, "", ""))
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fa2_bwd.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "batch", "heads", "seqlen", "head_dim", "causal", "dropout", "bwd_ms", "bwd_tflops"])
        for r in results:
            w.writerow([torch.cuda.get_device_name(), *r])
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
