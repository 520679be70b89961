#!/usr/bin/env python3
"""The decode variants' table from the JSON lines that `flashgpt bench generate --device cuda`
prints, each tagged with "variant" and "run" by the GPU scripts (run_gpu_attnproj.sh,
run_gpu_layer3.sh, bench/pending/run.sh: "fused+l2ahead" is the fused path with the switch on):
tokens/s, ms a step, the bound the bench measures on the same card, the fraction of it and
the ratio to the fused path's mean at the same batch.

    python3 bench/generate/decode_table.py LOGS/bench.jsonl"""
import json
import sys


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    fused = {}
    for r in rows:
        if r["variant"] == "fused":
            fused.setdefault(r["batch"], []).append(r["decode_tokens_per_s"])
    print("| variant | batch | run | tokens/s | ms/step | bound tokens/s | % of bound | / fused (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["batch"], r["variant"] != "fused", r["variant"], r["run"])):
        f = fused.get(r["batch"])
        ratio = r["decode_tokens_per_s"] / (sum(f) / len(f)) if f else float("nan")
        print(f"| {r['variant']} | {r['batch']} | {r['run']} | {r['decode_tokens_per_s']:.0f} | {r['step_ms']:.3f} | "
              f"{r['bound_tokens_per_s']:.0f} | {100 * r['decode_tokens_per_s'] / r['bound_tokens_per_s']:.1f}% | "
              f"{ratio:.3f} |")


if __name__ == "__main__":
    main()
