// The learning-rate schedule, clipping, the memory estimate and the CPU peak measurement.
#include <flashgpt/error.h>
#include <flashgpt/train.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#ifdef FLASHGPT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace flashgpt {

LrSchedule lr_schedule_from_name(std::string_view name) {
  if (name == "constant") return LrSchedule::constant;
  if (name == "cosine") return LrSchedule::cosine;
  if (name == "linear") return LrSchedule::linear;
  FLASHGPT_FAIL("unknown learning-rate schedule '{}' (known: constant, cosine, linear)", name);
}

std::string_view lr_schedule_name(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::constant: return "constant";
    case LrSchedule::cosine: return "cosine";
    case LrSchedule::linear: return "linear";
  }
  return "?";
}

double lr_at(const LrScheduleConfig& s, int64_t step) {
  FLASHGPT_CHECK(step >= 0, "lr_at: negative step {}", step);
  if (step < s.warmup_steps) return s.lr * static_cast<double>(step + 1) / static_cast<double>(s.warmup_steps);
  if (s.kind == LrSchedule::constant) return s.lr;
  const double min_lr = s.min_lr_ratio * s.lr;
  const int64_t decay_steps = std::max<int64_t>(1, s.total_steps - s.warmup_steps);
  const double progress = std::clamp(static_cast<double>(step - s.warmup_steps) / static_cast<double>(decay_steps), 0.0, 1.0);
  if (s.kind == LrSchedule::linear) return s.lr - (s.lr - min_lr) * progress;
  return min_lr + (s.lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

double clip_scale(double norm, double max_norm) {
  if (max_norm <= 0 || !(norm > max_norm)) return 1.0;
  return max_norm / norm;
}

MemoryEstimate train_memory_estimate(const ModelConfig& c, int64_t batch, int64_t context, Device device) {
  const auto P = static_cast<uint64_t>(model_param_count(c));
  MemoryEstimate m;
  m.params = 4 * P;
  m.gradients = 4 * P;
  m.optimizer = 8 * P;
  const auto BT = static_cast<uint64_t>(batch) * static_cast<uint64_t>(context);
  const auto C = static_cast<uint64_t>(c.d_model), F = static_cast<uint64_t>(c.d_ff);
  const auto L = static_cast<uint64_t>(c.n_layer), NH = static_cast<uint64_t>(c.n_head);
  const auto Vp = static_cast<uint64_t>(c.padded_vocab_size);
  // Per token and layer, what backward needs: the block input, ln1 out and stats, qkv
  // (3C), the attention output, its LSE (NH), the projection, the residual, ln2 out and
  // stats, the fc pre-activation and GELU (2F), the fc projection, and the dropout masks
  // (counted as values: 3C). Plus the embedding, lnf and the logits with their gradient.
  const uint64_t per_token_layer = 13 * C + 2 * F + NH + 4;
  if (device == Device::cpu) {
    m.activations = 4 * BT * (L * per_token_layer + 3 * C + 2 * Vp);
  } else {
    // bf16 activations; the fused classifier holds logits for a chunk of the vocabulary
    // only, so the logits term is a bf16 copy for the backward at most.
    m.activations = 2 * BT * (L * per_token_layer + 3 * C + Vp);
  }
  return m;
}

uint64_t memory_available(Device device) {
  if (device == Device::cuda) {
#ifdef FLASHGPT_WITH_CUDA
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) return free_bytes;
#endif
    return 0;
  }
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream fields(line.substr(13));
      uint64_t kb = 0;
      fields >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

namespace {

// Independent multiply-add chains (acc = acc * a + b with |a| < 1, so nothing overflows),
// kLanes wide: enough vector registers in flight to cover the FMA latency, few enough not
// to spill. Returns the iterations done in about `seconds`.
template <int kLanes, bool kFma>
__attribute__((always_inline)) inline int64_t fma_chains(float* acc, double seconds) {
  const float a = 0.999f, b = 1e-4f;
  int64_t iterations = 0;
  const auto start = std::chrono::steady_clock::now();
  do {
    for (int r = 0; r < 4096; ++r) {
#pragma omp simd
      for (int i = 0; i < kLanes; ++i) acc[i] = kFma ? std::fma(acc[i], a, b) : acc[i] * a + b;
    }
    iterations += 4096;
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds);
  return iterations;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) int64_t fma_chains_avx512(float* acc, double seconds) {
  return fma_chains<256, true>(acc, seconds);  // 16 zmm chains
}
__attribute__((target("avx2,fma"))) int64_t fma_chains_avx2(float* acc, double seconds) {
  return fma_chains<96, true>(acc, seconds);  // 12 ymm chains of the 16 registers
}
#endif
int64_t fma_chains_generic(float* acc, double seconds) { return fma_chains<64, false>(acc, seconds); }

}  // namespace

double cpu_peak_flops_measure(int threads, double seconds) {
  const int n_threads = threads > 0 ? threads : omp_get_max_threads();
  // The widest vector unit this CPU has (what BLAS uses), whatever the build targets.
  int lanes = 64;
  int64_t (*loop)(float*, double) = fma_chains_generic;
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) {
    loop = fma_chains_avx512;
    lanes = 256;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    loop = fma_chains_avx2;
    lanes = 96;
  }
#endif
  std::vector<double> flops_per_second(static_cast<size_t>(n_threads), 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    alignas(64) float acc[256];
    for (int i = 0; i < 256; ++i) acc[i] = static_cast<float>(i) * 1e-3f;
    const auto start = std::chrono::steady_clock::now();
    const int64_t iterations = loop(acc, seconds);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    volatile float sink = acc[0] + acc[lanes - 1];  // keeps the chains alive
    (void)sink;
    flops_per_second[static_cast<size_t>(omp_get_thread_num())] = 2.0 * lanes * static_cast<double>(iterations) / elapsed;
  }
  double total = 0;
  for (double f : flops_per_second) total += f;
  return total;
}

}  // namespace flashgpt
