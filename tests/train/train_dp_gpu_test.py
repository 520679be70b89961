#!/usr/bin/env python3
"""The data-parallel GPU path with world size 1: `flashgpt train --device cuda` (the small
preset: head dim 64, which every CUDA build has) under a
torchrun-style environment (WORLD_SIZE=1, RANK=0, LOCAL_RANK=0, MASTER_ADDR, MASTER_PORT)
takes the NCCL communicator, reduces the gradients through ncclAllReduce, updates with
ZeRO-1's range update and all-gathers the weights; with one rank every collective is the
identity, so with --deterministic the log and checkpoint must equal the plain single-GPU
run bit for bit. Also: the multicast variables are 0/1/1 after init although the
environment passed NCCL_NVLS_ENABLE=1.

Exits 77 (skipped) where the build has no CUDA or no NCCL, or no GPU is present.
Usage: train_dp_gpu_test.py PATH/TO/flashgpt"""
import os
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

    dp_env = dict(env, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  NCCL_NVLS_ENABLE="1")
    dp = os.path.join(tmp, "dp")
    r = subprocess.run([FLASHGPT, "train", "--data", ds, "--out", dp, "--zero1", "--bucket-mb", "1", *COMMON],
                       capture_output=True, text=True, timeout=300, env=dp_env)
    check(r.returncode == 0 and "trained 6 steps" in r.stdout, "WORLD_SIZE=1 over NCCL with ZeRO-1", r)
    check("data parallel: 1 ranks over nccl (torchrun launch)" in r.stderr, "the NCCL communicator was taken", r)
    check("NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in r.stderr,
          "multicast variables 0/1/1 after init, over NCCL_NVLS_ENABLE=1 in the environment", r)
    if r.returncode == 0 and os.path.exists(os.path.join(plain, "log.jsonl")):
        a, b = log_records(plain, kinds=None), log_records(dp, kinds=None)
        check(a == b, f"the log equals the plain run's bit for bit ({len(a)} records)")
        if a != b:
            for x, y in zip(a, b):
                if x != y:
                    print(f"  first difference: {x} vs {y}")
                    break
        ta, _, _ = read_safetensors(os.path.join(plain, "checkpoint.safetensors"))
        tb, _, _ = read_safetensors(os.path.join(dp, "checkpoint.safetensors"))
        check(all((ta[k] == tb[k]).all() for k in ta), "weights and AdamW moments equal the plain run's bit for bit")
    shutil.rmtree(tmp, ignore_errors=True)
    finish()


if __name__ == "__main__":
    sys.exit(main())
