#!/usr/bin/env python3
"""`flashgpt data analyze` against an independent Python count: words are re.findall(
r"[^\\W_]+") (Unicode letters and numbers), case folding is str.lower(). Run on generated
tricky text and, where present, the shared French files.
Usage: analyze_oracle_test.py PATH/TO/flashgpt [DATA_DIR]"""
import collections
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402

FLASHGPT = sys.argv[1]
# CMake passes DATA_DIR only to builds that read xz; FLASHGPT_DATA_DIR then wins over it.
DATA = (os.environ.get("FLASHGPT_DATA_DIR") or sys.argv[2]) if len(sys.argv) > 2 else None
DATA = DATA if DATA and os.path.isdir(DATA) else None
KEYWORDS = "le la les et de du des que qui à est un une pour pas bonjour merci oui non été".split()


def python_counts(lines, ignore_case):
    counts = collections.Counter()
    wanted = {k.lower() if ignore_case else k for k in KEYWORDS}
    for line in lines:
        for word in re.findall(r"[^\W_]+", line):
            word = word.lower() if ignore_case else word
            if word in wanted:
                counts[word] += 1
    return {k: counts[k] for k in KEYWORDS}


def flashgpt_counts(path, ignore_case, limit):
    out = path + ".json"
    cmd = [FLASHGPT, "data", "analyze", "--input", path, "--limit", str(limit), "--json", out,
           "--keywords", ",".join(KEYWORDS)] + (["--ignore-case"] if ignore_case else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return json.load(open(out, encoding="utf-8"))


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_oracle_")
    tricky = os.path.join(tmp, "tricky.fr")
    with open(tricky, "w", encoding="utf-8") as f:
        f.write("De de DE dE, l'été L'ÉTÉ «la» la-la la_la la2 2la À à\u00A0à\n")
        f.write("qu'est-ce que c'est ? Qui ? QUI ! Non, non… Oui/oui; MERCI—merci Bonjour!\n")
        f.write("une Une UNE un UN pour POUR pas PAS des DES du DU et ET le LE les LES est EST\n")
    files = [(tricky, 10)]
    if DATA:
        files.append((os.path.join(DATA, "wmt14", "newstest2014.fr-en.fr.xz"), 100000))
        files.append((os.path.join(DATA, "extra", "train.europarl-v7-recent.fr-en.fr.xz"), 20000))
    failures = 0
    for path, limit in files:
        if path.endswith(".xz"):
            with lzma.open(path, "rt", encoding="utf-8") as f:
                lines = [line.rstrip("\n") for _, line in zip(range(limit), f)]
        else:
            lines = open(path, encoding="utf-8").read().splitlines()[:limit]
        for ignore_case in (False, True):
            expected = python_counts(lines, ignore_case)
            got = flashgpt_counts(path, ignore_case, limit)
            ok = got["counts"] == expected and got["texts"] == len(lines) and got["total"] == sum(expected.values())
            failures += not ok
            print(("ok" if ok else "FAIL") + f": {os.path.basename(path)} ignore_case={ignore_case} "
                  f"total={got['total']} (python {sum(expected.values())})")
            if not ok:
                print("  flashgpt:", got["counts"], "\n  python:  ", expected)
    subprocess.run(["rm", "-rf", tmp])
    if failures:
        sys.exit(1)
    if not DATA:
        data_skip.exit_missing(data_skip.SHARED_DATA_MISSING + " (only the generated text was counted)")


if __name__ == "__main__":
    main()
