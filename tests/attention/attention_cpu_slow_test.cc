// The big sweep: full 4097 x 4097 problems for every head dim, forward and backward,
// causal with dropout and GQA. Labelled slow (minutes under the sanitizers); the normal
// suite keeps a 4097-row forward and two 4097-sided backward cases.
#include "attention/attention_cpu_test_support.h"

#include <gtest/gtest.h>

namespace flashgpt {
namespace {

using testing::budget;
using testing::case_name;
using testing::dense;
using testing::kCausal;
using testing::kFull;
using testing::TiledCase;

class TiledMatchesReferenceSlow : public ::testing::TestWithParam<TiledCase> {};
TEST_P(TiledMatchesReferenceSlow, ForwardAndBackward) { testing::expect_tiled_matches_reference(GetParam()); }

INSTANTIATE_TEST_SUITE_P(
    Len4097, TiledMatchesReferenceSlow,
    ::testing::Values(TiledCase{"d32_causal_dropout_gqa", dense(1, 4097, 4097, 2, 1, 32, kCausal, 0.1f), {}},
                      TiledCase{"d64", dense(1, 4097, 4097, 1, 1, 64, kFull, 0.0f), {}},
                      TiledCase{"d96_causal", dense(1, 4097, 4097, 1, 1, 96, kCausal, 0.0f),
                                budget(64 * 1024, CpuTileRule::max_rows)},
                      TiledCase{"d128_dropout", dense(1, 4097, 4097, 1, 1, 128, kFull, 0.2f), {}},
                      TiledCase{"d256_causal", dense(1, 4097, 4097, 1, 1, 256, kCausal, 0.0f), {}}),
    case_name);

}  // namespace
}  // namespace flashgpt
