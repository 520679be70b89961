// `flashgpt bench attention --device cpu`: the naive reference against the tiled
// FlashAttention on the CPU, for growing N. It validates the tiled path against the
// reference first, then times both, reports the workspace each one allocates (the
// reference grows as N^2, the tiled one as N), and counts the bytes the tiled forward
// moves between the tensors and its tiles for several on-chip budgets M, next to the
// paper's Theta(N^2 d^2 / M) bound (its Theorem 2 and Figure 2, left, with a counter
// in place of a profiler). Writes CSV and, when matplotlib is there, a PNG.
//
// `flashgpt bench attention --device cuda`: our GPU kernels over the FlashAttention papers'
// shape table (bf16, hidden 2048, 16k tokens, seqlen 512 to 16k, head dims 64 and 128, causal
// and not, plus the model's shape with dropout). Every kernel configuration is validated
// against the CPU reference first (forward and backward, the same dropout mask), then each
// row is timed with CUDA events and printed in TFLOP/s. The comparison against PyTorch's
// FlashAttention-2 and cuDNN stays in bench/attention_gpu/bench_attention.py.
#include "commands.h"
#include "options.h"

#include <flashgpt/atomic_file.h>
#include <flashgpt/attention.h>
#include <flashgpt/attention_cpu.h>
#include <flashgpt/attention_cuda.h>
#include <flashgpt/bfloat16.h>
#include <flashgpt/error.h>
#include <flashgpt/process.h>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <omp.h>

#ifdef FLASHGPT_WITH_CUDA
#include <flashgpt/cuda_check.h>

#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace flashgpt {
namespace {

struct BenchAttentionConfig {
  std::string device = "cpu";
  std::string out_dir;  // empty: print only
  int min_seqlen = 256;
  int max_seqlen = 16384;
  int naive_max_seqlen = 8192;  // the reference's backward holds 2 N^2 doubles: 1 GiB at 8k
  int io_max_seqlen = 4096;
  int batch = 1;
  int heads = 1;
  int head_dim = 64;
  bool head_dim_given = false;  // --device cuda: only this head dim instead of the table's 64 and 128
  bool causal = false;
  bool backward = true;
  bool quick = false;
  int threads = 0;
  int64_t onchip_kib = 128;
  std::string rule = "paper";  // tile rule of the timed tiled run: paper | max_rows
  std::vector<int64_t> io_onchip_kib = {16, 64, 256, 1024};
  double min_time_s = 0.3;  // repeat a measurement until this long, keep the fastest run
  float dropout = 0.0f;     // --device cuda: every row of the table again with this dropout (0: not)
  // --device cuda: time the backward of every row with each of these main kernels, forced in turn
  // (attention_cuda_force_backward_kernel: mma_sync, wgmma, tma); empty: the automatic choice.
  std::vector<std::string> bwd_kernels;
};

// Inputs and outputs of one dense problem, contiguous, fp32.
struct BenchProblem {
  std::vector<float> q, k, v, o, lse, d_o, dq, dk, dv;
  AttentionParams params;
  BenchProblem(const BenchAttentionConfig& c, int n, uint64_t seed) {
    const size_t elements = size_t(c.batch) * n * c.heads * c.head_dim;
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto* t : {&q, &k, &v, &d_o}) {
      t->resize(elements);
      for (float& x : *t) x = normal(gen);
    }
    o.resize(elements), dq.resize(elements), dk.resize(elements), dv.resize(elements);
    lse.resize(size_t(c.batch) * c.heads * n);
    params.q = q.data(), params.k = k.data(), params.v = v.data(), params.o = o.data(), params.lse = lse.data();
    params.d_o = d_o.data(), params.dq = dq.data(), params.dk = dk.data(), params.dv = dv.data();
    params.batch = c.batch, params.seqlen_q = params.seqlen_k = n;
    params.heads_q = params.heads_kv = c.heads, params.head_dim = c.head_dim;
    params.mask = c.causal ? Mask::causal : Mask::none;
    attention_set_dense_strides(params);
  }
};

template <typename F>
double time_best_s(const BenchAttentionConfig& c, F&& run) {
  double best = 1e300, total = 0.0;
  for (int rep = 0; rep < 20 && (rep < 1 || total < c.min_time_s); ++rep) {
    const auto start = std::chrono::steady_clock::now();
    run();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, seconds);
    total += seconds;
  }
  return best;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024.0 && unit < 4) bytes /= 1024.0, ++unit;
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[unit]);
}

std::string format_ms(double seconds) { return fmt::format("{:.1f}", seconds * 1e3); }

double max_relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double worst = 0.0, scale = 1.0;
  for (float w : want) scale = std::max(scale, double(std::abs(w)));
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i]));
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return worst / scale;
}

CpuTileRule bench_rule(const std::string& name) {
  return name == "max_rows" ? CpuTileRule::max_rows : CpuTileRule::paper;
}

CpuTiling bench_tiling(const BenchAttentionConfig& c, int64_t kib, CpuTileRule rule) {
  CpuTiling t;
  t.onchip_bytes = kib * 1024;
  t.threads = c.threads;
  t.rule = rule;
  return t;
}

// Tiled against the reference, forward and backward, with and without dropout.
void bench_validate(const BenchAttentionConfig& c, int n) {
  constexpr double kTolerance = 1e-4;
  for (float dropout : {0.0f, 0.1f}) {
    BenchProblem want(c, n, 1), got(c, n, 1);
    want.params.dropout_p = got.params.dropout_p = dropout;
    const CpuTiling tiling = bench_tiling(c, c.onchip_kib, bench_rule(c.rule));
    attention_forward_reference(want.params);
    attention_forward_cpu(got.params, tiling);
    const double o_error = max_relative_error(got.o, want.o), lse_error = max_relative_error(got.lse, want.lse);
    want.o = got.o, want.lse = got.lse;  // both backward passes read the same O and LSE
    attention_backward_reference(want.params);
    attention_backward_cpu(got.params, tiling);
    const double errors[] = {o_error, lse_error, max_relative_error(got.dq, want.dq),
                             max_relative_error(got.dk, want.dk), max_relative_error(got.dv, want.dv)};
    fmt::print(
        "validate N={:<5} dropout={:.1f}: max error relative to max |ref|: O {:.1e} LSE {:.1e} dQ {:.1e} "
        "dK {:.1e} dV {:.1e}\n",
        n, dropout, errors[0], errors[1], errors[2], errors[3], errors[4]);
    for (double e : errors) {
      FLASHGPT_CHECK(e <= kTolerance,
                     "bench attention: the tiled path disagrees with the reference at N={} "
                     "(error {:.2e} > {:.0e}); not timing a wrong kernel",
                     n, e, kTolerance);
    }
  }
}

struct TimingRow {
  int n;
  bool naive_ran;
  double naive_fwd_s, naive_bwd_s, tiled_fwd_s, tiled_bwd_s;
  int64_t naive_fwd_bytes, naive_bwd_bytes, tiled_fwd_bytes, tiled_bwd_bytes;
  uint64_t tiled_io_bytes;      // counted in the timed forward
  uint64_t tiled_bwd_io_bytes;  // counted in the timed backward
  double standard_io_bytes;     // Algorithm 0's reads and writes, by formula
};

struct IoRow {
  int n;
  int64_t onchip_bytes;
  const char* rule;
  CpuTileShape tile;
  uint64_t counted_bytes;
  double bound_bytes;  // N^2 d^2 / M, M in floats, times 4 bytes, per (batch, head)
};

// What the option table does not show: --quick's caps and the thread count OpenMP resolves.
void bench_print_effective(const BenchAttentionConfig& c) {
  if (c.quick) {
    fmt::print("--quick: N up to {}, naive up to {}, IO sweep up to {}\n", c.max_seqlen, c.naive_max_seqlen,
               c.io_max_seqlen);
  }
  fmt::print("{} threads; times are the fastest of repeated runs (at least {:.1f} s per measurement)\n\n",
             c.threads > 0 ? c.threads : omp_get_max_threads(), c.min_time_s);
}

// ---- --device cuda ----

#ifdef FLASHGPT_WITH_CUDA
// One row of the GPU table: bf16, heads_q = heads_kv.
struct GpuRow {
  int batch, heads, seqlen, head_dim;
  bool causal;
  float dropout;
};

// The FlashAttention papers' table (hidden 2048, so heads = 2048 / d; batch * seqlen = 16k
// tokens), seqlens limited to [--min-seqlen, --max-seqlen], and the model's attention (batch
// 64, 12 heads, seqlen 512, d 64, causal, with dropout 0.1 and without) where d 64 is measured.
// --dropout p: each row of the papers' table twice, without dropout and with p.
std::vector<GpuRow> gpu_rows(const BenchAttentionConfig& c) {
  const std::vector<int> dims = c.head_dim_given ? std::vector<int>{c.head_dim} : std::vector<int>{64, 128};
  std::vector<GpuRow> rows;
  for (int d : dims)
    for (bool causal : {false, true})
      for (int s = 512; s <= 16384; s *= 2)
        if (s >= c.min_seqlen && s <= c.max_seqlen) {
          rows.push_back({16384 / s, 2048 / d, s, d, causal, 0.0f});
          if (c.dropout > 0.0f) rows.push_back({16384 / s, 2048 / d, s, d, causal, c.dropout});
        }
  if (std::find(dims.begin(), dims.end(), 64) != dims.end()) {
    rows.push_back({64, 12, 512, 64, true, 0.1f});
    // The same without dropout: the kernel the model's evaluation and generation run.
    rows.push_back({64, 12, 512, 64, true, 0.0f});
  }
  return rows;
}

// The forward kernel for these params, with the TMA forward's tile ("wgmma-tma/t3"), so that runs
// with FLASHGPT_ATTN_TMA_TILE or FLASHGPT_ATTN_TMA128_TILE say which tile they timed.
std::string fwd_kernel_label(const AttentionParams& params) {
  const int tile = attention_cuda_forward_tma_tile(params);
  return std::string(attention_cuda_forward_kernel(params)) + (tile >= 0 ? fmt::format("/t{}", tile) : "");
}

// The backward's main kernel for these params, "+dqfuse" when it converts dQ itself
// (attention_cuda_backward_fused_dq_convert, FLASHGPT_ATTN_BWD_FUSED_CONVERT), "+dqwarp" when
// its dQ warp adds dQ (attention_cuda_backward_dq_warp, FLASHGPT_ATTN_BWD_DQ_WARP; the benchmark's
// backward is the fast mode), "+tma64v" when that is the d64 variant
// (attention_cuda_backward_tma64_variant, FLASHGPT_ATTN_BWD_TMA64_VARIANT).
std::string bwd_kernel_label(const AttentionParams& params) {
  return std::string(attention_cuda_backward_kernel(params)) +
         (attention_cuda_backward_fused_dq_convert(params) ? "+dqfuse" : "") +
         (attention_cuda_backward_dq_warp(params) ? "+dqwarp" : "") +
         (attention_cuda_backward_tma64_variant(params) ? "+tma64v" : "");
}

double gpu_flops_forward(const GpuRow& r) {
  const double f = 4.0 * r.batch * r.heads * double(r.seqlen) * r.seqlen * r.head_dim;
  return r.causal ? f / 2 : f;
}


// Device memory, freed on scope exit.
struct GpuBuffer {
  void* ptr = nullptr;
  explicit GpuBuffer(size_t bytes) {
    if (bytes > 0) FLASHGPT_CUDA_CHECK(cudaMalloc(&ptr, bytes));
  }
  ~GpuBuffer() { cudaFree(ptr); }
  GpuBuffer(const GpuBuffer&) = delete;
  GpuBuffer& operator=(const GpuBuffer&) = delete;
};

// bf16 words uniform in [-1, 1) from a counter hash (fast enough for the 16k x 2048 tensors).
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
  std::vector<uint16_t> out(n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < int64_t(n); ++i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + uint64_t(i) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    out[i] = bf16_from_float(float(double(z >> 11) * 0x1.0p-53 * 2.0 - 1.0));
  }
  return out;
}

// Q, K, V, O, LSE, dO, dQ, dK, dV of one dense bf16 problem on the device.
struct GpuProblem {
  AttentionParams params;
  std::deque<GpuBuffer> buffers;  // deque: the buffers never move
  GpuProblem(int batch, int heads, int seqlen, int head_dim, bool causal, float dropout,
             const std::vector<uint16_t>* host_inputs) {
    AttentionParams& p = params;
    p.dtype = DType::bf16;
    p.batch = batch, p.seqlen_q = p.seqlen_k = seqlen, p.heads_q = p.heads_kv = heads, p.head_dim = head_dim;
    p.mask = causal ? Mask::causal : Mask::none;
    p.dropout_p = dropout;
    p.rng = {0x5eed'0000'0000'0001ull, 0};
    attention_set_dense_strides(p);
    const size_t n = size_t(batch) * seqlen * heads * head_dim;
    for (int i = 0; i < 8; ++i) buffers.emplace_back(n * 2);
    buffers.emplace_back(size_t(batch) * heads * seqlen * 4);
    void* q = buffers[0].ptr; void* k = buffers[1].ptr; void* v = buffers[2].ptr; void* d_o = buffers[3].ptr;
    for (int i = 0; i < 4; ++i)
      FLASHGPT_CUDA_CHECK(cudaMemcpy(buffers[i].ptr, host_inputs[i].data(), n * 2, cudaMemcpyHostToDevice));
    p.q = q, p.k = k, p.v = v, p.d_o = d_o;
    p.o = buffers[4].ptr, p.dq = buffers[5].ptr, p.dk = buffers[6].ptr, p.dv = buffers[7].ptr;
    p.lse = static_cast<float*>(buffers[8].ptr);
  }
};

std::vector<float> download_bf16(const void* device, size_t n) {
  std::vector<uint16_t> bits(n);
  FLASHGPT_CUDA_CHECK(cudaMemcpy(bits.data(), device, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(bits[i]);
  return out;
}

// ||got - want|| / ||want||, ||want|| floored at an RMS of 0.05 (gradients that are zero in
// exact arithmetic are rounding noise on the GPU), as attention_cuda_test measures.
double rms_relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = double(got[i]) - double(want[i]);
    num += std::isnan(e) ? INFINITY : e * e;
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 0.05 * 0.05 * double(want.size())));
}

// The kernels of one (head dim, causal, dropout) configuration against the CPU reference (fp32
// on the same bf16 inputs, the same dropout seed), forward and backward, at an awkward size.
void gpu_validate(int head_dim, bool causal, float dropout) {
  constexpr int kBatch = 2, kHeads = 2, kSeqlen = 509;  // 509: no block size divides it
  const double kTolerance = 1.6e-2, kGradTolerance = 2.4e-2;  // bf16 outputs, as attention_cuda_test
  const size_t n = size_t(kBatch) * kSeqlen * kHeads * head_dim;
  const std::vector<uint16_t> host[4] = {random_bf16(n, 11), random_bf16(n, 12), random_bf16(n, 13),
                                         random_bf16(n, 14)};
  GpuProblem gpu(kBatch, kHeads, kSeqlen, head_dim, causal, dropout, host);
  const size_t ws_bytes = attention_backward_workspace_bytes(gpu.params);
  GpuBuffer ws(ws_bytes);
  attention_forward_cuda(gpu.params);
  attention_backward_cuda(gpu.params, ws.ptr, ws_bytes);
  FLASHGPT_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<float> in[4], o(n), lse(size_t(kBatch) * kHeads * kSeqlen), dq(n), dk(n), dv(n);
  for (int i = 0; i < 4; ++i) {
    in[i].resize(n);
    for (size_t j = 0; j < n; ++j) in[i][j] = bf16_to_float(host[i][j]);
  }
  AttentionParams ref = gpu.params;
  ref.dtype = DType::f32;
  ref.q = in[0].data(), ref.k = in[1].data(), ref.v = in[2].data(), ref.d_o = in[3].data();
  ref.o = o.data(), ref.lse = lse.data(), ref.dq = dq.data(), ref.dk = dk.data(), ref.dv = dv.data();
  attention_forward_reference(ref);
  attention_backward_reference(ref);
  const double errors[] = {rms_relative_error(download_bf16(gpu.params.o, n), o),
                           rms_relative_error(download_bf16(gpu.params.dq, n), dq),
                           rms_relative_error(download_bf16(gpu.params.dk, n), dk),
                           rms_relative_error(download_bf16(gpu.params.dv, n), dv)};
  fmt::print("validate d{:<3} {:<10} dropout {:.1f} (forward {}, backward {}): relative error O {:.1e} dQ {:.1e} "
             "dK {:.1e} dV {:.1e}\n",
             head_dim, causal ? "causal" : "non-causal", dropout, fwd_kernel_label(gpu.params),
             bwd_kernel_label(gpu.params), errors[0], errors[1], errors[2], errors[3]);
  for (int i = 0; i < 4; ++i) {
    const char* names[] = {"O", "dQ", "dK", "dV"};
    FLASHGPT_CHECK(errors[i] <= (i == 0 ? kTolerance : kGradTolerance),
                   "bench attention (CUDA): {} of head_dim {} {} dropout {} disagrees with the CPU reference "
                   "(relative error {:.2e} > {:.1e}); not timing a wrong kernel",
                   names[i], head_dim, causal ? "causal" : "non-causal", dropout, errors[i],
                   i == 0 ? kTolerance : kGradTolerance);
  }
}

// Median milliseconds of `run` over CUDA events, after a warm-up, repeated until min_time_s.
template <typename F>
double gpu_time_ms(double min_time_s, F&& run) {
  cudaEvent_t start, stop;
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&start));
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&stop));
  run();
  FLASHGPT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> times;
  double total = 0.0;
  while (times.size() < 3 || (total < min_time_s * 1e3 && times.size() < 1000)) {
    FLASHGPT_CUDA_CHECK(cudaEventRecord(start));
    run();
    FLASHGPT_CUDA_CHECK(cudaEventRecord(stop));
    FLASHGPT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    FLASHGPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
    total += ms;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void bench_attention_cuda(BenchAttentionConfig c) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  FLASHGPT_CHECK(status == cudaSuccess && devices > 0,
                 "bench attention --device cuda: no CUDA device is visible ({}); run it on a machine with an "
                 "NVIDIA GPU, or use --device cpu",
                 status == cudaSuccess ? "none found" : cudaGetErrorString(status));
  if (c.quick) c.max_seqlen = std::min(c.max_seqlen, 1024), c.min_time_s = std::min(c.min_time_s, 0.05);
  FLASHGPT_CHECK(c.head_dim_given || (attention_cuda_head_dim_compiled(64) && attention_cuda_head_dim_compiled(128)),
                 "bench attention --device cuda: this build lacks head dim 64 or 128 (FLASHGPT_ATTENTION_HEAD_DIMS)");
  FLASHGPT_CHECK(attention_cuda_head_dim_compiled(c.head_dim),
                 "bench attention --device cuda: head_dim {} was not compiled into this build", c.head_dim);
  cudaDeviceProp prop{};
  FLASHGPT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  fmt::print("device: {} (compute capability {}.{}, {} SMs); bf16; times are medians of CUDA-event runs, at least "
             "{:.2f} s per measurement\n\n",
             prop.name, prop.major, prop.minor, prop.multiProcessorCount, c.min_time_s);
  const std::vector<GpuRow> rows = gpu_rows(c);
  FLASHGPT_CHECK(!rows.empty(), "bench attention --device cuda: no seqlen of 512 .. 16384 lies in [{}, {}]",
                 c.min_seqlen, c.max_seqlen);

  // Validation first: every (head dim, causal, dropout) the table times.
  std::vector<std::tuple<int, bool, float>> configs;
  for (const GpuRow& r : rows) {
    const auto key = std::make_tuple(r.head_dim, r.causal, r.dropout);
    if (std::find(configs.begin(), configs.end(), key) == configs.end()) configs.push_back(key);
  }
  // The backward kernels to time, each validated: the forced ones in turn, or the automatic choice
  // (""). The override before is restored on the way out.
  const std::vector<std::string> bwd_kernels = c.bwd_kernels.empty() ? std::vector<std::string>{""} : c.bwd_kernels;
  struct RestoreBwdKernel {
    std::string before;
    ~RestoreBwdKernel() { attention_cuda_force_backward_kernel(before.c_str()); }
  } const restore{attention_cuda_force_backward_kernel(nullptr)};
  attention_cuda_force_backward_kernel(restore.before.c_str());
  for (const std::string& kernel : bwd_kernels) {
    if (!c.bwd_kernels.empty()) attention_cuda_force_backward_kernel(kernel.c_str());
    for (const auto& [d, causal, dropout] : configs) gpu_validate(d, causal, dropout);
  }
  fmt::print("\n");

  // One set of inputs, as large as the largest row, shared by every row.
  size_t largest = 0;
  for (const GpuRow& r : rows) largest = std::max(largest, size_t(r.batch) * r.seqlen * r.heads * r.head_dim);
  const std::vector<uint16_t> host[4] = {random_bf16(largest, 1), random_bf16(largest, 2), random_bf16(largest, 3),
                                         random_bf16(largest, 4)};
  fmt::print("FLOPs: 4 b h s^2 d forward (halved when causal), backward 2.5x the forward\n");
  fmt::print("{:>5} {:>5} {:>6} {:>4} {:>7} {:>7} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>8}\n", "batch", "heads",
             "seqlen", "d", "causal", "dropout", "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "fwd", "bwd");
  struct Result {
    GpuRow row;
    double fwd_ms, bwd_ms;
    std::string fwd_kernel;  // fwd_kernel_label (the TMA forward takes no varlen batch)
    std::string bwd_kernel;  // bwd_kernel_label
  };
  std::vector<Result> results;
  for (const GpuRow& r : rows)
    for (const std::string& kernel : bwd_kernels) {
      if (!c.bwd_kernels.empty()) attention_cuda_force_backward_kernel(kernel.c_str());
      GpuProblem x(r.batch, r.heads, r.seqlen, r.head_dim, r.causal, r.dropout, host);
      const size_t ws_bytes = attention_backward_workspace_bytes(x.params);
      GpuBuffer ws(ws_bytes);
      Result res{r, 0.0, 0.0, fwd_kernel_label(x.params), bwd_kernel_label(x.params)};
      res.fwd_ms = gpu_time_ms(c.min_time_s, [&] { attention_forward_cuda(x.params); });
      if (c.backward)
        res.bwd_ms = gpu_time_ms(c.min_time_s, [&] { attention_backward_cuda(x.params, ws.ptr, ws_bytes); });
      FLASHGPT_CUDA_CHECK(cudaDeviceSynchronize());
      const std::vector<float> o = download_bf16(x.params.o, size_t(r.batch) * r.seqlen * r.heads * r.head_dim);
      FLASHGPT_CHECK(std::all_of(o.begin(), o.end(), [](float f) { return std::isfinite(f); }),
                     "bench attention (CUDA): non-finite output at batch {} heads {} seqlen {} d {}", r.batch, r.heads,
                     r.seqlen, r.head_dim);
      const double fwd_flops = gpu_flops_forward(r);
      auto tflops = [](double flops, double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0; };
      fmt::print("{:>5} {:>5} {:>6} {:>4} {:>7} {:>7.1f} | {:>9.3f} {:>9.1f} | {:>9} {:>9} | {:>9} {:>8}\n", r.batch,
                 r.heads, r.seqlen, r.head_dim, r.causal ? "yes" : "no", r.dropout, res.fwd_ms,
                 tflops(fwd_flops, res.fwd_ms), c.backward ? fmt::format("{:.3f}", res.bwd_ms) : "-",
                 c.backward ? fmt::format("{:.1f}", tflops(2.5 * fwd_flops, res.bwd_ms)) : "-",
                 res.fwd_kernel, c.backward ? res.bwd_kernel : std::string("-"));
      std::fflush(stdout);
      results.push_back(res);
    }
  fmt::print("\nbench attention (CUDA): {} rows validated and timed\n", results.size());
  if (c.out_dir.empty()) return;
  const std::filesystem::path dir(c.out_dir);
  std::filesystem::create_directories(dir);
  const std::filesystem::path csv = dir / "attention_cuda.csv";
  atomic_write_file(csv, [&](AtomicFile& out) {
    out.write(std::string_view("device,batch,heads,seqlen,head_dim,causal,dropout,fwd_kernel,bwd_kernel,fwd_ms,bwd_ms,"
                               "fwd_tflops,bwd_tflops\n"));
    for (const Result& res : results) {
      const GpuRow& r = res.row;
      const double f = gpu_flops_forward(r);
      out.write(fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{}\n", prop.name, r.batch, r.heads, r.seqlen,
                            r.head_dim, int(r.causal), r.dropout, res.fwd_kernel, res.bwd_kernel, res.fwd_ms,
                            res.bwd_ms,
                            f / (res.fwd_ms * 1e-3) / 1e12,
                            res.bwd_ms > 0 ? 2.5 * f / (res.bwd_ms * 1e-3) / 1e12 : 0.0));
    }
  });
  fmt::print("wrote {}\n", csv.string());
}
#else
void bench_attention_cuda(const BenchAttentionConfig&) {
  FLASHGPT_FAIL("bench attention --device cuda: this flashgpt was built without CUDA; configure with "
                "-DFLASHGPT_CUDA=ON on a machine with nvcc, or use --device cpu");
}
#endif

void bench_attention_run(BenchAttentionConfig c) {
  if (c.device == "cuda") return bench_attention_cuda(c);
  FLASHGPT_CHECK(c.dropout == 0.0f, "bench attention: --dropout applies to --device cuda only (the CPU runs time "
                                    "the tiled kernel without dropout)");
  FLASHGPT_CHECK(c.device == "cpu", "bench attention: --device {} is not available (cpu or cuda)", c.device);
  if (c.quick) {
    c.max_seqlen = std::min(c.max_seqlen, 2048);
    c.naive_max_seqlen = std::min(c.naive_max_seqlen, 2048);
    c.io_max_seqlen = std::min(c.io_max_seqlen, 1024);
    c.min_time_s = 0.05;
  }
  FLASHGPT_CHECK(c.min_seqlen >= 1 && c.min_seqlen <= c.max_seqlen,
                 "bench attention: need 1 <= --min-seqlen ({}) <= --max-seqlen ({})", c.min_seqlen, c.max_seqlen);
  bench_print_effective(c);
  std::vector<int> sizes;
  for (int64_t n = c.min_seqlen; n <= c.max_seqlen; n *= 2) sizes.push_back(static_cast<int>(n));

  for (size_t i = 0; i < std::min<size_t>(2, sizes.size()); ++i) bench_validate(c, std::min(sizes[i], 1024));
  fmt::print("\n");

  // ---- time and memory ----
  const CpuTiling tiling = bench_tiling(c, c.onchip_kib, bench_rule(c.rule));
  const CpuTileShape tile = attention_cpu_tile_shape(tiling, c.head_dim);
  fmt::print(
      "naive = reference (S and P in double), tiled = FlashAttention (Br={}, Bc={}); peak = workspace "
      "allocated beyond inputs and outputs (max of forward and backward); IO = bytes between tensors and "
      "tiles in the tiled passes (counted) vs standard attention's forward (Algorithm 0, 4N^2 + 4Nd "
      "floats)\n",
      tile.block_rows, tile.block_cols);
  fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", "N",
             "naive fwd", "tiled fwd", "ratio", "naive bwd", "tiled bwd", "ratio", "naive peak", "tiled peak",
             "tiled fwd", "tiled bwd", "standard");
  fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", "", "ms",
             "ms", "", "ms", "ms", "", "", "", "IO counted", "IO counted", "fwd IO");
  std::vector<TimingRow> rows;
  for (int n : sizes) {
    BenchProblem x(c, n, 7);
    TimingRow row{};
    row.n = n;
    row.naive_ran = n <= c.naive_max_seqlen;
    row.naive_fwd_bytes = attention_reference_workspace_bytes(x.params, AttentionPass::forward);
    row.naive_bwd_bytes = attention_reference_workspace_bytes(x.params, AttentionPass::backward);
    row.tiled_fwd_bytes = attention_cpu_workspace_bytes(x.params, AttentionPass::forward, tiling);
    row.tiled_bwd_bytes = attention_cpu_workspace_bytes(x.params, AttentionPass::backward, tiling);
    row.standard_io_bytes = 4.0 * c.batch * c.heads * (4.0 * n * n + 4.0 * n * c.head_dim);
    // The first timed run of each pass is also the instrumented one: counting costs a few
    // additions per tile, nothing next to the tile's arithmetic.
    IoCounter fwd_io, bwd_io;
    bool counting = true;
    row.tiled_fwd_s = time_best_s(c, [&] {
      attention_forward_cpu(x.params, tiling, counting ? &fwd_io : nullptr);
      counting = false;
    });
    row.tiled_io_bytes = fwd_io.total();
    if (c.backward) {
      counting = true;
      row.tiled_bwd_s = time_best_s(c, [&] {
        attention_backward_cpu(x.params, tiling, counting ? &bwd_io : nullptr);
        counting = false;
      });
      row.tiled_bwd_io_bytes = bwd_io.total();
    }
    if (row.naive_ran) {
      row.naive_fwd_s = time_best_s(c, [&] { attention_forward_reference(x.params); });
      if (c.backward) row.naive_bwd_s = time_best_s(c, [&] { attention_backward_reference(x.params); });
    }
    const std::string skipped = "skipped";
    auto ratio = [&](double naive, double tiled) {
      return row.naive_ran && tiled > 0 ? fmt::format("{:.1f}x", naive / tiled) : std::string("-");
    };
    fmt::print("{:>6} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | {:>11} {:>11} | {:>11} {:>11} {:>11}\n", n,
               row.naive_ran ? format_ms(row.naive_fwd_s) : skipped, format_ms(row.tiled_fwd_s),
               ratio(row.naive_fwd_s, row.tiled_fwd_s),
               row.naive_ran && c.backward ? format_ms(row.naive_bwd_s) : skipped,
               c.backward ? format_ms(row.tiled_bwd_s) : skipped, ratio(row.naive_bwd_s, row.tiled_bwd_s),
               format_bytes(std::max(row.naive_fwd_bytes, c.backward ? row.naive_bwd_bytes : 0)),
               format_bytes(std::max(row.tiled_fwd_bytes, c.backward ? row.tiled_bwd_bytes : 0)),
               format_bytes(row.tiled_io_bytes), c.backward ? format_bytes(row.tiled_bwd_io_bytes) : skipped,
               format_bytes(row.standard_io_bytes));
    std::fflush(stdout);
    rows.push_back(row);
  }
  if (c.naive_max_seqlen < c.max_seqlen) {
    fmt::print("naive skipped above N={} (--naive-max-seqlen): its backward would allocate {} at N={}\n",
               c.naive_max_seqlen, format_bytes(2.0 * 8 * double(c.max_seqlen) * c.max_seqlen), c.max_seqlen);
  }

  // ---- IO against the bound, several M ----
  fmt::print(
      "\nIO of the tiled forward against Theorem 2's bound N^2 d^2 / M (M in floats, x4 bytes, x batch*heads), "
      "valid for d <= M <= N d\n");
  fmt::print("{:>6} {:>9} {:>9} {:>11} {:>13} {:>13} {:>13}\n", "N", "M", "rule", "Br x Bc", "counted", "bound",
             "counted/bound");
  std::vector<IoRow> io_rows;
  for (int n : sizes) {
    if (n > c.io_max_seqlen) break;
    BenchProblem x(c, n, 9);
    for (int64_t kib : c.io_onchip_kib) {
      for (CpuTileRule rule : {CpuTileRule::paper, CpuTileRule::max_rows}) {
        const CpuTiling t = bench_tiling(c, kib, rule);
        IoCounter io;
        attention_forward_cpu(x.params, t, &io);
        const double m_floats = kib * 1024 / 4.0;
        IoRow r{n,
                kib * 1024,
                rule == CpuTileRule::paper ? "paper" : "max_rows",
                attention_cpu_tile_shape(t, c.head_dim),
                io.total(),
                4.0 * c.batch * c.heads * double(n) * n * c.head_dim * c.head_dim / m_floats};
        fmt::print("{:>6} {:>9} {:>9} {:>11} {:>13} {:>13} {:>13.2f}{}\n", n, format_bytes(double(r.onchip_bytes)),
                   r.rule, fmt::format("{}x{}", r.tile.block_rows, r.tile.block_cols),
                   format_bytes(double(r.counted_bytes)), format_bytes(r.bound_bytes), r.counted_bytes / r.bound_bytes,
                   m_floats > double(n) * c.head_dim ? "  (M > N d: outside the bound's range)" : "");
        io_rows.push_back(r);
      }
    }
    std::fflush(stdout);
  }

  if (c.out_dir.empty()) return;
  const std::filesystem::path dir(c.out_dir);
  std::filesystem::create_directories(dir);
  const std::filesystem::path timing_csv = dir / "attention_cpu_timing.csv", io_csv = dir / "attention_cpu_io.csv";
  atomic_write_file(timing_csv, [&](AtomicFile& out) {
    out.write(std::string_view(
        "n,batch,heads,head_dim,causal,naive_ran,naive_fwd_s,naive_bwd_s,tiled_fwd_s,tiled_bwd_s,"
        "naive_fwd_bytes,naive_bwd_bytes,tiled_fwd_bytes,tiled_bwd_bytes,tiled_io_bytes,tiled_bwd_io_bytes,standard_"
        "io_bytes\n"));
    for (const TimingRow& r : rows) {
      out.write(fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r.n, c.batch, c.heads, c.head_dim,
                            int(c.causal), int(r.naive_ran), r.naive_fwd_s, r.naive_bwd_s, r.tiled_fwd_s,
                            r.tiled_bwd_s, r.naive_fwd_bytes, r.naive_bwd_bytes, r.tiled_fwd_bytes, r.tiled_bwd_bytes,
                            r.tiled_io_bytes, r.tiled_bwd_io_bytes, r.standard_io_bytes));
    }
  });
  atomic_write_file(io_csv, [&](AtomicFile& out) {
    out.write(std::string_view("n,head_dim,onchip_bytes,rule,block_rows,block_cols,counted_bytes,bound_bytes\n"));
    for (const IoRow& r : io_rows) {
      out.write(fmt::format("{},{},{},{},{},{},{},{}\n", r.n, c.head_dim, r.onchip_bytes, r.rule, r.tile.block_rows,
                            r.tile.block_cols, r.counted_bytes, r.bound_bytes));
    }
  });
  fmt::print("\nwrote {} and {}\n", timing_csv.string(), io_csv.string());

  // The plot is matplotlib's job; the CSVs are the result, the PNG a convenience.
  std::filesystem::path script = std::filesystem::path(FLASHGPT_SOURCE_DIR) / "scripts" / "plot_attention_cpu.py";
  if (!std::filesystem::exists(script)) script = "scripts/plot_attention_cpu.py";
  const std::filesystem::path png = dir / "attention_cpu.png";
  const std::vector<std::string> plot = {"python3", script.string(), "--timing", timing_csv.string(), "--io",
                                         io_csv.string(), "--out", atomic_temp_path(png).string()};
  if (process_run({"python3", "-c", "import matplotlib"}, ChildOutput::discard) != 0) {
    fmt::print("no plot: python3 with matplotlib is needed (pip install matplotlib), then run\n  python3 {} "
               "--timing {} --io {} --out {}\n", script.string(), timing_csv.string(), io_csv.string(), png.string());
    return;
  }
  const int status = process_run(plot);
  if (status != 0) {
    std::error_code ignored;
    std::filesystem::remove(plot.back(), ignored);
    FLASHGPT_FAIL("plotting {} failed: python3 {} exited with status {}", png.string(), script.string(), status);
  }
  atomic_publish(plot.back(), png);
  fmt::print("wrote {}\n", png.string());
}

}  // namespace

void cli_add_bench_attention(CLI::App& bench) {
  auto config = std::make_shared<BenchAttentionConfig>();
  auto* cmd = bench.add_subcommand("attention", "Naive vs tiled (FlashAttention) attention: time, memory, IO");
  cmd->add_option("--device", config->device,
                  "Where to run: cpu (naive vs tiled, IO) or cuda (our GPU kernels over the standard shape table)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cli_option_out(*cmd, config->out_dir, "Write CSV and PNG into this directory");
  cmd->add_option("--min-seqlen", config->min_seqlen, "Smallest N (then doubling)")->capture_default_str();
  cmd->add_option("--max-seqlen", config->max_seqlen, "Largest N")->capture_default_str();
  cmd->add_option("--naive-max-seqlen", config->naive_max_seqlen,
                  "Largest N for the naive reference (its backward needs 16 N^2 bytes)")
      ->capture_default_str();
  cmd->add_option("--io-max-seqlen", config->io_max_seqlen, "Largest N of the IO-vs-M sweep")->capture_default_str();
  cmd->add_option("--batch", config->batch, "Batch size")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--heads", config->heads, "Heads")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--head-dim", config->head_dim, "Head dimension (--device cuda: only this one, not 64 and 128)")
      ->check(CLI::IsMember(std::vector<int>(kAttentionHeadDims.begin(), kAttentionHeadDims.end())))
      ->capture_default_str();
  cmd->add_flag("--causal", config->causal, "Causal mask");
  cmd->add_flag("!--no-backward", config->backward, "Time the forward pass only");
  cmd->add_flag("--quick", config->quick, "N up to 2048, short measurements (a smoke run)");
  cli_option_threads(*cmd, config->threads, "OpenMP threads");
  cmd->add_option("--onchip-kib", config->onchip_kib, "On-chip budget M of the timed tiled run, KiB")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--rule", config->rule, "Tile rule of the timed tiled run: paper (Br = min(Bc, d)) or max_rows")
      ->check(CLI::IsMember({"paper", "max_rows"}))
      ->capture_default_str();
  cmd->add_option("--io-onchip-kib", config->io_onchip_kib, "Budgets M of the IO sweep, KiB")->capture_default_str();
  cmd->add_option("--min-time", config->min_time_s, "Seconds to repeat each measurement for")->capture_default_str();
  cmd->add_option("--dropout", config->dropout,
                  "--device cuda: time every row of the shape table also with this dropout probability (0: only the "
                  "model's row has dropout)")
      ->check(CLI::Range(0.0f, 0.99f))
      ->capture_default_str();
  cmd->add_option("--bwd-kernels", config->bwd_kernels,
                  "--device cuda: time the backward of every row with each of these main kernels, forced in turn "
                  "and each validated first (comma-separated: mma_sync, wgmma, tma); default: the automatic choice")
      ->delimiter(',')
      ->check(CLI::IsMember({"mma_sync", "wgmma", "tma"}));
  cmd->callback([cmd, config] {
    config->head_dim_given = cmd->count("--head-dim") > 0;
    cli_config_print(*cmd, stdout);
    bench_attention_run(*config);
  });
}

}  // namespace flashgpt
