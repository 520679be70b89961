#!/usr/bin/env python3
"""`flashgpt train` as a user runs it, on the tiny preset and a generated dataset:
the configuration printed and stored, the log, resume (N/2 + N/2 equals N, losses bit for
bit), SIGINT/SIGTERM (checkpoint, exit 128+signal, resume equals uninterrupted), the plot,
and a clear error for each kind of bad input.
Usage: train_cli_test.py PATH/TO/flashgpt"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fixtures import check, finish, log_records, write_dataset  # noqa: E402

FLASHGPT = sys.argv[1]
COMMON = ["--preset", "tiny", "--batch", "2", "--context", "32", "--accum", "2", "--threads", "1", "--quiet",
          "--warmup", "2", "--eval-every", "3", "--eval-batches", "2", "--lr", "1e-3"]




def flashgpt(*args):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=300)


def common(**override):
    """COMMON with some options replaced (CLI11 refuses an option given twice)."""
    args = list(COMMON)
    for name, value in override.items():
        i = args.index("--" + name)
        args[i + 1] = str(value)
    return args




def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_train_cli_")
    ds = write_dataset(os.path.join(tmp, "ds"))

    # A straight run of 8 steps, then 4 + resume to 8: the same losses, bit for bit.
    straight = os.path.join(tmp, "straight")
    r = flashgpt("train", "--data", ds, "--out", straight, "--steps", "8", "--no-plot", *COMMON)
    check(r.returncode == 0 and "trained 8 steps" in r.stdout, "tiny run of 8 steps", r)
    check("train: preset=tiny data=" in r.stderr and "schedule=constant" in r.stderr and "beta2=0.95" in r.stderr,
          "the whole configuration is printed at start", r)
    config = json.load(open(os.path.join(straight, "config.json")))
    check(config["options"]["batch"] == 2 and config["options"]["lr"] == 1e-3 and config["encoding"] == "test_bytes"
          and config["model"]["vocab_size"] == 300 and config["model"]["padded_vocab_size"] == 384
          and config["flops_per_token"] > 0, f"config.json holds options and the model {config}")
    steps = log_records(straight)
    check([s["step"] for s in steps] == list(range(1, 9)) and all(k in steps[0] for k in
          ("loss", "lr", "grad_norm", "epoch", "tokens")), "log.jsonl has one record per step")
    check(steps[-1]["loss"] < steps[0]["loss"], f"the loss falls ({steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f})")
    vals = log_records(straight, ("val",))
    check([v["step"] for v in vals] == [3, 6, 8], f"validation every 3 steps and at the end {vals}")

    split = os.path.join(tmp, "split")
    r1 = flashgpt("train", "--data", ds, "--out", split, "--steps", "4", "--no-plot", *COMMON)
    r2 = flashgpt("train", "--out", split, "--resume", "--steps", "8", "--no-plot", "--quiet")
    check(r1.returncode == 0 and r2.returncode == 0, "4 steps, then --resume to 8 (options from the run)", r2)
    check(log_records(split) == steps, "resumed losses equal the uninterrupted run's bit for bit")

    # Signals: a checkpoint, exit status 128 + signal, and a resume equal to a straight run.
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = os.path.join(tmp, f"sig{int(sig)}")
        p = subprocess.Popen([FLASHGPT, "train", "--data", ds, "--out", run, "--steps", "100000", "--no-plot",
                              *COMMON], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = os.path.join(run, "log.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if os.path.exists(log) and sum(1 for _ in open(log)) >= 5:
                break
            time.sleep(0.02)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        check(p.returncode == 128 + int(sig) and "checkpoint written" in err,
              f"{sig.name}: exit {p.returncode}, checkpoint written",
              subprocess.CompletedProcess(p.args, p.returncode, out, err))
        done = log_records(run)
        n = done[-1]["step"] if done else 0
        check(os.path.exists(os.path.join(run, "checkpoint.safetensors")) and n >= 2, f"{sig.name} after step {n}")
        r = flashgpt("train", "--out", run, "--resume", "--steps", str(n + 3), "--no-plot")
        ref = os.path.join(tmp, f"ref{int(sig)}")
        r_ref = flashgpt("train", "--data", ds, "--out", ref, "--steps", str(n + 3), "--no-plot", *COMMON)
        check(r.returncode == 0 and r_ref.returncode == 0, f"{sig.name}: resumed to step {n + 3}", r)
        check(log_records(run, ("step", "epoch")) == log_records(ref, ("step", "epoch")),
              f"{sig.name}: interrupted + resumed equals uninterrupted, bit for bit")

    # The loss plot (python3 + matplotlib started from an argument vector).
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    plotted = os.path.join(tmp, "plotted")
    r = flashgpt("train", "--data", ds, "--out", plotted, "--steps", "3", *COMMON)
    png = os.path.join(plotted, "loss.png")
    if have_mpl:
        check(r.returncode == 0 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", "loss.png drawn", r)
    else:
        check(r.returncode == 0 and "loss plot failed" in r.stderr, "no matplotlib: a warning, not a failure", r)

    # Bad input: clear errors, before any step.
    nosummary = write_dataset(os.path.join(tmp, "nosummary"), summary=False)
    r = flashgpt("train", "--data", nosummary, "--out", os.path.join(tmp, "e1"), *COMMON)
    check(r.returncode == 1 and "has no summary.json" in r.stderr, "dataset without summary.json", r)
    r = flashgpt("train", "--data", os.path.join(tmp, "absent"), "--out", os.path.join(tmp, "e2"), *COMMON)
    check(r.returncode == 1 and "no such directory" in r.stderr, "missing dataset directory", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e3"), *common(context=65))
    check(r.returncode == 1 and "--context 65 is longer than the tiny preset's position table (64" in r.stderr,
          "context longer than the position table", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e4"), *common(batch=100000000))
    check(r.returncode == 1 and "needs about" in r.stderr and "GiB" in r.stderr and "available" in r.stderr,
          "a batch too large for memory is refused with its size", r)
    check(not os.path.exists(os.path.join(tmp, "e4", "log.jsonl")), "... before the first step")
    r = flashgpt("train", "--data", ds, "--out", straight, *COMMON)
    check(r.returncode == 1 and "already holds a run" in r.stderr, "an existing run without --resume", r)
    r = flashgpt("train", "--out", straight, "--resume", "--preset", "small", "--steps", "9")
    check(r.returncode == 1 and "another model configuration" in r.stderr and "d_model 64 vs 256" in r.stderr,
          "a checkpoint of another configuration", r)
    other = write_dataset(os.path.join(tmp, "other"), encoding="r50k_test", vocab=400)
    r = flashgpt("train", "--out", straight, "--resume", "--data", other, "--steps", "9")
    check(r.returncode == 1 and "trained on test_bytes tokens" in r.stderr and "r50k_test" in r.stderr,
          "a dataset of another tokenizer than the checkpoint's", r)
    r = flashgpt("train", "--out", os.path.join(tmp, "empty"), "--resume")
    check(r.returncode == 1 and "no checkpoint" in r.stderr, "--resume without a checkpoint", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e5"), *common(preset="huge"))
    check(r.returncode == 1 and "tiny" in r.stderr and "seed" in r.stderr, "an unknown preset names the choices", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e6"), *COMMON, "--schedule", "step")
    check(r.returncode != 0 and "schedule" in r.stderr, "an unknown schedule", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e7"), *COMMON, "--device", "cuda")
    check(r.returncode == 0 or "CUDA" in r.stderr or "GPU" in r.stderr, "cuda runs, or says why it cannot", r)

    # --keep-best: RUN/best is a run directory (config.json, checkpoint, best.json) of the
    # lowest validation loss; --time-limit stops cleanly with the planned schedule.
    kept = os.path.join(tmp, "kept")
    r = flashgpt("train", "--data", ds, "--out", kept, "--steps", "6", "--no-plot", "--keep-best", *COMMON)
    best = json.load(open(os.path.join(kept, "best", "best.json"))) if r.returncode == 0 else {}
    vals = {v["step"]: v["loss"] for v in log_records(kept, ("val",))}
    check(r.returncode == 0 and "best val loss" in r.stdout and best.get("step") in vals
          and best["val_loss"] == min(vals.values()) and os.path.exists(os.path.join(kept, "best", "checkpoint.safetensors"))
          and open(os.path.join(kept, "best", "config.json")).read() == open(os.path.join(kept, "config.json")).read(),
          f"--keep-best writes RUN/best {best} {vals}", r)
    timed = os.path.join(tmp, "timed")
    r = flashgpt("train", "--data", ds, "--out", timed, "--steps", "100000", "--no-plot", "--time-limit", "1", *COMMON)
    end = log_records(timed, ("end",))
    check(r.returncode == 0 and "(time limit)" in r.stdout and end and end[-1].get("stopped") == "time limit"
          and 0 < end[-1]["step"] < 100000, f"--time-limit stops cleanly {end}", r)
    r = flashgpt("train", "--data", ds, "--out", os.path.join(tmp, "e8"), *COMMON, "--time-limit", "-1")
    check(r.returncode == 1 and "--time-limit -1" in r.stderr, "a negative time limit", r)

    finish()


if __name__ == "__main__":
    main()
