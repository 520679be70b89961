#!/usr/bin/env python3
"""The data-parallel GPU path with world size 1: `flashgpt train --device cuda` (the small
preset: head dim 64, which every CUDA build has) under a
torchrun-style environment (WORLD_SIZE=1, RANK=0, LOCAL_RANK=0, MASTER_ADDR, MASTER_PORT)
takes the NCCL communicator, reduces the gradients through ncclAllReduce, updates with
ZeRO-1's range update (the model holding its slice of the moments) and all-gathers the
weights; with one rank every collective is the identity, so with --deterministic the log
and checkpoint must equal the plain single-GPU run bit for bit. Two data-parallel runs:
the default, whose buckets (0.25 MiB, so several) are all-reduced on NCCL's stream as the
eager backward finishes them (rank 0 must report buckets started during the backward),
and --no-overlap (the CUDA-graph step, the buffer reduced after the backward, none during
it). Also: the multicast variables are 0/1/1 after init although the environment passed
NCCL_NVLS_ENABLE=1, ZeRO-1 reports the moments it keeps, and its gather of the moments for
the checkpoint runs through many device windows.

Exits 77 (skipped) where the build has no CUDA or no NCCL, or no GPU is present.
Usage: train_dp_gpu_test.py PATH/TO/flashgpt"""
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fixtures import check, finish, log_records, read_safetensors, write_dataset  # noqa: E402

FLASHGPT = sys.argv[1]
COMMON = ["--preset", "small", "--batch", "4", "--context", "64", "--accum", "2", "--warmup", "2", "--lr", "1e-3",
          "--eval-every", "3", "--eval-batches", "2", "--device", "cuda", "--deterministic", "--no-plot", "--quiet",
          "--steps", "6"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    version = subprocess.run([FLASHGPT, "version"], capture_output=True, text=True).stdout
    if "cuda: yes" not in version or "nccl: yes" not in version:
        print(f"skipped: this build has no CUDA or no NCCL ({version.strip()!r})")
        return 77
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        print("skipped: no GPU")
        return 77
    with open(FLASHGPT, "rb") as f:
        check(b"cuMulticast" not in f.read(), "the binary names no cuMulticast* function (NCCL's own use is off "
              "through NCCL_NVLS_ENABLE=0)")
    tmp = tempfile.mkdtemp(prefix="flashgpt_dp_gpu_")
    ds = write_dataset(os.path.join(tmp, "ds"), train_tokens=20000)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE")}

    plain = os.path.join(tmp, "plain")
    r = subprocess.run([FLASHGPT, "train", "--data", ds, "--out", plain, *COMMON], capture_output=True, text=True,
                       timeout=300, env=env)
    check(r.returncode == 0 and "trained 6 steps" in r.stdout, "plain single-GPU run", r)

    dp_env = dict(env, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", NCCL_NVLS_ENABLE="1")
    ta, _, _ = read_safetensors(os.path.join(plain, "checkpoint.safetensors"))
    plain_log = log_records(plain, kinds=None)
    # Not --quiet: rank 0's bucket counts and ZeRO-1 line are progress output.
    # FLASHGPT_NCCL_GATHER_FLOATS: the checkpoint's gather of the moments in windows of 100,000
    # floats (34 of them for the small model) rather than one.
    for name, extra in (("overlapped", []), ("after the backward", ["--no-overlap"])):
        dp = os.path.join(tmp, "dp_" + name.replace(" ", "_"))
        r = subprocess.run([FLASHGPT, "train", "--data", ds, "--out", dp, "--zero1", "--bucket-mb", "0.25", *extra,
                            *[a for a in COMMON if a != "--quiet"]], capture_output=True, text=True, timeout=300,
                           env=dict(dp_env, MASTER_PORT=str(free_port()), FLASHGPT_NCCL_GATHER_FLOATS="100000"))
        check(r.returncode == 0 and "trained 6 steps" in r.stdout, f"{name}: WORLD_SIZE=1 over NCCL with ZeRO-1", r)
        check("data parallel: 1 ranks over nccl (torchrun launch)" in r.stderr, f"{name}: the NCCL communicator", r)
        check("NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in r.stderr,
              f"{name}: multicast variables 0/1/1 after init, over NCCL_NVLS_ENABLE=1 in the environment", r)
        m = re.search(r"ZeRO-1: rank 0 keeps the AdamW moments of \[(\d+), (\d+)\) of (\d+) parameters", r.stderr)
        check(m is not None and m.group(1) == "0" and m.group(2) == m.group(3),
              f"{name}: ZeRO-1 reports the moments of its slice, all of them with one rank", r)
        m = re.search(r"data parallel: (\d+) gradient buckets started during the backward, (\d+) after it", r.stderr)
        during, after = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if extra:
            check(during == 0 and after > 6, f"{name}: no bucket during the backward, several after ({during}, {after})", r)
        else:
            # 6 steps x (the buckets of the layers and lnf) during, one bucket (the embeddings) after.
            check(during >= 12 and after == 6, f"{name}: buckets started during the backward ({during}, {after})", r)
        if r.returncode != 0:
            continue
        b = log_records(dp, kinds=None)
        check(plain_log == b, f"{name}: the log equals the plain run's bit for bit ({len(b)} records)")
        if plain_log != b:
            for x, y in zip(plain_log, b):
                if x != y:
                    print(f"  first difference: {x} vs {y}")
                    break
        tb, _, _ = read_safetensors(os.path.join(dp, "checkpoint.safetensors"))
        check(ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta),
              f"{name}: weights and AdamW moments equal the plain run's bit for bit")
    shutil.rmtree(tmp, ignore_errors=True)
    finish()


if __name__ == "__main__":
    sys.exit(main())
