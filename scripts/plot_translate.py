#!/usr/bin/env python3
"""Score against the number of demonstrations K, as in the GPT-3 paper's translation figure:
plot_translate.py RUN/eval/translate.json OUT.png

One panel for BLEU and one for chrF; a line per direction (en-fr, fr-en) over K. Started by
`flashgpt eval translate` with an argument vector (no shell); it writes OUT.png, which the
caller renames into place."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        report = json.load(f)
    by_direction = {}
    for r in report["results"]:
        by_direction.setdefault(r["direction"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "bleu", "BLEU (sacreBLEU 13a)"), (axes[1], "chrf", "chrF2")):
        for direction, rows in sorted(by_direction.items()):
            rows = sorted(rows, key=lambda r: r["shots"])
            ax.plot([r["shots"] for r in rows], [r[metric] for r in rows], marker="o", label=direction)
        ax.set_xlabel("demonstrations in context (K)")
        ax.set_ylabel(label)
        shots = sorted({r["shots"] for r in report["results"]})
        if shots and max(shots) > 8:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.grid(alpha=0.3)
        ax.legend()
    test = report.get("test_set", {})
    fig.suptitle(f"{report.get('run', '')}: {test.get('name', '')} ({test.get('sentences', '?')} sentences), "
                 f"step {report.get('step', '?')}")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=120, format="png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
