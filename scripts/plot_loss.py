#!/usr/bin/env python3
"""Loss curves of a `flashgpt train` run: plot_loss.py RUN/log.jsonl OUT.png

Train loss per step (light) with its moving average, validation losses (points, joined),
and the per-epoch train means; the x axis is the optimizer step. The image is written to
OUT.png.tmp and renamed, so OUT.png is never half-written."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    steps, losses, val, epochs = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            kind = r.get("type")
            if kind == "step":
                steps.append(r["step"])
                losses.append(r["loss"])
            elif kind == "val":
                val.append((r["step"], r["loss"]))
            elif kind == "epoch":
                if r.get("val_loss") is not None:
                    val.append((r["step"], r["val_loss"]))
                if r.get("loss") is not None:
                    epochs.append((r["step"], r["loss"], r["epoch"]))
    return steps, losses, sorted(set(val)), epochs


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_loss.py RUN/log.jsonl OUT.png")
    steps, losses, val, epochs = read_log(sys.argv[1])
    if not steps:
        sys.exit(f"{sys.argv[1]}: no training steps logged")
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, losses, color="#9bbbe0", linewidth=0.6, label="train (step)")
    window = max(1, len(steps) // 50)
    if window > 1:
        ax.plot(steps, moving_average(losses, window), color="#2a5d9f", linewidth=1.4,
                label=f"train (mean of {window} steps)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="#c0392b", markersize=3, label="validation")
    for step, loss, epoch in epochs:
        ax.axvline(step, color="#bbbbbb", linewidth=0.5)
        ax.annotate(f"epoch {epoch}: {loss:.3f}", (step, loss), fontsize=7, rotation=90, va="bottom")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(sys.argv[1]))) or "training run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = sys.argv[2] + ".tmp"
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, sys.argv[2])


if __name__ == "__main__":
    main()
