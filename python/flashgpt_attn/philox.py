"""Philox-4x32-10 dropout masks in numpy, word for word the stream of include/flashgpt/philox.h:
element (row, col) of batch_head takes word col % 4 of
philox4x32_10({col / 4, row, batch_head, offset_lo}, seed_lo, seed_hi ^ offset_hi)."""
import numpy as np

_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK for c in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0) & _MASK, np.uint64(k1) & _MASK
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK)
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK
    return c0, c1, c2, c3


def dropout_threshold(p):
    scaled = float(np.float32(p)) * 4294967296.0
    return 0xFFFFFFFF if scaled >= 4294967295.0 else int(scaled)


def keep_mask(seed, offset, batch_head, seqlen_q, seqlen_k, p):
    """Boolean [seqlen_q, seqlen_k]: True where the element is kept."""
    rows = np.arange(seqlen_q, dtype=np.uint64)[:, None]
    cols = np.arange(seqlen_k, dtype=np.uint64)[None, :]
    groups = cols >> np.uint64(2)
    shape = (seqlen_q, seqlen_k)
    words = philox4x32_10(np.broadcast_to(groups, shape), np.broadcast_to(rows, shape),
                          np.full(shape, batch_head, dtype=np.uint64), np.full(shape, offset & 0xFFFFFFFF, dtype=np.uint64),
                          seed & 0xFFFFFFFF, ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)
    lane = (cols & np.uint64(3)).astype(np.int64)
    word = np.choose(np.broadcast_to(lane, shape), words)
    return word >= np.uint64(dropout_threshold(p))
