#!/usr/bin/env python3
"""The PyTorch binding's cost, before/after a change of the binding: forward and forward+backward
through flash_attn_func of two (or more) installed builds of flashgpt_attn, side by side with
torch SDPA's FlashAttention-2 and cuDNN backends as the peers, in one process on one GPU.

    python3 bench/attention_gpu/binding_bench.py --impl old=/tmp/old --impl new=/tmp/new --out results

Each --impl NAME=DIR is a folder holding a flashgpt_attn package (pip install --target DIR ...);
each is imported under its own module name, so two builds of the same package run in one
process. bf16, batch 8, 16 heads, seqlen 1024 and 4096, head_dim 64 and 128, causal and not.
Before timing, every build's forward must equal the first build's bit for bit (the kernels are
the same; only the binding differs) and be within 3e-2 of SDPA's FlashAttention-2. Times are
medians over rounds that interleave the methods (CUDA events, --iters calls per round), so
clock drift hits every method alike. Writes <out>/binding_bench.csv and prints the table."""
import argparse
import csv
import importlib.util
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PEERS = {"sdpa-fa2": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def load_impl(name, folder):
    """flashgpt_attn from `folder`, imported as the package flashgpt_attn_<name>."""
    init = pathlib.Path(folder) / "flashgpt_attn" / "__init__.py"
    if not init.is_file():
        sys.exit(f"binding_bench: no flashgpt_attn package in {folder} (expected {init})")
    modname = f"flashgpt_attn_{name}"
    spec = importlib.util.spec_from_file_location(modname, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module.flash_attn_func


def make_call(method, impls, q, k, v, causal):
    if method in impls:
        fa = impls[method]
        return lambda: fa(q, k, v, causal=causal)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [b, h, s, d]

    def call():
        with sdpa_kernel(PEERS[method]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

    return call


def time_ms(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def bench_shape(impls, methods, b, h, s, d, causal, rounds, iters):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    calls = {m: make_call(m, impls, q, k, v, causal) for m in methods}
    # Validation: the builds agree bit for bit, and with SDPA's FlashAttention-2 up to bf16. A
    # peer backend that refuses the shape is left out of this row (n/a), not the whole run.
    outs = {}
    with torch.no_grad():
        for m in methods:
            try:
                outs[m] = calls[m]()
            except RuntimeError as e:
                if m in impls:
                    raise
                print(f"  {m} refused b{b} h{h} s{s} d{d} causal={causal}: {str(e).splitlines()[0]}", flush=True)
                del calls[m]
    if "sdpa-fa2" not in outs:
        sys.exit("binding_bench: SDPA's FlashAttention-2 backend, the reference of the validation, is unavailable")
    first = next(iter(impls))
    for m in impls:
        if not torch.equal(outs[m], outs[first]):
            sys.exit(f"binding_bench: {m}'s output differs from {first}'s at b{b} h{h} s{s} d{d} causal={causal}")
    err = max((outs[m].float() - outs["sdpa-fa2"].float()).abs().max().item() for m in impls)
    if not err < 3e-2:
        sys.exit(f"binding_bench: max difference {err:.3g} from SDPA FA2 at b{b} h{h} s{s} d{d} causal={causal}")
    del outs

    def fwd_bwd(call):
        def fn():
            out = call()
            torch.autograd.grad(out, (q, k, v), g)
        return fn

    fns = {(m, "fwd"): calls[m] for m in calls}
    fns.update({(m, "fwd_bwd"): fwd_bwd(calls[m]) for m in calls})
    samples = {key: [] for key in fns}
    for fn in fns.values():  # warm-up: kernels loaded, allocator pools grown
        fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for key, fn in fns.items():
            samples[key].append(time_ms(fn, iters))
    return {key: statistics.median(v) for key, v in samples.items()}, err


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", action="append", required=True, help="NAME=DIR holding a flashgpt_attn package")
    ap.add_argument("--out", default="results/binding_bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    impls = {}
    for item in args.impl:
        name, _, folder = item.partition("=")
        if not name.isidentifier() or not folder:
            sys.exit(f"binding_bench: --impl wants NAME=DIR with NAME an identifier, got {item!r}")
        impls[name] = load_impl(name, folder)
    methods = [*impls, *PEERS]
    names = list(impls)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch {args.batch}, heads {args.heads}; "
          f"ms per call, median of {args.rounds} rounds x {args.iters} calls", flush=True)
    header = ["seqlen", "head_dim", "causal", "pass", *[f"{m}_ms" for m in methods],
              *[f"{n}/{names[0]}" for n in names[1:]], *[f"{names[-1]}/{p}" for p in PEERS]]
    rows = []
    for s in map(int, args.seqlens.split(",")):
        for d in map(int, args.head_dims.split(",")):
            for causal in (False, True):
                t, err = bench_shape(impls, methods, args.batch, args.heads, s, d, causal, args.rounds, args.iters)
                for pas in ("fwd", "fwd_bwd"):
                    ms = [t.get((m, pas)) for m in methods]
                    ratios = [t[(n, pas)] / t[(names[0], pas)] for n in names[1:]]
                    ratios += [t[(names[-1], pas)] / t[(p, pas)] if (p, pas) in t else None for p in PEERS]
                    rows.append([s, d, int(causal), pas, *[fmt(x) for x in ms], *[fmt(r) for r in ratios]])
                print(f"s{s} d{d} causal={int(causal)} validated (max |diff| vs sdpa-fa2 {err:.2e})", flush=True)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "binding_bench.csv.tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    tmp.replace(out / "binding_bench.csv")


if __name__ == "__main__":
    main()
