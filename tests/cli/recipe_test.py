#!/usr/bin/env python3
"""Named recipes (src/cli/recipes.h) as a user runs them, on a tiny generated data folder of
.xz corpora: `data prepare --recipe translate` writes the same shards as the flags it stands
for (docs/experiments.md, recipe 2 v2), `train --recipe translate` stores the same options as
its flags, an explicit flag wins over the recipe, an unknown recipe is refused by name, and
`flashgpt run --recipe translate` (the GPU job's settings, here on the CPU with a tiny
preset, the .xz files unpacked with python3 as on a machine without liblzma) prepares the
same shards, trains with the recipe's settings, and writes `data prepare` and `train` lines
that reproduce them.
Usage: recipe_test.py PATH/TO/flashgpt [TOKENIZER_DIR]   (FLASHGPT_TOKENIZER_DIR wins)
Without the cl100k_base rank file the test ends as skipped."""
import json
import lzma
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402

FLASHGPT = sys.argv[1]
VOCAB = os.environ.get("FLASHGPT_TOKENIZER_DIR") or (sys.argv[2] if len(sys.argv) > 2 else None)
VOCAB = VOCAB if VOCAB and os.path.isfile(os.path.join(VOCAB, "cl100k_base.tiktoken")) else None
FAILURES = []

# The recipe's data and training values as flags: what docs/experiments.md (recipe 2 v2)
# and bench/model/recipe2_run.sh ran before the recipe had a name.
PREPARE_FLAGS = ["--bilingual-rate", "1", "--pairs-per-document", "16", "--document-bytes", "2000",
                 "--single-pair-share", "0.1", "--pair-order", "shuffled",
                 "--weight", "train.newstest2008-2011.fr-en=4", "--val-set", "newstest2013"]
TRAIN_FLAGS = ["--preset", "seed", "--steps", "4700", "--batch", "64", "--lr", "6e-4", "--warmup", "200",
               "--schedule", "cosine", "--min-lr-ratio", "0.1", "--weight-decay", "0.1", "--eval-every", "500",
               "--eval-batches", "0", "--save-every", "0", "--keep-best"]
# What the tests change to stay small: the same on both sides of every comparison.
TRAIN_SMALL = ["--preset", "tiny", "--steps", "4", "--batch", "2", "--eval-every", "2", "--threads", "1",
               "--quiet", "--no-plot"]


def check(condition, what, result=None):
    print(("ok: " if condition else "FAIL: ") + what, flush=True)
    if not condition:
        FAILURES.append(what)
        if result is not None:
            print(f"  rc {result.returncode}\n  stdout: {result.stdout[-3000:]}\n  stderr: {result.stderr[-3000:]}")


def flashgpt(*args, env_extra=None, cwd=None):
    env = dict(os.environ, FLASHGPT_TOKENIZER_DIR=VOCAB or "")
    env.update(env_extra or {})
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def make_data(root):
    """wmt14/ and extra/ as in ../shared/data (every file .xz), with made-up sentences: the
    three newstest sets, two training corpora (one the recipe weighs), one news monolingual file."""
    rng = random.Random(7)
    en_words = "the cat dog house red blue small big runs eats sees good morning thank you help".split()
    fr_words = "le chat chien maison rouge bleu petit grand court mange voit bon matin merci vous aide".split()

    def write(path, text):
        with lzma.open(str(path) + ".xz", "wt", encoding="utf-8") as f:
            f.write(text)

    def pairs(stem, n, offset):
        en, fr = [], []
        for i in range(n):
            idx = [rng.randrange(len(en_words)) for _ in range(rng.randint(3, 9))]
            en.append(" ".join(en_words[j] for j in idx) + f" {offset + i}.")
            fr.append(" ".join(fr_words[j] for j in idx) + f" {offset + i}.")
        write(f"{stem}.en", "\n".join(en) + "\n")
        write(f"{stem}.fr", "\n".join(fr) + "\n")

    for sub in ("wmt14", "extra"):
        (root / sub).mkdir(parents=True)
    for year, offset in (("2012", 10000), ("2013", 20000), ("2014", 30000)):
        pairs(root / "wmt14" / f"newstest{year}.fr-en", 40, offset)
    pairs(root / "wmt14" / "train.newstest2008-2011.fr-en", 150, 0)
    pairs(root / "wmt14" / "train.multi30k.fr-en", 250, 1000)
    write(root / "extra" / "mono.newstest2015-2021.en", "".join(f"News line {i} about the cat.\n" for i in range(60)))


def shards(dataset):
    s = json.loads((Path(dataset) / "summary.json").read_text())
    return [(x["tokens"], x["crc32"]) for x in s["train_shards"]], [(x["tokens"], x["crc32"]) for x in s["val_shards"]]


def config_line(stderr, command):
    """The start-up configuration line of `command`, as name=value pairs."""
    for line in stderr.splitlines():
        if line.startswith(command + ": ") and "=" in line.split()[len(command.split())]:
            return dict(kv.split("=", 1) for kv in line[len(command) + 2:].split(" ") if "=" in kv)
    return {}


def options(run):
    return json.loads((Path(run) / "config.json").read_text())["options"]


def main():
    tmp = Path(tempfile.mkdtemp(prefix="flashgpt_recipe_"))

    # Unknown names are refused by both commands, naming the known ones (no tokenizer needed).
    for cmd in (["data", "prepare", "--out", str(tmp / "never")], ["train", "--out", str(tmp / "never")]):
        r = flashgpt(*cmd, "--recipe", "nope")
        check(r.returncode != 0 and "unknown recipe 'nope' (known: translate)" in r.stderr
              and not (tmp / "never").exists(), f"{' '.join(cmd[:2])} --recipe nope is refused", r)

    if not VOCAB:
        data_skip.exit_missing(data_skip.TOKENIZER_MISSING)
    data = tmp / "data"
    make_data(data)
    wmt = data / "wmt14"
    common = ["--data-dir", str(data), "--threads", "1", "--quiet"]

    # data prepare: the recipe and its flags write the same shards.
    by_recipe, by_flags = tmp / "ds-recipe", tmp / "ds-flags"
    r1 = flashgpt("data", "prepare", "--recipe", "translate", *common, "--out", str(by_recipe))
    check(r1.returncode == 0, "data prepare --recipe translate", r1)
    r2 = flashgpt("data", "prepare", *common, "--out", str(by_flags), *PREPARE_FLAGS,
                  "--pairs", str(wmt / "train.multi30k.fr-en.en.xz"),
                  "--pairs", str(wmt / "train.newstest2008-2011.fr-en.en.xz"),
                  "--mono", str(data / "extra" / "mono.newstest2015-2021.en.xz"))
    check(r2.returncode == 0, "data prepare with the recipe's flags", r2)
    if r1.returncode or r2.returncode:
        sys.exit(1)
    check(shards(by_recipe) == shards(by_flags) and len(shards(by_recipe)[1]) > 0,
          f"same train and val shards (tokens, crc32): {shards(by_recipe)}")
    a, b = config_line(r1.stderr, "data prepare"), config_line(r2.stderr, "data prepare")
    keys = ["bilingual-rate", "pairs-per-document", "document-bytes", "single-pair-share", "pair-order", "val-set",
            "val-fraction"]
    check(a and all(a[k] == b[k] for k in keys) and a["recipe"] == "translate",
          f"the printed configurations agree: {[(k, a.get(k), b.get(k)) for k in keys]}")
    check(re.search(r"data prepare: recipe translate: bilingual-rate=1 pairs-per-document=16 document-bytes=2000 "
                    r"single-pair-share=0.1 pair-order=shuffled weight=\[train.newstest2008-2011.fr-en=4,", r1.stderr)
          is not None, "the recipe's values are printed as coming from the recipe", r1)
    check("--weight train.misc-testsets.fr-en=2 dropped" in r1.stderr
          and "no mono.newstest2019-2021-defr.fr[.xz]" in r1.stderr,
          "the recipe's weights and monolingual files absent from this data are named as left out", r1)

    # An explicit flag wins over the recipe.
    over = tmp / "ds-override"
    r = flashgpt("data", "prepare", "--recipe", "translate", *common, "--out", str(over), "--pairs-per-document", "2")
    c = config_line(r.stderr, "data prepare")
    check(r.returncode == 0 and c.get("pairs-per-document") == "2" and c.get("document-bytes") == "2000"
          and "given on the command line instead: pairs-per-document" in r.stderr
          and shards(over) != shards(by_recipe), "--pairs-per-document 2 overrides the recipe's 16", r)

    # train: the recipe and its flags store the same options; explicit flags win.
    run_recipe, run_flags, run_over = tmp / "run-recipe", tmp / "run-flags", tmp / "run-over"
    r1 = flashgpt("train", "--recipe", "translate", "--data", str(by_recipe), "--out", str(run_recipe), *TRAIN_SMALL)
    small = {TRAIN_SMALL[i] for i in range(0, len(TRAIN_SMALL), 2)}
    flags = [f for i, f in enumerate(TRAIN_FLAGS) if f not in small and (i == 0 or TRAIN_FLAGS[i - 1] not in small)]
    r2 = flashgpt("train", *flags, "--data", str(by_recipe), "--out", str(run_flags), *TRAIN_SMALL)
    check(r1.returncode == 0, "train --recipe translate", r1)
    check(r2.returncode == 0, "train with the recipe's flags", r2)
    if r1.returncode == 0 and r2.returncode == 0:
        o1, o2 = options(run_recipe), options(run_flags)
        diff = {k: (o1.get(k), o2.get(k)) for k in set(o1) | set(o2) if k not in ("recipe", "out")
                and o1.get(k) != o2.get(k)}
        check(not diff and o1["recipe"] == "translate" and o1["lr"] == 6e-4 and o1["keep-best"] is True
              and o1["weight-decay"] == 0.1 and o1["schedule"] == "cosine", f"same stored options (diff {diff})")
        check((run_recipe / "best" / "best.json").is_file(), "the recipe's --keep-best kept train/best", r1)
        check(re.search(r"train: recipe translate: lr=0.0006 warmup=200 schedule=cosine min-lr-ratio=0.1 "
                        r"weight-decay=0.1 eval-batches=0 save-every=0 keep-best=true; given on the command line "
                        r"instead: preset steps batch eval-every", r1.stderr) is not None,
              "train prints which values came from the recipe", r1)
    r = flashgpt("train", "--recipe", "translate", "--data", str(by_recipe), "--out", str(run_over), *TRAIN_SMALL,
                 "--lr", "1e-3", "--schedule", "linear")
    check(r.returncode == 0 and options(run_over)["lr"] == 1e-3 and options(run_over)["schedule"] == "linear"
          and options(run_over)["warmup"] == 200, "--lr and --schedule override the recipe's", r)

    # flashgpt run --recipe translate: the .xz corpora unpacked with python3 (the path of a build
    # without liblzma), the recipe's documents, its training settings, train/best evaluated.
    out = tmp / "job"
    r = flashgpt("run", "--recipe", "translate", "--data", "shared", "--data-dir", str(data), "--device", "cpu",
                 "--preset", "tiny", "--steps", "4", "--batch", "2", "--eval-sentences", "2", "--max-new-tokens",
                 "2", "--shots", "0", "--threads", "1", "--out", str(out), env_extra={"FLASHGPT_RUN_UNPACK_XZ": "1"})
    check(r.returncode == 0, "flashgpt run --recipe translate on the CPU", r)
    if r.returncode != 0:
        sys.exit(1)
    report = json.loads((out / "report.json").read_text())
    check((out / "corpora" / "wmt14" / "newstest2014.fr-en.en").is_file()
          and (out / "corpora" / "extra" / "mono.newstest2015-2021.en").is_file()
          and "unpacked with python3" in report["data"]["why"], "the .xz corpora were unpacked with python3", r)
    check(shards(out / "data") == shards(by_recipe), "run prepared the same shards as data prepare --recipe")
    o = options(out / "train")
    # (validation on 4 batches: on the CPU the job does not take the recipe's whole dev set)
    want = {"recipe": "translate", "lr": 6e-4, "schedule": "cosine", "min-lr-ratio": 0.1, "weight-decay": 0.1,
            "eval-batches": 4, "keep-best": True, "preset": "tiny", "steps": 4, "batch": 2}
    check(all(o.get(k) == v for k, v in want.items()), f"run trained with the recipe's settings: {o}")
    check(report["eval"]["run"] == str(out / "train" / "best") and report["train"]["best_step"] >= 1,
          f"run evaluated train/best (step {report['train']['best_step']})")
    prepare = shlex.split(report["commands"]["prepare"])
    train = shlex.split(report["commands"]["train"])
    check("--recipe" in prepare and "--recipe" in train, f"the reproduce lines name the recipe: {prepare} {train}")
    # The report's data prepare line, run as written into a new folder, gives the same shards.
    again = tmp / "ds-again"
    prepare[prepare.index("--out") + 1] = str(again)
    r = flashgpt(*prepare[1:])
    check(r.returncode == 0 and shards(again) == shards(by_recipe), "the report's data prepare line reproduces", r)

    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
