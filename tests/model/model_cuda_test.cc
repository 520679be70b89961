// The CUDA backend as a whole against the fp32 CPU backend, on the same weights and
// batches: the loss, the logits and every parameter's gradient within bf16 tolerance, with
// dropout off and on (same Philox masks, so the same elements drop); deterministic mode
// repeats bit for bit; a few hundred AdamW steps lower the loss as the CPU run does; no
// device allocation inside a step; bad input is refused with a message.
#include "common/op_test.h"

#include <flashgpt/model.h>

#include "model/model_test_support.h"

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace flashgpt {
namespace {

// ||a - b|| / ||b|| over [begin, end) (op_error's RMS norm, tests/common/op_test.h).
double rel_error(const std::vector<float>& a, const std::vector<float>& b, int64_t begin, int64_t end) {
  const auto n = static_cast<size_t>(end - begin);
  return testing::op_error(std::span<const float>(a).subspan(size_t(begin), n),
                           std::span<const float>(b).subspan(size_t(begin), n), {testing::Norm::rms, 1e-30})
      .value;
}

struct TestModel {
  std::string name;
  ModelConfig config;
};

// tiny (head dim 32) and a seed-shaped miniature (head dim 64, the seed's), vocabulary
// 1000 (padded to 1024, so 24 padding rows).
std::vector<TestModel> test_models(float dropout) {
  ModelConfig tiny = model_preset("tiny", 1000);
  tiny.dropout = dropout;
  ModelConfig mini = tiny;
  mini.preset = "custom";
  mini.d_model = 128;
  mini.n_head = 2;
  mini.d_ff = 512;
  mini.n_layer = 3;
  return {{"tiny", tiny}, {"hd64", mini}};
}

using model::testing::random_windows;

struct Pair {
  std::unique_ptr<GptModel> cpu, gpu;
  std::vector<float> params;
};

Pair make_pair(const ModelConfig& config, int64_t B, bool deterministic = false) {
  ModelOptions options;
  options.max_batch = B;
  options.deterministic = deterministic;
  Pair p;
  p.cpu = gpt_create_cpu(config, options);
  p.gpu = gpt_create_cuda(config, options);
  p.params.resize(size_t(model_param_count(config)));
  model_init_params(config, 1234, p.params);
  p.cpu->params_set(p.params);
  p.gpu->params_set(p.params);
  return p;
}

TEST(ModelCudaTest, ParamsRoundTripAndGpuDeviceReported) {
  const ModelConfig config = test_models(0.1f)[0].config;
  ModelOptions options;
  options.max_batch = 2;
  auto gpu = gpt_create_cuda(config, options);
  EXPECT_EQ(gpu->device(), Device::cuda);
  std::vector<float> params(size_t(model_param_count(config))), back(params.size()), m(params.size()),
      v(params.size());
  model_init_params(config, 7, params);
  gpu->params_set(params);
  gpu->params_get(back);
  EXPECT_EQ(params, back);
  std::vector<float> m0(params.size(), 0.25f), v0(params.size(), 0.5f);
  gpu->adam_state_set(m0, v0);
  gpu->adam_state_get(m, v);
  EXPECT_EQ(m, m0);
  EXPECT_EQ(v, v0);
}

TEST(ModelCudaTest, ForwardLossAndLogitsMatchCpu) {
  for (const auto& [name, config] : test_models(0.1f)) {
    SCOPED_TRACE(name);
    const int64_t B = 3, T = config.context, V = config.vocab_size;
    Pair p = make_pair(config, B);
    const auto windows = random_windows(B, T, V, 5);
    const double cpu_loss = p.cpu->forward_loss(windows, B, T);
    const double gpu_loss = p.gpu->forward_loss(windows, B, T);
    EXPECT_NEAR(gpu_loss, cpu_loss, 5e-3 * cpu_loss);
    // Logits of the first 17 positions of 2 rows (an awkward T).
    const int64_t Bl = 2, Tl = 17;
    std::vector<TokenId> inputs(size_t(Bl * Tl));
    for (int64_t b = 0; b < Bl; ++b)
      for (int64_t t = 0; t < Tl; ++t) inputs[size_t(b * Tl + t)] = windows[size_t(b * (T + 1) + t)];
    std::vector<float> cpu_logits(size_t(Bl * Tl * V)), gpu_logits(cpu_logits.size(), NAN);
    p.cpu->forward_logits(inputs, Bl, Tl, cpu_logits);
    p.gpu->forward_logits(inputs, Bl, Tl, gpu_logits);
    EXPECT_LT(rel_error(gpu_logits, cpu_logits, 0, int64_t(cpu_logits.size())), 2e-2);
  }
}

// Gradients of every tensor after one forward_backward, dropout off and on.
void check_gradients(float dropout) {
  for (const auto& [name, config] : test_models(dropout)) {
    SCOPED_TRACE(name + " dropout " + std::to_string(dropout));
    const int64_t B = 4, T = config.context, V = config.vocab_size;
    Pair p = make_pair(config, B);
    const auto windows = random_windows(B, T, V, 17);
    const StepRng rng{99, 3};
    p.cpu->grads_zero();
    p.gpu->grads_zero();
    const double cpu_loss = p.cpu->forward_backward(windows, B, T, rng, 2.0f);
    const double gpu_loss = p.gpu->forward_backward(windows, B, T, rng, 2.0f);
    std::printf("%s dropout %.1f: loss cpu %.6f gpu %.6f\n", name.c_str(), dropout, cpu_loss, gpu_loss);
    EXPECT_NEAR(gpu_loss, cpu_loss, 5e-3 * cpu_loss);
    std::vector<float> cpu_grads(p.params.size()), gpu_grads(p.params.size());
    p.cpu->grads_get(cpu_grads);
    p.gpu->grads_get(gpu_grads);
    for (const ParamSpec& s : model_param_specs(config)) {
      int64_t end = s.offset + s.numel;
      if (s.kind == ParamKind::wte) {
        // The padding rows are never predicted: their gradient is exactly zero.
        for (int64_t i = s.offset + V * config.d_model; i < end; ++i) ASSERT_EQ(gpu_grads[size_t(i)], 0.0f);
        end = s.offset + V * config.d_model;
      }
      const double err = rel_error(gpu_grads, cpu_grads, s.offset, end);
      std::printf("%s dropout %.1f: gradient of %-12s relative error %.2e\n", name.c_str(), dropout, s.name.c_str(),
                  err);
      EXPECT_LT(err, 5e-2) << "gradient of " << s.name;  // a different dropout mask gives O(1)
    }
    // The norm is that of the whole buffer.
    double sq = 0;
    for (float g : gpu_grads) sq += double(g) * g;
    EXPECT_NEAR(p.gpu->grads_norm(), std::sqrt(sq), 1e-5 * std::sqrt(sq));
    EXPECT_NEAR(p.gpu->grads_norm(), p.cpu->grads_norm(), 2e-2 * p.cpu->grads_norm());
  }
}

TEST(ModelCudaTest, GradientsMatchCpuWithoutDropout) { check_gradients(0.0f); }
TEST(ModelCudaTest, GradientsMatchCpuWithDropout) { check_gradients(0.1f); }

TEST(ModelCudaTest, GradientsAccumulateOverMicroBatches) {
  const ModelConfig config = test_models(0.0f)[0].config;
  const int64_t B = 2, T = 32, V = config.vocab_size;
  Pair p = make_pair(config, B);
  const auto w1 = random_windows(B, T, V, 1), w2 = random_windows(B, T, V, 2);
  std::vector<float> g1(p.params.size()), g12(p.params.size()), g2(p.params.size());
  p.gpu->grads_zero();
  p.gpu->forward_backward(w1, B, T, StepRng{1, 1}, 1.0f);
  p.gpu->grads_get(g1);
  p.gpu->forward_backward(w2, B, T, StepRng{1, 2}, 1.0f);
  p.gpu->grads_get(g12);
  p.gpu->grads_zero();
  p.gpu->forward_backward(w2, B, T, StepRng{1, 2}, 1.0f);
  p.gpu->grads_get(g2);
  std::vector<float> sum(g1.size());
  for (size_t i = 0; i < sum.size(); ++i) sum[i] = g1[i] + g2[i];
  EXPECT_LT(rel_error(g12, sum, 0, int64_t(sum.size())), 1e-5);
}

// Two models in deterministic mode, three steps of dropout training each: the same bits.
TEST(ModelCudaTest, DeterministicModeRepeatsBitForBit) {
  for (const auto& [name, config] : test_models(0.1f)) {
    SCOPED_TRACE(name);
    const int64_t B = 4, T = config.context, V = config.vocab_size;
    std::vector<std::vector<double>> losses(2), norms(2);
    std::vector<std::vector<float>> finals(2);
    for (int run = 0; run < 2; ++run) {
      ModelOptions options;
      options.max_batch = B;
      options.deterministic = true;
      auto gpu = gpt_create_cuda(config, options);
      std::vector<float> params(size_t(model_param_count(config)));
      model_init_params(config, 1234, params);
      gpu->params_set(params);
      AdamWConfig adam;
      adam.lr = 1e-3;
      for (int64_t step = 1; step <= 3; ++step) {
        gpu->grads_zero();
        losses[run].push_back(gpu->forward_backward(random_windows(B, T, V, uint32_t(step)), B, T,
                                                    StepRng{7, uint64_t(step)}, 1.0f));
        norms[run].push_back(gpu->grads_norm());
        gpu->adamw_step(adam, step, 1.0f);
      }
      finals[run].resize(params.size());
      gpu->params_get(finals[run]);
    }
    for (size_t i = 0; i < losses[0].size(); ++i) {
      EXPECT_EQ(std::memcmp(&losses[0][i], &losses[1][i], sizeof(double)), 0) << "loss of step " << i + 1;
      EXPECT_EQ(std::memcmp(&norms[0][i], &norms[1][i], sizeof(double)), 0) << "grad norm of step " << i + 1;
    }
    EXPECT_EQ(std::memcmp(finals[0].data(), finals[1].data(), finals[0].size() * sizeof(float)), 0);
  }
}

// The step replayed as CUDA graphs against eager launches, deterministic mode: four
// optimizer steps of two dropout micro-batches each (loss scale 1/2, so the graphs are
// keyed by it), a last micro-batch of a smaller batch (a second graph pair), gradient
// clipping and a learning rate that changes every step. Every loss, norm and the final
// weights must be the same bits: the graphs' per-step values (tokens, token groups, the
// dropout seed and step, the attention streams) are copied in, not frozen at capture.
TEST(ModelCudaTest, GraphReplayEqualsEagerLaunchBitForBit) {
  for (const auto& [name, config] : test_models(0.1f)) {
    SCOPED_TRACE(name);
    const int64_t B = 4, T = config.context, V = config.vocab_size;
    std::vector<std::vector<double>> losses(2), norms(2);
    std::vector<std::vector<float>> finals(2);
    for (int run = 0; run < 2; ++run) {
      ModelOptions options;
      options.max_batch = B;
      options.deterministic = true;
      options.cuda_graph = run == 0;
      ::testing::internal::CaptureStderr();
      auto gpu = gpt_create_cuda(config, options);
      std::vector<float> params(size_t(model_param_count(config)));
      model_init_params(config, 1234, params);
      gpu->params_set(params);
      AdamWConfig adam;
      for (int64_t step = 1; step <= 4; ++step) {
        gpu->grads_zero();
        for (int64_t micro = 0; micro < 2; ++micro) {
          const uint64_t s = uint64_t(2 * step + micro);
          losses[run].push_back(
              gpu->forward_backward(random_windows(B, T, V, uint32_t(s)), B, T, StepRng{7, s}, 0.5f));
        }
        if (step == 4) {
          losses[run].push_back(gpu->forward_backward(random_windows(2, T - 3, V, 77), 2, T - 3, StepRng{7, 99}, 0.5f));
        }
        const double norm = gpu->grads_norm();
        norms[run].push_back(norm);
        adam.lr = 1e-3 * double(step) / 4.0;
        gpu->adamw_step(adam, step, norm > 0.5 ? float(0.5 / norm) : 1.0f);
      }
      finals[run].resize(params.size());
      gpu->params_get(finals[run]);
      const std::string err = ::testing::internal::GetCapturedStderr();
      EXPECT_EQ(err.find("capture failed"), std::string::npos) << err;
    }
    ASSERT_EQ(losses[0].size(), losses[1].size());
    for (size_t i = 0; i < losses[0].size(); ++i) {
      EXPECT_EQ(std::memcmp(&losses[0][i], &losses[1][i], sizeof(double)), 0)
          << "loss " << i << ": graph " << losses[0][i] << " eager " << losses[1][i];
    }
    for (size_t i = 0; i < norms[0].size(); ++i) {
      EXPECT_EQ(std::memcmp(&norms[0][i], &norms[1][i], sizeof(double)), 0) << "grad norm of step " << i + 1;
    }
    EXPECT_EQ(std::memcmp(finals[0].data(), finals[1].data(), finals[0].size() * sizeof(float)), 0);
  }
}

// Sequences over the first 64 ids that follow a rule (next = 5 * token + 3 mod 64, from a
// random start): both
// backends, AdamW at lr 3e-3 on the same batches, must learn it alike.
TEST(ModelCudaTest, TrainingLowersTheLossLikeTheCpu) {
  const ModelConfig config = test_models(0.1f)[0].config;
  const int64_t B = 4, T = 32, steps = 200;
  Pair p = make_pair(config, B);
  std::mt19937 rng(3);
  AdamWConfig adam;
  adam.lr = 3e-3;
  adam.weight_decay = 0.1;
  std::vector<double> cpu_losses, gpu_losses;
  for (int64_t step = 1; step <= steps; ++step) {
    std::vector<TokenId> windows(size_t(B * (T + 1)));
    for (int64_t b = 0; b < B; ++b) {
      uint64_t tok = rng() % 64;
      for (int64_t t = 0; t <= T; ++t) {
        windows[size_t(b * (T + 1) + t)] = static_cast<TokenId>(tok);
        tok = (5 * tok + 3) % 64;
      }
    }
    for (auto* m : {p.cpu.get(), p.gpu.get()}) {
      m->grads_zero();
      const double loss = m->forward_backward(windows, B, T, StepRng{5, uint64_t(step)}, 1.0f);
      const double norm = m->grads_norm();
      m->adamw_step(adam, step, norm > 1.0 ? float(1.0 / norm) : 1.0f);
      (m == p.cpu.get() ? cpu_losses : gpu_losses).push_back(loss);
    }
  }
  auto tail_mean = [](const std::vector<double>& l) {
    double s = 0;
    for (size_t i = l.size() - 20; i < l.size(); ++i) s += l[i];
    return s / 20;
  };
  const double cpu_end = tail_mean(cpu_losses), gpu_end = tail_mean(gpu_losses);
  std::printf("loss: start cpu %.4f gpu %.4f, last 20 steps cpu %.4f gpu %.4f\n", cpu_losses[0], gpu_losses[0], cpu_end,
              gpu_end);
  EXPECT_LT(gpu_end, 0.5 * gpu_losses[0]);
  EXPECT_LT(cpu_end, 0.5 * cpu_losses[0]);
  EXPECT_NEAR(gpu_end, cpu_end, 0.2 * cpu_end + 0.1);
}

// Sets an environment switch for the life of the guard (the model reads its switches once,
// when created), then restores what was there.
class EnvGuard {
 public:
  EnvGuard(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    EXPECT_EQ(::setenv(name, value, 1), 0);
  }
  ~EnvGuard() {
    if (had_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// A data-parallel hook that copies each range of the gradients into `reported` when the
// model says it is final (after waiting for the model's stream), so that a test can check
// that it was.
void record_reported_gradients(GptModel& model, std::vector<float>& reported) {
  GptModel* m = &model;
  model.grad_ready_hook_set([m, &reported](int64_t begin, int64_t end) {
    const GptModel::FlatBuffers f = m->flat_buffers();
    ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(f.stream)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(reported.data() + begin, f.grads + begin, size_t(end - begin) * sizeof(float),
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
  });
}

// FLASHGPT_LN_BIAS_GRAD=1 (the LayerNorm backward sums fc_proj_b's and attn_proj_b's
// gradients, the two dW matmuls run without BGRADB) against the switch off, two dropout
// micro-batches accumulated: the same loss bits; fc_proj_b and attn_proj_b equal within fp32
// rounding (the same bf16 values summed in another order) and every other gradient the same
// bits, in deterministic mode (in fast mode the attention's dQ atomics make every run differ
// in the last bits, and then in some bf16 roundings: there every gradient within 1e-4).
// tiny (C = 64) takes the column_sum fallback, hd64 (C = 128) the fused sums. With the switch
// on: a second run the same bits (deterministic), and with a data-parallel hook (eager,
// per-layer reporting) every range is final when reported (and, deterministic, the same bits).
TEST(ModelCudaTest, LayerNormBiasGradientsMatchTheMatmulPath) {
  for (const auto& [name, config] : test_models(0.1f)) {
    for (const bool deterministic : {true, false}) {
      SCOPED_TRACE(name + (deterministic ? " deterministic" : " fast"));
      const int64_t B = 4, T = config.context, V = config.vocab_size, P = model_param_count(config);
      // switch off, on, on again, on with a hook
      constexpr int kRuns = 4;
      std::vector<std::vector<float>> grads(kRuns, std::vector<float>(size_t(P)));
      std::vector<float> reported(size_t(P), std::nanf(""));
      std::vector<std::vector<double>> losses(kRuns);
      for (int run = 0; run < kRuns; ++run) {
        EnvGuard sw("FLASHGPT_LN_BIAS_GRAD", run == 0 ? "0" : "1");
        ModelOptions options;
        options.max_batch = B;
        options.deterministic = deterministic;
        auto gpu = gpt_create_cuda(config, options);
        std::vector<float> params(static_cast<size_t>(P));
        model_init_params(config, 1234, params);
        gpu->params_set(params);
        if (run == 3) record_reported_gradients(*gpu, reported);
        gpu->grads_zero();
        for (uint64_t micro = 1; micro <= 2; ++micro) {
          losses[size_t(run)].push_back(
              gpu->forward_backward(random_windows(B, T, V, uint32_t(micro)), B, T, StepRng{7, micro}, 0.5f));
        }
        gpu->grads_get(grads[size_t(run)]);
      }
      for (int run = 1; run < kRuns; ++run) {
        for (size_t i = 0; i < losses[0].size(); ++i) {
          EXPECT_EQ(std::memcmp(&losses[0][i], &losses[size_t(run)][i], sizeof(double)), 0)
              << "run " << run << " loss " << i;
        }
      }
      const auto& off = grads[0];
      const auto& on = grads[1];
      for (const ParamSpec& s : model_param_specs(config)) {
        SCOPED_TRACE(s.name);
        const int64_t end = s.offset + s.numel;
        if (!deterministic) {
          EXPECT_LT(rel_error(on, off, s.offset, end), 1e-4);
        } else if (s.kind == ParamKind::fc_proj_b || s.kind == ParamKind::attn_proj_b) {
          // fp32 sums of 2 B T bf16 values in two orders; the gradients are O(0.1 - 1) here.
          double scale = 0;
          for (int64_t i = s.offset; i < end; ++i) scale = std::max(scale, double(std::fabs(off[size_t(i)])));
          ASSERT_GT(scale, 0.0) << "a bias gradient of zero tests nothing";
          for (int64_t i = s.offset; i < end; ++i) {
            ASSERT_NEAR(on[size_t(i)], off[size_t(i)], 1e-5 * scale) << "element " << i - s.offset;
          }
          const bool reordered = std::memcmp(on.data() + s.offset, off.data() + s.offset,
                                             size_t(s.numel) * sizeof(float)) != 0;
          std::printf("%s: %s %s\n", name.c_str(), s.name.c_str(),
                      reordered ? "differs in the last bits" : "the same bits");
        } else {
          EXPECT_EQ(std::memcmp(on.data() + s.offset, off.data() + s.offset, size_t(s.numel) * sizeof(float)), 0);
        }
      }
      if (deterministic) {
        EXPECT_EQ(std::memcmp(grads[2].data(), on.data(), size_t(P) * sizeof(float)), 0) << "a second run";
        EXPECT_EQ(std::memcmp(grads[3].data(), on.data(), size_t(P) * sizeof(float)), 0) << "with the hook";
      }
      // Every range is reported once it is final: what the hook read then is what it is now.
      // (wte and wpe are reported last; the second micro-batch's reports are the final ones.)
      EXPECT_EQ(std::memcmp(reported.data(), grads[3].data(), size_t(P) * sizeof(float)), 0)
          << "a range was reported before its gradient was final";
    }
  }
}

// FLASHGPT_OVERLAP=1 (the classifier's softmax on a second stream beside the products, two
// logits buffers) and =2 (also the backward's weight products and column sums there) against
// one stream, deterministic mode, where the same plans run the same algorithms: the same
// loss bits, gradient bits and forward_loss bits. 1 MiB logits chunks make 36 x 64 rows five
// chunks (four of 512 rows and one of 256), so both buffers are reused; graphs and eager
// launches both; a data-parallel hook (eager, the backward back on one stream) sees every
// range final, as without overlap.
TEST(ModelCudaTest, OverlapGivesTheSameBits) {
  EnvGuard chunk("FLASHGPT_LOGITS_CHUNK_MB", "1");
  for (const auto& [name, config] : test_models(0.1f)) {
    SCOPED_TRACE(name);
    const int64_t B = 36, T = config.context, V = config.vocab_size, P = model_param_count(config);
    ASSERT_GT(B * T * config.padded_vocab_size * 2, int64_t{4} << 20) << "fewer than five chunks";
    struct Run {
      const char* overlap;
      bool graphs, hook;
    };
    const Run runs[] = {{"0", true, false}, {"1", true, false}, {"2", true, false}, {"2", false, false},
                        {"2", false, true}};
    std::vector<std::vector<float>> grads;
    std::vector<std::vector<double>> losses;
    std::vector<float> reported(size_t(P), std::nanf(""));
    for (const Run& run : runs) {
      SCOPED_TRACE(std::string("overlap ") + run.overlap + (run.graphs ? " graphs" : " eager") +
                   (run.hook ? " hook" : ""));
      EnvGuard sw("FLASHGPT_OVERLAP", run.overlap);
      ModelOptions options;
      options.max_batch = B;
      options.deterministic = true;
      options.cuda_graph = run.graphs;
      ::testing::internal::CaptureStderr();
      auto gpu = gpt_create_cuda(config, options);
      std::vector<float> params(static_cast<size_t>(P));
      model_init_params(config, 1234, params);
      gpu->params_set(params);
      if (run.hook) record_reported_gradients(*gpu, reported);
      losses.emplace_back();
      gpu->grads_zero();
      for (uint64_t micro = 1; micro <= 2; ++micro) {
        losses.back().push_back(
            gpu->forward_backward(random_windows(B, T, V, uint32_t(micro)), B, T, StepRng{7, micro}, 0.5f));
      }
      losses.back().push_back(gpu->forward_loss(random_windows(B, T, V, 3), B, T));
      grads.emplace_back(size_t(P));
      gpu->grads_get(grads.back());
      const std::string err = ::testing::internal::GetCapturedStderr();
      EXPECT_EQ(err.find("capture failed"), std::string::npos) << err;
    }
    for (size_t r = 1; r < grads.size(); ++r) {
      SCOPED_TRACE("run " + std::to_string(r));
      for (size_t i = 0; i < losses[0].size(); ++i) {
        EXPECT_EQ(std::memcmp(&losses[0][i], &losses[r][i], sizeof(double)), 0)
            << "loss " << i << ": " << losses[r][i] << " against " << losses[0][i];
      }
      EXPECT_EQ(std::memcmp(grads[0].data(), grads[r].data(), size_t(P) * sizeof(float)), 0);
    }
    EXPECT_EQ(std::memcmp(reported.data(), grads.back().data(), size_t(P) * sizeof(float)), 0)
        << "a range was reported before its gradient was final";
  }
}

// FLASHGPT_BIAS_ONES=1 (fast mode: qkv_b's and fc_b's gradients out of the dW products over
// ln1 / ln2 stored with a ones column, split into the gradients by split_weight_bias_grad):
// two dropout micro-batches accumulated at an awkward N (3 x 37 = 111 rows, not a multiple of
// 128). Every gradient against the CPU backend's within check_gradients' bf16 tolerance, and
// against the switch off within 1e-4 (the same bf16 values, summed in another order, and the
// attention's dQ atomics), with the fused and the unfused residual + LayerNorm forward and with
// FLASHGPT_OVERLAP=2 (the split on the backward's second stream); the losses within 1e-5 (the
// forward products read the same values through the wider rows, perhaps by another algorithm).
// Deterministic mode ignores the switch: the same bits as off.
TEST(ModelCudaTest, BiasOnesGradientsMatchCpuAndColumnSums) {
  for (const auto& [name, config] : test_models(0.1f)) {
    const int64_t B = 3, T = std::min<int64_t>(37, config.context), V = config.vocab_size;
    const int64_t P = model_param_count(config);
    ASSERT_NE(B * T % 128, 0) << "N should not be a multiple of 128";
    std::vector<float> params(static_cast<size_t>(P));
    model_init_params(config, 1234, params);
    const auto run = [&](const char* ones, const char* fused_ln, const char* overlap, bool deterministic,
                         std::vector<double>& losses) {
      EnvGuard sw("FLASHGPT_BIAS_ONES", ones), fused("FLASHGPT_FUSED_RESIDUAL_LN", fused_ln),
          ov("FLASHGPT_OVERLAP", overlap);
      ModelOptions options;
      options.max_batch = 4;  // more rows allocated than the step uses
      options.deterministic = deterministic;
      auto gpu = gpt_create_cuda(config, options);
      gpu->params_set(params);
      gpu->grads_zero();
      for (uint64_t micro = 1; micro <= 2; ++micro) {
        losses.push_back(
            gpu->forward_backward(random_windows(B, T, V, uint32_t(micro)), B, T, StepRng{7, micro}, 0.5f));
      }
      std::vector<float> grads(static_cast<size_t>(P));
      gpu->grads_get(grads);
      return grads;
    };
    // The CPU reference, the same two micro-batches.
    ModelOptions cpu_options;
    cpu_options.max_batch = B;
    auto cpu = gpt_create_cpu(config, cpu_options);
    cpu->params_set(params);
    cpu->grads_zero();
    std::vector<double> cpu_losses;
    for (uint64_t micro = 1; micro <= 2; ++micro) {
      cpu_losses.push_back(
          cpu->forward_backward(random_windows(B, T, V, uint32_t(micro)), B, T, StepRng{7, micro}, 0.5f));
    }
    std::vector<float> cpu_grads(static_cast<size_t>(P));
    cpu->grads_get(cpu_grads);

    std::vector<double> off_losses;
    const auto off = run("0", "1", "0", false, off_losses);
    struct Variant {
      const char* label;
      const char* fused_ln;
      const char* overlap;
    };
    for (const Variant& v : {Variant{"fused LayerNorm", "1", "0"}, Variant{"unfused LayerNorm", "0", "0"},
                             Variant{"overlap 2", "1", "2"}}) {
      SCOPED_TRACE(name + ", bias ones, " + v.label);
      std::vector<double> losses;
      const auto on = run("1", v.fused_ln, v.overlap, false, losses);
      for (size_t i = 0; i < losses.size(); ++i) {
        EXPECT_NEAR(losses[i], off_losses[i], 1e-5 * off_losses[i]) << "micro-batch " << i;
        EXPECT_NEAR(losses[i], cpu_losses[i], 5e-3 * cpu_losses[i]) << "micro-batch " << i;
      }
      for (const ParamSpec& s : model_param_specs(config)) {
        int64_t end = s.offset + s.numel;
        if (s.kind == ParamKind::wte) end = s.offset + V * config.d_model;  // the padding rows: zero on both
        const double to_off = rel_error(on, off, s.offset, end), to_cpu = rel_error(on, cpu_grads, s.offset, end);
        if (s.kind == ParamKind::qkv_b || s.kind == ParamKind::fc_b || s.kind == ParamKind::qkv_w ||
            s.kind == ParamKind::fc_w) {
          std::printf("%s, %s: %-12s relative error %.2e to the switch off, %.2e to the CPU\n", name.c_str(), v.label,
                      s.name.c_str(), to_off, to_cpu);
        }
        EXPECT_LT(to_off, 1e-4) << "gradient of " << s.name << " against the switch off";
        EXPECT_LT(to_cpu, 5e-2) << "gradient of " << s.name << " against the CPU";
      }
    }
    SCOPED_TRACE(name + ", deterministic");
    std::vector<double> det_off_losses, det_on_losses;
    const auto det_off = run("0", "1", "0", true, det_off_losses);
    const auto det_on = run("1", "1", "0", true, det_on_losses);
    EXPECT_EQ(std::memcmp(det_off.data(), det_on.data(), size_t(P) * sizeof(float)), 0);
    EXPECT_EQ(det_off_losses, det_on_losses);
  }
}

TEST(ModelCudaTest, StepsAllocateNoDeviceMemory) {
  const ModelConfig config = test_models(0.1f)[1].config;
  const int64_t B = 4, T = config.context, V = config.vocab_size;
  ModelOptions options;
  options.max_batch = B;
  auto gpu = gpt_create_cuda(config, options);
  std::vector<float> params(size_t(model_param_count(config)));
  model_init_params(config, 1, params);
  gpu->params_set(params);
  auto step = [&](int64_t t) {
    gpu->grads_zero();
    gpu->forward_backward(random_windows(B, T, V, uint32_t(t)), B, T, StepRng{1, uint64_t(t)}, 1.0f);
    gpu->grads_norm();
    gpu->adamw_step(AdamWConfig{}, t, 1.0f);
    gpu->forward_loss(random_windows(B, T, V, 99), B, T);
  };
  step(1);  // plans and module loads happen here
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  size_t free_before = 0, free_after = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_before, &total), cudaSuccess);
  for (int64_t t = 2; t <= 4; ++t) step(t);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  EXPECT_EQ(free_before, free_after);
}

TEST(ModelCudaTest, BadInputIsRefusedWithAMessage) {
  const ModelConfig config = test_models(0.1f)[0].config;
  ModelOptions options;
  options.max_batch = 2;
  auto gpu = gpt_create_cuda(config, options);
  const int64_t T = 8;
  auto windows = random_windows(2, T, config.vocab_size, 1);
  windows[3] = static_cast<TokenId>(config.vocab_size);  // one past the vocabulary
  try {
    gpu->forward_backward(windows, 2, T, StepRng{}, 1.0f);
    ADD_FAILURE() << "an out-of-vocabulary token was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gpu->forward_loss(random_windows(3, T, config.vocab_size, 1), 3, T), std::exception);  // B > max
  EXPECT_THROW(gpu->forward_loss(random_windows(1, config.context + 1, config.vocab_size, 1), 1, config.context + 1),
               std::exception);
  ModelOptions huge;
  huge.max_batch = int64_t{1} << 24;
  EXPECT_THROW(gpt_create_cuda(config, huge), std::exception);
}

}  // namespace
}  // namespace flashgpt
