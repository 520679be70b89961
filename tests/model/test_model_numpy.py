"""The tiny model's loss recomputed in numpy (float64, our own forward written from
model.h) from the checkpoint that checkpoint_save wrote, against the C++ CPU backend:
logits and loss without dropout, and the loss with dropout, whose masks numpy rebuilds
from the Philox stream (python/flashgpt_attn/philox.py) at every site model.h names.
Needs numpy and pytest only:

    MODEL_NUMPY_DUMP=build/tests/model/model_numpy_dump python3 -m pytest tests/model/test_model_numpy.py
"""
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "python" / "flashgpt_attn"))
import philox  # noqa: E402

_DTYPES = {"F32": np.float32, "I32": np.int32, "F64": np.float64, "I64": np.int64, "U32": np.uint32}


def read_safetensors(path):
    """{name: array}, metadata: a reader of the format written from its description."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors, header.get("__metadata__", {})


def layernorm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w + b


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def site_factor(seed, step, site, rows, cols, p):
    """(rows, cols): 0 or 256 / (256 - t) for element (n, c) of dropout site `site`."""
    keep = philox.random_bytes(seed, step, site, rows, cols) >= philox.dropout_threshold(p)
    return keep * philox.dropout_keep_scale(p)


def forward(P, cfg, inputs, dropout=None):
    """Logits (B, T, V) in float64; dropout: None or (seed, step)."""
    B, T = inputs.shape
    C, L, NH, V = cfg["d_model"], cfg["n_layer"], cfg["n_head"], cfg["vocab_size"]
    HD, p = C // NH, cfg["dropout"]
    f = {k: v.astype(np.float64) for k, v in P.items()}

    def drop(x, site):
        if dropout is None or philox.dropout_threshold(p) == 0:
            return x
        return x * site_factor(dropout[0], dropout[1], site, B * T, C, p).reshape(B, T, C)

    x = drop(f["wte"][inputs] + f["wpe"][:T], 0)  # (B, T, C)
    causal = np.tril(np.ones((T, T), dtype=bool))
    for l in range(L):
        h = layernorm(x, f["ln1_w"][l], f["ln1_b"][l])
        qkv = h @ f["qkv_w"][l].T + f["qkv_b"][l]  # (B, T, 3C): [q | k | v]
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, NH, HD).transpose(0, 2, 1, 3) for i in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HD)  # (B, NH, T, T)
        s = np.where(causal, s, -np.inf)
        att = np.exp(s - s.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        if dropout is not None and philox.dropout_threshold(p) > 0:
            seed, offset = dropout[0] ^ 0x5BD1E995, dropout[1] * L + l
            for b in range(B):
                for hh in range(NH):
                    keep = philox.keep_mask(seed, offset, b * NH + hh, T, T, p)
                    att[b, hh] *= keep * philox.dropout_keep_scale(p)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + drop(a @ f["attn_proj_w"][l].T + f["attn_proj_b"][l], 1 + 2 * l)
        h = gelu(layernorm(x, f["ln2_w"][l], f["ln2_b"][l]) @ f["fc_w"][l].T + f["fc_b"][l])
        x = x + drop(h @ f["fc_proj_w"][l].T + f["fc_proj_b"][l], 2 + 2 * l)
    return layernorm(x, f["lnf_w"], f["lnf_b"]) @ f["wte"][:V].T


def mean_cross_entropy(logits, targets):
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return float((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]).mean())


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    tool = os.environ.get("MODEL_NUMPY_DUMP")
    if not tool:
        pytest.fail("MODEL_NUMPY_DUMP must name the model_numpy_dump executable (ctest sets it)")
    out = tmp_path_factory.mktemp("model_numpy")
    subprocess.run([tool, str(out)], check=True)
    ckpt, ckpt_meta = read_safetensors(out / "checkpoint.safetensors")
    batch, batch_meta = read_safetensors(out / "batch.safetensors")
    cfg = json.loads(ckpt_meta["model"])
    params = {name[len("model."):]: t for name, t in ckpt.items() if name.startswith("model.")}
    return cfg, params, batch, batch_meta


def test_checkpoint_holds_every_parameter(dumped):
    cfg, params, _, _ = dumped
    C, L, F, T, Vp = cfg["d_model"], cfg["n_layer"], cfg["d_ff"], cfg["context"], cfg["padded_vocab_size"]
    expected = {"wte": (Vp, C), "wpe": (T, C), "ln1_w": (L, C), "ln1_b": (L, C), "qkv_w": (L, 3 * C, C),
                "qkv_b": (L, 3 * C), "attn_proj_w": (L, C, C), "attn_proj_b": (L, C), "ln2_w": (L, C),
                "ln2_b": (L, C), "fc_w": (L, F, C), "fc_b": (L, F), "fc_proj_w": (L, C, F), "fc_proj_b": (L, C),
                "lnf_w": (C,), "lnf_b": (C,)}
    assert {k: tuple(v.shape) for k, v in params.items()} == expected
    assert not params["wte"][cfg["vocab_size"]:].any(), "wte's padding rows must be zero"


def test_logits_and_loss_without_dropout(dumped):
    cfg, params, batch, meta = dumped
    windows = batch["windows"].astype(np.int64)
    logits = forward(params, cfg, windows[:, :-1])
    scale = np.abs(logits).max()
    assert np.abs(logits - batch["logits"]).max() <= 1e-5 * scale
    loss = mean_cross_entropy(logits, windows[:, 1:])
    assert loss == pytest.approx(float(meta["loss"]), rel=1e-6)
    assert 4.0 < loss < 7.5  # near ln 300 = 5.7 for a freshly initialised model


def test_loss_with_dropout(dumped):
    cfg, params, batch, meta = dumped
    assert cfg["dropout"] > 0
    windows = batch["windows"].astype(np.int64)
    seed, step = int(meta["dropout_seed"]), int(meta["dropout_step"])
    loss = mean_cross_entropy(forward(params, cfg, windows[:, :-1], (seed, step)), windows[:, 1:])
    assert loss == pytest.approx(float(meta["loss_dropout"]), rel=1e-6)
    # Another step's masks give another loss: the check above did depend on the masks.
    other = mean_cross_entropy(forward(params, cfg, windows[:, :-1], (seed, step + 1)), windows[:, 1:])
    assert abs(other - float(meta["loss_dropout"])) > 1e-4
