// A test-only GptModel: a quadratic loss instead of the transformer, so the trainer's
// bookkeeping (accumulation, clipping, skipped steps, checkpoints, resume) is tested on its
// own, fast, and with failures injected where the test wants them.
//
// loss(window) = 0.5 * sum_i (p_i - target_i(window))^2 over the first kActive parameters,
// target_i a hash of the window's tokens; the loss of a micro-batch is the mean over its
// windows. AdamW is the textbook update, written out here.
#pragma once

#include <flashgpt/model.h>

#include <atomic>
#include <cmath>
#include <chrono>
#include <csignal>
#include <functional>
#include <limits>
#include <set>
#include <thread>
#include <vector>

namespace flashgpt::testing {

class FakeModel final : public GptModel {
 public:
  static constexpr int64_t kActive = 48;

  explicit FakeModel(const ModelConfig& config)
      : config_(config), n_(model_param_count(config)), p_(n_), g_(n_), m_(n_), v_(n_) {}

  // Micro-steps (StepRng::step) whose loss is NaN, and one whose gradient is inf.
  std::set<uint64_t> nan_loss_steps;
  std::set<uint64_t> inf_grad_steps;
  // When set: at micro-step stop_at, stores SIGINT into *stop (a signal arriving mid-run).
  std::atomic<int>* stop = nullptr;
  uint64_t stop_at = 0;
  // When set: validation losses by call (forward_loss call n returns val_script(n)).
  std::function<double(int64_t)> val_script;
  int64_t val_calls = 0;
  // Wall time each training micro-step takes (for the time-limit test).
  std::chrono::milliseconds step_sleep{0};
  // What the trainer asked for, for the tests to check.
  std::vector<float> grad_scales;
  std::vector<double> lrs;
  std::vector<int64_t> adam_ts;

  const ModelConfig& config() const override { return config_; }
  Device device() const override { return Device::cpu; }
  void params_get(std::span<float> out) const override { std::copy(p_.begin(), p_.end(), out.begin()); }
  void params_set(std::span<const float> in) override { p_.assign(in.begin(), in.end()); }
  void adam_state_get(std::span<float> m, std::span<float> v) const override {
    std::copy(m_.begin(), m_.end(), m.begin());
    std::copy(v_.begin(), v_.end(), v.begin());
  }
  void adam_state_set(std::span<const float> m, std::span<const float> v) override {
    m_.assign(m.begin(), m.end());
    v_.assign(v.begin(), v.end());
  }
  void grads_get(std::span<float> out) const override { std::copy(g_.begin(), g_.end(), out.begin()); }

  double forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                          float loss_scale) override {
    if (stop && rng.step == stop_at) stop->store(SIGINT);
    if (step_sleep.count() > 0) std::this_thread::sleep_for(step_sleep);
    double loss = 0;
    for (int64_t b = 0; b < B; ++b) {
      const auto w = windows.subspan(static_cast<size_t>(b * (T + 1)), static_cast<size_t>(T + 1));
      for (int64_t i = 0; i < kActive; ++i) {
        const double d = p_[i] - target(w, i);
        loss += 0.5 * d * d / static_cast<double>(B);
        g_[i] += static_cast<float>(d / static_cast<double>(B) * loss_scale);
      }
    }
    if (inf_grad_steps.count(rng.step)) g_[0] = std::numeric_limits<float>::infinity();
    if (nan_loss_steps.count(rng.step)) return std::nan("");
    return loss;
  }
  double forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) override {
    if (val_script) return val_script(val_calls++);
    double loss = 0;
    for (int64_t b = 0; b < B; ++b) {
      const auto w = windows.subspan(static_cast<size_t>(b * (T + 1)), static_cast<size_t>(T + 1));
      for (int64_t i = 0; i < kActive; ++i) {
        const double d = p_[i] - target(w, i);
        loss += 0.5 * d * d / static_cast<double>(B);
      }
    }
    return loss;
  }
  void forward_logits(std::span<const TokenId>, int64_t, int64_t, std::span<float>) override {}
  void grads_zero() override { std::fill(g_.begin(), g_.end(), 0.0f); }
  double grads_norm() override {
    double s = 0;
    for (float g : g_) s += static_cast<double>(g) * g;
    return std::sqrt(s);
  }
  void adamw_step(const AdamWConfig& a, int64_t t, float grad_scale) override {
    grad_scales.push_back(grad_scale);
    lrs.push_back(a.lr);
    adam_ts.push_back(t);
    const double c1 = 1 - std::pow(a.beta1, static_cast<double>(t)), c2 = 1 - std::pow(a.beta2, static_cast<double>(t));
    for (int64_t i = 0; i < n_; ++i) {
      const float g = g_[i] * grad_scale;
      m_[i] = static_cast<float>(a.beta1 * m_[i] + (1 - a.beta1) * g);
      v_[i] = static_cast<float>(a.beta2 * v_[i] + (1 - a.beta2) * g * g);
      p_[i] -= static_cast<float>(a.lr * (m_[i] / c1) / (std::sqrt(v_[i] / c2) + a.eps));
    }
  }

 private:
  static double target(std::span<const TokenId> w, int64_t i) {
    uint64_t h = 1469598103934665603ull + static_cast<uint64_t>(i);
    for (TokenId t : w) h = (h ^ t) * 1099511628211ull;
    return static_cast<double>(h >> 40) / static_cast<double>(1ull << 24) - 0.5;
  }

  ModelConfig config_;
  int64_t n_;
  std::vector<float> p_, g_, m_, v_;
};

}  // namespace flashgpt::testing
