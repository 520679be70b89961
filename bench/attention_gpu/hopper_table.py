#!/usr/bin/env python3
"""The TMA forward's table from one device run of hopper_run.sh: TFLOP/s of the TMA forward, the
cp.async wgmma forward and cuDNN per row, their ratios, and each kernel's fraction of the card's
bf16 matmul peak (measured by cudnn_fwd.py in the same run). Markdown on stdout.

    python3 bench/attention_gpu/hopper_table.py DIR   # DIR holds bench_wgmma.csv, bench_tma.csv,
                                                     # cudnn_fwd.csv (and bench_tma_b.csv if run)

With bench_tma_t<k>.csv (hopper_run.sh's TMA_TILES: d64 rows of each d64 tile) a second table
follows: each tile's TFLOP/s over the cp.async kernel's, per d64 row, and the best tile's ratio
to the cp.async kernel and to cuDNN."""
import csv
import glob
import os
import re
import sys


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def key(r):
    return (int(r["batch"]), int(r["heads"]), int(r["seqlen"]), int(r["head_dim"]), int(r["causal"]))


def main():
    d = sys.argv[1]
    ours = {}
    for name in ("wgmma", "tma", "tma_b"):
        path = os.path.join(d, f"bench_{name}.csv")
        if os.path.exists(path):
            # Rows without dropout only (the TMA forward takes none).
            ours[name] = {key(r): r for r in load(path) if float(r["dropout"]) == 0.0}
    cudnn_rows = load(os.path.join(d, "cudnn_fwd.csv"))
    cudnn = {key(r): float(r["fwd_tflops"]) for r in cudnn_rows}
    peak = float(cudnn_rows[0]["matmul_peak_tflops"])
    device = cudnn_rows[0]["device"]
    extra = "tma_b" in ours
    print(f"{device}, bf16, forward only; bf16 matmul peak measured in the same run: {peak:.0f} TFLOP/s\n")
    head = "| b x h x s, d | causal | TMA | wgmma (cp.async) | cuDNN | TMA / wgmma | TMA / cuDNN | TMA % peak | cuDNN % peak |"
    if extra:
        head += " variant b | b / cuDNN |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for k in sorted(ours["tma"], key=lambda k: (k[3], k[4], k[2] if k[0] * k[2] == 16384 else 99999)):
        b, h, s, dim, causal = k
        t = float(ours["tma"][k]["fwd_tflops"])
        w = float(ours["wgmma"][k]["fwd_tflops"]) if k in ours.get("wgmma", {}) else float("nan")
        c = cudnn.get(k, float("nan"))
        line = (f"| {b} x {h} x {s}, {dim} | {'yes' if causal else 'no'} | {t:.0f} | {w:.0f} | {c:.0f} | "
                f"{t / w:.2f} | {t / c:.2f} | {100 * t / peak:.0f}% | {100 * c / peak:.0f}% |")
        if extra:
            tb = float(ours["tma_b"][k]["fwd_tflops"]) if k in ours["tma_b"] else float("nan")
            line += f" {tb:.0f} | {tb / c:.2f} |"
        print(line)
    tiles = {}
    for path in glob.glob(os.path.join(d, "bench_tma_t*.csv")):
        tile = int(re.search(r"_t(\d+)\.csv$", path).group(1))
        tiles[tile] = {key(r): float(r["fwd_tflops"]) for r in load(path) if float(r["dropout"]) == 0.0}
    if not tiles or "wgmma" not in ours:
        return
    order = sorted(tiles)
    print("\nd64 tiles of the TMA forward: TFLOP/s over the cp.async wgmma forward's in the same run\n")
    head = ("| b x h x s | causal | wgmma | cuDNN | " + " | ".join(f"tile {t}" for t in order) +
            " | best | best / wgmma | best / cuDNN |")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    rows = sorted({k for t in tiles.values() for k in t}, key=lambda k: (k[4], k[2] if k[0] * k[2] == 16384 else 99999))
    for k in rows:
        b, h, s, dim, causal = k
        w = float(ours["wgmma"][k]["fwd_tflops"]) if k in ours["wgmma"] else float("nan")
        c = cudnn.get(k, float("nan"))
        got = {t: tiles[t][k] for t in order if k in tiles[t]}
        best = max(got, key=got.get)
        cells = " | ".join(f"{got[t] / w:.2f}" if t in got else "-" for t in order)
        print(f"| {b} x {h} x {s} | {'yes' if causal else 'no'} | {w:.0f} | {c:.0f} | {cells} | {best} "
              f"({got[best]:.0f}) | {got[best] / w:.2f} | {got[best] / c:.2f} |")


if __name__ == "__main__":
    main()
