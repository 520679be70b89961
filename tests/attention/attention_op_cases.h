// The attention op's case table (tests/common/op_test.h): every backend runs every case it
// can against a reference, forward and backward. The CPU backend (tiled FlashAttention) runs
// them against the fp32 reference (attention_cpu_test.cc), the CUDA backend against a double
// reference on bf16/fp16-rounded inputs (attention_cuda_test.cc), for the head dims compiled.
// Awkward shapes on purpose: length 1, 17, 1000, 4097; seqlen_q != seqlen_k both ways
// (causal rows that see no key); GQA and MQA; packed variable-length batches with empty
// sequences; dropout; odd tile shapes for the CPU.
#pragma once

#include "attention/attention_cpu_test_support.h"

#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>

#include <ostream>
#include <string>
#include <vector>

namespace flashgpt::testing {

enum AttentionBackend : unsigned { kCpuBackend = 1, kCudaBackend = 2, kAllBackends = 3 };

struct AttentionCase {
  std::string name;
  AttentionShape shape;
  CpuTiling tiling;             // the CPU backend's tiles ({}: its automatic choice)
  DType dtype = DType::bf16;    // the CUDA backend's input type
  bool backward = true;
  unsigned backends = kAllBackends;
};

inline void PrintTo(const AttentionCase& c, std::ostream* os) { *os << c.name; }

inline AttentionCase fp16(AttentionCase c) {
  c.dtype = DType::f16;
  return c;
}

// The cases of the former CPU tiled-vs-reference table (first block) and of the former CUDA
// forward/backward table (second block), now run by both backends. The CUDA block's largest
// problems stay off the CPU, whose normal suite already runs 1000- and 4097-long ones and
// whose slow suite (attention_cpu_slow_test) runs 4097 x 4097 for every head dim.
inline std::vector<AttentionCase> attention_op_cases() {
  const CpuTiling automatic{};
  return {
      {"len1", dense(2, 1, 1, 2, 2, 64, kFull, 0.0f), automatic},
      {"len1_causal_dropout", dense(1, 1, 1, 1, 1, 32, kCausal, 0.2f), automatic},
      {"len17_d32", dense(2, 17, 17, 2, 1, 32, kFull, 0.0f), tiles(4, 5)},
      {"len17_d96_causal", dense(1, 17, 17, 3, 3, 96, kCausal, 0.0f), tiles(3, 7)},
      {"len128_d64_causal_dropout", dense(2, 128, 128, 4, 2, 64, kCausal, 0.1f), automatic},
      {"len128_d128_gqa", dense(1, 128, 128, 4, 2, 128, kFull, 0.0f), budget(16 * 1024)},
      {"len128_d256", dense(1, 128, 128, 2, 2, 256, kFull, 0.3f), budget(64 * 1024)},
      {"len128_d256_mqa_causal", dense(1, 128, 128, 4, 1, 256, kCausal, 0.0f), automatic},
      {"q100_k37_causal", dense(2, 100, 37, 2, 2, 64, kCausal, 0.0f), tiles(16, 8)},
      {"q37_k100_causal", dense(2, 37, 100, 2, 2, 64, kCausal, 0.1f), tiles(8, 16)},
      {"q1_k1000_causal", dense(1, 1, 1000, 2, 1, 32, kCausal, 0.0f), automatic},
      {"q1000_k1_causal", dense(1, 1000, 1, 2, 1, 32, kCausal, 0.0f), automatic},
      {"len1000_d64", dense(1, 1000, 1000, 2, 1, 64, kFull, 0.0f), budget(32 * 1024)},
      {"len1000_d128_causal_dropout", dense(1, 1000, 1000, 1, 1, 128, kCausal, 0.15f),
       budget(256 * 1024, CpuTileRule::max_rows)},
      {"len1000_d32_max_rows", dense(1, 1000, 1000, 2, 2, 32, kFull, 0.0f), budget(16 * 1024, CpuTileRule::max_rows)},
      {"q4097_k64_d64_causal", dense(1, 4097, 64, 1, 1, 64, kCausal, 0.1f), automatic},
      {"q64_k4097_d64", dense(1, 64, 4097, 2, 1, 64, kFull, 0.0f), automatic},
      {"len4097_d32_causal_forward", dense(1, 4097, 4097, 1, 1, 32, kCausal, 0.0f), automatic, DType::bf16, false},
      {"varlen_mixed", varlen({0, 1, 17, 128, 5, 3}, {3, 1, 17, 128, 0, 64}, 2, 1, 64, kFull, 0.0f), tiles(16, 16)},
      {"varlen_mixed_causal_dropout", varlen({0, 1, 17, 128, 40, 3}, {5, 1, 33, 100, 0, 64}, 4, 2, 32, kCausal, 0.2f),
       tiles(8, 12)},
      {"varlen_d256", varlen({1, 0, 77}, {1, 9, 60}, 2, 2, 256, kCausal, 0.0f), automatic},

      {"d64_s1", dense(2, 1, 1, 2, 2, 64, kFull, 0.0f), {}},
      {"d64_s17_causal", dense(2, 17, 17, 3, 3, 64, kCausal, 0.0f), {}},
      fp16({"d128_s17_fp16", dense(1, 17, 17, 2, 2, 128, kFull, 0.0f), {}}),
      fp16({"d64_s200_causal_fp16", dense(1, 200, 200, 2, 2, 64, kCausal, 0.0f), {}}),
      {"d128_s1000", dense(1, 1000, 1000, 2, 2, 128, kFull, 0.0f), {}, DType::bf16, true, kCudaBackend},
      {"d128_s1000_causal", dense(1, 1000, 1000, 2, 2, 128, kCausal, 0.0f), {}, DType::bf16, true, kCudaBackend},
      {"d64_q77_k300_causal", dense(2, 77, 300, 2, 2, 64, kCausal, 0.0f), {}},
      {"d64_q300_k77_causal_empty_rows", dense(1, 300, 77, 2, 2, 64, kCausal, 0.0f), {}},
      {"d128_q130_k33", dense(2, 130, 33, 2, 2, 128, kFull, 0.0f), {}},
      {"d64_gqa_8_2", dense(2, 150, 150, 8, 2, 64, kCausal, 0.0f), {}},
      fp16({"d128_mqa_4_1_fp16", dense(1, 100, 260, 4, 1, 128, kFull, 0.0f), {}}),
      {"d64_dropout", dense(2, 130, 130, 2, 2, 64, kFull, 0.17f), {}},
      {"d128_dropout_causal_gqa", dense(1, 97, 200, 4, 2, 128, kCausal, 0.3f), {}},
      {"d64_varlen_empty", varlen({5, 0, 130, 1, 64}, {7, 3, 130, 0, 200}, 2, 1, 64, kCausal, 0.0f), {}},
      fp16({"d128_varlen_dropout_fp16", varlen({33, 0, 70}, {40, 9, 0}, 2, 2, 128, kFull, 0.1f), {}}),
      {"d128_q513_k700_causal_dropout_fp16", dense(1, 513, 700, 2, 1, 128, kCausal, 0.1f), {}, DType::f16, true,
       kCudaBackend},
      {"d64_q700_k513_causal_fp16", dense(1, 700, 513, 2, 2, 64, kCausal, 0.0f), {}, DType::f16, true, kCudaBackend},
      {"d32_s100_causal", dense(1, 100, 100, 2, 2, 32, kCausal, 0.0f), {}},
      {"d96_s100_causal", dense(1, 100, 100, 2, 2, 96, kCausal, 0.0f), {}},
      {"d256_s100_causal", dense(1, 100, 100, 2, 2, 256, kCausal, 0.0f), {}},
      // d96 and d256 forwards on wgmma: d96's padded rows, several key blocks with partial ones.
      fp16({"d96_q300_k517_gqa_fp16", dense(1, 300, 517, 4, 2, 96, kFull, 0.0f), {}}),
      {"d96_s257_causal_dropout", dense(2, 257, 257, 2, 2, 96, kCausal, 0.1f), {}},
      {"d96_varlen_empty", varlen({40, 0, 150}, {40, 7, 170}, 2, 2, 96, kCausal, 0.0f), {}},
      {"d256_q513_k300_causal_empty_rows", dense(1, 513, 300, 2, 1, 256, kCausal, 0.0f), {}, DType::bf16, true,
       kCudaBackend},
      fp16({"d256_s200_dropout_fp16", dense(1, 200, 200, 2, 2, 256, kFull, 0.1f), {}}),
  };
}

// The CPU backend on one case: the fp32 reference and the tiled path on the same inputs,
// every output compared (max-abs error, scale floor 1).
inline void expect_cpu_matches_reference(const AttentionCase& c) {
  AttentionBuffers<float> want(c.shape);
  want.fill_random(0xabc0 + c.shape.head_dim);
  AttentionBuffers<float> got = want;
  attention_forward_reference(want.params());
  attention_forward_cpu(got.params(), c.tiling);
  EXPECT_TRUE(op_close("O", got.o, want.o, kForwardTol));
  EXPECT_TRUE(op_close("LSE", got.lse, want.lse, kForwardTol));
  if (!c.backward) return;
  // Both backward passes read the tiled forward's O and LSE; the reference ignores them.
  want.o = got.o, want.lse = got.lse;
  attention_backward_reference(want.params());
  attention_backward_cpu(got.params(), c.tiling);
  EXPECT_TRUE(op_close("dQ", got.dq, want.dq, kBackwardTol));
  EXPECT_TRUE(op_close("dK", got.dk, want.dk, kBackwardTol));
  EXPECT_TRUE(op_close("dV", got.dv, want.dv, kBackwardTol));
}

inline std::vector<AttentionCase> cases_for(unsigned backend, std::vector<AttentionCase> cases) {
  std::erase_if(cases, [backend](const AttentionCase& c) { return (c.backends & backend) == 0; });
  return cases;
}

}  // namespace flashgpt::testing
