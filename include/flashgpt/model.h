// The GPT-3-style decoder: its configuration and presets, the layout of its parameters,
// and the interface every backend (the fp32 CPU reference, the bf16 CUDA implementation)
// offers the trainer, checkpoints, generation and the Hugging Face export.
//
// The model (GPT-2/3 "small" shape, pre-LayerNorm):
//   x = dropout(wte[tokens] + wpe[positions])                          // (B, T, C)
//   for each of L blocks:
//     a = attention(ln1(x) Wqkv^T + bqkv)  causal, dropout on P         // (B, T, C)
//     x = x + dropout(a Wproj^T + bproj)
//     h = gelu_tanh(ln2(x) Wfc^T + bfc)                                 // (B, T, F)
//     x = x + dropout(h Wfcproj^T + bfcproj)
//   logits = lnf(x) wte^T                                                // (B, T, Vp), tied head
// Logits of the padding rows (V <= v < Vp) are never predicted: the loss and sampling see
// only the first V columns.
//
// Conventions shared by every backend, so that checkpoints, tests and the export agree:
// - Linear weights are (out, in), row-major, y = x W^T + b (torch.nn.Linear's layout).
// - The qkv projection's 3C outputs are [q | k | v], each C = NH * HD wide, head h at
//   columns h*HD .. h*HD + HD - 1 of its part.
// - LayerNorm eps is 1e-5; GELU is the tanh approximation.
// - All parameters live in one contiguous fp32 buffer in model_param_specs() order; each
//   per-layer kind is stacked over layers (L, ...), so one offset reaches layer l.
#pragma once

#include <flashgpt/tokenizer.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

inline constexpr int64_t kVocabPadMultiple = 128;
inline constexpr float kLayerNormEps = 1e-5f;

struct ModelConfig {
  std::string preset;             // the name it was made from, or "custom"
  int64_t vocab_size = 0;         // V: the tokenizer's (100,277 for cl100k_base)
  int64_t padded_vocab_size = 0;  // Vp: V rounded up to a multiple of kVocabPadMultiple
  int64_t context = 512;          // T_max: rows of the position table
  int64_t d_model = 768;          // C
  int64_t n_layer = 12;           // L
  int64_t n_head = 12;            // NH; head dim HD = C / NH
  int64_t d_ff = 3072;            // F
  float dropout = 0.1f;           // embedding, attention-probability and residual dropout

  int64_t head_dim() const { return d_model / n_head; }
};

// V rounded up to a multiple of kVocabPadMultiple.
int64_t model_padded_vocab(int64_t vocab_size);
// "seed" (C 768, L 12, NH 12, F 3072, T 512, dropout 0.1) and small ones for the CPU and
// tests ("tiny", "small"; model_preset_names() lists them). Throws naming the choices
// for an unknown name.
ModelConfig model_preset(std::string_view name, int64_t vocab_size);
std::vector<std::string> model_preset_names();
// Throws flashgpt::Error naming the first problem (non-positive sizes, C % NH != 0, a
// head dim no attention kernel supports, dropout outside [0, 1), Vp inconsistent with V).
void model_config_validate(const ModelConfig& config);

enum class ParamKind {
  wte,          // (Vp, C)
  wpe,          // (T_max, C)
  ln1_w,        // (L, C)
  ln1_b,        // (L, C)
  qkv_w,        // (L, 3C, C)
  qkv_b,        // (L, 3C)
  attn_proj_w,  // (L, C, C)
  attn_proj_b,  // (L, C)
  ln2_w,        // (L, C)
  ln2_b,        // (L, C)
  fc_w,         // (L, F, C)
  fc_b,         // (L, F)
  fc_proj_w,    // (L, C, F)
  fc_proj_b,    // (L, C)
  lnf_w,        // (C)
  lnf_b,        // (C)
};
inline constexpr int kParamKinds = 16;

struct ParamSpec {
  ParamKind kind;
  std::string name;            // "wte", "qkv_w", ...: the safetensors tensor name
  std::vector<int64_t> shape;  // as in the ParamKind comments
  int64_t offset = 0;          // in floats, into the one parameter buffer
  int64_t numel = 0;
  bool weight_decay = false;   // AdamW decays the matrices (wte, wpe and the four linear weights) only
};

// The kParamKinds tensors in enum order, packed without gaps.
std::vector<ParamSpec> model_param_specs(const ModelConfig& config);
int64_t model_param_count(const ModelConfig& config);
// Parameters as a paper counts them: without the padding rows of wte.
int64_t model_param_count_unpadded(const ModelConfig& config);
// Training FLOPs per token: 6 N (N without wpe and the padding rows) plus the attention's
// 12 L T C per token at context T (causal halving not taken).
double model_train_flops_per_token(const ModelConfig& config, int64_t context);

// GPT-2 initialisation from a Philox stream keyed by seed (the same values on every
// backend and thread count): weights N(0, 0.02), the two residual projections
// (attn_proj_w, fc_proj_w) N(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm weights 1 and
// biases 0, wte's padding rows 0.
void model_init_params(const ModelConfig& config, uint64_t seed, std::span<float> params);

struct AdamWConfig {
  double lr = 1e-4;
  double beta1 = 0.9, beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled; applied to ParamSpec::weight_decay tensors
};

// Where a backend runs.
enum class Device { cpu, cuda };

// Dropout masks outside the attention kernel (embedding and the two residual sites of
// each layer) come from Philox keyed by (seed, step): channel c of token n = b T + t at
// site s is kept when dropout_keep(DropoutRng{seed, step}, s, n, c, threshold) (philox.h),
// with s = 0 for the embedding and 1 + 2 l, 2 + 2 l for layer l's attention and MLP
// residual; the attention probabilities of layer l use DropoutRng{seed ^ 0x5bd1e995, step
// * L + l} inside the attention kernel. So the CPU and CUDA backends drop the same elements.
struct StepRng {
  uint64_t seed = 0;
  uint64_t step = 0;
};

// A model on one backend: fp32 master weights, gradients and AdamW moments live there.
// One call per micro-batch; no allocation after construction except where noted.
class GptModel {
 public:
  virtual ~GptModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual Device device() const = 0;

  // Host copies of the fp32 master weights and the AdamW moments, model_param_count()
  // floats each (checkpoints, the export, tests). A model whose moments are sharded
  // (adam_state_shard) reads and writes only its range [begin, end) of the moment spans and
  // leaves the rest of them alone.
  virtual void params_get(std::span<float> out) const = 0;
  virtual void params_set(std::span<const float> in) = 0;
  virtual void adam_state_get(std::span<float> m, std::span<float> v) const = 0;
  virtual void adam_state_set(std::span<const float> m, std::span<const float> v) = 0;
  virtual void grads_get(std::span<float> out) const = 0;

  // windows: (B, T + 1) token ids; inputs are columns 0..T-1, targets 1..T. Runs the
  // forward and backward with dropout (if the config has it and `train` mode), adds the
  // gradient of mean_loss * loss_scale into the gradient buffer, and returns the mean
  // cross-entropy over the B T targets (before loss_scale). T <= context.
  virtual double forward_backward(std::span<const TokenId> windows, int64_t B, int64_t T, StepRng rng,
                                  float loss_scale) = 0;
  // The mean loss without dropout and without touching gradients (validation).
  virtual double forward_loss(std::span<const TokenId> windows, int64_t B, int64_t T) = 0;
  // logits_out: (B, T, V) fp32 logits of the inputs (B, T), no dropout (tests, export
  // checks, uncached generation).
  virtual void forward_logits(std::span<const TokenId> inputs, int64_t B, int64_t T,
                              std::span<float> logits_out) = 0;

  virtual void grads_zero() = 0;
  // The global L2 norm of the gradient buffer.
  virtual double grads_norm() = 0;
  // One AdamW update with bias correction at step t (1-based), on grads * grad_scale
  // (grad_scale folds clipping and 1 / accumulation steps).
  virtual void adamw_step(const AdamWConfig& adam, int64_t t, float grad_scale) = 0;

  // ---- Data-parallel training (train_data_parallel.h); a backend without them cannot be
  // trained on several ranks (the defaults throw, or do nothing where that is correct).
  //
  // The flat fp32 parameter and gradient buffers where the backend keeps them (host memory
  // on the CPU, device memory on CUDA; model_param_count floats in model_param_specs order),
  // and the stream their work is ordered on (a cudaStream_t; null on the CPU), so that a
  // communicator reduces gradients and gathers parameters in place.
  struct FlatBuffers {
    float* params = nullptr;
    float* grads = nullptr;
    void* stream = nullptr;
  };
  virtual FlatBuffers flat_buffers();
  // The parameters in flat_buffers().params were written from outside: refresh what the
  // backend derives from them (the bf16 weights on CUDA).
  virtual void params_changed() {}
  // adamw_step on the range [begin, end) of the flat buffers only (ZeRO-1: each rank updates
  // its slice); the moments and weights outside it are left alone. Over [0, P) it is
  // adamw_step, bit for bit.
  virtual void adamw_step_range(const AdamWConfig& adam, int64_t t, float grad_scale, int64_t begin, int64_t end);
  // Called by forward_backward, in the order the backward finishes them, with each range
  // [begin, end) of the gradient buffer that this micro-batch will not write again (a
  // layer's tensors as its backward ends, the embeddings last), so that the reduction of a
  // bucket can start while the backward goes on. Empty: no calls. The CPU backend calls it
  // once the range holds its values; the CUDA backend as it enqueues the backward: the range
  // is final once the work enqueued so far on flat_buffers().stream has run (a reduction
  // ordered after an event recorded there may start). While a hook is set the CUDA step runs
  // eagerly (no graph).
  using GradReadyHook = std::function<void(int64_t begin, int64_t end)>;
  virtual void grad_ready_hook_set(GradReadyHook hook) { (void)hook; }
  // ZeRO-1's memory saving: keep the AdamW moments of [begin, end) of the flat buffers only,
  // in buffers of end - begin floats each (the full-size ones are freed). The moments kept
  // are reset to zero: set them (adam_state_set) after sharding. adamw_step_range then takes
  // ranges inside [begin, end) only, and adamw_step needs the full range. The default
  // accepts only the full range (a backend that cannot shard).
  virtual void adam_state_shard(int64_t begin, int64_t end);

  // What the backend allocated for the model (device memory on CUDA, host memory on the CPU),
  // so that tests and the trainer can state the memory ZeRO-1 saves.
  struct MemoryReport {
    int64_t adam_begin = 0, adam_end = 0;  // the moments held: [adam_begin, adam_end) of the flat buffers
    size_t adam_bytes = 0;                 // the two moment buffers, allocated
    size_t total_bytes = 0;                // every model buffer (weights, gradients, moments, activations)
  };
  virtual MemoryReport memory_report() const;
};

struct ModelOptions {
  int64_t max_batch = 8;       // B the activations are sized for
  int64_t max_context = 0;     // T they are sized for; 0: config.context
  bool deterministic = false;  // CUDA: bit-identical results run to run
  int threads = 0;             // CPU: OpenMP threads, 0 = all cores
  // CUDA: replay forward_backward as captured CUDA graphs (one per batch shape and loss
  // scale) instead of launching ~350 kernels per step; the results are the same bits.
  // The environment variable FLASHGPT_CUDA_GRAPH=0 turns it off too.
  bool cuda_graph = true;
  // ZeRO-1: allocate the AdamW moments for [adam_begin, adam_end) of the flat buffers only
  // (adam_state_shard at construction, so the full-size moments are never allocated).
  // adam_end == 0: all of them.
  int64_t adam_begin = 0, adam_end = 0;
};

// The fp32 CPU reference backend (OpenMP; BLAS for the matmuls where built with it).
std::unique_ptr<GptModel> gpt_create_cpu(const ModelConfig& config, const ModelOptions& options);
// The bf16 CUDA backend. Throws flashgpt::Error on a build without CUDA or with no GPU.
std::unique_ptr<GptModel> gpt_create_cuda(const ModelConfig& config, const ModelOptions& options);
std::unique_ptr<GptModel> gpt_create(Device device, const ModelConfig& config, const ModelOptions& options);

}  // namespace flashgpt
