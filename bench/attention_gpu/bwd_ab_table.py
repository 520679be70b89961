#!/usr/bin/env python3
"""Joins the attention_cuda.csv files of several `flashgpt bench attention --device cuda
--bwd-kernels ... --out DIR` runs (one line per row and backward kernel; the same rows under
different switches) with cudnn_bwd.csv (cudnn_bwd.py, the same call) into one markdown table of
backward TFLOP/s: a column per kernel label, cuDNN, then the ratios asked for.

    python3 bench/attention_gpu/bwd_ab_table.py --ours DIR1 DIR2 --cudnn CUDNN_DIR \\
        --column "dq-warp TMA=wgmma-tma+dqwarp" --column "TMA=wgmma-tma" --column wgmma=wgmma \\
        --ratio "dq-warp TMA/TMA" --ratio "dq-warp TMA/cuDNN" [--title TEXT]

A column is LABEL=BWD_KERNEL (the CSV's bwd_kernel label); a ratio names two columns, or a
column and cuDNN. A missing file or value prints as "-" (a call cut short still gets a table)."""
import argparse
import csv
import os


def key(r):
    return (int(r["batch"]), int(r["heads"]), int(r["seqlen"]), int(r["head_dim"]), int(r["causal"]),
            round(float(r["dropout"]), 3))


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def join(our_dirs, cudnn_dir):
    """{row key: {bwd_kernel: TFLOP/s}} in first-seen row order, and {row key: cuDNN TFLOP/s}."""
    ours, order = {}, []
    for d in our_dirs:
        for r in load(os.path.join(d, "attention_cuda.csv")):
            k = key(r)
            if k not in ours:
                ours[k] = {}
                order.append(k)
            ours[k][r["bwd_kernel"]] = float(r["bwd_tflops"])
    cudnn = {key(r): float(r["bwd_tflops"]) for r in load(os.path.join(cudnn_dir, "cudnn_bwd.csv")) if r["bwd_tflops"]}
    return ours, order, cudnn


def table(ours, order, cudnn, columns, ratios):
    """Markdown lines: batch x heads, seqlen, d, causal, dropout, the columns, cuDNN, the ratios."""
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    div = lambda x, y: "-" if x is None or not y else f"{x / y:.3f}"
    labels = [label for label, _ in columns]
    lines = ["| batch x heads | seqlen | d | causal | dropout | " + " | ".join(labels) + " | cuDNN | " +
             " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
             "|" + "---|" * (6 + len(columns) + len(ratios))]
    for k in order:
        b, h, s, d, c, p = k
        vals = {label: ours[k].get(kernel) for label, kernel in columns}
        vals["cuDNN"] = cudnn.get(k)
        lines.append(f"| {b} x {h} | {s} | {d} | {'yes' if c else 'no'} | {p:g} | " +
                     " | ".join(fmt(vals[label]) for label in labels) + f" | {fmt(vals['cuDNN'])} | " +
                     " | ".join(div(vals[a], vals[b]) for a, b in ratios) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", nargs="+", required=True, help="folders holding attention_cuda.csv")
    ap.add_argument("--cudnn", required=True, help="folder holding cudnn_bwd.csv")
    ap.add_argument("--column", action="append", required=True, help="LABEL=BWD_KERNEL")
    ap.add_argument("--ratio", action="append", default=[], help="LABEL/LABEL (a label may be cuDNN)")
    ap.add_argument("--title", default="", help="printed above the table")
    args = ap.parse_args()
    columns = []
    for c in args.column:
        label, sep, kernel = c.partition("=")
        if not sep or not label or not kernel:
            ap.error(f"--column {c!r}: expected LABEL=BWD_KERNEL")
        columns.append((label, kernel))
    known = {label for label, _ in columns} | {"cuDNN"}
    ratios = []
    for r in args.ratio:
        a, sep, b = r.partition("/")
        if not sep or a not in known or b not in known:
            ap.error(f"--ratio {r!r}: expected LABEL/LABEL among {sorted(known)}")
        ratios.append((a, b))
    if args.title:
        print(args.title + "\n")
    ours, order, cudnn = join(args.ours, args.cudnn)
    print("\n".join(table(ours, order, cudnn, columns, ratios)))


if __name__ == "__main__":
    main()
