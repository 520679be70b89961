// The big sweep: full 4097 x 4097 problems for every head dim, forward and backward,
// causal with dropout and GQA. Labelled slow (minutes under the sanitizers); the normal
// suite keeps a 4097-row forward and two 4097-sided backward cases.
#include "attention/attention_op_cases.h"

#include <gtest/gtest.h>

namespace flashgpt {
namespace {

using testing::AttentionCase;
using testing::budget;
using testing::dense;
using testing::kCausal;
using testing::kFull;

// AttentionOp/cpu_slow.<case>: the op-table runner of attention_op_cases.h on 4097 x 4097.
[[maybe_unused]] const int kSlowCases = testing::register_op_cases<AttentionCase>(
    "AttentionOp", "cpu_slow",
    {{"len4097_d32_causal_dropout_gqa", dense(1, 4097, 4097, 2, 1, 32, kCausal, 0.1f), {}},
     {"len4097_d64", dense(1, 4097, 4097, 1, 1, 64, kFull, 0.0f), {}},
     {"len4097_d96_causal", dense(1, 4097, 4097, 1, 1, 96, kCausal, 0.0f), budget(64 * 1024, CpuTileRule::max_rows)},
     {"len4097_d128_dropout", dense(1, 4097, 4097, 1, 1, 128, kFull, 0.2f), {}},
     {"len4097_d256_causal", dense(1, 4097, 4097, 1, 1, 256, kCausal, 0.0f), {}}},
    testing::expect_cpu_matches_reference);

}  // namespace
}  // namespace flashgpt
