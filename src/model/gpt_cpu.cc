// The fp32 CPU backend of GptModel: the layers of layers_cpu.h chained as model.h
// describes, activations for options.max_batch x max_context rows sized once at
// construction. The only allocation inside a step is the attention kernel's own tile
// workspace (attention_cpu.h sizes and allocates it per call).
//
// Results do not depend on the thread count: every layer reduces in an order fixed by
// the shapes (layers_cpu.h), and so do the loss, the gradient norm and AdamW.
#include "gemm_cpu.h"
#include "layers_cpu.h"
#include "param_layout.h"
#include "parallel.h"
#include "rows_cpu.h"

#include <flashgpt/env_switch.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstring>

namespace flashgpt {

namespace {

using model::DropoutSite;
using model::ParamLayout;
using model::parallel_worth;

// Rows of the classifier's logits held at once: chunk_rows x V floats within this budget,
// so a 100k vocabulary never needs the (B, T, Vp) logits of the batch (1.6 GB at 8 x 512).
// Each chunk packs all of wte for each of its three products, so fewer, larger chunks
// pack less: 256 MiB is 512 rows of 2048 (small preset, 8 x 256) in 4 chunks where 64 MiB
// took 13 (one thread, small preset: 4.7 -> 3.9 s a step).
constexpr int64_t kClassifierChunkFloats = int64_t{64} << 20;  // 256 MiB
// Partial sums of the gradient norm: one per block of this many floats, added in order.
constexpr int64_t kNormBlock = int64_t{1} << 16;

// Sets the OpenMP thread count of the calling thread for one call, and restores it.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : saved_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~OmpThreads() { omp_set_num_threads(saved_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int saved_;
};

// FLASHGPT_MODEL_PROFILE=1: wall time between the ops of forward_backward, summed per
// label over the layers and the calls after the first, printed to stderr when the model
// is destroyed. Off: mark() reads no clock.
class CpuProfile {
 public:
  CpuProfile() : on_(env_switch("FLASHGPT_MODEL_PROFILE", false)) {}
  ~CpuProfile() {
    if (!on_ || calls_ == 0) return;
    double total = 0.0;
    for (const auto& e : entries_) total += e.second;
    std::fprintf(stderr, "profile: CPU wall time per forward_backward by op (%lld calls after the first)\n",
                 static_cast<long long>(calls_));
    for (const auto& e : entries_) {
      std::fprintf(stderr, "  %-22s %9.2f ms %5.1f%%\n", e.first, e.second / static_cast<double>(calls_),
                   100.0 * e.second / total);
    }
    std::fprintf(stderr, "  %-22s %9.2f ms\n", "total", total / static_cast<double>(calls_));
  }
  CpuProfile(const CpuProfile&) = delete;
  CpuProfile& operator=(const CpuProfile&) = delete;
  void begin() {
    if (on_) last_ = Clock::now();
  }
  // The time since the last mark (or begin) goes to `label`.
  void mark(const char* label) {
    if (!on_) return;
    const Clock::time_point now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last_).count();
    last_ = now;
    if (!recording_) return;
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](const auto& e) { return std::strcmp(e.first, label) == 0; });
    if (it == entries_.end()) {
      entries_.emplace_back(label, ms);
    } else {
      it->second += ms;
    }
  }
  void end() {
    if (!on_) return;
    if (recording_) ++calls_;
    recording_ = true;  // the first call pays for page faults of the fresh buffers
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool on_;
  bool recording_ = false;
  int64_t calls_ = 0;
  Clock::time_point last_;
  std::vector<std::pair<const char*, double>> entries_;
};

class GptCpu final : public GptModel {
 public:
  GptCpu(const ModelConfig& config, const ModelOptions& options);

  const ModelConfig& config() const override { return config_; }
  Device device() const override { return Device::cpu; }

  void params_get(std::span<float> out) const override { copy_out(params_, out, "params_get"); }
  void params_set(std::span<const float> in) override { copy_in(in, params_, "params_set"); }
  void adam_state_get(std::span<float> m, std::span<float> v) const override {
    moments_out(adam_m_, m, "adam_state_get (m)");
    moments_out(adam_v_, v, "adam_state_get (v)");
  }
  void adam_state_set(std::span<const float> m, std::span<const float> v) override {
    moments_in(m, adam_m_, "adam_state_set (m)");
    moments_in(v, adam_v_, "adam_state_set (v)");
  }
  void adam_state_shard(int64_t begin, int64_t end) override;
  MemoryReport memory_report() const override;
  void grads_get(std::span<float> out) const override { copy_out(grads_, out, "grads_get"); }

  double forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                          float loss_scale) override;
  double forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) override;
  void forward_logits(std::span<const TokenId> inputs, int64_t B, int64_t T, std::span<float> logits_out) override;

  void grads_zero() override { std::fill(grads_.begin(), grads_.end(), 0.0f); }
  double grads_norm() override;
  void adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) override;
  FlatBuffers flat_buffers() override { return FlatBuffers{params_.data(), grads_.data(), nullptr}; }
  void adamw_step_range(const AdamWConfig& adam, int64_t t, float grad_scale, int64_t begin, int64_t end) override;
  void grad_ready_hook_set(GradReadyHook hook) override { grad_ready_ = std::move(hook); }

 private:
  // The saved activations of one layer, each with room for N_max = max_batch x max_context
  // rows; a batch of N rows uses the first N.
  struct LayerActs {
    float* ln1;        // (N, C)
    float* ln1_mean;   // (N)
    float* ln1_rstd;   // (N)
    float* qkv;        // (N, 3C)
    float* att;        // (N, C): the attention output before its projection
    float* lse;        // (B, NH, T)
    float* res2;       // (N, C): the residual stream after the attention
    float* ln2;        // (N, C)
    float* ln2_mean;   // (N)
    float* ln2_rstd;   // (N)
    float* fch;        // (N, F): before GELU
    float* fcg;        // (N, F): after GELU
    float* res_out;    // (N, C): the residual stream after the MLP (the next layer's input)
  };

  void copy_out(const std::vector<float>& from, std::span<float> out, const char* what) const;
  void copy_in(std::span<const float> in, std::vector<float>& to, const char* what) const;
  // Full-size moment spans against the held range [adam_begin_, adam_begin_ + size).
  void moments_out(const std::vector<float>& from, std::span<float> out, const char* what) const;
  void moments_in(std::span<const float> in, std::vector<float>& to, const char* what) const;
  void check_batch(int64_t B, int64_t T, const char* what) const;
  // Splits windows (B, T + 1) into inputs_ and targets_ (B, T), checking every id.
  void load_windows(std::span<const TokenId> windows, int64_t B, int64_t T, const char* what);
  void load_inputs(std::span<const TokenId> inputs, int64_t B, int64_t T, const char* what);
  // Forward to the final LayerNorm's output lnf_; dropout when `rng` is given.
  void forward_to_lnf(int64_t B, int64_t T, const StepRng* rng);
  void backward(int64_t B, int64_t T, StepRng rng, bool dropout);
  DropoutSite site(const StepRng* rng, int64_t s) const {
    if (rng == nullptr) return DropoutSite{};
    return DropoutSite{DropoutRng{rng->seed, rng->step}, s, dropout_threshold(config_.dropout)};
  }
  DropoutRng attention_rng(StepRng rng, int64_t layer) const {
    return DropoutRng{rng.seed ^ 0x5bd1e995u, rng.step * static_cast<uint64_t>(config_.n_layer) + static_cast<uint64_t>(layer)};
  }
  const float* param(ParamKind kind, int64_t layer = 0) const { return layout_.at(params_.data(), kind, layer); }
  float* grad(ParamKind kind, int64_t layer = 0) { return layout_.at(grads_.data(), kind, layer); }

  // Tells the data-parallel hook that `kind` (layer `layer` of a per-layer kind) is final.
  void grad_ready(ParamKind kind, int64_t layer = 0) {
    if (!grad_ready_) return;
    const ParamSpec& s = layout_.specs()[static_cast<size_t>(kind)];
    const int64_t n = model::param_kind_per_layer(kind) ? s.numel / config_.n_layer : s.numel;
    const int64_t begin = layout_.offset(kind, layer);
    grad_ready_(begin, begin + n);
  }

  ModelConfig config_;
  ParamLayout layout_;
  CpuProfile profile_;
  GradReadyHook grad_ready_;
  int threads_;
  int64_t max_batch_, max_context_, chunk_rows_;
  std::vector<float> params_, grads_;                    // (model_param_count) each
  std::vector<float> adam_m_, adam_v_;                   // the moments of [adam_begin_, adam_begin_ + size)
  int64_t adam_begin_ = 0;
  std::vector<double> norm_partials_;                     // (ceil(count / kNormBlock))
  std::vector<int32_t> inputs_, targets_;                 // (N_max) each
  std::vector<float> arena_;                              // every activation below
  float* res0_;                                           // (N, C): dropout(wte[x] + wpe)
  std::vector<LayerActs> layers_;                         // (L)
  float* lnf_;                                            // (N, C)
  float* lnf_mean_;                                       // (N)
  float* lnf_rstd_;                                       // (N)
  float* losses_;                                         // (N)
  float* logits_;                                         // classifier_scratch_floats(chunk_rows, C, V)
  float* scratch_c_;                                      // (N, C): projections; their gradients
  float* dres_;                                           // (N, C): gradient of the residual stream
  float* dln_;                                            // (N, C): gradient of a LayerNorm output
  float* datt_;                                           // (N, C)
  float* dqkv_;                                           // (N, 3C)
  float* dff_;                                            // (N, F)
};

GptCpu::GptCpu(const ModelConfig& config, const ModelOptions& options)
    : config_(config), layout_((model_config_validate(config), config)) {
  FLASHGPT_CHECK(options.max_batch > 0, "gpt_create_cpu: max_batch must be positive, got {}", options.max_batch);
  FLASHGPT_CHECK(options.max_context >= 0 && options.max_context <= config.context,
                 "gpt_create_cpu: max_context {} must be in [1, context {}] (0 for the context)", options.max_context,
                 config.context);
  FLASHGPT_CHECK(options.threads >= 0, "gpt_create_cpu: threads must be >= 0, got {}", options.threads);
  threads_ = options.threads > 0 ? options.threads : omp_get_max_threads();
  model::gemm_cpu_prepare();
  max_batch_ = options.max_batch;
  max_context_ = options.max_context > 0 ? options.max_context : config.context;
  const int64_t C = config.d_model, L = config.n_layer, F = config.d_ff, NH = config.n_head;
  const int64_t V = config.vocab_size, N = max_batch_ * max_context_;
  // Equal chunks: as few as the budget allows, their rows spread evenly.
  const int64_t chunk_max = std::clamp<int64_t>(kClassifierChunkFloats / V, 1, N);
  const int64_t chunks = (N + chunk_max - 1) / chunk_max;
  chunk_rows_ = (N + chunks - 1) / chunks;

  const int64_t count = layout_.total();
  params_.assign(static_cast<size_t>(count), 0.0f);
  grads_.assign(static_cast<size_t>(count), 0.0f);
  adam_state_shard(options.adam_begin, options.adam_end == 0 ? count : options.adam_end);
  norm_partials_.assign(static_cast<size_t>((count + kNormBlock - 1) / kNormBlock), 0.0);
  inputs_.assign(static_cast<size_t>(N), 0);
  targets_.assign(static_cast<size_t>(N), 0);

  const int64_t per_layer = N * (8 * C + 2 * F + 4 + NH);  // the LayerActs fields, in floats
  const int64_t total = N * C + L * per_layer + N * (C + 3) + model::classifier_scratch_floats(chunk_rows_, C, V) +
                        N * (4 * C + 3 * C + F);
  try {
    arena_.assign(static_cast<size_t>(total), 0.0f);
  } catch (const std::bad_alloc&) {
    FLASHGPT_FAIL("gpt_create_cpu: the activations for batch {} x context {} need {:.2f} GiB, which could not be "
                  "allocated; use a smaller batch or context",
                  max_batch_, max_context_, static_cast<double>(total) * 4.0 / (1 << 30));
  }
  float* at = arena_.data();
  auto take = [&](int64_t n) {
    float* p = at;
    at += n;
    return p;
  };
  res0_ = take(N * C);
  layers_.resize(static_cast<size_t>(L));
  for (auto& a : layers_) {
    a.ln1 = take(N * C);
    a.ln1_mean = take(N);
    a.ln1_rstd = take(N);
    a.qkv = take(N * 3 * C);
    a.att = take(N * C);
    a.lse = take(N * NH);
    a.res2 = take(N * C);
    a.ln2 = take(N * C);
    a.ln2_mean = take(N);
    a.ln2_rstd = take(N);
    a.fch = take(N * F);
    a.fcg = take(N * F);
    a.res_out = take(N * C);
  }
  lnf_ = take(N * C);
  lnf_mean_ = take(N);
  lnf_rstd_ = take(N);
  losses_ = take(N);
  logits_ = take(model::classifier_scratch_floats(chunk_rows_, C, V));
  scratch_c_ = take(N * C);
  dres_ = take(N * C);
  dln_ = take(N * C);
  datt_ = take(N * C);
  dqkv_ = take(N * 3 * C);
  dff_ = take(N * F);
  FLASHGPT_CHECK(at == arena_.data() + total, "gpt_create_cpu: activation arena miscounted ({} of {} floats)",
                 at - arena_.data(), total);
}

void GptCpu::copy_out(const std::vector<float>& from, std::span<float> out, const char* what) const {
  FLASHGPT_CHECK(out.size() == from.size(), "{}: the buffer holds {} floats but the model has {} parameters", what,
                 out.size(), from.size());
  std::memcpy(out.data(), from.data(), from.size() * sizeof(float));
}

void GptCpu::moments_out(const std::vector<float>& from, std::span<float> out, const char* what) const {
  FLASHGPT_CHECK(static_cast<int64_t>(out.size()) == layout_.total(),
                 "{}: the buffer holds {} floats but the model has {} parameters", what, out.size(), layout_.total());
  std::memcpy(out.data() + adam_begin_, from.data(), from.size() * sizeof(float));
}

void GptCpu::moments_in(std::span<const float> in, std::vector<float>& to, const char* what) const {
  FLASHGPT_CHECK(static_cast<int64_t>(in.size()) == layout_.total(),
                 "{}: the buffer holds {} floats but the model has {} parameters", what, in.size(), layout_.total());
  std::memcpy(to.data(), in.data() + adam_begin_, to.size() * sizeof(float));
}

void GptCpu::adam_state_shard(int64_t begin, int64_t end) {
  FLASHGPT_CHECK(0 <= begin && begin <= end && end <= layout_.total(),
                 "adam_state_shard: [{}, {}) is not a range of the {} parameters", begin, end, layout_.total());
  // Fresh vectors: assign() would keep the full-size capacity.
  std::vector<float>(static_cast<size_t>(end - begin), 0.0f).swap(adam_m_);
  std::vector<float>(static_cast<size_t>(end - begin), 0.0f).swap(adam_v_);
  adam_begin_ = begin;
}

GptModel::MemoryReport GptCpu::memory_report() const {
  MemoryReport r;
  r.adam_begin = adam_begin_;
  r.adam_end = adam_begin_ + static_cast<int64_t>(adam_m_.size());
  r.adam_bytes = (adam_m_.capacity() + adam_v_.capacity()) * sizeof(float);
  r.total_bytes = r.adam_bytes + (params_.capacity() + grads_.capacity() + arena_.capacity()) * sizeof(float) +
                  norm_partials_.capacity() * sizeof(double);
  return r;
}

void GptCpu::copy_in(std::span<const float> in, std::vector<float>& to, const char* what) const {
  FLASHGPT_CHECK(in.size() == to.size(), "{}: the buffer holds {} floats but the model has {} parameters", what,
                 in.size(), to.size());
  std::memcpy(to.data(), in.data(), to.size() * sizeof(float));
}

void GptCpu::check_batch(int64_t B, int64_t T, const char* what) const {
  FLASHGPT_CHECK(B >= 1 && B <= max_batch_, "{}: batch {} is outside [1, {}] (the model's max_batch)", what, B,
                 max_batch_);
  FLASHGPT_CHECK(T >= 1 && T <= max_context_,
                 "{}: sequence length {} is outside [1, {}] (the context the activations were sized for; the "
                 "position table has {} rows)",
                 what, T, max_context_, config_.context);
}

void GptCpu::load_windows(std::span<const TokenId> windows, int64_t B, int64_t T, const char* what) {
  check_batch(B, T, what);
  FLASHGPT_CHECK(static_cast<int64_t>(windows.size()) == B * (T + 1),
                 "{}: windows hold {} ids, expected B x (T + 1) = {} x {} = {}", what, windows.size(), B, T + 1,
                 B * (T + 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t <= T; ++t) {
      const TokenId id = windows[static_cast<size_t>(b * (T + 1) + t)];
      FLASHGPT_CHECK(static_cast<int64_t>(id) < config_.vocab_size,
                     "{}: token id {} at window {}, position {} is outside the vocabulary of {} tokens", what, id, b,
                     t, config_.vocab_size);
      if (t < T) inputs_[static_cast<size_t>(b * T + t)] = static_cast<int32_t>(id);
      if (t > 0) targets_[static_cast<size_t>(b * T + t - 1)] = static_cast<int32_t>(id);
    }
  }
}

void GptCpu::load_inputs(std::span<const TokenId> inputs, int64_t B, int64_t T, const char* what) {
  check_batch(B, T, what);
  FLASHGPT_CHECK(static_cast<int64_t>(inputs.size()) == B * T, "{}: inputs hold {} ids, expected B x T = {} x {} = {}",
                 what, inputs.size(), B, T, B * T);
  for (int64_t n = 0; n < B * T; ++n) {
    const TokenId id = inputs[static_cast<size_t>(n)];
    FLASHGPT_CHECK(static_cast<int64_t>(id) < config_.vocab_size,
                   "{}: token id {} at sequence {}, position {} is outside the vocabulary of {} tokens", what, id,
                   n / T, n % T, config_.vocab_size);
    inputs_[static_cast<size_t>(n)] = static_cast<int32_t>(id);
  }
}

void GptCpu::forward_to_lnf(int64_t B, int64_t T, const StepRng* rng) {
  const int64_t C = config_.d_model, F = config_.d_ff, NH = config_.n_head, N = B * T;
  const float attn_dropout = rng != nullptr ? config_.dropout : 0.0f;
  model::encoder_forward(res0_, inputs_.data(), param(ParamKind::wte), param(ParamKind::wpe), B, T, C);
  model::dropout_forward(res0_, N, C, site(rng, 0));
  profile_.mark("embedding");
  const float* res = res0_;  // (N, C): the residual stream entering layer l
  for (int64_t l = 0; l < config_.n_layer; ++l) {
    LayerActs& a = layers_[static_cast<size_t>(l)];
    model::layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, res, param(ParamKind::ln1_w, l),
                             param(ParamKind::ln1_b, l), N, C);
    profile_.mark("layernorm fwd");
    model::matmul_forward(a.qkv, a.ln1, param(ParamKind::qkv_w, l), param(ParamKind::qkv_b, l), N, C, 3 * C);
    profile_.mark("qkv fwd");
    model::attention_forward(a.att, a.lse, a.qkv, B, T, C, NH, attn_dropout,
                             rng != nullptr ? attention_rng(*rng, l) : DropoutRng{});
    profile_.mark("attention fwd");
    model::matmul_forward(scratch_c_, a.att, param(ParamKind::attn_proj_w, l), param(ParamKind::attn_proj_b, l), N,
                          C, C);
    profile_.mark("attn proj fwd");
    model::residual_dropout_forward(a.res2, res, scratch_c_, N, C, site(rng, 1 + 2 * l));
    profile_.mark("residual dropout fwd");
    model::layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.res2, param(ParamKind::ln2_w, l),
                             param(ParamKind::ln2_b, l), N, C);
    profile_.mark("layernorm fwd");
    model::matmul_forward(a.fch, a.ln2, param(ParamKind::fc_w, l), param(ParamKind::fc_b, l), N, C, F);
    profile_.mark("fc fwd");
    model::gelu_forward(a.fcg, a.fch, N * F);
    profile_.mark("gelu fwd");
    model::matmul_forward(scratch_c_, a.fcg, param(ParamKind::fc_proj_w, l), param(ParamKind::fc_proj_b, l), N, F,
                          C);
    profile_.mark("fc proj fwd");
    model::residual_dropout_forward(a.res_out, a.res2, scratch_c_, N, C, site(rng, 2 + 2 * l));
    profile_.mark("residual dropout fwd");
    res = a.res_out;
  }
  model::layernorm_forward(lnf_, lnf_mean_, lnf_rstd_, res, param(ParamKind::lnf_w), param(ParamKind::lnf_b), N, C);
  profile_.mark("layernorm fwd");
}

void GptCpu::backward(int64_t B, int64_t T, StepRng rng, bool dropout) {
  const int64_t C = config_.d_model, F = config_.d_ff, NH = config_.n_head, L = config_.n_layer, N = B * T;
  const StepRng* r = dropout ? &rng : nullptr;
  const float attn_dropout = dropout ? config_.dropout : 0.0f;
  // dln_ holds the classifier's gradient w.r.t. lnf_ (N, C).
  const float* res_last = L > 0 ? layers_[static_cast<size_t>(L - 1)].res_out : res0_;
  std::fill(dres_, dres_ + N * C, 0.0f);
  model::layernorm_backward(dres_, grad(ParamKind::lnf_w), grad(ParamKind::lnf_b), dln_, res_last,
                            param(ParamKind::lnf_w), lnf_mean_, lnf_rstd_, N, C);
  profile_.mark("layernorm bwd");
  grad_ready(ParamKind::lnf_w);
  grad_ready(ParamKind::lnf_b);
  for (int64_t l = L - 1; l >= 0; --l) {
    LayerActs& a = layers_[static_cast<size_t>(l)];
    const float* res_in = l > 0 ? layers_[static_cast<size_t>(l - 1)].res_out : res0_;
    // res_out = res2 + dropout(fcg Wfp^T + bfp): dres flows on to res2 unchanged.
    model::dropout_backward(scratch_c_, dres_, N, C, site(r, 2 + 2 * l));
    profile_.mark("dropout bwd");
    model::matmul_backward(dff_, grad(ParamKind::fc_proj_w, l), grad(ParamKind::fc_proj_b, l), scratch_c_, a.fcg,
                           param(ParamKind::fc_proj_w, l), N, F, C);
    profile_.mark("fc proj bwd");
    model::gelu_backward(dff_, a.fch, dff_, N * F);
    profile_.mark("gelu bwd");
    model::matmul_backward(dln_, grad(ParamKind::fc_w, l), grad(ParamKind::fc_b, l), dff_, a.ln2,
                           param(ParamKind::fc_w, l), N, C, F);
    profile_.mark("fc bwd");
    model::layernorm_backward(dres_, grad(ParamKind::ln2_w, l), grad(ParamKind::ln2_b, l), dln_, a.res2,
                              param(ParamKind::ln2_w, l), a.ln2_mean, a.ln2_rstd, N, C);
    profile_.mark("layernorm bwd");
    // res2 = res_in + dropout(att Wproj^T + bproj).
    model::dropout_backward(scratch_c_, dres_, N, C, site(r, 1 + 2 * l));
    profile_.mark("dropout bwd");
    model::matmul_backward(datt_, grad(ParamKind::attn_proj_w, l), grad(ParamKind::attn_proj_b, l), scratch_c_,
                           a.att, param(ParamKind::attn_proj_w, l), N, C, C);
    profile_.mark("attn proj bwd");
    model::attention_backward(dqkv_, datt_, a.qkv, a.att, a.lse, B, T, C, NH, attn_dropout,
                              dropout ? attention_rng(rng, l) : DropoutRng{});
    profile_.mark("attention bwd");
    model::matmul_backward(dln_, grad(ParamKind::qkv_w, l), grad(ParamKind::qkv_b, l), dqkv_, a.ln1,
                           param(ParamKind::qkv_w, l), N, C, 3 * C);
    profile_.mark("qkv bwd");
    model::layernorm_backward(dres_, grad(ParamKind::ln1_w, l), grad(ParamKind::ln1_b, l), dln_, res_in,
                              param(ParamKind::ln1_w, l), a.ln1_mean, a.ln1_rstd, N, C);
    profile_.mark("layernorm bwd");
    // Layer l's twelve tensors are final, in the order their gradients were written.
    for (const ParamKind kind : {ParamKind::fc_proj_w, ParamKind::fc_proj_b, ParamKind::fc_w, ParamKind::fc_b,
                                 ParamKind::ln2_w, ParamKind::ln2_b, ParamKind::attn_proj_w, ParamKind::attn_proj_b,
                                 ParamKind::qkv_w, ParamKind::qkv_b, ParamKind::ln1_w, ParamKind::ln1_b}) {
      grad_ready(kind, l);
    }
  }
  model::dropout_backward(dres_, dres_, N, C, site(r, 0));
  model::encoder_backward(grad(ParamKind::wte), grad(ParamKind::wpe), dres_, inputs_.data(), B, T, C);
  profile_.mark("embedding bwd");
  // wte last: the classifier wrote its gradient first, the embedding lookup adds to it.
  grad_ready(ParamKind::wpe);
  grad_ready(ParamKind::wte);
}

double GptCpu::forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                                float loss_scale) {
  OmpThreads threads(threads_);
  profile_.begin();
  load_windows(windows, B, T, "forward_backward");
  profile_.mark("load batch");
  const bool dropout = dropout_enabled(dropout_threshold(config_.dropout));
  forward_to_lnf(B, T, dropout ? &rng : nullptr);
  const int64_t N = B * T;
  const double total = model::classifier_forward_backward(
      dln_, grad(ParamKind::wte), losses_, logits_, lnf_, param(ParamKind::wte), targets_.data(), N, config_.d_model,
      config_.vocab_size, loss_scale / static_cast<float>(N), chunk_rows_);
  profile_.mark("classifier");
  backward(B, T, rng, dropout);
  profile_.end();
  return total / static_cast<double>(N);
}

double GptCpu::forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) {
  OmpThreads threads(threads_);
  load_windows(windows, B, T, "forward_loss");
  forward_to_lnf(B, T, nullptr);
  const int64_t N = B * T;
  const double total =
      model::classifier_forward_backward(nullptr, nullptr, losses_, logits_, lnf_, param(ParamKind::wte),
                                         targets_.data(), N, config_.d_model, config_.vocab_size, 0.0f, chunk_rows_);
  return total / static_cast<double>(N);
}

void GptCpu::forward_logits(std::span<const TokenId> inputs, int64_t B, int64_t T, std::span<float> logits_out) {
  OmpThreads threads(threads_);
  load_inputs(inputs, B, T, "forward_logits");
  const int64_t N = B * T, V = config_.vocab_size, C = config_.d_model;
  FLASHGPT_CHECK(static_cast<int64_t>(logits_out.size()) == N * V,
                 "forward_logits: the output holds {} floats, expected B x T x V = {} x {} x {} = {}",
                 logits_out.size(), B, T, V, N * V);
  forward_to_lnf(B, T, nullptr);
  // logits (N, V) = lnf (N, C) wte[0:V]^T (C, V).
  model::gemm_cpu(model::Trans::no, model::Trans::yes, N, V, C, 1.0f, lnf_, C, param(ParamKind::wte), C, 0.0f,
                  logits_out.data(), V);
}

double GptCpu::grads_norm() {
  OmpThreads threads(threads_);
  const int64_t count = static_cast<int64_t>(grads_.size());
  const int64_t blocks = static_cast<int64_t>(norm_partials_.size());
  // Each block's sum of squares in double, then the blocks in order: the same bits for
  // every thread count.
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(count))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* g = grads_.data() + blk * kNormBlock;
    const int64_t n = std::min(kNormBlock, count - blk * kNormBlock);
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(g[i]) * g[i];
    norm_partials_[static_cast<size_t>(blk)] = acc;
  }
  double total = 0.0;
  for (const double partial : norm_partials_) total += partial;
  return std::sqrt(total);
}

void GptCpu::adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) {
  adamw_step_range(adam, t, grad_scale, 0, layout_.total());
}

void GptCpu::adamw_step_range(const AdamWConfig& adam, int64_t t, float grad_scale, int64_t begin, int64_t end) {
  OmpThreads threads(threads_);
  FLASHGPT_CHECK(t >= 1, "adamw_step: the step t is 1-based, got {}", t);
  FLASHGPT_CHECK(std::isfinite(grad_scale), "adamw_step: grad_scale must be finite, got {}", grad_scale);
  FLASHGPT_CHECK(0 <= begin && begin <= end && end <= layout_.total(),
                 "adamw_step_range: [{}, {}) is not a range of the {} parameters", begin, end, layout_.total());
  const int64_t held_end = adam_begin_ + static_cast<int64_t>(adam_m_.size());
  FLASHGPT_CHECK(begin == end || (adam_begin_ <= begin && end <= held_end),
                 "adamw_step: [{}, {}) reaches outside [{}, {}), the parameters whose AdamW moments this model keeps "
                 "(adam_state_shard)", begin, end, adam_begin_, held_end);
  const double bc1 = 1.0 - std::pow(adam.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(adam.beta2, static_cast<double>(t));
  const float b1 = static_cast<float>(adam.beta1), b2 = static_cast<float>(adam.beta2);
  const float step_size = static_cast<float>(adam.lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(adam.eps);
  for (const ParamSpec& s : layout_.specs()) {
    // This tensor's part of [begin, end): elementwise, so any split gives the same bits.
    const int64_t lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.numel);
    if (lo >= hi) continue;
    const float decay = s.weight_decay ? static_cast<float>(1.0 - adam.lr * adam.weight_decay) : 1.0f;
    float* p = params_.data() + lo;
    const float* g = grads_.data() + lo;
    float* m = adam_m_.data() + (lo - adam_begin_);
    float* v = adam_v_.data() + (lo - adam_begin_);
    const int64_t n = hi - lo;
    model::adamw_cpu(p, g, m, v, n, model::AdamWRow{b1, b2, step_size, inv_sqrt_bc2, eps, decay, grad_scale});
  }
}

}  // namespace

std::unique_ptr<GptModel> gpt_create_cpu(const ModelConfig& config, const ModelOptions& options) {
  return std::make_unique<GptCpu>(config, options);
}

#if !FLASHGPT_WITH_CUDA
std::unique_ptr<GptModel> gpt_create_cuda(const ModelConfig&, const ModelOptions&) {
  FLASHGPT_FAIL("gpt_create_cuda: flashgpt was built without CUDA; use the CPU backend (Device::cpu)");
}
#endif

std::unique_ptr<GptModel> gpt_create(Device device, const ModelConfig& config, const ModelOptions& options) {
  switch (device) {
    case Device::cpu: return gpt_create_cpu(config, options);
    case Device::cuda: return gpt_create_cuda(config, options);
  }
  FLASHGPT_FAIL("gpt_create: unknown device {}", static_cast<int>(device));
}

}  // namespace flashgpt
