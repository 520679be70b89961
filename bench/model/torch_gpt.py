#!/usr/bin/env python3
"""The flashgpt model in PyTorch, nanoGPT style (fused AdamW, SDPA, bf16 autocast), timed
eager and under torch.compile beside `flashgpt bench train` in the same run.

For each vocabulary it
  1. runs `flashgpt bench train --check-dir DIR` (a child process, argument vector), which
     validates and times our CUDA backend and writes its initial weights, one batch and its
     dropout-free loss on that batch;
  2. loads those weights into the PyTorch model and computes the same loss (eval mode, bf16
     autocast): the two must agree before anything of PyTorch's is timed;
  3. times PyTorch's training step (zero_grad, forward, backward, clip to norm 1, AdamW)
     eager, then compiled, on random batches, with peak memory;
and prints one table, ours / compiled last. The MFU counts 6N + 12 L T C FLOPs per token
(model.h's model_train_flops_per_token) over 989 TFLOP/s and over the bf16 matmul rate
measured on the same card.

Usage: python3 bench/model/torch_gpt.py --flashgpt build/flashgpt [--vocab 100277 50257]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRESET_SEED = dict(context=512, d_model=768, n_layer=12, n_head=12, d_ff=3072, dropout=0.1)


def padded_vocab(v):
    return (v + 127) // 128 * 128


class Block(nn.Module):
    def __init__(self, c, nh, ff, p):
        super().__init__()
        self.nh, self.p = nh, p
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, ff)
        self.mlp_proj = nn.Linear(ff, c)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.drop(self.c_proj(y))
        x = x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, context, d_model, n_layer, n_head, d_ff, dropout):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(padded_vocab(vocab), d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(d_model, n_head, d_ff, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, padded_vocab(vocab), bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))[..., : self.vocab]  # padding columns never predicted
        return F.cross_entropy(logits.reshape(-1, self.vocab).float(), targets.reshape(-1))

    @torch.no_grad()
    def load_flat(self, flat, cfg):
        """Copies model.h's flat fp32 parameter buffer (model_param_specs order) in."""
        vp, c, t, l, f = padded_vocab(cfg["vocab"]), cfg["d_model"], cfg["context"], cfg["n_layer"], cfg["d_ff"]
        shapes = [("wte", (vp, c)), ("wpe", (t, c)), ("ln1_w", (l, c)), ("ln1_b", (l, c)),
                  ("qkv_w", (l, 3 * c, c)), ("qkv_b", (l, 3 * c)), ("attn_proj_w", (l, c, c)),
                  ("attn_proj_b", (l, c)), ("ln2_w", (l, c)), ("ln2_b", (l, c)), ("fc_w", (l, f, c)),
                  ("fc_b", (l, f)), ("fc_proj_w", (l, c, f)), ("fc_proj_b", (l, c)), ("lnf_w", (c,)),
                  ("lnf_b", (c,))]
        p, at = {}, 0
        for name, shape in shapes:
            n = int(np.prod(shape))
            p[name] = torch.from_numpy(flat[at:at + n].reshape(shape).copy())
            at += n
        assert at == flat.size, f"parameter file has {flat.size} floats, the layout {at}"
        self.wte.weight.copy_(p["wte"])
        self.wpe.weight.copy_(p["wpe"])
        for i, b in enumerate(self.h):
            for mod, w, bias in ((b.ln_1, "ln1_w", "ln1_b"), (b.c_attn, "qkv_w", "qkv_b"),
                                 (b.c_proj, "attn_proj_w", "attn_proj_b"), (b.ln_2, "ln2_w", "ln2_b"),
                                 (b.c_fc, "fc_w", "fc_b"), (b.mlp_proj, "fc_proj_w", "fc_proj_b")):
                mod.weight.copy_(p[w][i])
                mod.bias.copy_(p[bias][i])
        self.ln_f.weight.copy_(p["lnf_w"])
        self.ln_f.bias.copy_(p["lnf_b"])


def flops_per_token(cfg, T):
    """model.h's model_train_flops_per_token: 6 N (no wpe, no padding rows) + 12 L T C."""
    c, l, f, v = cfg["d_model"], cfg["n_layer"], cfg["d_ff"], cfg["vocab"]
    per_layer = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (f * c + f) + (c * f + c)
    n = v * c + l * per_layer + 2 * c
    return 6.0 * n + 12.0 * l * T * c


def matmul_peak_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def build(cfg, flat):
    model = GPT(cfg["vocab"], cfg["context"], cfg["d_model"], cfg["n_layer"], cfg["n_head"], cfg["d_ff"],
                cfg["dropout"])
    model.load_flat(flat, cfg)
    return model.cuda()


def validate(cfg, flat, windows, B, T, ours):
    model = build(cfg, flat).eval()
    w = torch.from_numpy(windows.astype(np.int64).reshape(B, T + 1)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(w[:, :T], w[:, 1:]).item()
    del model
    torch.cuda.empty_cache()
    return loss, abs(loss - ours) <= max(0.01, 1e-3 * ours)


def time_torch(cfg, flat, B, T, compiled, warmup, steps):
    torch.manual_seed(0)
    model = build(cfg, flat).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator(device="cuda").manual_seed(1)

    def step():
        w = torch.randint(0, cfg["vocab"], (B, T + 1), device="cuda", generator=gen)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(w[:, :T], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    reserved = torch.cuda.max_memory_reserved() / 2 ** 30
    last = losses[-1].item()
    del model, opt, fwd
    torch.cuda.empty_cache()
    return dict(tokens_per_s=steps * B * T / seconds, step_ms=1e3 * seconds / steps, peak_gib=peak,
                reserved_gib=reserved, last_loss=last, warmup_s=warm_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flashgpt", required=True, help="path of the flashgpt executable")
    ap.add_argument("--vocab", type=int, nargs="+", default=[100277, 50257])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    B, T = args.batch, args.context
    torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name()
    peak = matmul_peak_tflops()
    print(f"card: {card}; bf16 8192^3 matmul: {peak:.0f} TFLOP/s; torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.vocab:
            cmd = [args.flashgpt, "bench", "train", "--vocab", str(v), "--batch", str(B), "--context", str(T),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--check-dir", tmp]
            print("$ " + " ".join(cmd), flush=True)
            run = subprocess.run(cmd, capture_output=True, text=True)
            print(run.stdout, end="")
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                sys.exit(f"flashgpt bench train failed for V={v}")
            ours = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{")][-1]
            check = json.load(open(os.path.join(tmp, f"check_v{v}.json")))
            cfg = dict(PRESET_SEED, vocab=v)
            flat = np.fromfile(os.path.join(tmp, f"params_v{v}.f32"), dtype=np.float32)
            windows = np.fromfile(os.path.join(tmp, f"windows_v{v}.u32"), dtype=np.uint32)
            torch_loss, ok = validate(cfg, flat, windows, check["batch"], check["T"], check["loss"])
            print(f"validate V={v}: flashgpt loss {check['loss']:.5f}, torch loss {torch_loss:.5f} "
                  f"({'agree' if ok else 'DISAGREE'})", flush=True)
            fpt = flops_per_token(cfg, T)
            if abs(fpt - ours["flops_per_token"]) > 1e-6 * fpt:
                print(f"note: FLOPs per token here {fpt:.4g}, flashgpt's {ours['flops_per_token']:.4g}; using flashgpt's")
                fpt = ours["flops_per_token"]
            rows.append(dict(vocab=v, impl="flashgpt", valid=ok, tokens_per_s=ours["tokens_per_s"],
                             step_ms=ours["step_ms"], peak_gib=ours["peak_gib"], last_loss=ours["last_loss"]))
            for compiled in ([False, True] if not args.skip_eager else [True]):
                r = time_torch(cfg, flat, B, T, compiled, args.warmup, args.steps)
                rows.append(dict(vocab=v, impl="torch.compile" if compiled else "torch eager", valid=ok, **r))
                print(f"  {rows[-1]['impl']}: {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gib']:.1f} GiB "
                      f"(warmup {r['warmup_s']:.0f} s)", flush=True)
            for r in rows:
                if r["vocab"] == v:
                    r["mfu_989"] = r["tokens_per_s"] * fpt / 989e12
                    r["mfu_measured"] = r["tokens_per_s"] * fpt / (peak * 1e12)
    print(f"\nseed preset, batch {B} x {T}, bf16, dropout 0.1, on {card} (matmul peak measured {peak:.0f} TFLOP/s)")
    print(f"{'vocab':>7} {'impl':<14} {'tokens/s':>10} {'step ms':>8} {'MFU/989':>8} {'MFU/meas':>8} "
          f"{'peak GiB':>8} {'last loss':>9} {'ours/this':>9}")
    for r in rows:
        ours = next(x for x in rows if x["vocab"] == r["vocab"] and x["impl"] == "flashgpt")
        ratio = ours["tokens_per_s"] / r["tokens_per_s"]
        flag = "" if r["valid"] else "  (loss check FAILED)"
        print(f"{r['vocab']:>7} {r['impl']:<14} {r['tokens_per_s']:>10.0f} {r['step_ms']:>8.1f} "
              f"{100 * r['mfu_989']:>7.1f}% {100 * r['mfu_measured']:>7.1f}% {r['peak_gib']:>8.1f} "
              f"{r['last_loss']:>9.4f} {ratio:>8.2f}x{flag}")
    if args.out:
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as fh:
            json.dump(dict(card=card, matmul_peak_tflops=peak, batch=B, context=T, rows=rows), fh, indent=1)
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
