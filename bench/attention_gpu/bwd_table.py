#!/usr/bin/env python3
"""Joins the CLI's attention_cuda.csv (`flashgpt bench attention --device cuda --bwd-kernels
wgmma,tma --out DIR`: one line per row and backward kernel) with cudnn_bwd.csv (cudnn_bwd.py, the
same call) into a markdown table of backward TFLOP/s: wgmma, TMA, cuDNN, TMA/wgmma, TMA/cuDNN and
the TMA kernel's fraction of the card's bf16 matmul peak.

    python3 bench/attention_gpu/bwd_table.py OURS.csv CUDNN.csv"""
import csv
import sys


def key(r):
    return (int(r["batch"]), int(r["heads"]), int(r["seqlen"]), int(r["head_dim"]), int(r["causal"]),
            round(float(r["dropout"]), 3))


def print_table(ours_csv, cudnn_csv, out=sys.stdout):
    ours = {}
    order = []
    with open(ours_csv) as f:
        for r in csv.DictReader(f):
            k = key(r)
            if k not in ours:
                ours[k] = {}
                order.append(k)
            ours[k][r["bwd_kernel"]] = float(r["bwd_tflops"])
    cudnn, peak = {}, None
    with open(cudnn_csv) as f:
        for r in csv.DictReader(f):
            peak = float(r["matmul_peak_tflops"])
            cudnn[key(r)] = float(r["bwd_tflops"]) if r["bwd_tflops"] else None
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"backward TFLOP/s (bf16 matmul peak of the card: {fmt(peak, '.0f')})", file=out)
    print("| batch x heads | seqlen | d | causal | dropout | wgmma | TMA | cuDNN | TMA/wgmma | TMA/cuDNN | TMA/peak |",
          file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for k in order:
        b, h, s, d, causal, dropout = k
        w, t, c = ours[k].get("wgmma"), ours[k].get("wgmma-tma"), cudnn.get(k)
        ratio = lambda x, y: None if x is None or y is None or y == 0 else x / y
        print(f"| {b} x {h} | {s} | {d} | {'yes' if causal else 'no'} | {dropout:g} | {fmt(w, '.1f')} | "
              f"{fmt(t, '.1f')} | {fmt(c, '.1f')} | {fmt(ratio(t, w), '.2f')} | {fmt(ratio(t, c), '.2f')} | "
              f"{fmt(ratio(t, peak), '.2f')} |", file=out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print_table(sys.argv[1], sys.argv[2])
