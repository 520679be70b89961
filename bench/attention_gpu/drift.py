#!/usr/bin/env python3
"""Why a short backward measures slower late in a long benchmark process: the same shape timed
fresh, then right after the long rows that come before it in bench_attention.py, then after
5 s of idling; with the GPU's clocks, temperature, power and clock-event reasons (0x4: software
power cap) sampled alongside by nvidia-smi, the caching allocator's cudaMalloc counts, and the
GPU time of each kernel of the backward (torch.profiler).

    python3 bench/attention_gpu/drift.py --shape 32,32,512,64,1 --heat "2,32,8192,64,0;1,32,16384,64,0"
"""
import argparse
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import bench_one, make_fn  # noqa: E402
from kernel_times import kernel_times, short  # noqa: E402

import triton.testing  # noqa: E402

T0 = time.time()


def stamp(msg):
    print(f"[{time.time() - T0:7.2f}s] {msg}", flush=True)


def gpu_state():
    q = "temperature.gpu,clocks.sm,power.draw,clocks_event_reasons.active"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.strip()


def measure(tag, shape, methods):
    b, h, s, d, causal = shape
    for method in methods:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        fn = make_fn(method, q, k, v, bool(causal), 0.0)
        out = fn()
        bwd = lambda: out.backward(g, retain_graph=True)  # noqa: E731
        before = torch.cuda.memory_stats()
        ms = triton.testing.do_bench(bwd, warmup=10, rep=60, grad_to_none=[q, k, v], return_mode="median")
        after = torch.cuda.memory_stats()
        state = gpu_state()
        mallocs = after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0)
        # Back to back: 50 calls between two events, no cache flush.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            q.grad = k.grad = v.grad = None
            bwd()
        end.record()
        torch.cuda.synchronize()
        loop_ms = start.elapsed_time(end) / 50
        def fresh_bwd():  # as do_bench runs it: the gradients start from None
            q.grad = k.grad = v.grad = None
            bwd()
        kernels = kernel_times(fresh_bwd, 20)
        flops = 2.5 * 4.0 * b * h * s * s * d / (2 if causal else 1)
        stamp(f"{tag} {method:10s} do_bench {ms * 1e3:7.1f} us ({flops / ms / 1e9:5.1f} TFLOP/s), loop {loop_ms * 1e3:7.1f} us,"
              f" kernels {sum(kernels.values()):7.1f} us, cudaMallocs {mallocs}, gpu [{state}]")
        for n, t in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"        {t:8.1f}  {short(n)}")
        del out
        q.grad = k.grad = v.grad = None
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,32,512,64,1", help="b,h,s,d,causal of the short row")
    ap.add_argument("--heat", default="2,32,8192,64,0;1,32,16384,64,0", help="rows run before, all methods")
    ap.add_argument("--heat-methods", default="flashgpt,torch-fa2,torch-cudnn,torch-math")
    ap.add_argument("--methods", default="flashgpt,torch-fa2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smi-log", default="drift_smi.csv", help="nvidia-smi samples, every 100 ms")
    args = ap.parse_args()
    shape = tuple(map(int, args.shape.split(",")))
    methods = args.methods.split(",")
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,temperature.gpu,clocks.sm,power.draw,"
                            "clocks_event_reasons.active", "--format=csv,noheader", "-lms", "100"],
                           stdout=open(args.smi_log, "w"))
    stamp(f"device {torch.cuda.get_device_name()}, idle gpu [{gpu_state()}]")
    for r in range(args.rounds):
        measure(f"fresh{r}", shape, methods)
    for spec in filter(None, args.heat.split(";")):
        b, h, s, d, c = map(int, spec.split(","))
        for m in args.heat_methods.split(","):
            if m == "torch-math" and s > 8192:
                continue
            row = bench_one(m, b, h, s, d, bool(c), 0.0, 60)
            stamp(f"heat {m} {spec}: {row.get('status')} bwd {row.get('bwd_tflops', 0):.1f}")
    for r in range(args.rounds):
        measure(f"after{r}", shape, methods)
    time.sleep(5)
    stamp(f"after 5 s idle gpu [{gpu_state()}]")
    measure("rested", shape, methods)
    smi.terminate()


if __name__ == "__main__":
    main()
