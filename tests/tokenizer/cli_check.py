#!/usr/bin/env python3
"""`flashgpt tokenize` as a user runs it, against tiktoken: --format text and u32 give
tiktoken's ids for a whole WMT14 file (one thread and several), --decode gives the bytes
back, --count the number, stdin works, and bad input fails with a message that says why."""
import argparse
import json
import lzma
import os
import subprocess
import sys
import tempfile
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import data_skip  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flashgpt", required=True)
    args = parser.parse_args()
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as e:
        print(f"FAIL: cannot import tiktoken ({e})")
        return 1
    data = Path(os.environ.get("FLASHGPT_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    vocab = Path(os.environ.get("FLASHGPT_TOKENIZER_DIR", data / "tokenizers"))
    if not data_skip.tokenizer_dir_usable(vocab):
        data_skip.exit_missing(f"{data_skip.TOKENIZER_MISSING} (looked in {vocab})")
    if not (data / "wmt14" / "newstest2014.fr-en.fr.xz").is_file():
        data_skip.exit_missing(f"{data_skip.SHARED_DATA_MISSING} (looked in {data})")
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    def run(*argv, stdin=None):
        return subprocess.run([args.flashgpt, "tokenize", "--tokenizer-dir", str(vocab), *argv], input=stdin,
                              capture_output=True)

    raw = lzma.decompress((data / "wmt14" / "newstest2014.fr-en.fr.xz").read_bytes())
    name = "cl100k_base"
    meta = json.loads((vocab / f"{name}.meta.json").read_text())
    enc = tiktoken.Encoding(name=name, pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=load_tiktoken_bpe(str(vocab / f"{name}.tiktoken")))
    expected = enc.encode_ordinary(raw.decode())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        path.write_bytes(raw)
        for threads in ("1", "2", "0"):
            out = run("-e", name, "--threads", threads, str(path))
            check(out.returncode == 0 and [int(x) for x in out.stdout.split()] == expected,
                  f"--format text, --threads {threads}: tiktoken's ids")
        u32 = run("-e", name, "--format", "u32", str(path)).stdout
        ids = array("I")
        ids.frombytes(u32)
        check(ids.tolist() == expected, "--format u32: tiktoken's ids, little-endian")
        (Path(tmp) / "ids.u32").write_bytes(u32)
        check(run("-e", name, "--decode", "--format", "u32", str(Path(tmp) / "ids.u32")).stdout == raw,
              "--decode --format u32 gives the bytes back")
        text_ids = " ".join(map(str, expected)).encode()
        check(run("-e", name, "--decode", "-", stdin=text_ids).stdout == raw, "--decode from stdin (text ids)")
        check(run("-e", name, "--count", str(path)).stdout.strip() == str(len(expected)).encode(), "--count")
        check(run("-e", name, "-", stdin=b"hello world").stdout.split() == [b"15339", b"1917"], "stdin input")
        bad = run("-e", name, "-", stdin=b"ok \xff bad")
        check(bad.returncode != 0 and b"byte offset 3" in bad.stderr, "invalid UTF-8: error naming the offset")
        rep = run("-e", name, "--invalid-utf8", "replace", "-", stdin=b"ok \xff bad")
        check([int(x) for x in rep.stdout.split()] == enc.encode_ordinary(b"ok \xff bad".decode(errors="replace")),
              "--invalid-utf8 replace: as errors='replace'")
        sp = run("-e", name, "--allowed-special", "all", "-", stdin=b"a<|endoftext|>")
        check([int(x) for x in sp.stdout.split()] == enc.encode("a<|endoftext|>", allowed_special="all"),
              "--allowed-special all")
        # (through the old spelling --vocab-dir, which still works and says it is deprecated)
        missing = subprocess.run([args.flashgpt, "tokenize", "-e", name, "--vocab-dir", tmp, "-"], input=b"x",
                                 capture_output=True, env={**os.environ, "FLASHGPT_CACHE_DIR": tmp, "TIKTOKEN_CACHE_DIR": tmp,
                                                                "FLASHGPT_OFFLINE": "1"})
        check(missing.returncode != 0 and b"missing" in missing.stderr and tmp.encode() in missing.stderr,
              "missing rank file: error naming where it looked")
        check(b"--vocab-dir is deprecated; use --tokenizer-dir" in missing.stderr, "--vocab-dir: a deprecated alias")
        # No vocab dir, nothing in our cache: tiktoken's download cache (file named sha1(url)).
        import hashlib
        url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
        cache = Path(tmp) / "tiktoken-cache"
        cache.mkdir()
        (cache / hashlib.sha1(url.encode()).hexdigest()).symlink_to((vocab / f"{name}.tiktoken").resolve())
        # no tokenizer or data dir, and run from tmp: nothing finds ../shared/data/tokenizers
        env = {k: v for k, v in os.environ.items() if k not in ("FLASHGPT_TOKENIZER_DIR", "FLASHGPT_DATA_DIR")}
        env.update(FLASHGPT_CACHE_DIR=str(Path(tmp) / "empty"), TIKTOKEN_CACHE_DIR=str(cache))
        cached = subprocess.run([args.flashgpt, "tokenize", "-e", name, "-"], input=b"hello world",
                                capture_output=True, env=env, cwd=tmp)
        check(cached.returncode == 0 and cached.stdout.split() == [b"15339", b"1917"],
              "rank file found in tiktoken's cache (TIKTOKEN_CACHE_DIR/sha1(url))")
        hostile_inputs(args.flashgpt, vocab, Path(tmp), tiktoken, load_tiktoken_bpe, check)
    print("OK" if not failures else f"{len(failures)} FAILURES")
    return 1 if failures else 0


def hostile_inputs(flashgpt, vocab, tmp, tiktoken, load_tiktoken_bpe, check):
    """Bad input as a new user gives it: each a clear error (never a crash, a hang, a silent
    exit 0 or "unexpected error: std::..."), and r50k_base's blank lines on many threads."""

    def run(*argv, stdin=b"", vocab_dir=vocab):
        try:
            return subprocess.run([flashgpt, "tokenize", "--vocab-dir", str(vocab_dir), *argv], input=stdin,
                                  capture_output=True, timeout=60, env={**os.environ, "FLASHGPT_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, -999, b"", b"timed out (a hang)")

    def refused(out, *words):
        err = out.stderr.decode(errors="replace")
        return 0 < out.returncode < 128 and "unexpected error" not in err and all(w in err for w in words), err

    name = "r50k_base"
    meta = json.loads((vocab / f"{name}.meta.json").read_text())
    enc = tiktoken.Encoding(name=name, pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=load_tiktoken_bpe(str(vocab / f"{name}.tiktoken")))
    prose = ("A long line of ordinary prose, " * 40 + "\n\nWord  then more.\r\n\r\n2014 \t tabs\n") * 200
    path = tmp / "prose.txt"
    path.write_text(prose)
    for threads in ("0", "3", "16"):
        out = run("-e", name, "--threads", threads, str(path))
        check(out.returncode == 0 and [int(x) for x in out.stdout.split()] == enc.encode_ordinary(prose),
              f"r50k_base, blank lines after long lines, --threads {threads}: tiktoken's ids")

    for threads in ("100000", "-3"):
        ok, err = refused(run("-e", name, "--threads", threads, str(path)), "--threads", threads)
        check(ok, f"--threads {threads}: a clear error ({err.strip()!r})")
    ok, err = refused(run("-e", name, str(tmp)), "is a directory")
    check(ok, f"a directory as the input: an error ({err.strip()!r})")
    ok, err = refused(run("-e", name, "--decode", "-", stdin=b"15339 4294967296"), "4294967296", "32 bits")
    check(ok, f"--decode of an id beyond 32 bits names it ({err.strip()!r})")
    ok, err = refused(run("-e", name, "--decode", "-", stdin=b"15339 -1"), "'-1'")
    check(ok, f"--decode of a negative id names it ({err.strip()!r})")
    ok, err = refused(run("-e", name, "--allowed-special", "<|nope|>", "-", stdin=b"x"), "<|nope|>")
    check(ok, f"--allowed-special with an unknown name ({err.strip()!r})")

    pat = json.dumps(meta["pat_str"])
    for specials, words in [('{"": 50257, "<|endoftext|>": 50256}', ["empty string"]),
                            ('{"<|endoftext|>": -1}', ["-1"]),
                            ('{"<|endoftext|>": 50256, "<|x|>": 50256}', ["both have the id 50256"]),
                            ('{"<|endoftext|>": 4000000000}', ["4000000000"])]:
        bad = tmp / "bad-vocab"
        bad.mkdir(exist_ok=True)
        link = bad / f"{name}.tiktoken"
        if not link.exists():
            link.symlink_to((vocab / f"{name}.tiktoken").resolve())
        (bad / f"{name}.meta.json").write_text(f'{{"pat_str": {pat}, "special_tokens": {specials}}}')
        out = run("-e", name, "--allowed-special", "all", "-", stdin=b"hello", vocab_dir=bad)
        ok, err = refused(out, f"{name}.meta.json", *words)
        check(ok, f"meta.json special_tokens {specials}: an error naming the file ({err.strip()!r})")


if __name__ == "__main__":
    sys.exit(main())
