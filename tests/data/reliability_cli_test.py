#!/usr/bin/env python3
"""The data commands under hostile input, as a user meets them (issue 14): full disks,
paths with quotes, spaces and semicolons, numbers that would wrap around, datasets that
are incomplete or crafted, `data prepare` interrupted or run twice. Every refusal must be
a clear error with a non-zero exit, never "unexpected error: std::...".
With the tokenizer rank files (TOKENIZER_DIR) the checks that need a tokenizer run too.
Usage: reliability_cli_test.py PATH/TO/flashgpt [TOKENIZER_DIR]"""
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

FLASHGPT = os.path.abspath(sys.argv[1])
VOCAB = next((d for d in (sys.argv[2] if len(sys.argv) > 2 else None, os.environ.get("FLASHGPT_TOKENIZER_DIR"))
              if d and os.path.isdir(d)), None)
FAILURES = []


def check(condition, what, result=None):
    print(("ok: " if condition else "FAIL: ") + what)
    if not condition:
        FAILURES.append(what)
        if result is not None:
            print(f"  rc: {result.returncode}\n  stdout: {result.stdout[-2000:]}\n  stderr: {result.stderr[-2000:]}")


def full_disk():
    """In the child: files may not grow past 1 KiB (write() fails with EFBIG, as on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def flashgpt(*args, disk_full=False, cwd=None):
    return subprocess.run([FLASHGPT, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          preexec_fn=full_disk if disk_full else None)


def refused(r, *needles):
    return (r.returncode != 0 and "unexpected error" not in r.stderr and "Segmentation" not in r.stderr
            and all(n in r.stderr for n in needles))


def shard_bytes(tokens, count=None, encoding=b"cl100k_base", vocab=100277, eot=100257):
    payload = struct.pack(f"<{len(tokens)}I", *tokens)
    h = bytearray(128)
    h[0:8] = b"FGPTTOK\0"
    struct.pack_into("<IIQIIII", h, 8, 1, 128, len(tokens) if count is None else count, 4, vocab, eot,
                     zlib.crc32(payload))
    h[40:40 + len(encoding)] = encoding
    struct.pack_into("<I", h, 124, zlib.crc32(bytes(h[:124])))
    return bytes(h) + payload


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_reliability_")
    texts = os.path.join(tmp, "texts.fr")
    with open(texts, "w", encoding="utf-8") as f:
        f.write("De la neige, de la pluie et de l'été.\n" * 50)

    # 1. A full disk: the write fails, the exit is non-zero, the old file is intact.
    out = os.path.join(tmp, "counts.json")
    with open(out, "w") as f:
        f.write("previous")
    r = flashgpt("data", "analyze", "--input", texts, "--json", out, "--keywords", ",".join(f"w{i}" for i in range(200)),
                 disk_full=True)
    check(refused(r, "cannot write", "counts.json"), "analyze --json on a full disk is an error", r)
    check(open(out).read() == "previous", "the previous counts.json is untouched")
    check(sorted(os.listdir(tmp)) == ["counts.json", "texts.fr"], f"no temporary file left {os.listdir(tmp)}")

    # 2. Paths with quotes, spaces and semicolons are just paths (no shell sees them).
    odd = os.path.join(tmp, "it's a \"dir\"; touch INJECTED; $(touch INJECTED2)")
    os.makedirs(odd)
    json_path = os.path.join(odd, "counts 'x'; y.json")
    r = flashgpt("data", "analyze", "--input", texts, "--json", json_path, cwd=tmp)
    check(r.returncode == 0 and os.path.exists(json_path) and json.load(open(json_path))["counts"]["de"] == 100,
          "--json into an odd path", r)
    try:
        import matplotlib  # noqa: F401
        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
    if have_matplotlib:
        png = os.path.join(odd, "plot 'q'; rm -rf x.png")
        r = flashgpt("data", "analyze", "--input", texts, "--plot", png, cwd=tmp)
        check(r.returncode == 0 and os.path.exists(png) and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n",
              "--plot into an odd path", r)
        check(not os.path.exists(os.path.join(tmp, "INJECTED")) and not os.path.exists(os.path.join(tmp, "INJECTED2")),
              "nothing in the path ran as a command")
        leftovers = [n for n in os.listdir(odd) if ".tmp-" in n]
        check(not leftovers, f"no temporary plot left {leftovers}")
    else:
        print("skip: no matplotlib for the --plot checks")

    # 3. Numbers that would wrap around or make no sense are refused by the option table.
    cases = [
        (["data", "analyze", "--input", texts, "--limit", "-1"], "--limit"),
        (["data", "prepare", "--pairs", texts, "--seed", "-1"], "--seed"),
        (["data", "prepare", "--pairs", texts, "--shard-tokens", "-5"], "--shard-tokens"),
        (["data", "prepare", "--pairs", texts, "--shard-tokens", "0"], "--shard-tokens"),
        (["data", "prepare", "--pairs", texts, "--threads", "-1"], "--threads"),
        (["data", "prepare", "--pairs", texts, "--threads", "100000"], "--threads"),
        (["data", "download", "--dest", tmp, "--retries", "-1"], "--retries"),
        (["bench", "data", "--threads", "-3"], "--threads"),
        (["bench", "data", "--repeat", "0"], "--repeat"),
    ]
    for args, option in cases:
        r = flashgpt(*args)
        check(refused(r, option), f"{' '.join(args[:2])} {option} {args[-1]} refused", r)

    # 4. A dataset directory without summary.json (an interrupted or foreign one) is refused.
    ds = os.path.join(tmp, "partial")
    os.makedirs(ds)
    with open(os.path.join(ds, "train_000000.bin"), "wb") as f:
        f.write(shard_bytes([1, 2, 100257]))
    r = flashgpt("data", "analyze", "--dataset", ds)
    check(refused(r, "no summary.json"), "analyze refuses a dataset without summary.json", r)

    # 5. A crafted token count (2^62 + n wraps 4 N around to the file size): refused, no crash.
    with open(os.path.join(ds, "train_000000.bin"), "wb") as f:
        f.write(shard_bytes(list(range(16)), count=(1 << 62) + 16))
    with open(os.path.join(ds, "summary.json"), "w") as f:
        json.dump({"train_shards": [{"path": "train_000000.bin"}], "val_shards": []}, f)
    r = flashgpt("data", "analyze", "--dataset", ds)
    check(refused(r, "promises 4611686018427387920 tokens"), "analyze refuses a crafted token count", r)

    if VOCAB:
        run_with_tokenizer(tmp)
    else:
        print("skip: no tokenizer rank files for the prepare and tokenize checks")
    subprocess.run(["rm", "-rf", tmp])
    if FAILURES:
        sys.exit(f"{len(FAILURES)} check(s) failed")


def run_with_tokenizer(tmp):
    en, fr = os.path.join(tmp, "train.toy.fr-en.en"), os.path.join(tmp, "train.toy.fr-en.fr")
    with open(en, "w") as fe, open(fr, "w") as ff:
        for i in range(2000):
            fe.write(f"This is sentence {i} of the corpus, with a few more words in it.\n")
            ff.write(f"C'est la phrase {i} du corpus, avec quelques mots de plus.\n")
    ds = os.path.join(tmp, "ds")
    base = ["data", "prepare", "--pairs", en, "--out", ds, "--tokenizer-dir", VOCAB, "--quiet"]

    # Errors from the file system are named, not "unexpected error: std::filesystem...".
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    r = flashgpt("data", "prepare", "--pairs", en, "--out", os.path.join(blocker, "ds"), "--eval-dir", tmp,
                 "--no-test-set-check", "--tokenizer-dir", VOCAB)
    check(refused(r, "data prepare: cannot create directories: Not a directory"), "prepare into a path under a file", r)

    # Fail closed on the test set: a typo in --eval-dir is an error.
    r = flashgpt(*base, "--eval-dir", os.path.join(tmp, "no-such-eval-dir"))
    check(refused(r, "evaluation directory", "does not exist"), "a missing --eval-dir is an error", r)
    r = flashgpt(*base, "--eval-dir", tmp)
    check(refused(r, "newstest2014.fr-en.{en,fr} not found"), "an --eval-dir without newstest2014 is an error", r)
    check(not os.path.exists(ds), "nothing written after a refusal")

    r = flashgpt(*base, "--eval-dir", tmp, "--no-test-set-check", "--seed", "1")
    check(r.returncode == 0 and os.path.exists(os.path.join(ds, "summary.json")), "prepare publishes a dataset", r)
    before = {n: open(os.path.join(ds, n), "rb").read() for n in os.listdir(ds)}

    # A file prepare did not write: the directory is refused, the file kept.
    with open(os.path.join(ds, "notes.txt"), "w") as f:
        f.write("mine")
    r = flashgpt(*base, "--eval-dir", tmp, "--no-test-set-check")
    check(refused(r, "notes.txt", "did not write") and open(os.path.join(ds, "notes.txt")).read() == "mine",
          "prepare never replaces a directory holding someone else's file", r)
    os.remove(os.path.join(ds, "notes.txt"))

    # SIGTERM and SIGINT mid-run: the previous dataset stays, the temporary one goes.
    big_en, big_fr = os.path.join(tmp, "train.big.fr-en.en"), os.path.join(tmp, "train.big.fr-en.fr")
    with open(big_en, "w") as fe, open(big_fr, "w") as ff:
        for i in range(1000000):
            fe.write(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7}.\n")
            ff.write(f"Ligne {i} : le renard brun saute par-dessus le chien paresseux {i * 7}.\n")
    # The signal goes out as soon as the temporary directory exists (the handlers are
    # installed before it is made), never after a fixed sleep: on an idle machine the whole
    # run can finish in half a second, and a signal after the publish proves nothing.
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([FLASHGPT, "data", "prepare", "--pairs", big_en, "--out", ds, "--tokenizer-dir", VOCAB,
                              "--eval-dir", tmp, "--no-test-set-check", "--threads", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(".ds.tmp-" in n for n in os.listdir(tmp)):
            time.sleep(0.002)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        after = {n: open(os.path.join(ds, n), "rb").read() for n in os.listdir(ds)}
        check(p.returncode != 0 and "interrupted by" in err, f"{sig.name} stops prepare with a message ({err[-300:]!r})")
        check(after == before, f"{sig.name}: the previous dataset is intact")
        check(not [n for n in os.listdir(tmp) if ".ds.tmp-" in n], f"{sig.name}: no temporary directory left")

    # tokenize -o on a full disk: an error, and the previous output stays.
    text = os.path.join(tmp, "prose.txt")
    with open(text, "w") as f:
        f.write("Hello world, bonjour le monde. " * 2000)
    ids = os.path.join(tmp, "ids.txt")
    with open(ids, "w") as f:
        f.write("previous")
    r = flashgpt("tokenize", "-e", "cl100k_base", "--vocab-dir", VOCAB, text, "-o", ids, disk_full=True)
    check(refused(r, "cannot write", "ids.txt") and open(ids).read() == "previous",
          "tokenize -o on a full disk is an error and keeps the old file", r)
    r = flashgpt("tokenize", "-e", "cl100k_base", "--vocab-dir", VOCAB, text, "-o", ids)
    check(r.returncode == 0 and len(open(ids).read().split()) > 1000, "tokenize -o writes the ids", r)


def main_guarded():
    try:
        main()
    except Exception as e:  # a check that could not even run is a failure, not a crash of the test
        sys.exit(f"FAIL: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main_guarded()
