#!/usr/bin/env python3
"""`flashgpt train --device cuda` on a generated dataset, on the GPU machine:
- resume equals uninterrupted, bit for bit, in the log and in every checkpoint tensor
  (deterministic mode, dropout, accumulation, a warmup over 8 of the 10 steps so the
  learning rate changes every step; the step runs as CUDA graphs, so this also checks that
  a resumed process's new graphs replay the same values), and equals the run with graphs
  off (FLASHGPT_CUDA_GRAPH=0);
- `flashgpt export --format hf` of a CUDA-trained model (tiny, head dim 32, and the small
  preset, head dim 64) loads in transformers' GPT2LMHeadModel on the GPU, and its fp32
  logits equal our CUDA backend's bf16 logits within bf16 tolerance (relative L2 < 1e-2)
  and our fp32 CPU logits within 1e-3 (the export itself being exact).
Exits 77 (ctest: skipped) with the reason where there is no GPU, torch or transformers.
Usage: train_gpu_test.py PATH/TO/flashgpt PATH/TO/train_logits_tool"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    import transformers
except ImportError as e:
    print(f"skipped: needs numpy, torch and transformers ({e})")
    sys.exit(77)
if not torch.cuda.is_available():
    print("skipped: no CUDA device")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fixtures import VOCAB, check, finish, log_records, read_safetensors, write_dataset  # noqa: E402

FLASHGPT, TOOL = sys.argv[1], sys.argv[2]




def flashgpt(*args):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=600)




def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_train_gpu_")
    ds = write_dataset(os.path.join(tmp, "ds"))
    # A warmup over 8 of the 10 steps makes the learning rate change every step across the
    # resume point (a decay schedule would not do: it depends on --steps, which differ).
    common = ["--device", "cuda", "--deterministic", "--preset", "tiny", "--batch", "4", "--context", "32",
              "--accum", "2", "--quiet", "--warmup", "8", "--schedule", "constant", "--eval-every", "4",
              "--eval-batches", "2", "--lr", "3e-3", "--no-plot"]

    straight = os.path.join(tmp, "straight")
    r = flashgpt("train", "--data", ds, "--out", straight, "--steps", "10", *common)
    check(r.returncode == 0 and "capture failed" not in r.stderr, "cuda: 10 steps", r)
    steps = log_records(straight)
    check(len(steps) == 10 and len({s["lr"] for s in steps}) >= 8, f"10 logged steps, lr varies {steps[:2]}")
    split = os.path.join(tmp, "split")
    r1 = flashgpt("train", "--data", ds, "--out", split, "--steps", "5", *common)
    r2 = flashgpt("train", "--out", split, "--resume", "--steps", "10", "--no-plot", "--quiet")
    check(r1.returncode == 0 and r2.returncode == 0, "cuda: 5 steps, then --resume to 10", r2)
    resumed = log_records(split)
    diff = [(a, b) for a, b in zip(resumed, steps) if a != b]
    check(resumed == steps, "cuda: resumed losses equal the uninterrupted run's bit for bit"
          + (f" (first difference: {diff[0]})" if diff else ""))
    # The same run with CUDA graphs off gives the same bits (graph replay is exact).
    eager = os.path.join(tmp, "eager")
    r = subprocess.run([FLASHGPT, "train", "--data", ds, "--out", eager, "--steps", "10", *common],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "FLASHGPT_CUDA_GRAPH": "0"})
    check(r.returncode == 0 and log_records(eager) == steps, "cuda: FLASHGPT_CUDA_GRAPH=0 gives the same losses", r)
    a = read_safetensors(os.path.join(straight, "checkpoint.safetensors"))[0]
    b = read_safetensors(os.path.join(split, "checkpoint.safetensors"))[0]
    check(len(a) > 0 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a),
          f"cuda: the final checkpoints' {len(a)} tensors (weights, AdamW moments) are equal bit for bit")

    # The HF export of CUDA-trained models, compared on the GPU.
    for name, preset in (("tiny", "tiny"), ("hd64", "small")):
        run = os.path.join(tmp, "export_" + name)
        r = flashgpt("train", "--device", "cuda", "--preset", preset, "--data", ds, "--out", run, "--steps", "20",
                     "--batch", "4", "--context", "32", "--lr", "3e-3", "--quiet", "--no-plot")
        check(r.returncode == 0, f"{name}: trained on cuda", r)
        if r.returncode != 0:
            continue
        hf = os.path.join(tmp, "hf_" + name)
        r = flashgpt("export", "--format", "hf", run, "--out", hf)
        check(r.returncode == 0, f"{name}: exported", r)
        model = transformers.GPT2LMHeadModel.from_pretrained(hf).eval().cuda()
        head_dim = model.config.n_embd // model.config.n_head
        ids = [int(i) for i in np.random.default_rng(5).integers(0, VOCAB, size=33)]
        ckpt = os.path.join(run, "checkpoint.safetensors")
        ours = {}
        for device in ("cuda", "cpu"):
            r = subprocess.run([TOOL, ckpt, ",".join(map(str, ids)), device], capture_output=True, text=True,
                               timeout=600)
            check(r.returncode == 0, f"{name}: our {device} logits", r)
            if r.returncode != 0:
                break
            ours[device] = np.array(json.loads(r.stdout)["logits"]).reshape(32, VOCAB)
        if len(ours) != 2:
            continue
        with torch.no_grad():
            theirs = model(torch.tensor([ids[:32]], device="cuda")).logits[0].double().cpu().numpy()
        rel = np.linalg.norm(theirs - ours["cuda"]) / np.linalg.norm(theirs)
        err_cpu = np.abs(theirs - ours["cpu"]).max()
        print(f"{name} (head dim {head_dim}): transformers {transformers.__version__} on {torch.cuda.get_device_name()}"
              f" vs our CUDA logits: relative L2 {rel:.2e}, max abs {np.abs(theirs - ours['cuda']).max():.2e};"
              f" vs our CPU logits: max abs {err_cpu:.2e}")
        check(rel < 1e-2, f"{name}: HF logits equal our CUDA logits within bf16 tolerance ({rel:.2e})")
        check(err_cpu < 1e-3 * max(1.0, np.abs(ours["cpu"]).max()), f"{name}: and our CPU logits ({err_cpu:.2e})")
    finish()


if __name__ == "__main__":
    main()
