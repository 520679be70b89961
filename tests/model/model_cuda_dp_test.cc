// The CUDA backend's two data-parallel pieces, on one GPU:
// - the gradient-ready hook: every range of the gradient buffer reported once per backward,
//   the final LayerNorm first, the layers from the last, the embeddings last, and already
//   final when the work enqueued before the report has run (a copy enqueued on the model's
//   stream at report time, as NCCL's fork event orders the bucket's all-reduce, sees the
//   values the step ends with); a step with the hook (eager, per-layer bias adds) equals the
//   step without it (CUDA graphs): bit for bit in deterministic mode, within rounding of
//   the atomics in fast mode;
// - ZeRO-1's sharded moments: a model that keeps the moments of a slice allocates that
//   slice alone (memory_report) and its range update equals the full model's bit for bit.
// The NCCL path itself (world size 1): tests/train/train_dp_gpu_test.py.
#include <flashgpt/dist.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include "model/model_test_support.h"

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

// The seed-shaped miniature of model_cuda_test (head dim 64, every CUDA build has it).
ModelConfig mini_config(float dropout = 0.1f) {
  ModelConfig c = model_preset("tiny", 1000);
  c.preset = "custom";
  c.d_model = 128;
  c.n_head = 2;
  c.d_ff = 512;
  c.n_layer = 3;
  c.dropout = dropout;
  return c;
}

using model::testing::random_windows;

std::unique_ptr<GptModel> make_model(const ModelConfig& config, int64_t B, bool deterministic, bool graphs = true,
                                     int64_t adam_begin = 0, int64_t adam_end = 0) {
  ModelOptions options;
  options.max_batch = B;
  options.deterministic = deterministic;
  options.cuda_graph = graphs;
  options.adam_begin = adam_begin;
  options.adam_end = adam_end;
  auto model = gpt_create_cuda(config, options);
  std::vector<float> params(size_t(model_param_count(config)));
  model_init_params(config, 1234, params);
  model->params_set(params);
  return model;
}

struct Report {
  int64_t begin, end;
};

// Records the reports of one backward and, for each, enqueues a copy of the range on the
// model's stream into `snapshot` (what a reduction ordered after that point would read).
struct HookRecorder {
  GptModel& model;
  float* snapshot = nullptr;  // device, model_param_count floats
  std::vector<Report> reports;
  explicit HookRecorder(GptModel& m) : model(m) {
    const size_t bytes = size_t(model_param_count(m.config())) * sizeof(float);
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&snapshot), bytes), cudaSuccess);
    EXPECT_EQ(cudaMemset(snapshot, 0xff, bytes), cudaSuccess);  // NaN: a range never copied shows
  }
  ~HookRecorder() {
    model.grad_ready_hook_set({});
    cudaFree(snapshot);
  }
  void arm() {
    const GptModel::FlatBuffers flat = model.flat_buffers();
    model.grad_ready_hook_set([this, flat](int64_t begin, int64_t end) {
      reports.push_back(Report{begin, end});
      ASSERT_EQ(cudaMemcpyAsync(snapshot + begin, flat.grads + begin, size_t(end - begin) * sizeof(float),
                                cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(flat.stream)),
                cudaSuccess);
    });
  }
  void disarm() { model.grad_ready_hook_set({}); }
  std::vector<float> snapshot_host() const {
    std::vector<float> out(size_t(model_param_count(model.config())));
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(out.data(), snapshot, out.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
};

void check_hook_reports(bool deterministic) {
  SCOPED_TRACE(deterministic ? "deterministic" : "fast");
  const ModelConfig config = mini_config();
  const int64_t B = 3, T = config.context, V = config.vocab_size, P = model_param_count(config);
  auto model = make_model(config, B, deterministic);
  HookRecorder rec(*model);
  model->grads_zero();
  // Two micro-batches: the first through its graph and unreported, the second reported.
  model->forward_backward(random_windows(B, T, V, 1), B, T, StepRng{5, 0}, 0.5f);
  EXPECT_TRUE(rec.reports.empty());
  rec.arm();
  model->forward_backward(random_windows(B, T, V, 2), B, T, StepRng{5, 1}, 0.5f);
  rec.disarm();
  ASSERT_EQ(rec.reports.size(), size_t(12 * config.n_layer + 4));
  std::vector<int> covered(size_t(P), 0);
  for (const Report& r : rec.reports) {
    ASSERT_TRUE(0 <= r.begin && r.begin < r.end && r.end <= P) << r.begin << ", " << r.end;
    for (int64_t k = r.begin; k < r.end; ++k) covered[size_t(k)] += 1;
  }
  for (int64_t k = 0; k < P; ++k) ASSERT_EQ(covered[size_t(k)], 1) << "float " << k;
  // Order: lnf, then layer L-1 down to 0 (12 tensors each), then wpe and wte.
  const auto specs = model_param_specs(config);
  auto offset = [&](ParamKind kind, int64_t layer) {
    const ParamSpec& s = specs[size_t(kind)];
    return s.offset + layer * (s.numel / config.n_layer);
  };
  EXPECT_EQ(rec.reports[0].begin, specs[size_t(ParamKind::lnf_w)].offset);
  EXPECT_EQ(rec.reports[1].begin, specs[size_t(ParamKind::lnf_b)].offset);
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const int64_t l = config.n_layer - 1 - i;
    for (int k = 0; k < 12; ++k) {
      const auto kind = static_cast<ParamKind>(int(ParamKind::ln1_w) + k);
      EXPECT_EQ(rec.reports[size_t(2 + 12 * i + k)].begin, offset(kind, l)) << "layer " << l << " tensor " << k;
    }
  }
  EXPECT_EQ(rec.reports[rec.reports.size() - 2].begin, specs[size_t(ParamKind::wpe)].offset);
  EXPECT_EQ(rec.reports.back().begin, specs[size_t(ParamKind::wte)].offset);
  // Final when reported: the snapshot taken in stream order equals the step's gradients.
  std::vector<float> grads(static_cast<size_t>(P));
  model->grads_get(grads);
  const std::vector<float> snapshot = rec.snapshot_host();
  for (const Report& r : rec.reports) {
    ASSERT_EQ(std::memcmp(snapshot.data() + r.begin, grads.data() + r.begin, size_t(r.end - r.begin) * sizeof(float)),
              0)
        << "range [" << r.begin << ", " << r.end << ") changed after it was reported";
  }
}

TEST(ModelCudaDp, HookReportsEveryRangeOnceFinalInReverseLayerOrderDeterministic) { check_hook_reports(true); }
// Fast mode: cuBLASLt's bias-gradient epilogues where it offers them, added per layer here.
TEST(ModelCudaDp, HookReportsEveryRangeOnceFinalInReverseLayerOrderFast) { check_hook_reports(false); }

// Three optimizer steps of two micro-batches, the second of each with the hook set (what
// DataParallel does), against the same steps without it.
struct RunResult {
  std::vector<double> losses, norms;
  std::vector<float> params, grads;  // grads: step 3's
  std::vector<float> first_grads;     // step 1's (before AdamW could amplify fast mode's noise)
};
RunResult run_steps(bool deterministic, bool hooked) {
  const ModelConfig config = mini_config();
  const int64_t B = 4, T = config.context, V = config.vocab_size;
  auto model = make_model(config, B, deterministic);
  HookRecorder rec(*model);
  RunResult out;
  AdamWConfig adam;
  adam.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    model->grads_zero();
    for (int64_t micro = 0; micro < 2; ++micro) {
      if (hooked && micro == 1) rec.arm();
      const uint64_t s = uint64_t(2 * step + micro);
      out.losses.push_back(model->forward_backward(random_windows(B, T, V, uint32_t(s)), B, T, StepRng{7, s}, 0.5f));
      rec.disarm();
    }
    const double norm = model->grads_norm();
    out.norms.push_back(norm);
    if (step == 1) {
      out.first_grads.resize(size_t(model_param_count(config)));
      model->grads_get(out.first_grads);
    }
    if (step == 3) {
      out.grads.resize(size_t(model_param_count(config)));
      model->grads_get(out.grads);
    }
    adam.lr = 1e-3 * double(step);
    model->adamw_step(adam, step, norm > 0.5 ? float(0.5 / norm) : 1.0f);
  }
  out.params.resize(size_t(model_param_count(config)));
  model->params_get(out.params);
  EXPECT_EQ(rec.reports.size() > 0, hooked);
  return out;
}

TEST(ModelCudaDp, HookedStepEqualsGraphStepBitForBitDeterministic) {
  const RunResult plain = run_steps(/*deterministic=*/true, /*hooked=*/false);
  const RunResult hooked = run_steps(/*deterministic=*/true, /*hooked=*/true);
  ASSERT_EQ(plain.losses.size(), hooked.losses.size());
  for (size_t i = 0; i < plain.losses.size(); ++i) {
    EXPECT_EQ(std::memcmp(&plain.losses[i], &hooked.losses[i], sizeof(double)), 0) << "loss " << i;
  }
  for (size_t i = 0; i < plain.norms.size(); ++i) {
    EXPECT_EQ(std::memcmp(&plain.norms[i], &hooked.norms[i], sizeof(double)), 0) << "grad norm of step " << i + 1;
  }
  EXPECT_EQ(std::memcmp(plain.first_grads.data(), hooked.first_grads.data(), plain.grads.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(plain.grads.data(), hooked.grads.data(), plain.grads.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(plain.params.data(), hooked.params.data(), plain.params.size() * sizeof(float)), 0);
}

// Fast mode is not bit-reproducible (atomics in the attention backward): step 1's gradients
// per tensor within 1%; a bias gradient added twice or not at all would be far outside.
TEST(ModelCudaDp, HookedStepMatchesGraphStepFast) {
  const RunResult plain = run_steps(/*deterministic=*/false, /*hooked=*/false);
  const RunResult hooked = run_steps(/*deterministic=*/false, /*hooked=*/true);
  const auto specs = model_param_specs(mini_config());
  for (const ParamSpec& s : specs) {
    double diff = 0, ref = 0;
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i) {
      const double d = double(hooked.first_grads[size_t(i)]) - double(plain.first_grads[size_t(i)]);
      diff += d * d;
      ref += double(plain.first_grads[size_t(i)]) * double(plain.first_grads[size_t(i)]);
    }
    EXPECT_LE(std::sqrt(diff), 1e-2 * std::sqrt(ref) + 1e-12) << s.name;
  }
  EXPECT_NEAR(hooked.norms[0], plain.norms[0], 1e-2 * plain.norms[0]);
}

size_t round256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// W ranks' shards (the first from ModelOptions, the others re-sharded after construction)
// against the full model: the moments allocated are the slice's, the update is the same bits.
TEST(ModelCudaDp, ShardedMomentsAreTheSliceAndUpdateLikeTheFullModel) {
  const ModelConfig config = mini_config();
  const int64_t B = 2, T = config.context, V = config.vocab_size, P = model_param_count(config);
  const auto windows = random_windows(B, T, V, 11);
  std::vector<float> m0(static_cast<size_t>(P)), v0(static_cast<size_t>(P));
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 1e-3f);
  for (int64_t i = 0; i < P; ++i) {
    m0[size_t(i)] = normal(rng);
    v0[size_t(i)] = std::abs(normal(rng)) * 1e-3f;
  }
  AdamWConfig adam;
  adam.lr = 1e-3;
  adam.weight_decay = 0.1;
  auto prepare = [&](GptModel& m) {
    m.adam_state_set(m0, v0);
    m.grads_zero();
    m.forward_backward(windows, B, T, StepRng{3, 0}, 1.0f);
  };
  auto full = make_model(config, B, /*deterministic=*/true);
  const GptModel::MemoryReport full_mem = full->memory_report();
  EXPECT_EQ(full_mem.adam_begin, 0);
  EXPECT_EQ(full_mem.adam_end, P);
  EXPECT_EQ(full_mem.adam_bytes, 2 * round256(size_t(P) * sizeof(float)));
  prepare(*full);
  full->adamw_step(adam, 2, 0.75f);
  std::vector<float> full_params(static_cast<size_t>(P)), full_m(static_cast<size_t>(P)), full_v(static_cast<size_t>(P));
  full->params_get(full_params);
  full->adam_state_get(full_m, full_v);

  for (const int W : {2, 3}) {
    const std::vector<int64_t> slices = dist_slices(P, W);
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(W));
      const int64_t begin = slices[size_t(r)], end = slices[size_t(r) + 1];
      std::unique_ptr<GptModel> shard;
      if (r == 0) {
        shard = make_model(config, B, true, true, begin, end);
      } else {
        shard = make_model(config, B, true);
        shard->adam_state_shard(begin, end);
      }
      const GptModel::MemoryReport mem = shard->memory_report();
      EXPECT_EQ(mem.adam_begin, begin);
      EXPECT_EQ(mem.adam_end, end);
      // The slice's moments alone: 2 (end - begin) floats (256-byte rounded), 1/W of the full ones.
      EXPECT_EQ(mem.adam_bytes, 2 * round256(size_t(end - begin) * sizeof(float)));
      EXPECT_LE(mem.adam_bytes, full_mem.adam_bytes / size_t(W) + 2 * (64 * sizeof(float) + 256));
      EXPECT_EQ(full_mem.total_bytes - mem.total_bytes, full_mem.adam_bytes - mem.adam_bytes);
      prepare(*shard);
      EXPECT_THROW(shard->adamw_step(adam, 2, 0.75f), Error);
      // A range reaching one float past the slice.
      EXPECT_THROW(shard->adamw_step_range(adam, 2, 0.75f, begin == 0 ? 0 : begin - 1, begin == 0 ? end + 1 : end),
                   Error);
      shard->adamw_step_range(adam, 2, 0.75f, begin, end);
      std::vector<float> params(static_cast<size_t>(P)), m(size_t(P), -7.0f), v(size_t(P), -7.0f);
      shard->params_get(params);
      shard->adam_state_get(m, v);
      EXPECT_EQ(std::memcmp(params.data() + begin, full_params.data() + begin, size_t(end - begin) * 4), 0);
      EXPECT_EQ(std::memcmp(m.data() + begin, full_m.data() + begin, size_t(end - begin) * 4), 0);
      EXPECT_EQ(std::memcmp(v.data() + begin, full_v.data() + begin, size_t(end - begin) * 4), 0);
      for (int64_t i = 0; i < P; ++i) {  // outside the slice: the caller's values, untouched
        if (i >= begin && i < end) continue;
        ASSERT_EQ(m[size_t(i)], -7.0f) << "moment " << i;
        ASSERT_EQ(v[size_t(i)], -7.0f) << "moment " << i;
      }
    }
  }
  auto model = make_model(config, B, true);
  EXPECT_THROW(model->adam_state_shard(10, 5), Error);
  EXPECT_THROW(model->adam_state_shard(0, P + 1), Error);
}

}  // namespace
}  // namespace flashgpt
