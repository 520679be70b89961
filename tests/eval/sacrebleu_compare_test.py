#!/usr/bin/env python3
"""`flashgpt eval bleu --json` against the real sacreBLEU (PyPI `sacrebleu`, its Python API)
on the same hypotheses: random and perturbed corpora built here from French and English
sentences (dropped, swapped and repeated words, punctuation, numbers with commas and
periods, accents, uppercase, empty lines, HTML entities, odd whitespace, non-Latin scripts),
for tokenizers 13a and intl, mixed case and lowercased, and the edge cases (empty
hypotheses, no match at all, hypotheses too short for 4-grams, identical corpora). With the
shared data present, also the 3000 lines of newstest2013 (French) with perturbed copies.
The printed two-decimal scores must be equal, the full-precision ones within 1e-9, and the
signatures equal (the version part only if the installed sacrebleu is the one we match).
Then the CLI's refusals of bad input. Installs nothing: it needs sacrebleu installed
(scripts/install-deps.sh).
Usage: sacrebleu_compare_test.py PATH/TO/flashgpt [SHARED_DATA_DIR]"""
import json
import lzma
import os
import random
import subprocess
import sys
import tempfile

try:
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF
except ImportError:
    print("FAIL: this test needs the Python package sacrebleu (scripts/install-deps.sh installs it)")
    sys.exit(1)

FLASHGPT = sys.argv[1]
DATA = os.environ.get("FLASHGPT_DATA_DIR") or (sys.argv[2] if len(sys.argv) > 2 else "")
OUR_VERSION = "2.6.0"  # kSacrebleuVersion in include/flashgpt/eval.h
FAILURES = []
MAX_DIFF = {"bleu": 0.0, "chrf": 0.0}
COMPARED = [0]

SENTENCES = [
    "The European Parliament adopted the resolution on Tuesday, 14 March 2013.",
    "Le Parlement européen a adopté la résolution mardi 14 mars 2013.",
    "Prices rose by 3.5% last year, to 1,250.75 euros per tonne.",
    "Les prix ont augmenté de 3,5 % l'an dernier, à 1 250,75 euros la tonne.",
    "\"I don't think so,\" said the minister (who declined to comment further).",
    "« Je ne le pense pas », a déclaré le ministre, qui n'a pas souhaité en dire plus.",
    "Where is the station? It's near the old town-hall, 200 m away.",
    "Où est la gare ? Elle est près de l'ancien hôtel de ville, à 200 m.",
    "The U.S. economy grew 2.4% in Q3; analysts had expected 2-3%.",
    "L'économie des États-Unis a progressé de 2,4 % au troisième trimestre.",
    "Good morning. Thank you for your help. I enjoy learning new things.",
    "Bonjour. Merci de votre aide. J'aime apprendre de nouvelles choses.",
    "Ça coûte 20 € — ou 17,50 £ — selon le taux du jour (voir www.example.com/taux).",
    "The meeting starts at 10:30 a.m. on 05/06/2014 & ends at noon.",
    "Å, Ø and Æ are letters; so are ß, œ and ŀ.",
    "Οδυσσεύς ΟΔΥΣΣΕΥΣ ΣΟΦΟΣ σοφός, ΑΣ. Σ",
    "Москва — столица России; население: 12,6 млн человек.",
    "我们的翻译系统在2014年达到了新的水平。",
    "東京は日本の首都です「はい」、そうです。",
    "قال الوزير إن الاقتصاد نما بنسبة ٢٫٤٪ هذا العام.",
    "İstanbul'da ISTANBUL: Iğdır ve ığdır.",
    "Emoji 😀 and symbols ± ° © ™ ∑ √ ≤ ≥ ← → ♥ ★.",
    "He said: 'it's 5.30pm' -- then left... without a word!",
    "1,000,000 people; 3.14159; 10-12 years; 1990s-2000s; -5 °C.",
]

WORDS = ("the a of to and in is that for on with as by at from it was said year new "
         "le la les de des du et à un une est que pour dans sur avec par au été année nouveau "
         "Europe Paris président gouvernement économie été élève où garçon naïve cœur".split())

EXTRAS = [",", ".", "!", "?", ";", ":", "'", "\"", "(", ")", "«", "»", "—", "–", "-", "…", "&", "&amp;",
          "&quot;", "&lt;", "&gt;", "<skipped>", "1,000", "3.14", "2014.", "10-12", "5,6", "-", "$", "€", "%",
          "@", "#", "/", "\\", "[", "]", "{", "}", "~", "^", "_", "`", "|", "·", "¿", "¡", "、", "。", "「",
          "」", "٫", "٪", "½", "²", "Ⅻ", "①", "٣"]
SPACES = [" ", " ", " ", "  ", "\t", "\u00a0", "\u2028", "\u3000", "\u2009", "\x1c", "\x0b", "\x0c"]
ACCENTS = {"e": "é", "a": "à", "c": "ç", "o": "ô", "u": "ù", "i": "ï", "é": "e", "è": "e", "à": "a", "ç": "c"}


def perturb(sentence, rng):
    words = sentence.split()
    for _ in range(rng.randint(0, 4)):
        op = rng.randrange(9)
        if op == 0 and words:
            del words[rng.randrange(len(words))]
        elif op == 1 and len(words) > 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 2:
            words.insert(rng.randint(0, len(words)), rng.choice(EXTRAS))
        elif op == 3 and words:
            i = rng.randrange(len(words))
            words[i] = words[i] + rng.choice(EXTRAS)
        elif op == 4 and words:
            i = rng.randrange(len(words))
            words[i] = rng.choice([str.upper, str.lower, str.capitalize, str.title])(words[i])
        elif op == 5 and words:
            i = rng.randrange(len(words))
            words[i] = "".join(ACCENTS.get(ch, ch) if rng.random() < 0.5 else ch for ch in words[i])
        elif op == 6:
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        elif op == 7 and words:
            i = rng.randrange(len(words))
            words.insert(i, words[i])
        elif op == 8:
            number = rng.choice(["{:,}", "{:.2f}", "{}", "{:,.1f}"]).format(rng.uniform(0, 1e6))
            words.insert(rng.randint(0, len(words)), number)
    text = ""
    for i, w in enumerate(words):
        text += (rng.choice(SPACES) if i else "") + w
    if rng.random() < 0.2:
        text = rng.choice(SPACES) + text + rng.choice(SPACES)
    return text


def random_sentence(rng):
    return " ".join(rng.choice(WORDS + EXTRAS) for _ in range(rng.randint(0, 25)))


def check(condition, what, detail=""):
    if not condition:
        print("FAIL: " + what + (f"\n  {detail}" if detail else ""))
        FAILURES.append(what)


def write_lines(path, lines):
    # Bytes, so that no newline translation happens; a segment never holds "\n".
    with open(path, "wb") as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def flashgpt(*args):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=300)


def signature_without_version(signature):
    return signature.rsplit("|version:", 1)[0]


def compare(name, hyps, refs, tmp):
    assert all("\n" not in s for s in hyps + refs)
    ref_path, hyp_path = os.path.join(tmp, "ref.txt"), os.path.join(tmp, "hyp.txt")
    write_lines(ref_path, refs)
    write_lines(hyp_path, hyps)
    for tokenize in ("13a", "intl"):
        for lowercase in (False, True):
            args = ["eval", "bleu", "--ref", ref_path, "--hyp", hyp_path, "--tokenize", tokenize, "--json"]
            if lowercase:
                args += ["--lowercase", "--chrf-lowercase"]
            r = flashgpt(*args)
            what = f"{name} tok={tokenize} lowercase={lowercase}"
            if r.returncode != 0:
                check(False, what + ": flashgpt failed", r.stderr)
                continue
            ours = json.loads(r.stdout)
            bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
            chrf = CHRF(lowercase=lowercase)
            theirs = {"bleu": bleu.corpus_score(hyps, [refs]), "chrf": chrf.corpus_score(hyps, [refs])}
            signatures = {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
            COMPARED[0] += 1
            for metric in ("bleu", "chrf"):
                score = theirs[metric].score
                diff = abs(ours[f"{metric}_score"] - score)
                MAX_DIFF[metric] = max(MAX_DIFF[metric], diff)
                check(f"{ours[metric]:.2f}" == f"{score:.2f}" and diff <= 1e-9,
                      f"{what}: {metric} {ours[metric]!r} vs sacrebleu {score!r}",
                      f"ours {ours[metric + '_score']!r}")
                ours_sig, their_sig = ours["signature"][metric], signatures[metric]
                if sacrebleu.__version__ != OUR_VERSION:
                    ours_sig, their_sig = signature_without_version(ours_sig), signature_without_version(their_sig)
                check(ours_sig == their_sig, f"{what}: {metric} signature {ours_sig} vs {their_sig}")
            b = theirs["bleu"]
            check(ours["bleu_verbose"] == b._verbose, f"{what}: verbose {ours['bleu_verbose']} vs {b._verbose}")
            check(ours["counts"] == list(b.counts) and ours["totals"] == list(b.totals)
                  and ours["hyp_len"] == b.sys_len and ours["ref_len"] == b.ref_len,
                  f"{what}: statistics {ours['counts']} {ours['totals']} vs {b.counts} {b.totals}")


def check_refusals(tmp):
    good = os.path.join(tmp, "good.txt")
    write_lines(good, ["the first of two lines", "and the second one"])
    short = os.path.join(tmp, "short.txt")
    write_lines(short, ["one line"])
    empty = os.path.join(tmp, "empty.txt")
    open(empty, "wb").close()
    invalid = os.path.join(tmp, "invalid.txt")
    with open(invalid, "wb") as f:
        f.write(b"fine\nbad \xff byte\n")
    missing = os.path.join(tmp, "missing.txt")
    cases = [
        (["--ref", good, "--hyp", short], ["has 1 lines", "has 2"]),
        (["--ref", missing, "--hyp", good], ["missing.txt", "no such file"]),
        (["--ref", good, "--hyp", tmp], ["is a directory"]),
        (["--ref", good, "--hyp", empty], ["empty.txt", "empty file"]),
        (["--ref", invalid, "--hyp", good], ["invalid.txt", "invalid UTF-8 at line 2"]),
        (["--ref", good, "--hyp", good, "--tokenize", "zh"], ["zh"]),
    ]
    for args, needles in cases:
        r = flashgpt("eval", "bleu", *args)
        check(r.returncode != 0 and all(n in r.stderr for n in needles),
              f"eval bleu {' '.join(args)} fails naming {needles}", f"rc={r.returncode} stderr={r.stderr}")
    r = flashgpt("eval", "bleu", "--ref", good, "--hyp", good)
    check(r.returncode == 0 and r.stdout.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
          and " = 100.00 100.0/100.0/100.0/100.0 (BP = 1.000 ratio = 1.000 hyp_len = 9 ref_len = 9)" in r.stdout
          and "\nchrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:" in r.stdout,
          "eval bleu prints sacreBLEU's lines", r.stdout)


def main():
    rng = random.Random(20261206)
    tmp = tempfile.mkdtemp(prefix="flashgpt_eval_")
    refs = [rng.choice(SENTENCES) for _ in range(60)]
    compare("identical", refs, refs, tmp)
    compare("empty hypotheses", ["" for _ in refs], refs, tmp)
    compare("no match", ["zzz qqq" for _ in refs], refs, tmp)
    compare("one-word hypotheses (no 2-grams)", [r.split()[0] if r.split() else "" for r in refs], refs, tmp)
    compare("three-word hypotheses (no 4-grams)", [" ".join(r.split()[:3]) for r in refs], refs, tmp)
    compare("empty references", refs, ["" for _ in refs], tmp)
    compare("single segment", [perturb(SENTENCES[0], rng)], [SENTENCES[0]], tmp)
    for trial in range(12):
        n = rng.randint(1, 80)
        refs = [rng.choice(SENTENCES) if rng.random() < 0.8 else random_sentence(rng) for _ in range(n)]
        refs = [r if rng.random() > 0.05 else "" for r in refs]
        hyps = [perturb(r, rng) if rng.random() > 0.05 else "" for r in refs]
        compare(f"perturbed #{trial} ({n} lines)", hyps, refs, tmp)
    for trial in range(4):
        n = rng.randint(1, 50)
        compare(f"random #{trial}", [random_sentence(rng) for _ in range(n)],
                [random_sentence(rng) for _ in range(n)], tmp)
    newstest = os.path.join(DATA, "wmt14", "newstest2013.fr-en.fr.xz") if DATA else ""
    if newstest and os.path.isfile(newstest):
        with lzma.open(newstest, "rt", encoding="utf-8", newline="\n") as f:
            lines = f.read().split("\n")
        lines = lines[:-1] if lines and lines[-1] == "" else lines
        compare(f"newstest2013.fr ({len(lines)} lines), perturbed", [perturb(l, rng) for l in lines], lines, tmp)
    else:
        print(f"skipped the newstest2013 part: {newstest or 'no data directory given'} is absent")
    check_refusals(tmp)
    print(f"compared {COMPARED[0]} corpus scorings with sacrebleu {sacrebleu.__version__}: "
          f"max |ours - sacrebleu| BLEU {MAX_DIFF['bleu']:.3g}, chrF {MAX_DIFF['chrf']:.3g}")
    if FAILURES:
        print(f"{len(FAILURES)} failure(s)")
        sys.exit(1)
    print("all equal")


if __name__ == "__main__":
    main()
