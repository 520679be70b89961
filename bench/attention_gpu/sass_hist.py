#!/usr/bin/env python3
"""Opcode histogram of one kernel's SASS (kernel lab tool, runs where cuobjdump is).

    python3 bench/attention_gpu/sass_hist.py OBJECT NAME_SUBSTRING [--top N]

OBJECT is a .o / .a / .so with sm_90a code; every kernel whose mangled name contains
NAME_SUBSTRING is listed with its instruction count and the most frequent opcodes (the
opcode without modifiers, e.g. HGMMA, FFMA, LOP3), so that variants can be compared."""
import argparse
import collections
import re
import subprocess

ap = argparse.ArgumentParser()
ap.add_argument("object")
ap.add_argument("name")
ap.add_argument("--top", type=int, default=30)
args = ap.parse_args()
sass = subprocess.run(["cuobjdump", "-sass", args.object], capture_output=True, text=True, check=True).stdout
kernels, current = {}, None
for line in sass.splitlines():
    m = re.match(r"\s*Function : (\S+)", line)
    if m:
        current = m.group(1) if args.name in m.group(1) else None
        if current:
            kernels[current] = collections.Counter()
        continue
    if current:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            kernels[current][m.group(2)] += 1
for name, ops in kernels.items():
    print(f"{name}: {sum(ops.values())} instructions")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
