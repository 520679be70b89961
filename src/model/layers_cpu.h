// The GPT layers on the CPU in fp32: forward and backward of each, as gpt_cpu.cc chains
// them (llm.c's layer set, our own code). OpenMP over rows; the matmuls through
// gemm_cpu (BLAS where built with it). Every reduction runs in an order fixed by the
// shapes, never by the thread count, so results are bit-identical for any thread count.
//
// Conventions: N = B T rows of activations; tensors are row-major with the shape in the
// comment beside each; "=" marks an output that is overwritten, "+=" one that is
// accumulated into (parameter gradients always accumulate, so micro-batches add up).
// layers_reference.h holds a plain-loop version of each, templated on the scalar type,
// that the tests check these against and differentiate by finite differences.
#pragma once

#include <flashgpt/philox.h>

#include <cstdint>

namespace flashgpt::model {

// One dropout site outside the attention (model.h): element (n, c) is kept when
// dropout_keep(rng, site, n, c, threshold), and kept elements are scaled by
// dropout_keep_scale(threshold). threshold 0 is no dropout.
struct DropoutSite {
  DropoutRng rng;
  int64_t site = 0;
  uint32_t threshold = 0;
};

// out = wte[tokens] + wpe[t].
void encoder_forward(float* out,             // = (B, T, C)
                     const int32_t* tokens,  // (B, T), each in [0, V)
                     const float* wte,       // (Vp, C)
                     const float* wpe,       // (T_max, C), T <= T_max
                     int64_t B, int64_t T, int64_t C);
// The scatter-add: dwte[tokens[b, t]] += dout[b, t], dwpe[t] += sum_b dout[b, t].
void encoder_backward(float* dwte,           // += (Vp, C)
                      float* dwpe,           // += (T_max, C)
                      const float* dout,     // (B, T, C)
                      const int32_t* tokens, // (B, T)
                      int64_t B, int64_t T, int64_t C);

// out = (inp - mean) * rstd * w + b per row, rstd = 1 / sqrt(var + kLayerNormEps).
void layernorm_forward(float* out,        // = (N, C)
                       float* mean,       // = (N)
                       float* rstd,       // = (N)
                       const float* inp,  // (N, C)
                       const float* w,    // (C)
                       const float* b,    // (C)
                       int64_t N, int64_t C);
void layernorm_backward(float* dinp,        // += (N, C)
                        float* dw,          // += (C)
                        float* db,          // += (C)
                        const float* dout,  // (N, C)
                        const float* inp,   // (N, C)
                        const float* w,     // (C)
                        const float* mean,  // (N)
                        const float* rstd,  // (N)
                        int64_t N, int64_t C);

// out = inp w^T + b (torch.nn.Linear).
void matmul_forward(float* out,        // = (N, OC)
                    const float* inp,  // (N, IC)
                    const float* w,    // (OC, IC)
                    const float* b,    // (OC), or null for no bias
                    int64_t N, int64_t IC, int64_t OC);
void matmul_backward(float* dinp,        // = (N, IC): dout w
                     float* dw,          // += (OC, IC): dout^T inp
                     float* db,          // += (OC): column sums of dout, or null
                     const float* dout,  // (N, OC)
                     const float* inp,   // (N, IC)
                     const float* w,     // (OC, IC)
                     int64_t N, int64_t IC, int64_t OC);

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
void gelu_forward(float* out,        // = (n)
                  const float* inp,  // (n)
                  int64_t n);
void gelu_backward(float* dinp,        // = (n); may be dout itself
                   const float* inp,   // (n)
                   const float* dout,  // (n)
                   int64_t n);

// x = dropout(x) in place (the embedding site).
void dropout_forward(float* x,  // (N, C)
                     int64_t N, int64_t C, const DropoutSite& site);
// out = x + dropout(y) (the residual sites).
void residual_dropout_forward(float* out,      // = (N, C); may be x itself
                              const float* x,  // (N, C)
                              const float* y,  // (N, C)
                              int64_t N, int64_t C, const DropoutSite& site);
// dy = dout * mask * scale: the gradient through dropout (the residual branch's dx is
// dout itself).
void dropout_backward(float* dy,          // = (N, C); may be dout itself
                      const float* dout,  // (N, C)
                      int64_t N, int64_t C, const DropoutSite& site);

// Causal self-attention of the heads packed in qkv = [q | k | v] (model.h), through the
// tiled CPU FlashAttention with its own dropout (probability `dropout`, stream `rng`).
void attention_forward(float* out,        // = (B, T, C): head h at columns h HD .. h HD + HD - 1
                       float* lse,        // = (B, NH, T)
                       const float* qkv,  // (B, T, 3C)
                       int64_t B, int64_t T, int64_t C, int64_t NH, float dropout, DropoutRng rng);
void attention_backward(float* dqkv,       // = (B, T, 3C)
                        const float* dout, // (B, T, C)
                        const float* qkv,  // (B, T, 3C)
                        const float* out,  // (B, T, C)
                        const float* lse,  // (B, NH, T)
                        int64_t B, int64_t T, int64_t C, int64_t NH, float dropout, DropoutRng rng);

// The tied classifier and its loss, chunk_rows rows at a time so the fp32 logits of the
// whole batch are never held: logits = inp wte[0:V]^T (the padding rows V..Vp never take
// part), loss_n = logsumexp(logits_n) - logits_n[targets_n]. With dinp non-null it also
// runs the backward of sum_n dloss * loss_n: dinp = dlogits wte[0:V], dwte[0:V] +=
// dlogits^T inp, dlogits = (softmax - onehot) dloss. Within a chunk it works on slabs of
// vocabulary columns (the logits of one slab stay in cache from their product to their
// gradient's two products). Returns sum_n loss_n, summed in row order in double.
double classifier_forward_backward(float* dinp,            // = (N, C), or null: forward only
                                   float* dwte,            // += (Vp, C), or null with dinp
                                   float* losses,          // = (N)
                                   float* scratch,         // classifier_scratch_floats(min(chunk_rows, N), C, V)
                                   const float* inp,       // (N, C)
                                   const float* wte,       // (Vp, C)
                                   const int32_t* targets, // (N), each in [0, V)
                                   int64_t N, int64_t C, int64_t V, float dloss, int64_t chunk_rows);
// The scratch classifier_forward_backward needs for chunks of chunk_rows rows, in floats.
int64_t classifier_scratch_floats(int64_t chunk_rows, int64_t C, int64_t V);

}  // namespace flashgpt::model
