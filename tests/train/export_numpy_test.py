#!/usr/bin/env python3
"""`flashgpt export --format hf` without torch: the exported files' structure (GPT-2
names, shapes, Conv1D transposes, the vocabulary sliced to V, "format": "pt"), and a
GPT-2 forward written here in numpy from the exported tensors, compared with our CPU
model's logits and loss (train_logits_tool) on the same checkpoint.
Usage: export_numpy_test.py PATH/TO/flashgpt PATH/TO/train_logits_tool"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_fixtures import VOCAB, read_safetensors, write_dataset  # noqa: E402

FLASHGPT, TOOL = sys.argv[1], sys.argv[2]
FAILURES = []


def check(condition, what):
    print(("ok: " if condition else "FAIL: ") + what)
    if not condition:
        FAILURES.append(what)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gpt2_logits(t, cfg, ids):
    """GPT2LMHeadModel's forward (eval mode) in float64, from the exported tensors."""
    g = {k: v.astype(np.float64) for k, v in t.items()}
    T, C, H = len(ids), cfg["n_embd"], cfg["n_head"]
    hd, eps = C // H, cfg["layer_norm_epsilon"]
    x = g["transformer.wte.weight"][ids] + g["transformer.wpe.weight"][:T]
    mask = np.tril(np.ones((T, T), dtype=bool))
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, g[p + "ln_1.weight"], g[p + "ln_1.bias"], eps)
        qkv = h @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]  # Conv1D: x W + b, W (in, out)
        q, k, v = (qkv[:, j * C:(j + 1) * C].reshape(T, H, hd).transpose(1, 0, 2) for j in range(3))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.where(mask, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + a @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
        h = layer_norm(x, g[p + "ln_2.weight"], g[p + "ln_2.bias"], eps)
        h = gelu_new(h @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"])
        x = x + h @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"]
    x = layer_norm(x, g["transformer.ln_f.weight"], g["transformer.ln_f.bias"], eps)
    return x @ g["transformer.wte.weight"].T  # tied head


def main():
    tmp = tempfile.mkdtemp(prefix="flashgpt_export_")
    ds = write_dataset(os.path.join(tmp, "ds"))
    run = os.path.join(tmp, "run")
    r = subprocess.run([FLASHGPT, "train", "--preset", "tiny", "--data", ds, "--out", run, "--steps", "20",
                        "--batch", "4", "--context", "32", "--lr", "3e-3", "--threads", "1", "--quiet", "--no-plot"],
                       capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, "train a tiny model")
    if r.returncode != 0:
        print(r.stderr)
        sys.exit(1)
    r = subprocess.run([FLASHGPT, "export", "--format", "hf", run], capture_output=True, text=True, timeout=120)
    out = os.path.join(run, "hf")
    check(r.returncode == 0 and os.path.exists(os.path.join(out, "model.safetensors")), "export writes RUN/hf")

    cfg = json.load(open(os.path.join(out, "config.json")))
    ck, ck_meta, _ = read_safetensors(os.path.join(run, "checkpoint.safetensors"))
    model = json.loads(ck_meta["model"])
    L, C, F = model["n_layer"], model["d_model"], model["d_ff"]
    check(cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
          and cfg["vocab_size"] == VOCAB and cfg["n_embd"] == C and cfg["n_layer"] == L
          and cfg["n_head"] == model["n_head"] and cfg["n_inner"] == F and cfg["n_positions"] == model["context"]
          and cfg["activation_function"] == "gelu_new" and abs(cfg["layer_norm_epsilon"] - 1e-5) < 1e-12
          and cfg["tie_word_embeddings"] is True, f"config.json {cfg}")

    t, meta, header = read_safetensors(os.path.join(out, "model.safetensors"))
    check(meta == {"format": "pt"}, f"__metadata__ {meta} (transformers requires format pt)")
    expected = {"transformer.wte.weight": (VOCAB, C), "transformer.wpe.weight": (model["context"], C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(L):
        p = f"transformer.h.{i}."
        expected.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                         p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C),
                         p + "attn.c_proj.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                         p + "mlp.c_fc.weight": (C, F), p + "mlp.c_fc.bias": (F,), p + "mlp.c_proj.weight": (F, C),
                         p + "mlp.c_proj.bias": (C,)})
    check({k: tuple(v.shape) for k, v in t.items()} == expected, "GPT-2 tensor names and shapes, no lm_head (tied)")
    check(all(h["dtype"] == "F32" for h in header.values()), "all F32")
    spans = sorted(tuple(h["data_offsets"]) for h in header.values())
    check(spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])),
          "data packed contiguously (the safetensors library refuses holes)")
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    check(n % 8 == 0, "header padded to 8 bytes")

    # The transposes and slices, exactly.
    exact = np.array_equal(t["transformer.wte.weight"], ck["model.wte"][:VOCAB])
    exact &= not np.any(ck["model.wte"][VOCAB:])  # padding rows stay zero: dropping them loses nothing
    for i in range(L):
        p = f"transformer.h.{i}."
        exact &= np.array_equal(t[p + "attn.c_attn.weight"], ck["model.qkv_w"][i].T)
        exact &= np.array_equal(t[p + "attn.c_proj.weight"], ck["model.attn_proj_w"][i].T)
        exact &= np.array_equal(t[p + "mlp.c_fc.weight"], ck["model.fc_w"][i].T)
        exact &= np.array_equal(t[p + "mlp.c_proj.weight"], ck["model.fc_proj_w"][i].T)
        exact &= np.array_equal(t[p + "ln_2.bias"], ck["model.ln2_b"][i])
    check(bool(exact), "Conv1D weights are the checkpoint's (out, in) matrices transposed; wte sliced to V")

    # Our logits and loss against the numpy GPT-2 forward of the exported tensors.
    rng = np.random.default_rng(3)
    for T in (1, 7, 32):
        ids = rng.integers(0, VOCAB, size=T + 1).tolist()
        r = subprocess.run([TOOL, os.path.join(run, "checkpoint.safetensors"), ",".join(map(str, ids))],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            check(False, f"train_logits_tool: {r.stderr}")
            continue
        ours = json.loads(r.stdout)
        got = np.array(ours["logits"], dtype=np.float64).reshape(T, VOCAB)
        ref = gpt2_logits(t, cfg, ids[:T])
        err = np.abs(got - ref).max()
        check(err < 1e-4 * max(1.0, np.abs(ref).max()), f"T={T}: logits match numpy GPT-2 (max err {err:.2e})")
        z = ref - ref.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        loss = -logp[np.arange(T), ids[1:]].mean()
        check(abs(loss - ours["loss"]) < 1e-5 * max(1.0, loss), f"T={T}: loss {ours['loss']:.6f} vs numpy {loss:.6f}")
    if FAILURES:
        print(f"{len(FAILURES)} failure(s)")
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
