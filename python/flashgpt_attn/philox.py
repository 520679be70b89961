"""Philox-4x32-10 dropout masks in numpy, byte for byte the stream of include/flashgpt/philox.h:
element (row, col) of batch_head takes byte col % 16 of
philox4x32_10({col / 16, row, batch_head, offset_lo}, seed_lo, seed_hi ^ offset_hi),
byte k being (word[k / 4] >> (8 * (k % 4))) & 0xFF of the words x, y, z, w. It is dropped when
that byte is below t = round(256 p) (half up); kept elements are scaled by 256 / (256 - t)
(0 when t == 256, where nothing is kept)."""
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
    """t = round(256 p), half up, from p as the float32 the kernels receive; in [0, 256]."""
    scaled = float(np.float32(p)) * 256.0 + 0.5
    return 0 if scaled <= 0.0 else 256 if scaled >= 256.0 else int(scaled)


def dropout_keep_scale(p):
    """The multiplier of a kept element: 256 / (256 - t); 1 for t == 0, 0 for t == 256."""
    t = dropout_threshold(p)
    return 0.0 if t >= 256 else 256.0 / (256 - t)


def random_bytes(seed, offset, batch_head, seqlen_q, seqlen_k):
    """uint8 [seqlen_q, seqlen_k]: the random byte of every element."""
    rows = np.arange(seqlen_q, dtype=np.uint64)[:, None]
    cols = np.arange(seqlen_k, dtype=np.uint64)[None, :]
    shape = (seqlen_q, seqlen_k)
    words = philox4x32_10(np.broadcast_to(cols >> np.uint64(4), shape), np.broadcast_to(rows, shape),
                          np.full(shape, batch_head, dtype=np.uint64), np.full(shape, offset & 0xFFFFFFFF, dtype=np.uint64),
                          seed & 0xFFFFFFFF, ((seed >> 32) ^ (offset >> 32)) & 0xFFFFFFFF)
    k = (cols & np.uint64(15)).astype(np.int64)
    word = np.choose(np.broadcast_to(k >> 2, shape), words)
    return ((word >> (np.uint64(8) * np.broadcast_to(k & 3, shape).astype(np.uint64))) & np.uint64(0xFF)).astype(np.uint8)


def keep_mask(seed, offset, batch_head, seqlen_q, seqlen_k, p):
    """Boolean [seqlen_q, seqlen_k]: True where the element is kept."""
    return random_bytes(seed, offset, batch_head, seqlen_q, seqlen_k) >= dropout_threshold(p)
