#!/usr/bin/env python3
"""`flashgpt data analyze` and `flashgpt data prepare` as a user runs them, on generated
fixtures: the JSON analyze writes, --ignore-case, --limit, the refusal of newstest2014,
and (with the tokenizer rank files) prepare -> analyze --dataset.
Usage: cli_test.py PATH/TO/flashgpt [TOKENIZER_DIR]   (FLASHGPT_TOKENIZER_DIR wins over the argument)
Without the rank files the checks that need them do not run and the test ends as skipped."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402

FLASHGPT = sys.argv[1]
VOCAB = os.environ.get("FLASHGPT_TOKENIZER_DIR") or (sys.argv[2] if len(sys.argv) > 2 else None)
VOCAB = VOCAB if VOCAB and os.path.isdir(VOCAB) else None
FAILURES = []


def check(condition, what, result=None):
    print(("ok: " if condition else "FAIL: ") + what)
    if not condition:
        FAILURES.append(what)
        if result is not None:
            print(f"  stdout: {result.stdout}\n  stderr: {result.stderr}")


def flashgpt(*args):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=120)


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_cli_")
    texts = os.path.join(tmp, "texts.fr")
    with open(texts, "w", encoding="utf-8") as f:
        f.write("De la neige, de la pluie et de l'été.\n")   # de x3, la x2, et
        f.write("À demain ! Oui, merci. Non merci.\n")        # merci x2; À, Oui, Non only with --ignore-case
        f.write("de de de\n")                                 # never read with --limit 2
    out = os.path.join(tmp, "counts.json")
    r = flashgpt("data", "analyze", "--input", texts, "--limit", "2", "--json", out)
    check(r.returncode == 0, "analyze runs", r)
    j = json.load(open(out, encoding="utf-8"))
    check(j["texts"] == 2 and j["counts"]["de"] == 2 and j["counts"]["la"] == 2 and j["counts"]["merci"] == 2
          and j["counts"]["à"] == j["counts"]["oui"] == 0 and j["total"] == sum(j["counts"].values()) == 7, f"case-sensitive counts {j}")
    check(list(j["counts"])[:2] == ["de", "la"] or list(j["counts"])[:2] == ["la", "de"], "JSON sorted by count")
    check("total" in r.stdout and "de" in r.stdout, "table printed", r)

    r = flashgpt("data", "analyze", "--input", texts, "--ignore-case", "--keywords", "de,à,oui", "--json", out)
    j = json.load(open(out, encoding="utf-8"))
    check(r.returncode == 0 and j["counts"] == {"de": 6, "à": 1, "oui": 1} and j["texts"] == 3,
          f"--ignore-case and --keywords {j}", r)

    r = flashgpt("data", "analyze", "--input", os.path.join(tmp, "missing.txt"))
    check(r.returncode == 1 and "missing.txt" in r.stderr, "missing input names the file", r)

    if VOCAB:
        # prepare refuses the evaluation set by name, before reading anything (it loads the
        # tokenizer first).
        for lang in ("en", "fr"):
            with open(os.path.join(tmp, f"newstest2014.fr-en.{lang}"), "w") as f:
                f.write("x\n")
        r = flashgpt("data", "prepare", "--pairs", os.path.join(tmp, "newstest2014.fr-en.en"), "--out",
                     os.path.join(tmp, "ds"), "--eval-dir", tmp, "--tokenizer-dir", VOCAB, "--quiet")
        check(r.returncode == 1 and "refusing to train on" in r.stderr, "prepare refuses newstest2014", r)

        with open(os.path.join(tmp, "train.toy.fr-en.en"), "w") as en, \
                open(os.path.join(tmp, "train.toy.fr-en.fr"), "w") as fr:
            for i in range(300):
                en.write(f"This is sentence {i} of the corpus.\n")
                fr.write(f"C'est la phrase {i} du corpus, et de la suite.\n")
        ds = os.path.join(tmp, "ds")
        os.makedirs(os.path.join(tmp, "eval"))
        r = flashgpt("data", "prepare", "--pairs", os.path.join(tmp, "train.toy.fr-en.en"), "--out", ds,
                     "--eval-dir", os.path.join(tmp, "eval"), "--tokenizer-dir", VOCAB, "--val-fraction", "0",
                     "--seed", "3", "--no-test-set-check")
        check(r.returncode == 0 and "prepared 300 train" in r.stdout, "prepare writes a dataset", r)
        s = json.load(open(os.path.join(ds, "summary.json")))
        check(s["read"] == 300 and s["documents"]["train"] == 300 and s["tokens"]["fr"] > 0 and s["tokens"]["en"] > 0,
              "summary.json counts pairs and tokens per language")
        r = flashgpt("data", "analyze", "--dataset", ds, "--tokenizer-dir", VOCAB, "--json", out, "--keywords",
                     "la,de,et")
        j = json.load(open(out, encoding="utf-8"))
        french = j["counts"]["et"]  # one "et" and "de", two "la" per French document, none in English
        check(r.returncode == 0 and j["texts"] == 300 and 100 < french < 200
              and j["counts"]["de"] == french and j["counts"]["la"] == 2 * french, f"analyze --dataset decodes documents {j}", r)

        # Recipe 2's options: multi-pair documents, a repeated corpus, the dev set as the
        # validation split (--val-set implies --val-fraction 0); bad values name the problem.
        for lang, lines in (("en", ["Dev sentence one.", "Dev sentence two."]), ("fr", ["Phrase un.", "Phrase deux."])):
            with open(os.path.join(tmp, "eval", f"newstest2013.fr-en.{lang}"), "w") as f:
                f.write("\n".join(lines) + "\n")
        multi = os.path.join(tmp, "ds_multi")
        base = ["data", "prepare", "--pairs", os.path.join(tmp, "train.toy.fr-en.en"), "--eval-dir",
                os.path.join(tmp, "eval"), "--tokenizer-dir", VOCAB, "--no-test-set-check", "--quiet"]
        r = flashgpt(*base, "--out", multi, "--bilingual-rate", "1", "--pairs-per-document", "4", "--document-bytes",
                     "400", "--pair-order", "shuffled", "--weight", "train.toy.fr-en=2", "--val-set", "newstest2013")
        check(r.returncode == 0, "prepare with multi-pair options", r)
        s = json.load(open(os.path.join(multi, "summary.json")))
        check(s["corpora"][0]["used"] == 600 and s["corpora"][0]["repeat"] == 2
              and s["corpora"][1]["name"] == "newstest2013.fr-en (validation)" and s["documents"]["val"] == 2
              and 150 <= s["documents"]["train"] < 300, f"multi-pair summary {s['corpora']} {s['documents']}")
        j_out = os.path.join(tmp, "val.json")
        r = flashgpt("data", "analyze", "--dataset", multi, "--split", "val", "--tokenizer-dir", VOCAB, "--json", j_out,
                     "--keywords", "English,French,Phrase")
        j = json.load(open(j_out, encoding="utf-8"))
        check(r.returncode == 0 and j["texts"] == 2 and j["counts"] == {"English": 4, "French": 4, "Phrase": 4},
              f"the validation split is the dev set in the prompt format, both directions {j}", r)
        for args, message in ((["--weight", "train.nope.fr-en=2"], "no input corpus has that name"),
                              (["--weight", "train.toy.fr-en"], "is not NAME=REPEAT"),
                              (["--single-pair-share", "0.5"], "give --pairs-per-document above 1"),
                              (["--val-set", "newstest2014"], "newstest2014"),
                              (["--val-set", "newstest2013", "--val-fraction", "0.1"], "give --val-fraction 0")):
            r = flashgpt(*base, "--out", os.path.join(tmp, "ds_bad"), *args)
            check(r.returncode != 0 and message in r.stderr and not os.path.exists(os.path.join(tmp, "ds_bad")),
                  f"prepare {' '.join(args)} fails naming the problem", r)

    subprocess.run(["rm", "-rf", tmp])
    if FAILURES:
        sys.exit(f"{len(FAILURES)} check(s) failed")
    if not VOCAB:
        data_skip.exit_missing(data_skip.TOKENIZER_MISSING + " (prepare and analyze --dataset did not run)")


if __name__ == "__main__":
    main()
