#!/usr/bin/env python3
"""The PyTorch baseline of `flashgpt bench generate --device cuda`: the seed model (GPT-2
style, C 768, L 12, NH 12, F 3072, T 512, cl100k V 100277, tied head) in bf16 with random
weights, greedy decoding over a static KV cache (B, NH, T, HD) per layer written in place
with index_copy_, attention over the whole cache with a position mask (as a static cache
does), eager and torch.compile(mode="reduce-overhead") (CUDA graphs).

Runs beside our binary in the same process tree on the same card, and prints a Markdown
table with the ratios:
  python3 torch_static_kv.py --flashgpt PATH/flashgpt [--batches 1,64] [--prompt 128] [--new 256] [--no-compile]
"""
import argparse
import json
import subprocess
import time

import torch
import torch.nn.functional as F

C, L, NH, FF, T, V = 768, 12, 12, 3072, 512, 100277
HD = C // NH


def make_weights(device):
    g = torch.Generator(device="cpu").manual_seed(1)
    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=torch.bfloat16)
    layers = []
    for _ in range(L):
        layers.append(dict(ln1_w=torch.ones(C, device=device, dtype=torch.bfloat16), ln1_b=w(C),
                           qkv_w=w(3 * C, C), qkv_b=w(3 * C), proj_w=w(C, C), proj_b=w(C),
                           ln2_w=torch.ones(C, device=device, dtype=torch.bfloat16), ln2_b=w(C),
                           fc_w=w(FF, C), fc_b=w(FF), fcp_w=w(C, FF), fcp_b=w(C)))
    return dict(wte=w(V, C), wpe=w(T, C), layers=layers,
                lnf_w=torch.ones(C, device=device, dtype=torch.bfloat16), lnf_b=w(C))


def forward(W, kc, vc, tokens, pos):
    """tokens (B, n), pos (n) positions of these tokens (same for every row); writes the
    caches at pos and attends to cache positions <= each query's position."""
    B, n = tokens.shape
    x = W["wte"][tokens] + W["wpe"][pos]
    key_pos = torch.arange(T, device=tokens.device)
    mask = key_pos[None, :] <= pos[:, None]  # (n, T)
    for l, p in enumerate(W["layers"]):
        h = F.layer_norm(x, (C,), p["ln1_w"], p["ln1_b"])
        qkv = F.linear(h, p["qkv_w"], p["qkv_b"]).view(B, n, 3, NH, HD)
        q, k, v = qkv.unbind(2)
        kc[l].index_copy_(2, pos, k.transpose(1, 2))
        vc[l].index_copy_(2, pos, v.transpose(1, 2))
        a = F.scaled_dot_product_attention(q.transpose(1, 2), kc[l], vc[l], attn_mask=mask)
        x = x + F.linear(a.transpose(1, 2).reshape(B, n, C), p["proj_w"], p["proj_b"])
        h = F.layer_norm(x, (C,), p["ln2_w"], p["ln2_b"])
        x = x + F.linear(F.gelu(F.linear(h, p["fc_w"], p["fc_b"]), approximate="tanh"), p["fcp_w"], p["fcp_b"])
    h = F.layer_norm(x[:, -1], (C,), W["lnf_w"], W["lnf_b"])
    return torch.argmax(F.linear(h, W["wte"]), dim=-1)


def bench(W, B, prompt, new, compiled):
    dev = "cuda"
    kc = [torch.zeros(B, NH, T, HD, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    vc = [torch.zeros_like(t) for t in kc]
    if compiled:
        # The caches are written in place every step. Without a fixed address Inductor skips
        # CUDA graphs ("mutated inputs"); a static address lets the graph write them as they are
        # (what transformers' StaticCache does). The weights are plain tensors, not parameters:
        # marked static too, so that a replay does not first copy them into the graph's inputs.
        weights = [W["wte"], W["wpe"], W["lnf_w"], W["lnf_b"]] + [t for p in W["layers"] for t in p.values()]
        for t in kc + vc + weights:
            torch._dynamo.mark_static_address(t)
    step = torch.compile(forward, mode="reduce-overhead", fullgraph=True) if compiled else forward
    tokens = torch.randint(0, V, (B, prompt), device=dev)
    with torch.no_grad():
        nxt = forward(W, kc, vc, tokens, torch.arange(prompt, device=dev))  # prefill (eager)
        best = float("inf")
        pos_buf = torch.zeros(1, dtype=torch.long, device=dev)
        for rep in range(3 if compiled else 2):  # the first (compile, capture) is a warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tok = nxt
            for s in range(new):
                pos_buf.fill_(prompt + s)
                tok = step(W, kc, vc, tok.view(B, 1), pos_buf).clone()
            tok.cpu()  # the host sees the tokens, as ours does every step
            torch.cuda.synchronize()
            if rep > 0:
                best = min(best, time.perf_counter() - t0)
    return B * new / best


def prefill_ms(W, n, compiled):
    dev = "cuda"
    kc = [torch.zeros(1, NH, T, HD, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    vc = [torch.zeros_like(t) for t in kc]
    fn = torch.compile(forward, fullgraph=True) if compiled else forward
    tokens = torch.randint(0, V, (1, n), device=dev)
    pos = torch.arange(n, device=dev)
    best = float("inf")
    with torch.no_grad():
        for rep in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(W, kc, vc, tokens, pos).cpu()
            if rep >= 2:
                best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def ours(flashgpt, B, prompt, new, prefill):
    args = [flashgpt, "bench", "generate", "--device", "cuda", "--preset", "seed", "--batch", str(B),
            "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--prefill-tokens", str(prefill)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    print(out.stdout, end="", flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flashgpt", required=True)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--out", default="")
    ap.add_argument("--ours", default="", help="folder of bench_b{B}.log from flashgpt bench generate (else run it)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (the torch.compile columns stay NaN)")
    a = ap.parse_args()
    print("card:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    W = make_weights("cuda")
    rows = []
    for B in [int(b) for b in a.batches.split(",")]:  # ours and eager first, compiled after
        if a.ours:
            with open(f"{a.ours}/bench_b{B}.log") as f:
                r = json.loads([line for line in f if line.startswith("{")][-1])
        else:
            r = ours(a.flashgpt, B, a.prompt, a.new, a.prefill if B == 1 else 0)
        eager = bench(W, B, a.prompt, a.new, False)
        rows.append(dict(batch=B, ours=r["decode_tokens_per_s"], bound=r["bound_tokens_per_s"], eager=eager,
                         compiled=float("nan"), bw=r["copy_bandwidth_gbs"], prefill_ours=r["prefill_long_ms"]))
        print(f"batch {B}: ours {r['decode_tokens_per_s']:.0f} tok/s, bound {r['bound_tokens_per_s']:.0f}, "
              f"eager {eager:.0f}", flush=True)
    pe = prefill_ms(W, a.prefill, False)
    print(f"prefill {a.prefill}: eager {pe:.2f} ms", flush=True)
    for r in rows if not a.no_compile else []:
        try:
            r["compiled"] = bench(W, r["batch"], a.prompt, a.new, True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print("torch.compile failed:", repr(e)[:300], flush=True)
        print(f"batch {r['batch']}: torch.compile {r['compiled']:.0f} tok/s", flush=True)
    pc = float("nan")
    try:
        if not a.no_compile:
            pc = prefill_ms(W, a.prefill, True)
    except Exception as e:  # noqa: BLE001
        print("torch.compile prefill failed:", repr(e)[:300], flush=True)
    print(f"\nseed config, prompt {a.prompt} then {a.new} greedy steps; copy bandwidth {rows[0]['bw']:.0f} GB/s\n")
    print("| batch | ours tokens/s | bound tokens/s | ours / bound | torch eager | torch.compile (CUDA graphs) "
          "| ours / eager | ours / compiled |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['ours']:.0f} | {r['bound']:.0f} | {100 * r['ours'] / r['bound']:.1f}% | "
              f"{r['eager']:.0f} | {r['compiled']:.0f} | {r['ours'] / r['eager']:.2f} | {r['ours'] / r['compiled']:.2f} |")
    p1 = rows[0]["prefill_ours"]
    print(f"\n| prefill {a.prefill} tokens, batch 1 | ours | torch eager | torch.compile |\n| --- | --- | --- | --- |\n"
          f"| ms | {p1:.2f} | {pe:.2f} | {pc:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(rows=rows, prefill_ms=dict(ours=p1, eager=pe, compiled=pc)), f, indent=1)


if __name__ == "__main__":
    main()
