#!/usr/bin/env python3
"""Data-parallel training over MPI on the CPU: `mpirun -np 2 flashgpt train` of the tiny
model against one process with the same global batch, ZeRO-1 against unsharded, and a
2-rank run resumed on 1 rank against the uninterrupted run.

Same global batch: 2 ranks x --batch 2 x --accum 1 is one process with --batch 2 --accum 2.
The trainer makes them the same computation up to the order of one float addition per
gradient element: each step sees the same windows with the same dropout masks (keyed by
the global micro-batch index), so the micro-batch losses of step 1 are bit-identical and
so is the step-1 loss (their mean, summed in the same order). One process adds the second
micro-batch's gradient inside the backward's kernels (C += A B, blocked); two ranks add
two finished gradients in MPI's sum. That moves each gradient element by an ulp or so,
the weights after step 1 by about lr x 1e-7 relative, and the later losses by a few 1e-7
relative per step; the test allows 2e-5 relative over 8 steps (measured: under 2e-6, see
docs/train.md). Everything that is not arithmetic (steps, epochs, tokens, the data
position, the learning rate) must match exactly.

ZeRO-1 against unsharded on 2 ranks is bit for bit: each rank applies the same
elementwise AdamW to its slice of the same reduced gradient.

Skips (exit 77) where mpirun is missing, fails instead under FLASHGPT_REQUIRE_DATA=1 (CI).
Usage: train_dp_test.py PATH/TO/flashgpt"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from train_fixtures import check, finish, log_records, read_safetensors, write_dataset  # noqa: E402
import data_skip  # noqa: E402

FLASHGPT = sys.argv[1]
TOLERANCE = 2e-5
COMMON = ["--preset", "tiny", "--batch", "2", "--context", "32", "--threads", "1", "--warmup", "2",
          "--eval-every", "4", "--eval-batches", "2", "--lr", "1e-3", "--dropout", "0.1", "--no-plot"]




def mpirun_command(ranks):
    """mpirun's argument vector: as root in CI, more ranks than cores, no shared-memory
    single-copy (containers forbid the ptrace it needs), and an NCCL_NVLS_ENABLE=1 a launcher
    might pass, which the trainer must override."""
    cmd = [shutil.which("mpirun"), "-np", str(ranks), "--oversubscribe", "--bind-to", "none",
           "--mca", "btl_vader_single_copy_mechanism", "none", "-x", "NCCL_NVLS_ENABLE=1"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def train(*args, ranks=0):
    cmd = (mpirun_command(ranks) if ranks else []) + [FLASHGPT, "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)




def close(a, b, tol=TOLERANCE):
    return abs(a - b) <= tol * max(abs(a), abs(b))


def compare_runs(ref, run, what, exact):
    """Step and validation records: the arithmetic within tolerance (or exact), the rest exact."""
    ra, rb = log_records(ref, ("step", "val", "epoch")), log_records(run, ("step", "val", "epoch"))
    check(len(ra) == len(rb) and [r["type"] for r in ra] == [r["type"] for r in rb],
          f"{what}: the same records ({len(ra)} vs {len(rb)})")
    worst = 0.0
    for a, b in zip(ra, rb):
        for key in set(a) | set(b):
            if key in ("loss", "grad_norm", "val_loss", "clip_scale") and not exact:
                worst = max(worst, abs(a[key] - b[key]) / max(abs(a[key]), 1e-30))
                if not close(a[key], b[key]):
                    check(False, f"{what}: {a['type']} {a.get('step')} {key} {a[key]} vs {b[key]}")
                    return worst
            elif a.get(key) != b.get(key):
                check(False, f"{what}: {a['type']} {a.get('step')} {key} {a.get(key)} vs {b.get(key)}")
                return worst
    check(True, f"{what}: {len(ra)} records {'bit for bit' if exact else f'within {TOLERANCE:g} (worst {worst:.2e})'}")
    return worst


def check_weights(ta, tb, steps, lr):
    """Weights and moments of two runs that differ by gradient rounding: every element within
    1e-5 of its tensor's largest magnitude, except the key part of qkv_b. The key bias adds
    q.b_k to every score of a query, which softmax ignores: its true gradient is 0 and what
    the backward computes is rounding noise, which AdamW's m / sqrt(v) turns into steps of
    up to lr whose signs follow the noise. There, only |difference| <= 2 steps lr is asked."""
    worst, worst_name = 0.0, ""
    for name in ta:
        a, b = ta[name].astype("float64"), tb[name].astype("float64")
        if name == "model.qkv_b":
            c = a.shape[1] // 3
            key = (slice(None), slice(c, 2 * c))
            check(abs(a[key] - b[key]).max() <= 2 * steps * lr,
                  f"qkv_b's key part (zero true gradient) within 2 x {steps} steps x lr "
                  f"({abs(a[key] - b[key]).max():.2e})")
            a[key] = b[key] = 0
        rel = float(abs(a - b).max() / (abs(a).max() + 1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    check(worst <= 1e-5, f"weights and AdamW moments agree to 1e-5 of each tensor's scale (worst {worst:.2e}, "
          f"{worst_name})")


def main():
    if shutil.which("mpirun") is None:
        data_skip.exit_missing("mpirun is not installed (openmpi-bin, scripts/install-deps.sh): the data-parallel "
                               "test needs it")
    tmp = tempfile.mkdtemp(prefix="flashgpt_train_dp_")
    ds = write_dataset(os.path.join(tmp, "ds"), train_tokens=4050)
    # 4050 tokens hold 126 windows of 32 + 1: an epoch of 63 micro-batches of 2 windows. A
    # step takes 2 of them, so step 32 takes the epoch's last (62) and the next one's first.

    # One process, global batch 2 x 2 micro-batches.
    one = os.path.join(tmp, "one")
    r = train("--data", ds, "--out", one, "--steps", "8", "--accum", "2", *COMMON)
    check(r.returncode == 0 and "trained 8 steps" in r.stdout, "one process, --accum 2", r)

    # Two ranks, --accum 1 each: the same global batch.
    two = os.path.join(tmp, "two")
    r = train("--data", ds, "--out", two, "--steps", "8", "--accum", "1", "--bucket-mb", "0.05", *COMMON, ranks=2)
    check(r.returncode == 0 and r.stdout.count("trained 8 steps") == 1, "mpirun -np 2, --accum 1: rank 0 reports", r)
    check("data parallel: 2 ranks over mpi (openmpi launch)" in r.stderr and "global batch 2 x 2" in r.stderr,
          "the data-parallel layout is printed once", r)
    check("NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in r.stderr,
          "multicast variables set after init, over the launcher's NCCL_NVLS_ENABLE=1", r)
    check(r.stderr.count("train: preset=tiny") == 1, "the configuration is printed by rank 0 only", r)
    # Buckets of 0.05 MiB (13,107 floats): each layer's tensors fill one, so reductions start
    # while the backward is still in the layers below; the embeddings close the last one.
    m = re.search(r"data parallel: (\d+) gradient buckets started during the backward, (\d+) after it", r.stderr)
    check(m is not None and int(m.group(1)) >= 8 and int(m.group(2)) == 8,
          f"buckets overlap the backward ({m.group(0) if m else 'no summary line'})", r)
    if os.path.exists(os.path.join(two, "log.jsonl")):
        a, b = log_records(one), log_records(two)
        check(a[0]["loss"] == b[0]["loss"], f"step 1 loss bit for bit ({a[0]['loss']!r} vs {b[0]['loss']!r})")
        compare_runs(one, two, "2 ranks vs 1 process with the same global batch", exact=False)
        ca = json.load(open(os.path.join(one, "config.json")))
        cb = json.load(open(os.path.join(two, "config.json")))
        check(cb["ranks"] == 2 and cb["launcher"] == "openmpi" and ca["ranks"] == 1, "config.json records the ranks")
        ta, ma, _ = read_safetensors(os.path.join(one, "checkpoint.safetensors"))
        tb, mb, _ = read_safetensors(os.path.join(two, "checkpoint.safetensors"))
        sa, sb = json.loads(ma["state"]), json.loads(mb["state"])
        # The epoch's loss sum adds the (rounding-close) losses: within tolerance; the rest exactly.
        check(close(sa.pop("epoch_loss_sum"), sb.pop("epoch_loss_sum")) and sa == sb,
              f"the checkpoint's training state equals one process's ({sb})")
        check_weights(ta, tb, steps=8, lr=1e-3)

    # The same 2 ranks reducing after the backward: with two ranks each sum is one addition,
    # whichever buckets hold it, so the run is the overlapped one bit for bit.
    after = os.path.join(tmp, "after")
    r = train("--data", ds, "--out", after, "--steps", "8", "--accum", "1", "--bucket-mb", "0.05", "--no-overlap",
              *COMMON, ranks=2)
    m = re.search(r"data parallel: (\d+) gradient buckets started during the backward, (\d+) after it", r.stderr)
    check(r.returncode == 0 and m is not None and int(m.group(1)) == 0 and int(m.group(2)) > 8,
          f"--no-overlap: every bucket after the backward ({m.group(0) if m else 'no summary line'})", r)
    if r.returncode == 0:
        compare_runs(two, after, "reduced after the backward vs overlapped (2 ranks)", exact=True)

    # One rank under mpirun: the whole path (the backward's buckets packed and reduced by
    # MPI, ZeRO-1's range update, the all-gathers) with identity collectives: bit for bit
    # the plain process.
    solo = os.path.join(tmp, "solo")
    r = train("--data", ds, "--out", solo, "--steps", "8", "--accum", "2", "--zero1", "--bucket-mb", "0.05", *COMMON,
              ranks=1)
    check(r.returncode == 0 and "data parallel: 1 ranks over mpi" in r.stderr, "mpirun -np 1 --zero1", r)
    if r.returncode == 0:
        compare_runs(one, solo, "1 rank through MPI vs the plain process", exact=True)
        ta, _, _ = read_safetensors(os.path.join(one, "checkpoint.safetensors"))
        ts, _, _ = read_safetensors(os.path.join(solo, "checkpoint.safetensors"))
        check(all((ta[k] == ts[k]).all() for k in ta), "its checkpoint equals the plain one bit for bit")

    # ZeRO-1 on 2 ranks: bit for bit the unsharded 2-rank run, checkpoint included.
    zero = os.path.join(tmp, "zero1")
    r = train("--data", ds, "--out", zero, "--steps", "8", "--accum", "1", "--zero1", *COMMON, ranks=2)
    check(r.returncode == 0 and "ZeRO-1 on" in r.stderr, "mpirun -np 2 --zero1", r)
    # Rank 0 keeps the moments of its slice alone: the first half, 64-float aligned.
    m = re.search(r"ZeRO-1: rank 0 keeps the AdamW moments of \[(\d+), (\d+)\) of (\d+) parameters: ([\d.]+) MiB of "
                  r"([\d.]+) MiB", r.stderr)
    if m:
        begin, end, count = int(m.group(1)), int(m.group(2)), int(m.group(3))
        half = (count // 2 + 63) // 64 * 64
        check(begin == 0 and end == half and float(m.group(4)) < 0.51 * float(m.group(5)),
              f"ZeRO-1 on 2 ranks: rank 0 holds the moments of [0, {half}) of {count} ({m.group(0)})")
    else:
        check(False, "ZeRO-1 on 2 ranks: rank 0 reports the moments it keeps", r)
    if r.returncode == 0:
        compare_runs(two, zero, "ZeRO-1 vs unsharded (2 ranks)", exact=True)
        ta, _, _ = read_safetensors(os.path.join(two, "checkpoint.safetensors"))
        tz, _, _ = read_safetensors(os.path.join(zero, "checkpoint.safetensors"))
        check(all((ta[k] == tz[k]).all() for k in ta),
              "ZeRO-1's checkpoint (weights and the gathered AdamW moments) equals the unsharded one bit for bit")

    # Resume with another number of ranks: 2 ranks for 4 steps, then 1 process (--accum 2:
    # the same global batch) to 8, against the uninterrupted 2-rank run. The first four
    # steps are the same computation bit for bit; the last four add as one process does.
    split = os.path.join(tmp, "split")
    r1 = train("--data", ds, "--out", split, "--steps", "4", "--accum", "1", "--zero1", *COMMON, ranks=2)
    r2 = train("--out", split, "--resume", "--steps", "8", "--accum", "2", "--quiet", "--no-plot")
    check(r1.returncode == 0 and r2.returncode == 0 and "trained 8 steps" in r2.stdout,
          "2 ranks to step 4 (ZeRO-1), resumed on 1 process to step 8", r2 if r1.returncode == 0 else r1)
    if r2.returncode == 0:
        check(log_records(split)[:4] == log_records(two)[:4], "the 2-rank half equals the uninterrupted 2-rank run bit for bit")
        compare_runs(two, split, "2 ranks -> 1 process resume vs uninterrupted", exact=False)
        compare_runs(one, split, "2 ranks -> 1 process resume vs one process throughout", exact=False)
    r3 = train("--out", split, "--resume", "--steps", "12", "--accum", "1", "--quiet", "--no-plot")
    check(r3.returncode != 0 and "accumulation x ranks" in r3.stderr,
          "resuming with another global batch is refused, naming accumulation x ranks", r3)

    # An epoch boundary inside a step (step 32, on rank 0 / rank 1), 2 ranks vs 1 process.
    e1, e2 = os.path.join(tmp, "e1"), os.path.join(tmp, "e2")
    r = train("--data", ds, "--out", e1, "--steps", "34", "--accum", "2", "--quiet", *COMMON)
    r2 = train("--data", ds, "--out", e2, "--steps", "34", "--accum", "1", "--quiet", *COMMON, ranks=2)
    check(r.returncode == 0 and r2.returncode == 0, "34 steps across an epoch end, 1 process and 2 ranks", r2)
    if r.returncode == 0 and r2.returncode == 0:
        check(any(x["type"] == "epoch" for x in log_records(e2, ("epoch",))), "the 2-rank run logs the epoch")
        compare_runs(e1, e2, "across an epoch end", exact=False)

    # CPU data parallelism under a torchrun-style environment is refused (it is NCCL's).
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    r = subprocess.run([FLASHGPT, "train", "--data", ds, "--out", os.path.join(tmp, "env"), "--steps", "1", *COMMON],
                       capture_output=True, text=True, timeout=120, env=env)
    check(r.returncode != 0 and "mpirun" in r.stderr, "WORLD_SIZE=2 on the CPU: an error that says to use mpirun", r)

    shutil.rmtree(tmp, ignore_errors=True)
    finish()


if __name__ == "__main__":
    sys.exit(main())
