// The fp32 CPU inference engine: the model of model.h run over a KV cache.
//
// Invariants: slot s's cache rows 0 .. lengths_[s] - 1 hold the keys and values of its
// tokens at those positions in every layer; forward() appends a chunk's rows to every
// layer before it reads them, so a chunk attends to itself causally and to all earlier
// tokens of its slot. Nothing is allocated per call once the activation buffers have
// grown to the largest call seen.
//
// The layer loops (LayerNorm, linear, GELU) are written here for inference rather than
// taken from the model's training backend: they skip what training keeps (the LayerNorm
// statistics, pre-activation copies), take rows at arbitrary positions of several slots,
// and the output head computes only the V real rows of wte, for the last token of each
// chunk. The uncached model (GptModel::forward_logits) is their reference in the tests.
#include "inference_cpu_kernels.h"

#include <flashgpt/attention_cpu.h>
#include <flashgpt/error.h>
#include <flashgpt/generate.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace flashgpt {

namespace inference_cpu {

int threads_or_default(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

// Below this many multiply-adds a loop runs on one thread: waking the team costs more
// (and on a busy machine a barrier can wait a whole scheduler tick).
constexpr int64_t kParallelWork = int64_t{1} << 15;

void layernorm_forward(float* y, const float* x, const float* weight, const float* bias, int64_t rows, int64_t C,
                       int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * C > kParallelWork)
  for (int64_t n = 0; n < rows; ++n) {
    const float* xr = x + n * C;
    float* yr = y + n * C;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) sum += xr[c];
    const float mean = sum / static_cast<float>(C);
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const float rstd = 1.0f / std::sqrt(var / static_cast<float>(C) + kLayerNormEps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean) * rstd * weight[c] + bias[c];
  }
}

// Output rows are split across threads in blocks of kRowBlock rows of W (kept in cache
// while every x row passes over them, four x rows at a time), so a decode step with few
// rows of x reads each weight once.
void linear_forward(float* y, const float* x, const float* w, const float* b, int64_t N, int64_t I, int64_t O,
                    LinearOutput mode, int threads) {
  constexpr int64_t kRowBlock = 16;
  const int64_t blocks = (O + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * I * O > kParallelWork)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t o0 = blk * kRowBlock, o1 = std::min(O, o0 + kRowBlock);
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const float* x0 = x + n * I;
      const float* x1 = x0 + I;
      const float* x2 = x1 + I;
      const float* x3 = x2 + I;
      for (int64_t o = o0; o < o1; ++o) {
        const float* wr = w + o * I;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t i = 0; i < I; ++i) {
          a0 += x0[i] * wr[i];
          a1 += x1[i] * wr[i];
          a2 += x2[i] * wr[i];
          a3 += x3[i] * wr[i];
        }
        const float bias = b ? b[o] : 0.0f;
        float* yo = y + n * O + o;
        if (mode == LinearOutput::add) {
          yo[0] += a0 + bias, yo[O] += a1 + bias, yo[2 * O] += a2 + bias, yo[3 * O] += a3 + bias;
        } else {
          yo[0] = a0 + bias, yo[O] = a1 + bias, yo[2 * O] = a2 + bias, yo[3 * O] = a3 + bias;
        }
      }
    }
    for (; n < N; ++n) {
      const float* xr = x + n * I;
      for (int64_t o = o0; o < o1; ++o) {
        const float* wr = w + o * I;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < I; ++i) acc += xr[i] * wr[i];
        acc += b ? b[o] : 0.0f;
        if (mode == LinearOutput::add) {
          y[n * O + o] += acc;
        } else {
          y[n * O + o] = acc;
        }
      }
    }
  }
}

void gelu_tanh_inplace(float* x, int64_t count, int threads) {
  const float k = std::sqrt(2.0f / 3.14159265358979323846f);
#pragma omp parallel for simd schedule(static) num_threads(threads) if (count > kParallelWork)
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }
}

}  // namespace inference_cpu

void attention_decode_cpu(const DecodeAttentionParams& p) {
  FLASHGPT_CHECK(p.q && p.k && p.v && p.o && p.slots && p.lengths, "attention_decode_cpu: null pointer");
  FLASHGPT_CHECK(p.rows >= 0 && p.heads > 0 && p.head_dim > 0, "attention_decode_cpu: bad shape rows {} heads {} "
                 "head_dim {}", p.rows, p.heads, p.head_dim);
  FLASHGPT_CHECK(p.row_stride >= p.heads * p.head_dim && p.slot_stride >= 0,
                 "attention_decode_cpu: row stride {} is less than heads * head_dim = {}", p.row_stride,
                 p.heads * p.head_dim);
  int64_t longest = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    FLASHGPT_CHECK(p.lengths[r] >= 1, "attention_decode_cpu: row {} attends to {} keys (needs at least 1)", r,
                   p.lengths[r]);
    longest = std::max(longest, p.lengths[r]);
  }
  const int threads = inference_cpu::threads_or_default(p.threads);
  const int64_t D = p.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> scores(static_cast<size_t>(threads * longest));
  const int64_t items = p.rows * p.heads;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (items * longest * D > inference_cpu::kParallelWork)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t r = item / p.heads, h = item % p.heads;
    const int64_t n = p.lengths[r];
    const float* q = p.q + (r * p.heads + h) * D;
    const float* k = p.k + p.slots[r] * p.slot_stride + h * D;
    const float* v = p.v + p.slots[r] * p.slot_stride + h * D;
    float* o = p.o + (r * p.heads + h) * D;
    float* s = scores.data() + omp_get_thread_num() * longest;  // (n): this row's scores
    float row_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = k + j * p.row_stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * kj[d];
      s[j] = dot * scale;
      row_max = std::max(row_max, s[j]);
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - row_max);
      sum += s[j];
    }
    std::fill(o, o + D, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + j * p.row_stride;
      const float pj = s[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += pj * vj[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

namespace {

using inference_cpu::LinearOutput;

struct LayerWeights {
  const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *fcp_w, *fcp_b;
};

class CpuEngine final : public InferenceEngine {
 public:
  CpuEngine(const ModelConfig& config, std::span<const float> params, const InferenceOptions& options)
      : config_(config), params_(params.begin(), params.end()) {
    model_config_validate(config_);
    FLASHGPT_CHECK(static_cast<int64_t>(params.size()) == model_param_count(config_),
                   "inference: the parameter buffer has {} floats, the {} config needs {}", params.size(),
                   config_.preset, model_param_count(config_));
    FLASHGPT_CHECK(options.max_slots >= 1, "inference: max_slots must be at least 1, got {}", options.max_slots);
    FLASHGPT_CHECK(options.max_context >= 0 && options.max_context <= config_.context,
                   "inference: max_context {} is outside 0 .. the model's context {}", options.max_context,
                   config_.context);
    FLASHGPT_CHECK(options.threads >= 0, "inference: threads must be >= 0 (0: all cores), got {}", options.threads);
    slots_ = options.max_slots;
    t_max_ = options.max_context > 0 ? options.max_context : config_.context;
    threads_ = inference_cpu::threads_or_default(options.threads);
    for (const ParamSpec& spec : model_param_specs(config_)) offsets_[static_cast<int>(spec.kind)] = spec.offset;
    const int64_t C = config_.d_model;
    const size_t cache = static_cast<size_t>(config_.n_layer * slots_ * t_max_ * C);
    k_cache_.assign(cache, 0.0f);
    v_cache_.assign(cache, 0.0f);
    lengths_.assign(static_cast<size_t>(slots_), 0);
  }

  const ModelConfig& config() const override { return config_; }
  int64_t max_slots() const override { return slots_; }
  int64_t max_context() const override { return t_max_; }
  int64_t length(int64_t slot) const override {
    check_slot(slot);
    return lengths_[slot];
  }
  void reset(int64_t slot) override {
    check_slot(slot);
    lengths_[slot] = 0;
  }

  void forward(std::span<const SlotChunk> chunks, std::span<float> logits_out) override;

 private:
  void check_slot(int64_t slot) const {
    FLASHGPT_CHECK(slot >= 0 && slot < slots_, "inference: slot {} is outside 0 .. {}", slot, slots_ - 1);
  }
  const float* param(ParamKind kind) const { return params_.data() + offsets_[static_cast<int>(kind)]; }
  LayerWeights layer(int64_t l) const;
  float* k_layer(int64_t l) { return k_cache_.data() + l * slots_ * t_max_ * config_.d_model; }
  float* v_layer(int64_t l) { return v_cache_.data() + l * slots_ * t_max_ * config_.d_model; }
  void attention(int64_t l, std::span<const SlotChunk> chunks);

  ModelConfig config_;
  std::vector<float> params_;
  int64_t offsets_[kParamKinds] = {};
  int64_t slots_ = 0, t_max_ = 0;
  int threads_ = 1;
  std::vector<float> k_cache_, v_cache_;  // (L, S, T_max, C) each
  std::vector<int64_t> lengths_;          // (S): tokens cached per slot

  // Activations of one call, N = the call's tokens; grown, never shrunk.
  std::vector<int64_t> row_slot_, row_pos_;  // (N)
  std::vector<float> x_, h_, qkv_, att_, ff_, lse_;
  std::vector<int64_t> decode_rows_, decode_slots_, decode_lengths_;
  std::vector<float> decode_q_, decode_o_;
};

LayerWeights CpuEngine::layer(int64_t l) const {
  const int64_t C = config_.d_model, F = config_.d_ff;
  return {param(ParamKind::ln1_w) + l * C,         param(ParamKind::ln1_b) + l * C,
          param(ParamKind::qkv_w) + l * 3 * C * C, param(ParamKind::qkv_b) + l * 3 * C,
          param(ParamKind::attn_proj_w) + l * C * C, param(ParamKind::attn_proj_b) + l * C,
          param(ParamKind::ln2_w) + l * C,         param(ParamKind::ln2_b) + l * C,
          param(ParamKind::fc_w) + l * F * C,      param(ParamKind::fc_b) + l * F,
          param(ParamKind::fc_proj_w) + l * C * F, param(ParamKind::fc_proj_b) + l * C};
}

template <class T>
T* grow(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(static_cast<size_t>(size));
  return v.data();
}

// Layer l's attention for every row of the call: qkv_ (N, 3C) -> att_ (N, C). The new keys
// and values go into the cache first. One-token chunks (decode) share one one-row
// attention call; longer chunks (prefill) each run the training attention, causal
// (bottom-right aligned: query i of n sees cached keys 0 .. len + i).
void CpuEngine::attention(int64_t l, std::span<const SlotChunk> chunks) {
  const int64_t C = config_.d_model, NH = config_.n_head, HD = config_.head_dim();
  float* kc = k_layer(l);
  float* vc = v_layer(l);
  const int64_t N = static_cast<int64_t>(row_slot_.size());
#pragma omp parallel for schedule(static) num_threads(threads_) if (N * C > inference_cpu::kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const float* row = qkv_.data() + n * 3 * C;
    const int64_t at = (row_slot_[n] * t_max_ + row_pos_[n]) * C;
    std::copy(row + C, row + 2 * C, kc + at);
    std::copy(row + 2 * C, row + 3 * C, vc + at);
  }
  decode_rows_.clear(), decode_slots_.clear(), decode_lengths_.clear();
  int64_t first = 0;  // the chunk's first row in the call
  for (const SlotChunk& chunk : chunks) {
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    const int64_t cached = lengths_[chunk.slot];  // before this call
    if (n == 1) {
      decode_rows_.push_back(first);
      decode_slots_.push_back(chunk.slot);
      decode_lengths_.push_back(cached + 1);
    } else {
      AttentionParams p;
      p.q = qkv_.data() + first * 3 * C;
      p.k = kc + chunk.slot * t_max_ * C;
      p.v = vc + chunk.slot * t_max_ * C;
      p.o = att_.data() + first * C;
      p.lse = grow(lse_, NH * n);
      p.dtype = DType::f32;
      p.batch = 1;
      p.seqlen_q = static_cast<int>(n);
      p.seqlen_k = static_cast<int>(cached + n);
      p.heads_q = p.heads_kv = static_cast<int>(NH);
      p.head_dim = static_cast<int>(HD);
      p.q_batch_stride = n * 3 * C, p.q_row_stride = 3 * C, p.q_head_stride = HD;
      p.k_batch_stride = t_max_ * C, p.k_row_stride = C, p.k_head_stride = HD;
      p.v_batch_stride = t_max_ * C, p.v_row_stride = C, p.v_head_stride = HD;
      p.o_batch_stride = n * C, p.o_row_stride = C, p.o_head_stride = HD;
      p.lse_batch_stride = NH * n, p.lse_head_stride = n;
      p.mask = Mask::causal;
      CpuTiling tiling;
      tiling.threads = threads_;
      attention_forward_cpu(p, tiling);
    }
    first += n;
  }
  if (decode_rows_.empty()) return;
  // The one-row attention reads q (rows, NH, HD) densely: gather the decode rows' q.
  const int64_t rows = static_cast<int64_t>(decode_rows_.size());
  float* q = grow(decode_q_, rows * C);
  float* o = grow(decode_o_, rows * C);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = qkv_.data() + decode_rows_[r] * 3 * C;
    std::copy(src, src + C, q + r * C);
  }
  DecodeAttentionParams d;
  d.q = q, d.k = kc, d.v = vc, d.o = o;
  d.rows = rows, d.heads = NH, d.head_dim = HD;
  d.row_stride = C, d.slot_stride = t_max_ * C;
  d.slots = decode_slots_.data(), d.lengths = decode_lengths_.data();
  d.threads = threads_;
  attention_decode_cpu(d);
  for (int64_t r = 0; r < rows; ++r) std::copy(o + r * C, o + (r + 1) * C, att_.data() + decode_rows_[r] * C);
}

void CpuEngine::forward(std::span<const SlotChunk> chunks, std::span<float> logits_out) {
  const int64_t C = config_.d_model, F = config_.d_ff, V = config_.vocab_size;
  const int64_t B = static_cast<int64_t>(chunks.size());
  FLASHGPT_CHECK(static_cast<int64_t>(logits_out.size()) == B * V,
                 "inference: logits_out has {} floats, {} chunks x V {} need {}", logits_out.size(), B, V, B * V);
  std::vector<bool> seen(static_cast<size_t>(slots_), false);
  int64_t N = 0;
  for (const SlotChunk& chunk : chunks) {
    check_slot(chunk.slot);
    FLASHGPT_CHECK(!seen[chunk.slot], "inference: slot {} appears twice in one forward call", chunk.slot);
    seen[chunk.slot] = true;
    FLASHGPT_CHECK(!chunk.tokens.empty(), "inference: an empty chunk for slot {}", chunk.slot);
    FLASHGPT_CHECK(lengths_[chunk.slot] + static_cast<int64_t>(chunk.tokens.size()) <= t_max_,
                   "inference: slot {} holds {} tokens; {} more exceed the context of {}", chunk.slot,
                   lengths_[chunk.slot], chunk.tokens.size(), t_max_);
    for (TokenId t : chunk.tokens) {
      FLASHGPT_CHECK(static_cast<int64_t>(t) < V, "inference: token id {} is outside the vocabulary of {}", t, V);
    }
    N += static_cast<int64_t>(chunk.tokens.size());
  }
  if (B == 0) return;
  row_slot_.resize(static_cast<size_t>(N));
  row_pos_.resize(static_cast<size_t>(N));
  float* x = grow(x_, N * C);  // (N, C): the residual stream
  float* h = grow(h_, N * C);  // (N, C): LayerNorm outputs
  grow(qkv_, N * 3 * C);       // (N, 3C)
  grow(att_, N * C);           // (N, C)
  float* ff = grow(ff_, N * F);  // (N, F)
  {
    int64_t n = 0;
    for (const SlotChunk& chunk : chunks) {
      for (size_t i = 0; i < chunk.tokens.size(); ++i, ++n) {
        row_slot_[n] = chunk.slot;
        row_pos_[n] = lengths_[chunk.slot] + static_cast<int64_t>(i);
        const float* te = param(ParamKind::wte) + static_cast<int64_t>(chunk.tokens[i]) * C;
        const float* pe = param(ParamKind::wpe) + row_pos_[n] * C;
        for (int64_t c = 0; c < C; ++c) x[n * C + c] = te[c] + pe[c];
      }
    }
  }
  for (int64_t l = 0; l < config_.n_layer; ++l) {
    const LayerWeights w = layer(l);
    inference_cpu::layernorm_forward(h, x, w.ln1_w, w.ln1_b, N, C, threads_);
    inference_cpu::linear_forward(qkv_.data(), h, w.qkv_w, w.qkv_b, N, C, 3 * C, LinearOutput::overwrite, threads_);
    attention(l, chunks);
    inference_cpu::linear_forward(x, att_.data(), w.proj_w, w.proj_b, N, C, C, LinearOutput::add, threads_);
    inference_cpu::layernorm_forward(h, x, w.ln2_w, w.ln2_b, N, C, threads_);
    inference_cpu::linear_forward(ff, h, w.fc_w, w.fc_b, N, C, F, LinearOutput::overwrite, threads_);
    inference_cpu::gelu_tanh_inplace(ff, N * F, threads_);
    inference_cpu::linear_forward(x, ff, w.fcp_w, w.fcp_b, N, F, C, LinearOutput::add, threads_);
  }
  for (const SlotChunk& chunk : chunks) lengths_[chunk.slot] += static_cast<int64_t>(chunk.tokens.size());
  // The head, for each chunk's last row only: lnf, then the V real rows of the tied wte.
  int64_t last = -1;
  for (int64_t b = 0; b < B; ++b) {
    last += static_cast<int64_t>(chunks[b].tokens.size());
    std::copy(x + last * C, x + (last + 1) * C, h + b * C);
  }
  inference_cpu::layernorm_forward(h, h, param(ParamKind::lnf_w), param(ParamKind::lnf_b), B, C, threads_);
  inference_cpu::linear_forward(logits_out.data(), h, param(ParamKind::wte), nullptr, B, C, V,
                                LinearOutput::overwrite, threads_);
}

}  // namespace

std::unique_ptr<InferenceEngine> inference_create_cpu(const ModelConfig& config, std::span<const float> params,
                                                      const InferenceOptions& options) {
  return std::make_unique<CpuEngine>(config, params, options);
}

}  // namespace flashgpt
