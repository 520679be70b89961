#!/usr/bin/env python3
"""Plots the CSVs of `flashgpt bench attention --device cpu --out DIR`.

Three panels: forward/backward time of the naive reference and the tiled FlashAttention
against N; the workspace each one allocates against N (quadratic vs linear); and the
bytes the tiled forward moves between tensors and tiles, counted, against the paper's
N^2 d^2 / M bound for several on-chip budgets M (FlashAttention, Theorem 2 / Figure 2 left).

usage: plot_attention_cpu.py --timing attention_cpu_timing.csv --io attention_cpu_io.csv --out attention_cpu.png
"""
import argparse
import csv
import sys


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", required=True)
    parser.add_argument("--io", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = read_csv(args.timing)
    io = read_csv(args.io)
    fig, (ax_time, ax_mem, ax_io) = plt.subplots(1, 3, figsize=(17, 5))

    n = [int(r["n"]) for r in timing]
    naive = [r for r in timing if r["naive_ran"] == "1"]
    n_naive = [int(r["n"]) for r in naive]
    ax_time.plot(n_naive, [float(r["naive_fwd_s"]) for r in naive], "o-", color="tab:red", label="naive forward")
    ax_time.plot(n, [float(r["tiled_fwd_s"]) for r in timing], "o-", color="tab:blue", label="tiled forward")
    if any(float(r["tiled_bwd_s"]) > 0 for r in timing):
        ax_time.plot(n_naive, [float(r["naive_bwd_s"]) for r in naive], "s--", color="tab:red", label="naive backward")
        ax_time.plot(n, [float(r["tiled_bwd_s"]) for r in timing], "s--", color="tab:blue", label="tiled backward")
    ax_time.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="seconds", title="time")
    ax_time.legend()

    for key, style, label in [
        ("naive_bwd_bytes", "s--", "naive backward"),
        ("naive_fwd_bytes", "o-", "naive forward"),
        ("tiled_bwd_bytes", "s--", "tiled backward"),
        ("tiled_fwd_bytes", "o-", "tiled forward"),
    ]:
        # Only the sizes that ran: the CSV also holds what a skipped naive run would allocate.
        rows = naive if key.startswith("naive") else timing
        color = "tab:red" if key.startswith("naive") else "tab:blue"
        ax_mem.plot([int(r["n"]) for r in rows], [int(r[key]) for r in rows], style, color=color, label=label)
    ax_mem.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="bytes",
               title="workspace allocated (N^2 vs N)")
    ax_mem.legend()

    largest = max(int(r["n"]) for r in io)
    rows = [r for r in io if int(r["n"]) == largest]
    budgets = sorted({int(r["onchip_bytes"]) for r in rows})
    kib = [b / 1024 for b in budgets]
    for rule, style in [("paper", "o-"), ("max_rows", "s-")]:
        counted = [next(float(r["counted_bytes"]) for r in rows if r["rule"] == rule and int(r["onchip_bytes"]) == b)
                   for b in budgets]
        ax_io.plot(kib, counted, style, label=f"counted, {rule} rule")
    bound = [next(float(r["bound_bytes"]) for r in rows if int(r["onchip_bytes"]) == b) for b in budgets]
    ax_io.plot(kib, bound, "k--", label="N^2 d^2 / M (bound)")
    standard = [float(r["standard_io_bytes"]) for r in timing if int(r["n"]) == largest]
    if standard:
        ax_io.axhline(standard[0], color="tab:red", linestyle=":", label="standard attention (Alg. 0)")
    ax_io.set(xscale="log", yscale="log", xlabel="on-chip budget M (KiB)", ylabel="bytes moved",
              title=f"forward IO at N={largest}, d={rows[0]['head_dim']}")
    ax_io.legend()

    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
