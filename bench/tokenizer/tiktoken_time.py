#!/usr/bin/env python3
"""tiktoken's MB/s on a text file: encode_ordinary on one thread (CPU time of the thread), or
with --batch-threads N, encode_ordinary_batch over documents of 64 lines on N threads (wall
time); best of --repeat runs. For the shell scripts beside it.

  python3 bench/tokenizer/tiktoken_time.py VOCAB_DIR TEXT [--encoding cl100k_base] [--batch-threads N]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer_bench import documents_split, tiktoken_encoding  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vocab_dir", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--batch-threads", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    enc = tiktoken_encoding(args.vocab_dir, args.encoding)
    text = args.text.read_text(encoding="utf-8")
    if args.batch_threads:
        docs = documents_split(text, 64)
        clock, run = time.perf_counter, lambda: enc.encode_ordinary_batch(docs, num_threads=args.batch_threads)
    else:
        clock, run = time.thread_time, lambda: enc.encode_ordinary(text)
    best = float("inf")
    for _ in range(args.repeat):
        t0 = clock()
        run()
        best = min(best, clock() - t0)
    print(f"{len(text.encode()) / best / 1e6:.1f}")


if __name__ == "__main__":
    main()
