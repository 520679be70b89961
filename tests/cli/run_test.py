#!/usr/bin/env python3
"""`flashgpt run` (the README's `make run`) as a user runs it, with a micro budget on the
built-in sample: the whole pipeline writes a report with every section and numbers that
parse and agree with report.json and the training log; the reproduce command in the report
runs and gives the same losses; an existing --out is refused and left as it was; without
--out a second run gets a new folder; --data download fetches WMT14-shaped archives (made
here from the sample, served on 127.0.0.1) and scores their SGML newstest2014; bad options
are refused with messages that name them.
Usage: run_test.py PATH/TO/flashgpt [TOKENIZER_DIR]   (FLASHGPT_TOKENIZER_DIR wins)
Without the cl100k_base rank file the pipeline checks do not run and the test ends as skipped."""
import functools
import http.server
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402

FLASHGPT = sys.argv[1]
VOCAB = os.environ.get("FLASHGPT_TOKENIZER_DIR") or (sys.argv[2] if len(sys.argv) > 2 else None)
VOCAB = VOCAB if VOCAB and os.path.isfile(os.path.join(VOCAB, "cl100k_base.tiktoken")) else None
FAILURES = []
MICRO = ["--data", "builtin", "--preset", "tiny", "--steps", "3", "--batch", "2", "--eval-sentences", "2",
         "--max-new-tokens", "4", "--shots", "0,1,2", "--threads", "2"]
# For the runs that check where outputs go, not what is in them: one setting.
LIGHT = MICRO[:MICRO.index("--shots")] + ["--shots", "0"] + MICRO[MICRO.index("--shots") + 2:]
SECTIONS = ["## Summary", "## Machine", "## Data", "## Training", "## Translation scores", "## Example translations",
            "## Timings", "## Reproduce"]
PROMPTS_EN = ["Good morning.", "Thank you for your help.", "I enjoy learning new things."]


def check(condition, what, result=None):
    print(("ok: " if condition else "FAIL: ") + what, flush=True)
    if not condition:
        FAILURES.append(what)
        if result is not None:
            print(f"  rc {result.returncode}\n  stdout: {result.stdout[-3000:]}\n  stderr: {result.stderr[-3000:]}")


def env():
    e = dict(os.environ)
    if VOCAB:
        e["FLASHGPT_TOKENIZER_DIR"] = VOCAB
    return e


def flashgpt(*args, cwd=None):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env())


def refused(args, pattern, what, tmp):
    out = os.path.join(tmp, "never")
    r = flashgpt("run", *args, "--out", out, cwd=tmp)
    check(r.returncode != 0 and re.search(pattern, r.stderr) is not None and not os.path.exists(out),
          f"refused: {what} ({' '.join(args)}) -> /{pattern}/", r)


def table_rows(md, header):
    """Rows (lists of cells) of the Markdown table that follows `header`."""
    section = md.split(header, 1)[1]
    rows = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not set("".join(cells)) <= set("- "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header row


def check_report(out, steps, shots):
    md_path, json_path = out / "report.md", out / "report.json"
    check(md_path.is_file() and json_path.is_file(), f"{out}: report.md and report.json written")
    md = md_path.read_text(encoding="utf-8")
    report = json.loads(json_path.read_text(encoding="utf-8"))
    positions = [md.find(s) for s in SECTIONS]
    check(all(p >= 0 for p in positions) and positions == sorted(positions), f"every section, in order: {positions}")

    # Scores: one row per (direction, K), numbers in range and equal to report.json.
    rows = table_rows(md, "## Translation scores")
    got = {(r[0], int(r[1])): (float(r[2]), float(r[3])) for r in rows}
    want = {(d, k) for d in ("en-fr", "fr-en") for k in shots}
    check(set(got) == want and len(rows) == len(want), f"score rows for every direction and K: {sorted(got)}")
    for res in report["eval"]["results"]:
        b, c = got.get((res["direction"], res["shots"]), (None, None))
        check(b is not None and abs(b - res["bleu"]) < 0.006 and abs(c - res["chrf"]) < 0.006 and 0 <= b <= 100
              and 0 <= c <= 100, f"{res['direction']} K={res['shots']}: BLEU {b} chrF {c} as in report.json")
    check(report["eval"]["test_set"]["sentences"] == 2, "2 test sentences scored")

    # Examples: the seed's three prompts in every en-fr setting, French ones for fr-en.
    ex = table_rows(md, "## Example translations")
    check(len(ex) == 3 * len(want), f"{len(ex)} example rows = 3 prompts x {len(want)} settings")
    for k in shots:
        sources = [r[2] for r in ex if r[0] == "en-fr" and int(r[1]) == k]
        check(sources == PROMPTS_EN, f"en-fr K={k} examples are the seed's prompts: {sources}")

    # Training: the step count and the last loss agree with the log the trainer wrote.
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines() if line.strip()]
    step_losses = [r["loss"] for r in log if r.get("type") == "step"]
    m = re.search(r"- (\d+) of (\d+) planned steps", md)
    check(m is not None and int(m.group(1)) == steps == int(m.group(2)) == report["train"]["steps"],
          f"trained {steps} steps: {m.group(0) if m else None}")
    m = re.search(r"last training loss: ([0-9.]+)", md)
    check(m is not None and len(step_losses) == steps and abs(float(m.group(1)) - step_losses[-1]) < 1e-3
          and 5 < float(m.group(1)) < 13, f"last loss {m.group(1) if m else None} = log's {step_losses[-1:]}")
    m = re.search(r"last validation loss: ([0-9.]+)", md)
    check(m is not None and 5 < float(m.group(1)) < 13, "a validation loss")

    # The checkpoint evaluated is the lowest validation loss (train/best), as the report says.
    vals = [(r["loss"], r["step"]) for r in log if r.get("type") == "val"]
    best_loss, best_step = min(vals, key=lambda v: (v[0], v[1])) if vals else (None, None)
    best_file = out / "train" / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    m = re.search(r"- checkpoint evaluated: step (\d+), validation loss ([0-9.]+) \(the lowest of the run", md)
    check(m is not None and int(m.group(1)) == best_step == best.get("step") == report["train"]["best_step"]
          and abs(float(m.group(2)) - best_loss) < 1e-4 and abs(best.get("val_loss", -1) - best_loss) < 1e-9,
          f"best checkpoint line {m.group(0) if m else None} = the log's lowest val loss {best_loss} at step "
          f"{best_step} = best.json {best}")
    check(report["eval"]["step"] == best_step and report["eval"]["run"] == str(out / "train" / "best"),
          f"the evaluation scored train/best: step {report['eval']['step']}, {report['eval']['run']}")

    # Timings: numbers, and the total covers the stages.
    t = {r[0]: float(r[1]) for r in table_rows(md, "## Timings")}
    check(set(t) == {"data", "train", "eval", "report", "total"} and all(v >= 0 for v in t.values())
          and t["total"] + 0.2 >= t["data"] + t["train"] + t["eval"], f"timings {t}")
    check(re.search(r"- CPU: .+ \(\d+ cores\)", md) is not None, "the machine's CPU and cores")

    # Plots next to the report, or a line saying why not.
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    if have_mpl:
        check((out / "loss.png").is_file() and "](loss.png)" in md, "loss.png beside the report, linked")
        check((out / "kshot.png").is_file() and "](kshot.png)" in md, "kshot.png beside the report, linked")
    else:
        check("no loss plot" in md and "no K-shot plot" in md, "the report says the plots are missing")
    return md, report


SAMPLE = Path(__file__).resolve().parents[2] / "share" / "fren-sample"


def lines(name, lang):
    return (SAMPLE / f"{name}.fr-en.{lang}").read_text(encoding="utf-8").splitlines()


def tgz(files):
    """A .tgz holding {name: text}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sgm(sentences):
    segs = "".join(f'<seg id="{i + 1}">{s}</seg>\n' for i, s in enumerate(sentences))
    return f'<srcset setid="newstest2014">\n<doc docid="d1">\n{segs}</doc>\n</srcset>\n'


def check_download(tmp):
    """The three archives `flashgpt run --data download` fetches, laid out as WMT14 ships them
    (dev/ plain files, test-full/ SGML, training/ aligned files), with the sample's text."""
    served = Path(tmp) / "served"
    served.mkdir()
    train_en, train_fr = lines("train.sample", "en"), lines("train.sample", "fr")
    dev_en, dev_fr = lines("dev", "en"), lines("dev", "fr")
    test_en, test_fr = lines("test", "en"), lines("test", "fr")
    (served / "training-parallel-nc-v9.tgz").write_bytes(tgz({
        "training/news-commentary-v9.fr-en.en": "\n".join(train_en) + "\n",
        "training/news-commentary-v9.fr-en.fr": "\n".join(train_fr) + "\n"}))
    (served / "dev.tgz").write_bytes(tgz({
        f"dev/newstest{y}.{lang}": "\n".join(text) + "\n"
        for y in ("2012", "2013") for lang, text in (("en", dev_en), ("fr", dev_fr))}))
    (served / "test-full.tgz").write_bytes(tgz({
        "test-full/newstest2014-fren-src.en.sgm": sgm(test_en),
        "test-full/newstest2014-fren-ref.fr.sgm": sgm(test_fr),
        "test-full/newstest2014-fren-src.fr.sgm": sgm(["decoy"] * len(test_fr))}))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps([{"name": n, "url": f"http://127.0.0.1:{port}/{n}"}
                                        for n in ("dev.tgz", "test-full.tgz", "training-parallel-nc-v9.tgz")]))
        dest = Path(tmp) / "dl"
        out = Path(tmp) / "r-download"
        args = [a if a != "builtin" else "download" for a in LIGHT]
        r = flashgpt("run", *args, "--download-dir", str(dest), "--download-manifest", str(manifest),
                     "--out", str(out), cwd=tmp)
    finally:
        server.shutdown()
    check(r.returncode == 0, "--data download runs", r)
    if r.returncode != 0:
        return
    wmt = dest / "data" / "wmt14"
    check((wmt / "newstest2014.fr-en.en").read_text(encoding="utf-8").splitlines() == test_en
          and (wmt / "newstest2014.fr-en.fr").read_text(encoding="utf-8").splitlines() == test_fr,
          "the SGML test set became plain aligned lines (source with its reference, not the decoy)")
    report = json.loads((out / "report.json").read_text())
    check(report["data"]["source"] == "download" and report["data"]["corpora"] == ["train.news-commentary-v9.fr-en"]
          and report["eval"]["test_set"] == {"name": "newstest2014", "sentences": 2, "of": len(test_en)},
          f"trained on the download, scored its newstest2014: {report['data']['corpora']} {report['eval']['test_set']}")
    md = (out / "report.md").read_text(encoding="utf-8")
    check("--data download --download-dir" in md, "the reproduce line names the download")


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_run_")

    # Bad options, refused before anything is written (no tokenizer needed).
    refused(["--steps", "0"], r"--steps.*0", "zero steps", tmp)
    refused(["--steps", "-5"], r"--steps.*whole number", "negative steps", tmp)
    refused(["--steps", "ten"], r"--steps.*ten", "steps not a number", tmp)
    refused(["--eval-sentences", "-1"], r"--eval-sentences.*whole number", "negative sentence count", tmp)
    refused(["--minutes", "0"], r"--minutes", "zero minutes", tmp)
    refused(["--batch", "0"], r"--batch", "zero batch", tmp)
    refused(["--shots", "0,1,1"], r"--shots.*repeated", "a repeated K", tmp)
    refused(["--shots", "0,100"], r"--shots.*100", "K out of range", tmp)
    refused(["--device", "tpu"], r"--device.*tpu", "unknown device", tmp)
    refused(["--preset", "huge"], r"--preset.*huge", "unknown preset", tmp)
    refused(["--data", "somewhere"], r"--data.*somewhere", "unknown data source", tmp)
    refused(["--data", "shared", "--data-dir", os.path.join(tmp, "nothing")], r"nothing.*no wmt14",
            "a data dir without wmt14/", tmp)
    refused(["--threads", "5000"], r"--threads.*5000", "too many threads", tmp)
    refused(["--recipe", "nope"], r"--recipe.*unknown recipe 'nope' \(known: translate\)", "an unknown recipe", tmp)
    refused(["--data", "builtin", "--minutes", "0.5", "--eval-sentences", "0", "--max-new-tokens", "40"],
            r"--minutes 0.5: the evaluation .* less than a quarter of the budget", "a budget the evaluation would eat",
            tmp)
    r = flashgpt("version")
    if "cuda: no" in r.stdout:
        refused(["--device", "cuda"], r"no CUDA backend", "cuda in a CPU build", tmp)

    if not VOCAB:
        data_skip.exit_missing(data_skip.TOKENIZER_MISSING)

    # The whole pipeline with a micro budget.
    out = Path(tmp) / "r1"
    r = flashgpt("run", *MICRO, "--out", str(out), cwd=tmp)
    check(r.returncode == 0, "micro run succeeds", r)
    for header in ("[1/4] data", "[2/4] train", "[3/4] eval", "[4/4] report"):
        check(header in r.stderr, f"stage header {header} shown", r)
    check(re.search(r"step 3/3 .*loss", r.stderr) is not None and "translate en-fr 0-shot" in r.stderr,
          "the trainer's and the evaluation's progress shown", r)
    md, report = check_report(out, 3, [0, 1, 2])

    # The reproduce command of the report, run as written, gives the same training.
    cmd = re.search(r"build/(flashgpt run [^\n]+)", md).group(1)
    argv = shlex.split(cmd)
    check(argv[-2:] == ["--out", "NEW_DIR"] and "--steps" in argv and "--max-new-tokens" in argv,
          f"reproduce command spells out every option: {cmd}")
    again = Path(tmp) / "r2"
    r = flashgpt(*argv[1:-1], str(again), cwd=tmp)
    check(r.returncode == 0, "the report's command runs", r)
    if r.returncode == 0:
        r2 = json.loads((again / "report.json").read_text())
        check(abs(r2["train"]["last_loss"] - report["train"]["last_loss"]) < 1e-4,
              f"same last loss {r2['train']['last_loss']} vs {report['train']['last_loss']}")

    # An existing --out is refused and left as it was.
    before = (out / "report.md").read_bytes()
    r = flashgpt("run", *MICRO, "--out", str(out), cwd=tmp)
    check(r.returncode == 1 and "already exists" in r.stderr and (out / "report.md").read_bytes() == before,
          "an existing --out is refused, untouched", r)

    # Without --out: results/run, then results/run-2.
    cwd = Path(tmp) / "cwd"
    cwd.mkdir()
    for expect in ("results/run", "results/run-2"):
        r = flashgpt("run", *LIGHT, cwd=cwd)
        check(r.returncode == 0 and (cwd / expect / "report.md").is_file() and r.stdout.strip().startswith(expect),
              f"default out {expect}", r)

    # --minutes bounds the whole job: training far too long for the budget is stopped by its
    # time limit, and the report comes within the budget (with a little slack for a loaded machine).
    budget = 0.5
    out = Path(tmp) / "r-budget"
    args = list(LIGHT)
    args[args.index("--steps") + 1] = "100000"
    r = flashgpt("run", *args, "--minutes", str(budget), "--out", str(out), cwd=tmp)
    check(r.returncode == 0 and (out / "report.md").is_file(), "a job with a 30 s budget writes its report", r)
    if r.returncode == 0:
        rep = json.loads((out / "report.json").read_text())
        md = (out / "report.md").read_text(encoding="utf-8")
        check(rep["train"]["stopped_by_time_cap"] and rep["train"]["steps"] < 100000
              and "stopped by the time limit" in md, f"training stopped by its time limit at step {rep['train']['steps']}")
        check(rep["timings_s"]["total"] <= budget * 60 * 1.15,
              f"the whole job took {rep['timings_s']['total']:.1f} s of a {budget * 60:.0f} s budget")

    check_download(tmp)

    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
