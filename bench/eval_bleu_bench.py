#!/usr/bin/env python3
"""`flashgpt eval bleu` against sacreBLEU: same machine, same files, one run.

References: newstest2014 fr-en, both sides (3003 lines each, ../shared/data/wmt14 or
FLASHGPT_DATA_DIR/wmt14, xz, decompressed here). Hypotheses: each reference perturbed with
a fixed seed (words dropped, swapped, repeated, replaced; punctuation and case changed),
so that the scores land where a real system's do. First validates: for tokenizers 13a and
intl, flashgpt's BLEU and chrF2 (--json) must equal sacreBLEU's Python API to two decimals
(and to 1e-9), else it stops without timing. Then times, best and median of --repeat runs,
each computing BLEU and chrF2 of one file pair:
  sacrebleu CLI      `sacrebleu REF -i HYP -m bleu chrf --tokenize T` (a process, as a user runs it)
  sacrebleu API      BLEU(tokenize=T).corpus_score + CHRF().corpus_score, in this process
                     (fresh metric objects each run, so no tokenizer cache carries over)
  flashgpt CLI       `flashgpt eval bleu --ref REF --hyp HYP --tokenize T` (a process)
and prints a table of wall times (best, median) and CPU times (best; a process's CPU time
includes its children's) with the ratios to flashgpt.

  python3 bench/eval_bleu_bench.py --flashgpt build/flashgpt [--repeat 5] [--out results/x.txt]
"""
import argparse
import json
import lzma
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

ROOT = Path(__file__).resolve().parents[1]
PUNCT = [",", ".", "!", "?", ";", ":", "'", "(", ")", "-", "«", "»"]


def data_dir(given):
    for candidate in (given, os.environ.get("FLASHGPT_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "wmt14").is_dir():
            return Path(candidate)
    sys.exit("no data: pass --data-dir or set FLASHGPT_DATA_DIR (needs wmt14/newstest2014.fr-en.*.xz)")


def read_xz_lines(path):
    with lzma.open(path, "rt", encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def perturb(line, rng, vocabulary):
    words = line.split()
    for _ in range(rng.randint(0, 5)):
        op = rng.randrange(6)
        if op == 0 and words:
            del words[rng.randrange(len(words))]
        elif op == 1 and len(words) > 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 2 and words:
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
        elif op == 3 and words:
            i = rng.randrange(len(words))
            words.insert(i, words[i])
        elif op == 4 and words:
            i = rng.randrange(len(words))
            words[i] += rng.choice(PUNCT)
        elif op == 5 and words:
            i = rng.randrange(len(words))
            words[i] = rng.choice([str.lower, str.upper, str.capitalize])(words[i])
    return " ".join(words)


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def cpu_seconds():
    """CPU time of this process and of its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(repeat, f):
    """Best and median wall time, and best CPU time, of `repeat` runs. On a shared machine
    the CPU time is the steadier number."""
    times, cpu = [], []
    for _ in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return min(times), statistics.median(times), min(cpu)


def run(argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flashgpt", default=str(ROOT / "build" / "flashgpt"))
    parser.add_argument("--data-dir")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2014)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    data = data_dir(args.data_dir)
    sacrebleu_cli = shutil.which("sacrebleu")
    tmp = Path(tempfile.mkdtemp(prefix="flashgpt_eval_bench_"))
    rng = random.Random(args.seed)
    rows, report = [], []
    for lang in ("fr", "en"):
        refs = read_xz_lines(data / "wmt14" / f"newstest2014.fr-en.{lang}.xz")
        vocabulary = sorted({w for line in refs for w in line.split()})
        hyps = [perturb(line, rng, vocabulary) for line in refs]
        ref_path, hyp_path = tmp / f"ref.{lang}", tmp / f"hyp.{lang}"
        write_lines(ref_path, refs)
        write_lines(hyp_path, hyps)
        for tok in ("13a", "intl"):
            ours_argv = [args.flashgpt, "eval", "bleu", "--ref", str(ref_path), "--hyp", str(hyp_path), "--tokenize", tok]
            ours = json.loads(run(ours_argv + ["--json"]).stdout)
            bleu, chrf = BLEU(tokenize=tok).corpus_score(hyps, [refs]), CHRF().corpus_score(hyps, [refs])
            for name, mine, theirs in (("BLEU", ours["bleu_score"], bleu.score), ("chrF2", ours["chrf_score"], chrf.score)):
                if f"{mine:.2f}" != f"{theirs:.2f}" or abs(mine - theirs) > 1e-9:
                    sys.exit(f"validation failed, not timing: newstest2014.{lang} tok={tok} {name} "
                             f"flashgpt {mine!r} vs sacrebleu {theirs!r}")
            line = (f"newstest2014.{lang} ({len(refs)} lines) tok={tok}: BLEU {bleu.score:.2f} chrF2 {chrf.score:.2f}, "
                    f"equal (|diff| BLEU {abs(ours['bleu_score'] - bleu.score):.2g}, "
                    f"chrF {abs(ours['chrf_score'] - chrf.score):.2g})")
            print(line)
            report.append(line)

            def api():
                BLEU(tokenize=tok).corpus_score(hyps, [refs])
                CHRF().corpus_score(hyps, [refs])

            times = {"flashgpt CLI": timed(args.repeat, lambda: run(ours_argv)), "sacrebleu API": timed(args.repeat, api)}
            if sacrebleu_cli:
                times["sacrebleu CLI"] = timed(args.repeat, lambda: run(
                    [sacrebleu_cli, str(ref_path), "-i", str(hyp_path), "-m", "bleu", "chrf", "--tokenize", tok]))
            rows.append((f"{lang} {tok}", times))
    header = (f"{'files, tokenizer':<18} {'what':<14} {'best s':>9} {'median s':>9} {'x flashgpt':>11} "
              f"{'CPU s':>8} {'x flashgpt':>11}")
    table = [header, "-" * len(header)]
    for name, times in rows:
        ours_best, ours_cpu = times["flashgpt CLI"][0], times["flashgpt CLI"][2]
        for what in ("sacrebleu CLI", "sacrebleu API", "flashgpt CLI"):
            if what in times:
                best, median, cpu = times[what]
                table.append(f"{name:<18} {what:<14} {best:>9.4f} {median:>9.4f} {best / ours_best:>10.1f}x "
                             f"{cpu:>8.4f} {cpu / ours_cpu:>10.1f}x")
    context = (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"load average {os.getloadavg()[0]:.1f}; "
               f"sacrebleu {sacrebleu.__version__}, Python {platform.python_version()}; best of {args.repeat}; "
               f"BLEU and chrF2 of one file pair per run")
    print(context)
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        partial = out.with_suffix(out.suffix + ".partial")
        partial.write_text("\n".join(report + [context] + table) + "\n", encoding="utf-8")
        os.replace(partial, out)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
