#include <flashgpt/attention.h>
#include <flashgpt/error.h>

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace flashgpt {
namespace {

struct DenseFixture {
  std::vector<float> q, k, v, o, lse, d_o, dq, dk, dv;
  AttentionParams params;
  DenseFixture(int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int d) {
    const size_t nq = size_t(batch) * seqlen_q * heads_q * d, nk = size_t(batch) * seqlen_k * heads_kv * d;
    q.resize(nq), o.resize(nq), d_o.resize(nq), dq.resize(nq);
    k.resize(nk), v.resize(nk), dk.resize(nk), dv.resize(nk);
    lse.resize(size_t(batch) * heads_q * seqlen_q + 1);
    params.q = q.data(), params.k = k.data(), params.v = v.data(), params.o = o.data(), params.lse = lse.data();
    params.d_o = d_o.data(), params.dq = dq.data(), params.dk = dk.data(), params.dv = dv.data();
    params.batch = batch, params.seqlen_q = seqlen_q, params.seqlen_k = seqlen_k;
    params.heads_q = heads_q, params.heads_kv = heads_kv, params.head_dim = d;
    attention_set_dense_strides(params);
  }
};

std::string validate_message(const AttentionParams& params, AttentionPass pass) {
  try {
    attention_validate(params, pass);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(AttentionValidate, AcceptsAWellFormedProblem) {
  DenseFixture f(2, 17, 33, 4, 2, 64);
  EXPECT_EQ(validate_message(f.params, AttentionPass::forward), "");
  EXPECT_EQ(validate_message(f.params, AttentionPass::backward), "");
}

TEST(AttentionValidate, NamesEachProblem) {
  struct Case {
    const char* what;
    void (*spoil)(AttentionParams&);
    const char* expected;
  };
  const Case cases[] = {
      {"head dim", [](AttentionParams& p) { p.head_dim = 48; }, "head_dim 48 is not supported"},
      {"gqa", [](AttentionParams& p) { p.heads_kv = 3; }, "must be a multiple of heads_kv (3)"},
      {"dropout 1", [](AttentionParams& p) { p.dropout_p = 1.0f; }, "dropout_p must be in [0, 1)"},
      {"dropout <0", [](AttentionParams& p) { p.dropout_p = -0.1f; }, "dropout_p must be in [0, 1)"},
      {"null q", [](AttentionParams& p) { p.q = nullptr; }, "q, k and v must not be null"},
      {"null lse", [](AttentionParams& p) { p.lse = nullptr; }, "lse must not be null"},
      {"negative seqlen", [](AttentionParams& p) { p.seqlen_k = -1; }, "sequence lengths must be >= 0"},
      {"stride", [](AttentionParams& p) { p.k_row_stride = 0; }, "k has a non-positive stride"},
      {"half varlen", [](AttentionParams& p) { static const int32_t cu[] = {0, 1}; p.cu_seqlens_q = cu; },
       "needs both cu_seqlens_q and cu_seqlens_k"},
  };
  for (const Case& c : cases) {
    DenseFixture f(1, 8, 8, 4, 2, 64);
    c.spoil(f.params);
    EXPECT_NE(validate_message(f.params, AttentionPass::forward).find(c.expected), std::string::npos)
        << c.what << ": " << validate_message(f.params, AttentionPass::forward);
  }
}

TEST(AttentionValidate, BackwardNeedsGradients) {
  DenseFixture f(1, 8, 8, 2, 2, 32);
  f.params.dk = nullptr;
  EXPECT_EQ(validate_message(f.params, AttentionPass::forward), "");
  EXPECT_NE(validate_message(f.params, AttentionPass::backward).find("dq, dk and dv"), std::string::npos);
}

TEST(AttentionValidate, CumulativeOffsetsAreChecked) {
  DenseFixture f(1, 8, 8, 2, 2, 32);
  const int32_t good[] = {0, 3, 3, 8};
  const int32_t decreasing[] = {0, 5, 2, 8};
  const int32_t too_long[] = {0, 1, 2, 12};
  f.params.batch = 3;
  f.params.cu_seqlens_q = f.params.cu_seqlens_k = good;
  EXPECT_NO_THROW(attention_validate_cu_seqlens_host(f.params));
  f.params.cu_seqlens_q = decreasing;
  EXPECT_THROW(attention_validate_cu_seqlens_host(f.params), Error);
  f.params.cu_seqlens_q = too_long;
  EXPECT_THROW(attention_validate_cu_seqlens_host(f.params), Error);
}

TEST(AttentionValidate, DefaultScaleIsInverseSqrtHeadDim) {
  DenseFixture f(1, 1, 1, 1, 1, 64);
  EXPECT_FLOAT_EQ(attention_softmax_scale(f.params), 0.125f);
  f.params.softmax_scale = 0.5f;
  EXPECT_FLOAT_EQ(attention_softmax_scale(f.params), 0.5f);
}

}  // namespace
}  // namespace flashgpt
