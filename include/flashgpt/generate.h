// Generation: a KV-cached inference engine, sampling, stop sequences and streamed text.
//
// The engine keeps, per layer, K and V caches of shape (S, T_max, C) for S slots (rows):
// slot s holds the keys and values of its tokens at positions 0 .. length(s) - 1, head h at
// columns h*HD .. h*HD + HD - 1 (the qkv layout of model.h). Prompts of different lengths
// share a batch through per-slot lengths (no padding): a token's position is its index in
// its own slot, so the learned position table sees exactly what training saw.
//
// One call, InferenceEngine::forward, appends a chunk of tokens to each of some slots and
// returns the logits of each chunk's last token: a prefill is a chunk of a whole prompt, a
// decode step a chunk of one token, and one call may mix both (a finished row's slot is
// refilled with the next prompt while the others decode). Within a chunk the attention is
// causal over the slot's cached keys and the chunk's own.
//
// generate() drives an engine: it tokenizes the prompts, keeps every slot busy, samples
// (greedy, or temperature -> top-k -> top-p, Philox keyed by (seed, prompt index, step) so
// a prompt's output does not depend on the batch it ran in), stops rows at <|endoftext|>,
// at a stop string or at the token limit, and streams text that never ends inside a UTF-8
// character or inside a possible stop string.
#pragma once

#include <flashgpt/model.h>
#include <flashgpt/tokenizer.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flashgpt {

// ---------------------------------------------------------------------------------------
// The engine.

struct SamplingConfig;

// Tokens appended to one slot by one forward call.
struct SlotChunk {
  int64_t slot = 0;
  std::span<const TokenId> tokens;  // at least one; every id below the config's V
};

class InferenceEngine {
 public:
  virtual ~InferenceEngine() = default;
  virtual const ModelConfig& config() const = 0;
  virtual int64_t max_slots() const = 0;    // S
  virtual int64_t max_context() const = 0;  // T_max <= config().context
  // Tokens cached in `slot`.
  virtual int64_t length(int64_t slot) const = 0;
  // Forgets a slot's tokens (length 0).
  virtual void reset(int64_t slot) = 0;
  // Appends each chunk to its slot's cache (slots distinct; length + chunk <= T_max) and
  // writes the logits of each chunk's last token to logits_out: (chunks.size(), V) fp32, V
  // the real vocabulary (the padding rows are never computed).
  virtual void forward(std::span<const SlotChunk> chunks, std::span<float> logits_out) = 0;
  // forward(), then draws the next token of each chunk as sampling_draw(logits of chunk b,
  // sampling, prompt_index[b], step[b]) would (spans of chunks.size()). The default runs
  // forward() and samples on the host; the CUDA engine samples on the GPU, so only the
  // tokens cross to the host.
  virtual void forward_sample(std::span<const SlotChunk> chunks, const SamplingConfig& sampling,
                              std::span<const uint64_t> prompt_index, std::span<const uint64_t> step,
                              std::span<TokenId> tokens_out);
};

struct InferenceOptions {
  int64_t max_slots = 8;    // rows that can be in flight at once
  int64_t max_context = 0;  // T_max; 0: config.context
  int threads = 0;          // OpenMP threads; 0: all cores
};

// The fp32 CPU engine on the flat parameter buffer of model.h (model_param_count floats,
// copied). Prefill attention runs through the training attention (attention_forward_cpu,
// causal, over the slot's cache); a decode step of one token per slot runs a one-row
// attention over the cache, parallel over (slot, head).
std::unique_ptr<InferenceEngine> inference_create_cpu(const ModelConfig& config, std::span<const float> params,
                                                      const InferenceOptions& options);

// The bf16 CUDA engine (src/generate/inference_cuda.cc, docs/generate.md): the same model
// on the GPU, weights converted to bf16 for the matmuls (LayerNorm, biases, embeddings and
// the residual stream in fp32), K/V caches in bf16. Prefill runs our FlashAttention
// forward (causal, over the slot's cache); a step of one-token chunks runs the
// flash-decoding kernel (attention_decode_split_reference is its CPU reference) and, once
// per batch size, is captured as a CUDA graph replayed with no allocation. Sampling runs on
// the GPU. Throws where there is no CUDA device or the build has no CUDA.
std::unique_ptr<InferenceEngine> inference_create_cuda(const ModelConfig& config, std::span<const float> params,
                                                       const InferenceOptions& options);
// Whether this build has CUDA and a device is present (for --device auto).
bool inference_cuda_available();
// Whether the CUDA engine takes this model in this build (a GPU present, the head dim's
// attention kernels compiled, d_model and d_ff multiples of 8, d_model <= 2048).
bool inference_cuda_supports(const ModelConfig& config);
// "cpu", "cuda", or "auto": cuda where inference_cuda_available() (and, given a config,
// inference_cuda_supports it), else cpu; throws naming the choices for anything else.
std::string inference_resolve_device(std::string_view device, const ModelConfig* config = nullptr);
// The engine of inference_resolve_device(device, &config).
std::unique_ptr<InferenceEngine> inference_create(std::string_view device, const ModelConfig& config,
                                                  std::span<const float> params, const InferenceOptions& options);
// The device-to-device copy bandwidth of the current GPU in bytes per second (bytes read
// plus bytes written over the time of a cudaMemcpy of `bytes`, best of a few); throws
// without CUDA. The denominator of the decode benchmark's memory-bandwidth bound.
double inference_cuda_copy_bandwidth(size_t bytes);

// The one-row attention of the CPU decode step, exposed for its test: for each of `rows`
// query rows (rows, NH, HD) and the keys and values of its slot (K/V rows of stride
// row_stride floats, head h at offset h*HD), o = softmax(scale q k^T) v over keys
// 0 .. lengths[r] - 1. k and v point at slot 0; slot r's rows start slot_stride floats
// further per slot index slots[r].
struct DecodeAttentionParams {
  const float* q = nullptr;  // (rows, NH, HD)
  const float* k = nullptr;
  const float* v = nullptr;
  float* o = nullptr;  // (rows, NH, HD)
  int64_t rows = 0, heads = 0, head_dim = 0;
  int64_t row_stride = 0;   // floats between consecutive positions of a slot (C)
  int64_t slot_stride = 0;  // floats between slots (T_max C)
  const int64_t* slots = nullptr;    // (rows)
  const int64_t* lengths = nullptr;  // (rows): keys attended, >= 1
  int threads = 0;
};
void attention_decode_cpu(const DecodeAttentionParams& params);

// The flash-decoding algorithm of the CUDA decode kernel, written plainly on the CPU as its
// reference: each (row, head) splits its keys into blocks of keys_per_split; block s
// computes m_s = max score, l_s = sum exp(score - m_s) and o_s = sum exp(score - m_s) v;
// the blocks combine as o = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s, M = max m_s.
// Same parameters and result as attention_decode_cpu (threads ignored).
void attention_decode_split_reference(const DecodeAttentionParams& params, int64_t keys_per_split);

// ---------------------------------------------------------------------------------------
// Sampling.

struct SamplingConfig {
  bool greedy = false;       // argmax (lowest id on a tie); the rest is ignored
  float temperature = 1.0f;  // > 0; logits are divided by it
  int64_t top_k = 0;         // keep the k most likely tokens; 0: all
  float top_p = 1.0f;        // keep the smallest most-likely set whose mass reaches p; 1: all
  uint64_t seed = 0;
};
// Throws naming the first bad value (temperature <= 0, top_k < 0, top_p outside (0, 1]).
void sampling_validate(const SamplingConfig& config);

// The tokens a sampler may return from these logits (V values): after temperature, the
// top_k most likely, then the smallest set of the most likely whose probability reaches
// top_p (ties broken by lower id). Sorted by id. Greedy: the argmax alone.
std::vector<TokenId> sampling_allowed_set(std::span<const float> logits, const SamplingConfig& config);

// Draws one token from logits (V values) for (prompt index, step): the same inputs give
// the same token on any machine and in any batch. `scratch` is reused between calls.
TokenId sampling_draw(std::span<const float> logits, const SamplingConfig& config, uint64_t prompt_index,
                      uint64_t step, std::vector<std::pair<float, TokenId>>& scratch);

// ---------------------------------------------------------------------------------------
// Text: streaming with stop strings.

// Turns one row's generated tokens into streamed text: complete UTF-8 characters only, a
// tail that could be the start of a stop string held back until it is known not to be
// one, and the text before the first stop string as the final output.
class StopStreamer {
 public:
  StopStreamer(const Tokenizer& tokenizer, std::vector<std::string> stops);
  // Text that can be shown now (maybe empty). Once stopped() is true, push returns nothing.
  std::string push(TokenId token);
  // The rest at the end of the row: held-back text (an incomplete character as U+FFFD),
  // cut before a stop string if one completes.
  std::string finish();
  bool stopped() const { return stopped_; }
  const std::string& text() const { return text_; }  // everything shown so far

 private:
  std::string release(bool final);
  StreamingDecoder decoder_;
  std::vector<std::string> stops_;
  std::string held_;
  std::string text_;
  bool stopped_ = false;
};

// ---------------------------------------------------------------------------------------
// generate().

enum class FinishReason { stop_string, end_of_text, max_new_tokens, context };
const char* finish_reason_name(FinishReason reason);

struct GenerateConfig {
  int64_t max_new_tokens = 64;
  SamplingConfig sampling;
  std::vector<std::string> stop;   // texts that end a row; not part of its output
  bool stop_at_end_of_text = true;
};

struct GenerationResult {
  std::string text;             // the output, without the stop string
  std::vector<TokenId> tokens;  // every token generated (the one completing a stop string included)
  int64_t prompt_tokens = 0;
  FinishReason finish = FinishReason::max_new_tokens;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double seconds_prefill = 0, seconds_decode = 0;  // forward calls with / without a prompt chunk
  int64_t decode_steps = 0;
};

// Called as text of prompt `index` becomes available; `done` once per prompt, last.
using StreamCallback = std::function<void(size_t index, std::string_view text, bool done)>;

// Prompts as token ids (an empty prompt starts from <|endoftext|>). Each must leave room
// for one token: length < engine.max_context(); a longer one is an error naming its index.
std::vector<GenerationResult> generate_tokens(InferenceEngine& engine, const Tokenizer& tokenizer,
                                              std::span<const std::vector<TokenId>> prompts,
                                              const GenerateConfig& config, const StreamCallback& on_text = {},
                                              GenerateStats* stats = nullptr);
// The same for texts, encoded without special tokens.
std::vector<GenerationResult> generate_texts(InferenceEngine& engine, const Tokenizer& tokenizer,
                                             std::span<const std::string> prompts, const GenerateConfig& config,
                                             const StreamCallback& on_text = {}, GenerateStats* stats = nullptr);

// ---------------------------------------------------------------------------------------
// A trained run, for inference.

struct RunWeights {
  std::filesystem::path checkpoint;  // the file read
  ModelConfig config;
  std::string encoding;              // the tokenizer the run was trained with
  std::vector<float> params;         // model_param_count(config) floats
  int64_t step = 0;                  // optimizer steps behind these weights
};
// `run` is a run directory (its checkpoint.safetensors) or a checkpoint file. Throws
// naming the file when it is missing or not a flashgpt checkpoint.
RunWeights run_load_weights(const std::filesystem::path& run);

// "\n", "\t", "\\", "\r", "\xHH" and "\uHHHH" in a command-line stop string; anything else
// after a backslash is an error. The result must be non-empty valid UTF-8.
std::string stop_string_unescape(std::string_view text);

}  // namespace flashgpt
