#!/usr/bin/env python3
"""Per-kernel durations of the last full decode step in an ncu --csv --page raw log: the
kernels between the last two sample_kernel launches, each measured alone by ncu (so their
sum leaves out the gaps between kernels, and ncu's fixed clocks and cache flushes make each
one slower than in a replayed graph: read the shares, not the sum).

  ncu --metrics gpu__time_duration.sum --csv --page raw -c 700 flashgpt bench generate \
      --device cuda --preset seed --batch 1 --prompt-tokens 8 --new-tokens 3 > ncu.csv
  python3 bench/generate/ncu_step_summary.py ncu.csv
"""
import csv, re, sys
from collections import OrderedDict

rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[hdr]
name_i, dur_i = h.index("Kernel Name"), h.index("gpu__time_duration.sum")
unit = rows[hdr + 1][dur_i] if len(rows) > hdr + 1 else ""
data = []
for r in rows[hdr + 1:]:
    try:
        data.append((r[name_i], float(r[dur_i].replace(",", ""))))
    except (ValueError, IndexError):
        pass
scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(unit, 1e-3)
ends = [i for i, (n, _) in enumerate(data) if n.startswith("sample_kernel") or "sample_kernel" in n]
print(f"{len(data)} kernels profiled, unit {unit}, {len(ends)} sample_kernel launches")
if len(ends) < 2:
    sys.exit(0)
step = data[ends[-2] + 1: ends[-1] + 1]
agg = OrderedDict()
for n, d in step:
    short = re.sub(r"flashgpt::|inference_cuda::|\(anonymous namespace\)::|^void ", "", n)
    if short.endswith(")"):
        short = short[: short.rfind("(")]
    a = agg.setdefault(short[:70], [0, 0.0])
    a[0] += 1
    a[1] += d * scale
total = sum(a[1] for a in agg.values())
print(f"last decode step: {len(step)} kernels, {total:.1f} us summed (each alone)")
for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{t:9.1f} us {c:4d} x  {t / c:7.2f} us  {k}")
