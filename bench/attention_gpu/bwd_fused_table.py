#!/usr/bin/env python3
"""Joins runs of `flashgpt bench attention --device cuda` (attention_cuda.csv): one with the separate
dQ convert (FLASHGPT_ATTN_BWD_FUSED_CONVERT=0) and one or more with the fused convert (=1, e.g. two
builds of it), and prints a markdown table of the backward times per row: separate ms, each fused
ms, and separate/fused (> 1: the fused convert is faster); the kernels that ran are checked."""
import argparse
import csv
import sys


def rows(path):
    with open(path, newline="") as f:
        out = {}
        for r in csv.DictReader(f):
            base = r["bwd_kernel"].split("+")[0]
            key = (base, int(r["head_dim"]), int(r["seqlen"]), int(r["batch"]), int(r["heads"]), r["causal"] == "1",
                   float(r["dropout"]))
            out[key] = r
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--separate", required=True)
    ap.add_argument("--fused", action="append", required=True, help="label=attention_cuda.csv (repeatable)")
    a = ap.parse_args()
    sep = rows(a.separate)
    fused = []
    for item in a.fused:
        label, _, path = item.partition("=")
        try:
            fused.append((label, rows(path)))
        except OSError as e:
            print(f"{label}: {e}")
    if not fused:
        return 1
    head = "| kernel | d | seqlen | batch x heads | causal | dropout | separate ms |"
    for label, _ in fused:
        head += f" {label} ms | separate/{label} |"
    print(head)
    print("|" + "---|" * (7 + 2 * len(fused)))
    ratios = {label: [] for label, _ in fused}
    bad_kernels = []
    for key in sorted(sep):
        s = sep[key]
        if "+dqfuse" in s["bwd_kernel"]:
            bad_kernels.append(("separate", key, s["bwd_kernel"]))
        base, d, seqlen, batch, heads, causal, dropout = key
        line = (f"| {base} | {d} | {seqlen} | {batch} x {heads} | {'yes' if causal else 'no'} | {dropout:.1f} |"
                f" {float(s['bwd_ms']):.3f} |")
        for label, table in fused:
            f = table.get(key)
            if f is None:
                line += " - | - |"
                continue
            if not f["bwd_kernel"].endswith("+dqfuse"):
                bad_kernels.append((label, key, f["bwd_kernel"]))
            ratio = float(s["bwd_ms"]) / float(f["bwd_ms"])
            ratios[label].append(ratio)
            line += f" {float(f['bwd_ms']):.3f} | {ratio:.3f} |"
        print(line)
    print()
    for label, r in ratios.items():
        if r:
            print(f"backward separate/{label}: min {min(r):.3f}, max {max(r):.3f}, mean {sum(r) / len(r):.3f} "
                  f"over {len(r)} rows")
    for label, key, kernel in bad_kernels:
        print(f"WARNING: {label} row {key} ran backward kernel '{kernel}'")
    return 0 if all(ratios.values()) and not bad_kernels else 1


if __name__ == "__main__":
    sys.exit(main())
