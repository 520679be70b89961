#!/usr/bin/env python3
"""Per-kernel GPU time of one forward and one backward, flashgpt against torch's SDPA backends,
from torch.profiler's CUDA activity (kernels and memsets), to see where a method spends its time
(for the backward: workspace clearing, preprocess, main kernel, dQ convert).

    python3 bench/attention_gpu/kernel_times.py --shapes "32,16,512,128,0;64,12,512,64,1,0.1"

A shape is 'batch,heads,seqlen,head_dim,causal[,dropout]'. Prints, for each shape and method, the
mean time per call of every kernel (microseconds) and the sum, forward and backward apart."""
import argparse
import collections
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import make_fn  # noqa: E402


def kernel_times(fn, iters):
    """Mean microseconds per call of each GPU activity that fn launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time_total
    return {name: t / iters for name, t in totals.items()}


def short(name, width=70):
    name = name.replace("flashgpt::attn::", "").replace("pytorch_flash::", "")
    return name if len(name) <= width else name[:width - 3] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32,16,512,128,0;32,32,512,64,0;32,16,512,128,1;64,12,512,64,1,0.1")
    ap.add_argument("--methods", default="flashgpt,torch-fa2")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for spec in filter(None, args.shapes.split(";")):
        fields = spec.split(",")
        b, h, s, d, causal = map(int, fields[:5])
        dropout = float(fields[5]) if len(fields) > 5 else 0.0
        print(f"\n== b={b} h={h} s={s} d={d} causal={causal} dropout={dropout}")
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        for method in args.methods.split(","):
            fn = make_fn(method, q, k, v, bool(causal), dropout)
            out = fn()
            passes = {"fwd": fn, "bwd": lambda: out.backward(g, retain_graph=True)}
            for name, pass_fn in passes.items():
                times = kernel_times(pass_fn, args.iters)
                print(f"  {method} {name}: {sum(times.values()):8.1f} us")
                for kernel, t in sorted(times.items(), key=lambda kv: -kv[1]):
                    print(f"      {t:8.1f}  {short(kernel)}")
            q.grad = k.grad = v.grad = None
            del out


if __name__ == "__main__":
    main()
