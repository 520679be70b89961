#!/usr/bin/env python3
"""FlashAttention benchmark: flashgpt vs torch SDPA (FlashAttention-2, cuDNN and math backends),
measured in one run on one GPU. One command on the GPU machine, after a CUDA build in build/:

    python3 bench/attention_gpu/bench_attention.py --out results/attention_gpu

Shapes as in the FlashAttention papers: bf16, hidden 2048 (heads = 2048 / d), batch * seqlen =
16k tokens, seqlen 512 .. 16k, d 64 and 128, causal and not; plus our model's attention (batch 64,
12 heads, seqlen 512, d 64, causal, dropout 0.1). FLOPs: 4 b h s^2 d forward, halved when causal;
backward 2.5x the forward. Each method is validated against a reference before it is timed.
Times are medians of triton.testing.do_bench (CUDA events). Before each method's timing the
GPU idles --settle-s seconds: after a long row the H100 stays under its software power cap for
about a second, and the method timed first in the next row would pay for the previous row's
heat (8% slower backward measured at d64 s512). Peak memory is torch's peak allocation
during one forward + backward, beyond the inputs and the output gradient.
Writes <out>/attention_bench.csv and <out>/attention_bench.png, prints a table with ratios."""
import argparse
import csv
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# The binding as a CUDA build leaves it (<build>/python), else the installed package (pip install .).
sys.path.insert(0, os.path.join(os.environ.get("FLASHGPT_BUILD_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "build")), "python"))
from flashgpt_attn import flash_attn_func  # noqa: E402

import triton.testing  # noqa: E402

BACKENDS = {"torch-fa2": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
            "torch-math": SDPBackend.MATH}


def flops_fwd(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def make_fn(method, q, k, v, causal, dropout):
    if method == "flashgpt":
        return lambda: flash_attn_func(q, k, v, dropout_p=dropout, causal=causal)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [b, h, s, d]
    backend = BACKENDS[method]

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout, is_causal=causal).transpose(1, 2)

    return fn


def validate(method, fn, q, k, v, causal, dropout):
    """Forward output vs SDPA math in fp32 (without dropout: exact comparison possible);
    with dropout only finiteness and the mean magnitude are checked."""
    out = fn()
    if not torch.isfinite(out).all():
        return "non-finite output"
    if dropout > 0:
        return None
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q[:1], k[:1], v[:1]))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    err = (out[:1].float() - ref).abs().max().item()
    return None if err < 3e-2 else f"max error {err:.3g} vs fp32 math"


def bench_one(method, b, h, s, d, causal, dropout, reps_ms, settle_s=0.0):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    fn = make_fn(method, q, k, v, causal, dropout)
    row = {"method": method, "batch": b, "heads": h, "seqlen": s, "head_dim": d, "causal": int(causal),
           "dropout": dropout}
    try:
        problem = validate(method, fn, q, k, v, causal, dropout)
        if problem:
            row["status"] = "invalid: " + problem
            return row
        time.sleep(settle_s)
        fwd_ms = triton.testing.do_bench(fn, warmup=10, rep=reps_ms, return_mode="median")
        out = fn()
        bwd_ms = triton.testing.do_bench(lambda: out.backward(g, retain_graph=True), warmup=10, rep=reps_ms,
                                         grad_to_none=[q, k, v], return_mode="median")
        del out
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward(g)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        f = flops_fwd(b, h, s, d, causal)
        row.update(status="ok", fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=f / fwd_ms / 1e9,
                   bwd_tflops=2.5 * f / bwd_ms / 1e9, peak_mib=peak / 2**20)
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except RuntimeError as e:  # a backend that does not support the shape
        row["status"] = "unsupported: " + str(e).splitlines()[0][:80]
    finally:
        q.grad = k.grad = v.grad = None
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/attention_gpu")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--methods", default="flashgpt,torch-fa2,torch-cudnn,torch-math")
    ap.add_argument("--math-max-seqlen", type=int, default=8192, help="skip the math backend above this (time)")
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--settle-s", type=float, default=1.5, help="idle time before each method's timing")
    ap.add_argument("--extra", default="", help="more rows: 'b,h,s,d,causal,dropout;...' ('none' for --seqlens "
                    "and --no-model leave only these)")
    ap.add_argument("--no-model", action="store_true", help="leave out the model shape row")
    args = ap.parse_args()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    configs = []
    for d in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for s in map(int, args.seqlens.split(",")) if args.seqlens != "none" else ():
                configs.append((16384 // s, 2048 // d, s, d, causal, 0.0, "paper"))
    if not args.no_model:
        configs.append((64, 12, 512, 64, True, 0.1, "model"))
    for spec in filter(None, args.extra.split(";")):
        b, h, s, d, causal, dropout = spec.split(",")
        configs.append((int(b), int(h), int(s), int(d), bool(int(causal)), float(dropout), "extra"))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for b, h, s, d, causal, dropout, group in configs:
        for m in methods:
            if m == "torch-math" and s > args.math_max_seqlen:
                rows.append({"method": m, "batch": b, "heads": h, "seqlen": s, "head_dim": d, "causal": int(causal),
                             "dropout": dropout, "status": "skipped (seqlen)", "group": group})
                continue
            r = bench_one(m, b, h, s, d, causal, dropout, args.rep_ms, args.settle_s)
            r["group"] = group
            rows.append(r)
            print(f"  {m:12s} b={b:3d} h={h:2d} s={s:5d} d={d:3d} causal={int(causal)} p={dropout}: "
                  + (f"fwd {r['fwd_tflops']:6.1f} bwd {r['bwd_tflops']:6.1f} TFLOP/s, peak {r['peak_mib']:8.1f} MiB"
                     if r["status"] == "ok" else r["status"]), flush=True)
    fields = ["group", "method", "batch", "heads", "seqlen", "head_dim", "causal", "dropout", "status", "fwd_ms",
              "bwd_ms", "fwd_tflops", "bwd_tflops", "peak_mib"]
    with open(out_dir / "attention_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    print_table(rows, methods)
    plot(rows, methods, out_dir / "attention_bench.png")


def print_table(rows, methods):
    key = lambda r: (r["batch"], r["heads"], r["seqlen"], r["head_dim"], r["causal"], r["dropout"])  # noqa: E731
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["method"]] = r
    def val(r, f):
        return r.get(f) if r and r.get("status") == "ok" else None
    print("\nTFLOP/s forward | backward, ratio = flashgpt / torch-fa2 and flashgpt / torch-cudnn; peak MiB")
    hdr = f"{'b':>3} {'h':>2} {'s':>5} {'d':>3} {'c':>1} {'p':>4} |"
    for m in methods:
        hdr += f" {m[:11]:>11} fwd  bwd |"
    hdr += " fwd/fa2 bwd/fa2 fwd/cudnn bwd/cudnn | mem ours  fa2"
    print(hdr)
    for k, ms in by.items():
        line = f"{k[0]:3d} {k[1]:2d} {k[2]:5d} {k[3]:3d} {k[4]:1d} {k[5]:4.2f} |"
        for m in methods:
            fw, bw = val(ms.get(m), "fwd_tflops"), val(ms.get(m), "bwd_tflops")
            line += f" {'':>6}{fw:5.0f} {bw:5.0f}|" if fw is not None else f" {'-':>11}  -    -|"
        ours = ms.get("flashgpt")
        for ref in ("torch-fa2", "torch-cudnn"):
            for f in ("fwd_tflops", "bwd_tflops"):
                a, b = val(ours, f), val(ms.get(ref), f)
                line += f" {a / b:7.2f}" if a and b else f" {'-':>7}"
        mo, mf = val(ours, "peak_mib"), val(ms.get("torch-fa2"), "peak_mib")
        line += f" | {mo if mo is None else round(mo):>8} {mf if mf is None else round(mf):>5}"
        print(line)


def plot(rows, methods, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    for col, (d, causal) in enumerate([(64, 0), (64, 1), (128, 0), (128, 1)]):
        for row_i, f in enumerate(("fwd_tflops", "bwd_tflops")):
            ax = axes[row_i][col]
            seqs = sorted({r["seqlen"] for r in rows if r["group"] == "paper"})
            width = 0.8 / len(methods)
            for mi, m in enumerate(methods):
                ys = []
                for s in seqs:
                    r = next((r for r in rows if r["group"] == "paper" and r["method"] == m and r["seqlen"] == s
                              and r["head_dim"] == d and r["causal"] == causal), None)
                    ys.append(r[f] if r and r.get("status") == "ok" else 0)
                xs = [i + (mi - len(methods) / 2 + 0.5) * width for i in range(len(seqs))]
                bars = ax.bar(xs, ys, width, label=m)
                for x, y in zip(xs, ys):
                    if y:
                        ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(seqs)), [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqs])
            ax.set_title(f"{'forward' if row_i == 0 else 'backward'}, d={d}, {'causal' if causal else 'no mask'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            if row_i == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"Attention speed, bf16, hidden 2048, 16k tokens per batch, {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
