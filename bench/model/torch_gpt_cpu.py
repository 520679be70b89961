#!/usr/bin/env python3
"""Our CPU training step beside PyTorch's on the same CPU, fp32 (torch_gpt.py's GPT class).

For each preset it
  1. runs `flashgpt bench train --device cpu --check-dir DIR` (a child process, argument
     vector), which validates and times our CPU backend and writes its initial weights,
     one batch and its dropout-free loss on that batch;
  2. loads those weights into the PyTorch model and computes the same loss in fp32, eval
     mode: both are fp32 on the CPU, so they must agree to 1e-4 relative before anything
     of PyTorch's is timed;
  3. times PyTorch's training step (zero_grad, forward, backward, clip to norm 1,
     torch.optim.AdamW lr 1e-4, betas 0.9/0.95, eps 1e-8, no weight decay) eager and,
     with --compile, under torch.compile (inductor's C++ backend, g++), on random batches;
and prints one table with ours / eager: PyTorch's step time over ours, so above 1 is ours
faster. Both sides use --threads threads (OMP_NUM_THREADS
for ours, torch.set_num_threads for PyTorch's); the other side is idle while one runs.
--repeat N alternates the two N times (A B A B) and reports medians, since two cores
shared with other work give noisy single timings.

Usage: /work/torchenv/bin/python bench/model/torch_gpt_cpu.py --flashgpt build/flashgpt \
           [--preset tiny small] [--vocab 100277] [--batch 8] [--repeat 3] [--compile]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt import GPT  # noqa: E402

# model.h's presets (model_preset), as far as this script needs them.
PRESETS = {
    "tiny": dict(context=64, d_model=64, n_layer=2, n_head=2, d_ff=256, dropout=0.1),
    "small": dict(context=256, d_model=256, n_layer=4, n_head=4, d_ff=1024, dropout=0.1),
    "seed": dict(context=512, d_model=768, n_layer=12, n_head=12, d_ff=3072, dropout=0.1),
}


def build(cfg, flat):
    model = GPT(cfg["vocab"], cfg["context"], cfg["d_model"], cfg["n_layer"], cfg["n_head"], cfg["d_ff"],
                cfg["dropout"])
    model.load_flat(flat, cfg)
    return model


def validate(cfg, flat, windows, B, T, ours):
    model = build(cfg, flat).eval()
    w = torch.from_numpy(windows.astype(np.int64).reshape(B, T + 1))
    with torch.no_grad():
        loss = model(w[:, :T], w[:, 1:]).item()
    return loss, abs(loss - ours) <= 1e-4 * abs(ours)


def time_torch(cfg, flat, B, T, compiled, warmup, steps):
    torch.manual_seed(0)
    model = build(cfg, flat).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(1)

    def step():
        w = torch.randint(0, cfg["vocab"], (B, T + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = fwd(w[:, :T], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    seconds = time.perf_counter() - t0
    return dict(step_ms=1e3 * seconds / steps, tokens_per_s=steps * B * T / seconds, last_loss=last, warmup_s=warm_s)


def run_ours(args, preset, v, check_dir):
    cmd = [args.flashgpt, "bench", "train", "--device", "cpu", "--preset", preset, "--vocab", str(v), "--batch",
           str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if check_dir:
        cmd += ["--check-dir", check_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("$ OMP_NUM_THREADS=%d %s" % (args.threads, " ".join(cmd)), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        sys.exit(f"flashgpt bench train failed for preset {preset}, V={v}")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flashgpt", required=True, help="path of the flashgpt executable")
    ap.add_argument("--preset", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    ap.add_argument("--vocab", type=int, default=100277)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="alternate ours and eager this many times; medians")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, C++)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    rows = []
    v = args.vocab
    for preset in args.preset:
        cfg = dict(PRESETS[preset], vocab=v)
        ours_ms, eager_ms = [], []
        with tempfile.TemporaryDirectory() as tmp:
            ours = run_ours(args, preset, v, tmp)
            check = json.load(open(os.path.join(tmp, f"check_v{v}.json")))
            flat = np.fromfile(os.path.join(tmp, f"params_v{v}.f32"), dtype=np.float32)
            windows = np.fromfile(os.path.join(tmp, f"windows_v{v}.u32"), dtype=np.uint32)
        B, T = check["batch"], check["T"]
        torch_loss, ok = validate(cfg, flat, windows, B, T, check["loss"])
        print(f"validate {preset} V={v}: flashgpt loss {check['loss']:.6f}, torch loss {torch_loss:.6f} "
              f"({'agree' if ok else 'DISAGREE'})", flush=True)
        if not ok:
            sys.exit("the losses disagree: not timing")
        ours_ms.append(ours["step_ms"])
        for i in range(args.repeat):
            if i > 0:
                ours_ms.append(run_ours(args, preset, v, None)["step_ms"])
            eager_ms.append(time_torch(cfg, flat, B, T, False, args.warmup, args.steps)["step_ms"])
            print(f"  round {i + 1}: ours {ours_ms[-1]:.1f} ms, eager {eager_ms[-1]:.1f} ms", flush=True)
        row = dict(preset=preset, vocab=v, batch=B, T=T, ours_ms=statistics.median(ours_ms),
                   eager_ms=statistics.median(eager_ms), ours_call_ms=ours["call_ms"])
        if args.compile:
            r = time_torch(cfg, flat, B, T, True, args.warmup, args.steps)
            row["compiled_ms"], row["compile_warmup_s"] = r["step_ms"], r["warmup_s"]
        rows.append(row)
    load = os.getloadavg()
    print(f"\nfp32 CPU training step, batch {args.batch}, V={v}, dropout 0.1, {args.threads} threads, "
          f"medians of {args.repeat}; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    head = f"{'preset':<7} {'B x T':>8} {'ours ms':>9} {'eager ms':>9} {'ours/eager':>10}"
    if args.compile:
        head += f" {'compile ms':>10} {'ours/compile':>12} {'compile warm-up s':>17}"
    print(head)
    for r in rows:
        line = (f"{r['preset']:<7} {r['batch']:>3} x {r['T']:<4} {r['ours_ms']:>9.1f} {r['eager_ms']:>9.1f} "
                f"{r['eager_ms'] / r['ours_ms']:>9.2f}x")
        if args.compile:
            line += (f" {r['compiled_ms']:>10.1f} {r['compiled_ms'] / r['ours_ms']:>11.2f}x"
                     f" {r['compile_warmup_s']:>17.0f}")
        print(line)
    if args.out:
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as fh:
            json.dump(dict(threads=args.threads, rows=rows), fh, indent=1)
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
