// GPU attention (forward and backward) against a plain double-precision reference written
// here from the definition in attention.h, on random inputs rounded to bf16/fp16 first,
// so the only differences are the kernels' own rounding. Also: the dropout mask bit for
// bit against philox.h, deterministic mode bit for bit on repeat, variable-length batches
// with empty sequences, GQA/MQA, awkward lengths (1, 17, 1000), and the entry points'
// error messages. The 2x-PyTorch criterion lives in the pytest suite of the binding.
#include "attention/attention_op_cases.h"
#include "common/op_test.h"

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>
#include <flashgpt/attention_cuda.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {
namespace {

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t float_to_fp16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
float fp16_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

// A tensor held as 16-bit host words plus their float values.
struct HalfTensor {
  DType dtype;
  std::vector<uint16_t> bits;
  std::vector<float> values;
  HalfTensor(DType dt, size_t n) : dtype(dt), bits(n), values(n) {}
  void set(size_t i, float f) {
    bits[i] = dtype == DType::bf16 ? float_to_bf16(f) : float_to_fp16(f);
    values[i] = dtype == DType::bf16 ? bf16_to_float(bits[i]) : fp16_to_float(bits[i]);
  }
  void from_bits(const std::vector<uint16_t>& b) {
    bits = b;
    for (size_t i = 0; i < b.size(); ++i) values[i] = dtype == DType::bf16 ? bf16_to_float(b[i]) : fp16_to_float(b[i]);
  }
};

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (n > 0) {
      EXPECT_EQ(cudaMalloc(&ptr, n), cudaSuccess);
    }
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

using testing::AttentionCase;
using testing::dense;
using testing::varlen;

// Reference on one (sequence, head): rows [sq, d] with row strides. Accumulates dk, dv.
struct RefSeq {
  int sq, sk, d;
  const float *q, *k, *v, *d_o;
  int64_t q_rs, k_rs;
  double *o, *lse, *dq, *dk, *dv;  // o, dq [sq, d]; dk, dv [sk, d]; lse [sq]
};

// The backward's D = rowsum(dO * O) is taken, as every FlashAttention backward takes it, from O
// as the forward stored it (rounded to `dtype`), not from the exact O: with one visible key,
// dS = P (dP - D) is zero only up to that rounding, and dropout's 1/(1-p) makes O inexact in bf16.
void reference_head(const RefSeq& s, double scale, bool causal, float dropout, DropoutRng rng, int64_t batch_head,
                    bool backward, DType dtype) {
  const uint32_t threshold = dropout_threshold(dropout);
  const bool use_dropout = dropout_enabled(threshold);
  const double keep_scale = dropout_keep_scale(threshold);
  std::vector<double> p(s.sk), z(s.sk), dp(s.sk);
  for (int i = 0; i < s.sq; ++i) {
    const float* qi = s.q + i * s.q_rs;
    double mx = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < s.sk; ++j) {
      const bool visible = !causal || j <= i + s.sk - s.sq;
      if (!visible) {
        p[j] = -std::numeric_limits<double>::infinity();
        continue;
      }
      double acc = 0;
      for (int c = 0; c < s.d; ++c) acc += double(qi[c]) * s.k[j * s.k_rs + c];
      p[j] = acc * scale;
      mx = std::max(mx, p[j]);
    }
    double sum = 0;
    for (int j = 0; j < s.sk; ++j) {
      p[j] = std::isinf(mx) ? 0.0 : std::exp(p[j] - mx);
      sum += p[j];
    }
    s.lse[i] = sum > 0 ? mx + std::log(sum) : std::numeric_limits<double>::infinity();
    for (int j = 0; j < s.sk; ++j) {
      p[j] = sum > 0 ? p[j] / sum : 0.0;
      z[j] = use_dropout ? (dropout_keep(rng, batch_head, i, j, threshold) ? keep_scale : 0.0) : 1.0;
    }
    for (int c = 0; c < s.d; ++c) {
      double acc = 0;
      for (int j = 0; j < s.sk; ++j) acc += p[j] * z[j] * s.v[j * s.k_rs + c];
      s.o[i * s.d + c] = acc;
    }
    if (!backward) continue;
    const float* doi = s.d_o + i * s.q_rs;
    double dsum = 0;  // D = rowsum(dO * stored O)
    for (int c = 0; c < s.d; ++c) {
      const float oc = float(s.o[i * s.d + c]);
      dsum += double(doi[c]) * (dtype == DType::bf16 ? bf16_to_float(float_to_bf16(oc)) : fp16_to_float(float_to_fp16(oc)));
    }
    for (int j = 0; j < s.sk; ++j) {
      double acc = 0;
      for (int c = 0; c < s.d; ++c) acc += double(doi[c]) * s.v[j * s.k_rs + c];
      dp[j] = acc * z[j];
    }
    for (int j = 0; j < s.sk; ++j) {
      const double ds = p[j] * (dp[j] - dsum);
      if (p[j] == 0.0 && z[j] == 0.0 && ds == 0.0) continue;
      for (int c = 0; c < s.d; ++c) {
        s.dq[i * s.d + c] += scale * ds * s.k[j * s.k_rs + c];
        s.dk[j * s.d + c] += scale * ds * qi[c];
        s.dv[j * s.d + c] += p[j] * z[j] * doi[c];
      }
    }
  }
}

// ||out - ref|| / ||ref|| (op_error's RMS norm), with the reference's RMS floored at 0.05: some
// gradients are exactly zero in exact arithmetic (one key: dS = P (dP - D) = 0) and only
// rounding noise on the GPU (the fp32 dP against D), where a pure relative error would be
// meaningless.
double rel_error(const std::vector<float>& out, const std::vector<double>& ref) {
  return testing::op_error(out, ref, {testing::Norm::rms, 0.05}).value;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

struct Outputs {
  std::vector<float> o, lse, dq, dk, dv;
  std::vector<uint16_t> dq_bits, dk_bits, dv_bits;
};

// Runs forward (+ backward) on the GPU and the reference, compares. Returns the outputs.
enum class Reference { in_test, library_cpu };

// out_guard > 0: dQ, dK and dV are written into rows of head_dim + out_guard elements a head (the
// strides say so), whose last out_guard elements must keep the poison (no store past the head
// dim); the outputs are read back compacted.
Outputs run_case(const AttentionCase& ac, bool backward, Determinism det = Determinism::fast, uint64_t seed = 7,
                 bool compare = true, Reference reference = Reference::in_test, int out_guard = 0) {
  // The table's shape under the names this runner has always used.
  struct {
    const std::string& name;
    int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
    Mask mask;
    float dropout;
    DType dtype;
    const std::vector<int32_t>&varlen_q, &varlen_k;
  } const c{ac.name,           ac.shape.batch,    ac.shape.seqlen_q, ac.shape.seqlen_k, ac.shape.heads_q,
            ac.shape.heads_kv, ac.shape.head_dim, ac.shape.mask,     ac.shape.dropout_p, ac.dtype,
            ac.shape.lens_q,   ac.shape.lens_k};
  const bool varlen = !c.varlen_q.empty();
  const int batch = varlen ? int(c.varlen_q.size()) : c.batch;
  std::vector<int> cu_q(batch + 1, 0), cu_k(batch + 1, 0);
  for (int b = 0; b < batch; ++b) {
    cu_q[b + 1] = cu_q[b] + (varlen ? c.varlen_q[b] : c.seqlen_q);
    cu_k[b + 1] = cu_k[b] + (varlen ? c.varlen_k[b] : c.seqlen_k);
  }
  const int max_q = varlen ? *std::max_element(c.varlen_q.begin(), c.varlen_q.end()) : c.seqlen_q;
  const int max_k = varlen ? *std::max_element(c.varlen_k.begin(), c.varlen_k.end()) : c.seqlen_k;
  const int64_t total_q = cu_q[batch], total_k = cu_k[batch];
  const int d = c.head_dim;
  const size_t nq = size_t(total_q) * c.heads_q * d, nk = size_t(total_k) * c.heads_kv * d;

  std::mt19937 gen(uint32_t(seed * 1000 + d + c.seqlen_q));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  HalfTensor q(c.dtype, nq), k(c.dtype, nk), v(c.dtype, nk), d_o(c.dtype, nq);
  for (size_t i = 0; i < nq; ++i) q.set(i, normal(gen));
  for (size_t i = 0; i < nk; ++i) k.set(i, normal(gen));
  for (size_t i = 0; i < nk; ++i) v.set(i, normal(gen));
  for (size_t i = 0; i < nq; ++i) d_o.set(i, normal(gen));

  AttentionParams p;
  p.dtype = c.dtype;
  p.batch = batch;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.heads_q = c.heads_q;
  p.heads_kv = c.heads_kv;
  p.head_dim = d;
  p.mask = c.mask;
  p.dropout_p = c.dropout;
  p.rng = {0x1234'5678'9abc'def0ull + seed, 42};
  if (varlen) {
    attention_set_varlen_strides(p, total_q, total_k);
  } else {
    attention_set_dense_strides(p);
  }

  const int d_out = d + out_guard;  // the gradients' elements a head, guard included
  if (out_guard > 0) {
    p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = d_out;
    p.dq_row_stride = int64_t{c.heads_q} * d_out;
    p.dk_row_stride = p.dv_row_stride = int64_t{c.heads_kv} * d_out;
    p.dq_batch_stride = varlen ? 0 : p.dq_row_stride * max_q;
    p.dk_batch_stride = p.dv_batch_stride = varlen ? 0 : p.dk_row_stride * max_k;
  }
  const size_t nq_out = nq / d * d_out, nk_out = nk / d * d_out;
  const size_t lse_n = size_t(c.heads_q) * total_q;
  DeviceBuffer dq_(nq * 2), dk_(nk * 2), dv_(nk * 2), do_(nq * 2), dq2(nq_out * 2), dk2(nk_out * 2), dv2(nk_out * 2),
      dout(nq * 2), dlse(lse_n * 4), dcu_q(4 * (batch + 1)), dcu_k(4 * (batch + 1));
  EXPECT_EQ(cudaMemcpy(dq_.ptr, q.bits.data(), nq * 2, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dk_.ptr, k.bits.data(), nk * 2, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dv_.ptr, v.bits.data(), nk * 2, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(do_.ptr, d_o.bits.data(), nq * 2, cudaMemcpyHostToDevice), cudaSuccess);
  // Poison the outputs: every element must be written.
  cudaMemset(dout.ptr, 0xFF, nq * 2);
  cudaMemset(dlse.ptr, 0xFF, lse_n * 4);
  cudaMemset(dq2.ptr, 0xFF, nq_out * 2);
  cudaMemset(dk2.ptr, 0xFF, nk_out * 2);
  cudaMemset(dv2.ptr, 0xFF, nk_out * 2);
  if (varlen) {
    EXPECT_EQ(cudaMemcpy(dcu_q.ptr, cu_q.data(), 4 * (batch + 1), cudaMemcpyHostToDevice), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(dcu_k.ptr, cu_k.data(), 4 * (batch + 1), cudaMemcpyHostToDevice), cudaSuccess);
    p.cu_seqlens_q = static_cast<const int32_t*>(dcu_q.ptr);
    p.cu_seqlens_k = static_cast<const int32_t*>(dcu_k.ptr);
  }
  p.q = dq_.ptr;
  p.k = dk_.ptr;
  p.v = dv_.ptr;
  p.o = dout.ptr;
  p.lse = static_cast<float*>(dlse.ptr);
  p.d_o = do_.ptr;
  p.dq = dq2.ptr;
  p.dk = dk2.ptr;
  p.dv = dv2.ptr;

  attention_forward_cuda(p, nullptr);
  if (backward) {
    const size_t ws_bytes = attention_backward_workspace_bytes(p);
    DeviceBuffer ws(ws_bytes);
    attention_backward_cuda(p, ws.ptr, ws_bytes, det, nullptr);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  Outputs out;
  HalfTensor o_h(c.dtype, nq), dq_h(c.dtype, nq), dk_h(c.dtype, nk), dv_h(c.dtype, nk);
  std::vector<uint16_t> tmp(nq);
  EXPECT_EQ(cudaMemcpy(tmp.data(), dout.ptr, nq * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  o_h.from_bits(tmp);
  out.o = o_h.values;
  out.lse.resize(lse_n);
  EXPECT_EQ(cudaMemcpy(out.lse.data(), dlse.ptr, lse_n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  // A gradient read back without its guard columns, each of which must still hold the poison.
  auto read_gradient = [&](const DeviceBuffer& buf, size_t n, const char* what) {
    std::vector<uint16_t> all(n / d * d_out), real(n);
    EXPECT_EQ(cudaMemcpy(all.data(), buf.ptr, all.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t touched = 0;
    for (size_t h = 0; h < n / d; ++h) {
      std::copy_n(all.begin() + h * d_out, d, real.begin() + h * d);
      for (int e = d; e < d_out; ++e) touched += all[h * d_out + e] != 0xFFFF;
    }
    EXPECT_EQ(touched, 0) << c.name << ": " << what << " written past the head dim (" << out_guard
                          << " guard columns a head)";
    return real;
  };
  if (backward) {
    tmp = read_gradient(dq2, nq, "dQ");
    dq_h.from_bits(tmp);
    out.dq = dq_h.values;
    out.dq_bits = tmp;
    std::vector<uint16_t> tk = read_gradient(dk2, nk, "dK");
    dk_h.from_bits(tk);
    out.dk = dk_h.values;
    out.dk_bits = tk;
    tk = read_gradient(dv2, nk, "dV");
    dv_h.from_bits(tk);
    out.dv = dv_h.values;
    out.dv_bits = tk;
  }
  if (!compare) return out;

  // Reference.
  std::vector<double> ro(nq, 0), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0), rlse(lse_n, 0);
  const double scale = attention_softmax_scale(p);
  const int group = c.heads_q / c.heads_kv;
  if (reference == Reference::library_cpu) {
    // flashgpt's own CPU reference (attention_cpu.h), fp32 on the same rounded inputs, same
    // seed and offset: the dropout masks must agree for the outputs to.
    AttentionParams pc = p;
    pc.dtype = DType::f32;
    std::vector<float> o(nq), lse(lse_n), dq(nq), dk(nk), dv(nk);
    pc.q = q.values.data();
    pc.k = k.values.data();
    pc.v = v.values.data();
    pc.d_o = d_o.values.data();
    pc.o = o.data();
    pc.lse = lse.data();
    pc.dq = dq.data();
    pc.dk = dk.data();
    pc.dv = dv.data();
    pc.cu_seqlens_q = varlen ? cu_q.data() : nullptr;
    pc.cu_seqlens_k = varlen ? cu_k.data() : nullptr;
    attention_forward_reference(pc);
    if (backward) attention_backward_reference(pc);
    ro.assign(o.begin(), o.end());
    rlse.assign(lse.begin(), lse.end());
    rdq.assign(dq.begin(), dq.end());
    rdk.assign(dk.begin(), dk.end());
    rdv.assign(dv.begin(), dv.end());
  }
  for (int b = 0; b < batch && reference == Reference::in_test; ++b) {
    const int sq = cu_q[b + 1] - cu_q[b], sk = cu_k[b + 1] - cu_k[b];
    for (int h = 0; h < c.heads_q; ++h) {
      const int hk = h / group;
      std::vector<double> o(size_t(sq) * d), lse(sq), dqv(size_t(sq) * d, 0), dkv(size_t(sk) * d, 0),
          dvv(size_t(sk) * d, 0);
      const size_t qoff = (size_t(cu_q[b]) * c.heads_q + h) * d, koff = (size_t(cu_k[b]) * c.heads_kv + hk) * d;
      RefSeq s{sq,  sk, d, q.values.data() + qoff, k.values.data() + koff, v.values.data() + koff,
               d_o.values.data() + qoff, int64_t(c.heads_q) * d, int64_t(c.heads_kv) * d, o.data(), lse.data(),
               dqv.data(), dkv.data(), dvv.data()};
      reference_head(s, scale, c.mask == Mask::causal, c.dropout, p.rng, int64_t(b) * c.heads_q + h, backward, c.dtype);
      for (int i = 0; i < sq; ++i) {
        for (int e = 0; e < d; ++e) {
          ro[qoff + size_t(i) * c.heads_q * d + e] = o[size_t(i) * d + e];
          rdq[qoff + size_t(i) * c.heads_q * d + e] = dqv[size_t(i) * d + e];
        }
        const size_t li = varlen ? size_t(h) * total_q + cu_q[b] + i : (size_t(b) * c.heads_q + h) * max_q + i;
        rlse[li] = lse[i];
      }
      for (int j = 0; j < sk; ++j)
        for (int e = 0; e < d; ++e) {
          rdk[koff + size_t(j) * c.heads_kv * d + e] += dkv[size_t(j) * d + e];
          rdv[koff + size_t(j) * c.heads_kv * d + e] += dvv[size_t(j) * d + e];
        }
    }
  }
  const double tol = c.dtype == DType::bf16 ? 1.6e-2 : 4e-3;
  EXPECT_TRUE(all_finite(out.o)) << c.name << ": O has non-finite or unwritten values";
  EXPECT_LT(rel_error(out.o, ro), tol) << c.name << ": O";
  int64_t lse_bad = 0, first_bad = -1;
  for (size_t i = 0; i < lse_n; ++i) {
    const bool ok = std::isinf(rlse[i]) ? (std::isinf(out.lse[i]) && out.lse[i] > 0)
                                        : std::abs(out.lse[i] - rlse[i]) <= 2e-3 * std::max(1.0, std::abs(rlse[i]));
    if (!ok && first_bad < 0) first_bad = int64_t(i);
    lse_bad += !ok;
  }
  EXPECT_EQ(lse_bad, 0) << c.name << ": LSE wrong, first at " << first_bad << ": got "
                        << (first_bad >= 0 ? out.lse[first_bad] : 0.f) << " want " << (first_bad >= 0 ? rlse[first_bad] : 0.);
  if (backward) {
    EXPECT_TRUE(all_finite(out.dq) && all_finite(out.dk) && all_finite(out.dv)) << c.name << ": gradients not finite";
    const double gtol = tol * 1.5;
    EXPECT_LT(rel_error(out.dq, rdq), gtol) << c.name << ": dQ";
    EXPECT_LT(rel_error(out.dk, rdk), gtol) << c.name << ": dK";
    EXPECT_LT(rel_error(out.dv, rdv), gtol) << c.name << ": dV";
  }
  return out;
}

std::vector<AttentionCase> compiled_cases(std::vector<AttentionCase> cases) {
  std::erase_if(cases, [](const AttentionCase& c) { return !attention_cuda_head_dim_compiled(c.shape.head_dim); });
  return cases;
}

// Says which kernels the other tests exercise: on an H100 with an sm_90a build, wgmma for the
// forward of d64, d96, d128 and d256 and the backward of d64 and d128 (with or without
// dropout), unless FLASHGPT_ATTN_FWD_KERNEL / FLASHGPT_ATTN_BWD_KERNEL is mma_sync (the ctest
// attention_cuda_test_mma_sync sets both); mma.sync everywhere else.
TEST(AttentionCuda, ReportsKernels) {
  auto forced = [](const char* var) {
    const char* v = std::getenv(var);
    return v != nullptr && std::string_view(v) == "mma_sync";
  };
  const bool fwd_forced = forced("FLASHGPT_ATTN_FWD_KERNEL"), bwd_forced = forced("FLASHGPT_ATTN_BWD_KERNEL");
  for (int d : kAttentionHeadDims) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const std::string_view fwd = attention_cuda_forward_kernel(d), bwd = attention_cuda_backward_kernel(d);
    std::printf("[ info ] head_dim %d forward kernel: %s, backward kernel: %s\n", d, fwd.data(), bwd.data());
    const bool hopper_dim = d == 64 || d == 128, hopper_fwd_dim = hopper_dim || d == 96 || d == 256;
    if (fwd_forced || !hopper_fwd_dim) {
      EXPECT_EQ(fwd, "mma.sync") << "head_dim " << d;
    } else if (hopper_dim) {
      EXPECT_TRUE(fwd == "wgmma-tma" || fwd == "wgmma" || fwd == "mma.sync") << fwd;
    } else {
      EXPECT_TRUE(fwd == "wgmma" || fwd == "mma.sync") << fwd;
    }
    // Dropout takes the kernel of a dense call without it (the TMA forward has a dropout variant
    // of d128's tile and d64's default tile; a forced tile may lack one); varlen batches never take
    // the TMA forward.
    AttentionParams with_dropout;
    with_dropout.head_dim = d;
    with_dropout.dropout_p = 0.1f;
    const char* tile_env = std::getenv(d == 128 ? "FLASHGPT_ATTN_TMA128_TILE" : "FLASHGPT_ATTN_TMA_TILE");
    const bool tile_forced = tile_env != nullptr && *tile_env != '\0';
    if (!tile_forced) {
      EXPECT_EQ(std::string_view(attention_cuda_forward_kernel(with_dropout)), fwd) << "head_dim " << d;
    }
    // The TMA forward names its tile: the default (d64 tile 3; d128 tile 1, tile 0 with dropout)
    // unless one is forced.
    AttentionParams plain;
    plain.head_dim = d;
    const int tile = attention_cuda_forward_tma_tile(plain);
    const int dropout_tile = attention_cuda_forward_tma_tile(with_dropout);
    std::printf("[ info ] head_dim %d forward tile: %d (with dropout: %d)\n", d, tile, dropout_tile);
    if (fwd != "wgmma-tma") {
      EXPECT_EQ(tile, -1) << "head_dim " << d;
    } else if (!tile_forced) {
      EXPECT_EQ(tile, d == 128 ? 1 : 3) << "head_dim " << d;
      EXPECT_EQ(dropout_tile, d == 128 ? 0 : 3) << "head_dim " << d;
    }
    AttentionParams varlen_params = with_dropout;
    const int32_t cu_seqlens[2] = {0, 1};  // only compared with null by the choice
    varlen_params.cu_seqlens_q = varlen_params.cu_seqlens_k = cu_seqlens;
    EXPECT_STRNE(attention_cuda_forward_kernel(varlen_params), "wgmma-tma") << "head_dim " << d;
    // The backward: "wgmma-tma" where forced (FLASHGPT_ATTN_BWD_KERNEL=tma, the ctests
    // attention_cuda_test_tma_bwd and _tma_atomics) and by default at d128 for calls without
    // dropout while the dQ warp is on and the fused convert off; never for a varlen batch.
    auto env_is = [](const char* var, std::string_view value) {
      const char* v = std::getenv(var);
      return v != nullptr && std::string_view(v) == value;
    };
    const bool bwd_tma_forced = env_is("FLASHGPT_ATTN_BWD_KERNEL", "tma");
    const bool bwd_wgmma_forced = env_is("FLASHGPT_ATTN_BWD_KERNEL", "wgmma");
    // With FLASHGPT_ATTN_BWD_TMA64_VARIANT=1, also d64 (its variant), with dropout too.
    const bool dq_warp_on =
        !env_is("FLASHGPT_ATTN_BWD_DQ_WARP", "0") && !env_is("FLASHGPT_ATTN_BWD_FUSED_CONVERT", "1");
    const bool tma64_variant =
        d == 64 && !bwd_wgmma_forced && dq_warp_on && env_is("FLASHGPT_ATTN_BWD_TMA64_VARIANT", "1");
    const bool tma_by_default = (d == 128 && !bwd_wgmma_forced && dq_warp_on) || tma64_variant;
    // d32 and d96 take the padded wgmma backward unless FLASHGPT_ATTN_BWD_PADDED=0.
    const bool padded_dim = (d == 32 || d == 96) && !env_is("FLASHGPT_ATTN_BWD_PADDED", "0");
    if (bwd_forced || !(hopper_dim || padded_dim)) {
      EXPECT_EQ(bwd, "mma.sync") << "head_dim " << d;
    } else if (padded_dim) {
      EXPECT_TRUE(bwd == "wgmma" || bwd == "mma.sync") << bwd;
    } else if (bwd_tma_forced || tma_by_default) {
      EXPECT_TRUE(bwd == "wgmma-tma" || bwd == "mma.sync") << bwd;
    } else {
      EXPECT_TRUE(bwd == "wgmma" || bwd == "mma.sync") << bwd;
    }
    // Dropout takes the same kernel, except that the default TMA backward (d128) leaves dropout
    // calls to the wgmma kernel (not timed with dropout); the d64 variant takes them.
    const std::string_view bwd_dropout = attention_cuda_backward_kernel(with_dropout);
    if (tma_by_default && !tma64_variant && !bwd_tma_forced && bwd == "wgmma-tma") {
      EXPECT_EQ(bwd_dropout, "wgmma") << "head_dim " << d;
    } else {
      EXPECT_EQ(bwd_dropout, bwd) << "head_dim " << d;
    }
    EXPECT_STRNE(attention_cuda_backward_kernel(varlen_params), "wgmma-tma") << "head_dim " << d;
    // The two automatic choices agree where both passes have a wgmma kernel.
    if (!fwd_forced && !bwd_forced && hopper_dim) {
      EXPECT_EQ(fwd.substr(0, 5) == "wgmma", bwd.substr(0, 5) == "wgmma") << "head_dim " << d;
    }
  }
}

// The op table (attention_op_cases.h) on the CUDA backend: AttentionOp/cuda.<case>, for the
// head dims this build compiled.
[[maybe_unused]] const int kCudaCases = testing::register_op_cases<AttentionCase>(
    "AttentionOp", "cuda", testing::cases_for(testing::kCudaBackend, testing::attention_op_cases()),
    [](const AttentionCase& c) { run_case(c, c.backward); },
    [](const AttentionCase& c) { return attention_cuda_head_dim_compiled(c.shape.head_dim); });

// Small shapes covering every code path (masking, GQA, varlen, dropout, deterministic
// semaphores) for compute-sanitizer memcheck / racecheck runs:
//   compute-sanitizer --tool racecheck attention_cuda_test --gtest_filter=*SmallShapes*
TEST(AttentionCuda, SmallShapesForSanitizer) {
  const auto bf = DType::bf16;
  for (int d : kAttentionHeadDims) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    run_case({"small causal gqa dropout", dense(2, 70, 90, 4, 2, d, Mask::causal, 0.2f), {}, bf}, true,
             Determinism::fast, 5, /*compare=*/false);
    run_case({"small varlen", varlen({3, 0, 80}, {5, 2, 70}, 2, 1, d, Mask::causal, 0.0f), {}, bf}, true,
             Determinism::deterministic, 5, /*compare=*/false);
  }
}

// The d96 forward alone (the wgmma kernel on Hopper pads rows to 128 columns and must not read
// V's pad unwritten), for compute-sanitizer initcheck / memcheck:
//   compute-sanitizer --tool initcheck attention_cuda_test --gtest_filter=*D96Forward*
TEST(AttentionCuda, D96ForwardForSanitizer) {
  if (!attention_cuda_head_dim_compiled(96)) GTEST_SKIP();
  run_case({"d96 forward causal gqa dropout", dense(2, 70, 130, 4, 2, 96, Mask::causal, 0.2f), {}, DType::bf16},
           /*backward=*/false);
  run_case({"d96 forward varlen", varlen({3, 0, 80}, {5, 2, 140}, 2, 1, 96, Mask::none, 0.0f), {}, DType::f16},
           /*backward=*/false);
}

// Against the library's CPU reference (attention_forward_reference / backward_reference)
// with the same seed: dropout on, causal with seqlen_q != seqlen_k, GQA, varlen.
TEST(AttentionCuda, MatchesCpuReferenceWithSameSeed) {
  const auto bf = DType::bf16;
  const std::vector<AttentionCase> cases = compiled_cases({
      {"cpu-ref d64 dropout causal", dense(2, 100, 140, 4, 2, 64, Mask::causal, 0.2f), {}, bf},
      {"cpu-ref d128 dropout", dense(1, 77, 77, 2, 2, 128, Mask::none, 0.1f), {}, DType::f16},
      {"cpu-ref d64 varlen dropout", varlen({9, 0, 100}, {20, 5, 60}, 2, 1, 64, Mask::causal, 0.15f), {}, bf},
  });
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.name);
    run_case(c, /*backward=*/true, Determinism::fast, 3, /*compare=*/true, Reference::library_cpu);
  }
}

// More key blocks than an H100 has SMs, so that each CTA of the persistent wgmma backward
// takes several tiles from the counter, some of them without keys (empty sequences) or
// without any query block that sees them (causal, seqlen_q < seqlen_k).
TEST(AttentionCuda, ManyKeyBlocksPerCta) {
  const auto bf = DType::bf16;
  std::vector<int32_t> lens_q, lens_k;
  std::mt19937 gen(5);
  for (int b = 0; b < 40; ++b) {
    const bool empty = b % 7 == 3;
    lens_q.push_back(empty ? 0 : int(gen() % 300));
    lens_k.push_back(b % 11 == 5 ? 0 : 1 + int(gen() % 400));
  }
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const AttentionCase dense_case{"many tiles dense", dense(24, 200, 260, 6, 3, d, Mask::causal, 0.0f), {}, bf};
    const AttentionCase varlen_case{"many tiles varlen", varlen(lens_q, lens_k, 4, 2, d, Mask::causal, 0.1f), {}, bf};
    for (const AttentionCase& c : {dense_case, varlen_case}) {
      SCOPED_TRACE(c.name + " d" + std::to_string(d));
      run_case(c, /*backward=*/true);
      run_case(c, /*backward=*/true, Determinism::deterministic);
    }
  }
}

// More batch entries than a grid's z holds (65,535): the launchers run the batch in slices and
// the kernels number entries absolutely, so every slice's outputs, gradients and dropout mask
// (Philox counter batch * heads + head) match the reference. mma.sync (d32) and wgmma (d64:
// the forward, the persistent backward without dropout, the per-tile one with it).
TEST(AttentionCuda, BatchOverGridLimit) {
  const int batch = 65535 + 2;
  const auto bf = DType::bf16, fp = DType::f16;
  const std::vector<AttentionCase> cases = compiled_cases({
      {"d32 dropout", dense(batch, 2, 3, 1, 1, 32, Mask::causal, 0.2f), {}, bf},
      {"d64 dropout", dense(batch, 3, 2, 1, 1, 64, Mask::none, 0.2f), {}, fp},
      {"d64", dense(batch, 2, 3, 1, 1, 64, Mask::causal, 0.0f), {}, bf},
  });
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.name);
    run_case(c, /*backward=*/true, c.shape.dropout_p > 0.0f ? Determinism::fast : Determinism::deterministic);
  }
}

// A dense case of seqlen_q x seqlen_k named "<what> <sq>x<sk>[ causal] bf16|fp16": batch 2 of 4
// query heads over 2 K/V heads, or, above 100,000 scores a head (the reference's time), one
// entry of 2 heads over 1.
AttentionCase lengths_case(const std::string& what, int sq, int sk, int d, Mask mask, DType dtype, float dropout) {
  const bool big = sq * sk > 100000;
  return {what + " " + std::to_string(sq) + "x" + std::to_string(sk) + (mask == Mask::causal ? " causal" : "") +
              (dtype == DType::bf16 ? " bf16" : " fp16"),
          dense(big ? 1 : 2, sq, sk, big ? 2 : 4, big ? 1 : 2, d, mask, dropout),
          {},
          dtype};
}

// The forward at the shapes that stress the TMA kernel's pipeline (FLASHGPT_ATTN_FWD_KERNEL=tma
// runs it; the ctest attention_cuda_test_tma sets that): key-block counts 1 to 5 (its ring has
// 2 or 3 stages of 128 keys), lengths one short of and one past a block, 1 and 17, a length of
// 1000, rows that see no key (causal, seqlen_q > seqlen_k), GQA, both dtypes, causal and not;
// O and LSE against the reference. Then a batch of several CTAs per SM.
TEST(AttentionCuda, ForwardPipelineShapes) {
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {1, 300},   {127, 127}, {129, 129}, {128, 128},
                                        {200, 255}, {200, 257}, {190, 383}, {64, 385},  {300, 509}, {130, 640},
                                        {300, 17},  {1000, 1000}};
  for (DType dtype : {DType::bf16, DType::f16})
    for (int d : {64, 128}) {
      if (!attention_cuda_head_dim_compiled(d)) continue;
      for (Mask mask : {Mask::none, Mask::causal})
        for (const Lengths& l : lengths) {
          const AttentionCase c = lengths_case("pipeline d" + std::to_string(d), l.sq, l.sk, d, mask, dtype, 0.0f);
          SCOPED_TRACE(c.name);
          run_case(c, /*backward=*/false);
        }
    }
  std::printf("[ info ] forward kernel for these shapes: d64 %s, d128 %s\n", attention_cuda_forward_kernel(64),
              attention_cuda_forward_kernel(128));
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    // 256 CTAs (two query blocks x 4 heads x 32), about two per SM, at a reference cost of ~1 s.
    const AttentionCase c{"many CTAs d" + std::to_string(d), dense(32, 200, 200, 4, 2, d, Mask::causal, 0.0f), {},
                          DType::bf16};
    SCOPED_TRACE(c.name);
    run_case(c, /*backward=*/false);
  }
}

// The every-tile tests' frame for head dim d (64 or 128): skip_reason is empty where they run
// (the head dim compiled with a TMA forward table, FLASHGPT_ATTN_FWD_KERNEL=tma, no tile forced
// from the environment, a device that takes the TMA forward); while it lives a tile is forced
// (force), and the tile forced before comes back at its end. Out-of-range tiles must throw.
// (ForcedTma64Tile below is the plain scope guard for one d64 tile.)
struct EveryTmaTile {
  int (*count)();
  int (*force_tile)(int);
  std::string skip_reason;
  bool forced = false;
  int before = -1;
  explicit EveryTmaTile(int d)
      : count(d == 128 ? attention_cuda_tma128_tile_count : attention_cuda_tma64_tile_count),
        force_tile(d == 128 ? attention_cuda_force_tma128_tile : attention_cuda_force_tma64_tile) {
    const char* tile_var = d == 128 ? "FLASHGPT_ATTN_TMA128_TILE" : "FLASHGPT_ATTN_TMA_TILE";
    if (!attention_cuda_head_dim_compiled(d) || count() == 0) {
      skip_reason = "no d" + std::to_string(d) + " TMA forward in this build";
      return;
    }
    const char* kernel = std::getenv("FLASHGPT_ATTN_FWD_KERNEL");
    const char* tile_env = std::getenv(tile_var);
    if (kernel == nullptr || std::string_view(kernel) != "tma" || (tile_env != nullptr && *tile_env != '\0')) {
      skip_reason = std::string("runs with FLASHGPT_ATTN_FWD_KERNEL=tma and no ") + tile_var;
      return;
    }
    EXPECT_THROW(force_tile(count()), flashgpt::Error);
    EXPECT_THROW(force_tile(-2), flashgpt::Error);
    before = force_tile(0);
    forced = true;
    if (std::string_view(attention_cuda_forward_kernel(d)) != "wgmma-tma") skip_reason = "no TMA forward on this device";
  }
  EveryTmaTile(const EveryTmaTile&) = delete;
  EveryTmaTile& operator=(const EveryTmaTile&) = delete;
  ~EveryTmaTile() {
    if (forced) force_tile(before);
  }
  void force(int tile) const { force_tile(tile); }
};

// Every d64 tile of the TMA forward (query rows x keys a step, K/V stages, CTAs per SM) through
// the pipeline's awkward shapes: key-block counts from 1 past stages + 1 for every block size
// (64 and 128 keys: up to 1000 keys is 16 and 8 blocks), lengths around the 64-, 128- and
// 192-row query blocks, rows that see no key, GQA, bf16 and fp16, causal and not; O and LSE
// against the fp64 reference. It runs in the pass with the TMA forward forced (ctest's
// attention_cuda_test_tma) and no tile forced, once per build: its fp64 references cost about
// 2 s of CPU per tile, which the other passes need not pay again.
TEST(AttentionCuda, ForwardPipelineShapesEveryTma64Tile) {
  const EveryTmaTile every(64);
  if (!every.skip_reason.empty()) GTEST_SKIP() << every.skip_reason;
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {1, 300},   {63, 65},   {127, 127}, {129, 129},
                                        {191, 193}, {200, 257}, {190, 383}, {64, 385},  {300, 509}, {130, 640},
                                        {300, 17},  {1000, 1000}};
  for (int tile = 0; tile < every.count(); ++tile) {
    every.force(tile);
    ASSERT_STREQ(attention_cuda_forward_kernel(64), "wgmma-tma");
    for (DType dtype : {DType::bf16, DType::f16})
      for (Mask mask : {Mask::none, Mask::causal})
        for (const Lengths& l : lengths) {
          if (l.sq * l.sk > 100000 && dtype == DType::f16) continue;  // the long loop in bf16 only (reference time)
          const AttentionCase c =
              lengths_case("tma tile " + std::to_string(tile) + " d64", l.sq, l.sk, 64, mask, dtype, 0.0f);
          SCOPED_TRACE(c.name);
          run_case(c, /*backward=*/false);
        }
    // More CTAs than the SMs hold at once, so CTAs of several waves share SMs.
    const AttentionCase many{"tma tile " + std::to_string(tile) + " many CTAs",
                             dense(32, 200, 200, 4, 2, 64, Mask::causal, 0.0f), {}, DType::bf16};
    SCOPED_TRACE(many.name);
    run_case(many, /*backward=*/false);
    // The tile's dropout variant (a tile without one runs the wgmma kernel) against the reference
    // with the same seed: one and several key blocks, rows that see no key.
    for (Mask mask : {Mask::none, Mask::causal})
      for (const Lengths& l : std::vector<Lengths>{{17, 17}, {129, 129}, {200, 257}, {300, 17}}) {
        const AttentionCase c{"tma tile " + std::to_string(tile) + " d64 dropout " + std::to_string(l.sq) + "x" +
                                  std::to_string(l.sk) + (mask == Mask::causal ? " causal" : ""),
                              dense(2, l.sq, l.sk, 4, 2, 64, mask, 0.1f), {}, DType::bf16};
        SCOPED_TRACE(c.name);
        run_case(c, /*backward=*/false);
      }
  }
}

// Every d128 tile of the TMA forward (kTma128Tiles: 128 or 176 keys, 2 or 3 stages, with and
// without the intra-warpgroup overlap) through the pipeline's awkward shapes: key-block counts
// from 1 past stages + 1 for both block sizes (1000 keys is 8 blocks of 128 and 6 of 176, the
// last one partial), lengths one short of, at and one past 128 and 176, 1 and 17, rows that see
// no key (causal, seqlen_q > seqlen_k), GQA, bf16 and fp16, causal and not; O and LSE against the
// fp64 reference. Only tile 0 has a dropout variant: a dropout call with another forced tile runs
// the cp.async wgmma kernel, checked here too. Like the d64 test it runs in the pass with the
// TMA forward forced and no tile forced (ctest's attention_cuda_test_tma).
TEST(AttentionCuda, ForwardPipelineShapesEveryTma128Tile) {
  const EveryTmaTile every(128);
  if (!every.skip_reason.empty()) GTEST_SKIP() << every.skip_reason;
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {
      {1, 1},     {17, 17},   {1, 300},   {127, 127}, {128, 128}, {129, 129}, {175, 175}, {176, 176},
      {177, 177}, {200, 255}, {200, 257}, {190, 383}, {100, 529}, {64, 705},  {300, 17},  {1000, 1000}};
  for (int tile = 0; tile < every.count(); ++tile) {
    every.force(tile);
    ASSERT_STREQ(attention_cuda_forward_kernel(128), "wgmma-tma");
    AttentionParams plain;
    plain.head_dim = 128;
    ASSERT_EQ(attention_cuda_forward_tma_tile(plain), tile);
    for (DType dtype : {DType::bf16, DType::f16})
      for (Mask mask : {Mask::none, Mask::causal})
        for (const Lengths& l : lengths) {
          if (l.sq * l.sk > 100000 && dtype == DType::f16) continue;  // the long loop in bf16 only (reference time)
          const AttentionCase c =
              lengths_case("tma128 tile " + std::to_string(tile) + " d128", l.sq, l.sk, 128, mask, dtype, 0.0f);
          SCOPED_TRACE(c.name);
          run_case(c, /*backward=*/false);
        }
    // More CTAs than the SMs hold at once, so CTAs of several waves share SMs.
    const AttentionCase many{"tma128 tile " + std::to_string(tile) + " many CTAs",
                             dense(16, 200, 200, 4, 2, 128, Mask::causal, 0.0f), {}, DType::bf16};
    SCOPED_TRACE(many.name);
    run_case(many, /*backward=*/false);
    // Dropout: tile 0's variant, or the wgmma kernel for the tiles without one, against the
    // reference with the same seed.
    AttentionParams with_dropout = plain;
    with_dropout.dropout_p = 0.1f;
    EXPECT_STREQ(attention_cuda_forward_kernel(with_dropout), tile == 0 ? "wgmma-tma" : "wgmma");
    for (Mask mask : {Mask::none, Mask::causal}) {
      const AttentionCase c{"tma128 tile " + std::to_string(tile) + " dropout 200x257" +
                                (mask == Mask::causal ? " causal" : ""),
                            dense(2, 200, 257, 4, 2, 128, mask, 0.1f), {}, DType::bf16};
      SCOPED_TRACE(c.name);
      run_case(c, /*backward=*/false);
    }
  }
}

// Forces a forward kernel for a scope (attention_cuda_force_forward_kernel), then restores the
// override before.
class ForcedForwardKernel {
 public:
  explicit ForcedForwardKernel(const char* kernel) : before_(attention_cuda_force_forward_kernel(kernel)) {}
  ~ForcedForwardKernel() { attention_cuda_force_forward_kernel(before_.c_str()); }
  ForcedForwardKernel(const ForcedForwardKernel&) = delete;
  ForcedForwardKernel& operator=(const ForcedForwardKernel&) = delete;

 private:
  std::string before_;
};

// Forces a d64 TMA tile (-1: the default) for a scope, then restores the one before.
class ForcedTma64Tile {
 public:
  explicit ForcedTma64Tile(int tile) : before_(attention_cuda_force_tma64_tile(tile)) {}
  ~ForcedTma64Tile() { attention_cuda_force_tma64_tile(before_); }
  ForcedTma64Tile(const ForcedTma64Tile&) = delete;
  ForcedTma64Tile& operator=(const ForcedTma64Tile&) = delete;

 private:
  int before_;
};

// The ctest pass that forces the mma.sync kernels; the tests that compare the Hopper forwards
// with each other (they force their kernels themselves) run in the other passes.
bool mma_sync_pass() {
  const char* v = std::getenv("FLASHGPT_ATTN_FWD_KERNEL");
  return v != nullptr && std::string_view(v) == "mma_sync";
}

// Which forward kernel a dense dropout call of this head dim takes now.
std::string_view dropout_forward_kernel(int head_dim) {
  AttentionParams p;
  p.head_dim = head_dim;
  p.dropout_p = 0.1f;
  return attention_cuda_forward_kernel(p);
}

// Two forwards of the same inputs and seed: O within a few units in the last place of the
// element type (the same algorithm; a tile of another key-block size rounds the online softmax's
// P differently), LSE to fp32 rounding, and rows that see no key (+inf) alike.
void expect_same_forward(const Outputs& got, const Outputs& want, DType dtype, const std::string& name) {
  ASSERT_EQ(got.o.size(), want.o.size()) << name;
  ASSERT_EQ(got.lse.size(), want.lse.size()) << name;
  const double ulp = dtype == DType::bf16 ? 0x1p-8 : 0x1p-11;
  double sum_sq = 0.0;
  for (float x : want.o) sum_sq += double(x) * x;
  const double rms = want.o.empty() ? 0.0 : std::sqrt(sum_sq / double(want.o.size()));
  int64_t far = 0, identical = 0, first_far = -1;
  for (size_t i = 0; i < got.o.size(); ++i) {
    const double diff = std::abs(double(got.o[i]) - double(want.o[i]));
    identical += diff == 0.0;
    if (!(diff <= 4.0 * ulp * (std::abs(double(want.o[i])) + rms))) {
      if (first_far < 0) first_far = int64_t(i);
      ++far;
    }
  }
  EXPECT_EQ(far, 0) << name << ": O differs by more than 4 units in the last place, first at " << first_far << ": "
                    << (first_far >= 0 ? got.o[first_far] : 0.f) << " vs "
                    << (first_far >= 0 ? want.o[first_far] : 0.f);
  int64_t lse_bad = 0;
  for (size_t i = 0; i < got.lse.size(); ++i) {
    const float a = got.lse[i], b = want.lse[i];
    const bool ok = std::isinf(b) ? a == b : std::abs(double(a) - b) <= 1e-5 * std::max(1.0, std::abs(double(b)));
    lse_bad += !ok;
  }
  EXPECT_EQ(lse_bad, 0) << name << ": LSE differs";
  std::printf("[ info ] %s: %lld of %zu O elements bit-identical\n", name.c_str(), static_cast<long long>(identical),
              got.o.size());
}

// The TMA forward's dropout variant against the cp.async wgmma forward (the kernel whose mask the
// backward and the CPU reference were proven against) and against the fp64 reference, with the
// same seed: lengths 1, 17, 127, 129, 257 and 1000, key-block counts 1 to stages + 1 and past
// (d64's default tile: 64 keys a block, 3 stages; d128: 128 keys, 2 stages), rows that see no
// key (causal, seqlen_q > seqlen_k), GQA, bf16 and fp16, causal and not.
TEST(AttentionCuda, TmaForwardDropoutMatchesWgmma) {
  if (mma_sync_pass()) GTEST_SKIP() << "compares the Hopper forwards; runs in the other passes";
  EXPECT_THROW(attention_cuda_force_forward_kernel("cudnn"), flashgpt::Error);
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},  {127, 127}, {129, 129}, {190, 255},
                                        {200, 257}, {64, 385}, {300, 17},  {1000, 1000}};
  bool ran = false;
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const ForcedTma64Tile default_tile(-1);
    {
      const ForcedForwardKernel tma("tma");
      if (dropout_forward_kernel(d) != "wgmma-tma") continue;  // no TMA forward in this build or on this device
    }
    ran = true;
    for (DType dtype : {DType::bf16, DType::f16})
      for (Mask mask : {Mask::none, Mask::causal})
        for (const Lengths& l : lengths) {
          const AttentionCase c =
              lengths_case("tma vs wgmma dropout d" + std::to_string(d), l.sq, l.sk, d, mask, dtype, 0.15f);
          SCOPED_TRACE(c.name);
          Outputs tma, wgmma;
          {
            const ForcedForwardKernel forced("tma");
            ASSERT_EQ(dropout_forward_kernel(d), "wgmma-tma");
            tma = run_case(c, /*backward=*/false);  // against the reference too
          }
          {
            const ForcedForwardKernel forced("wgmma");
            ASSERT_EQ(dropout_forward_kernel(d), "wgmma");
            wgmma = run_case(c, /*backward=*/false, Determinism::fast, 7, /*compare=*/false);
          }
          expect_same_forward(tma, wgmma, dtype, c.name);
        }
  }
  if (!ran) GTEST_SKIP() << "no TMA forward in this build or on this device";
}

// Forward and backward with dropout through the TMA forward: the backward regenerates the mask
// the forward drew, so the gradients match the references (the library's CPU reference with the
// same seed, and the fp64 one here) only if the two masks agree. The model's shape in small
// (causal, dropout 0.1, 512 rows) among them.
TEST(AttentionCuda, TmaForwardDropoutForwardBackward) {
  if (mma_sync_pass()) GTEST_SKIP() << "runs the TMA forward; runs in the other passes";
  const ForcedTma64Tile default_tile(-1);
  const ForcedForwardKernel tma("tma");
  struct Case {
    AttentionCase c;
    Reference reference;
  };
  const std::vector<Case> cases = {
      {{"tma dropout fwd+bwd d64 model-like", dense(2, 512, 512, 3, 3, 64, Mask::causal, 0.1f), {}, DType::bf16},
       Reference::library_cpu},
      {{"tma dropout fwd+bwd d64 129x257 gqa", dense(2, 129, 257, 4, 2, 64, Mask::none, 0.2f), {}, DType::f16},
       Reference::in_test},
      {{"tma dropout fwd+bwd d64 300x17 causal", dense(2, 300, 17, 4, 1, 64, Mask::causal, 0.1f), {}, DType::bf16},
       Reference::in_test},
      {{"tma dropout fwd+bwd d128 200x385 causal", dense(2, 200, 385, 4, 2, 128, Mask::causal, 0.1f), {},
        DType::bf16},
       Reference::library_cpu},
      {{"tma dropout fwd+bwd d128 17x17", dense(2, 17, 17, 2, 2, 128, Mask::none, 0.15f), {}, DType::f16},
       Reference::in_test},
  };
  bool ran = false;
  for (const Case& k : cases) {
    const int d = k.c.shape.head_dim;
    if (!attention_cuda_head_dim_compiled(d) || dropout_forward_kernel(d) != "wgmma-tma") continue;
    ran = true;
    SCOPED_TRACE(k.c.name);
    run_case(k.c, /*backward=*/true, Determinism::fast, 11, /*compare=*/true, k.reference);
  }
  if (!ran) GTEST_SKIP() << "no TMA forward in this build or on this device";
}

// The backward at the shapes that stress the TMA backward's pipeline (FLASHGPT_ATTN_BWD_KERNEL=tma
// runs it; the ctest attention_cuda_test_tma_bwd sets that; the other passes run the same shapes
// through their kernels): query-block counts 1 to stages + 1 and past (2 stages of 128 queries
// at d64, of 64 at d128), lengths 1, 17, 127, 128, 129, 255, 257 and 1000, causal with
// seqlen_q != seqlen_k both ways (keys no query sees; rows that see no key), GQA (every query
// head of the group streams through the ring), dropout; gradients against the fp64 reference.
TEST(AttentionCuda, BackwardPipelineShapes) {
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {127, 127}, {128, 128}, {129, 129}, {255, 255},
                                        {257, 257}, {200, 385}, {64, 385},  {300, 17},  {1000, 1000}};
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    for (Mask mask : {Mask::none, Mask::causal})
      for (const Lengths& l : lengths) {
        const AttentionCase c =
            lengths_case("bwd pipeline d" + std::to_string(d), l.sq, l.sk, d, mask, DType::bf16, 0.0f);
        SCOPED_TRACE(c.name);
        run_case(c, /*backward=*/true);
      }
    // fp16 and dropout on a few of them.
    for (const Lengths& l : std::vector<Lengths>{{17, 17}, {129, 129}, {257, 257}, {200, 385}}) {
      const AttentionCase fp16 =
          lengths_case("bwd pipeline d" + std::to_string(d), l.sq, l.sk, d, Mask::causal, DType::f16, 0.0f);
      const AttentionCase drop =
          lengths_case("bwd pipeline dropout d" + std::to_string(d), l.sq, l.sk, d, Mask::causal, DType::bf16, 0.15f);
      for (const AttentionCase& c : {fp16, drop}) {
        SCOPED_TRACE(c.name);
        run_case(c, /*backward=*/true);
      }
    }
  }
  std::printf("[ info ] backward kernel for these shapes: d64 %s, d128 %s\n",
              attention_cuda_head_dim_compiled(64) ? attention_cuda_backward_kernel(64) : "-",
              attention_cuda_head_dim_compiled(128) ? attention_cuda_backward_kernel(128) : "-");
}

// Forces a backward kernel for a scope (attention_cuda_force_backward_kernel), then restores the
// override before.
class ForcedBackwardKernel {
 public:
  explicit ForcedBackwardKernel(const char* kernel) : before_(attention_cuda_force_backward_kernel(kernel)) {}
  ~ForcedBackwardKernel() { attention_cuda_force_backward_kernel(before_.c_str()); }
  ForcedBackwardKernel(const ForcedBackwardKernel&) = delete;
  ForcedBackwardKernel& operator=(const ForcedBackwardKernel&) = delete;

 private:
  std::string before_;
};

// Gradients of two backward kernels on the same inputs: within 4 units in the last place of the
// element type (relative to the element and the tensor's rms; dQ's fp32 atomics add in another
// order in fast mode), and how many are bit-identical.
void expect_same_gradients(const Outputs& got, const Outputs& want, DType dtype, const std::string& name) {
  const double ulp = dtype == DType::bf16 ? 0x1p-8 : 0x1p-11;
  auto compare = [&](const std::vector<float>& a, const std::vector<float>& b, const char* what) {
    ASSERT_EQ(a.size(), b.size()) << name << " " << what;
    double sum_sq = 0.0;
    for (float x : b) sum_sq += double(x) * x;
    const double rms = b.empty() ? 0.0 : std::sqrt(sum_sq / double(b.size()));
    int64_t far = 0, identical = 0, first_far = -1;
    for (size_t i = 0; i < a.size(); ++i) {
      const double diff = std::abs(double(a[i]) - double(b[i]));
      identical += diff == 0.0;
      if (!(diff <= 4.0 * ulp * (std::abs(double(b[i])) + rms))) {
        if (first_far < 0) first_far = int64_t(i);
        ++far;
      }
    }
    EXPECT_EQ(far, 0) << name << ": " << what << " differs by more than 4 units in the last place, first at "
                      << first_far << ": " << (first_far >= 0 ? a[first_far] : 0.f) << " vs "
                      << (first_far >= 0 ? b[first_far] : 0.f);
    std::printf("[ info ] %s: %lld of %zu %s elements bit-identical\n", name.c_str(),
                static_cast<long long>(identical), a.size(), what);
  };
  compare(got.dq, want.dq, "dQ");
  compare(got.dk, want.dk, "dK");
  compare(got.dv, want.dv, "dV");
}

// The TMA backward against the cp.async wgmma backward (same algorithm, same Philox mask) and
// the fp64 reference, forced in one process: pipeline lengths, GQA, dropout, both dtypes,
// causal with seqlen_q != seqlen_k; then the deterministic mode twice, bit-identical, over more
// tiles than an H100 has SMs (every CTA claims several from the counter), with dropout and GQA.
TEST(AttentionCuda, TmaBackwardMatchesWgmma) {
  if (mma_sync_pass()) GTEST_SKIP() << "compares the Hopper backwards; runs in the other passes";
  EXPECT_THROW(attention_cuda_force_backward_kernel("cudnn"), flashgpt::Error);
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1}, {17, 17}, {129, 129}, {255, 255}, {200, 385}, {300, 17}, {1000, 1000}};
  bool ran = false;
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    {
      const ForcedBackwardKernel tma("tma");
      if (std::string_view(attention_cuda_backward_kernel(d)) != "wgmma-tma") continue;
    }
    ran = true;
    for (DType dtype : {DType::bf16, DType::f16})
      for (Mask mask : {Mask::none, Mask::causal})
        for (const Lengths& l : lengths) {
          const float dropout = (l.sq + l.sk + int(mask)) % 2 == 0 ? 0.15f : 0.0f;
          const AttentionCase c =
              lengths_case("tma vs wgmma bwd d" + std::to_string(d), l.sq, l.sk, d, mask, dtype, dropout);
          SCOPED_TRACE(c.name + (dropout > 0.0f ? " dropout" : ""));
          Outputs tma, wgmma;
          {
            const ForcedBackwardKernel forced("tma");
            ASSERT_STREQ(attention_cuda_backward_kernel(d), "wgmma-tma");
            tma = run_case(c, /*backward=*/true);  // against the reference too
          }
          {
            const ForcedBackwardKernel forced("wgmma");
            ASSERT_STREQ(attention_cuda_backward_kernel(d), "wgmma");
            wgmma = run_case(c, /*backward=*/true, Determinism::fast, 7, /*compare=*/false);
          }
          expect_same_gradients(tma, wgmma, dtype, c.name);
        }
    // Deterministic: 12 x 2 kv heads x 8 key blocks = 192 tiles (d64 and d128: 128 keys a tile).
    const ForcedBackwardKernel forced("tma");
    const AttentionCase c{"tma det d" + std::to_string(d), dense(12, 1000, 1000, 4, 2, d, Mask::causal, 0.1f), {},
                          DType::bf16};
    const Outputs a = run_case(c, true, Determinism::deterministic, 13, /*compare=*/false);
    const Outputs b = run_case(c, true, Determinism::deterministic, 13, /*compare=*/false);
    EXPECT_TRUE(a.dq_bits == b.dq_bits) << "dQ differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(a.dk_bits == b.dk_bits) << "dK differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(a.dv_bits == b.dv_bits) << "dV differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(all_finite(a.dq) && all_finite(a.dk) && all_finite(a.dv)) << "d=" << d;
    const AttentionCase small{"tma det ref d" + std::to_string(d), dense(2, 300, 420, 4, 2, d, Mask::causal, 0.0f),
                              {}, DType::bf16};
    run_case(small, true, Determinism::deterministic);
  }
  if (!ran) GTEST_SKIP() << "no TMA backward in this build or on this device";
}

// Switches a 0/1 setting of the backward for a scope through its force function (1 on, 0 off;
// it returns whether the setting was on), then restores the setting before.
template <bool (*kForce)(int)>
class ForcedSwitch {
 public:
  explicit ForcedSwitch(bool on) : before_(kForce(on ? 1 : 0)) {}
  ~ForcedSwitch() { kForce(before_ ? 1 : 0); }
  ForcedSwitch(const ForcedSwitch&) = delete;
  ForcedSwitch& operator=(const ForcedSwitch&) = delete;

 private:
  bool before_;
};
using ForcedFusedDqConvert = ForcedSwitch<attention_cuda_force_fused_dq_convert>;
using ForcedBackwardPadded = ForcedSwitch<attention_cuda_force_backward_padded>;  // d32, d96
using ForcedDqWarp = ForcedSwitch<attention_cuda_force_backward_dq_warp>;  // the TMA backward's dQ warp
using ForcedTma64Variant = ForcedSwitch<attention_cuda_force_backward_tma64_variant>;  // its d64 variant

// Params that say which backward a dense (or, with cu_seqlens set, varlen) call of head_dim takes.
AttentionParams probe_params(int head_dim, bool varlen) {
  static const int32_t cu_seqlens[2] = {0, 1};  // only compared with null by the choice
  AttentionParams p;
  p.head_dim = head_dim;
  if (varlen) p.cu_seqlens_q = p.cu_seqlens_k = cu_seqlens;
  return p;
}

// Runs a case's backward with the fused dQ convert on (its gradients against the fp64 reference,
// unless compare is false) and off, same inputs and seed: dK and dV bit-identical (the convert
// does not touch them); dQ bit-identical in deterministic mode (the same fp32 sums in the same
// order, converted alike), within 4 units in the last place otherwise (the atomics' order).
void expect_fused_matches_separate(const AttentionCase& c, Determinism det, bool compare = true) {
  SCOPED_TRACE(c.name + (det == Determinism::deterministic ? " deterministic" : " fast"));
  const bool varlen = !c.shape.lens_q.empty();
  Outputs fused, separate;
  {
    const ForcedFusedDqConvert on(true);
    ASSERT_TRUE(attention_cuda_backward_fused_dq_convert(probe_params(c.shape.head_dim, varlen)));
    fused = run_case(c, /*backward=*/true, det, 17, compare);
  }
  {
    const ForcedFusedDqConvert off(false);
    ASSERT_FALSE(attention_cuda_backward_fused_dq_convert(probe_params(c.shape.head_dim, varlen)));
    separate = run_case(c, /*backward=*/true, det, 17, /*compare=*/false);
  }
  EXPECT_TRUE(all_finite(fused.dq)) << "dQ has non-finite or unwritten values";
  EXPECT_TRUE(fused.dk_bits == separate.dk_bits) << "dK differs with the fused dQ convert";
  EXPECT_TRUE(fused.dv_bits == separate.dv_bits) << "dV differs with the fused dQ convert";
  if (det == Determinism::deterministic) {
    EXPECT_TRUE(fused.dq_bits == separate.dq_bits) << "deterministic dQ differs between the fused and the separate convert";
  } else {
    expect_same_gradients(fused, separate, c.dtype, c.name + " fused vs separate convert");
  }
}

// The head dims among 32 and 96 whose padded wgmma backward this build and device run.
std::vector<int> padded_backward_dims() {
  std::vector<int> dims;
  const ForcedBackwardPadded on(true);
  const ForcedBackwardKernel wgmma("wgmma");
  for (int d : {96, 32})
    if (attention_cuda_head_dim_compiled(d) && std::string_view(attention_cuda_backward_kernel(d)) == "wgmma")
      dims.push_back(d);
  return dims;
}

// Guard columns a head in the padded tests' gradients: a store of the pad columns (d32's 32 .. 63,
// d96's 96 .. 127) would land in them.
constexpr int kPaddedGuard = 32;

// The padded wgmma backward (d32 on d64's kernel, d96 on d128's, the pad columns zero in shared
// memory): gradients against the fp64 reference and against the mma.sync backward on the same
// inputs, at BackwardPipelineShapes' lengths (1, 17, 127, 128, 129, 255, 257, 1000; causal with
// seqlen_q != seqlen_k both ways; GQA), fp16 and dropout on some, a varlen batch with empty
// sequences; the gradients written into rows with guard columns past the head dim that must keep
// their poison; the fused dQ convert switched on falls back to the convert kernel; deterministic
// mode twice bit-identical over more tiles than an H100 has SMs, and against the reference.
TEST(AttentionCuda, PaddedWgmmaBackward) {
  if (mma_sync_pass()) GTEST_SKIP() << "compares the padded wgmma backward with mma.sync; runs in the other passes";
  EXPECT_THROW(attention_cuda_force_backward_padded(2), flashgpt::Error);
  {
    const ForcedBackwardPadded off(false);
    for (int d : {32, 96}) {
      if (attention_cuda_head_dim_compiled(d)) {
        EXPECT_STREQ(attention_cuda_backward_kernel(d), "mma.sync") << d;
      }
    }
  }
  if (attention_cuda_head_dim_compiled(256)) {  // no wgmma backward at d256, whatever is switched on
    const ForcedBackwardPadded on(true);
    const ForcedBackwardKernel wgmma("wgmma");
    EXPECT_STREQ(attention_cuda_backward_kernel(256), "mma.sync");
  }
  const std::vector<int> dims = padded_backward_dims();
  if (dims.empty()) GTEST_SKIP() << "no wgmma backward in this build or on this device";
  const ForcedBackwardPadded on(true);
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {127, 127}, {128, 128}, {129, 129}, {255, 255},
                                        {257, 257}, {200, 385}, {64, 385},  {300, 17},  {1000, 1000}};
  for (int d : dims) {
    std::vector<AttentionCase> cases;
    for (Mask mask : {Mask::none, Mask::causal})
      for (const Lengths& l : lengths)
        cases.push_back(lengths_case("padded bwd d" + std::to_string(d), l.sq, l.sk, d, mask, DType::bf16, 0.0f));
    for (const Lengths& l : std::vector<Lengths>{{17, 17}, {129, 129}, {257, 257}, {200, 385}}) {
      cases.push_back(lengths_case("padded bwd d" + std::to_string(d), l.sq, l.sk, d, Mask::causal, DType::f16, 0.0f));
      cases.push_back(
          lengths_case("padded bwd dropout d" + std::to_string(d), l.sq, l.sk, d, Mask::causal, DType::bf16, 0.15f));
    }
    cases.push_back({"padded bwd varlen d" + std::to_string(d), varlen({3, 0, 80, 200}, {5, 2, 140, 130}, 4, 2, d,
                                                                        Mask::causal, 0.0f),
                     {}, DType::f16});
    for (const AttentionCase& c : cases) {
      SCOPED_TRACE(c.name);
      Outputs padded, mma_sync;
      {
        const ForcedBackwardKernel forced("wgmma");
        ASSERT_STREQ(attention_cuda_backward_kernel(d), "wgmma");
        padded = run_case(c, /*backward=*/true, Determinism::fast, 7, /*compare=*/true, Reference::in_test,
                          kPaddedGuard);
      }
      {
        const ForcedBackwardKernel forced("mma_sync");
        mma_sync = run_case(c, /*backward=*/true, Determinism::fast, 7, /*compare=*/false, Reference::in_test,
                            kPaddedGuard);
      }
      // With one key, dS = P (dP - D) is fp32 rounding noise, another in each kernel (their dP
      // sums run in other orders), so dQ and dK agree with the reference's floor only.
      if (c.shape.seqlen_k > 1 || !c.shape.lens_k.empty())
        expect_same_gradients(padded, mma_sync, c.dtype, c.name + " padded wgmma vs mma.sync");
    }
    const ForcedBackwardKernel forced("wgmma");
    {
      // The fused dQ convert has whole 64-column strips only: a padded head dim keeps the convert
      // kernel with it switched on.
      const ForcedFusedDqConvert fused(true);
      EXPECT_FALSE(attention_cuda_backward_fused_dq_convert(probe_params(d, false))) << d;
      run_case(lengths_case("padded bwd fused-on d" + std::to_string(d), 200, 385, d, Mask::causal, DType::bf16, 0.1f),
               true, Determinism::fast, 7, true, Reference::in_test, kPaddedGuard);
    }
    // Deterministic: 12 x 2 kv heads x 8 key blocks = 192 tiles of 128 keys.
    const AttentionCase c{"padded det d" + std::to_string(d), dense(12, 1000, 1000, 4, 2, d, Mask::causal, 0.1f), {},
                          DType::bf16};
    const Outputs a =
        run_case(c, true, Determinism::deterministic, 13, /*compare=*/false, Reference::in_test, kPaddedGuard);
    const Outputs b = run_case(c, true, Determinism::deterministic, 13, /*compare=*/false);
    EXPECT_TRUE(a.dq_bits == b.dq_bits) << "dQ differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(a.dk_bits == b.dk_bits) << "dK differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(a.dv_bits == b.dv_bits) << "dV differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(all_finite(a.dq) && all_finite(a.dk) && all_finite(a.dv)) << "d=" << d;
    run_case({"padded det ref d" + std::to_string(d), dense(2, 300, 420, 4, 2, d, Mask::causal, 0.0f), {}, DType::bf16},
             true, Determinism::deterministic, 7, true, Reference::in_test, kPaddedGuard);
  }
}

// The padded wgmma backward's small shapes (switched on here whatever the environment), for
// compute-sanitizer: initcheck finds reads of pad columns that nothing wrote, memcheck stores
// past the head dim:
//   compute-sanitizer --tool initcheck attention_cuda_test --gtest_filter=*PaddedBackwardForSanitizer*
TEST(AttentionCuda, PaddedBackwardForSanitizer) {
  if (mma_sync_pass()) GTEST_SKIP() << "runs the padded wgmma backward; runs in the other passes";
  const std::vector<int> dims = padded_backward_dims();
  if (dims.empty()) GTEST_SKIP() << "no wgmma backward in this build or on this device";
  const ForcedBackwardPadded on(true);
  const ForcedBackwardKernel wgmma("wgmma");
  for (int d : dims) {
    run_case({"padded small causal gqa dropout", dense(2, 70, 130, 4, 2, d, Mask::causal, 0.2f), {}, DType::bf16},
             true, Determinism::fast, 5, true, Reference::in_test, kPaddedGuard);
    run_case({"padded small varlen", varlen({3, 0, 80}, {5, 2, 140}, 2, 1, d, Mask::none, 0.0f), {}, DType::f16}, true,
             Determinism::deterministic, 5, true, Reference::in_test, kPaddedGuard);
  }
}

// The fused dQ convert (the wgmma and TMA backwards convert dQ in their main kernel, each 16 x 64
// strip by the warp whose arrival completes it) against the separate convert kernel, for each
// Hopper backward in turn: lengths 1, 17, 127 .. 129, 255, 257, 1000 (query blocks of 128 rows at
// d64 and 64 at d128, key blocks of 128), seqlen_q != seqlen_k both ways (causal: keys that no
// query sees, and query blocks that no key block reaches, which the preprocess writes as zeros),
// GQA, dropout, both dtypes; then deterministic mode bit for bit against the separate convert and
// against itself on repeat, over more tiles than an H100 has SMs; varlen with empty sequences (the
// wgmma kernel; the TMA backward takes no varlen batch); and a batch over the grid's z limit.
TEST(AttentionCuda, FusedDqConvertMatchesSeparate) {
  if (mma_sync_pass()) GTEST_SKIP() << "forces the Hopper backwards; runs in the other passes";
  EXPECT_THROW(attention_cuda_force_fused_dq_convert(2), flashgpt::Error);
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {127, 127}, {129, 129}, {255, 257}, {200, 385},
                                        {64, 385},  {385, 200}, {300, 17},  {1000, 1000}};
  bool ran = false;
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    for (const char* kernel : {"wgmma", "tma"}) {
      const ForcedBackwardKernel forced(kernel);
      const std::string_view name = attention_cuda_backward_kernel(d);
      if (name == "mma.sync" || (std::string_view(kernel) == "tma" && name != "wgmma-tma")) {
        // mma.sync (another GPU, or the mma_sync pass) has no fused convert.
        const ForcedFusedDqConvert on(true);
        EXPECT_FALSE(attention_cuda_backward_fused_dq_convert(probe_params(d, false))) << name;
        continue;
      }
      ran = true;
      const std::string tag = std::string(kernel) + " d" + std::to_string(d);
      int i = 0;
      for (const Lengths& l : lengths)
        for (Mask mask : {Mask::none, Mask::causal}) {
          const DType dtype = i % 3 == 2 ? DType::f16 : DType::bf16;
          const float dropout = i % 4 == 1 ? 0.15f : 0.0f;
          ++i;
          expect_fused_matches_separate(lengths_case("fused dq " + tag, l.sq, l.sk, d, mask, dtype, dropout),
                                        Determinism::fast);
        }
      // Deterministic: 12 x 2 kv heads x 8 key blocks = 192 tiles, dropout, GQA; bit for bit against
      // the separate convert, then against a second fused run.
      const AttentionCase many{"fused dq det " + tag, dense(12, 1000, 1000, 4, 2, d, Mask::causal, 0.1f), {},
                               DType::bf16};
      expect_fused_matches_separate(many, Determinism::deterministic, /*compare=*/false);
      {
        const ForcedFusedDqConvert on(true);
        const Outputs a = run_case(many, true, Determinism::deterministic, 19, /*compare=*/false);
        const Outputs b = run_case(many, true, Determinism::deterministic, 19, /*compare=*/false);
        EXPECT_TRUE(a.dq_bits == b.dq_bits) << "fused dQ differs between two deterministic runs, " << tag;
      }
      for (const Lengths& l : std::vector<Lengths>{{300, 700}, {700, 300}, {129, 1}}) {
        expect_fused_matches_separate(
            lengths_case("fused dq det " + tag, l.sq, l.sk, d, Mask::causal, DType::f16, 0.0f),
            Determinism::deterministic);
      }
      const AttentionCase ragged{"fused dq varlen " + tag,
                                 varlen({3, 0, 200, 129, 1000}, {5, 2, 70, 0, 900}, 4, 2, d, Mask::causal, 0.1f),
                                 {},
                                 DType::bf16};
      expect_fused_matches_separate(ragged, Determinism::fast);
      expect_fused_matches_separate(ragged, Determinism::deterministic);
    }
  }
  if (attention_cuda_head_dim_compiled(64) && ran) {
    const AttentionCase wide{"fused dq batch over grid limit", dense(65535 + 2, 2, 3, 1, 1, 64, Mask::causal, 0.0f),
                             {}, DType::bf16};
    expect_fused_matches_separate(wide, Determinism::deterministic, /*compare=*/false);
  }
  if (!ran) GTEST_SKIP() << "no wgmma backward in this build or on this device";
}

// Runs a case's TMA backward (forced by the caller) with the dQ warp on (against the fp64
// reference, unless compare is false) and off, same inputs and seed: dK and dV bit-identical (the
// dQ warp does not touch them), dQ within 4 units in the last place (the same fp32 addends in
// another order).
void expect_dq_warp_matches_atomics(const AttentionCase& c, bool compare = true) {
  SCOPED_TRACE(c.name);
  const AttentionParams probe = probe_params(c.shape.head_dim, false);
  Outputs warp, atomics;
  {
    const ForcedDqWarp on(true);
    ASSERT_TRUE(attention_cuda_backward_dq_warp(probe));
    warp = run_case(c, /*backward=*/true, Determinism::fast, 23, compare);
  }
  {
    const ForcedDqWarp off(false);
    ASSERT_FALSE(attention_cuda_backward_dq_warp(probe));
    atomics = run_case(c, /*backward=*/true, Determinism::fast, 23, /*compare=*/false);
  }
  EXPECT_TRUE(all_finite(warp.dq)) << "dQ has non-finite or unwritten values";
  EXPECT_TRUE(warp.dk_bits == atomics.dk_bits) << "dK differs with the dQ warp";
  EXPECT_TRUE(warp.dv_bits == atomics.dv_bits) << "dV differs with the dQ warp";
  expect_same_gradients(warp, atomics, c.dtype, c.name + " dQ warp vs atomics");
}

// The TMA backward's dQ warp (bulk reduce-adds from shared memory instead of the consumers'
// atomics; one staging buffer at d64, two at d128, over the staging of dK and dV) against the
// fp64 reference and the atomics: the pipeline lengths (1, 17, 127 .. 129, 255, 257, 1000; query
// blocks of 128 rows at d64, 64 at d128), seqlen_q != seqlen_k both ways, causal and not, GQA,
// dropout, both dtypes; then more tiles than an H100 has SMs (every CTA refills its buffers
// across tiles, after its epilogue); then the switches it yields to: the fused dQ convert, and
// deterministic mode (the semaphores and atomics: bit-identical to the switch off).
TEST(AttentionCuda, TmaBackwardDqWarpMatchesAtomics) {
  if (mma_sync_pass()) GTEST_SKIP() << "forces the TMA backward; runs in the other passes";
  EXPECT_THROW(attention_cuda_force_backward_dq_warp(2), flashgpt::Error);
  EXPECT_THROW(attention_cuda_force_backward_dq_warp(-2), flashgpt::Error);
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {127, 127}, {128, 128}, {129, 129}, {255, 255},
                                        {257, 257}, {200, 385}, {64, 385},  {300, 17},  {1000, 1000}};
  const ForcedFusedDqConvert separate(false);
  bool ran = false;
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const ForcedBackwardKernel forced("tma");
    if (std::string_view(attention_cuda_backward_kernel(d)) != "wgmma-tma") {
      const ForcedDqWarp on(true);
      EXPECT_FALSE(attention_cuda_backward_dq_warp(probe_params(d, false))) << "d=" << d;
      continue;
    }
    ran = true;
    {
      const ForcedDqWarp on(true);
      EXPECT_FALSE(attention_cuda_backward_dq_warp(probe_params(d, /*varlen=*/true)))
          << "varlen takes the wgmma kernel";
      const ForcedFusedDqConvert fused(true);
      EXPECT_FALSE(attention_cuda_backward_dq_warp(probe_params(d, false))) << "the fused convert keeps the atomics";
    }
    const std::string tag = "dq warp d" + std::to_string(d);
    int i = 0;
    for (Mask mask : {Mask::none, Mask::causal})
      for (const Lengths& l : lengths) {
        const DType dtype = i % 3 == 2 ? DType::f16 : DType::bf16;
        const float dropout = i % 4 == 1 ? 0.15f : 0.0f;
        ++i;
        expect_dq_warp_matches_atomics(lengths_case(tag, l.sq, l.sk, d, mask, dtype, dropout));
      }
    // 12 x 2 kv heads x 8 key blocks = 192 tiles, with and without dropout; one against the
    // reference.
    expect_dq_warp_matches_atomics(
        {tag + " many tiles dropout", dense(12, 1000, 1000, 4, 2, d, Mask::causal, 0.1f), {}, DType::bf16},
        /*compare=*/false);
    expect_dq_warp_matches_atomics(
        {tag + " many tiles", dense(12, 1000, 1000, 4, 2, d, Mask::none, 0.0f), {}, DType::f16});
    // Deterministic mode with the switch on: the atomics path, bit for bit.
    const AttentionCase det{tag + " det", dense(12, 1000, 1000, 4, 2, d, Mask::causal, 0.1f), {}, DType::bf16};
    Outputs on_run, off_run;
    {
      const ForcedDqWarp on(true);
      on_run = run_case(det, true, Determinism::deterministic, 29, /*compare=*/false);
    }
    {
      const ForcedDqWarp off(false);
      off_run = run_case(det, true, Determinism::deterministic, 29, /*compare=*/false);
    }
    EXPECT_TRUE(on_run.dq_bits == off_run.dq_bits) << "deterministic dQ differs with the dQ warp switched on, d=" << d;
    EXPECT_TRUE(on_run.dk_bits == off_run.dk_bits && on_run.dv_bits == off_run.dv_bits) << "d=" << d;
  }
  if (!ran) GTEST_SKIP() << "no TMA backward in this build or on this device";
}

// A few small shapes through the TMA backward with the dQ warp, for compute-sanitizer memcheck
// (bench/pending/run.sh, part dqwarp):
//   compute-sanitizer --tool memcheck attention_cuda_test --gtest_filter=*DqWarpForSanitizer*
TEST(AttentionCuda, TmaBackwardDqWarpForSanitizer) {
  if (mma_sync_pass()) GTEST_SKIP() << "forces the TMA backward; runs in the other passes";
  const ForcedFusedDqConvert separate(false);
  const ForcedDqWarp on(true);
  bool ran = false;
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const ForcedBackwardKernel forced("tma");
    if (!attention_cuda_backward_dq_warp(probe_params(d, false))) continue;
    ran = true;
    run_case({"dq warp small causal gqa dropout", dense(2, 70, 90, 4, 2, d, Mask::causal, 0.2f), {}, DType::bf16},
             true, Determinism::fast, 5, /*compare=*/false);
    run_case({"dq warp small", dense(3, 129, 300, 2, 1, d, Mask::none, 0.0f), {}, DType::f16}, true,
             Determinism::fast, 5, /*compare=*/false);
  }
  if (!ran) GTEST_SKIP() << "no TMA backward in this build or on this device";
}

// Params of a dense d64 call with this dropout, for the kernel-choice queries.
AttentionParams probe_params_dropout(float dropout) {
  AttentionParams p = probe_params(64, false);
  p.dropout_p = dropout;
  return p;
}

// Runs a case through the d64 TMA variant (the caller has switched it on; against the fp64
// reference unless compare is false) and through the wgmma kernel, forced in turn, same inputs
// and seed: gradients within 4 units in the last place (dQ's fp32 sums add in another order).
void expect_tma64_variant_matches_wgmma(const AttentionCase& c, bool compare = true) {
  SCOPED_TRACE(c.name);
  Outputs variant, wgmma;
  {
    const ForcedBackwardKernel forced("tma");
    ASSERT_TRUE(attention_cuda_backward_tma64_variant(probe_params_dropout(c.shape.dropout_p)));
    variant = run_case(c, /*backward=*/true, Determinism::fast, 31, compare);
  }
  {
    const ForcedBackwardKernel forced("wgmma");
    ASSERT_FALSE(attention_cuda_backward_tma64_variant(probe_params_dropout(c.shape.dropout_p)));
    wgmma = run_case(c, /*backward=*/true, Determinism::fast, 31, /*compare=*/false);
  }
  EXPECT_TRUE(all_finite(variant.dq) && all_finite(variant.dk) && all_finite(variant.dv))
      << "non-finite or unwritten gradients";
  expect_same_gradients(variant, wgmma, c.dtype, c.name + " tma64 variant vs wgmma");
}

// The d64 variant of the TMA backward (FLASHGPT_ATTN_BWD_TMA64_VARIANT: 64-query blocks, a ring
// of four stages, two dQ buffers whose partial sums the warpgroups meet in): when it applies
// (the switch, the dQ warp, no fused convert, dense, fast mode; by default for d64 calls with
// and without dropout, never where another kernel is forced), then against the fp64 reference
// and the wgmma kernel: query-block counts 1 to 6 and past (lengths 1, 17, 64, 127, 128, 129,
// 255, 257, 320, 385, 1000), causal with seqlen_q != seqlen_k both ways, causal and not, GQA,
// dropout, both dtypes; then 12 x 2 kv heads x 8 key blocks = 192 tiles (every CTA takes several
// and its dQ buffers turn over across tiles), with and without dropout; deterministic mode keeps
// the plain kernel, bit for bit.
TEST(AttentionCuda, TmaBackward64VariantMatchesWgmma) {
  if (mma_sync_pass()) GTEST_SKIP() << "forces the Hopper backwards; runs in the other passes";
  if (!attention_cuda_head_dim_compiled(64)) GTEST_SKIP() << "d64 not compiled";
  EXPECT_THROW(attention_cuda_force_backward_tma64_variant(2), flashgpt::Error);
  EXPECT_THROW(attention_cuda_force_backward_tma64_variant(-2), flashgpt::Error);
  const ForcedFusedDqConvert separate(false);
  const ForcedDqWarp warp(true);
  {
    const ForcedBackwardKernel forced("tma");
    if (std::string_view(attention_cuda_backward_kernel(64)) != "wgmma-tma")
      GTEST_SKIP() << "no TMA backward in this build or on this device";
  }
  {
    const ForcedTma64Variant off(false);
    const ForcedBackwardKernel forced("tma");
    EXPECT_FALSE(attention_cuda_backward_tma64_variant(probe_params(64, false))) << "switched off";
  }
  const ForcedTma64Variant on(true);
  {
    const ForcedBackwardKernel automatic("");
    EXPECT_STREQ(attention_cuda_backward_kernel(probe_params_dropout(0.1f)), "wgmma-tma") << "d64 dropout";
    EXPECT_TRUE(attention_cuda_backward_tma64_variant(probe_params_dropout(0.1f)));
    EXPECT_TRUE(attention_cuda_backward_tma64_variant(probe_params(64, false)));
    EXPECT_FALSE(attention_cuda_backward_tma64_variant(probe_params(64, /*varlen=*/true))) << "varlen: wgmma";
    if (attention_cuda_head_dim_compiled(128)) {
      EXPECT_FALSE(attention_cuda_backward_tma64_variant(probe_params(128, false)));
      AttentionParams d128_dropout = probe_params(128, false);
      d128_dropout.dropout_p = 0.1f;
      EXPECT_STREQ(attention_cuda_backward_kernel(d128_dropout), "wgmma") << "d128 dropout keeps its default";
    }
    {
      const ForcedFusedDqConvert fused(true);
      EXPECT_FALSE(attention_cuda_backward_tma64_variant(probe_params(64, false))) << "the fused convert";
      EXPECT_STREQ(attention_cuda_backward_kernel(probe_params_dropout(0.1f)), "wgmma");
    }
    {
      const ForcedDqWarp off(false);
      EXPECT_FALSE(attention_cuda_backward_tma64_variant(probe_params(64, false))) << "the dQ warp off";
    }
  }
  struct Lengths {
    int sq, sk;
  };
  const std::vector<Lengths> lengths = {{1, 1},     {17, 17},   {64, 64},   {127, 127}, {128, 128},
                                        {129, 129}, {255, 255}, {257, 257}, {320, 320}, {385, 385},
                                        {200, 385}, {64, 385},  {300, 17},  {1000, 1000}};
  int i = 0;
  for (Mask mask : {Mask::none, Mask::causal})
    for (const Lengths& l : lengths) {
      const DType dtype = i % 3 == 2 ? DType::f16 : DType::bf16;
      const float dropout = i % 4 == 1 ? 0.15f : 0.0f;
      ++i;
      expect_tma64_variant_matches_wgmma(lengths_case("tma64 variant", l.sq, l.sk, 64, mask, dtype, dropout));
    }
  // fp16 with dropout, causal, both ways of seqlen_q != seqlen_k.
  for (const Lengths& l : std::vector<Lengths>{{200, 385}, {385, 200}, {257, 257}})
    expect_tma64_variant_matches_wgmma(
        lengths_case("tma64 variant dropout", l.sq, l.sk, 64, Mask::causal, DType::f16, 0.1f));
  // 192 tiles, with and without dropout; one against the reference.
  expect_tma64_variant_matches_wgmma(
      {"tma64 variant many tiles dropout", dense(12, 1000, 1000, 4, 2, 64, Mask::causal, 0.1f), {}, DType::bf16},
      /*compare=*/false);
  expect_tma64_variant_matches_wgmma(
      {"tma64 variant many tiles", dense(12, 1000, 1000, 4, 2, 64, Mask::none, 0.0f), {}, DType::f16});
  // Deterministic mode: the plain TMA backward's semaphores and atomics, bit for bit.
  const ForcedBackwardKernel forced("tma");
  const AttentionCase det{"tma64 variant det", dense(12, 1000, 1000, 4, 2, 64, Mask::causal, 0.1f), {}, DType::bf16};
  Outputs on_run, off_run;
  on_run = run_case(det, true, Determinism::deterministic, 37, /*compare=*/false);
  {
    const ForcedTma64Variant off(false);
    off_run = run_case(det, true, Determinism::deterministic, 37, /*compare=*/false);
  }
  EXPECT_TRUE(on_run.dq_bits == off_run.dq_bits) << "deterministic dQ differs with the d64 variant switched on";
  EXPECT_TRUE(on_run.dk_bits == off_run.dk_bits && on_run.dv_bits == off_run.dv_bits);
}

// A few small shapes through the d64 TMA variant, for compute-sanitizer memcheck
// (bench/pending/run.sh, part tma64):
//   compute-sanitizer --tool memcheck attention_cuda_test --gtest_filter=*Tma64VariantForSanitizer*
TEST(AttentionCuda, TmaBackward64VariantForSanitizer) {
  if (mma_sync_pass()) GTEST_SKIP() << "forces the TMA backward; runs in the other passes";
  if (!attention_cuda_head_dim_compiled(64)) GTEST_SKIP() << "d64 not compiled";
  const ForcedFusedDqConvert separate(false);
  const ForcedDqWarp warp(true);
  const ForcedTma64Variant on(true);
  const ForcedBackwardKernel forced("tma");
  if (!attention_cuda_backward_tma64_variant(probe_params(64, false)))
    GTEST_SKIP() << "no TMA backward in this build or on this device";
  run_case({"tma64 small causal gqa dropout", dense(2, 70, 90, 4, 2, 64, Mask::causal, 0.2f), {}, DType::bf16}, true,
           Determinism::fast, 5, /*compare=*/false);
  run_case({"tma64 small", dense(3, 129, 300, 2, 1, 64, Mask::none, 0.0f), {}, DType::f16}, true, Determinism::fast,
           5, /*compare=*/false);
}

TEST(AttentionCuda, LongSequence4097ForwardBackward) {
  if (!attention_cuda_head_dim_compiled(64)) GTEST_SKIP();
  run_case({"d64 s4097 causal", dense(1, 4097, 4097, 1, 1, 64, Mask::causal, 0.0f), {}, DType::bf16},
           /*backward=*/true);
}

// The dropout-mask probes below: bf16, dense [batch, seqlen, heads, 64] tensors, one head
// group per query head, and a one-hot operand that makes the kernel's mask readable off an
// output: exactly zero where (i, j) was dropped, positive where it was kept.
constexpr int kProbeHeadDim = 64;

AttentionParams dropout_probe_params(int batch, int heads, int sq, int sk, float dropout, DropoutRng rng) {
  AttentionParams p;
  p.dtype = DType::bf16;
  p.batch = batch;
  p.seqlen_q = sq;
  p.seqlen_k = sk;
  p.heads_q = p.heads_kv = heads;
  p.head_dim = kProbeHeadDim;
  p.dropout_p = dropout;
  p.rng = rng;
  attention_set_dense_strides(p);
  return p;
}

std::vector<uint16_t> uniform_bf16(size_t n, std::mt19937& gen) {
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<uint16_t> x(n);
  for (auto& e : x) e = float_to_bf16(u(gen));
  return x;
}

// x[b, r, h, r] = 1 for r < rows (rows <= head dim), zero elsewhere.
std::vector<uint16_t> one_hot_bf16(int batch, int rows, int heads) {
  std::vector<uint16_t> x(size_t(batch) * rows * heads * kProbeHeadDim, 0);
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < rows; ++r)
      for (int h = 0; h < heads; ++h) x[((size_t(b) * rows + r) * heads + h) * kProbeHeadDim + r] = float_to_bf16(1.0f);
  return x;
}

void* upload(DeviceBuffer& buffer, const std::vector<uint16_t>& host) {
  EXPECT_EQ(cudaMemcpy(buffer.ptr, host.data(), host.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  return buffer.ptr;
}

struct MaskComparison {
  int64_t dropped = 0, mismatches = 0, elements = 0;
};

// Compares the mask read off an output (`value(b, h, i, j)`, query i, key j) with philox.h.
template <class Value>
MaskComparison compare_with_philox(const AttentionParams& p, Value value) {
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  MaskComparison r;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads_q; ++h)
      for (int i = 0; i < p.seqlen_q; ++i)
        for (int j = 0; j < p.seqlen_k; ++j) {
          const bool keep = dropout_keep(p.rng, int64_t(b) * p.heads_q + h, i, j, threshold);
          r.dropped += !keep;
          r.mismatches += keep != (value(b, h, i, j) > 0.0f);
          ++r.elements;
        }
  return r;
}

// With V = identity (seqlen_k <= head_dim), O[i, j] = P[i, j] * Z[i, j]: exactly zero
// where the mask dropped (i, j) and positive elsewhere, so the kernel's mask is read off
// O and compared bit for bit with philox.h's dropout_keep.
TEST(AttentionCuda, DropoutMaskMatchesPhilox) {
  if (!attention_cuda_head_dim_compiled(kProbeHeadDim)) GTEST_SKIP();
  const int batch = 2, heads = 3, sq = 150, sk = 61;
  AttentionParams p = dropout_probe_params(batch, heads, sq, sk, 0.25f, {0xdeadbeefcafef00dull, 0x100000003ull});
  const size_t nq = size_t(batch) * sq * heads * kProbeHeadDim;
  std::mt19937 gen(3);
  const std::vector<uint16_t> q = uniform_bf16(nq, gen), k = uniform_bf16(size_t(batch) * sk * heads * kProbeHeadDim, gen);
  const std::vector<uint16_t> v = one_hot_bf16(batch, sk, heads);
  DeviceBuffer dq(nq * 2), dk(k.size() * 2), dv(v.size() * 2), dout(nq * 2), dlse(size_t(batch) * heads * sq * 4);
  p.q = upload(dq, q);
  p.k = upload(dk, k);
  p.v = upload(dv, v);
  p.o = dout.ptr;
  p.lse = static_cast<float*>(dlse.ptr);
  attention_forward_cuda(p, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> o(nq);
  CUDA_OK(cudaMemcpy(o.data(), dout.ptr, nq * 2, cudaMemcpyDeviceToHost));
  const MaskComparison r = compare_with_philox(p, [&](int b, int h, int i, int j) {
    return bf16_to_float(o[((size_t(b) * sq + i) * heads + h) * kProbeHeadDim + j]);
  });
  EXPECT_EQ(r.mismatches, 0);
  const double n = double(r.elements), rate = dropout_threshold(p.dropout_p) / 256.0;  // the effective p
  EXPECT_NEAR(double(r.dropped) / n, rate, 6 * std::sqrt(rate * (1.0 - rate) / n));
}

// The forward's mask in every key block, not only the first: V of head h is the identity on keys
// 64 h .. 64 h + 63 and zero elsewhere, so O[b, i, h, c] = P[i, 64 h + c] Z[i, 64 h + c], and head
// h shows the mask of keys 64 h .. 64 h + 63 (its own Philox stream). Five heads over 300 keys
// reach key blocks 0 to 4 (64-key blocks; halves of the 128-key ones), past every tile's stages.
// Through the wgmma kernel (the probe's own check), the TMA forward's default tile and every d64
// tile (a tile without a dropout variant runs the wgmma kernel).
TEST(AttentionCuda, DropoutMaskMatchesPhiloxInEveryKeyBlock) {
  if (!attention_cuda_head_dim_compiled(kProbeHeadDim)) GTEST_SKIP();
  const int batch = 2, heads = 5, sq = 150, sk = 300;
  AttentionParams p = dropout_probe_params(batch, heads, sq, sk, 0.25f, {0x0badc0ffee123457ull, 0x300000007ull});
  const size_t nq = size_t(batch) * sq * heads * kProbeHeadDim, nk = size_t(batch) * sk * heads * kProbeHeadDim;
  std::mt19937 gen(9);
  const std::vector<uint16_t> q = uniform_bf16(nq, gen), k = uniform_bf16(nk, gen);
  std::vector<uint16_t> v(nk, 0);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < kProbeHeadDim && kProbeHeadDim * h + c < sk; ++c)
        v[((size_t(b) * sk + kProbeHeadDim * h + c) * heads + h) * kProbeHeadDim + c] = float_to_bf16(1.0f);
  DeviceBuffer dq(nq * 2), dk(nk * 2), dv(nk * 2), dout(nq * 2), dlse(size_t(batch) * heads * sq * 4);
  p.q = upload(dq, q);
  p.k = upload(dk, k);
  p.v = upload(dv, v);
  p.o = dout.ptr;
  p.lse = static_cast<float*>(dlse.ptr);
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  auto probe = [&](const std::string& what) {
    SCOPED_TRACE(what + " (forward kernel " + attention_cuda_forward_kernel(p) + ")");
    CUDA_OK(cudaMemset(dout.ptr, 0xFF, nq * 2));
    attention_forward_cuda(p, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> o(nq);
    CUDA_OK(cudaMemcpy(o.data(), dout.ptr, nq * 2, cudaMemcpyDeviceToHost));
    int64_t mismatches = 0, dropped = 0, elements = 0;
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < sq; ++i)
          for (int c = 0; c < kProbeHeadDim && kProbeHeadDim * h + c < sk; ++c) {
            const int j = kProbeHeadDim * h + c;
            const bool keep = dropout_keep(p.rng, int64_t(b) * heads + h, i, j, threshold);
            const float got = bf16_to_float(o[((size_t(b) * sq + i) * heads + h) * kProbeHeadDim + c]);
            dropped += !keep;
            mismatches += keep != (got > 0.0f);
            ++elements;
          }
    EXPECT_EQ(elements, int64_t(batch) * sq * sk);
    EXPECT_EQ(mismatches, 0);
    EXPECT_GT(dropped, 0);
  };
  const ForcedTma64Tile default_tile(-1);
  {
    const ForcedForwardKernel forced("wgmma");
    probe("wgmma forced");
  }
  {
    const ForcedForwardKernel forced("tma");
    probe("tma forced, default tile");
  }
  for (int tile = 0; tile < attention_cuda_tma64_tile_count(); ++tile) {
    const ForcedTma64Tile forced_tile(tile);
    const ForcedForwardKernel forced("tma");
    probe("tma tile " + std::to_string(tile));
  }
}

// The backward's mask, read off dV = (P Z)^T dO: with dO = identity (seqlen_q <= head_dim),
// dV[j, i] = P[i, j] Z[i, j], exactly zero where (i, j) was dropped and positive elsewhere.
TEST(AttentionCuda, BackwardDropoutMaskMatchesPhilox) {
  if (!attention_cuda_head_dim_compiled(kProbeHeadDim)) GTEST_SKIP();
  const int batch = 2, heads = 3, sq = 61, sk = 150;
  AttentionParams p = dropout_probe_params(batch, heads, sq, sk, 0.25f, {0x0123456789abcdefull, 0x700000001ull});
  const size_t nq = size_t(batch) * sq * heads * kProbeHeadDim, nk = size_t(batch) * sk * heads * kProbeHeadDim;
  std::mt19937 gen(5);
  const std::vector<uint16_t> q = uniform_bf16(nq, gen), k = uniform_bf16(nk, gen), v = uniform_bf16(nk, gen);
  const std::vector<uint16_t> d_o = one_hot_bf16(batch, sq, heads);
  DeviceBuffer dq_in(nq * 2), dk_in(nk * 2), dv_in(nk * 2), dout(nq * 2), ddo(nq * 2), dlse(size_t(batch) * heads * sq * 4);
  DeviceBuffer grad_q(nq * 2), grad_k(nk * 2), grad_v(nk * 2);
  p.q = upload(dq_in, q);
  p.k = upload(dk_in, k);
  p.v = upload(dv_in, v);
  p.d_o = upload(ddo, d_o);
  p.o = dout.ptr;
  p.lse = static_cast<float*>(dlse.ptr);
  p.dq = grad_q.ptr;
  p.dk = grad_k.ptr;
  p.dv = grad_v.ptr;
  attention_forward_cuda(p, nullptr);
  const size_t ws_bytes = attention_backward_workspace_bytes(p);
  DeviceBuffer ws(ws_bytes);
  attention_backward_cuda(p, ws.ptr, ws_bytes, Determinism::fast, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> dv(nk);
  CUDA_OK(cudaMemcpy(dv.data(), grad_v.ptr, nk * 2, cudaMemcpyDeviceToHost));
  const MaskComparison r = compare_with_philox(p, [&](int b, int h, int i, int j) {
    return bf16_to_float(dv[((size_t(b) * sk + j) * heads + h) * kProbeHeadDim + i]);
  });
  EXPECT_EQ(r.mismatches, 0);
  EXPECT_GT(r.dropped, 0);
}

TEST(AttentionCuda, DeterministicBackwardIsBitwiseRepeatable) {
  for (int d : {64, 128}) {
    if (!attention_cuda_head_dim_compiled(d)) continue;
    const AttentionCase c{"det", dense(2, 700, 700, 4, 2, d, Mask::causal, 0.1f), {}, DType::bf16};
    const Outputs a = run_case(c, true, Determinism::deterministic, 11, /*compare=*/false);
    const Outputs b = run_case(c, true, Determinism::deterministic, 11, /*compare=*/false);
    EXPECT_TRUE(a.dq_bits == b.dq_bits) << "dQ differs between two deterministic runs, d=" << d;
    EXPECT_TRUE(a.dk_bits == b.dk_bits);
    EXPECT_TRUE(a.dv_bits == b.dv_bits);
  }
}

TEST(AttentionCuda, DeterministicBackwardMatchesReference) {
  if (!attention_cuda_head_dim_compiled(64)) GTEST_SKIP();
  run_case({"det ref", dense(2, 300, 300, 4, 2, 64, Mask::causal, 0.0f), {}, DType::bf16}, true,
           Determinism::deterministic);
}

TEST(AttentionCuda, EntryPointsRejectBadInput) {
  if (!attention_cuda_head_dim_compiled(64)) GTEST_SKIP();
  DeviceBuffer buf(1 << 20);
  AttentionParams p;
  p.dtype = DType::bf16;
  p.batch = 1;
  p.seqlen_q = p.seqlen_k = 16;
  p.heads_q = p.heads_kv = 1;
  p.head_dim = 64;
  attention_set_dense_strides(p);
  char* base = static_cast<char*>(buf.ptr);
  p.q = base;
  p.k = base + 4096;
  p.v = base + 8192;
  p.o = base + 16384;
  p.lse = reinterpret_cast<float*>(base + 32768);
  EXPECT_NO_THROW(attention_forward_cuda(p, nullptr));
  auto expect_error = [](const AttentionParams& bad, const char* needle) {
    try {
      attention_forward_cuda(bad, nullptr);
      ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  AttentionParams bad = p;
  bad.dtype = DType::f32;
  expect_error(bad, "bfloat16 or float16");
  bad = p;
  bad.q = base + 2;
  expect_error(bad, "16-byte aligned");
  bad = p;
  bad.k_row_stride = 68;
  expect_error(bad, "multiples of 8");
  bad = p;
  bad.heads_q = 3;
  bad.heads_kv = 2;
  expect_error(bad, "multiple of heads_kv");
  bad = p;
  bad.heads_q = bad.heads_kv = 65536;
  expect_error(bad, "heads one launch can hold");
  bad = p;
  bad.head_dim = 48;
  expect_error(bad, "head_dim 48 is not supported");
  std::vector<char> host(1024);
  bad = p;
  bad.q = host.data();
  expect_error(bad, "device memory");
  const size_t need = attention_backward_workspace_bytes(p);
  p.d_o = p.q;
  p.dq = base + 49152;
  p.dk = base + 57344;
  p.dv = base + 65536;
  try {
    attention_backward_cuda(p, base + 131072, need - 1, Determinism::fast, nullptr);
    ADD_FAILURE() << "a too-small workspace must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
  }
  CUDA_OK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace flashgpt
