// The flash-decoding algorithm on the CPU, written for reading: the reference of the CUDA
// decode kernel (inference_cuda_kernels.cu), which runs the same splits on thread blocks.
//
// One query row attends to n cached keys. The keys are cut into blocks of keys_per_split;
// each block is reduced on its own to (m, l, o): its largest scaled score, the sum of
// exp(score - m) and the sum of exp(score - m) v. Blocks combine through their
// log-sum-exp: with M the largest m, o = sum exp(m_s - M) o_s / sum exp(m_s - M) l_s.
// This is exact (up to rounding): softmax is invariant to the shift, and each block's
// shift is undone by the factor exp(m_s - M).
#include <flashgpt/error.h>
#include <flashgpt/generate.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flashgpt {

void attention_decode_split_reference(const DecodeAttentionParams& p, int64_t keys_per_split) {
  FLASHGPT_CHECK(p.q && p.k && p.v && p.o && p.slots && p.lengths, "attention_decode_split_reference: null pointer");
  FLASHGPT_CHECK(keys_per_split >= 1, "attention_decode_split_reference: keys_per_split must be >= 1, got {}",
                 keys_per_split);
  FLASHGPT_CHECK(p.rows >= 0 && p.heads > 0 && p.head_dim > 0 && p.row_stride >= p.heads * p.head_dim,
                 "attention_decode_split_reference: bad shape rows {} heads {} head_dim {} row_stride {}", p.rows,
                 p.heads, p.head_dim, p.row_stride);
  const int64_t D = p.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  struct Partial {
    float m = 0, l = 0;
    std::vector<float> o;
  };
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t n = p.lengths[r];
    FLASHGPT_CHECK(n >= 1, "attention_decode_split_reference: row {} attends to {} keys (needs at least 1)", r, n);
    for (int64_t h = 0; h < p.heads; ++h) {
      const float* q = p.q + (r * p.heads + h) * D;
      const float* k = p.k + p.slots[r] * p.slot_stride + h * D;
      const float* v = p.v + p.slots[r] * p.slot_stride + h * D;
      // One partial per block of keys.
      std::vector<Partial> parts;
      for (int64_t start = 0; start < n; start += keys_per_split) {
        const int64_t end = std::min(n, start + keys_per_split);
        Partial part;
        part.m = -std::numeric_limits<float>::infinity();
        std::vector<float> s(static_cast<size_t>(end - start));
        for (int64_t j = start; j < end; ++j) {
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k[j * p.row_stride + d];
          s[j - start] = dot * scale;
          part.m = std::max(part.m, s[j - start]);
        }
        part.o.assign(static_cast<size_t>(D), 0.0f);
        for (int64_t j = start; j < end; ++j) {
          const float e = std::exp(s[j - start] - part.m);
          part.l += e;
          for (int64_t d = 0; d < D; ++d) part.o[d] += e * v[j * p.row_stride + d];
        }
        parts.push_back(std::move(part));
      }
      // Combine through the log-sum-exp.
      float M = -std::numeric_limits<float>::infinity();
      for (const Partial& part : parts) M = std::max(M, part.m);
      float L = 0.0f;
      std::vector<float> o(static_cast<size_t>(D), 0.0f);
      for (const Partial& part : parts) {
        const float f = std::exp(part.m - M);
        L += f * part.l;
        for (int64_t d = 0; d < D; ++d) o[d] += f * part.o[d];
      }
      float* out = p.o + (r * p.heads + h) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = o[d] / L;
    }
  }
}

}  // namespace flashgpt
