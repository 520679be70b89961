#!/usr/bin/env python3
"""Forward kernel on structured inputs, for when the GPU tests fail (one command on the GPU
machine after a CUDA build; pick the kernel with FLASHGPT_ATTN_FWD_KERNEL):

    FLASHGPT_ATTN_FWD_KERNEL=wgmma python3 bench/attention_gpu/diag_fwd.py

A: K = 0 -> P uniform -> O = mean of the visible V rows: isolates the P V GEMM.
B: V = identity (seqlen_k = d) -> O = P: isolates the S GEMM and the softmax.
C: random. Prints the max error vs fp64 and, past 2e-2, a map of which 16-row x 8-column
blocks of O are wrong (a layout or descriptor error shows as a pattern)."""
import os
import pathlib
import sys

import torch

# The binding as a CUDA build leaves it (<build>/python), else the installed package (pip install .).
sys.path.insert(0, os.path.join(os.environ.get("FLASHGPT_BUILD_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "build")), "python"))
from flashgpt_attn import flash_attn_func
torch.manual_seed(0)


def ref(q, k, v, causal):
    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / q.shape[-1] ** 0.5
    sq, sk = s.shape[-2:]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0) @ vf).transpose(1, 2)


def show(name, out, r):
    e = (out.double() - r).abs()[0, :, 0]  # [sq, d]
    rel = (out.double() - r).norm() / r.norm().clamp_min(1e-30)
    print(f"{name}: max err {e.max().item():.3e} rel {rel.item():.2e} nan {torch.isnan(out).sum().item()}")
    if e.max() > 2e-2:
        sq, d = e.shape
        m = e[: sq // 16 * 16].reshape(sq // 16, 16, d // 8, 8).amax(dim=(1, 3))
        for row in m[:16]:
            print("   " + "".join("#" if x > 2e-2 else "." for x in row.tolist()))
        print("   out[0,:4,0,:8]", out[0, :4, 0, :8].float().tolist())
        print("   ref[0,:4,0,:8]", r[0, :4, 0, :8].float().tolist())


for d in (64, 128):
    for sq, sk, causal in ((128, 128, False), (256, 256, False), (128, 256, False), (256, 256, True), (100, 77, False)):
        q = torch.randn(1, sq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, sk, 1, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, sk, 1, d, device="cuda", dtype=torch.bfloat16)
        tag = f"d{d} sq{sq} sk{sk} c{int(causal)}"
        z = torch.zeros_like(k)
        show(f"A pv-only {tag}", flash_attn_func(q, z, v, causal=causal), ref(q, z, v, causal))
        show(f"C random  {tag}", flash_attn_func(q, k, v, causal=causal), ref(q, k, v, causal))
    q = torch.randn(1, 128, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, d, 1, d, device="cuda", dtype=torch.bfloat16)
    eye = torch.eye(d, device="cuda", dtype=torch.bfloat16)[None, :, None, :]
    show(f"B s-only d{d} sk{d}", flash_attn_func(q, k, eye), ref(q, k, eye, False))
torch.cuda.synchronize()
