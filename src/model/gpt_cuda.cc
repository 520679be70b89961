// The bf16 CUDA backend of GptModel (model.h). fp32 master weights, fp32 gradients and fp32
// AdamW moments live on the GPU in model_param_specs() layout; a bf16 copy of the weights,
// refreshed by every AdamW step, feeds the matmuls (cuBLASLt, fp32 accumulation). The
// residual stream is fp32 (as under torch autocast), everything the matmuls read is bf16.
//
// Gradients are fp32: weight gradients are accumulated by cuBLASLt straight into them
// (beta = 1), so micro-batches and classifier chunks add without bf16 rounding, and the
// global norm and AdamW read them once.
//
// A step enqueues everything on one stream and synchronizes once, to read the loss; all
// device memory is allocated in the constructor. forward_backward is captured once per
// (B, T, loss scale) as two CUDA graphs (forward + classifier, then backward) and replayed:
// the per-step values (tokens, targets, the embedding's token groups, the dropout seed and
// step, the attention's dropout streams) are copied from pinned host memory by the graphs'
// first nodes, and the kernels read the dropout values from device memory
// (DropoutSite::seed_step, AttentionParams::rng_device). Where capture fails the step runs
// eagerly; ModelOptions::cuda_graph or FLASHGPT_CUDA_GRAPH=0 turns graphs off. With matmul
// autotuning (matmul_cublaslt.h; on unless FLASHGPT_MATMUL_AUTOTUNE=0) the matmul plans a
// capture meets are tuned after it and the pair is captured again with the chosen algorithms.
//
// With options.deterministic the attention backward orders its dQ atomics, cuBLASLt keeps
// algorithms without scheduling-dependent reductions and the bias gradients are summed by our
// column-sum kernel (or, FLASHGPT_LN_BIAS_GRAD, the LayerNorm backward) rather than cuBLASLt's
// epilogues; every other kernel here reduces in a fixed order, so two runs give the same bits.
#include <flashgpt/attention_cuda.h>
#include <flashgpt/env_switch.h>
#include <flashgpt/error.h>
#include <flashgpt/model.h>
#include <flashgpt/philox.h>

#include <flashgpt/cuda_check.h>
#include "gpt_cuda_ops.h"
#include "matmul_cublaslt.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace flashgpt {
namespace {

using model_cuda::bf16;
using model_cuda::DropoutSite;
using model_cuda::Epilogue;

constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;  // Hopper's recommended cuBLASLt scratch
// bf16 logits held at once (rows x Vp). Seed, V = 100277, B 64 x 512 on an H100: 1 GiB
// chunks spent 83.6 ms per step on the GPU, 4 GiB 81.3 (fewer passes over the fp32 wte
// gradient); 2 GiB keeps the seed's peak under torch.compile's at V = 50257 too.
constexpr size_t kLogitsChunkBytes = size_t{2} << 30;

// The logits chunk in bytes: kLogitsChunkBytes, or FLASHGPT_LOGITS_CHUNK_MB (a tuning knob
// of the benchmark; more rows per chunk means fewer passes over the fp32 wte gradient).
size_t logits_chunk_bytes() {
  const char* mb = std::getenv("FLASHGPT_LOGITS_CHUNK_MB");
  if (mb == nullptr || *mb == '\0') return kLogitsChunkBytes;
  const long long value = std::atoll(mb);
  FLASHGPT_CHECK(value > 0, "FLASHGPT_LOGITS_CHUNK_MB must be a positive number of MiB, got '{}'", mb);
  return size_t(value) << 20;
}
constexpr uint64_t kAttentionSeedXor = 0x5bd1e995ull;       // model.h's attention dropout stream

// The paths of the step that have an older and a newer kernel (docs/model_gpu.md, "v7" and
// "v8"): the defaults below, as the H100 A/Bs of 2026-12-07 picked them, overridden by
// FLASHGPT_CLASSIFIER_CLUSTER, FLASHGPT_FUSED_RESIDUAL_LN, FLASHGPT_LN_BACKWARD_REGISTERS,
// FLASHGPT_LN_BIAS_GRAD (0 or 1) and FLASHGPT_CLASSIFIER_GRID, so that one GPU call can time
// both.
//   classifier cluster: the one-pass softmax (ClassifierKernel::cluster) instead of two_pass
//     (off: 1.7 ms a step slower).
//   fused residual + LayerNorm: residual_layernorm_forward instead of residual_forward and
//     then layernorm_forward (the fp32 residual is written once, not written and read again).
//   LayerNorm backward in registers: LayerNormBackwardKernel::registers.
//   bias gradients from the LayerNorm backward (FLASHGPT_LN_BIAS_GRAD): the LayerNorm(+dropout)
//     backward that writes dy_ also sums its columns into fc_proj_b / attn_proj_b, and their
//     dW matmuls run without cuBLASLt's BGRADB epilogue (or, deterministic, without the
//     column_sum pass).
//   classifier grid (FLASHGPT_CLASSIFIER_GRID=<blocks per SM>: 1, 2, 4 or 8; 0 = two_pass):
//     ClassifierKernel::l2_two_pass, the two-pass softmax from a persistent grid whose second
//     read of a row hits L2. FLASHGPT_CLASSIFIER_CLUSTER=1 takes precedence over the default.
constexpr bool kClassifierClusterDefault = false;
constexpr bool kFusedResidualLnDefault = true;
constexpr bool kLnBackwardRegistersDefault = true;
constexpr bool kLnBiasGradDefault = true;
// FLASHGPT_BGRADB=0: the bias gradients that still come from cuBLASLt's BGRADB epilogue (qkv_b,
// and fc_proj_b / attn_proj_b with FLASHGPT_LN_BIAS_GRAD=0) come from the plain dW product and
// column_sum instead, as in deterministic mode. In the H100 profile of 2026-12-07 qkv's dW with
// BGRADB ran at about 440 TFLOP/s against about 700 for the plain dW of fc. Off by default
// since the H100 call of 2026-12-07 that timed it: qkv's dW 3.25 -> 2.28 ms a step, its column
// sums +0.79, the step 74.53 -> 74.14 ms. FLASHGPT_BGRADB=1 takes the epilogue again.
constexpr bool kBgradbDefault = false;
// FLASHGPT_BIAS_ONES=1 (fast mode; deterministic mode keeps column_sum): qkv_b's and fc_b's
// gradients come out of their dW products instead of column_sum passes over dqkv and dpre.
// ln1(l) and ln2(l) are stored with rows C + 8 apart, column C holding 1 and the next seven
// 0 (written once, at allocation; the LayerNorm kernels write columns below C only), so the
// product dY^T [x | 1 | 0 ...] (out, C + 8) into dw_ext_ carries the bias gradient in its
// column C; split_weight_bias_grad adds its parts into the gradients, whose layout stays.
// The forward products read x with k = C and that row stride. Takes precedence over
// FLASHGPT_BGRADB=1 for qkv_b. Off until timed on an H100 (bench/pending/run.sh biasones).
constexpr bool kBiasOnesDefault = false;
constexpr int kClassifierGridDefault = 1;
// FLASHGPT_OVERLAP: work off the step's critical path on a second stream (docs/model_gpu.md,
// "v9"). 0: one stream. 1: the classifier's softmax of chunk c (memory-bound) runs on the
// second stream, its persistent grid on FLASHGPT_OVERLAP_SOFTMAX_SMS multiprocessors, while
// the first runs the products of chunks c - 1 and c + 1 (compute-bound) on the rest; two
// logits buffers. 2: also the backward's weight products and bias column sums, which nothing
// on the critical path reads, on a third stream beside the input products, the LayerNorm
// and attention backwards. Same kernels and arithmetic, so the same bits as 0 where the
// matmul plans pick the same algorithms (always in deterministic mode). Off while profiling
// (the per-op events time one stream) and in steps with a data-parallel hook.
// The backward's stream runs below stream_'s priority (the critical path first) unless
// FLASHGPT_OVERLAP_BWD_PRIORITY=high puts it above.
constexpr int kOverlapDefault = 0;
constexpr int kOverlapSoftmaxSmsDefault = 32;
constexpr bool kOverlapBwdHighDefault = false;

int env_overlap() {
  return env_int("FLASHGPT_OVERLAP", 0, 2, kOverlapDefault,
                             "0 (one stream), 1 (classifier) or 2 (classifier and backward)");
}

// FLASHGPT_OVERLAP_SOFTMAX_SMS: the multiprocessors of the overlapped softmax's grid.
int env_overlap_softmax_sms() {
  return env_int("FLASHGPT_OVERLAP_SOFTMAX_SMS", 1, 1024, kOverlapSoftmaxSmsDefault,
                             "a number of multiprocessors");
}

// FLASHGPT_OVERLAP_GEMM_SMS (0, the default: unset): with overlap, the classifier's products
// come from plans made for that many multiprocessors (cuBLASLt's SM_COUNT_TARGET), for
// algorithms that would otherwise hold every multiprocessor while the softmax waits.
int env_overlap_gemm_sms() {
  return env_int("FLASHGPT_OVERLAP_GEMM_SMS", 0, 1024, 0, "a number of multiprocessors");
}

bool env_overlap_bwd_high() {
  const char* value = std::getenv("FLASHGPT_OVERLAP_BWD_PRIORITY");
  if (value == nullptr || *value == '\0') return kOverlapBwdHighDefault;
  FLASHGPT_CHECK(std::strcmp(value, "low") == 0 || std::strcmp(value, "high") == 0,
                 "FLASHGPT_OVERLAP_BWD_PRIORITY must be low or high, got '{}'", value);
  return std::strcmp(value, "high") == 0;
}

int env_classifier_grid() {
  const char* value = std::getenv("FLASHGPT_CLASSIFIER_GRID");
  if (value == nullptr || *value == '\0') return kClassifierGridDefault;
  const bool valid = std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0 || std::strcmp(value, "2") == 0 ||
                     std::strcmp(value, "4") == 0 || std::strcmp(value, "8") == 0;
  FLASHGPT_CHECK(valid, "FLASHGPT_CLASSIFIER_GRID must be 0 (off) or 1, 2, 4 or 8 blocks per SM, got '{}'", value);
  return value[0] - '0';
}

// Carves typed, 256-byte aligned pieces out of one device allocation. Run once with no
// base to measure, then again over the allocation to hand out pointers.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  void take(T*& ptr, size_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    ptr = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += std::max<size_t>(count, 1) * sizeof(T);
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

class GptCuda final : public GptModel {
 public:
  GptCuda(const ModelConfig& config, const ModelOptions& options);
  ~GptCuda() override;

  const ModelConfig& config() const override { return config_; }
  Device device() const override { return Device::cuda; }

  void params_get(std::span<float> out) const override { download(out, params_, "params_get"); }
  void params_set(std::span<const float> in) override;
  void adam_state_get(std::span<float> m, std::span<float> v) const override;
  void adam_state_set(std::span<const float> m, std::span<const float> v) override;
  void adam_state_shard(int64_t begin, int64_t end) override;
  MemoryReport memory_report() const override;
  void grad_ready_hook_set(GradReadyHook hook) override { grad_ready_ = std::move(hook); }
  void grads_get(std::span<float> out) const override { download(out, grads_, "grads_get"); }

  double forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                          float loss_scale) override;
  double forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) override;
  void forward_logits(std::span<const TokenId> inputs, int64_t B, int64_t T, std::span<float> logits_out) override;

  void grads_zero() override;
  double grads_norm() override;
  void adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) override;
  FlatBuffers flat_buffers() override { return FlatBuffers{params_, grads_, stream_}; }
  void params_changed() override { model_cuda::float_to_bf16(params_bf16_, params_, P_, stream_); }
  void adamw_step_range(const AdamWConfig& adam, int64_t t, float grad_scale, int64_t begin, int64_t end) override;

 private:
  // Pointers into the flat buffers: tensor `kind`, layer `layer`.
  int64_t param_offset(ParamKind kind, int64_t layer = 0) const {
    return offsets_[static_cast<int>(kind)] + layer * layer_numel_[static_cast<int>(kind)];
  }
  float* param(ParamKind kind, int64_t layer = 0) const { return params_ + param_offset(kind, layer); }
  float* grad(ParamKind kind, int64_t layer = 0) const { return grads_ + param_offset(kind, layer); }
  const bf16* weight(ParamKind kind, int64_t layer = 0) const { return params_bf16_ + param_offset(kind, layer); }

  // Activations of layer l (rows of N_max tokens per layer).
  float* resid(int64_t i) const { return resid_ + i * n_max_ * C_; }  // i in 0..2L
  // ln1 and ln2 rows are ln_ld_ apart (C, or C + 8 with bias_ones_).
  bf16* ln1(int64_t l) const { return ln1_ + l * n_max_ * ln_ld_; }
  float* ln1_mean(int64_t l) const { return ln1_stats_ + (2 * l) * n_max_; }
  float* ln1_rstd(int64_t l) const { return ln1_stats_ + (2 * l + 1) * n_max_; }
  bf16* qkv(int64_t l) const { return qkv_ + l * n_max_ * 3 * C_; }
  bf16* atty(int64_t l) const { return atty_ + l * n_max_ * C_; }
  float* lse(int64_t l) const { return lse_ + l * n_max_ * NH_; }
  bf16* ln2(int64_t l) const { return ln2_ + l * n_max_ * ln_ld_; }
  float* ln2_mean(int64_t l) const { return ln2_stats_ + (2 * l) * n_max_; }
  float* ln2_rstd(int64_t l) const { return ln2_stats_ + (2 * l + 1) * n_max_; }
  bf16* pre(int64_t l) const { return pre_ + l * n_max_ * F_; }
  bf16* gelu(int64_t l) const { return gelu_ + l * n_max_ * F_; }
  // Where cuBLASLt's epilogues write the bias gradients (added to the gradients once per
  // backward): fp32 regions [qkv_b (L, 3C)][attn_proj_b (L, C)][fc_b (L, F)][fc_proj_b (L, C)],
  // layer l of a kind at row l of its region; an epilogue that writes bf16 fills the first
  // half of the row.
  static int bias_index(ParamKind kind) {
    return kind == ParamKind::qkv_b ? 0 : kind == ParamKind::attn_proj_b ? 1 : kind == ParamKind::fc_b ? 2 : 3;
  }
  float* dbias_region(ParamKind kind) const {
    const int64_t before[4] = {0, 3 * C_, 4 * C_, 4 * C_ + F_};
    return dbias_ + L_ * before[bias_index(kind)];
  }
  void* dbias_slot(ParamKind kind, int64_t l) const {
    return dbias_region(kind) + l * layer_numel_[static_cast<int>(kind)];
  }

  // Hands out (or, with a measuring Carver, sizes) every device / pinned host buffer.
  void carve_device(Carver& c, size_t col_partial);
  void carve_host(Carver& c);
  void check_shape(int64_t B, int64_t T, const char* what) const;
  // Copies inputs (and targets when `windows`) to the device; tokens must be < V.
  void upload_tokens(std::span<const TokenId> tokens, int64_t B, int64_t T, bool windows);
  // The validation and the pinned copy of upload_tokens, without the device copies.
  void stage_tokens(std::span<const TokenId> tokens, int64_t B, int64_t T, bool windows);
  AttentionParams attention_params(int64_t l, int64_t B, int64_t T, bool train, StepRng rng) const;
  DropoutSite site(StepRng rng, int64_t s, bool train) const {
    model_cuda::DropoutSite d = model_cuda::dropout_site(rng.seed, rng.step, s, train ? config_.dropout : 0.0f);
    if (capturing_) d.seed_step = d_step_;
    return d;
  }
  void forward(int64_t B, int64_t T, bool train, StepRng rng);
  // Loss over the N = B T targets (losses_ and *d_result_), with dlnf into dln_ when grad.
  void classifier(int64_t N, bool with_grad, float loss_scale);
  void backward(int64_t B, int64_t T, StepRng rng);
  // dW (out, in) += dy^T x and the bias gradient (out) of layer l: cuBLASLt's BGRADB
  // epilogue into dbias_slot() where it has one (fast mode), else column_sum into the gradient.
  // Both run on `lane`: stream_ with matmul_, or bwd_side_ with side_matmul_ (FLASHGPT_OVERLAP=2).
  struct Lane {
    cudaStream_t stream;
    model_cuda::Matmul* matmul;
  };
  void weight_and_bias_grad(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N, int64_t in,
                            int64_t out, Lane lane);
  // The same for x a LayerNorm output with its ones column (bias_ones_): dy^T [x | 1 | 0 ...]
  // into dw_ext_, then split into the two gradients, on `lane`.
  void weight_and_bias_grad_ones(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N,
                                 int64_t out, Lane lane);
  // The projection's weight gradient, and its bias gradient unless the LayerNorm backward
  // that wrote dy summed it (ln_bias_grad_).
  void projection_grad(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N, int64_t in,
                       int64_t out, Lane lane);
  // Where the LayerNorm backward that writes dy_ for `site` adds dy_'s column sums: the bias
  // gradient of the projection the site drops with ln_bias_grad_, else nowhere.
  float* next_bias_grad(int64_t site) {
    if (!ln_bias_grad_) return nullptr;
    const int64_t l = (site - 1) / 2;  // site 1 + 2 l: attention projection, 2 + 2 l: MLP projection
    return grad(site % 2 == 1 ? ParamKind::attn_proj_b : ParamKind::fc_proj_b, l);
  }
  // How this backward's bias gradients came (qkv_b, attn_proj_b, fc_b, fc_proj_b): column
  // sums straight into the gradients (none), or an epilogue into dbias_slot() as fp32 or bf16.
  model_cuda::Matmul::BiasGrad fused_bias_[4] = {};
  // Records an epilogue's outcome for bias kind `index`; false where it did not run.
  bool fused_epilogue(int index, model_cuda::Matmul::BiasGrad got);
  double read_loss(int64_t N);
  // Groups the positions of h_tokens_ by token for encoder_backward_wte and enqueues their
  // copies to the device (the pinned sources are not touched again before the step's sync).
  void group_positions_by_token(int64_t N);
  void copy_token_groups(int64_t N);
  // The step's graphs: a cached pair for (B, T, loss_scale), captured on first use; null
  // when capture is off or failed (then the step runs eagerly).
  struct StepGraph {
    int64_t B = 0, T = 0;
    float loss_scale = 0;
    cudaGraphExec_t forward = nullptr, backward = nullptr;
  };
  StepGraph* step_graph(int64_t B, int64_t T, float loss_scale);
  cudaGraphExec_t capture(const std::function<void()>& enqueue);
  void write_step_values(StepRng rng);

  // Tells the data-parallel hook that `kind` (layer `layer` of a per-layer kind) is final
  // once the work enqueued so far on stream_ has run.
  void grad_ready(ParamKind kind, int64_t layer = 0) const {
    if (!grad_ready_) return;
    const int k = static_cast<int>(kind);
    const int64_t begin = param_offset(kind, layer);
    grad_ready_(begin, begin + (layer_numel_[k] > 0 ? layer_numel_[k] : specs_[size_t(k)].numel));
  }

  void download(std::span<float> out, const float* src, const char* what) const;
  void upload(std::span<const float> in, float* dst, const char* what);

  ModelConfig config_;
  ModelOptions options_;
  std::vector<ParamSpec> specs_;
  int64_t offsets_[kParamKinds] = {};
  int64_t layer_numel_[kParamKinds] = {};
  int64_t P_ = 0, C_ = 0, F_ = 0, L_ = 0, NH_ = 0, HD_ = 0, V_ = 0, Vp_ = 0;
  int64_t b_max_ = 0, t_max_ = 0, n_max_ = 0, chunk_rows_ = 0;
  size_t attn_ws_bytes_ = 0, ln_partial_floats_ = 0;
  model_cuda::ParamSegments segments_;

  cudaStream_t stream_ = nullptr;
  std::unique_ptr<model_cuda::Matmul> matmul_;
  // FLASHGPT_OVERLAP (above): the other streams, their own cuBLASLt workspaces and plans,
  // and the events between the streams. A hand-over (record, then wait at once) may reuse
  // kHandOver; a wait deferred past later records needs its own event.
  int overlap_ = 0;
  int overlap_softmax_sms_ = kOverlapSoftmaxSmsDefault;
  cudaStream_t side_ = nullptr;      // the classifier's softmax
  cudaStream_t bwd_side_ = nullptr;  // the backward's weight products and column sums
  std::unique_ptr<model_cuda::Matmul> side_matmul_;
  std::unique_ptr<model_cuda::Matmul> classifier_matmul_;  // FLASHGPT_OVERLAP_GEMM_SMS only
  enum OverlapEvent { kHandOver, kSoftmaxDone0, kSoftmaxDone1, kDyRead, kDpreFree, kDqkvFree, kOverlapEvents };
  cudaEvent_t overlap_events_[kOverlapEvents] = {};
  // `to` waits for the work enqueued on `from` so far.
  void hand_over(cudaStream_t from, cudaStream_t to) { record_then_wait(from, kHandOver, to); }
  void record_then_wait(cudaStream_t from, OverlapEvent e, cudaStream_t to) {
    record(from, e);
    wait(to, e);
  }
  void record(cudaStream_t s, OverlapEvent e) { FLASHGPT_CUDA_CHECK(cudaEventRecord(overlap_events_[e], s)); }
  void wait(cudaStream_t s, OverlapEvent e) { FLASHGPT_CUDA_CHECK(cudaStreamWaitEvent(s, overlap_events_[e], 0)); }
  char* device_block_ = nullptr;
  size_t device_bytes_ = 0;
  char* host_block_ = nullptr;

  GradReadyHook grad_ready_;

  // The AdamW moments of [adam_begin_, adam_end_) (ZeRO-1: this rank's slice), an allocation
  // of their own so that adam_state_shard can size it.
  float *m_ = nullptr, *v_ = nullptr;  // (adam_end_ - adam_begin_) each
  // One moment buffer of n floats, rounded up to 256 bytes (Carver's alignment) so that v_
  // follows m_ aligned.
  static size_t adam_buffer_bytes(int64_t n) {
    return (size_t(std::max<int64_t>(n, 1)) * sizeof(float) + 255) / 256 * 256;
  }
  char* adam_block_ = nullptr;
  int64_t adam_begin_ = 0, adam_end_ = 0;

  // Device memory (one allocation).
  float *params_ = nullptr, *grads_ = nullptr;
  bf16* params_bf16_ = nullptr;
  float* resid_ = nullptr;                 // (2L + 1, N, C) the residual stream, fp32
  bf16* ln1_ = nullptr;                    // (L, N, ln_ld_)
  float* ln1_stats_ = nullptr;             // (L, 2, N) mean, rstd
  bf16* qkv_ = nullptr;                    // (L, N, 3C)
  bf16* atty_ = nullptr;                   // (L, N, C) attention output
  float* lse_ = nullptr;                   // (L, B, NH, T)
  bf16* ln2_ = nullptr;                    // (L, N, ln_ld_)
  float* ln2_stats_ = nullptr;             // (L, 2, N)
  bf16* pre_ = nullptr;                    // (L, N, F) fc pre-activation
  bf16* gelu_ = nullptr;                   // (L, N, F) gelu(pre)
  bf16* lnf_ = nullptr;                    // (N, C)
  float* lnf_stats_ = nullptr;             // (2, N)
  bf16* y_ = nullptr;                      // (N, C) projection output before dropout
  float* dresid_ = nullptr;                // (N, C) gradient of the residual stream
  bf16* dy_ = nullptr;                     // (N, C) gradient of a projection output
  bf16* dpre_ = nullptr;                   // (N, F)
  bf16* dqkv_ = nullptr;                   // (N, 3C)
  bf16* dln_ = nullptr;                    // (N, C) gradient of a LayerNorm output
  bf16* datty_ = nullptr;                  // (N, C)
  bf16* logits_ = nullptr;                 // (chunk_rows, Vp) bf16, or fp32 rows for forward_logits
  bf16* logits_odd_ = nullptr;             // (chunk_rows, Vp): odd chunks' logits when overlapping, else null
  size_t logits_bytes_ = 0;
  float* losses_ = nullptr;                // (N)
  float* ln_partial_ = nullptr;            // LayerNorm backward partial sums
  float* col_partial_ = nullptr;           // column-sum partial sums
  float* dbias_ = nullptr;                 // (L (5C + F)) bias gradients from cuBLASLt's epilogues
  float* dw_ext_ = nullptr;                // (max(3C, F), C + 8) bias_ones_' weight products, else unused
  double* norm_partial_ = nullptr;
  double* d_result_ = nullptr;             // [0] loss sum, [1] sum of squared gradients
  void* attn_ws_ = nullptr;
  int32_t *d_tokens_ = nullptr, *d_targets_ = nullptr;  // (N)
  int32_t *d_unique_ = nullptr, *d_starts_ = nullptr, *d_positions_ = nullptr, *d_unique_count_ = nullptr;

  // Pinned host memory.
  int32_t *h_tokens_ = nullptr, *h_targets_ = nullptr;
  int32_t *h_unique_ = nullptr, *h_starts_ = nullptr, *h_positions_ = nullptr, *h_unique_count_ = nullptr;
  double* h_result_ = nullptr;
  std::vector<int32_t> token_cursor_;  // (V) zero between calls
  int32_t unique_tokens_ = 0;

  // CUDA graphs. While capturing, the dropout sites and the attention read the step's
  // values from d_step_ (seed, step, then L attention DropoutRng), which the forward
  // graph's first node copies from h_step_.
  bool graphs_on_ = false;
  bool capturing_ = false;
  // The kernel choices of env_switch (above).
  model_cuda::ClassifierKernel classifier_kernel_ = model_cuda::ClassifierKernel::two_pass;
  int classifier_grid_blocks_per_sm_ = 1;  // l2_two_pass only
  bool fuse_residual_ln_ = false;
  model_cuda::LayerNormBackwardKernel ln_backward_kernel_ = model_cuda::LayerNormBackwardKernel::shared;
  // fc_proj_b's and attn_proj_b's gradients summed by the LayerNorm backward that writes dy_.
  bool ln_bias_grad_ = false;
  // Bias gradients may come from cuBLASLt's BGRADB epilogue (fast mode); else column_sum.
  bool bgradb_ = true;
  // qkv_b's and fc_b's gradients from the ones column of ln1 / ln2 (kBiasOnesDefault).
  bool bias_ones_ = false;
  int64_t ln_ld_ = 0;
  std::vector<StepGraph> graphs_;
  uint64_t* d_step_ = nullptr;
  uint64_t* h_step_ = nullptr;

  // FLASHGPT_MODEL_PROFILE=1: events between the ops of every call, summed per label and
  // printed when the model is destroyed (the bench's breakdown). Off: mark() does nothing.
  // Calls before the end of the first forward_backward (plans, module loads) are left out;
  // each label's sum is divided by the number of recorded calls of its API call.
  enum ProfileCall { kProfileZero, kProfileForwardBackward, kProfileNorm, kProfileAdamw, kProfileCalls };
  void profile_begin(ProfileCall call);
  void mark(const char* label);
  void profile_end();
  bool profile_ = false;
  std::vector<cudaEvent_t> events_;
  std::vector<const char*> event_labels_;
  size_t events_used_ = 0;
  struct ProfileEntry {
    std::string label;
    ProfileCall call;
    double ms;  // total
  };
  std::vector<ProfileEntry> profile_ms_;  // in first-seen order
  ProfileCall profile_call_ = kProfileZero;
  int64_t profile_calls_[kProfileCalls] = {};  // recorded calls of each
  bool profile_recording_ = false;            // after the first forward_backward
};

void GptCuda::carve_device(Carver& c, size_t col_partial) {
  const int64_t P = P_, L = L_, N = n_max_, C = C_, F = F_, NH = NH_;
  c.take(params_, P);
  c.take(grads_, P);
  c.take(params_bf16_, P);
  c.take(resid_, size_t(2 * L + 1) * N * C);
  c.take(ln1_, size_t(L) * N * ln_ld_);
  c.take(ln1_stats_, size_t(L) * 2 * N);
  c.take(qkv_, size_t(L) * N * 3 * C);
  c.take(atty_, size_t(L) * N * C);
  c.take(lse_, size_t(L) * N * NH);
  c.take(ln2_, size_t(L) * N * ln_ld_);
  c.take(ln2_stats_, size_t(L) * 2 * N);
  c.take(pre_, size_t(L) * N * F);
  c.take(gelu_, size_t(L) * N * F);
  c.take(lnf_, size_t(N) * C);
  c.take(lnf_stats_, size_t(2) * N);
  c.take(y_, size_t(N) * C);
  c.take(dresid_, size_t(N) * C);
  c.take(dy_, size_t(N) * C);
  c.take(dpre_, size_t(N) * F);
  c.take(dqkv_, size_t(N) * 3 * C);
  c.take(dln_, size_t(N) * C);
  c.take(datty_, size_t(N) * C);
  char* logits = nullptr;
  c.take(logits, logits_bytes_);
  logits_ = reinterpret_cast<bf16*>(logits);
  if (overlap_ >= 1 && chunk_rows_ < n_max_) {
    c.take(logits, logits_bytes_);
    logits_odd_ = reinterpret_cast<bf16*>(logits);
  }
  c.take(losses_, N);
  c.take(ln_partial_, ln_partial_floats_);
  c.take(col_partial_, col_partial);
  c.take(dbias_, size_t(L) * (5 * C + F));
  c.take(dw_ext_, bias_ones_ ? size_t(std::max(3 * C, F)) * ln_ld_ : 0);
  c.take(norm_partial_, model_cuda::sum_squares_partial_doubles());
  c.take(d_result_, 4);
  char* ws = nullptr;
  c.take(ws, attn_ws_bytes_);
  attn_ws_ = ws;
  c.take(d_tokens_, N);
  c.take(d_targets_, N);
  c.take(d_unique_, N);
  c.take(d_starts_, N + 1);
  c.take(d_positions_, N);
  c.take(d_unique_count_, 1);
  c.take(d_step_, size_t(2 + 2 * L));
}

void GptCuda::carve_host(Carver& c) {
  const int64_t N = n_max_;
  c.take(h_tokens_, N);
  c.take(h_targets_, N);
  c.take(h_unique_, N);
  c.take(h_starts_, N + 1);
  c.take(h_positions_, N);
  c.take(h_unique_count_, 1);
  c.take(h_result_, 4);
  c.take(h_step_, size_t(2 + 2 * L_));
}

GptCuda::GptCuda(const ModelConfig& config, const ModelOptions& options) : config_(config), options_(options) {
  model_config_validate(config_);
  int devices = 0;
  const cudaError_t count_status = cudaGetDeviceCount(&devices);
  FLASHGPT_CHECK(count_status == cudaSuccess && devices > 0,
                 "gpt_create_cuda: no CUDA device is available ({})",
                 count_status == cudaSuccess ? "none found" : cudaGetErrorString(count_status));
  C_ = config_.d_model;
  F_ = config_.d_ff;
  L_ = config_.n_layer;
  NH_ = config_.n_head;
  HD_ = config_.head_dim();
  V_ = config_.vocab_size;
  Vp_ = config_.padded_vocab_size;
  FLASHGPT_CHECK(C_ % 8 == 0 && F_ % 8 == 0,
                 "gpt_create_cuda: d_model ({}) and d_ff ({}) must be multiples of 8 (16-byte rows for the bf16 "
                 "kernels and cuBLASLt's GELU epilogue)",
                 C_, F_);
  FLASHGPT_CHECK(attention_cuda_head_dim_compiled(static_cast<int>(HD_)),
                 "gpt_create_cuda: head dim {} (d_model {} / n_head {}) has no CUDA attention kernel in this build "
                 "(FLASHGPT_ATTENTION_HEAD_DIMS)",
                 HD_, C_, NH_);
  b_max_ = options_.max_batch;
  t_max_ = options_.max_context == 0 ? config_.context : options_.max_context;
  FLASHGPT_CHECK(b_max_ > 0, "gpt_create_cuda: max_batch must be positive, got {}", b_max_);
  FLASHGPT_CHECK(t_max_ > 0 && t_max_ <= config_.context,
                 "gpt_create_cuda: max_context {} must be in [1, context {}]", t_max_, config_.context);
  n_max_ = b_max_ * t_max_;
  FLASHGPT_CHECK(n_max_ < (int64_t{1} << 31), "gpt_create_cuda: max_batch x max_context = {} tokens is too many",
                 n_max_);

  specs_ = model_param_specs(config_);
  FLASHGPT_CHECK(static_cast<int>(specs_.size()) == kParamKinds, "gpt_create_cuda: expected {} parameter tensors",
                 kParamKinds);
  for (const ParamSpec& s : specs_) {
    const int k = static_cast<int>(s.kind);
    offsets_[k] = s.offset;
    const bool stacked = s.shape.size() >= 2 && s.kind != ParamKind::wte && s.kind != ParamKind::wpe;
    layer_numel_[k] = stacked ? s.numel / L_ : 0;
    FLASHGPT_CHECK(s.offset % 8 == 0, "gpt_create_cuda: parameter {} starts at float {}, not a multiple of 8 (its "
                                      "bf16 copy must be 16-byte aligned)", s.name, s.offset);
  }
  P_ = model_param_count(config_);
  segments_.count = kParamKinds;
  for (int i = 0; i < kParamKinds; ++i) {
    segments_.end[i] = specs_[i].offset + specs_[i].numel;
    segments_.decay[i] = specs_[i].weight_decay;
  }
  FLASHGPT_CHECK(segments_.end[kParamKinds - 1] == P_, "gpt_create_cuda: parameter specs do not cover {} floats", P_);

  // Profiling records events between the ops of one stream, so it runs without overlap.
  const char* profile = std::getenv("FLASHGPT_MODEL_PROFILE");
  profile_ = profile != nullptr && std::strcmp(profile, "1") == 0;
  overlap_ = profile_ ? 0 : env_overlap();
  overlap_softmax_sms_ = env_overlap_softmax_sms();
  const int overlap_gemm_sms = overlap_ >= 1 ? env_overlap_gemm_sms() : 0;

  bias_ones_ = env_switch("FLASHGPT_BIAS_ONES", kBiasOnesDefault) && !options_.deterministic;
  ln_ld_ = bias_ones_ ? C_ + 8 : C_;

  // Sizes of the workspaces.
  const int64_t rows_total = n_max_;
  const int64_t row_bytes = Vp_ * 2;
  const int64_t chunk_bytes = static_cast<int64_t>(logits_chunk_bytes());
  const int64_t chunks = std::max<int64_t>(1, (rows_total * row_bytes + chunk_bytes - 1) / chunk_bytes);
  chunk_rows_ = std::min<int64_t>(rows_total, ((rows_total + chunks - 1) / chunks + 63) / 64 * 64);
  logits_bytes_ = std::max<size_t>(size_t(chunk_rows_) * Vp_ * 2, size_t(Vp_) * 4);
  ln_partial_floats_ = model_cuda::layernorm_backward_partial_floats(n_max_, static_cast<int>(C_));
  const size_t col_partial = model_cuda::column_sum_partial_floats(static_cast<int>(std::max(3 * C_, F_)));
  {
    AttentionParams p = attention_params(0, b_max_, t_max_, true, StepRng{});
    attn_ws_bytes_ = attention_backward_workspace_bytes(p);
  }

  Carver measure(nullptr);
  carve_device(measure, col_partial);
  device_bytes_ = measure.bytes();
  size_t free_bytes = 0, total_bytes = 0;
  FLASHGPT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  adam_begin_ = options_.adam_begin;
  adam_end_ = options_.adam_end == 0 ? P_ : options_.adam_end;
  FLASHGPT_CHECK(0 <= adam_begin_ && adam_begin_ <= adam_end_ && adam_end_ <= P_,
                 "gpt_create_cuda: the AdamW moment range [{}, {}) is not a range of the {} parameters", adam_begin_,
                 adam_end_, P_);
  const size_t needed = device_bytes_ + size_t(2 * (adam_end_ - adam_begin_)) * sizeof(float) +
                        (1 + (overlap_ >= 1) + (overlap_gemm_sms > 0)) * kCublasWorkspaceBytes;  // Matmul instances
  FLASHGPT_CHECK(needed + (size_t{256} << 20) <= free_bytes,
                 "gpt_create_cuda: batch {} x context {} of this model needs {:.2f} GiB of GPU memory, but only {:.2f} "
                 "GiB of {:.2f} GiB are free; lower the batch size",
                 b_max_, t_max_, needed / 1073741824.0, free_bytes / 1073741824.0, total_bytes / 1073741824.0);
  FLASHGPT_CUDA_CHECK(cudaMalloc(&device_block_, device_bytes_));
  Carver device(device_block_);
  carve_device(device, col_partial);
  Carver host_measure(nullptr);
  carve_host(host_measure);
  FLASHGPT_CUDA_CHECK(cudaMallocHost(&host_block_, host_measure.bytes()));
  Carver host(host_block_);
  carve_host(host);
  token_cursor_.assign(size_t(V_), 0);

  if (overlap_ == 0) {
    FLASHGPT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  } else {
    // Priorities (a lower number runs first): the softmax's stream the highest, so that its
    // few blocks take their multiprocessors as the products' blocks retire rather than queue
    // behind all of them; stream_ one below; the backward's second stream the lowest (or,
    // FLASHGPT_OVERLAP_BWD_PRIORITY=high, the highest).
    int least = 0, greatest = 0;
    FLASHGPT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    const int main_priority = std::max(greatest, least - 1);
    const bool bwd_high = env_overlap_bwd_high();
    FLASHGPT_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, main_priority));
    FLASHGPT_CUDA_CHECK(cudaStreamCreateWithPriority(&side_, cudaStreamNonBlocking, greatest));
    FLASHGPT_CUDA_CHECK(cudaStreamCreateWithPriority(&bwd_side_, cudaStreamNonBlocking, bwd_high ? greatest : least));
    side_matmul_ = std::make_unique<model_cuda::Matmul>(kCublasWorkspaceBytes, options_.deterministic);
    if (overlap_gemm_sms > 0) {
      classifier_matmul_ = std::make_unique<model_cuda::Matmul>(kCublasWorkspaceBytes, options_.deterministic);
      classifier_matmul_->set_sm_count_target(overlap_gemm_sms);
    }
    for (auto& e : overlap_events_) FLASHGPT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  matmul_ = std::make_unique<model_cuda::Matmul>(kCublasWorkspaceBytes, options_.deterministic);
  FLASHGPT_CUDA_CHECK(cudaMemsetAsync(device_block_, 0, device_bytes_, stream_));
  if (bias_ones_) {  // every row of every layer, once: nothing else writes those columns
    model_cuda::write_ones_column(ln1_, L_ * n_max_, static_cast<int>(C_), ln_ld_, stream_);
    model_cuda::write_ones_column(ln2_, L_ * n_max_, static_cast<int>(C_), ln_ld_, stream_);
  }
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  adam_state_shard(adam_begin_, adam_end_);  // allocates the moments (none yet)
  if (profile_) {
    events_.resize(size_t(64 + 64 * L_));
    event_labels_.resize(events_.size());
    for (auto& e : events_) FLASHGPT_CUDA_CHECK(cudaEventCreate(&e));
  }
  const bool cluster = env_switch("FLASHGPT_CLASSIFIER_CLUSTER", kClassifierClusterDefault);
  classifier_kernel_ = cluster ? model_cuda::ClassifierKernel::cluster : model_cuda::ClassifierKernel::two_pass;
  const char* grid_env = std::getenv("FLASHGPT_CLASSIFIER_GRID");
  const bool grid_set = grid_env != nullptr && *grid_env != '\0';
  if (const int grid = env_classifier_grid(); grid > 0 && (grid_set || !cluster)) {
    FLASHGPT_CHECK(classifier_kernel_ == model_cuda::ClassifierKernel::two_pass,
                   "FLASHGPT_CLASSIFIER_GRID and FLASHGPT_CLASSIFIER_CLUSTER=1 pick different classifier kernels; "
                   "set one");
    classifier_kernel_ = model_cuda::ClassifierKernel::l2_two_pass;
    classifier_grid_blocks_per_sm_ = grid;
  }
  fuse_residual_ln_ = env_switch("FLASHGPT_FUSED_RESIDUAL_LN", kFusedResidualLnDefault);
  ln_backward_kernel_ = env_switch("FLASHGPT_LN_BACKWARD_REGISTERS", kLnBackwardRegistersDefault)
                            ? model_cuda::LayerNormBackwardKernel::registers
                            : model_cuda::LayerNormBackwardKernel::shared;
  ln_bias_grad_ = env_switch("FLASHGPT_LN_BIAS_GRAD", kLnBiasGradDefault);
  bgradb_ = env_switch("FLASHGPT_BGRADB", kBgradbDefault);
  // Profiling records events between the ops, so it runs eagerly.
  const char* graph_env = std::getenv("FLASHGPT_CUDA_GRAPH");
  graphs_on_ = options_.cuda_graph && !profile_ && !(graph_env != nullptr && std::strcmp(graph_env, "0") == 0);
}

void GptCuda::profile_begin(ProfileCall call) {
  if (!profile_) return;
  events_used_ = 0;
  profile_call_ = call;
  mark("start");
}

void GptCuda::mark(const char* label) {
  if (!profile_ || events_used_ >= events_.size()) return;
  FLASHGPT_CUDA_CHECK(cudaEventRecord(events_[events_used_], stream_));
  event_labels_[events_used_++] = label;
}

void GptCuda::profile_end() {
  if (!profile_) return;
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (!profile_recording_) {  // the first step pays for plans and module loads
    profile_recording_ = profile_call_ == kProfileForwardBackward;
    return;
  }
  ++profile_calls_[profile_call_];
  for (size_t i = 1; i < events_used_; ++i) {
    float ms = 0;
    FLASHGPT_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i - 1], events_[i]));
    auto it = std::find_if(profile_ms_.begin(), profile_ms_.end(), [&](const ProfileEntry& entry) {
      return entry.call == profile_call_ && entry.label == event_labels_[i];
    });
    if (it == profile_ms_.end()) {
      profile_ms_.push_back({event_labels_[i], profile_call_, ms});
    } else {
      it->ms += ms;
    }
  }
}

GptCuda::~GptCuda() {
  if (profile_ && profile_calls_[kProfileForwardBackward] > 0) {
    // Per call of the API call each op belongs to (one step = one call of each).
    auto per_call = [&](const ProfileEntry& e) { return e.ms / double(std::max<int64_t>(profile_calls_[e.call], 1)); };
    double total = 0;
    for (const ProfileEntry& e : profile_ms_) total += per_call(e);
    std::fprintf(stderr, "profile: GPU time per step by op (%lld forward_backward calls after the first)\n",
                 static_cast<long long>(profile_calls_[kProfileForwardBackward]));
    for (const ProfileEntry& e : profile_ms_) {
      std::fprintf(stderr, "profile: %-24s %8.3f ms  %5.1f%%\n", e.label.c_str(), per_call(e),
                   100 * per_call(e) / total);
    }
    std::fprintf(stderr, "profile: %-24s %8.3f ms\n", "total", total);
  }
  for (auto& e : events_) cudaEventDestroy(e);
  for (auto& g : graphs_) {
    if (g.forward) cudaGraphExecDestroy(g.forward);
    if (g.backward) cudaGraphExecDestroy(g.backward);
  }
  matmul_.reset();
  side_matmul_.reset();
  classifier_matmul_.reset();
  for (auto& e : overlap_events_) {
    if (e) cudaEventDestroy(e);
  }
  if (side_) cudaStreamDestroy(side_);
  if (bwd_side_) cudaStreamDestroy(bwd_side_);
  if (stream_) cudaStreamDestroy(stream_);
  if (device_block_) cudaFree(device_block_);
  if (adam_block_) cudaFree(adam_block_);
  if (host_block_) cudaFreeHost(host_block_);
}

void GptCuda::download(std::span<float> out, const float* src, const char* what) const {
  FLASHGPT_CHECK(static_cast<int64_t>(out.size()) == P_, "{}: the buffer has {} floats, the model has {} parameters",
                 what, out.size(), P_);
  // On our stream (non-blocking: a plain cudaMemcpy would not wait for it).
  FLASHGPT_CUDA_CHECK(
      cudaMemcpyAsync(out.data(), src, size_t(P_) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GptCuda::upload(std::span<const float> in, float* dst, const char* what) {
  FLASHGPT_CHECK(static_cast<int64_t>(in.size()) == P_, "{}: the buffer has {} floats, the model has {} parameters",
                 what, in.size(), P_);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(dst, in.data(), size_t(P_) * sizeof(float), cudaMemcpyHostToDevice, stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GptCuda::adam_state_shard(int64_t begin, int64_t end) {
  FLASHGPT_CHECK(0 <= begin && begin <= end && end <= P_, "adam_state_shard: [{}, {}) is not a range of the {} parameters",
                 begin, end, P_);
  const size_t half = adam_buffer_bytes(end - begin);
  if (adam_block_ != nullptr && begin == adam_begin_ && end == adam_end_) {
    FLASHGPT_CUDA_CHECK(cudaMemsetAsync(adam_block_, 0, 2 * half, stream_));
    FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return;
  }
  // Freed before the new one is allocated: the peak is the larger of the two.
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (adam_block_) FLASHGPT_CUDA_CHECK(cudaFree(adam_block_));
  adam_block_ = nullptr;
  m_ = v_ = nullptr;
  FLASHGPT_CUDA_CHECK(cudaMalloc(&adam_block_, 2 * half));
  FLASHGPT_CUDA_CHECK(cudaMemsetAsync(adam_block_, 0, 2 * half, stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  m_ = reinterpret_cast<float*>(adam_block_);
  v_ = reinterpret_cast<float*>(adam_block_ + half);
  adam_begin_ = begin;
  adam_end_ = end;
}

GptModel::MemoryReport GptCuda::memory_report() const {
  MemoryReport r;
  r.adam_begin = adam_begin_;
  r.adam_end = adam_end_;
  r.adam_bytes = 2 * adam_buffer_bytes(adam_end_ - adam_begin_);
  r.total_bytes = device_bytes_ + r.adam_bytes;
  return r;
}

void GptCuda::adam_state_get(std::span<float> m, std::span<float> v) const {
  const int64_t n = adam_end_ - adam_begin_;
  for (auto [out, src, what] : {std::tuple{m, m_, "adam_state_get (m)"}, std::tuple{v, v_, "adam_state_get (v)"}}) {
    FLASHGPT_CHECK(static_cast<int64_t>(out.size()) == P_, "{}: the buffer has {} floats, the model has {} parameters",
                   what, out.size(), P_);
    FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(out.data() + adam_begin_, src, size_t(n) * sizeof(float),
                                        cudaMemcpyDeviceToHost, stream_));
  }
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GptCuda::adam_state_set(std::span<const float> m, std::span<const float> v) {
  const int64_t n = adam_end_ - adam_begin_;
  for (auto [in, dst, what] : {std::tuple{m, m_, "adam_state_set (m)"}, std::tuple{v, v_, "adam_state_set (v)"}}) {
    FLASHGPT_CHECK(static_cast<int64_t>(in.size()) == P_, "{}: the buffer has {} floats, the model has {} parameters",
                   what, in.size(), P_);
    FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(dst, in.data() + adam_begin_, size_t(n) * sizeof(float),
                                        cudaMemcpyHostToDevice, stream_));
  }
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GptCuda::params_set(std::span<const float> in) {
  upload(in, params_, "params_set");
  model_cuda::float_to_bf16(params_bf16_, params_, P_, stream_);
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GptCuda::check_shape(int64_t B, int64_t T, const char* what) const {
  FLASHGPT_CHECK(B >= 1 && B <= b_max_, "{}: batch {} is outside [1, {}] (ModelOptions::max_batch)", what, B, b_max_);
  FLASHGPT_CHECK(T >= 1 && T <= t_max_, "{}: T {} is outside [1, {}] (the context the model was sized for)", what, T,
                 t_max_);
}

void GptCuda::upload_tokens(std::span<const TokenId> tokens, int64_t B, int64_t T, bool windows) {
  stage_tokens(tokens, B, T, windows);
  const size_t bytes = size_t(B * T) * sizeof(int32_t);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_tokens_, h_tokens_, bytes, cudaMemcpyHostToDevice, stream_));
  if (windows) FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_targets_, h_targets_, bytes, cudaMemcpyHostToDevice, stream_));
}

void GptCuda::stage_tokens(std::span<const TokenId> tokens, int64_t B, int64_t T, bool windows) {
  const int64_t width = windows ? T + 1 : T;
  FLASHGPT_CHECK(static_cast<int64_t>(tokens.size()) == B * width,
                 "model: expected {} token ids ({} rows of {}), got {}", B * width, B, width, tokens.size());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < width; ++t) {
      const TokenId id = tokens[size_t(b * width + t)];
      FLASHGPT_CHECK(id < static_cast<uint64_t>(V_), "model: token id {} at row {} column {} is outside the vocabulary "
                                                     "of {}", id, b, t, V_);
      if (t < T) h_tokens_[b * T + t] = static_cast<int32_t>(id);
      if (windows && t >= 1) h_targets_[b * T + t - 1] = static_cast<int32_t>(id);
    }
  }
}

AttentionParams GptCuda::attention_params(int64_t l, int64_t B, int64_t T, bool train, StepRng rng) const {
  AttentionParams p;
  const bf16* q = qkv(l);
  p.q = q;
  p.k = q + C_;
  p.v = q + 2 * C_;
  p.o = atty(l);
  p.lse = lse(l);
  p.dtype = DType::bf16;
  p.batch = static_cast<int>(B);
  p.seqlen_q = p.seqlen_k = static_cast<int>(T);
  p.heads_q = p.heads_kv = static_cast<int>(NH_);
  p.head_dim = static_cast<int>(HD_);
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = T * 3 * C_;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = 3 * C_;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = HD_;
  p.o_batch_stride = T * C_;
  p.o_row_stride = C_;
  p.o_head_stride = HD_;
  p.lse_batch_stride = NH_ * T;
  p.lse_head_stride = T;
  // Backward: dO is datty (like o), dQ/dK/dV go into dqkv (like q/k/v).
  p.d_o = datty_;
  p.do_batch_stride = p.o_batch_stride;
  p.do_row_stride = p.o_row_stride;
  p.do_head_stride = p.o_head_stride;
  p.dq = dqkv_;
  p.dk = dqkv_ + C_;
  p.dv = dqkv_ + 2 * C_;
  p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = T * 3 * C_;
  p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = 3 * C_;
  p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = HD_;
  p.mask = Mask::causal;
  p.dropout_p = train ? config_.dropout : 0.0f;
  p.rng = DropoutRng{rng.seed ^ kAttentionSeedXor, rng.step * uint64_t(L_) + uint64_t(l)};
  if (capturing_) p.rng_device = reinterpret_cast<const DropoutRng*>(d_step_ + 2 + 2 * l);
  return p;
}

void GptCuda::forward(int64_t B, int64_t T, bool train, StepRng rng) {
  const int64_t N = B * T;
  const int C = static_cast<int>(C_);
  model_cuda::encoder_forward(resid(0), d_tokens_, param(ParamKind::wte), param(ParamKind::wpe), N,
                              static_cast<int>(T), C, site(rng, 0, train), stream_);
  mark("encoder fwd");
  model_cuda::layernorm_forward(ln1(0), ln1_mean(0), ln1_rstd(0), resid(0), param(ParamKind::ln1_w, 0),
                                param(ParamKind::ln1_b, 0), N, C, stream_, ln_ld_);
  mark("layernorm fwd");
  // out = in + dropout(y_) at residual site `s`, then the LayerNorm that reads it, its rows
  // ld apart: fused, or the two ops in turn (fuse_residual_ln_).
  const auto residual_then_norm = [&](float* out, const float* in, int64_t s, bf16* ln, int64_t ld, float* mean,
                                      float* rstd, const float* w, const float* b) {
    if (fuse_residual_ln_) {
      model_cuda::residual_layernorm_forward(out, ln, mean, rstd, in, y_, w, b, N, C, site(rng, s, train), stream_,
                                             ld);
      mark("residual+layernorm fwd");
      return;
    }
    model_cuda::residual_forward(out, in, y_, N, C, site(rng, s, train), stream_);
    mark("residual fwd");
    model_cuda::layernorm_forward(ln, mean, rstd, out, w, b, N, C, stream_, ld);
    mark("layernorm fwd");
  };
  for (int64_t l = 0; l < L_; ++l) {
    const float* x_in = resid(2 * l);
    float* x_mid = resid(2 * l + 1);
    float* x_out = resid(2 * l + 2);
    matmul_->forward(qkv(l), ln1(l), weight(ParamKind::qkv_w, l), N, C_, 3 * C_, Epilogue::bias,
                     weight(ParamKind::qkv_b, l), nullptr, stream_, ln_ld_);
    mark("mm qkv");
    attention_forward_cuda(attention_params(l, B, T, train, rng), stream_);
    mark("attention fwd");
    matmul_->forward(y_, atty(l), weight(ParamKind::attn_proj_w, l), N, C_, C_, Epilogue::bias,
                     weight(ParamKind::attn_proj_b, l), nullptr, stream_);
    mark("mm attn proj");
    residual_then_norm(x_mid, x_in, 1 + 2 * l, ln2(l), ln_ld_, ln2_mean(l), ln2_rstd(l),
                       param(ParamKind::ln2_w, l), param(ParamKind::ln2_b, l));
    matmul_->forward(gelu(l), ln2(l), weight(ParamKind::fc_w, l), N, C_, F_, Epilogue::gelu_aux_bias,
                     weight(ParamKind::fc_b, l), pre(l), stream_, ln_ld_);
    mark("mm fc+gelu");
    matmul_->forward(y_, gelu(l), weight(ParamKind::fc_proj_w, l), N, F_, C_, Epilogue::bias,
                     weight(ParamKind::fc_proj_b, l), nullptr, stream_);
    mark("mm fc proj");
    // The next LayerNorm: the next layer's first, or the final one.
    if (l + 1 < L_) {
      residual_then_norm(x_out, x_mid, 2 + 2 * l, ln1(l + 1), ln_ld_, ln1_mean(l + 1), ln1_rstd(l + 1),
                         param(ParamKind::ln1_w, l + 1), param(ParamKind::ln1_b, l + 1));
    } else {
      residual_then_norm(x_out, x_mid, 2 + 2 * l, lnf_, C_, lnf_stats_, lnf_stats_ + n_max_,
                         param(ParamKind::lnf_w), param(ParamKind::lnf_b));
    }
  }
}

void GptCuda::classifier(int64_t N, bool with_grad, float loss_scale) {
  const float dloss = loss_scale / static_cast<float>(N);
  const int64_t chunks = (N + chunk_rows_ - 1) / chunk_rows_;
  const bool overlap = overlap_ >= 1 && chunks > 1;
  // Chunk c: rows [c chunk_rows, ...), its logits in logits_ or (overlapping, odd c) logits_odd_.
  const auto first_row = [&](int64_t c) { return c * chunk_rows_; };
  const auto rows_of = [&](int64_t c) { return std::min(chunk_rows_, N - first_row(c)); };
  const auto logits_of = [&](int64_t c) { return overlap && c % 2 == 1 ? logits_odd_ : logits_; };
  model_cuda::Matmul& products = overlap && classifier_matmul_ ? *classifier_matmul_ : *matmul_;
  const auto logits = [&](int64_t c) {
    products.forward(logits_of(c), lnf_ + first_row(c) * C_, weight(ParamKind::wte), rows_of(c), C_, Vp_,
                     Epilogue::none, nullptr, nullptr, stream_);
    mark("mm logits");
  };
  const auto softmax = [&](int64_t c, cudaStream_t s, int grid_sms) {
    model_cuda::classifier_softmax_xent(logits_of(c), losses_ + first_row(c), d_targets_ + first_row(c), rows_of(c),
                                        V_, Vp_, dloss, with_grad, s, classifier_kernel_,
                                        classifier_grid_blocks_per_sm_, grid_sms);
    mark("classifier softmax");
  };
  // dlnf (rows, C) = dlogits (rows, Vp) wte (Vp, C); dwte += dlogits^T lnf.
  const auto grads = [&](int64_t c) {
    products.backward_input(dln_ + first_row(c) * C_, logits_of(c), weight(ParamKind::wte), rows_of(c), C_, Vp_,
                            Epilogue::none, nullptr, stream_);
    mark("mm dlnf");
    products.backward_weight(grad(ParamKind::wte), logits_of(c), lnf_ + first_row(c) * C_, rows_of(c), C_, Vp_,
                             stream_);
    mark("mm dwte");
  };
  if (!overlap) {
    for (int64_t c = 0; c < chunks; ++c) {
      logits(c);
      softmax(c, stream_, 0);
      if (with_grad) grads(c);
    }
  } else {
    // stream_: logits 0, logits 1, grads 0, logits 2, grads 1, ...; side_: softmax 0, 1, ...,
    // each after its logits. Softmax c runs beside logits c + 1 and grads c - 1, and chunk c's
    // buffer is written again (logits c + 2) only after its softmax and grads.
    const OverlapEvent done[2] = {kSoftmaxDone0, kSoftmaxDone1};
    hand_over(stream_, side_);
    for (int64_t c = 0; c < chunks; ++c) {
      if (c >= 2) wait(stream_, done[c % 2]);  // softmax c - 2 (grads c - 2, ordered on stream_, waited too)
      logits(c);
      hand_over(stream_, side_);
      softmax(c, side_, overlap_softmax_sms_);
      record(side_, done[c % 2]);
      if (with_grad && c >= 1) {
        wait(stream_, done[(c - 1) % 2]);
        grads(c - 1);
      }
    }
    if (with_grad) {
      wait(stream_, done[(chunks - 1) % 2]);
      grads(chunks - 1);
    }
    hand_over(side_, stream_);  // the losses of every chunk
  }
  model_cuda::loss_sum(d_result_, losses_, N, stream_);
  mark("loss sum");
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(h_result_, d_result_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
}

void GptCuda::backward(int64_t B, int64_t T, StepRng rng) {
  const int64_t N = B * T;
  const int C = static_cast<int>(C_);
  const Determinism determinism = options_.deterministic ? Determinism::deterministic : Determinism::fast;
  std::fill(std::begin(fused_bias_), std::end(fused_bias_), model_cuda::Matmul::BiasGrad::none);
  // Each LayerNorm backward also applies the dropout backward of the residual site the
  // backward meets next (fused where C % 128 == 0), leaving its gradient in dy_; with
  // ln_bias_grad_ it adds dy_'s column sums to the bias gradient of the projection that feeds
  // the site (layer 0's ln1 feeds the embedding's dropout: no bias there).
  model_cuda::layernorm_backward_dropout(dresid_, /*accumulate=*/false, grad(ParamKind::lnf_w),
                                         grad(ParamKind::lnf_b), ln_partial_, dln_, resid(2 * L_), lnf_stats_,
                                         lnf_stats_ + n_max_, param(ParamKind::lnf_w), N, C, dy_,
                                         site(rng, 2 * L_, true), stream_, ln_backward_kernel_, next_bias_grad(2 * L_));
  mark("layernorm+dropout bwd");
  grad_ready(ParamKind::lnf_w);
  grad_ready(ParamKind::lnf_b);
  // Reporting (data parallel, eager): a layer's epilogue bias gradients are added as the
  // layer ends rather than all after the loop, so that its ranges are final there; the add is
  // elementwise, so the bits are the same.
  const bool report = static_cast<bool>(grad_ready_);
  const ParamKind bias_kinds[4] = {ParamKind::qkv_b, ParamKind::attn_proj_b, ParamKind::fc_b, ParamKind::fc_proj_b};
  const auto add_bias_grads = [&](int64_t first, int64_t rows) {
    for (int i = 0; i < 4; ++i) {
      const int64_t width = layer_numel_[static_cast<int>(bias_kinds[i])];
      if (fused_bias_[i] == model_cuda::Matmul::BiasGrad::f32) {
        model_cuda::add_rows(grad(bias_kinds[i], first), static_cast<const float*>(dbias_slot(bias_kinds[i], first)),
                             rows, width, width, stream_);
      } else if (fused_bias_[i] == model_cuda::Matmul::BiasGrad::bf16) {  // rows of 2 width bf16, the first width used
        model_cuda::add_rows(grad(bias_kinds[i], first), static_cast<const bf16*>(dbias_slot(bias_kinds[i], first)),
                             rows, width, 2 * width, stream_);
      }
      if (fused_bias_[i] != model_cuda::Matmul::BiasGrad::none) mark("bias grad add");
    }
  };
  // FLASHGPT_OVERLAP=2: the weight products and column sums (lane `off`) on bwd_side_, each after
  // a hand-over of its inputs; stream_ waits before it overwrites what they read: dy_ (kDyRead),
  // dpre_ (kDpreFree, a layer later) and dqkv_ (kDqkvFree, a layer later).
  const bool overlap = overlap_ >= 2 && !report;
  const Lane on{stream_, matmul_.get()};
  const Lane off = overlap ? Lane{bwd_side_, side_matmul_.get()} : on;
  const auto to_off = [&] {
    if (overlap) hand_over(stream_, bwd_side_);
  };
  const auto off_done = [&](OverlapEvent e) {
    if (overlap) record(bwd_side_, e);
  };
  const auto before_writing = [&](OverlapEvent e, bool recorded) {
    if (overlap && recorded) wait(stream_, e);
  };
  for (int64_t l = L_ - 1; l >= 0; --l) {
    const float* x_in = resid(2 * l);
    const float* x_mid = resid(2 * l + 1);
    const bool later_layer_done = l + 1 < L_;  // kDpreFree and kDqkvFree recorded by layer l + 1
    // MLP: x_out = x_mid + drop(gelu(ln2(x_mid) Wfc^T + bfc) Wfcproj^T + bfcproj); dy_ holds
    // drop'(dresid) of site 2 + 2 l.
    to_off();
    projection_grad(ParamKind::fc_proj_w, ParamKind::fc_proj_b, l, dy_, gelu(l), N, F_, C_, off);
    off_done(kDyRead);
    // fc_b's gradient by column sums: cuBLASLt's DGELU_BGRAD epilogue (matmul_cublaslt.h)
    // took 11.2 ms per step at the seed size on an H100 against 4.2 + 1.3 for DGELU and the
    // column sums (docs/model_gpu.md), so the model does not use it.
    before_writing(kDpreFree, later_layer_done);
    matmul_->backward_input(dpre_, dy_, weight(ParamKind::fc_proj_w, l), N, F_, C_, Epilogue::dgelu, pre(l), stream_);
    mark("mm dX fc proj+dgelu");
    to_off();
    if (bias_ones_) {
      weight_and_bias_grad_ones(ParamKind::fc_w, ParamKind::fc_b, l, dpre_, ln2(l), N, F_, off);
    } else {
      off.matmul->backward_weight(grad(ParamKind::fc_w, l), dpre_, ln2(l), N, C_, F_, off.stream);
      mark("mm dW fc");
      model_cuda::column_sum(grad(ParamKind::fc_b, l), col_partial_, dpre_, N, static_cast<int>(F_), off.stream);
      mark("bias grad");
    }
    off_done(kDpreFree);
    matmul_->backward_input(dln_, dpre_, weight(ParamKind::fc_w, l), N, C_, F_, Epilogue::none, nullptr, stream_);
    mark("mm dX fc");
    before_writing(kDyRead, true);
    model_cuda::layernorm_backward_dropout(dresid_, /*accumulate=*/true, grad(ParamKind::ln2_w, l),
                                           grad(ParamKind::ln2_b, l), ln_partial_, dln_, x_mid, ln2_mean(l),
                                           ln2_rstd(l), param(ParamKind::ln2_w, l), N, C, dy_,
                                           site(rng, 1 + 2 * l, true), stream_, ln_backward_kernel_,
                                           next_bias_grad(1 + 2 * l));
    mark("layernorm+dropout bwd");
    // Attention: x_mid = x_in + drop(attn(ln1(x_in) Wqkv^T + bqkv) Wproj^T + bproj); dy_ holds
    // drop'(dresid) of site 1 + 2 l.
    to_off();
    projection_grad(ParamKind::attn_proj_w, ParamKind::attn_proj_b, l, dy_, atty(l), N, C_, C_, off);
    off_done(kDyRead);
    matmul_->backward_input(datty_, dy_, weight(ParamKind::attn_proj_w, l), N, C_, C_, Epilogue::none, nullptr,
                            stream_);
    mark("mm dX attn proj");
    before_writing(kDqkvFree, later_layer_done);
    attention_backward_cuda(attention_params(l, B, T, /*train=*/true, rng), attn_ws_, attn_ws_bytes_, determinism,
                            stream_);
    mark("attention bwd");
    to_off();
    if (bias_ones_) {
      weight_and_bias_grad_ones(ParamKind::qkv_w, ParamKind::qkv_b, l, dqkv_, ln1(l), N, 3 * C_, off);
    } else {
      weight_and_bias_grad(ParamKind::qkv_w, ParamKind::qkv_b, l, dqkv_, ln1(l), N, C_, 3 * C_, off);
    }
    off_done(kDqkvFree);
    matmul_->backward_input(dln_, dqkv_, weight(ParamKind::qkv_w, l), N, C_, 3 * C_, Epilogue::none, nullptr, stream_);
    mark("mm dX qkv");
    before_writing(kDyRead, true);
    if (l > 0) {  // the next site is layer l - 1's MLP residual, 2 + 2 (l - 1)
      model_cuda::layernorm_backward_dropout(dresid_, /*accumulate=*/true, grad(ParamKind::ln1_w, l),
                                             grad(ParamKind::ln1_b, l), ln_partial_, dln_, x_in, ln1_mean(l),
                                             ln1_rstd(l), param(ParamKind::ln1_w, l), N, C, dy_,
                                             site(rng, 2 * l, true), stream_, ln_backward_kernel_,
                                             next_bias_grad(2 * l));
      mark("layernorm+dropout bwd");
    } else {  // the embedding's dropout follows, in fp32 and in place
      model_cuda::layernorm_backward(dresid_, /*accumulate=*/true, grad(ParamKind::ln1_w, l),
                                     grad(ParamKind::ln1_b, l), ln_partial_, dln_, x_in, ln1_mean(l), ln1_rstd(l),
                                     param(ParamKind::ln1_w, l), N, C, stream_);
      mark("layernorm bwd");
    }
    if (report) {
      add_bias_grads(l, 1);
      for (int k = static_cast<int>(ParamKind::ln1_w); k <= static_cast<int>(ParamKind::fc_proj_b); ++k) {
        grad_ready(static_cast<ParamKind>(k), l);
      }
    }
  }
  if (overlap) hand_over(bwd_side_, stream_);  // every weight and bias gradient
  // The bias gradients the epilogues wrote (they overwrite, the gradients accumulate).
  if (!report) add_bias_grads(0, L_);
  // Embedding: dx0 = drop'(dresid) in place, then the position rows and the token rows.
  model_cuda::dropout_backward(dresid_, dresid_, N, C, site(rng, 0, true), stream_);
  mark("dropout bwd");
  model_cuda::encoder_backward_wpe(grad(ParamKind::wpe), dresid_, static_cast<int>(B), static_cast<int>(T), C, stream_);
  mark("encoder bwd");
  // A graph's grid covers the worst case, N groups; blocks past *d_unique_count_ return.
  model_cuda::encoder_backward_wte(grad(ParamKind::wte), dresid_, d_unique_, d_starts_, d_positions_, d_unique_count_,
                                   capturing_ ? N : unique_tokens_, C, stream_);
  mark("encoder bwd");
  grad_ready(ParamKind::wpe);
  grad_ready(ParamKind::wte);  // the classifier wrote it too, before the backward
}

bool GptCuda::fused_epilogue(int index, model_cuda::Matmul::BiasGrad got) {
  using BiasGrad = model_cuda::Matmul::BiasGrad;
  if (got == BiasGrad::none) {
    FLASHGPT_CHECK(fused_bias_[index] == BiasGrad::none,
                   "gpt_cuda: cuBLASLt offered a bias-gradient epilogue for one layer and not another");
    return false;
  }
  FLASHGPT_CHECK(fused_bias_[index] == BiasGrad::none || fused_bias_[index] == got,
                 "gpt_cuda: cuBLASLt wrote the bias gradients of two layers in different types");
  fused_bias_[index] = got;
  return true;
}

void GptCuda::weight_and_bias_grad(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N,
                                   int64_t in, int64_t out, Lane lane) {
  if (bgradb_ && fused_epilogue(bias_index(b), lane.matmul->backward_weight_bgrad(grad(w, l), dbias_slot(b, l), dy, x,
                                                                                    N, in, out, lane.stream))) {
    mark("mm dW+db");
    return;
  }
  lane.matmul->backward_weight(grad(w, l), dy, x, N, in, out, lane.stream);
  mark("mm dW");
  model_cuda::column_sum(grad(b, l), col_partial_, dy, N, static_cast<int>(out), lane.stream);
  mark("bias grad");
}

void GptCuda::weight_and_bias_grad_ones(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N,
                                        int64_t out, Lane lane) {
  // dw_ext_ (out, C + 8) = dy^T [x | 1 | 0 ...], written (the gradients accumulate below).
  lane.matmul->backward_weight(dw_ext_, dy, x, N, ln_ld_, out, lane.stream, /*accumulate=*/false);
  mark(w == ParamKind::fc_w ? "mm dW fc" : "mm dW");
  model_cuda::split_weight_bias_grad(grad(w, l), grad(b, l), dw_ext_, out, static_cast<int>(C_), ln_ld_,
                                     /*accumulate=*/true, lane.stream);
  mark("dW+db split");
}

void GptCuda::projection_grad(ParamKind w, ParamKind b, int64_t l, const bf16* dy, const bf16* x, int64_t N,
                              int64_t in, int64_t out, Lane lane) {
  if (!ln_bias_grad_) {
    weight_and_bias_grad(w, b, l, dy, x, N, in, out, lane);
    return;
  }
  lane.matmul->backward_weight(grad(w, l), dy, x, N, in, out, lane.stream);
  mark("mm dW proj");
}

void GptCuda::group_positions_by_token(int64_t N) {
  // A counting sort: token_cursor_ counts each token's positions, then serves as the write
  // cursor of its group; positions stay in increasing order within a group.
  int32_t unique = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t token = h_tokens_[n];
    if (token_cursor_[size_t(token)]++ == 0) h_unique_[unique++] = token;
  }
  int32_t at = 0;
  for (int32_t i = 0; i < unique; ++i) {
    const int32_t token = h_unique_[i];
    h_starts_[i] = at;
    at += token_cursor_[size_t(token)];
    token_cursor_[size_t(token)] = h_starts_[i];
  }
  h_starts_[unique] = at;
  for (int64_t n = 0; n < N; ++n) h_positions_[token_cursor_[size_t(h_tokens_[n])]++] = static_cast<int32_t>(n);
  for (int32_t i = 0; i < unique; ++i) token_cursor_[size_t(h_unique_[i])] = 0;
  *h_unique_count_ = unique;
  unique_tokens_ = unique;
}

void GptCuda::copy_token_groups(int64_t N) {
  // A graph copies the worst case (N groups); the kernel reads *d_unique_count_ of them.
  const size_t groups = capturing_ ? size_t(N) : size_t(unique_tokens_);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_unique_, h_unique_, groups * 4, cudaMemcpyHostToDevice, stream_));
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_starts_, h_starts_, (groups + 1) * 4, cudaMemcpyHostToDevice, stream_));
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_positions_, h_positions_, size_t(N) * 4, cudaMemcpyHostToDevice, stream_));
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_unique_count_, h_unique_count_, 4, cudaMemcpyHostToDevice, stream_));
}

void GptCuda::write_step_values(StepRng rng) {
  h_step_[0] = rng.seed;
  h_step_[1] = rng.step;
  for (int64_t l = 0; l < L_; ++l) {
    h_step_[2 + 2 * l] = rng.seed ^ kAttentionSeedXor;
    h_step_[3 + 2 * l] = rng.step * uint64_t(L_) + uint64_t(l);
  }
}

cudaGraphExec_t GptCuda::capture(const std::function<void()>& enqueue) {
  FLASHGPT_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
  cudaGraph_t graph = nullptr;
  try {
    enqueue();
  } catch (const std::exception& e) {
    capturing_ = false;
    (void)cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    std::fprintf(stderr, "flashgpt: CUDA graph capture failed, the step runs eagerly: %s\n", e.what());
    return nullptr;
  }
  capturing_ = false;
  const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
  cudaGraphExec_t exec = nullptr;
  cudaError_t inst = end;
  if (end == cudaSuccess) inst = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    (void)cudaGetLastError();
    std::fprintf(stderr, "flashgpt: CUDA graph capture failed, the step runs eagerly: %s\n", cudaGetErrorString(inst));
    return nullptr;
  }
  return exec;
}

GptCuda::StepGraph* GptCuda::step_graph(int64_t B, int64_t T, float loss_scale) {
  if (!graphs_on_) return nullptr;
  for (auto& g : graphs_) {
    if (g.B == B && g.T == T && g.loss_scale == loss_scale) return &g;
  }
  // A batch shape or loss scale not seen before: capture its pair (training uses one or
  // two; the oldest goes beyond four).
  const int64_t N = B * T;
  StepGraph g{B, T, loss_scale, nullptr, nullptr};
  const StepRng rng{};  // ignored while capturing: the kernels read d_step_
  auto capture_pair = [&] {
    g.forward = capture([&] {
      FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_step_, h_step_, size_t(2 + 2 * L_) * sizeof(uint64_t),
                                          cudaMemcpyHostToDevice, stream_));
      const size_t bytes = size_t(N) * sizeof(int32_t);
      FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_tokens_, h_tokens_, bytes, cudaMemcpyHostToDevice, stream_));
      FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_targets_, h_targets_, bytes, cudaMemcpyHostToDevice, stream_));
      forward(B, T, /*train=*/true, rng);
      classifier(N, /*grad=*/true, loss_scale);
    });
    if (g.forward != nullptr) {
      g.backward = capture([&] {
        copy_token_groups(N);
        backward(B, T, rng);
      });
    }
  };
  capture_pair();
  // With matmul autotuning, the matmul plans first met in this capture ran cuBLASLt's
  // first heuristic: time them now, outside the capture (on the model's buffers, whose
  // contents do not matter for timing; nothing is written into them), and capture again
  // where that changed an algorithm, so that the graphs run the tuned ones.
  const auto tune_pending = [&] {
    const bool main_changed = matmul_->tune_pending(stream_);
    const bool side_changed = side_matmul_ != nullptr && side_matmul_->tune_pending(stream_);
    const bool classifier_changed = classifier_matmul_ != nullptr && classifier_matmul_->tune_pending(stream_);
    return main_changed || side_changed || classifier_changed;
  };
  if (g.forward != nullptr && g.backward != nullptr && tune_pending()) {
    cudaGraphExecDestroy(g.forward);
    cudaGraphExecDestroy(g.backward);
    g.forward = g.backward = nullptr;
    capture_pair();
  }
  if (g.forward == nullptr || g.backward == nullptr) {
    if (g.forward) cudaGraphExecDestroy(g.forward);
    graphs_on_ = false;
    return nullptr;
  }
  if (graphs_.size() == 4) {
    cudaGraphExecDestroy(graphs_.front().forward);
    cudaGraphExecDestroy(graphs_.front().backward);
    graphs_.erase(graphs_.begin());
  }
  graphs_.push_back(g);
  return &graphs_.back();
}

double GptCuda::read_loss(int64_t N) {
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return h_result_[0] / static_cast<double>(N);
}

double GptCuda::forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                                 float loss_scale) {
  check_shape(B, T, "forward_backward");
  // A graph cannot call the data-parallel hook as it goes: a step with a hook runs eagerly.
  if (StepGraph* g = grad_ready_ ? nullptr : step_graph(B, T, loss_scale)) {
    // The previous call's synchronization means the graphs no longer read the pinned inputs.
    stage_tokens(windows, B, T, /*windows=*/true);
    write_step_values(rng);
    FLASHGPT_CUDA_CHECK(cudaGraphLaunch(g->forward, stream_));
    group_positions_by_token(B * T);  // on the host, while the GPU runs the forward
    FLASHGPT_CUDA_CHECK(cudaGraphLaunch(g->backward, stream_));
    return read_loss(B * T);
  }
  profile_begin(kProfileForwardBackward);
  upload_tokens(windows, B, T, /*windows=*/true);
  forward(B, T, /*train=*/true, rng);
  // The embedding backward's token groups, built while the GPU runs the forward.
  group_positions_by_token(B * T);
  classifier(B * T, /*grad=*/true, loss_scale);
  copy_token_groups(B * T);
  backward(B, T, rng);
  profile_end();
  return read_loss(B * T);
}

double GptCuda::forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) {
  check_shape(B, T, "forward_loss");
  upload_tokens(windows, B, T, /*windows=*/true);
  forward(B, T, /*train=*/false, StepRng{});
  classifier(B * T, /*grad=*/false, 1.0f);
  return read_loss(B * T);
}

void GptCuda::forward_logits(std::span<const TokenId> inputs, int64_t B, int64_t T, std::span<float> logits_out) {
  check_shape(B, T, "forward_logits");
  const int64_t N = B * T;
  FLASHGPT_CHECK(static_cast<int64_t>(logits_out.size()) == N * V_,
                 "forward_logits: the output has {} floats, (B {}, T {}, V {}) needs {}", logits_out.size(), B, T, V_,
                 N * V_);
  upload_tokens(inputs, B, T, /*windows=*/false);
  forward(B, T, /*train=*/false, StepRng{});
  const int64_t rows_f32 = static_cast<int64_t>(logits_bytes_ / (size_t(Vp_) * 4));
  float* chunk = reinterpret_cast<float*>(logits_);
  for (int64_t r0 = 0; r0 < N; r0 += rows_f32) {
    const int64_t rows = std::min(rows_f32, N - r0);
    matmul_->forward_f32(chunk, lnf_ + r0 * C_, weight(ParamKind::wte), rows, C_, Vp_, stream_);
    FLASHGPT_CUDA_CHECK(cudaMemcpy2DAsync(logits_out.data() + r0 * V_, size_t(V_) * 4, chunk, size_t(Vp_) * 4,
                                          size_t(V_) * 4, size_t(rows), cudaMemcpyDeviceToHost, stream_));
    FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
}

void GptCuda::grads_zero() {
  profile_begin(kProfileZero);
  FLASHGPT_CUDA_CHECK(cudaMemsetAsync(grads_, 0, size_t(P_) * sizeof(float), stream_));
  mark("grads zero");
  profile_end();
}

double GptCuda::grads_norm() {
  profile_begin(kProfileNorm);
  model_cuda::sum_squares(d_result_ + 1, norm_partial_, grads_, P_, stream_);
  mark("grad norm");
  profile_end();
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(h_result_ + 1, d_result_ + 1, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return std::sqrt(h_result_[1]);
}

void GptCuda::adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) {
  adamw_step_range(adam, t, grad_scale, 0, P_);
}

void GptCuda::adamw_step_range(const AdamWConfig& adam, int64_t t, float grad_scale, int64_t begin, int64_t end) {
  FLASHGPT_CHECK(t >= 1, "adamw_step: the step t is 1-based, got {}", t);
  FLASHGPT_CHECK(0 <= begin && begin <= end && end <= P_, "adamw_step_range: [{}, {}) is not a range of the {} parameters",
                 begin, end, P_);
  if (begin == end) return;
  FLASHGPT_CHECK(adam_begin_ <= begin && end <= adam_end_,
                 "adamw_step: [{}, {}) reaches outside [{}, {}), the parameters whose AdamW moments this model keeps "
                 "(adam_state_shard)", begin, end, adam_begin_, adam_end_);
  model_cuda::AdamWArgs a;
  a.lr = static_cast<float>(adam.lr);
  a.beta1 = static_cast<float>(adam.beta1);
  a.beta2 = static_cast<float>(adam.beta2);
  a.eps = static_cast<float>(adam.eps);
  a.weight_decay = static_cast<float>(adam.weight_decay);
  a.bias_correction1 = static_cast<float>(1.0 - std::pow(adam.beta1, static_cast<double>(t)));
  a.bias_correction2 = static_cast<float>(1.0 - std::pow(adam.beta2, static_cast<double>(t)));
  a.grad_scale = grad_scale;
  // The segments seen from `begin`: those before it become empty, the last ends at n.
  const int64_t n = end - begin;
  model_cuda::ParamSegments segments = segments_;
  for (int i = 0; i < segments.count; ++i) segments.end[i] = std::clamp<int64_t>(segments_.end[i] - begin, 0, n);
  profile_begin(kProfileAdamw);
  model_cuda::adamw_update(params_ + begin, params_bf16_ + begin, grads_ + begin, m_ + (begin - adam_begin_),
                           v_ + (begin - adam_begin_), n, segments,
                           a, stream_);
  mark("adamw");
  profile_end();
}

}  // namespace

std::unique_ptr<GptModel> gpt_create_cuda(const ModelConfig& config, const ModelOptions& options) {
  return std::make_unique<GptCuda>(config, options);
}

}  // namespace flashgpt
