// The CUDA inference engine's kernels (inference_cuda_kernels.cu), one launcher each; all
// pointers are device memory, every launch is enqueued on `stream` without synchronizing.
// Private to src/generate. Shapes row-major; N tokens in a call, C channels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flashgpt::inference_cuda {

using bf16 = __nv_bfloat16;

// Where each token of a call goes: its id, its position in its slot, its slot.
struct TokenPlace {
  int32_t token, pos, slot;
};

// Sampling parameters as the sampling kernel reads them from device memory (so a captured
// graph sees each step's values).
struct SampleParams {
  int32_t greedy = 1;
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

// x (N, C) fp32 = wte[token] + wpe[pos].
void embed(float* x, const TokenPlace* places, const float* wte, const float* wpe, int N, int C, cudaStream_t stream);

// For each output row n < rows: r = row_index ? row_index[n] : n; xr = x[r] (+ y[r] + bias
// when y is given); h[n] = LayerNorm(xr) * w + b (bf16); x[r] = xr when write_x.
void residual_layernorm(float* x, const bf16* y, const float* bias, const float* w, const float* b, bf16* h,
                        const int32_t* row_index, int rows, int C, bool write_x, cudaStream_t stream);

// qkv (N, 3C) bf16 + bias (3C): q (N, C) bf16 gets the first C columns, the K and V caches
// (slot, pos) rows the next two (cache row stride C, slot stride T C).
void split_qkv(bf16* q, bf16* k_cache, bf16* v_cache, const bf16* qkv, const float* bias, const TokenPlace* places,
               int N, int C, int64_t slot_stride, cudaStream_t stream);

// ff (N, F) bf16 = gelu_tanh(ff + bias), in place.
void bias_gelu(bf16* ff, const float* bias, int64_t N, int F, cudaStream_t stream);

// y (rows, out) (row stride ldy; fp32 or bf16) = x (rows, in) W (out, in)^T, then, when
// bias_gelu is given, gelu_tanh(y + bias_gelu). For decode steps of at most kGemvMaxRows
// rows: returns false (nothing launched) for a shape it does not take (rows outside
// 1 .. kGemvMaxRows, in % 8 != 0), and the caller runs cuBLAS instead.
constexpr int kGemvMaxRows = 8;
bool gemv(void* y, bool y_f32, int64_t ldy, const bf16* x, const bf16* w, const float* bias_gelu, int rows, int in,
          int out, cudaStream_t stream);

// tokens[b] = the token drawn from logits row b (row stride ld, V real columns) as
// sampling_draw does: argmax (lowest id on a tie) when greedy, else temperature, top-k,
// top-p and a Philox draw keyed (seed, prompt_index[b], step[b]).
void sample(int32_t* tokens, const float* logits, int64_t ld, int V, int rows, const SampleParams* params,
            const uint64_t* prompt_index, const uint64_t* step, cudaStream_t stream);

}  // namespace flashgpt::inference_cuda
