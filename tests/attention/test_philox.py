"""The numpy dropout stream of python/flashgpt_attn/philox.py against an independent
computation (plain Python integers, the four words laid out as little-endian bytes), and the
statistics of the 8-bit contract. Needs numpy only:

    python3 -m pytest tests/attention/test_philox.py"""
import pathlib
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python" / "flashgpt_attn"))
import philox  # noqa: E402


def _philox_int(c, k0, k1):
    c = list(c)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


def test_random123_known_answer():
    assert _philox_int([0, 0, 0, 0], 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    words = philox.philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_bytes_match_an_independent_computation():
    seed, offset, batch_head, sq, sk = 0x0123456789ABCDEF, 0x0000000500000007, 3, 5, 70
    got = philox.random_bytes(seed, offset, batch_head, sq, sk)
    for row in range(sq):
        for col in range(sk):
            words = _philox_int([col // 16, row, batch_head, offset & 0xFFFFFFFF], seed & 0xFFFFFFFF,
                                ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)
            assert got[row, col] == struct.pack("<4I", *words)[col % 16], (row, col)


@pytest.mark.parametrize("p,t", [(0.0, 0), (0.001, 0), (1 / 512, 1), (0.1, 26), (0.5, 128), (0.998, 255), (0.999, 256)])
def test_threshold_and_scale(p, t):
    assert philox.dropout_threshold(p) == t
    assert philox.dropout_keep_scale(p) == (0.0 if t == 256 else 256.0 / (256 - t))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_keep_rate_and_unbiased_expectation(p):
    t = philox.dropout_threshold(p)
    q = t / 256
    keep = np.concatenate([philox.keep_mask(99, 4, bh, 256, 512, p).ravel() for bh in range(4)])
    n = keep.size
    sigma = np.sqrt(q * (1 - q) / n)
    assert abs(keep.mean() - (1 - q)) < 6 * sigma
    dropped_one = keep * philox.dropout_keep_scale(p)  # dropout(1)
    assert abs(dropped_one.mean() - 1.0) < 6 * sigma * philox.dropout_keep_scale(p)


def test_everything_dropped_at_t_256():
    assert not philox.keep_mask(1, 2, 0, 8, 64, 0.999).any()
    assert philox.keep_mask(1, 2, 0, 8, 64, 0.0).all()
