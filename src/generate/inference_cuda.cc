// The bf16 CUDA inference engine: the model of model.h over a KV cache on the GPU.
//
// Precision is the training backend's: the matmul weights and inputs in bf16 with fp32
// accumulation (cuBLAS), the residual stream, LayerNorm, biases and embeddings in fp32, the
// K/V caches in bf16. A call runs, per layer: fused residual + LayerNorm (bf16 out), the
// qkv product, the split of q and the bias-added k, v into the caches, attention, the
// projection, residual + LayerNorm, fc, bias + GELU, fc-proj; the last layer's residual +
// lnf runs only for each chunk's last row, and the head writes fp32 logits over the padded
// vocabulary (Vp columns; only the V real ones are read).
//
// Attention: each chunk of more than one token (a prefill) runs our FlashAttention forward
// with q from the chunk and K/V read in place from its slot's cache, causal and
// bottom-right aligned; one-token chunks (decode) share one flash-decoding launch
// (generate_cuda.h). A call whose chunks are all one token long is a decode step: the
// first step of each batch size B is captured as a CUDA graph (the host-to-device copy of
// the step's token places and sampling inputs, every kernel, the sampling, and the copy of
// the B drawn tokens back), later steps replay it. All memory is allocated in the
// constructor; a step allocates nothing.
#include "inference_cuda_kernels.h"

#include <flashgpt/attention_cuda.h>
#include <flashgpt/bfloat16.h>
#include <flashgpt/cuda_check.h>
#include <flashgpt/env_switch.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>
#include <flashgpt/generate_cuda.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <map>
#include <vector>

namespace flashgpt {

namespace {

using inference_cuda::bf16;
using inference_cuda::SampleParams;
using inference_cuda::TokenPlace;

#define FLASHGPT_CUBLAS_CHECK(call)                                                                     \
  do {                                                                                                  \
    const cublasStatus_t flashgpt_cublas_ = (call);                                                     \
    FLASHGPT_CHECK(flashgpt_cublas_ == CUBLAS_STATUS_SUCCESS, "cuBLAS call `{}` failed with status {}", \
                   #call, static_cast<int>(flashgpt_cublas_));                                          \
  } while (0)

template <class T>
T* device_alloc(std::vector<void*>& owned, size_t count) {
  void* p = nullptr;
  FLASHGPT_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  owned.push_back(p);
  return static_cast<T*>(p);
}

// Host-pinned and device copies of one call's per-row inputs (same layout).
struct RowBlock {
  SampleParams sample;
  uint64_t* prompt_index;  // (S)
  uint64_t* step;          // (S)
  int32_t* last;           // (S): each chunk's last row in the call
  int32_t* q_rows;         // (S): the decode rows
  int32_t* slots;          // (S)
  int32_t* lengths;        // (S): keys each decode row attends (its slot's length after the call)
};

class CudaEngine final : public InferenceEngine {
 public:
  CudaEngine(const ModelConfig& config, std::span<const float> params, const InferenceOptions& options);
  ~CudaEngine() override;

  const ModelConfig& config() const override { return config_; }
  int64_t max_slots() const override { return S_; }
  int64_t max_context() const override { return T_; }
  int64_t length(int64_t slot) const override {
    check_slot(slot);
    return lengths_[slot];
  }
  void reset(int64_t slot) override {
    check_slot(slot);
    lengths_[slot] = 0;
  }
  void forward(std::span<const SlotChunk> chunks, std::span<float> logits_out) override;
  void forward_sample(std::span<const SlotChunk> chunks, const SamplingConfig& sampling,
                      std::span<const uint64_t> prompt_index, std::span<const uint64_t> step,
                      std::span<TokenId> tokens_out) override;

 private:
  void check_slot(int64_t slot) const {
    FLASHGPT_CHECK(slot >= 0 && slot < S_, "inference (cuda): slot {} is outside 0 .. {}", slot, S_ - 1);
  }
  // Validates the chunks and fills the pinned host inputs; returns N, the call's tokens.
  int64_t stage(std::span<const SlotChunk> chunks);
  // Enqueues the copies of the staged inputs, the model and the head (logits in d_logits_).
  void enqueue_model(std::span<const SlotChunk> chunks, int64_t N, bool all_decode);
  void enqueue_sample(int B);
  // The fused path of a call of n <= kGemvMaxRows tokens (inference_cuda::gemv_fused).
  bool fused_fits(int64_t N) const {
    return fused_ && N <= inference_cuda::kGemvMaxRows && N * std::max(C_, F_) * 2 <= 48 * 1024;
  }
  void enqueue_layers_fused(std::span<const SlotChunk> chunks, int64_t N, bool all_decode);
  // The persistent path of a call of B <= kGemvMaxRows one-token chunks: every layer in one
  // cooperative launch (inference_cuda::persistent_decode), then the fused head.
  void enqueue_persistent(std::span<const SlotChunk> chunks, int64_t N);
  void enqueue_prefill_attention(std::span<const SlotChunk> chunks, bf16* kc, bf16* vc);
  void enqueue_decode_attention(int decode_rows, bf16* kc, bf16* vc, bool fused);
  void gemm(void* y, bool y_f32, const bf16* x, const bf16* w, int64_t rows, int64_t in, int64_t out, int64_t ldy);
  const float* pf(ParamKind kind) const { return d_params_ + offsets_[static_cast<int>(kind)]; }
  const bf16* pb(ParamKind kind) const { return d_weights_ + offsets_[static_cast<int>(kind)]; }
  RowBlock row_block(char* base) const;

  ModelConfig config_;
  int64_t S_ = 0, T_ = 0, N_max_ = 0, C_ = 0, F_ = 0, NH_ = 0, HD_ = 0, L_ = 0, V_ = 0, Vp_ = 0;
  int64_t offsets_[kParamKinds] = {};
  int keys_per_split_ = 32;
  std::vector<int64_t> lengths_;

  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::vector<void*> owned_;
  float* d_params_ = nullptr;  // fp32, the flat buffer
  bf16* d_weights_ = nullptr;  // bf16 copy of it (the matmuls read this)
  bf16 *k_cache_ = nullptr, *v_cache_ = nullptr;  // (L, S, T, C)
  float* x_ = nullptr;                             // (N_max, C) residual stream
  bf16 *h_ = nullptr, *qkv_ = nullptr, *q_ = nullptr, *att_ = nullptr, *y_ = nullptr, *ff_ = nullptr, *hb_ = nullptr;
  float* lse_ = nullptr;       // (NH, N_max)
  float* partials_ = nullptr;  // flash-decoding workspace
  float* d_logits_ = nullptr;  // (S, Vp)
  int32_t* d_tokens_ = nullptr;  // (S) drawn tokens
  void* cublas_workspace_ = nullptr;
  size_t row_bytes_ = 0;
  // One pinned block and its device copy: the RowBlock (row_bytes_), then the token places
  // (N_max), so a call's inputs go over in one copy.
  char* h_rows_ = nullptr;
  char* d_rows_ = nullptr;
  TokenPlace* h_places_ = nullptr;  // h_rows_ + row_bytes_
  TokenPlace* d_places_ = nullptr;  // d_rows_ + row_bytes_
  int32_t* h_tokens_ = nullptr;     // pinned (S)
  // The fused path (FLASHGPT_CUDA_DECODE=fused, the default; =gemv keeps the earlier path
  // of separate kernels for A/B timing) and programmatic dependent launch in it
  // (FLASHGPT_CUDA_PDL=0 turns it off).
  bool fused_ = true, pdl_ = true;
  // The persistent path (FLASHGPT_CUDA_DECODE=auto: where its plan is ok, i.e. decode
  // steps of at most min(S, 8) rows on a GPU that fits it; =persistent requires it; =fused,
  // the default for now (see kDefaultDecodeMode), and =gemv leave it off).
  bool persistent_ = false;
  inference_cuda::PersistentDecodePlan plan_;
  // FLASHGPT_PERSISTENT_TRACE=1: the persistent kernel's block 0 stamps clock64 around each
  // grid barrier; the destructor prints where the last step's time went (stderr).
  long long* d_trace_ = nullptr;
  // FLASHGPT_PERSISTENT_HEAD=1: lnf and the head run inside the persistent launch (their
  // weights stream in during the last layer); else (the default) as the fused path's head
  // kernel after it. head_parts_now_: argmax partials per row of the last enqueued head.
  bool persistent_head_ = false;
  int head_parts_now_ = 0;
  bool head_cooperative_ = false;  // the last head ran inside the cooperative launch
  int trace_len_ = 0;
  void print_trace() const;
  bool head_fused_ = false;         // the last enqueued head wrote argmax partials
  int head_parts_ = 0;              // argmax partials per row
  float* part_val_ = nullptr;       // (kGemvMaxRows, head_parts_)
  int32_t* part_idx_ = nullptr;
  unsigned* counters_ = nullptr;    // (S, NH) flash-decoding combine counters, zero between launches
  // FLASHGPT_CUDA_DECODE=attnproj: the fused path with each layer's attention and proj in
  // one kernel (inference_cuda::attention_proj) for calls whose rows are all decode rows;
  // its per-head partial products and (S, 8) counters, and its column blocks
  // (FLASHGPT_ATTN_PROJ_COLS overrides the choice, for A/B timing).
  bool attn_proj_ = false;
  float* ap_partials_ = nullptr;    // (S, NH, C)
  unsigned* ap_counters_ = nullptr;  // (S, kApMaxCols)
  int ap_cols_override_ = 0;
  // FLASHGPT_CUDA_DECODE=layer3: the attnproj path with each layer's ln2, fc, GELU and
  // fc_proj in one kernel as well (inference_cuda::mlp_fused), and every LayerNorm's
  // statistics left by the kernel that writes the residual row (embed, attention_proj,
  // mlp_fused), so no kernel reduces over the row: 3 launches a layer for decode steps of
  // at most mlp_plan_.rows_max rows; larger steps take the attnproj path. ln1_stats_: (S,
  // C / 32) pairs from embed and mlp_fused (read by ln1 + qkv and by lnf + head);
  // ln2_stats_: (S, kApMaxCols) from attention_proj (read by mlp_fused); mlp_partials_:
  // (F / 16, rows_max, C); mlp_arrive_: its ticket counter.
  bool layer3_ = false;
  inference_cuda::MlpPlan mlp_plan_;
  float2* ln1_stats_ = nullptr;
  float2* ln2_stats_ = nullptr;
  float* mlp_partials_ = nullptr;
  unsigned long long* mlp_arrive_ = nullptr;
  // FLASHGPT_GEMV_WIDE=1: fc_proj's product (in 3072) with all its loads in flight before
  // the wait (FusedGemvParams::wide), on the fused and attnproj paths; off by default until
  // measured.
  bool gemv_wide_ = false;
  // The layer products that go through gemv_fused at 2 .. 8 rows (not the head) on the
  // tensor-core kernel (FusedGemvParams::mma); not the same bits (another order of sums). On by
  // default since batch 8 ran 1.39x the scalar kernel on an H100 (0.722 -> 0.521 ms a step,
  // batch 2 1.06x, batch 1 untouched; docs/generate.md); FLASHGPT_GEMV_MMA=0 turns it off.
  bool gemv_mma_ = true;
  // FLASHGPT_HEAD_L2_PREFETCH=MB: the fc kernel of the layer before the last prefetches the
  // head's first MB megabytes of weights toward L2 with the evict-last priority, so that
  // the head starts on rows in L2 (off by default until measured).
  int64_t head_l2_bytes_ = 0;
  // FLASHGPT_DECODE_L2_AHEAD=1: each layer kernel of the fused, attnproj and layer3 paths
  // that reads weights prefetches, before its wait, the ones its role reads one layer later
  // (the last layer's: the head's rows at the same place in the step's stream of weights),
  // so that DRAM streams the next layer while the chain of dependent kernels runs (off by
  // default until measured).
  bool l2_ahead_ = false;
  static constexpr int kApMaxCols = 64;
  std::map<int, cudaGraphExec_t> graphs_;  // decode steps by batch size
  std::vector<int64_t> decode_chunks_;     // host: which chunks are one token (scratch)
};

RowBlock CudaEngine::row_block(char* base) const {
  RowBlock r;
  size_t at = 64;  // SampleParams lives at the start (64 bytes reserved)
  auto take = [&](size_t bytes) {
    char* p = base + at;
    at += (bytes + 15) / 16 * 16;
    return p;
  };
  r.prompt_index = reinterpret_cast<uint64_t*>(take(S_ * 8));
  r.step = reinterpret_cast<uint64_t*>(take(S_ * 8));
  r.last = reinterpret_cast<int32_t*>(take(S_ * 4));
  r.q_rows = reinterpret_cast<int32_t*>(take(S_ * 4));
  r.slots = reinterpret_cast<int32_t*>(take(S_ * 4));
  r.lengths = reinterpret_cast<int32_t*>(take(S_ * 4));
  return r;
}

CudaEngine::CudaEngine(const ModelConfig& config, std::span<const float> params, const InferenceOptions& options)
    : config_(config) {
  model_config_validate(config_);
  FLASHGPT_CHECK(static_cast<int64_t>(params.size()) == model_param_count(config_),
                 "inference (cuda): the parameter buffer has {} floats, the {} config needs {}", params.size(),
                 config_.preset, model_param_count(config_));
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  FLASHGPT_CHECK(status == cudaSuccess && devices > 0, "inference (cuda): no CUDA device is available ({})",
                 status == cudaSuccess ? "no devices" : cudaGetErrorString(status));
  FLASHGPT_CHECK(options.max_slots >= 1, "inference (cuda): max_slots must be at least 1, got {}", options.max_slots);
  FLASHGPT_CHECK(options.max_context >= 0 && options.max_context <= config_.context,
                 "inference (cuda): max_context {} is outside 0 .. the model's context {}", options.max_context,
                 config_.context);
  S_ = options.max_slots;
  T_ = options.max_context > 0 ? options.max_context : config_.context;
  C_ = config_.d_model, F_ = config_.d_ff, NH_ = config_.n_head, HD_ = config_.head_dim(), L_ = config_.n_layer;
  V_ = config_.vocab_size, Vp_ = config_.padded_vocab_size;
  N_max_ = S_ * T_;
  FLASHGPT_CHECK(C_ % 8 == 0 && F_ % 8 == 0 && C_ <= 2048,
                 "inference (cuda): d_model {} and d_ff {} must be multiples of 8, d_model at most 2048", C_, F_);
  FLASHGPT_CHECK((HD_ == 32 || HD_ == 64 || HD_ == 96 || HD_ == 128) &&
                     attention_cuda_head_dim_compiled(static_cast<int>(HD_)),
                 "inference (cuda): head dim {} has no CUDA attention kernel in this build "
                 "(FLASHGPT_ATTENTION_HEAD_DIMS; the decode kernel takes 32, 64, 96, 128)",
                 HD_);
  FLASHGPT_CHECK(N_max_ < (int64_t{1} << 31), "inference (cuda): {} slots x context {} is too many tokens", S_, T_);
  for (const ParamSpec& spec : model_param_specs(config_)) offsets_[static_cast<int>(spec.kind)] = spec.offset;
  // Enough blocks of keys to fill the GPU at batch 1, few enough to stay cheap at batch 64.
  keys_per_split_ = S_ * NH_ >= 256 ? 128 : 32;

  FLASHGPT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  FLASHGPT_CUBLAS_CHECK(cublasCreate(&cublas_));
  FLASHGPT_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  constexpr size_t kCublasWorkspace = size_t{32} << 20;
  cublas_workspace_ = device_alloc<char>(owned_, kCublasWorkspace);
  FLASHGPT_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace));

  // Every upload and memset here goes on stream_, and the constructor ends with stream_
  // synchronized: stream_ is non-blocking, so it does not wait for the legacy default
  // stream, on which cudaMemcpy from pageable memory may return before its DMA lands and
  // cudaMemset of device memory runs asynchronously. (With them there, a call right after
  // construction could read weights and counters not yet written: all-zero logits.)
  const size_t P = params.size();
  d_params_ = device_alloc<float>(owned_, P);
  d_weights_ = device_alloc<bf16>(owned_, P);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_params_, params.data(), P * sizeof(float), cudaMemcpyHostToDevice, stream_));
  {
    std::vector<uint16_t> bits(P);
    for (size_t i = 0; i < P; ++i) bits[i] = bf16_from_float(params[i]);
    FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_weights_, bits.data(), P * 2, cudaMemcpyHostToDevice, stream_));
    FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before `bits` goes
  }
  const size_t cache = static_cast<size_t>(L_ * S_ * T_ * C_);
  k_cache_ = device_alloc<bf16>(owned_, cache);
  v_cache_ = device_alloc<bf16>(owned_, cache);
  const auto N = static_cast<size_t>(N_max_);
  x_ = device_alloc<float>(owned_, N * C_);
  h_ = device_alloc<bf16>(owned_, N * C_);
  qkv_ = device_alloc<bf16>(owned_, N * 3 * C_);
  q_ = device_alloc<bf16>(owned_, N * C_);
  att_ = device_alloc<bf16>(owned_, N * C_);
  y_ = device_alloc<bf16>(owned_, N * C_);
  ff_ = device_alloc<bf16>(owned_, N * F_);
  hb_ = device_alloc<bf16>(owned_, S_ * C_);
  lse_ = device_alloc<float>(owned_, N * NH_);
  partials_ = device_alloc<float>(
      owned_, attention_decode_cuda_partial_floats(static_cast<int>(S_), static_cast<int>(NH_), static_cast<int>(HD_),
                                                   static_cast<int>(T_), keys_per_split_));
  d_logits_ = device_alloc<float>(owned_, S_ * Vp_);
  d_tokens_ = device_alloc<int32_t>(owned_, S_);
  row_bytes_ = 64 + 6 * ((static_cast<size_t>(S_) * 8 + 15) / 16 * 16);
  d_rows_ = device_alloc<char>(owned_, row_bytes_ + N * sizeof(TokenPlace));
  d_places_ = reinterpret_cast<TokenPlace*>(d_rows_ + row_bytes_);
  FLASHGPT_CUDA_CHECK(cudaMallocHost(&h_rows_, row_bytes_ + N * sizeof(TokenPlace)));
  h_places_ = reinterpret_cast<TokenPlace*>(h_rows_ + row_bytes_);
  FLASHGPT_CUDA_CHECK(cudaMallocHost(&h_tokens_, S_ * sizeof(int32_t)));
  std::memset(h_rows_, 0, row_bytes_);
  lengths_.assign(static_cast<size_t>(S_), 0);
  // The default is attnproj where its attention kernel takes the model (head dims 32, 64 and
  // 128, scores of a row within 48 KB), else fused: on an H100 on 2026-12-07 attnproj ran a
  // seed step at batch 1 in 0.312 ms against fused's 0.319-0.320 (two calls) and 1.008x at
  // batch 8 (docs/generate.md). The persistent path (slower) and layer3 (slower) are opt-in.
  const bool attn_proj_fits = inference_cuda::attention_proj_supported(static_cast<int>(HD_), static_cast<int>(T_), 1);
  std::string decode_mode = attn_proj_fits ? "attnproj" : "fused";
  if (const char* mode = std::getenv("FLASHGPT_CUDA_DECODE"); mode != nullptr && *mode != '\0') decode_mode = mode;
  FLASHGPT_CHECK(decode_mode == "auto" || decode_mode == "persistent" || decode_mode == "fused" ||
                     decode_mode == "attnproj" || decode_mode == "layer3" || decode_mode == "gemv",
                 "inference (cuda): FLASHGPT_CUDA_DECODE is '{}', expected auto, persistent, fused, attnproj, layer3 "
                 "or gemv",
                 decode_mode);
  fused_ = decode_mode != "gemv";
  if (decode_mode == "layer3") {
    mlp_plan_ = inference_cuda::mlp_fused_plan(static_cast<int>(std::min<int64_t>(S_, inference_cuda::kMlpMaxRows)),
                                               static_cast<int>(C_), static_cast<int>(F_));
    FLASHGPT_CHECK(mlp_plan_.ok, "inference (cuda): FLASHGPT_CUDA_DECODE=layer3, but its fc + fc_proj kernel does not "
                   "take this model or device: {}", mlp_plan_.why);
    layer3_ = true;
    const int64_t rows = mlp_plan_.rows_max;
    ln1_stats_ = device_alloc<float2>(owned_, static_cast<size_t>(S_ * (C_ / 32)));
    ln2_stats_ = device_alloc<float2>(owned_, static_cast<size_t>(S_ * kApMaxCols));
    mlp_partials_ = device_alloc<float>(owned_, static_cast<size_t>(mlp_plan_.grid * rows * C_));
    mlp_arrive_ = device_alloc<unsigned long long>(owned_, 1);
    FLASHGPT_CUDA_CHECK(cudaMemsetAsync(mlp_arrive_, 0, sizeof(unsigned long long), stream_));
  }
  if (decode_mode == "attnproj" || decode_mode == "layer3") {
    if (const char* cols = std::getenv("FLASHGPT_ATTN_PROJ_COLS")) {
      ap_cols_override_ = std::atoi(cols);
      FLASHGPT_CHECK(ap_cols_override_ >= 1 && ap_cols_override_ <= kApMaxCols,
                     "inference (cuda): FLASHGPT_ATTN_PROJ_COLS is '{}', expected 1 .. {}", cols, kApMaxCols);
    }
    FLASHGPT_CHECK(inference_cuda::attention_proj_supported(static_cast<int>(HD_), static_cast<int>(T_),
                                                            ap_cols_override_ > 0 ? ap_cols_override_ : 1),
                   "inference (cuda): FLASHGPT_CUDA_DECODE={} takes head dims 32, 64 and 128 and a context whose "
                   "scores fit 48 KB of shared memory; this model has head dim {} and context {}",
                   decode_mode, HD_, T_);
    attn_proj_ = true;
    ap_partials_ = device_alloc<float>(owned_, static_cast<size_t>(S_ * NH_ * C_));
    ap_counters_ = device_alloc<unsigned>(owned_, static_cast<size_t>(S_ * kApMaxCols));
    FLASHGPT_CUDA_CHECK(cudaMemsetAsync(ap_counters_, 0, static_cast<size_t>(S_ * kApMaxCols) * sizeof(unsigned), stream_));
  }
  if (decode_mode == "auto" || decode_mode == "persistent") {
    plan_ = inference_cuda::persistent_decode_plan(static_cast<int>(std::min<int64_t>(S_, inference_cuda::kGemvMaxRows)),
                                                   static_cast<int>(C_), static_cast<int>(F_), static_cast<int>(NH_),
                                                   static_cast<int>(HD_), static_cast<int>(T_));
    FLASHGPT_CHECK(plan_.ok || decode_mode == "auto",
                   "inference (cuda): FLASHGPT_CUDA_DECODE=persistent, but the persistent decode path does not take "
                   "this model or device: {}",
                   plan_.why);
    persistent_ = plan_.ok;
  }
  if (const char* head = std::getenv("FLASHGPT_PERSISTENT_HEAD")) persistent_head_ = std::string(head) == "1";
  if (const char* trace = std::getenv("FLASHGPT_PERSISTENT_TRACE"); trace && std::string(trace) == "1" && persistent_) {
    trace_len_ = static_cast<int>(2 + 2 * (5 * L_));  // 5 L - 1 barriers, one more with the head
    d_trace_ = device_alloc<long long>(owned_, static_cast<size_t>(trace_len_));
    FLASHGPT_CUDA_CHECK(cudaMemsetAsync(d_trace_, 0, static_cast<size_t>(trace_len_) * sizeof(long long), stream_));
  }
  if (const char* pdl = std::getenv("FLASHGPT_CUDA_PDL")) pdl_ = std::string(pdl) != "0";
  if (const char* wide = std::getenv("FLASHGPT_GEMV_WIDE")) gemv_wide_ = std::string(wide) == "1";
  gemv_mma_ = env_switch("FLASHGPT_GEMV_MMA", gemv_mma_, "the scalar products", "tensor cores at 2 .. 8 rows");
  if (const char* mb = std::getenv("FLASHGPT_HEAD_L2_PREFETCH")) {
    const int64_t n = std::atoll(mb);
    FLASHGPT_CHECK(n >= 0 && n <= 4096, "inference (cuda): FLASHGPT_HEAD_L2_PREFETCH is '{}', expected 0 .. 4096 (MB)", mb);
    head_l2_bytes_ = std::min(n << 20, Vp_ * C_ * 2);
  }
  if (const char* ahead = std::getenv("FLASHGPT_DECODE_L2_AHEAD")) l2_ahead_ = std::string(ahead) == "1";
  // A line prefetch fills what L2 fetches on a miss: ask for whole 128-byte lines (a hint,
  // for the process's context; 32-byte sectors would bring a quarter of the weights). A
  // device that refuses the limit runs without it.
  if (l2_ahead_ && cudaDeviceSetLimit(cudaLimitMaxL2FetchGranularity, 128) != cudaSuccess) cudaGetLastError();
  head_parts_ = inference_cuda::gemv_fused_blocks(static_cast<int>(Vp_));
  const int parts_max = std::max(head_parts_, plan_.grid);  // the persistent head leaves one per block
  part_val_ = device_alloc<float>(owned_, static_cast<size_t>(inference_cuda::kGemvMaxRows) * parts_max);
  part_idx_ = device_alloc<int32_t>(owned_, static_cast<size_t>(inference_cuda::kGemvMaxRows) * parts_max);
  counters_ = device_alloc<unsigned>(owned_, static_cast<size_t>(S_ * NH_));
  FLASHGPT_CUDA_CHECK(cudaMemsetAsync(counters_, 0, static_cast<size_t>(S_ * NH_) * sizeof(unsigned), stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the memsets above, before the first call
}

CudaEngine::~CudaEngine() {
  if (d_trace_) print_trace();
  for (auto& [b, exec] : graphs_) cudaGraphExecDestroy(exec);
  if (cublas_) cublasDestroy(cublas_);
  for (void* p : owned_) cudaFree(p);
  cudaFreeHost(h_rows_);
  cudaFreeHost(h_tokens_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaEngine::gemm(void* y, bool y_f32, const bf16* x, const bf16* w, int64_t rows, int64_t in, int64_t out,
                      int64_t ldy) {
  // A decode step of a few rows: one pass over the weights (inference_cuda::gemv).
  if (rows <= inference_cuda::kGemvMaxRows &&
      inference_cuda::gemv(y, y_f32, ldy, x, w, nullptr, static_cast<int>(rows), static_cast<int>(in),
                           static_cast<int>(out), stream_)) {
    return;
  }
  // Row-major Y (rows, out) = X (rows, in) W (out, in)^T is column-major Y^T = W X^T.
  const float alpha = 1.0f, beta = 0.0f;
  FLASHGPT_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                                     static_cast<int>(in), &alpha, w, CUDA_R_16BF, static_cast<int>(in), x,
                                     CUDA_R_16BF, static_cast<int>(in), &beta, y,
                                     y_f32 ? CUDA_R_32F : CUDA_R_16BF, static_cast<int>(ldy), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
}

int64_t CudaEngine::stage(std::span<const SlotChunk> chunks) {
  const auto B = static_cast<int64_t>(chunks.size());
  FLASHGPT_CHECK(B <= S_, "inference (cuda): {} chunks in one call, but only {} slots", B, S_);
  std::vector<bool> seen(static_cast<size_t>(S_), false);
  const RowBlock rows = row_block(h_rows_);
  int64_t N = 0, decode = 0;
  for (int64_t b = 0; b < B; ++b) {
    const SlotChunk& chunk = chunks[b];
    check_slot(chunk.slot);
    FLASHGPT_CHECK(!seen[chunk.slot], "inference (cuda): slot {} appears twice in one forward call", chunk.slot);
    seen[chunk.slot] = true;
    const auto n = static_cast<int64_t>(chunk.tokens.size());
    FLASHGPT_CHECK(n >= 1, "inference (cuda): an empty chunk for slot {}", chunk.slot);
    FLASHGPT_CHECK(lengths_[chunk.slot] + n <= T_, "inference (cuda): slot {} holds {} tokens; {} more exceed the "
                   "context of {}", chunk.slot, lengths_[chunk.slot], n, T_);
    for (int64_t i = 0; i < n; ++i) {
      const TokenId t = chunk.tokens[i];
      FLASHGPT_CHECK(static_cast<int64_t>(t) < V_, "inference (cuda): token id {} is outside the vocabulary of {}", t,
                     V_);
      h_places_[N + i] = {static_cast<int32_t>(t), static_cast<int32_t>(lengths_[chunk.slot] + i),
                          static_cast<int32_t>(chunk.slot)};
    }
    if (n == 1) {
      rows.q_rows[decode] = static_cast<int32_t>(N);
      rows.slots[decode] = static_cast<int32_t>(chunk.slot);
      rows.lengths[decode] = static_cast<int32_t>(lengths_[chunk.slot] + 1);
      ++decode;
    }
    N += n;
    rows.last[b] = static_cast<int32_t>(N - 1);
  }
  return N;
}

void CudaEngine::enqueue_prefill_attention(std::span<const SlotChunk> chunks, bf16* kc, bf16* vc) {
  const int64_t slot_stride = T_ * C_;
  int64_t first = 0;
  for (const SlotChunk& chunk : chunks) {
    const auto len = static_cast<int64_t>(chunk.tokens.size());
    if (len > 1) {
      const int64_t cached = lengths_[chunk.slot];
      AttentionParams p;
      p.q = q_ + first * C_;
      p.k = kc + chunk.slot * slot_stride;
      p.v = vc + chunk.slot * slot_stride;
      p.o = att_ + first * C_;
      p.lse = lse_;
      p.dtype = DType::bf16;
      p.batch = 1;
      p.seqlen_q = static_cast<int>(len);
      p.seqlen_k = static_cast<int>(cached + len);
      p.heads_q = p.heads_kv = static_cast<int>(NH_);
      p.head_dim = static_cast<int>(HD_);
      p.q_batch_stride = len * C_, p.q_row_stride = C_, p.q_head_stride = HD_;
      p.k_batch_stride = slot_stride, p.k_row_stride = C_, p.k_head_stride = HD_;
      p.v_batch_stride = slot_stride, p.v_row_stride = C_, p.v_head_stride = HD_;
      p.o_batch_stride = len * C_, p.o_row_stride = C_, p.o_head_stride = HD_;
      p.lse_batch_stride = NH_ * len, p.lse_head_stride = len;
      p.mask = Mask::causal;
      attention_forward_cuda(p, stream_);
    }
    first += len;
  }
}

void CudaEngine::enqueue_decode_attention(int decode_rows, bf16* kc, bf16* vc, bool fused) {
  if (decode_rows == 0) return;
  const RowBlock rows = row_block(d_rows_);
  DecodeAttentionCudaParams d;
  d.q = q_, d.k = kc, d.v = vc, d.o = att_, d.partials = partials_;
  d.q_rows = rows.q_rows, d.slots = rows.slots, d.lengths = rows.lengths;
  d.rows = decode_rows, d.heads = static_cast<int>(NH_), d.head_dim = static_cast<int>(HD_);
  d.q_row_stride = C_, d.o_row_stride = C_, d.row_stride = C_, d.slot_stride = T_ * C_;
  d.max_length = static_cast<int>(T_);
  d.keys_per_split = keys_per_split_;
  if (fused) d.counters = counters_, d.programmatic = pdl_;
  attention_decode_cuda(d, stream_);
}

void CudaEngine::enqueue_model(std::span<const SlotChunk> chunks, int64_t N, bool all_decode) {
  using namespace inference_cuda;
  const auto B = static_cast<int>(chunks.size());
  const int C = static_cast<int>(C_);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(d_rows_, h_rows_, row_bytes_ + N * sizeof(TokenPlace), cudaMemcpyHostToDevice,
                                      stream_));
  if (persistent_ && N == B && B <= plan_.rows_max) {
    enqueue_persistent(chunks, N);
    return;
  }
  if (fused_fits(N)) {
    enqueue_layers_fused(chunks, N, all_decode);
    return;
  }
  head_fused_ = false;
  const RowBlock rows = row_block(d_rows_);
  int decode_rows = 0;
  for (const SlotChunk& chunk : chunks) decode_rows += chunk.tokens.size() == 1 ? 1 : 0;
  const int n = static_cast<int>(N);
  embed(x_, d_places_, pf(ParamKind::wte), pf(ParamKind::wpe), n, C, stream_);
  residual_layernorm(x_, nullptr, nullptr, pf(ParamKind::ln1_w), pf(ParamKind::ln1_b), h_, nullptr, n, C, false,
                     stream_);
  const int64_t slot_stride = T_ * C_;
  for (int64_t l = 0; l < L_; ++l) {
    bf16* kc = k_cache_ + l * S_ * slot_stride;
    bf16* vc = v_cache_ + l * S_ * slot_stride;
    gemm(qkv_, false, h_, pb(ParamKind::qkv_w) + l * 3 * C_ * C_, N, C_, 3 * C_, 3 * C_);
    split_qkv(q_, kc, vc, qkv_, pf(ParamKind::qkv_b) + l * 3 * C_, d_places_, n, C, slot_stride, stream_);
    if (!all_decode) enqueue_prefill_attention(chunks, kc, vc);
    enqueue_decode_attention(decode_rows, kc, vc, false);
    gemm(y_, false, att_, pb(ParamKind::attn_proj_w) + l * C_ * C_, N, C_, C_, C_);
    residual_layernorm(x_, y_, pf(ParamKind::attn_proj_b) + l * C_, pf(ParamKind::ln2_w) + l * C_,
                       pf(ParamKind::ln2_b) + l * C_, h_, nullptr, n, C, true, stream_);
    if (N > kGemvMaxRows || !gemv(ff_, false, F_, h_, pb(ParamKind::fc_w) + l * F_ * C_, pf(ParamKind::fc_b) + l * F_,
                                  n, C, static_cast<int>(F_), stream_)) {
      gemm(ff_, false, h_, pb(ParamKind::fc_w) + l * F_ * C_, N, C_, F_, F_);
      bias_gelu(ff_, pf(ParamKind::fc_b) + l * F_, N, static_cast<int>(F_), stream_);
    }
    gemm(y_, false, ff_, pb(ParamKind::fc_proj_w) + l * C_ * F_, N, F_, C_, C_);
    if (l + 1 < L_) {
      residual_layernorm(x_, y_, pf(ParamKind::fc_proj_b) + l * C_, pf(ParamKind::ln1_w) + (l + 1) * C_,
                         pf(ParamKind::ln1_b) + (l + 1) * C_, h_, nullptr, n, C, true, stream_);
    } else {
      // Only each chunk's last row goes on to the head.
      residual_layernorm(x_, y_, pf(ParamKind::fc_proj_b) + l * C_, pf(ParamKind::lnf_w), pf(ParamKind::lnf_b), hb_,
                         rows.last, B, C, false, stream_);
    }
  }
  // The tied head over the padded vocabulary (Vp columns; the padding rows of wte are zero
  // and never read as logits).
  gemm(d_logits_, true, hb_, pb(ParamKind::wte), B, C_, Vp_, Vp_);
}

// Per layer: ln1 + qkv + the q/K/V writes, attention (flash-decoding with its combine
// fused; FlashAttention for prefill chunks), proj + bias + residual, ln2 + fc + GELU,
// fc_proj + bias + residual; then lnf + the head + argmax partials for each chunk's last
// row. Each product is one gemv_fused launch. attnproj: a decode step's attention and proj
// in one attention_proj launch. layer3 (a decode step of at most mlp_plan_.rows_max rows):
// attnproj with ln2 + fc + GELU + fc_proj + residual in one mlp_fused launch as well, and
// every LayerNorm from the statistics its residual's writer left (embed, attention_proj,
// mlp_fused), so no kernel reduces over the row: 3 launches a layer, 3 L + 3 a step with the
// sampling (39 for the seed config).
void CudaEngine::enqueue_layers_fused(std::span<const SlotChunk> chunks, int64_t N, bool all_decode) {
  using namespace inference_cuda;
  const RowBlock rows = row_block(d_rows_);
  int decode_rows = 0;
  for (const SlotChunk& chunk : chunks) decode_rows += chunk.tokens.size() == 1 ? 1 : 0;
  const int n = static_cast<int>(N), C = static_cast<int>(C_), F = static_cast<int>(F_);
  const int64_t slot_stride = T_ * C_;
  auto run = [&](FusedGemvParams g, GemvEpilogue e) {
    g.programmatic = pdl_;
    g.wide = gemv_wide_;
    g.mma = gemv_mma_;  // never the head (gemv_mma_taken)
    FLASHGPT_CHECK(gemv_fused(g, e, stream_), "inference (cuda): the fused product ({} rows, {} -> {}) was refused",
                   g.rows, g.in, g.out);
  };
  const bool layer3 = layer3_ && decode_rows == n && n <= mlp_plan_.rows_max;
  // layer3: ln1's and lnf's statistics (C / 32 chunks of 32 columns) from embed and mlp_fused.
  auto ln1_from_stats = [&](FusedGemvParams& g) {
    if (!layer3) return;
    g.ln_stats = ln1_stats_;
    g.ln_parts = C / 32;
    g.ln_width = 32;
  };
  // FLASHGPT_DECODE_L2_AHEAD: what layer l's kernel of a role prefetches, the role's
  // `elems` weights of layer l + 1; after the last layer the head's rows from head_at (its
  // offset in a layer's weights: qkv, proj, fc, fc_proj), cut to the head's size. With
  // FLASHGPT_HEAD_L2_PREFETCH as well, layer L - 2's fc prefetches the head instead.
  auto ahead = [&](ParamKind kind, int64_t elems, int64_t l, int64_t head_at) {
    L2Range r;
    if (!l2_ahead_) return r;
    if (l + 1 < L_) {
      r.ptr = pb(kind) + (l + 1) * elems, r.bytes = 2 * elems;
    } else if (head_at < Vp_ * C_) {
      r.ptr = pb(ParamKind::wte) + head_at, r.bytes = 2 * std::min(elems, Vp_ * C_ - head_at);
    }
    return r;
  };
  const int64_t at_proj = 3 * C_ * C_, at_fc = 4 * C_ * C_, at_fcp = at_fc + F_ * C_;
  embed_fused(x_, d_places_, pf(ParamKind::wte), pf(ParamKind::wpe), n, C, pdl_, stream_,
              layer3 ? ln1_stats_ : nullptr);
  for (int64_t l = 0; l < L_; ++l) {
    bf16* kc = k_cache_ + l * S_ * slot_stride;
    bf16* vc = v_cache_ + l * S_ * slot_stride;
    FusedGemvParams qkv;
    qkv.x_f32 = x_, qkv.ln_w = pf(ParamKind::ln1_w) + l * C_, qkv.ln_b = pf(ParamKind::ln1_b) + l * C_;
    ln1_from_stats(qkv);
    qkv.w = pb(ParamKind::qkv_w) + l * 3 * C_ * C_, qkv.rows = n, qkv.in = C, qkv.out = 3 * C;
    qkv.bias = pf(ParamKind::qkv_b) + l * 3 * C_;
    qkv.q = q_, qkv.k_cache = kc, qkv.v_cache = vc, qkv.places = d_places_, qkv.slot_stride = slot_stride;
    qkv.l2_prefetch = ahead(ParamKind::qkv_w, 3 * C_ * C_, l, 0);
    run(qkv, GemvEpilogue::qkv_cache);
    if (attn_proj_ && decode_rows == n) {
      AttentionProjParams ap;
      ap.q = q_, ap.k_cache = kc, ap.v_cache = vc, ap.q_rows = rows.q_rows, ap.slots = rows.slots;
      ap.lengths = rows.lengths, ap.w = pb(ParamKind::attn_proj_w) + l * C_ * C_;
      ap.bias = pf(ParamKind::attn_proj_b) + l * C_, ap.residual = x_, ap.partials = ap_partials_;
      ap.counters = ap_counters_, ap.rows = n, ap.heads = static_cast<int>(NH_), ap.head_dim = static_cast<int>(HD_);
      ap.C = C, ap.max_length = static_cast<int>(T_), ap.slot_stride = slot_stride, ap.programmatic = pdl_;
      ap.col_blocks = ap_cols_override_ > 0 ? ap_cols_override_ : attention_proj_col_blocks(n, ap.heads);
      ap.l2_prefetch = ahead(ParamKind::attn_proj_w, C_ * C_, l, at_proj);
      if (layer3) ap.ln_stats = ln2_stats_;  // ln2's statistics, one pair per column block
      attention_proj(ap, stream_);
      if (layer3) {
        MlpParams m;
        m.x = x_, m.ln_w = pf(ParamKind::ln2_w) + l * C_, m.ln_b = pf(ParamKind::ln2_b) + l * C_;
        m.ln_stats = ln2_stats_, m.ln_parts = ap.col_blocks, m.ln_width = (C + ap.col_blocks - 1) / ap.col_blocks;
        m.fc_w = pb(ParamKind::fc_w) + l * F_ * C_, m.fc_b = pf(ParamKind::fc_b) + l * F_;
        m.fcp_w = pb(ParamKind::fc_proj_w) + l * C_ * F_, m.fcp_b = pf(ParamKind::fc_proj_b) + l * C_;
        m.partials = mlp_partials_, m.arrive = mlp_arrive_, m.stats_out = ln1_stats_;
        m.rows = n, m.C = C, m.F = F, m.programmatic = pdl_;
        m.l2_prefetch[0] = ahead(ParamKind::fc_w, F_ * C_, l, at_fc);
        m.l2_prefetch[1] = ahead(ParamKind::fc_proj_w, C_ * F_, l, at_fcp);
        mlp_fused(m, mlp_plan_, stream_);
        continue;
      }
    } else {
      if (!all_decode) enqueue_prefill_attention(chunks, kc, vc);
      enqueue_decode_attention(decode_rows, kc, vc, true);
      FusedGemvParams proj;
      proj.x_bf16 = att_, proj.w = pb(ParamKind::attn_proj_w) + l * C_ * C_, proj.rows = n, proj.in = C, proj.out = C;
      proj.bias = pf(ParamKind::attn_proj_b) + l * C_, proj.residual = x_;
      proj.l2_prefetch = ahead(ParamKind::attn_proj_w, C_ * C_, l, at_proj);
      run(proj, GemvEpilogue::residual);
    }
    FusedGemvParams fc;
    fc.x_f32 = x_, fc.ln_w = pf(ParamKind::ln2_w) + l * C_, fc.ln_b = pf(ParamKind::ln2_b) + l * C_;
    fc.w = pb(ParamKind::fc_w) + l * F_ * C_, fc.rows = n, fc.in = C, fc.out = F;
    fc.bias = pf(ParamKind::fc_b) + l * F_, fc.y = ff_, fc.ldy = F_;
    fc.l2_prefetch = ahead(ParamKind::fc_w, F_ * C_, l, at_fc);
    if (head_l2_bytes_ > 0 && l == std::max<int64_t>(0, L_ - 2)) fc.l2_prefetch = {pb(ParamKind::wte), head_l2_bytes_};
    run(fc, GemvEpilogue::bias_gelu);
    FusedGemvParams fc2;
    fc2.x_bf16 = ff_, fc2.w = pb(ParamKind::fc_proj_w) + l * C_ * F_, fc2.rows = n, fc2.in = F, fc2.out = C;
    fc2.bias = pf(ParamKind::fc_proj_b) + l * C_, fc2.residual = x_;
    fc2.l2_prefetch = ahead(ParamKind::fc_proj_w, C_ * F_, l, at_fcp);
    run(fc2, GemvEpilogue::residual);
  }
  FusedGemvParams head;
  head.x_f32 = x_, head.ln_w = pf(ParamKind::lnf_w), head.ln_b = pf(ParamKind::lnf_b), head.row_index = rows.last;
  head.w = pb(ParamKind::wte), head.rows = static_cast<int>(chunks.size()), head.in = C, head.out = static_cast<int>(Vp_);
  head.y = d_logits_, head.ldy = Vp_, head.part_val = part_val_, head.part_idx = part_idx_;
  head.valid_out = static_cast<int>(V_);
  ln1_from_stats(head);
  run(head, GemvEpilogue::logits_argmax);
  head_fused_ = true;
  head_parts_now_ = head_parts_;
  head_cooperative_ = false;
}

void CudaEngine::enqueue_persistent(std::span<const SlotChunk> chunks, int64_t N) {
  using namespace inference_cuda;
  PersistentDecodeParams p;
  p.qkv_w = pb(ParamKind::qkv_w), p.proj_w = pb(ParamKind::attn_proj_w), p.fc_w = pb(ParamKind::fc_w);
  p.fcp_w = pb(ParamKind::fc_proj_w);
  p.qkv_b = pf(ParamKind::qkv_b), p.proj_b = pf(ParamKind::attn_proj_b), p.fc_b = pf(ParamKind::fc_b);
  p.fcp_b = pf(ParamKind::fc_proj_b);
  p.ln1_w = pf(ParamKind::ln1_w), p.ln1_b = pf(ParamKind::ln1_b), p.ln2_w = pf(ParamKind::ln2_w);
  p.ln2_b = pf(ParamKind::ln2_b);
  p.wte = pf(ParamKind::wte), p.wpe = pf(ParamKind::wpe), p.places = d_places_;
  p.x = x_, p.q = q_, p.att = att_, p.ff = ff_, p.k_cache = k_cache_, p.v_cache = v_cache_;
  p.slot_stride = T_ * C_, p.layer_stride = S_ * T_ * C_;
  p.rows = static_cast<int>(N), p.C = static_cast<int>(C_), p.F = static_cast<int>(F_), p.L = static_cast<int>(L_);
  p.heads = static_cast<int>(NH_), p.head_dim = static_cast<int>(HD_), p.max_length = static_cast<int>(T_);
  p.trace = d_trace_;
  if (persistent_head_) {
    p.head_w = pb(ParamKind::wte), p.lnf_w = pf(ParamKind::lnf_w), p.lnf_b = pf(ParamKind::lnf_b);
    p.logits = d_logits_, p.ldl = Vp_, p.part_val = part_val_, p.part_idx = part_idx_;
    p.head_rows = static_cast<int>(Vp_), p.valid_out = static_cast<int>(V_);
    persistent_decode(p, plan_, stream_);
    head_fused_ = true;
    head_parts_now_ = plan_.grid;
    head_cooperative_ = true;  // sampling then launches without programmatic dependence
    return;
  }
  persistent_decode(p, plan_, stream_);
  // The head as on the fused path; launched without programmatic dependence on the
  // cooperative kernel (its blocks could not start early anyway: the persistent grid
  // holds every multiprocessor's shared memory).
  const RowBlock rows = row_block(d_rows_);
  FusedGemvParams head;
  head.x_f32 = x_, head.ln_w = pf(ParamKind::lnf_w), head.ln_b = pf(ParamKind::lnf_b), head.row_index = rows.last;
  head.w = pb(ParamKind::wte), head.rows = static_cast<int>(chunks.size()), head.in = static_cast<int>(C_);
  head.out = static_cast<int>(Vp_), head.y = d_logits_, head.ldy = Vp_, head.part_val = part_val_;
  head.part_idx = part_idx_, head.valid_out = static_cast<int>(V_), head.programmatic = false;
  FLASHGPT_CHECK(gemv_fused(head, GemvEpilogue::logits_argmax, stream_),
                 "inference (cuda): the fused head ({} rows, {} -> {}) was refused", head.rows, head.in, head.out);
  head_fused_ = true;
  head_parts_now_ = head_parts_;
  head_cooperative_ = false;
}

void CudaEngine::print_trace() const {
  std::vector<long long> t(static_cast<size_t>(trace_len_));
  if (cudaStreamSynchronize(stream_) != cudaSuccess ||
      cudaMemcpy(t.data(), d_trace_, t.size() * sizeof(long long), cudaMemcpyDeviceToHost) != cudaSuccess || t[0] == 0) {
    return;
  }
  int device = 0, khz = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device);
  const double us = khz > 0 ? 1e3 / khz : 0.0;  // per cycle
  // Phases in order qkv attn proj fc fc_proj per layer; a barrier precedes every phase but
  // layer 0's qkv. t: start, (arrive, leave) per barrier, end.
  const char* names[5] = {"ln1+qkv", "attention", "proj", "ln2+fc", "fc_proj"};
  double work[5] = {}, wait[5] = {};
  long long prev = t[0];
  int k = 1;
  for (int64_t ph = 0; ph < 5 * L_; ++ph) {
    const int type = static_cast<int>(ph % 5);
    if (ph > 0) {
      work[(type + 4) % 5] += static_cast<double>(t[k] - prev);
      wait[type] += static_cast<double>(t[k + 1] - t[k]);
      prev = t[k + 1];
      k += 2;
    }
  }
  work[4] += static_cast<double>(t[k] - prev);
  double head_wait = 0, head_work = 0;
  if (persistent_head_) {
    head_wait = static_cast<double>(t[k + 1] - t[k]), head_work = static_cast<double>(t[k + 2] - t[k + 1]);
    k += 2;
  }
  std::fprintf(stderr, "persistent trace (block 0, last step, %d layers, us summed over layers): ", static_cast<int>(L_));
  for (int i = 0; i < 5; ++i) std::fprintf(stderr, "%s work %.1f wait %.1f; ", names[i], work[i] * us, wait[i] * us);
  if (persistent_head_) std::fprintf(stderr, "lnf+head work %.1f wait %.1f; ", head_work * us, head_wait * us);
  std::fprintf(stderr, "total %.1f us (%lld cycles at %d kHz)\n", static_cast<double>(t[k] - t[0]) * us, t[k] - t[0],
               khz);
}

void CudaEngine::enqueue_sample(int B) {
  const RowBlock rows = row_block(d_rows_);
  inference_cuda::sample(d_tokens_, d_logits_, Vp_, static_cast<int>(V_), B,
                         reinterpret_cast<const SampleParams*>(d_rows_), rows.prompt_index, rows.step, stream_,
                         head_fused_ ? part_val_ : nullptr, head_fused_ ? part_idx_ : nullptr, head_parts_now_,
                         head_fused_ && pdl_ && !head_cooperative_);
  FLASHGPT_CUDA_CHECK(cudaMemcpyAsync(h_tokens_, d_tokens_, B * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
}

void CudaEngine::forward(std::span<const SlotChunk> chunks, std::span<float> logits_out) {
  const auto B = static_cast<int64_t>(chunks.size());
  FLASHGPT_CHECK(static_cast<int64_t>(logits_out.size()) == B * V_,
                 "inference (cuda): logits_out has {} floats, {} chunks x V {} need {}", logits_out.size(), B, V_,
                 B * V_);
  const int64_t N = stage(chunks);
  if (B == 0) return;
  enqueue_model(chunks, N, false);
  FLASHGPT_CUDA_CHECK(cudaMemcpy2DAsync(logits_out.data(), V_ * sizeof(float), d_logits_, Vp_ * sizeof(float),
                                        V_ * sizeof(float), B, cudaMemcpyDeviceToHost, stream_));
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (const SlotChunk& chunk : chunks) lengths_[chunk.slot] += static_cast<int64_t>(chunk.tokens.size());
}

void CudaEngine::forward_sample(std::span<const SlotChunk> chunks, const SamplingConfig& sampling,
                                std::span<const uint64_t> prompt_index, std::span<const uint64_t> step,
                                std::span<TokenId> tokens_out) {
  sampling_validate(sampling);
  const auto B = static_cast<int64_t>(chunks.size());
  FLASHGPT_CHECK(static_cast<int64_t>(prompt_index.size()) == B && static_cast<int64_t>(step.size()) == B &&
                     static_cast<int64_t>(tokens_out.size()) == B,
                 "forward_sample: {} chunks but {} prompt indices, {} steps, {} outputs", B, prompt_index.size(),
                 step.size(), tokens_out.size());
  const int64_t N = stage(chunks);
  if (B == 0) return;
  auto* params = reinterpret_cast<SampleParams*>(h_rows_);
  params->greedy = sampling.greedy ? 1 : 0;
  params->temperature = sampling.temperature;
  params->top_k = static_cast<int32_t>(std::min<int64_t>(sampling.top_k, V_));
  params->top_p = sampling.top_p;
  params->seed = sampling.seed;
  const RowBlock rows = row_block(h_rows_);
  for (int64_t b = 0; b < B; ++b) rows.prompt_index[b] = prompt_index[b], rows.step[b] = step[b];
  const bool all_decode = N == B;
  if (all_decode) {
    auto it = graphs_.find(static_cast<int>(B));
    if (it == graphs_.end()) {
      cudaGraph_t graph = nullptr;
      FLASHGPT_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      try {
        enqueue_model(chunks, N, true);
        enqueue_sample(static_cast<int>(B));
      } catch (...) {
        cudaStreamEndCapture(stream_, &graph);
        if (graph) cudaGraphDestroy(graph);
        throw;
      }
      FLASHGPT_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
      if (const char* v = std::getenv("FLASHGPT_GRAPH_NODES"); v && std::string(v) == "1") {
        // The launches a decode step makes (kernels, copies), counted in the captured graph.
        size_t count = 0;
        cudaGraphGetNodes(graph, nullptr, &count);
        std::vector<cudaGraphNode_t> nodes(count);
        cudaGraphGetNodes(graph, nodes.data(), &count);
        int kernels = 0, copies = 0;
        for (cudaGraphNode_t node : nodes) {
          cudaGraphNodeType type{};
          cudaGraphNodeGetType(node, &type);
          kernels += type == cudaGraphNodeTypeKernel ? 1 : 0;
          copies += type == cudaGraphNodeTypeMemcpy ? 1 : 0;
        }
        std::fprintf(stderr, "decode graph, batch %d: %d kernel launches, %d copies, %zu nodes\n", static_cast<int>(B),
                     kernels, copies, count);
      }
      cudaGraphExec_t exec = nullptr;
      const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      FLASHGPT_CUDA_CHECK(status);
      it = graphs_.emplace(static_cast<int>(B), exec).first;
    }
    FLASHGPT_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  } else {
    enqueue_model(chunks, N, false);
    enqueue_sample(static_cast<int>(B));
  }
  FLASHGPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (int64_t b = 0; b < B; ++b) tokens_out[b] = static_cast<TokenId>(h_tokens_[b]);
  for (const SlotChunk& chunk : chunks) lengths_[chunk.slot] += static_cast<int64_t>(chunk.tokens.size());
}

}  // namespace

std::unique_ptr<InferenceEngine> inference_create_cuda(const ModelConfig& config, std::span<const float> params,
                                                       const InferenceOptions& options) {
  return std::make_unique<CudaEngine>(config, params, options);
}

double inference_cuda_copy_bandwidth(size_t bytes) {
  FLASHGPT_CHECK(inference_cuda_available(), "inference: no CUDA device to measure the copy bandwidth of");
  void *a = nullptr, *b = nullptr;
  FLASHGPT_CUDA_CHECK(cudaMalloc(&a, bytes));
  FLASHGPT_CUDA_CHECK(cudaMalloc(&b, bytes));
  cudaEvent_t start, stop;
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&start));
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&stop));
  FLASHGPT_CUDA_CHECK(cudaMemset(a, 1, bytes));
  float best = 1e30f;
  for (int i = 0; i < 6; ++i) {
    FLASHGPT_CUDA_CHECK(cudaEventRecord(start));
    FLASHGPT_CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    FLASHGPT_CUDA_CHECK(cudaEventRecord(stop));
    FLASHGPT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    FLASHGPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i > 0) best = std::min(best, ms);  // the first is a warm-up
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (best * 1e-3);
}

bool inference_cuda_supports(const ModelConfig& c) {
  const int64_t hd = c.n_head > 0 ? c.d_model / c.n_head : 0;
  return inference_cuda_available() && (hd == 32 || hd == 64 || hd == 96 || hd == 128) &&
         attention_cuda_head_dim_compiled(static_cast<int>(hd)) && c.d_model % 8 == 0 && c.d_ff % 8 == 0 &&
         c.d_model <= 2048;
}

bool inference_cuda_available() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

}  // namespace flashgpt
