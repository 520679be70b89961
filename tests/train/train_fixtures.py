"""Shared by the trainer's Python tests: a token dataset written directly in the shard
format of include/flashgpt/data_shard.h (so the tests need no tokenizer files), a minimal
safetensors reader in numpy (independent of the C++ one), a run's log records, and the
ok/FAIL checks the tests print."""
import json
import os
import struct
import sys
import zlib

import numpy as np

VOCAB = 300
ENCODING = "test_bytes"


def write_shard(path, tokens, vocab=VOCAB, encoding=ENCODING, eot=0):
    payload = np.asarray(tokens, dtype="<u4").tobytes()
    head = b"FGPTTOK\0" + struct.pack("<IIQIIII", 1, 128, len(tokens), 4, vocab, eot, zlib.crc32(payload))
    head += encoding.encode().ljust(64, b"\0") + b"\0" * 20
    head += struct.pack("<I", zlib.crc32(head))
    assert len(head) == 128
    with open(path, "wb") as f:
        f.write(head + payload)


def write_dataset(directory, train_tokens=6000, val_tokens=800, vocab=VOCAB, encoding=ENCODING, summary=True):
    """Documents of a small repetitive language (learnable), split into train and val."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(11)
    def text(n):
        out = []
        while len(out) < n:
            start = int(rng.integers(1, vocab - 20))
            out += [start + i % 7 for i in range(int(rng.integers(5, 40)))] + [0]
        return out[:n]
    write_shard(os.path.join(directory, "train_000000.bin"), text(train_tokens), vocab, encoding)
    write_shard(os.path.join(directory, "val_000000.bin"), text(val_tokens), vocab, encoding)
    if summary:
        with open(os.path.join(directory, "summary.json"), "w") as f:
            json.dump({"documents": {"train": 1, "val": 1}}, f)
    return directory


def read_safetensors(path):
    """(tensors by name as numpy arrays, metadata, header) with the format's checks."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    buf = data[8 + n:]
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1", "BF16": "<u2", "F16": "<f2"}
    out, spans = {}, []
    for name, t in header.items():
        b, e = t["data_offsets"]
        spans.append((b, e))
        arr = np.frombuffer(buf[b:e], dtype=dtypes[t["dtype"]])
        assert arr.size == int(np.prod(t["shape"], dtype=np.int64)), name
        out[name] = arr.reshape(t["shape"])
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        assert e0 <= b1, "overlapping tensors"
    return out, meta, header


FAILURES = []


def check(condition, what, result=None):
    """Prints one assertion as ok/FAIL and remembers a failure for finish(); `result` (a
    subprocess result) is shown when it failed."""
    print(("ok: " if condition else "FAIL: ") + what, flush=True)
    if not condition:
        FAILURES.append(what)
        if result is not None:
            print(f"  rc: {result.returncode}\n  stdout: {result.stdout[-3000:]}\n  stderr: {result.stderr[-3000:]}")


def finish():
    """Exits 1 naming the failed checks, or prints "all passed"."""
    if FAILURES:
        print(f"{len(FAILURES)} failure(s): {FAILURES}")
        sys.exit(1)
    print("all passed")


def log_records(run, kinds=("step",)):
    """RUN/log.jsonl's records of these types (None: every record), without their wall-clock
    seconds, so that two runs compare equal."""
    out = []
    with open(os.path.join(run, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if kinds is None or r["type"] in kinds:
                r.pop("seconds", None)
                out.append(r)
    return out
