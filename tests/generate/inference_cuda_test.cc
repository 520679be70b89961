// The CUDA inference engine: the flash-decoding kernel against its CPU reference
// (attention_decode_split_reference) at cache lengths 1, 17, 511, 512 and several
// batch/head shapes; cached greedy generation against uncached recomputation on the GPU;
// the GPU engine against the fp32 CPU engine on the same weights (logits within bf16
// tolerance, greedy tokens equal wherever the CPU's top two logits are not a near tie);
// GPU sampling inside sampling_allowed_set and repeating under a seed; no allocation in a
// decode step; the fused decode path's matrix-vector kernel against a plain reference for
// every epilogue, and the fused path against the separate kernels end to end. Skipped
// without a GPU (tests/common/gpu_main.cc).
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/generate_cuda.h>
#include <flashgpt/model.h>

#include "generate/inference_cuda_kernels.h"

#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace flashgpt {
namespace {

float bf16_round(float f) { return __bfloat162float(__float2bfloat16(f)); }

template <class T>
T* to_device(const std::vector<T>& host) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(1, host.size()) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
  std::vector<__nv_bfloat16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = __float2bfloat16(x[i]);
  return out;
}

// ---- the fused decode path's matrix-vector kernel against a plain reference ----------------

using inference_cuda::FusedGemvParams;
using inference_cuda::GemvEpilogue;
using inference_cuda::TokenPlace;

template <class T>
std::vector<T> from_device(const T* d, size_t n) {
  std::vector<T> host(n);
  EXPECT_EQ(cudaMemcpy(host.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

float gelu_tanh_ref(double v) { return static_cast<float>(0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))); }

// The kernel's definition written plainly: the input rows (LayerNorm in double, rounded to
// bf16 as the kernel stores them, or the bf16 rows), then acc[r][o] = sum_k in[r][k] w[o][k].
std::vector<double> gemv_reference(const std::vector<float>& x_f32, const std::vector<float>& ln_w,
                                   const std::vector<float>& ln_b, const std::vector<int32_t>& row_index,
                                   const std::vector<float>& x_bf16, const std::vector<float>& w, int rows, int in,
                                   int out) {
  std::vector<double> acc(static_cast<size_t>(rows) * out);
  std::vector<float> xr(static_cast<size_t>(in));
  for (int r = 0; r < rows; ++r) {
    if (!ln_w.empty()) {
      const float* src = x_f32.data() + static_cast<size_t>(row_index.empty() ? r : row_index[r]) * in;
      double mean = 0, var = 0;
      for (int k = 0; k < in; ++k) mean += src[k];
      mean /= in;
      for (int k = 0; k < in; ++k) var += (src[k] - mean) * (src[k] - mean);
      const double rstd = 1.0 / std::sqrt(var / in + 1e-5);
      for (int k = 0; k < in; ++k) xr[k] = bf16_round(static_cast<float>((src[k] - mean) * rstd * ln_w[k] + ln_b[k]));
    } else {
      std::copy_n(x_bf16.data() + static_cast<size_t>(r) * in, in, xr.data());
    }
    for (int o = 0; o < out; ++o) {
      double a = 0;
      for (int k = 0; k < in; ++k) a += static_cast<double>(xr[k]) * w[static_cast<size_t>(o) * in + k];
      acc[static_cast<size_t>(r) * out + o] = a;
    }
  }
  return acc;
}

struct GemvCase {
  int rows, in, out;
  bool ln, programmatic;
};

// The inputs of a gemv_fused call on the device: the LayerNorm's source rows, parameters and
// row picks (gc.ln) or the bf16 input rows, W and the bias, set in `p`; the rest of the params
// is the caller's. The buffers are freed with the object.
struct GemvInputs {
  FusedGemvParams p;
  std::vector<void*> owned;
  GemvInputs() = default;
  GemvInputs(const GemvInputs&) = delete;
  GemvInputs& operator=(const GemvInputs&) = delete;
  ~GemvInputs() {
    for (void* ptr : owned) cudaFree(ptr);
  }
  template <class T>
  T* own(T* ptr) {
    owned.push_back(static_cast<void*>(ptr));
    return ptr;
  }
};
void gemv_inputs(GemvInputs& in, const GemvCase& gc, int out, const std::vector<float>& x_f32,
                 const std::vector<float>& ln_w, const std::vector<float>& ln_b, const std::vector<int32_t>& row_index,
                 const std::vector<float>& x_bf, const std::vector<float>& w, const std::vector<float>& bias) {
  FusedGemvParams& p = in.p;
  if (gc.ln) {
    p.x_f32 = in.own(to_device(x_f32)), p.ln_w = in.own(to_device(ln_w)), p.ln_b = in.own(to_device(ln_b));
    p.row_index = in.own(to_device(row_index));
  } else {
    p.x_bf16 = in.own(to_device(to_bf16(x_bf)));
  }
  p.w = in.own(to_device(to_bf16(w))), p.bias = in.own(to_device(bias));
  p.rows = gc.rows, p.in = gc.in, p.out = out, p.programmatic = gc.programmatic;
}

// Every epilogue at awkward shapes (odd outputs, inputs that leave lanes idle, 1/2/3/5/8
// rows), with and without the LayerNorm prologue and programmatic launch; outputs poisoned
// first, K/V cache rows not written checked untouched, argmax partials reduced as the
// sampler does.
TEST(GemvFusedCuda, MatchesReference) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  int checked = 0;
  for (const GemvCase& gc : {GemvCase{1, 768, 2304, true, true}, GemvCase{2, 136, 37, false, false},
                             GemvCase{3, 776, 1001, true, false}, GemvCase{5, 3072, 101, false, true},
                             GemvCase{8, 264, 96, true, true}, GemvCase{1, 2056, 45, false, false},
                             GemvCase{3, 2048, 9, true, true},
                             // Enough rows that every warp takes two at a time (the head's case).
                             GemvCase{2, 72, 20003, true, true}, GemvCase{1, 768, 20000, false, false},
                             // Rows of more load slots than a lane holds at once (two rounds of loads):
                             // fc_proj's shape, one with the LayerNorm on the block-wide prologue, and
                             // 48 KB of input rows (which the head, with its argmax arrays, refuses).
                             GemvCase{1, 3072, 768, false, true}, GemvCase{1, 3072, 2002, true, true},
                             GemvCase{2, 4096, 333, false, false}, GemvCase{8, 3072, 50, false, false},
                             // The wide variant at an input that leaves lanes idle in its last round.
                             GemvCase{3, 2824, 77, true, true},
                             // The seed's qkv at batch 8 and an odd chunk count (the mma kernel).
                             GemvCase{8, 768, 2304, true, true}, GemvCase{6, 136, 1001, false, false}}) {
    for (const GemvEpilogue epi : {GemvEpilogue::store_bf16, GemvEpilogue::bias_gelu, GemvEpilogue::residual,
                                   GemvEpilogue::qkv_cache, GemvEpilogue::logits_argmax}) {
      const int R = gc.rows, K = gc.in;
      // qkv_cache needs out = 3C; residual needs ld = out; the rest take gc.out.
      const int O = epi == GemvEpilogue::qkv_cache ? 3 * ((gc.out + 2) / 3) : gc.out;
      SCOPED_TRACE(::testing::Message() << "rows " << R << " in " << K << " out " << O << " ln " << gc.ln
                                        << " epilogue " << static_cast<int>(epi));
      if (epi == GemvEpilogue::logits_argmax && R * K * 2 + 64 * R > 48 * 1024) {
        FusedGemvParams big;  // refused on the shape alone, before any pointer is looked at
        big.rows = R, big.in = K, big.out = O;
        EXPECT_FALSE(inference_cuda::gemv_fused(big, epi, nullptr));
        continue;
      }
      const int src_rows = R + 3;  // the LayerNorm rows are picked from more rows
      std::vector<float> x_f32(static_cast<size_t>(src_rows) * K), ln_w(K), ln_b(K), x_bf(static_cast<size_t>(R) * K);
      std::vector<float> w(static_cast<size_t>(O) * K), bias(O);
      for (auto& v : x_f32) v = 3.0f * normal(rng) + 0.5f;
      for (auto& v : ln_w) v = uniform(rng);
      for (auto& v : ln_b) v = 0.1f * normal(rng);
      for (auto& v : x_bf) v = bf16_round(normal(rng));
      for (auto& v : w) v = bf16_round(normal(rng) / std::sqrt(static_cast<float>(K)));
      for (auto& v : bias) v = 0.2f * normal(rng);
      std::vector<int32_t> row_index(R);
      for (int r = 0; r < R; ++r) row_index[r] = (r * 2 + 1) % src_rows;
      const int valid = epi == GemvEpilogue::logits_argmax ? O - (O > 4 ? 3 : 0) : O;
      if (epi == GemvEpilogue::logits_argmax) {  // padding rows that would win if they were not skipped
        for (int o = valid; o < O; ++o) std::fill_n(w.begin() + static_cast<size_t>(o) * K, K, bf16_round(1.0f));
      }
      const auto acc = gemv_reference(x_f32, gc.ln ? ln_w : std::vector<float>{}, ln_b,
                                      gc.ln ? row_index : std::vector<int32_t>{}, x_bf, w, R, K, O);

      std::vector<float> residual0(static_cast<size_t>(R) * O);
      for (auto& v : residual0) v = normal(rng);
      // From 2 rows, again on the tensor-core kernel (FusedGemvParams::mma; the head's
      // argmax epilogue stays on gemv_fused_kernel): the same reference and tolerance.
      for (const bool mma : {false, true}) {
        if (mma && R < 2) continue;
        SCOPED_TRACE(mma ? "mma" : "scalar");
        GemvInputs inputs;
        gemv_inputs(inputs, gc, O, x_f32, ln_w, ln_b, row_index, x_bf, w, bias);
        FusedGemvParams& p = inputs.p;
        const size_t ldy = O + 5;
        auto* d_ybf = to_device(to_bf16(std::vector<float>(R * ldy, 1e4f)));
        auto* d_yf = to_device(std::vector<float>(R * ldy, 1e4f));
        auto* d_res = to_device(residual0);
        const int C = O / 3, S = 3, T = 9;
        std::vector<TokenPlace> places(R);
        for (int r = 0; r < R; ++r) places[r] = {0, (r * 4 + 2) % T, (r + 1) % S};
        auto* d_places = to_device(places);
        auto* d_q = to_device(to_bf16(std::vector<float>(static_cast<size_t>(R) * C, 1e4f)));
        auto* d_k = to_device(to_bf16(std::vector<float>(static_cast<size_t>(S) * T * C, 1e4f)));
        auto* d_v = to_device(to_bf16(std::vector<float>(static_cast<size_t>(S) * T * C, 1e4f)));
        const int parts = inference_cuda::gemv_fused_blocks(O);
        auto* d_pv = to_device(std::vector<float>(static_cast<size_t>(R) * parts, NAN));
        auto* d_pi = to_device(std::vector<int32_t>(static_cast<size_t>(R) * parts, -1));

        if (epi == GemvEpilogue::logits_argmax) p.bias = nullptr;
        p.y = epi == GemvEpilogue::logits_argmax ? static_cast<void*>(d_yf) : static_cast<void*>(d_ybf);
        p.ldy = static_cast<int64_t>(ldy);
        p.residual = d_res;
        p.q = d_q, p.k_cache = d_k, p.v_cache = d_v, p.places = d_places, p.slot_stride = int64_t{T} * C;
        p.part_val = d_pv, p.part_idx = d_pi, p.valid_out = valid;
        // The wide variant (12 loads a lane in flight; the residual epilogue at 2048 < in <=
        // 3072 takes it) in the programmatic cases, the usual 8 in the others.
        p.wide = gc.programmatic;
        // An L2 prefetch of the weights (a hint: the results must not change) in the LayerNorm cases.
        if (gc.ln) p.l2_prefetch = {p.w, static_cast<int64_t>(w.size()) * 2};
        p.mma = mma;
        const bool mma_taken = mma && epi != GemvEpilogue::logits_argmax;
        EXPECT_EQ(inference_cuda::gemv_mma_taken(p, epi), mma_taken);
        const int64_t mma_launches = inference_cuda::gemv_mma_launch_count();
        ASSERT_TRUE(inference_cuda::gemv_fused(p, epi, nullptr));
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(inference_cuda::gemv_mma_launch_count(), mma_launches + (mma_taken ? 1 : 0));

        auto close = [&](double got, double want, const char* what, int r, int o) {
          const double tol = 1e-2 * (1.0 + std::abs(want));
          EXPECT_LE(std::abs(got - want), tol) << what << " row " << r << " col " << o;
          ++checked;
        };
        const auto ybf = from_device(d_ybf, R * ldy);
        const auto yf = from_device(d_yf, R * ldy);
        for (int r = 0; r < R; ++r) {
          for (int o = 0; o < O; ++o) {
            const double a = acc[static_cast<size_t>(r) * O + o];
            const float gb = __bfloat162float(ybf[r * ldy + o]);
            switch (epi) {
              case GemvEpilogue::store_bf16: close(gb, a + bias[o], "y", r, o); break;
              case GemvEpilogue::bias_gelu: close(gb, gelu_tanh_ref(a + bias[o]), "gelu", r, o); break;
              case GemvEpilogue::logits_argmax: close(yf[r * ldy + o], a, "logit", r, o); break;
              default: break;
            }
          }
          for (size_t o = O; o < ldy; ++o) {  // past the row: untouched
            EXPECT_EQ(__bfloat162float(ybf[r * ldy + o]), bf16_round(1e4f));
            EXPECT_EQ(yf[r * ldy + o], 1e4f);
          }
        }
        if (epi == GemvEpilogue::residual) {
          const auto res = from_device(d_res, residual0.size());
          for (int r = 0; r < R; ++r) {
            for (int o = 0; o < O; ++o) {
              const size_t i = static_cast<size_t>(r) * O + o;
              close(res[i], residual0[i] + acc[i] + bias[o], "residual", r, o);
            }
          }
        }
        if (epi == GemvEpilogue::qkv_cache) {
          const auto q = from_device(d_q, static_cast<size_t>(R) * C);
          const auto k = from_device(d_k, static_cast<size_t>(S) * T * C);
          const auto v = from_device(d_v, static_cast<size_t>(S) * T * C);
          std::vector<bool> written(static_cast<size_t>(S) * T, false);
          for (int r = 0; r < R; ++r) {
            const size_t at = (static_cast<size_t>(places[r].slot) * T + places[r].pos) * C;
            written[at / C] = true;
            for (int c = 0; c < C; ++c) {
              const size_t i = static_cast<size_t>(r) * O;
              close(__bfloat162float(q[static_cast<size_t>(r) * C + c]), acc[i + c] + bias[c], "q", r, c);
              close(__bfloat162float(k[at + c]), acc[i + C + c] + bias[C + c], "k", r, c);
              close(__bfloat162float(v[at + c]), acc[i + 2 * C + c] + bias[2 * C + c], "v", r, c);
            }
          }
          for (size_t row = 0; row < written.size(); ++row) {
            if (written[row]) continue;
            for (int c = 0; c < C; ++c) {
              EXPECT_EQ(__bfloat162float(k[row * C + c]), bf16_round(1e4f)) << "cache row " << row;
              EXPECT_EQ(__bfloat162float(v[row * C + c]), bf16_round(1e4f)) << "cache row " << row;
            }
          }
        }
        if (epi == GemvEpilogue::logits_argmax) {
          // The partials reduce to the argmax (lowest id on a tie) of the written logits over
          // the valid columns, as the sampler reduces them.
          const auto pv = from_device(d_pv, static_cast<size_t>(R) * parts);
          const auto pi = from_device(d_pi, static_cast<size_t>(R) * parts);
          for (int r = 0; r < R; ++r) {
            float best = -INFINITY, bv = -INFINITY;
            int best_id = -1, bi = 0x7fffffff;
            for (int o = 0; o < valid; ++o) {
              if (yf[r * ldy + o] > best) best = yf[r * ldy + o], best_id = o;
            }
            for (int i = 0; i < parts; ++i) {
              const float z = pv[static_cast<size_t>(r) * parts + i];
              const int id = pi[static_cast<size_t>(r) * parts + i];
              if (z > bv || (z == bv && id < bi)) bv = z, bi = id;
            }
            EXPECT_EQ(bi, best_id) << "row " << r;
            EXPECT_EQ(bv, best) << "row " << r;
          }
        }
        for (void* ptr : {static_cast<void*>(d_ybf), static_cast<void*>(d_yf), static_cast<void*>(d_res),
                          static_cast<void*>(d_places), static_cast<void*>(d_q), static_cast<void*>(d_k),
                          static_cast<void*>(d_v), static_cast<void*>(d_pv), static_cast<void*>(d_pi)}) {
          cudaFree(ptr);
        }
      }
    }
  }
  EXPECT_GT(checked, 250000);  // 0.27 M values over the shapes above
}

TEST(GemvFusedCuda, RefusesShapesItDoesNotTake) {
  FusedGemvParams p;
  p.rows = 9, p.in = 64, p.out = 10;
  EXPECT_FALSE(inference_cuda::gemv_fused(p, GemvEpilogue::store_bf16, nullptr));  // 9 rows
  p.rows = 2, p.in = 60;
  EXPECT_FALSE(inference_cuda::gemv_fused(p, GemvEpilogue::store_bf16, nullptr));  // in % 8
  p.rows = 8, p.in = 4096;
  EXPECT_FALSE(inference_cuda::gemv_fused(p, GemvEpilogue::store_bf16, nullptr));  // 64 KB of input rows
}

struct DecodeShape {
  int rows, heads, head_dim, keys_per_split;
};

TEST(AttentionDecodeCuda, MatchesSplitReference) {
  const int T = 600, S = 5;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (const DecodeShape& shape : {DecodeShape{1, 12, 64, 32}, DecodeShape{4, 2, 64, 128}, DecodeShape{3, 4, 32, 32},
                                   DecodeShape{5, 2, 128, 64}, DecodeShape{2, 3, 96, 8}}) {
    const int R = shape.rows, NH = shape.heads, D = shape.head_dim, C = NH * D;
    // Inputs rounded to bf16 first, so the reference sees exactly what the kernel reads.
    std::vector<float> k(static_cast<size_t>(S) * T * C), v(k.size()), q(static_cast<size_t>(R) * C);
    for (auto& x : k) x = bf16_round(normal(rng));
    for (auto& x : v) x = bf16_round(normal(rng));
    for (auto& x : q) x = bf16_round(2.0f * normal(rng));
    const int lengths_cycle[] = {1, 17, 511, 512, 600};
    std::vector<int32_t> q_rows, slots, lengths;
    std::vector<int64_t> slots64, lengths64;
    for (int r = 0; r < R; ++r) {
      q_rows.push_back(r);
      slots.push_back((r * 2 + 1) % S);
      lengths.push_back(lengths_cycle[(r + shape.head_dim / 32) % 5]);
      slots64.push_back(slots.back());
      lengths64.push_back(lengths.back());
    }
    for (int variant = 0; variant < 4; ++variant) {
      // Every row at each of the awkward lengths in turn, besides the mixed batch above.
      if (variant > 0) {
        for (int r = 0; r < R; ++r) lengths[r] = lengths_cycle[variant - 1], lengths64[r] = lengths[r];
      }
      std::vector<float> want(q.size());
      DecodeAttentionParams ref;
      ref.q = q.data(), ref.k = k.data(), ref.v = v.data(), ref.o = want.data();
      ref.rows = R, ref.heads = NH, ref.head_dim = D, ref.row_stride = C, ref.slot_stride = int64_t{T} * C;
      ref.slots = slots64.data(), ref.lengths = lengths64.data();
      attention_decode_split_reference(ref, shape.keys_per_split);

      auto* dq = to_device(to_bf16(q));
      auto* dk = to_device(to_bf16(k));
      auto* dv = to_device(to_bf16(v));
      auto* d_out = to_device(to_bf16(std::vector<float>(q.size(), 1e4f)));  // poisoned
      auto* d_rows = to_device(q_rows);
      auto* d_slots = to_device(slots);
      auto* d_lengths = to_device(lengths);
      std::vector<float> partial(attention_decode_cuda_partial_floats(R, NH, D, T, shape.keys_per_split), NAN);
      auto* d_partials = to_device(partial);
      DecodeAttentionCudaParams p;
      p.q = dq, p.k = dk, p.v = dv, p.o = d_out, p.partials = d_partials;
      p.q_rows = d_rows, p.slots = d_slots, p.lengths = d_lengths;
      p.rows = R, p.heads = NH, p.head_dim = D;
      p.q_row_stride = C, p.o_row_stride = C, p.row_stride = C, p.slot_stride = int64_t{T} * C;
      p.max_length = T, p.keys_per_split = shape.keys_per_split;
      auto* d_counters = to_device(std::vector<unsigned>(static_cast<size_t>(R) * NH, 0u));
      // Launches: the two-kernel combine, then twice the fused combine (counters,
      // programmatic launch), which must leave its counters zero for the next launch; then
      // 8 and 16 keys in flight a warp (fused, then separate), which must give the same bits.
      std::vector<__nv_bfloat16> first_bits;
      for (int launch = 0; launch < 5; ++launch) {
        const bool fused = launch == 1 || launch == 2 || launch == 3;
        p.key_group = launch == 3 ? 8 : launch == 4 ? 16 : 4;
        SCOPED_TRACE(std::string(fused ? "fused combine" : "separate combine") + ", key group " +
                     std::to_string(p.key_group));
        ASSERT_EQ(cudaMemcpy(d_out, to_bf16(std::vector<float>(q.size(), 1e4f)).data(), q.size() * 2,
                             cudaMemcpyHostToDevice),
                  cudaSuccess);
        p.counters = fused ? d_counters : nullptr;
        p.programmatic = fused;
        attention_decode_cuda(p, nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<__nv_bfloat16> got(q.size());
        ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const double g = __bfloat162float(got[i]), w = want[i];
          worst = std::max(worst, std::abs(g - w) / (1.0 + std::abs(w)));
        }
        EXPECT_LT(worst, 1e-2) << "rows " << R << " heads " << NH << " head_dim " << D << " split "
                               << shape.keys_per_split << " variant " << variant;
        if (launch == 0) first_bits = got;
        EXPECT_EQ(std::memcmp(got.data(), first_bits.data(), got.size() * 2), 0) << "variant " << variant;
        std::vector<unsigned> counters(static_cast<size_t>(R) * NH, 1u);
        ASSERT_EQ(cudaMemcpy(counters.data(), d_counters, counters.size() * sizeof(unsigned), cudaMemcpyDeviceToHost),
                  cudaSuccess);
        for (unsigned c : counters) EXPECT_EQ(c, 0u);
      }
      cudaFree(d_counters);
      for (void* ptr : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                        static_cast<void*>(d_out), static_cast<void*>(d_rows), static_cast<void*>(d_slots),
                        static_cast<void*>(d_lengths), static_cast<void*>(d_partials)}) {
        cudaFree(ptr);
      }
    }
  }
}

// ---- attention + proj in one kernel (FLASHGPT_CUDA_DECODE=attnproj) ----------------------

// The kernel's definition written plainly, in double: per row and head, softmax(q k^T /
// sqrt(D)) v over the row's first lengths[r] keys, rounded to bf16 (as the kernel and the
// fused path store the attention output); then residual + bias + W_proj times that row.
std::vector<double> attention_proj_reference(const std::vector<float>& q, const std::vector<float>& k,
                                             const std::vector<float>& v, const std::vector<int32_t>& q_rows,
                                             const std::vector<int32_t>& slots, const std::vector<int32_t>& lengths,
                                             const std::vector<float>& w, const std::vector<float>& bias,
                                             const std::vector<float>& residual, int heads, int D, int64_t T) {
  const int C = heads * D;
  std::vector<double> out(residual.begin(), residual.end());
  std::vector<float> o(static_cast<size_t>(C));
  for (size_t r = 0; r < q_rows.size(); ++r) {
    const float* qr = q.data() + static_cast<size_t>(q_rows[r]) * C;
    for (int h = 0; h < heads; ++h) {
      const int n = lengths[r];
      std::vector<double> score(static_cast<size_t>(n));
      double top = -1e300;
      for (int j = 0; j < n; ++j) {
        const float* kj = k.data() + (static_cast<size_t>(slots[r]) * T + j) * C + h * D;
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(qr[h * D + d]) * kj[d];
        score[j] = dot / std::sqrt(static_cast<double>(D));
        top = std::max(top, score[j]);
      }
      double sum = 0;
      for (double& sc : score) sc = std::exp(sc - top), sum += sc;
      for (int d = 0; d < D; ++d) {
        double acc = 0;
        for (int j = 0; j < n; ++j) acc += score[j] * v[(static_cast<size_t>(slots[r]) * T + j) * C + h * D + d];
        o[h * D + d] = bf16_round(static_cast<float>(acc / sum));
      }
    }
    for (int c = 0; c < C; ++c) {
      double y = bias[c];
      for (int i = 0; i < C; ++i) y += static_cast<double>(w[static_cast<size_t>(c) * C + i]) * o[i];
      out[static_cast<size_t>(q_rows[r]) * C + c] += y;
    }
  }
  return out;
}

struct AttentionProjShape {
  int rows, heads, head_dim, col_blocks;
};

// Awkward shapes: 1 to 8 rows, 1 to 12 heads, head dims 32, 64, 128, column blocks that do
// not divide C (and 12 blocks of 32 columns, where the last holds none); ragged rows at
// lengths 1, 17, 511, 512, 600 in one launch, then every row at each; rows of q and of the
// residual in reverse order with one more residual row that no row owns (must stay
// untouched). Launched three times (plain, then twice with programmatic launch): results
// within tolerance of the reference, bit-identical across launches, counters left zero.
TEST(AttentionDecodeCuda, RefusesAKeyGroupItHasNoKernelFor) {
  int dummy = 0;
  DecodeAttentionCudaParams p;
  p.q = p.k = p.v = &dummy, p.o = &dummy, p.partials = reinterpret_cast<float*>(&dummy);
  p.q_rows = p.slots = p.lengths = &dummy;
  p.rows = 1, p.heads = 1, p.head_dim = 64, p.max_length = 16, p.keys_per_split = 8;
  p.key_group = 5;
  EXPECT_THROW(attention_decode_cuda(p, nullptr), std::invalid_argument);  // refused before any launch
}

// The residual add and LayerNorm of the batched decode path: both load orders against a
// double-precision reference, and bit for bit against each other, at widths that leave lanes
// idle, with and without the residual branch, through a row index.
TEST(ResidualLayerNormCuda, LoadsFirstMatchesReferenceAndBranchyKernel) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (const int C : {32, 72, 768, 776, 2048}) {
    for (const int rows : {1, 5, 64}) {
      for (const bool with_y : {false, true}) {
        const int R = rows + 3;  // x has more rows than are normalised; row n reads x[row_index[n]]
        std::vector<float> x(static_cast<size_t>(R) * C), y(x.size()), bias(C), w(C), b(C);
        for (auto& v : x) v = 3.0f * normal(rng) + 1.0f;
        for (auto& v : y) v = bf16_round(normal(rng));
        for (int c = 0; c < C; ++c) bias[c] = 0.1f * normal(rng), w[c] = 1.0f + 0.1f * normal(rng), b[c] = normal(rng);
        std::vector<int32_t> row_index(rows);
        for (int n = 0; n < rows; ++n) row_index[n] = (n * 7 + 2) % R;
        std::vector<float> xr_want(static_cast<size_t>(rows) * C);
        std::vector<double> h_want(static_cast<size_t>(rows) * C);
        for (int n = 0; n < rows; ++n) {
          const size_t r = row_index[n];
          double mean = 0, var = 0;
          for (int c = 0; c < C; ++c) {
            xr_want[n * C + c] = x[r * C + c] + (with_y ? y[r * C + c] + bias[c] : 0.0f);
            mean += xr_want[n * C + c];
          }
          mean /= C;
          for (int c = 0; c < C; ++c) var += (xr_want[n * C + c] - mean) * (xr_want[n * C + c] - mean);
          const double rstd = 1.0 / std::sqrt(var / C + 1e-5);
          for (int c = 0; c < C; ++c) h_want[n * C + c] = (xr_want[n * C + c] - mean) * rstd * w[c] + b[c];
        }
        std::vector<std::vector<float>> x_got(2);
        std::vector<std::vector<__nv_bfloat16>> h_got(2);
        for (int loads_first = 0; loads_first < 2; ++loads_first) {
          SCOPED_TRACE("C " + std::to_string(C) + " rows " + std::to_string(rows) + (with_y ? " with y" : "") +
                       " loads_first " + std::to_string(loads_first));
          float* dx = to_device(x);
          auto* dy = to_device(to_bf16(y));
          float* dbias = to_device(bias);
          float* dw = to_device(w);
          float* db = to_device(b);
          auto* dh = to_device(to_bf16(std::vector<float>(static_cast<size_t>(rows) * C, 1e4f)));  // poisoned
          int32_t* drow = to_device(row_index);
          inference_cuda::residual_layernorm(dx, with_y ? dy : nullptr, with_y ? dbias : nullptr, dw, db, dh, drow,
                                             rows, C, /*write_x=*/true, nullptr, loads_first);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          x_got[loads_first] = from_device(dx, x.size());
          h_got[loads_first] = from_device(dh, static_cast<size_t>(rows) * C);
          double worst = 0;
          for (size_t i = 0; i < h_want.size(); ++i) {
            worst = std::max(worst, std::abs(__bfloat162float(h_got[loads_first][i]) - h_want[i]) /
                                        (1.0 + std::abs(h_want[i])));
          }
          EXPECT_LT(worst, 1e-2);
          for (int n = 0; n < rows; ++n) {
            for (int c = 0; c < C; ++c) {
              ASSERT_NEAR(x_got[loads_first][row_index[n] * C + c], xr_want[n * C + c],
                          1e-5f * (1.0f + std::abs(xr_want[n * C + c])));
            }
          }
          for (void* ptr : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dbias),
                            static_cast<void*>(dw), static_cast<void*>(db), static_cast<void*>(dh),
                            static_cast<void*>(drow)}) {
            cudaFree(ptr);
          }
        }
        EXPECT_EQ(x_got[0], x_got[1]);
        EXPECT_EQ(std::memcmp(h_got[0].data(), h_got[1].data(), h_got[0].size() * 2), 0);
      }
    }
  }
}

TEST(AttentionProjCuda, MatchesReference) {
  const int T = 600, S = 5;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (const AttentionProjShape& shape : {AttentionProjShape{1, 12, 64, 8}, AttentionProjShape{3, 4, 32, 3},
                                          AttentionProjShape{5, 2, 128, 1}, AttentionProjShape{8, 3, 64, 5},
                                          AttentionProjShape{2, 1, 32, 12}, AttentionProjShape{4, 6, 64, 2}}) {
    const int R = shape.rows, NH = shape.heads, D = shape.head_dim, C = NH * D;
    SCOPED_TRACE(::testing::Message() << "rows " << R << " heads " << NH << " head_dim " << D << " col_blocks "
                                      << shape.col_blocks);
    ASSERT_TRUE(inference_cuda::attention_proj_supported(D, T, shape.col_blocks));
    std::vector<float> k(static_cast<size_t>(S) * T * C), v(k.size()), q(static_cast<size_t>(R) * C);
    std::vector<float> w(static_cast<size_t>(C) * C), bias(static_cast<size_t>(C)), residual(static_cast<size_t>(R + 1) * C);
    for (auto& x : k) x = bf16_round(normal(rng));
    for (auto& x : v) x = bf16_round(normal(rng));
    for (auto& x : q) x = bf16_round(2.0f * normal(rng));
    for (auto& x : w) x = bf16_round(normal(rng) / std::sqrt(static_cast<float>(C)));
    for (auto& x : bias) x = 0.1f * normal(rng);
    for (auto& x : residual) x = normal(rng);
    const int lengths_cycle[] = {1, 17, 511, 512, 600};
    std::vector<int32_t> q_rows, slots, lengths;
    for (int r = 0; r < R; ++r) {
      q_rows.push_back(R - 1 - r);
      slots.push_back((r * 2 + 1) % S);
      lengths.push_back(lengths_cycle[(r + D / 32) % 5]);
    }
    auto* dq = to_device(to_bf16(q));
    auto* dk = to_device(to_bf16(k));
    auto* dv = to_device(to_bf16(v));
    auto* dw = to_device(to_bf16(w));
    auto* d_bias = to_device(bias);
    auto* d_res = to_device(residual);
    auto* d_rows = to_device(q_rows);
    auto* d_slots = to_device(slots);
    auto* d_lengths = to_device(lengths);
    auto* d_partials = to_device(std::vector<float>(static_cast<size_t>(R) * NH * C, NAN));
    const size_t n_counters = static_cast<size_t>(R) * shape.col_blocks;
    auto* d_counters = to_device(std::vector<unsigned>(n_counters, 0u));
    auto* d_stats = to_device(std::vector<float2>(n_counters, make_float2(NAN, NAN)));
    for (int variant = 0; variant < 6; ++variant) {
      if (variant > 0) {
        for (int r = 0; r < R; ++r) lengths[r] = lengths_cycle[variant - 1];
        ASSERT_EQ(cudaMemcpy(d_lengths, lengths.data(), lengths.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      }
      const std::vector<double> want =
          attention_proj_reference(q, k, v, q_rows, slots, lengths, w, bias, residual, NH, D, T);
      inference_cuda::AttentionProjParams p;
      p.q = dq, p.k_cache = dk, p.v_cache = dv, p.q_rows = d_rows, p.slots = d_slots, p.lengths = d_lengths;
      p.w = dw, p.bias = d_bias, p.residual = d_res, p.partials = d_partials, p.counters = d_counters;
      p.rows = R, p.heads = NH, p.head_dim = D, p.C = C, p.max_length = T, p.col_blocks = shape.col_blocks;
      p.slot_stride = int64_t{T} * C;
      std::vector<float> first;
      for (int launch = 0; launch < 3; ++launch) {
        ASSERT_EQ(cudaMemcpy(d_res, residual.data(), residual.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
        p.programmatic = launch > 0;
        p.ln_stats = launch > 0 ? d_stats : nullptr;  // the layer3 path's LayerNorm statistics
        inference_cuda::attention_proj(p, nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> got = from_device(d_res, residual.size());
        double worst = 0;
        for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
        EXPECT_LT(worst, 3e-3) << "variant " << variant << " launch " << launch;
        for (int c = 0; c < C; ++c) EXPECT_EQ(got[static_cast<size_t>(R) * C + c], residual[static_cast<size_t>(R) * C + c]);
        if (launch == 0) {
          first = got;
        } else {
          EXPECT_EQ(got, first) << "variant " << variant << ": not deterministic";
        }
        for (unsigned c : from_device(d_counters, n_counters)) EXPECT_EQ(c, 0u);
        if (launch == 0) continue;
        // Row r's column block j: (mean, M2) of its columns of the new residual row.
        const std::vector<float2> stats = from_device(d_stats, n_counters);
        const int cols = (C + shape.col_blocks - 1) / shape.col_blocks;
        for (int r = 0; r < R; ++r) {
          for (int j = 0; j < shape.col_blocks; ++j) {
            const int c0 = std::min(C, j * cols), c1 = std::min(C, c0 + cols);
            double mean = 0, m2 = 0;
            for (int c = c0; c < c1; ++c) mean += got[static_cast<size_t>(q_rows[r]) * C + c];
            mean = c1 > c0 ? mean / (c1 - c0) : 0.0;
            for (int c = c0; c < c1; ++c) m2 += std::pow(got[static_cast<size_t>(q_rows[r]) * C + c] - mean, 2);
            const float2 st = stats[static_cast<size_t>(r) * shape.col_blocks + j];
            EXPECT_NEAR(st.x, mean, 1e-5 * (1.0 + std::abs(mean))) << "row " << r << " block " << j;
            EXPECT_NEAR(st.y, m2, 1e-4 * (1.0 + m2)) << "row " << r << " block " << j;
          }
        }
      }
    }
    cudaFree(d_stats);
    for (void* ptr : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dw),
                      static_cast<void*>(d_bias), static_cast<void*>(d_res), static_cast<void*>(d_rows),
                      static_cast<void*>(d_slots), static_cast<void*>(d_lengths), static_cast<void*>(d_partials),
                      static_cast<void*>(d_counters)}) {
      cudaFree(ptr);
    }
  }
}

TEST(AttentionProjCuda, RefusesShapesItDoesNotTake) {
  EXPECT_FALSE(inference_cuda::attention_proj_supported(96, 512, 4));
  EXPECT_FALSE(inference_cuda::attention_proj_supported(64, 1 << 20, 4));
  EXPECT_FALSE(inference_cuda::attention_proj_supported(64, 512, 0));
  EXPECT_TRUE(inference_cuda::attention_proj_supported(64, 512, 8));
  inference_cuda::AttentionProjParams p;
  EXPECT_THROW(inference_cuda::attention_proj(p, nullptr), std::invalid_argument);
}

// ---- ln2 + fc + GELU + fc_proj + residual in one kernel (FLASHGPT_CUDA_DECODE=layer3) ------

// (mean, M2) of x[c0 .. c1) in double.
std::pair<double, double> chunk_stats(const float* x, int c0, int c1) {
  if (c1 <= c0) return {0.0, 0.0};
  double mean = 0, m2 = 0;
  for (int c = c0; c < c1; ++c) mean += x[c];
  mean /= c1 - c0;
  for (int c = c0; c < c1; ++c) m2 += (x[c] - mean) * (x[c] - mean);
  return {mean, m2};
}

// The kernel's definition written plainly, in double: LayerNorm of each row (from the row,
// not from the statistics handed in), rounded to bf16; fc + bias, GELU, rounded to bf16;
// x + fc_proj + bias.
std::vector<double> mlp_reference(const std::vector<float>& x, const std::vector<float>& ln_w,
                                  const std::vector<float>& ln_b, const std::vector<float>& fc_w,
                                  const std::vector<float>& fc_b, const std::vector<float>& fcp_w,
                                  const std::vector<float>& fcp_b, int rows, int C, int F) {
  std::vector<double> out(x.begin(), x.end());
  std::vector<float> xn(static_cast<size_t>(C)), h(static_cast<size_t>(F));
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + static_cast<size_t>(r) * C;
    const auto [mean, m2] = chunk_stats(xr, 0, C);
    const double rstd = 1.0 / std::sqrt(m2 / C + 1e-5);
    for (int c = 0; c < C; ++c) xn[c] = bf16_round(static_cast<float>((xr[c] - mean) * rstd * ln_w[c] + ln_b[c]));
    for (int f = 0; f < F; ++f) {
      double a = fc_b[f];
      for (int c = 0; c < C; ++c) a += static_cast<double>(fc_w[static_cast<size_t>(f) * C + c]) * xn[c];
      h[f] = bf16_round(gelu_tanh_ref(a));
    }
    for (int c = 0; c < C; ++c) {
      double y = fcp_b[c];
      for (int f = 0; f < F; ++f) y += static_cast<double>(fcp_w[static_cast<size_t>(c) * F + f]) * h[f];
      out[static_cast<size_t>(r) * C + c] += y;
    }
  }
  return out;
}

struct MlpShape {
  int rows, C, F, width;  // width: the incoming statistics' chunk width
};

// Awkward shapes: d_model 64 .. 1024 (above 768 the weights left after the wait), 96 (a
// thread's column slots half used), d_ff 48 (a grid of 3 blocks, all of them reducing), 1 to
// 4 rows, incoming statistics in chunks that do not divide d_model (the last short, or
// empty); rows with a large mean. Launched 3 times on the same inputs (plain, then
// programmatic): x and the outgoing statistics within tolerance of the reference and
// bit-identical across launches (the ticket counter, never reset, keeps counting).
TEST(MlpFusedCuda, MatchesReference) {
  std::mt19937 rng(23);
  std::normal_distribution<float> normal;
  for (const MlpShape& shape : {MlpShape{1, 768, 3072, 96}, MlpShape{4, 768, 3072, 32}, MlpShape{2, 128, 512, 40},
                                MlpShape{3, 64, 256, 8}, MlpShape{1, 1024, 1024, 32}, MlpShape{4, 96, 48, 11},
                                MlpShape{2, 96, 48, 96}}) {
    const int R = shape.rows, C = shape.C, F = shape.F;
    SCOPED_TRACE(::testing::Message() << "rows " << R << " C " << C << " F " << F << " width " << shape.width);
    const inference_cuda::MlpPlan plan = inference_cuda::mlp_fused_plan(R, C, F);
    ASSERT_TRUE(plan.ok) << plan.why;
    ASSERT_EQ(plan.rows_max, R);
    std::vector<float> x(static_cast<size_t>(R) * C), ln_w(C), ln_b(C), fc_w(static_cast<size_t>(F) * C), fc_b(F);
    std::vector<float> fcp_w(static_cast<size_t>(C) * F), fcp_b(C);
    for (int r = 0; r < R; ++r) {
      const float offset = r == 1 ? 30.0f : 0.0f;  // a large mean
      for (int c = 0; c < C; ++c) x[static_cast<size_t>(r) * C + c] = offset + (1.0f + r) * normal(rng);
    }
    for (auto& v : ln_w) v = 1.0f + 0.2f * normal(rng);
    for (auto& v : ln_b) v = 0.1f * normal(rng);
    for (auto& v : fc_w) v = bf16_round(normal(rng) / std::sqrt(static_cast<float>(C)));
    for (auto& v : fc_b) v = 0.1f * normal(rng);
    for (auto& v : fcp_w) v = bf16_round(normal(rng) / std::sqrt(static_cast<float>(F)));
    for (auto& v : fcp_b) v = 0.1f * normal(rng);
    const int parts = (C + shape.width - 1) / shape.width + (shape.width == 11 ? 1 : 0);  // one empty chunk too
    std::vector<float2> stats_in(static_cast<size_t>(R) * parts);
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < parts; ++k) {
        const int c0 = std::min(C, k * shape.width), c1 = std::min(C, c0 + shape.width);
        const auto [mean, m2] = chunk_stats(x.data() + static_cast<size_t>(r) * C, c0, c1);
        stats_in[static_cast<size_t>(r) * parts + k] = make_float2(static_cast<float>(mean), static_cast<float>(m2));
      }
    }
    const std::vector<double> want = mlp_reference(x, ln_w, ln_b, fc_w, fc_b, fcp_w, fcp_b, R, C, F);
    auto* d_x = to_device(x);
    auto* d_ln_w = to_device(ln_w);
    auto* d_ln_b = to_device(ln_b);
    auto* d_fc_w = to_device(to_bf16(fc_w));
    auto* d_fc_b = to_device(fc_b);
    auto* d_fcp_w = to_device(to_bf16(fcp_w));
    auto* d_fcp_b = to_device(fcp_b);
    auto* d_stats_in = to_device(stats_in);
    const size_t n_out = static_cast<size_t>(R) * (C / 32);
    auto* d_stats_out = to_device(std::vector<float2>(n_out, make_float2(NAN, NAN)));
    auto* d_partials = to_device(std::vector<float>(static_cast<size_t>(plan.grid) * R * C, NAN));
    auto* d_arrive = to_device(std::vector<unsigned long long>{0});
    inference_cuda::MlpParams p;
    p.x = d_x, p.ln_w = d_ln_w, p.ln_b = d_ln_b, p.ln_stats = d_stats_in, p.ln_parts = parts, p.ln_width = shape.width;
    p.fc_w = d_fc_w, p.fc_b = d_fc_b, p.fcp_w = d_fcp_w, p.fcp_b = d_fcp_b, p.partials = d_partials;
    p.arrive = d_arrive, p.stats_out = d_stats_out, p.rows = R, p.C = C, p.F = F;
    std::vector<float> first, first_stats;
    for (int launch = 0; launch < 3; ++launch) {
      ASSERT_EQ(cudaMemcpy(d_x, x.data(), x.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      p.programmatic = launch > 0;
      inference_cuda::mlp_fused(p, plan, nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> got = from_device(d_x, x.size());
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
      EXPECT_LT(worst, 3e-3) << "launch " << launch;
      const std::vector<float2> st = from_device(d_stats_out, n_out);
      std::vector<float> flat;
      for (int r = 0; r < R; ++r) {
        for (int k = 0; k < C / 32; ++k) {
          const auto [mean, m2] = chunk_stats(got.data() + static_cast<size_t>(r) * C, 32 * k, 32 * k + 32);
          const float2 s = st[static_cast<size_t>(r) * (C / 32) + k];
          EXPECT_NEAR(s.x, mean, 1e-5 * (1.0 + std::abs(mean))) << "row " << r << " chunk " << k;
          EXPECT_NEAR(s.y, m2, 1e-4 * (1.0 + m2)) << "row " << r << " chunk " << k;
          flat.push_back(s.x), flat.push_back(s.y);
        }
      }
      if (launch == 0) {
        first = got, first_stats = flat;
      } else {
        EXPECT_EQ(got, first) << "launch " << launch << ": not deterministic";
        EXPECT_EQ(flat, first_stats) << "launch " << launch << ": statistics not deterministic";
      }
    }
    EXPECT_EQ(from_device(d_arrive, 1)[0], 3ull * plan.grid);
    for (void* ptr : {static_cast<void*>(d_x), static_cast<void*>(d_ln_w), static_cast<void*>(d_ln_b),
                      static_cast<void*>(d_fc_w), static_cast<void*>(d_fc_b), static_cast<void*>(d_fcp_w),
                      static_cast<void*>(d_fcp_b), static_cast<void*>(d_stats_in), static_cast<void*>(d_stats_out),
                      static_cast<void*>(d_partials), static_cast<void*>(d_arrive)}) {
      cudaFree(ptr);
    }
  }
}

TEST(MlpFusedCuda, RefusesShapesItDoesNotTake) {
  EXPECT_FALSE(inference_cuda::mlp_fused_plan(1, 100, 512).ok);   // d_model % 32
  EXPECT_FALSE(inference_cuda::mlp_fused_plan(1, 128, 520).ok);   // d_ff % 16
  EXPECT_FALSE(inference_cuda::mlp_fused_plan(1, 2048, 512).ok);  // 64 reducing blocks, a grid of 32
  EXPECT_FALSE(inference_cuda::mlp_fused_plan(0, 128, 512).ok);
  const inference_cuda::MlpPlan plan = inference_cuda::mlp_fused_plan(8, 768, 3072);  // the seed config
  ASSERT_TRUE(plan.ok) << plan.why;
  EXPECT_EQ(plan.grid, 3072 / inference_cuda::kMlpSlice);
  EXPECT_GE(plan.rows_max, 1);
  EXPECT_LE(plan.rows_max, inference_cuda::kMlpMaxRows);
  inference_cuda::MlpParams p;
  EXPECT_THROW(inference_cuda::mlp_fused(p, plan, nullptr), std::invalid_argument);
}

// A seed-shaped miniature (head dim 64), context 96, GPT-2 initialisation plus noise on
// every parameter (biases and LayerNorm included, so none hides behind zeros and ones).
// (Scaling the weights up to spread the logits made attention nearly one-hot, where bf16
// rounding of q and k flips which key wins: GPU and CPU then differ by 30% of the logits.)
ModelConfig mini_config() {
  ModelConfig c = model_preset("tiny", 1000);
  c.preset = "custom";
  c.d_model = 128, c.n_head = 2, c.d_ff = 512, c.n_layer = 3, c.context = 96;
  c.dropout = 0.0f;
  return c;
}

std::vector<float> random_params(const ModelConfig& c, uint64_t seed) {
  std::vector<float> p(static_cast<size_t>(model_param_count(c)));
  model_init_params(c, seed, p);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (auto& v : p) v += noise(rng);
  return p;
}

std::vector<TokenId> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(static_cast<size_t>(n));
  for (auto& v : t) v = static_cast<TokenId>(rng() % vocab);
  return t;
}

struct Top2 {
  TokenId best;
  float margin;  // top1 - top2
  float scale;   // max |logit|
};
Top2 top2(std::span<const float> logits) {
  Top2 t{0, 0, 0};
  float a = -INFINITY, b = -INFINITY;
  for (size_t i = 0; i < logits.size(); ++i) {
    t.scale = std::max(t.scale, std::abs(logits[i]));
    if (logits[i] > a) {
      b = a, a = logits[i], t.best = static_cast<TokenId>(i);
    } else if (logits[i] > b) {
      b = logits[i];
    }
  }
  t.margin = a - b;
  return t;
}

TokenId argmax(std::span<const float> logits) { return top2(logits).best; }

// Logits `h` of one row against `f` (whose top two are `t`): the largest difference scaled by
// max(1, t.scale), returned; where f's top two are `apart`, h must pick the same token.
double scaled_gap_same_pick(std::span<const float> f, std::span<const float> h, const Top2& t, bool apart, int64_t row,
                            int step) {
  double err = 0;
  for (size_t i = 0; i < f.size(); ++i) err = std::max(err, double(std::abs(f[i] - h[i])));
  if (apart) {
    EXPECT_EQ(argmax(h), t.best) << "row " << row << " step " << step;
  }
  return err / std::max(1.0f, t.scale);
}

// Greedy decoding of 3 ragged prompts at once (decode steps through the CUDA graph) equals,
// token for token, the argmax of an uncached prefill of each prefix on the GPU (no graph,
// FlashAttention over the whole sequence).
// Through the fused path and the persistent path (FLASHGPT_CUDA_DECODE).
void expect_cached_greedy_equals_uncached(const char* mode) {
  SCOPED_TRACE(mode);
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 5);
  EXPECT_EQ(setenv("FLASHGPT_CUDA_DECODE", mode, 1), 0);
  auto cached = inference_create_cuda(c, params, {.max_slots = 3});
  EXPECT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
  auto uncached = inference_create_cuda(c, params, {.max_slots = 1});
  const int64_t V = c.vocab_size;
  std::vector<std::vector<TokenId>> seqs = {random_tokens(5, V, 1), random_tokens(1, V, 2), random_tokens(23, V, 3)};
  std::vector<SlotChunk> chunks;
  std::vector<uint64_t> index = {0, 1, 2}, step = {0, 0, 0};
  std::vector<TokenId> drawn(3);
  const SamplingConfig greedy{.greedy = true};
  int compared = 0, near_ties = 0;
  std::vector<float> logits(static_cast<size_t>(V));
  for (int s = 0; s < 60; ++s) {
    chunks.clear();
    for (int64_t b = 0; b < 3; ++b) {
      const auto& seq = seqs[b];
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seq) : std::span<const TokenId>(seq).last(1)});
    }
    cached->forward_sample(chunks, greedy, index, step, drawn);
    for (int64_t b = 0; b < 3; ++b) {
      uncached->reset(0);
      const SlotChunk whole{0, seqs[b]};
      uncached->forward({&whole, 1}, logits);
      const Top2 t = top2(logits);
      if (t.margin > 1e-2f * std::max(1.0f, t.scale)) {
        EXPECT_EQ(drawn[b], t.best) << "row " << b << " step " << s;
        ++compared;
      } else {
        ++near_ties;
      }
      seqs[b].push_back(drawn[b]);  // teacher-forced on the cached choice either way
    }
  }
  EXPECT_EQ(cached->length(2), 23 + 59);
  EXPECT_GE(compared, 150);  // of 180 (the rest are near ties, not compared)
  EXPECT_LE(near_ties, 30);
  std::printf("cached vs uncached (%s): %d greedy tokens equal, %d near ties not compared\n", mode, compared,
              near_ties);
}

TEST(InferenceCuda, CachedGreedyEqualsUncachedRecompute) {
  for (const char* mode : {"fused", "persistent", "attnproj", "layer3"}) expect_cached_greedy_equals_uncached(mode);
}

// The GPU engine against the fp32 CPU engine on the same weights, fed the same tokens:
// logits within bf16 tolerance, and the GPU's greedy token equal to the CPU's wherever the
// CPU's top two logits are more than the tolerance apart.
TEST(InferenceCuda, MatchesCpuEngine) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 9);
  auto gpu = inference_create_cuda(c, params, {.max_slots = 2});
  auto cpu = inference_create_cpu(c, params, {.max_slots = 2, .threads = 1});
  const int64_t V = c.vocab_size;
  std::vector<std::vector<TokenId>> seqs = {random_tokens(7, V, 4), random_tokens(12, V, 5)};
  std::vector<float> lg(static_cast<size_t>(2 * V)), lc(lg.size());
  double worst = 0;
  int compared = 0;
  for (int s = 0; s < 40; ++s) {
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < 2; ++b) {
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
    }
    gpu->forward(chunks, lg);
    cpu->forward(chunks, lc);
    for (int64_t b = 0; b < 2; ++b) {
      const std::span<const float> g(lg.data() + b * V, V), h(lc.data() + b * V, V);
      const Top2 t = top2(h);
      const bool apart = t.margin > 3e-2f * std::max(1.0f, t.scale);
      worst = std::max(worst, scaled_gap_same_pick(h, g, t, apart, b, s));
      compared += apart ? 1 : 0;
      seqs[b].push_back(t.best);  // the CPU's greedy choice
    }
  }
  EXPECT_LT(worst, 3e-2);
  EXPECT_GE(compared, 50);  // of 80
  std::printf("GPU vs CPU engine: max |logit difference| / max |logit| = %.3g over 40 steps, %d greedy tokens compared\n",
              worst, compared);
}

// GPU sampling draws inside the allowed set of sampling_allowed_set on the same logits
// (a second engine in the same state gives them, bit for bit), greedy equals the argmax,
// and a seed repeats through generate_tokens while another seed differs.
TEST(InferenceCuda, SamplingOnGpu) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 13);
  const int64_t V = c.vocab_size, R = 16;
  const auto prompt = random_tokens(9, V, 6);
  const std::vector<SamplingConfig> configs = {
      {.greedy = true},
      {.temperature = 1.0f, .seed = 1},
      {.temperature = 1.0f, .top_k = 5, .seed = 2},
      {.temperature = 0.7f, .top_p = 0.5f, .seed = 3},
      {.temperature = 1.3f, .top_k = 40, .top_p = 0.9f, .seed = 4},
      {.temperature = 2.0f, .top_k = 1, .seed = 5},
  };
  for (const SamplingConfig& sc : configs) {
    auto a = inference_create_cuda(c, params, {.max_slots = R});
    auto b = inference_create_cuda(c, params, {.max_slots = R});
    std::vector<SlotChunk> chunks;
    std::vector<uint64_t> index, step;
    for (int64_t r = 0; r < R; ++r) chunks.push_back({r, prompt}), index.push_back(100 + r), step.push_back(r % 3);
    std::vector<float> logits(static_cast<size_t>(R * V));
    std::vector<TokenId> drawn(static_cast<size_t>(R));
    a->forward(chunks, logits);
    b->forward_sample(chunks, sc, index, step, drawn);
    std::set<TokenId> distinct;
    for (int64_t r = 0; r < R; ++r) {
      const auto allowed = sampling_allowed_set(std::span<const float>(logits.data() + r * V, V), sc);
      EXPECT_TRUE(std::binary_search(allowed.begin(), allowed.end(), drawn[r]))
          << "temperature " << sc.temperature << " top_k " << sc.top_k << " top_p " << sc.top_p << " row " << r
          << " drew " << drawn[r] << " of " << allowed.size() << " allowed";
      distinct.insert(drawn[r]);
    }
    if (!sc.greedy && sc.top_k != 1) {
      EXPECT_GT(distinct.size(), 1u) << "16 draws all gave one token";
    }
  }
  // Seeds repeat through the whole loop (prefill, graph-captured decode steps, refills).
  const auto tokenizer_free_run = [&](uint64_t seed) {
    auto e = inference_create_cuda(c, params, {.max_slots = 2});
    std::vector<std::vector<TokenId>> out;
    std::vector<std::vector<TokenId>> seqs = {random_tokens(4, V, 7), random_tokens(11, V, 8)};
    std::vector<uint64_t> index = {0, 1}, step = {0, 0};
    std::vector<TokenId> drawn(2);
    const SamplingConfig sc{.temperature = 1.0f, .top_k = 50, .top_p = 0.95f, .seed = seed};
    for (int s = 0; s < 30; ++s) {
      std::vector<SlotChunk> chunks;
      for (int64_t b = 0; b < 2; ++b) {
        chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
      }
      e->forward_sample(chunks, sc, index, step, drawn);
      for (int64_t b = 0; b < 2; ++b) seqs[b].push_back(drawn[b]), step[b] += 1;
    }
    return seqs;
  };
  const auto first = tokenizer_free_run(42), again = tokenizer_free_run(42), other = tokenizer_free_run(43);
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other);
}

// The fused decode path (the default) against the earlier path of separate kernels
// (FLASHGPT_CUDA_DECODE=gemv: LayerNorm, bias, GELU, the qkv split, the two-kernel
// flash-decoding) on the same weights and tokens, at batch 1, 2, 3 and 5 with ragged
// prompts, a call that mixes a short prefill chunk with decode rows (fused, <= 8 rows) and
// prefills of more rows (cuBLAS): logits within bf16 tolerance, greedy tokens equal where
// the top two are apart, through forward_sample's graphs as well.
TEST(InferenceCuda, FusedPathMatchesSeparateKernels) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 21);
  const int64_t V = c.vocab_size;
  for (const int64_t B : {1, 2, 3, 5}) {
    SCOPED_TRACE(::testing::Message() << "batch " << B);
    ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", "gemv", 1), 0);
    auto separate = inference_create_cuda(c, params, {.max_slots = B});
    ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", "fused", 1), 0);  // not the persistent path (tested below)
    auto fused = inference_create_cuda(c, params, {.max_slots = B});
    auto fused_logits = inference_create_cuda(c, params, {.max_slots = B});  // the fused path's logits
    ASSERT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
    std::vector<std::vector<TokenId>> seqs;
    for (int64_t b = 0; b < B; ++b) seqs.push_back(random_tokens(1 + 4 * b, V, static_cast<uint32_t>(30 + b)));
    std::vector<float> lf(static_cast<size_t>(B * V)), lf2(lf.size()), ls(lf.size());
    std::vector<uint64_t> index(B), step(B, 0);
    for (int64_t b = 0; b < B; ++b) index[b] = b;
    std::vector<TokenId> drawn_f(B), drawn_s(B);
    double worst = 0;
    int compared = 0, sampled = 0;
    for (int s = 0; s < 12; ++s) {
      if (s == 5) {  // slot 0 restarts with a 3-token prompt beside the others' decode rows
        fused->reset(0), separate->reset(0), fused_logits->reset(0);
        seqs[0] = random_tokens(3, V, 99);
      }
      std::vector<SlotChunk> chunks;
      for (int64_t b = 0; b < B; ++b) {
        const bool whole = s == 0 || (s == 5 && b == 0);
        chunks.push_back({b, whole ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
      }
      fused_logits->forward(chunks, lf);
      if (s % 2 == 0) {
        fused->forward(chunks, lf2);
        separate->forward(chunks, ls);
        EXPECT_EQ(lf, lf2) << "step " << s;  // the fused path is deterministic
      } else {
        fused->forward_sample(chunks, {.greedy = true}, index, step, drawn_f);
        separate->forward_sample(chunks, {.greedy = true}, index, step, drawn_s);
      }
      for (int64_t b = 0; b < B; ++b) {
        const std::span<const float> f(lf.data() + b * V, V);
        const Top2 t = top2(f);
        const bool apart = t.margin > 3e-2f * std::max(1.0f, t.scale);
        if (s % 2 == 0) {
          const std::span<const float> h(ls.data() + b * V, V);
          worst = std::max(worst, scaled_gap_same_pick(f, h, t, apart, b, s));
        } else {
          // Greedy from the head's argmax partials is exactly the argmax of the same logits.
          EXPECT_EQ(drawn_f[b], t.best) << "row " << b << " step " << s;
          if (apart) {
            EXPECT_EQ(drawn_s[b], drawn_f[b]) << "row " << b << " step " << s;
          }
          ++sampled;
        }
        compared += apart ? 1 : 0;
        seqs[b].push_back(t.best);
      }
    }
    EXPECT_LT(worst, 3e-2);
    EXPECT_GE(compared, 6 * B);
    EXPECT_EQ(sampled, 6 * B);
  }
}

// The persistent decode path (the default for decode steps of at most 8 rows where its
// plan fits the device; FLASHGPT_CUDA_DECODE=persistent requires it) against the fused
// path of one kernel per product (FLASHGPT_CUDA_DECODE=fused) on the same random weights
// and tokens: logits within bf16 tolerance and bit-identical on a repeat, greedy tokens from
// its graph equal to the argmax of its own logits and to the fused path's where the top two
// are apart; at cache lengths 1 .. 20 (from one-token starts) and around the end of the
// cache (ragged prefills, then steps to lengths 511 and 512 where the context allows), at
// batch 1 and 8 (the largest it takes), for head dims 32 (the tiny preset), 64 (a
// seed-shaped miniature with context 512) and the seed preset itself; with the head after the
// persistent launch (the default) and inside it (FLASHGPT_PERSISTENT_HEAD=1).
// `mode` "attnproj" runs the same comparison for the fused path with attention and proj in
// one kernel.
void expect_path_matches_fused(const char* mode, const ModelConfig& c, const std::vector<float>& params,
                               uint32_t seed, int64_t B, int64_t long_prefill, bool head_inside) {
  SCOPED_TRACE(::testing::Message() << mode << ": " << c.preset << " d_model " << c.d_model << " batch " << B
                                    << (head_inside ? ", head inside" : ""));
  const int64_t V = c.vocab_size;
  if (std::string(mode) == "persistent") {
    const inference_cuda::PersistentDecodePlan plan = inference_cuda::persistent_decode_plan(
        static_cast<int>(B), static_cast<int>(c.d_model), static_cast<int>(c.d_ff), static_cast<int>(c.n_head),
        static_cast<int>(c.head_dim()), static_cast<int>(c.context));
    ASSERT_TRUE(plan.ok) << plan.why;
    std::printf("persistent plan: grid %d, %d weight buffers of %lld bytes, %lld bytes of shared memory a block\n",
                plan.grid, plan.slots, static_cast<long long>(plan.slot_bytes), static_cast<long long>(plan.shared));
  }
  ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", "fused", 1), 0);
  auto fused = inference_create_cuda(c, params, {.max_slots = B});
  const bool wide = std::string(mode) == "attnproj_wide";  // with FLASHGPT_GEMV_WIDE=1
  ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", wide ? "attnproj" : mode, 1), 0);
  ASSERT_EQ(setenv("FLASHGPT_PERSISTENT_HEAD", head_inside ? "1" : "0", 1), 0);
  ASSERT_EQ(setenv("FLASHGPT_GEMV_WIDE", wide ? "1" : "0", 1), 0);
  auto pers = inference_create_cuda(c, params, {.max_slots = B});
  auto pers_logits = inference_create_cuda(c, params, {.max_slots = B});
  ASSERT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
  ASSERT_EQ(unsetenv("FLASHGPT_PERSISTENT_HEAD"), 0);
  ASSERT_EQ(unsetenv("FLASHGPT_GEMV_WIDE"), 0);
  std::vector<uint64_t> index(B), step(B, 0);
  for (int64_t b = 0; b < B; ++b) index[b] = b;
  std::vector<float> lp(static_cast<size_t>(B * V)), lp2(lp.size()), lf(lp.size());
  std::vector<TokenId> drawn_p(B), drawn_f(B);
  double worst = 0;
  int compared = 0, steps = 0;
  std::set<int64_t> lengths_seen;
  // Runs one call of `chunks` on all three engines; decode steps alternate between
  // forward (logits compared) and forward_sample (the graph; tokens compared).
  auto run = [&](std::vector<std::vector<TokenId>>& seqs, const std::vector<int64_t>& take, int s) {
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < B; ++b) {
      chunks.push_back({b, std::span<const TokenId>(seqs[b]).last(static_cast<size_t>(take[b]))});
    }
    const bool decode = std::all_of(take.begin(), take.end(), [](int64_t n) { return n == 1; });
    pers_logits->forward(chunks, lp);
    if (!decode || s % 2 == 0) {
      pers->forward(chunks, lp2);
      fused->forward(chunks, lf);
      EXPECT_EQ(lp, lp2) << "step " << s;  // deterministic
    } else {
      pers->forward_sample(chunks, {.greedy = true}, index, step, drawn_p);
      fused->forward_sample(chunks, {.greedy = true}, index, step, drawn_f);
    }
    for (int64_t b = 0; b < B; ++b) {
      if (decode) lengths_seen.insert(pers->length(b));
      const std::span<const float> f(lp.data() + b * V, V);
      const Top2 t = top2(f);
      const bool apart = t.margin > 3e-2f * std::max(1.0f, t.scale);
      if (!decode || s % 2 == 0) {
        const std::span<const float> h(lf.data() + b * V, V);
        worst = std::max(worst, scaled_gap_same_pick(f, h, t, apart, b, s));
      } else {
        EXPECT_EQ(drawn_p[b], t.best) << "row " << b << " step " << s;
        if (apart) {
          EXPECT_EQ(drawn_f[b], drawn_p[b]) << "row " << b << " step " << s;
        }
      }
      compared += apart ? 1 : 0;
      seqs[b].push_back(t.best);
    }
    ++steps;
  };
  // From one-token starts: cache lengths 1 .. 20 (17 among them), all decode steps.
  std::vector<std::vector<TokenId>> seqs;
  for (int64_t b = 0; b < B; ++b) seqs.push_back(random_tokens(1, V, static_cast<uint32_t>(seed + 7 * b)));
  for (int s = 0; s < 20; ++s) run(seqs, std::vector<int64_t>(B, 1), s);
  // Ragged prefills near the end of the context, then decode steps up to it.
  for (int64_t b = 0; b < B; ++b) {
    fused->reset(b), pers->reset(b), pers_logits->reset(b);
    seqs[b] = random_tokens(long_prefill - b % 2, V, static_cast<uint32_t>(seed + 100 + b));
  }
  std::vector<int64_t> take(B);
  for (int64_t b = 0; b < B; ++b) take[b] = static_cast<int64_t>(seqs[b].size());
  run(seqs, take, 0);
  for (int s = 1; pers->length(0) < c.context; ++s) run(seqs, std::vector<int64_t>(B, 1), s);
  for (const int64_t want : {int64_t{1}, int64_t{17}, c.context - 1, c.context}) {
    EXPECT_TRUE(lengths_seen.count(want)) << "cache length " << want << " not reached";
  }
  EXPECT_LT(worst, 3e-2);
  EXPECT_GE(compared, steps * B / 4);
  std::printf("%s vs fused: %d steps x %lld rows, worst logit error %.2e of the scale, %d compared\n", mode, steps,
              static_cast<long long>(B), worst, compared);
}

// The models the path comparisons below run, without dropout: tiny (head dim 32, d_model 64:
// blocks with no rows), the miniature at context 512 (cache lengths 511 and 512) and the seed
// preset.
struct PathModels {
  ModelConfig tiny, mini, seed;
};
PathModels path_models() {
  PathModels m{model_preset("tiny", 1000), mini_config(), model_preset("seed", 100277)};
  m.mini.context = 512;
  m.tiny.dropout = 0.0f;
  m.seed.dropout = 0.0f;
  return m;
}

TEST(InferenceCuda, PersistentPathMatchesFused) {
  const auto [tiny, mini, seed] = path_models();
  const auto tiny_params = random_params(tiny, 41), mini_params = random_params(mini, 43);
  for (const int64_t B : {1, 8}) {
    for (const bool head_inside : {false, true}) {
      expect_path_matches_fused("persistent", tiny, tiny_params, 41, B, tiny.context - 3, head_inside);
      expect_path_matches_fused("persistent", mini, mini_params, 43, B, mini.context - 3, head_inside);
    }
  }
}

// The attention + proj kernel's path (FLASHGPT_CUDA_DECODE=attnproj) against the fused
// path, as the persistent path above: tiny (head dim 32), the context-512 miniature (cache
// lengths 1, 17, 511, 512) and the seed preset, batch 1 and 8; the seed preset at batch 1
// and 3 with FLASHGPT_GEMV_WIDE=1 as well.
TEST(InferenceCuda, AttnProjPathMatchesFused) {
  const auto [tiny, mini, seed] = path_models();
  const auto tiny_params = random_params(tiny, 51), mini_params = random_params(mini, 53);
  const auto seed_params = random_params(seed, 57);
  for (const int64_t B : {1, 3, 8}) {
    expect_path_matches_fused("attnproj", tiny, tiny_params, 51, B, tiny.context - 3, false);
    expect_path_matches_fused("attnproj", mini, mini_params, 53, B, mini.context - 3, false);
    if (B != 3) expect_path_matches_fused("attnproj", seed, seed_params, 57, B, seed.context - 3, false);
  }
  // With fc_proj's loads all in flight before the wait (FLASHGPT_GEMV_WIDE=1; d_ff 3072).
  for (const int64_t B : {1, 3}) {
    expect_path_matches_fused("attnproj_wide", seed, seed_params, 57, B, seed.context - 3, false);
  }
}

// The three-launches-a-layer path (FLASHGPT_CUDA_DECODE=layer3: ln1 + qkv, attention +
// proj, ln2 + fc + GELU + fc_proj, each LayerNorm from the statistics its residual's writer
// left) against the fused path, as above: tiny (head dim 32, d_model 64: two reducing
// blocks), the context-512 miniature (cache lengths 1, 17, 511, 512) and the seed preset, at
// batch 1 and 3 (it takes up to 4 rows) and, for the small models, 8 (decode steps above 4
// rows take the attnproj path: the fallback). Each comparison also checks that a second
// engine of the mode gives bit-identical logits (the partial sums are added in a fixed
// order, whichever block arrives last).
TEST(InferenceCuda, Layer3PathMatchesFused) {
  const auto [tiny, mini, seed] = path_models();
  const auto tiny_params = random_params(tiny, 61), mini_params = random_params(mini, 63);
  const auto seed_params = random_params(seed, 67);
  for (const int64_t B : {1, 3, 8}) {
    const inference_cuda::MlpPlan plan =
        inference_cuda::mlp_fused_plan(static_cast<int>(B), static_cast<int>(mini.d_model), static_cast<int>(mini.d_ff));
    ASSERT_TRUE(plan.ok) << plan.why;
    EXPECT_EQ(plan.rows_max, std::min<int64_t>(B, inference_cuda::kMlpMaxRows));
    expect_path_matches_fused("layer3", tiny, tiny_params, 61, B, tiny.context - 3, false);
    expect_path_matches_fused("layer3", mini, mini_params, 63, B, mini.context - 3, false);
    if (B != 8) expect_path_matches_fused("layer3", seed, seed_params, 67, B, seed.context - 3, false);
  }
}

// An engine's first call right after its construction, before anything else has waited on
// the device: the engine's uploads and memsets must be ordered before its own stream's work
// (its stream does not wait for the legacy default stream). On an H100, the third engine
// of a path comparison, built after the seed engines were freed and called at once, gave
// all-zero logits at step 0 on the attnproj and layer3 paths (tiny, batch 3). Here a
// reference engine is built and fully synchronized; then, five times per path, device
// memory is filled with 0xff bytes and freed (so reads of what is not yet uploaded give
// NaN, not zeros) and a fresh engine's first call, a batch-3 decode step, must give the
// reference's logits bit for bit. Timing-dependent: a pass does not prove the order, a
// failure shows it missing.
TEST(InferenceCuda, FirstCallRightAfterConstruction) {
  const ModelConfig tiny = path_models().tiny;
  const auto params = random_params(tiny, 81);
  const int64_t B = 3, V = tiny.vocab_size;
  std::vector<std::vector<TokenId>> seqs;
  std::vector<SlotChunk> chunks;
  for (int64_t b = 0; b < B; ++b) seqs.push_back(random_tokens(1, V, static_cast<uint32_t>(81 + b)));
  for (int64_t b = 0; b < B; ++b) chunks.push_back({b, seqs[b]});
  for (const char* mode : {"fused", "attnproj", "layer3"}) {
    SCOPED_TRACE(mode);
    ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", mode, 1), 0);
    std::vector<float> want(static_cast<size_t>(B * V)), got(want.size());
    {
      auto reference = inference_create_cuda(tiny, params, {.max_slots = B});
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // every stream: the reference is complete
      reference->forward(chunks, want);
    }
    EXPECT_TRUE(std::any_of(want.begin(), want.end(), [](float v) { return v != 0.0f; }));
    for (int round = 0; round < 5; ++round) {
      std::vector<void*> poison(4);
      for (void*& p : poison) {
        const size_t bytes = size_t{64} << 20;
        ASSERT_EQ(cudaMalloc(&p, bytes), cudaSuccess);
        ASSERT_EQ(cudaMemset(p, 0xff, bytes), cudaSuccess);
      }
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      for (void* p : poison) ASSERT_EQ(cudaFree(p), cudaSuccess);
      auto fresh = inference_create_cuda(tiny, params, {.max_slots = B});
      fresh->forward(chunks, got);
      EXPECT_EQ(got, want) << "round " << round;
    }
    ASSERT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
  }
}

// FLASHGPT_DECODE_L2_AHEAD=1 (each layer kernel prefetches its role's next-layer weights,
// the last layer's the head's first rows) is a hint only: through the fused, attnproj and
// layer3 paths, an engine with it gives the same logits bit for bit and the same greedy
// tokens (the graph) as one without, over a prefill and 24 decode steps, at batch 1 and 3:
// on the context-512 miniature (its last fc_proj's head range is cut to nothing: the head
// is 4 C C + F C long) and on the seed preset.
void expect_l2_ahead_identical(const char* mode, const ModelConfig& c, const std::vector<float>& params, int64_t B) {
  SCOPED_TRACE(::testing::Message() << mode << ": d_model " << c.d_model << " batch " << B);
  const int64_t V = c.vocab_size;
  ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", mode, 1), 0);
  ASSERT_EQ(setenv("FLASHGPT_DECODE_L2_AHEAD", "0", 1), 0);
  auto off = inference_create_cuda(c, params, {.max_slots = B});
  ASSERT_EQ(setenv("FLASHGPT_DECODE_L2_AHEAD", "1", 1), 0);
  auto on = inference_create_cuda(c, params, {.max_slots = B});
  ASSERT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
  ASSERT_EQ(unsetenv("FLASHGPT_DECODE_L2_AHEAD"), 0);
  std::vector<std::vector<TokenId>> seqs;
  for (int64_t b = 0; b < B; ++b) seqs.push_back(random_tokens(9 + 4 * b, V, static_cast<uint32_t>(71 + b)));
  std::vector<uint64_t> index(B), step(B, 0);
  for (int64_t b = 0; b < B; ++b) index[b] = b;
  std::vector<float> l_off(static_cast<size_t>(B * V)), l_on(l_off.size());
  std::vector<TokenId> t_off(B), t_on(B);
  for (int s = 0; s < 25; ++s) {
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < B; ++b) {
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
    }
    if (s % 2 == 0) {
      off->forward(chunks, l_off);
      on->forward(chunks, l_on);
      ASSERT_EQ(l_on, l_off) << "step " << s;
      for (int64_t b = 0; b < B; ++b) seqs[b].push_back(argmax(std::span<const float>(l_off.data() + b * V, V)));
    } else {
      off->forward_sample(chunks, {.greedy = true}, index, step, t_off);
      on->forward_sample(chunks, {.greedy = true}, index, step, t_on);
      ASSERT_EQ(t_on, t_off) << "step " << s;
      for (int64_t b = 0; b < B; ++b) seqs[b].push_back(t_off[b]);
    }
  }
  EXPECT_EQ(on->length(0), 9 + 24);
}

TEST(InferenceCuda, L2AheadChangesNothing) {
  const auto [tiny, mini, seed] = path_models();
  const auto mini_params = random_params(mini, 73), seed_params = random_params(seed, 79);
  for (const char* mode : {"fused", "attnproj", "layer3"}) {
    for (const int64_t B : {1, 3}) {
      expect_l2_ahead_identical(mode, mini, mini_params, B);
      expect_l2_ahead_identical(mode, seed, seed_params, B);
    }
  }
}

// FLASHGPT_GEMV_MMA=1 (the layer products at 2 .. 8 rows on the tensor-core kernel) sums in
// another order, so not bit for bit: an engine with it on against one with it off, through
// the fused and attnproj paths, on the context-512 miniature at batch 2 and 8 and the seed
// preset at batch 8: the decode steps' logits within bf16 tolerance (greedy picks equal
// where the top two are apart), and the mma kernel launched by the engine with it on.
TEST(InferenceCuda, GemvMmaMatchesScalar) {
  const auto [tiny, mini, seed] = path_models();
  const auto mini_params = random_params(mini, 97), seed_params = random_params(seed, 101);
  const char* outer = std::getenv("FLASHGPT_GEMV_MMA");
  const std::string outer_value = outer ? outer : "";
  for (const auto& [c, params, B] : {std::tuple{&mini, &mini_params, int64_t{2}},
                                     std::tuple{&mini, &mini_params, int64_t{8}},
                                     std::tuple{&seed, &seed_params, int64_t{8}}}) {
    for (const char* mode : {"fused", "attnproj"}) {
      SCOPED_TRACE(::testing::Message() << mode << ": d_model " << c->d_model << " batch " << B);
      const int64_t V = c->vocab_size;
      ASSERT_EQ(setenv("FLASHGPT_CUDA_DECODE", mode, 1), 0);
      ASSERT_EQ(setenv("FLASHGPT_GEMV_MMA", "0", 1), 0);
      auto off = inference_create_cuda(*c, *params, {.max_slots = B});
      ASSERT_EQ(setenv("FLASHGPT_GEMV_MMA", "1", 1), 0);
      auto on = inference_create_cuda(*c, *params, {.max_slots = B});
      ASSERT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
      ASSERT_EQ(outer ? setenv("FLASHGPT_GEMV_MMA", outer_value.c_str(), 1) : unsetenv("FLASHGPT_GEMV_MMA"), 0);
      std::vector<std::vector<TokenId>> seqs;
      for (int64_t b = 0; b < B; ++b) seqs.push_back(random_tokens(5 + 3 * b, V, static_cast<uint32_t>(61 + b)));
      std::vector<float> l_off(static_cast<size_t>(B * V)), l_on(l_off.size());
      double worst = 0;
      int64_t launched = 0;
      for (int s = 0; s < 4; ++s) {  // a prefill (more than 8 rows at batch 8), then decode steps
        std::vector<SlotChunk> chunks;
        for (int64_t b = 0; b < B; ++b) {
          chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
        }
        off->forward(chunks, l_off);
        const int64_t before = inference_cuda::gemv_mma_launch_count();
        on->forward(chunks, l_on);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        if (s > 0) launched += inference_cuda::gemv_mma_launch_count() - before;
        for (int64_t b = 0; b < B; ++b) {
          const std::span<const float> f(l_off.data() + b * V, V), h(l_on.data() + b * V, V);
          const Top2 t = top2(f);
          worst = std::max(worst, scaled_gap_same_pick(f, h, t, t.margin > 3e-2f * std::max(1.0f, t.scale), b, s));
          seqs[b].push_back(t.best);
        }
      }
      EXPECT_LT(worst, 3e-2);
      // Every decode step's qkv, fc and fc_proj (the fused path's proj as well) on it.
      EXPECT_GE(launched, 3 * 3 * c->n_layer) << "the switch did not take the mma kernel";
      std::printf("gemv mma vs scalar (%s, d_model %lld, batch %lld): worst logit error %.2e of the scale\n", mode,
                  static_cast<long long>(c->d_model), static_cast<long long>(B), worst);
    }
  }
}

TEST(InferenceCuda, PersistentPathMatchesFusedSeedPreset) {
  ModelConfig seed = model_preset("seed", 100277);
  seed.dropout = 0.0f;
  const auto params = random_params(seed, 47);
  for (const int64_t B : {1, 8}) {
    for (const bool head_inside : {false, true}) {
      expect_path_matches_fused("persistent", seed, params, 47, B, seed.context - 3, head_inside);
    }
  }
}

// Decode steps after the first (graph capture) allocate no device memory.
// Through the fused path and the persistent path (FLASHGPT_CUDA_DECODE).
void expect_decode_steps_allocate_nothing(const char* mode) {
  SCOPED_TRACE(mode);
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 17);
  EXPECT_EQ(setenv("FLASHGPT_CUDA_DECODE", mode, 1), 0);
  auto e = inference_create_cuda(c, params, {.max_slots = 4});
  EXPECT_EQ(unsetenv("FLASHGPT_CUDA_DECODE"), 0);
  std::vector<std::vector<TokenId>> seqs = {random_tokens(3, c.vocab_size, 9), random_tokens(8, c.vocab_size, 10),
                                            random_tokens(2, c.vocab_size, 11), random_tokens(5, c.vocab_size, 12)};
  std::vector<uint64_t> index = {0, 1, 2, 3}, step = {0, 0, 0, 0};
  std::vector<TokenId> drawn(4);
  size_t free_before = 0, free_after = 0, total = 0;
  for (int s = 0; s < 40; ++s) {
    if (s == 3) {
      ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
    }
    std::vector<SlotChunk> chunks;
    for (int64_t b = 0; b < 4; ++b) {
      chunks.push_back({b, s == 0 ? std::span<const TokenId>(seqs[b]) : std::span<const TokenId>(seqs[b]).last(1)});
    }
    e->forward_sample(chunks, {.greedy = true}, index, step, drawn);
    for (int64_t b = 0; b < 4; ++b) seqs[b].push_back(drawn[b]);
  }
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  EXPECT_EQ(free_before, free_after);
}

TEST(InferenceCuda, DecodeStepsAllocateNothing) {
  for (const char* mode : {"fused", "persistent", "attnproj", "layer3"}) expect_decode_steps_allocate_nothing(mode);
}

TEST(InferenceCuda, RejectsBadInput) {
  const ModelConfig c = mini_config();
  const auto params = random_params(c, 1);
  EXPECT_THROW(inference_create_cuda(c, std::span<const float>(params).first(10), {}), Error);
  auto e = inference_create_cuda(c, params, {.max_slots = 2, .max_context = 16});
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  const std::vector<TokenId> bad = {static_cast<TokenId>(c.vocab_size)};
  const SlotChunk chunk{0, bad};
  EXPECT_THROW(e->forward({&chunk, 1}, logits), Error);
  const auto too_long = random_tokens(17, c.vocab_size, 1);
  const SlotChunk long_chunk{0, too_long};
  EXPECT_THROW(e->forward({&long_chunk, 1}, logits), Error);
  const SlotChunk other{5, too_long};
  EXPECT_THROW(e->forward({&other, 1}, logits), Error);
}

}  // namespace
}  // namespace flashgpt
