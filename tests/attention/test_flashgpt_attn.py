"""pytest for the PyTorch binding, on a GPU machine: `ctest -L gpu` runs it (through
run_binding_test.py) against a CUDA build's <build>/python; after `pip install .`:

    python3 -m pytest tests/attention/test_flashgpt_attn.py

FlashAttention's criterion: against the exact result on fp64-upcast inputs, our error must be
at most 2x the error of PyTorch's own attention in the same precision (plus a rounding floor),
for O and for dQ, dK, dV. Dropout is checked with the mask rebuilt from the same seed by the
numpy Philox (identical to include/flashgpt/philox.h and the CPU reference)."""
import pytest
import torch

import flashgpt_attn
from flashgpt_attn import attention_reference, flash_attn_func, flash_attn_varlen_func

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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


def _run(b, sq, sk, hq, hkv, d, causal, dropout, dtype=torch.bfloat16, backward=True):
    torch.manual_seed(sq * 7 + sk + d + hq)
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
    seed = _seed_used()
    out, lse = flash_attn_func(q, k, v, dropout_p=dropout, causal=causal, return_lse=True)
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}-{}_d{}_{}_p{}".format(*c))
def test_against_fp64_and_pytorch(case):
    _run(*case)


@pytest.mark.parametrize("d", [64, 128])
def test_seqlen_4097(d):
    _run(1, 4097, 4097, 2, 2, d, True, 0.0)


def test_fp16():
    _run(1, 333, 333, 2, 2, 64, True, 0.0, dtype=torch.float16)


def test_varlen_with_empty_sequences():
    torch.manual_seed(0)
    lens_q, lens_k = [5, 0, 130, 1, 64], [7, 3, 130, 0, 200]
    hq, hkv, d = 4, 2, 64
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
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


def test_deterministic_repeat_is_bitwise():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cpu_tensors_take_the_cpu_path():
    """CPU tensors run the C++ CPU implementation; with the same seed its dropout mask, and so
    its output and gradients, match the GPU kernels' up to bf16 rounding."""
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


def test_bad_input_is_a_clear_error():
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        flash_attn_func(q, q, q)
    q = torch.randn(1, 16, 3, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of heads_kv"):
        flash_attn_func(q, k, k)
