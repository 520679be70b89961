#!/usr/bin/env python3
"""Bar chart of `flashgpt data analyze --json` output: plot_keywords.py COUNTS.json OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_keywords.py COUNTS.json OUT.png")
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    items = sorted(data["counts"].items(), key=lambda kv: -kv[1])
    words, counts = [w for w, _ in items], [c for _, c in items]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(words, counts, color="#3b6ea8")
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], fontsize=7, rotation=90, padding=2)
    ax.set_ylabel("occurrences (whole words)")
    ax.set_title(f"French keywords in {data['texts']:,} texts (total {data['total']:,})")
    ax.margins(y=0.15)
    plt.xticks(rotation=45)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)


if __name__ == "__main__":
    main()
