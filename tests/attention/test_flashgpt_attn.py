"""pytest for the PyTorch binding, on CPU and CUDA tensors through the one forward/backward of the
extension: `ctest -L gpu` runs it (through run_binding_test.py) against a build's <build>/python;
after `pip install .`:

    python3 -m pytest tests/attention/test_flashgpt_attn.py

The CUDA cases skip where there is no CUDA device or the extension was built without nvcc; the
CPU cases run wherever the extension does. FlashAttention's criterion: against the exact result
on fp64-upcast inputs, our error must be at most 2x the error of PyTorch's own attention in the
same precision on the same device (plus a rounding floor), for O and for dQ, dK, dV. Dropout is
checked with the mask rebuilt from the same seed by the numpy Philox (identical to
include/flashgpt/philox.h and the CPU reference)."""
import pytest
import torch

import flashgpt_attn
from flashgpt_attn import attention_reference, flash_attn_func, flash_attn_varlen_func

BUILT_WITH_CUDA = bool(flashgpt_attn._extension().built_with_cuda)
HAS_CUDA = BUILT_WITH_CUDA and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a flashgpt_attn built with CUDA")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=needs_cuda)]
# The dtype each device's implementation computes in: the CPU's float32, the GPU kernels' bf16.
NATIVE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _seed_used():
    """The seed flash_attn_func will draw next from torch's CPU generator."""
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    torch.set_rng_state(state)
    return seed


def _check(name, ours, ref, pt):
    """max|ours - ref| <= 2 max|pt - ref| + floor, FlashAttention's test criterion."""
    floor = 2 * (ref + 0.3 - 0.3 - ref).abs().max().item() + 1e-5
    err, pt_err = (ours.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * pt_err + floor, f"{name}: error {err:.3e} > 2 x PyTorch's {pt_err:.3e} (+{floor:.1e})"


def _run(device, b, sq, sk, hq, hkv, d, causal, dropout, dtype=None, backward=True):
    dtype = dtype or NATIVE[device]
    torch.manual_seed(sq * 7 + sk + d + hq)
    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, hkv, d, device=device, dtype=dtype, requires_grad=True)
    seed = _seed_used()
    out, lse = flash_attn_func(q, k, v, dropout_p=dropout, causal=causal, return_lse=True)
    assert out.device == q.device and out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse, leaves = _ref64(q, k, v, causal, dropout, seed)
    pt, _ = attention_reference(q, k, v, causal, None, dropout, seed, 0, upcast=False)
    _check("O", out, ref.detach(), pt)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "LSE must be +inf exactly on rows that see no key"
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-3, rtol=1e-3)
    if not backward:
        return
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, leaves, g.double())
    pq, pk, pv = torch.autograd.grad(pt, (q, k, v), g)
    for name, ours, r, p in (("dQ", dq, rq, pq), ("dK", dk, rk, pk), ("dV", dv, rv, pv)):
        assert ours.dtype == dtype
        _check(name, ours, r, p)


def _ref64(q, k, v, causal, dropout, seed):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, causal, None, dropout, seed, 0, upcast=True)
    return out, lse, leaves


CASES = [
    # b, sq, sk, hq, hkv, d, causal, dropout
    (2, 1, 1, 2, 2, 64, False, 0.0),
    (2, 17, 17, 3, 3, 64, True, 0.0),
    (1, 17, 17, 2, 2, 128, False, 0.0),
    (1, 1000, 1000, 2, 2, 64, True, 0.0),
    (1, 1000, 1000, 2, 2, 128, False, 0.0),
    (1, 113, 203, 2, 2, 128, True, 0.0),
    (1, 203, 113, 2, 2, 64, True, 0.0),
    (2, 300, 300, 8, 2, 64, True, 0.0),
    (1, 257, 257, 4, 1, 128, False, 0.0),
    (2, 200, 200, 2, 2, 64, False, 0.17),
    (1, 150, 301, 4, 2, 128, True, 0.1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}-{}_d{}_{}_p{}".format(*c))
def test_against_fp64_and_pytorch(case, device):
    _run(device, *case)


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_seqlen_4097(d):
    _run("cuda", 1, 4097, 4097, 2, 2, d, True, 0.0)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cpu", torch.float16),
                                           pytest.param("cuda", torch.float16, marks=needs_cuda)])
def test_other_dtypes(device, dtype):
    """fp16 on the GPU kernels; bf16 and fp16 CPU tensors computed in float32 and cast back."""
    _run(device, 1, 333, 333, 2, 2, 64, True, 0.0, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_empty_sequences(device):
    torch.manual_seed(0)
    lens_q, lens_k = [5, 0, 130, 1, 64], [7, 3, 130, 0, 200]
    hq, hkv, d = 4, 2, 64
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), hq, d, device=device, dtype=NATIVE[device], requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, device=device, dtype=NATIVE[device], requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, device=device, dtype=NATIVE[device], requires_grad=True)
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, return_lse=True)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for bi in range(len(lens_q)):
        qs, ks = slice(cq[bi], cq[bi + 1]), slice(ck[bi], ck[bi + 1])
        if cq[bi + 1] == cq[bi]:
            continue
        qb, kb, vb = (t.detach()[None, s].double().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        ref, ref_lse = attention_reference(qb, kb, vb, causal=True)
        torch.testing.assert_close(out[qs].double(), ref[0], atol=2e-2, rtol=2e-2)
        rq, rk, rv = torch.autograd.grad(ref, (qb, kb, vb), g[None, qs].double())
        torch.testing.assert_close(dq[qs].double(), rq[0], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(dk[ks].double(), rk[0], atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(dv[ks].double(), rv[0], atol=3e-2, rtol=3e-2)
        assert torch.isinf(lse[:, qs]).tolist() == torch.isinf(ref_lse[0]).tolist()
    empty_k = slice(ck[3], ck[4])  # sequence 3 has no keys: its query row gets O = 0, LSE = +inf
    assert torch.all(out[cq[3]:cq[4]] == 0) and torch.all(torch.isinf(lse[:, cq[3]:cq[4]]))
    assert empty_k.start == empty_k.stop


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat_is_bitwise(device):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 1024, 8, 128, device=device, dtype=NATIVE[device], requires_grad=True)
               for _ in range(3))
    g = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_give_the_contiguous_result(device):
    """A [b, h, s, d] tensor transposed to [b, s, h, d] is read in place; one with a strided
    head_dim is copied first. Either way the result is bit for bit the contiguous one's."""
    torch.manual_seed(3)
    dtype = NATIVE[device]
    base = torch.randn(2, 4, 77, 64, device=device, dtype=dtype)  # [b, h, s, d]
    wide = torch.randn(2, 77, 2, 128, device=device, dtype=dtype)[..., ::2]  # head_dim stride 2
    g = torch.randn(2, 77, 4, 64, device=device, dtype=dtype)
    results = []
    for q, k, v in ((base.transpose(1, 2), wide, wide), (base.transpose(1, 2).contiguous(), wide.contiguous(),
                                                         wide.contiguous())):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = flash_attn_func(*leaves, causal=True, deterministic=True)
        results.append([out, *torch.autograd.grad(out, leaves, g)])
    assert not base.transpose(1, 2).is_contiguous() and wide.stride(-1) == 2
    for name, a, b in zip(("O", "dQ", "dK", "dV"), *results):
        assert torch.equal(a, b), name


@needs_cuda
def test_cpu_and_cuda_agree_on_one_seed():
    """CPU tensors run the C++ CPU implementation, CUDA tensors the kernels; with the same seed
    the dropout mask, and so the output and gradients, agree up to bf16 rounding."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 65, 4, 64) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    g = torch.randn(1, 65, 4, 64)
    outs, grads = [], []
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)  # the same dropout seed for both
        out = flash_attn_func(*leaves, dropout_p=0.2, causal=True)
        assert out.device.type == device and out.dtype == dtype
        outs.append(out.float().cpu())
        grads.append([t.float().cpu() for t in torch.autograd.grad(out, leaves, g.to(device, dtype))])
    ref, _ = attention_reference(q, k, v, causal=True, dropout_p=0.2, seed=_seed_for(5))
    torch.testing.assert_close(outs[0], ref.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1], outs[0], atol=3e-2, rtol=3e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=6e-2, rtol=6e-2)


def _seed_for(manual_seed):
    torch.manual_seed(manual_seed)
    return _seed_used()


def _expect_error(match, fn, *args, **kwargs):
    with pytest.raises(RuntimeError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_a_clear_error(device):
    def t(*shape, dtype=NATIVE[device], dev=device):
        return torch.randn(*shape, device=dev).to(dtype)

    q = t(1, 16, 2, 64)
    if device == "cuda":
        _expect_error("CUDA tensors must be bfloat16 or float16, got Float", flash_attn_func, *(t(1, 16, 2, 64, dtype=torch.float32),) * 3)
        _expect_error("q, k, v must be on one device", flash_attn_func, q, t(1, 16, 2, 64, dev="cpu"), q)
    else:
        ints = torch.zeros(1, 16, 2, 64, dtype=torch.int32)
        _expect_error("CPU tensors must be floating point", flash_attn_func, ints, ints, ints)
    other = torch.float16 if q.dtype != torch.float16 else torch.bfloat16
    _expect_error("q, k, v must have one dtype", flash_attn_func, q, q.to(other), q)
    _expect_error("multiple of heads_kv", flash_attn_func, t(1, 16, 3, 64), t(1, 16, 2, 64), t(1, 16, 2, 64))
    _expect_error(r"must be \[batch, seqlen, heads, head_dim\]", flash_attn_func, q[0], q[0], q[0])
    _expect_error("k and v must have one shape", flash_attn_func, q, q, t(1, 17, 2, 64))
    _expect_error("k and v must have q's head_dim 64, got 32", flash_attn_func, q, t(1, 16, 2, 32), t(1, 16, 2, 32))
    _expect_error("one batch size", flash_attn_func, q, t(2, 16, 2, 64), t(2, 16, 2, 64))
    _expect_error("head_dim 48 is not supported", flash_attn_func, *(t(1, 16, 2, 48),) * 3)

    # The extension's own checks of what the Python wrappers would have fixed or passed through.
    ext = flashgpt_attn._extension()
    packed = t(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    gapped = torch.tensor([0, 9, 4, 9, 10, 9], dtype=torch.int32, device=device)[::2]
    assert torch.equal(gapped, cu) and not gapped.is_contiguous()
    _expect_error("cu_seqlens must be contiguous 1-D int32 .*not contiguous", ext.forward, packed, packed, packed, gapped,
                  cu, 6, 6, 0.0, 0.125, False, 0, 0)
    _expect_error("cu_seqlens must be contiguous 1-D int32", ext.forward, packed, packed, packed, cu.long(), cu, 6, 6,
                  0.0, 0.125, False, 0, 0)
    _expect_error("needs both cu_seqlens_q and cu_seqlens_k", ext.forward, packed, packed, packed, cu, None, 6, 6, 0.0,
                  0.125, False, 0, 0)
    if device == "cuda":
        _expect_error("on q's device", flash_attn_varlen_func, packed, packed, packed, cu.cpu(), cu.cpu(), 6, 6)
    out, lse = ext.forward(q, q, q, None, None, 16, 16, 0.0, 0.125, False, 0, 0)
    _expect_error("dout must have q's shape", ext.backward, q[:, :8], q, q, q, out, lse, None, None, 16, 16, 0.0,
                  0.125, False, 0, 0, False)
    _expect_error("lse must be the forward's float32", ext.backward, q, q, q, q, out, lse[:, :1], None, None, 16, 16,
                  0.0, 0.125, False, 0, 0, False)


@pytest.mark.skipif(BUILT_WITH_CUDA or not torch.cuda.is_available(),
                    reason="for a flashgpt_attn built without nvcc, on a machine with a CUDA device")
def test_a_build_without_cuda_says_so_for_cuda_tensors():
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    _expect_error("has no CUDA kernels .* built without nvcc", flash_attn_func, q, q, q)
