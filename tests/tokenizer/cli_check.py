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
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    def run(*argv, stdin=None):
        return subprocess.run([args.flashgpt, "tokenize", "--vocab-dir", str(vocab), *argv], input=stdin,
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
        missing = subprocess.run([args.flashgpt, "tokenize", "-e", name, "--vocab-dir", tmp, "-"], input=b"x",
                                 capture_output=True, env={**os.environ, "FLASHGPT_CACHE_DIR": tmp, "TIKTOKEN_CACHE_DIR": tmp,
                                                                "FLASHGPT_OFFLINE": "1"})
        check(missing.returncode != 0 and b"missing" in missing.stderr and tmp.encode() in missing.stderr,
              "missing rank file: error naming where it looked")
        # No vocab dir, nothing in our cache: tiktoken's download cache (file named sha1(url)).
        import hashlib
        url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
        cache = Path(tmp) / "tiktoken-cache"
        cache.mkdir()
        (cache / hashlib.sha1(url.encode()).hexdigest()).symlink_to((vocab / f"{name}.tiktoken").resolve())
        env = {k: v for k, v in os.environ.items() if k != "FLASHGPT_TOKENIZER_DIR"}
        env.update(FLASHGPT_CACHE_DIR=str(Path(tmp) / "empty"), TIKTOKEN_CACHE_DIR=str(cache))
        cached = subprocess.run([args.flashgpt, "tokenize", "-e", name, "-"], input=b"hello world",
                                capture_output=True, env=env)
        check(cached.returncode == 0 and cached.stdout.split() == [b"15339", b"1917"],
              "rank file found in tiktoken's cache (TIKTOKEN_CACHE_DIR/sha1(url))")
    print("OK" if not failures else f"{len(failures)} FAILURES")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
