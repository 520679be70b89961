"""flashgpt's FlashAttention kernels for PyTorch, with the flash-attn package's interface:

    flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_lse=False)
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)

q [batch, seqlen_q, heads_q, head_dim], k/v [batch, seqlen_k, heads_kv, head_dim] (heads_q a
multiple of heads_kv), bf16/fp16 on CUDA. Differentiable. Causal masks are aligned to the
bottom-right corner. Dropout draws its mask from Philox (include/flashgpt/philox.h) with a
seed taken from torch's CPU generator, so torch.manual_seed makes runs repeatable and the
CPU reference can rebuild the same mask.

CPU tensors take the CPU implementation (include/flashgpt/attention_cpu.h: tiled FlashAttention
in fp32, same Philox mask); other dtypes are computed in float32 and cast back. One forward and one
backward of the extension serve both devices: it validates the tensors, copies what the kernels
cannot read as it is, and chooses the implementation by the tensors' device (binding.cpp).

The extension, flashgpt_attn._C, is built ahead of time: `pip install --no-build-isolation .`
from the repository root (pyproject.toml, scikit-build-core and the project's CMake), or a CUDA
build of the repository where torch is importable, which leaves an importable package in
<build>/python. Nothing is compiled on import.
"""
import math

import torch

from . import philox

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "attention_reference"]

_ext = None


def _extension():
    global _ext
    if _ext is None:
        try:
            from . import _C
        except ImportError as e:
            raise ImportError(
                f"flashgpt_attn: the compiled extension flashgpt_attn._C is missing or does not load ({e}); "
                "install the package with `pip install --no-build-isolation .` from the flashgpt repository "
                "(needs nvcc and PyTorch), or put a CUDA build's <build>/python first on sys.path") from e
        _ext = _C
    return _ext


def _draw_seed():
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item()), 0


def attention_reference(q, k, v, causal=False, softmax_scale=None, dropout_p=0.0, seed=0, offset=0,
                        batch_index_base=0, upcast=True):
    """Exact attention by the definition, dense [b, s, h, d]; returns (out, lse). Used for the
    CPU path and by the tests. Fully masked rows give out 0 and lse +inf."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dtype = torch.float64 if upcast else q.dtype
    qf, kf, vf = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    if hkv != hq:
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s.float() if not upcast else s, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # a row that sees no key: +inf
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout_p > 0:
        masks = torch.stack([torch.stack([
            torch.from_numpy(philox.keep_mask(seed, offset, (batch_index_base + bi) * hq + h, sq, sk, dropout_p))
            for h in range(hq)]) for bi in range(b)]).to(q.device)
        p = p * masks.to(p.dtype) * philox.dropout_keep_scale(dropout_p)
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)
    return out, lse.float()


class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, deterministic):
        seed, offset = _draw_seed() if dropout_p > 0 else (0, 0)
        out, lse = _extension().forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, dropout_p, scale, causal, seed, offset, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _extension().backward(d_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_lse=False,
                    deterministic=False):
    """Attention over dense [batch, seqlen, heads, head_dim] tensors. Returns out, or
    (out, lse) with lse [batch, heads_q, seqlen_q] fp32 when return_lse."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _FlashAttnFunction.apply(q, k, v, None, None, q.shape[1], k.shape[1], float(dropout_p), float(scale),
                                        bool(causal), bool(deterministic))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, return_lse=False, deterministic=False):
    """Attention over packed [total_tokens, heads, head_dim] tensors; sequence b owns rows
    cu_seqlens[b] .. cu_seqlens[b + 1]. lse is [heads_q, total_q]."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    out, lse = _FlashAttnFunction.apply(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), float(dropout_p),
                                        float(scale), bool(causal), bool(deterministic))
    return (out, lse) if return_lse else out
