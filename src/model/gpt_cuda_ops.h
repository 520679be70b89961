// The CUDA backend's operations, one entry point each (src/model/gpt_cuda_ops.cu): each
// validates its arguments, throws flashgpt::Error naming the problem, and enqueues its
// kernels (src/model/kernels/*.cuh) on `stream` without synchronizing. All pointers are
// device memory; tensors are row-major with the shapes in the comments; N = B T tokens.
// The model (gpt_cuda.cc) and the GPU tests call these; nothing else launches the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace flashgpt::model_cuda {

using bf16 = __nv_bfloat16;

// One dropout site of model.h's convention, ready for a kernel.
struct DropoutSite {
  uint64_t seed = 0;
  uint64_t step = 0;
  int64_t site = 0;        // 0: embedding; 1 + 2 l, 2 + 2 l: layer l's residuals
  uint32_t threshold = 0;  // dropout_threshold(p); 0: no dropout
  float scale = 1.0f;      // dropout_keep_scale(threshold)
  // When set, the kernels read {seed, step} from this device address instead of the two
  // fields above, so a captured CUDA graph replays with the step's values (gpt_cuda.cc).
  const uint64_t* seed_step = nullptr;
};
// The site with threshold and scale filled in from p (0 for no dropout).
DropoutSite dropout_site(uint64_t seed, uint64_t step, int64_t site, float p);

// The parameter tensors as consecutive segments of the flat buffer; AdamW decays those
// with decay set (ParamSpec::weight_decay).
constexpr int kMaxSegments = 16;
struct ParamSegments {
  int count = 0;
  int64_t end[kMaxSegments] = {};  // exclusive end offset of segment i; it starts at end[i - 1] (0 for i = 0)
  bool decay[kMaxSegments] = {};
};

struct AdamWArgs {
  float lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  float bias_correction1 = 1, bias_correction2 = 1;  // 1 - beta^t
  float grad_scale = 1;
};

int device_sm_count();

// x0 (N, C) fp32 = dropout(wte[tokens] + wpe[n % T]); tokens (N) int32 in [0, rows of wte).
void encoder_forward(float* x0, const int32_t* tokens, const float* wte, const float* wpe, int64_t N, int T, int C,
                     const DropoutSite& drop, cudaStream_t stream);
// dwpe (T, C) += sum over the batch of dx0 (N = B T, C), dx0 already through the dropout backward.
void encoder_backward_wpe(float* dwpe, const float* dx0, int B, int T, int C, cudaStream_t stream);
// dwte[unique_tokens[i]] += sum of dx0[positions[starts[i] .. starts[i+1])] for i < *unique_count
// (a device int); max_unique bounds *unique_count (the grid).
void encoder_backward_wte(float* dwte, const float* dx0, const int32_t* unique_tokens, const int32_t* starts,
                          const int32_t* positions, const int32_t* unique_count, int64_t max_unique, int C,
                          cudaStream_t stream);

// out (N, C) fp32 = in + dropout(y), y (N, C) bf16; out may equal in.
void residual_forward(float* out, const float* in, const bf16* y, int64_t N, int C, const DropoutSite& drop,
                      cudaStream_t stream);
// dy (N, C) = mask * scale * dout (N, C) fp32; dy bf16, or fp32 (may equal dout).
void dropout_backward(bf16* dy, const float* dout, int64_t N, int C, const DropoutSite& drop, cudaStream_t stream);
void dropout_backward(float* dy, const float* dout, int64_t N, int C, const DropoutSite& drop, cudaStream_t stream);

// out (N, C) bf16, mean, rstd (N) fp32 of x (N, C) fp32 with weight w, bias b (C) fp32.
// ld_out: out's row stride, C (or 0) or more, a multiple of 8 where C % 8 == 0 (16-byte rows
// for the vector paths); columns C .. ld_out - 1 are not touched (write_ones_column).
void layernorm_forward(bf16* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t N,
                       int C, cudaStream_t stream, int64_t ld_out = 0);
// residual_forward(out, in, y, drop), then layernorm_forward(ln, mean, rstd, out, w, b), in
// one pass where C % 16 == 0 and C <= 2048 (every pointer 16-byte aligned), else the two ops
// in turn: out (N, C) fp32 (may equal in), ln (N, C) bf16, mean, rstd (N) fp32. The
// residual is the same bits either way, the LayerNorm output equal within rounding.
// ld_ln: ln's row stride, as layernorm_forward's ld_out.
void residual_layernorm_forward(float* out, bf16* ln, float* mean, float* rstd, const float* in, const bf16* y,
                                const float* w, const float* b, int64_t N, int C, const DropoutSite& drop,
                                cudaStream_t stream, int64_t ld_ln = 0);
// Floats of the `partial` workspace layernorm_backward needs for N rows of C channels.
size_t layernorm_backward_partial_floats(int64_t N, int C);
// dx (N, C) fp32 (+= when accumulate, else =), dw, db (C) fp32 +=, from dy (N, C) bf16 and the
// forward's x, mean, rstd, w. partial: layernorm_backward_partial_floats(N, C) floats.
void layernorm_backward(float* dx, bool accumulate, float* dw, float* db, float* partial, const bf16* dy,
                        const float* x, const float* mean, const float* rstd, const float* w, int64_t N, int C,
                        cudaStream_t stream);
// layernorm_backward, then next_dy (N, C) bf16 = dropout_backward(dx) at site `next` (the
// residual dropout the backward meets next), fused into the same pass over the rows where
// C % 128 == 0 (the same bits as the two ops in turn, which run elsewhere).
// kernel: `shared` accumulates dw/db in shared memory and reads each row twice; `registers`
// (C = 128, 256, 384, 512, 768, 1024; else `shared`) keeps the row and the sums in registers
// and reads each row once. Same formulas; dw/db may differ in the last bits between the two.
// next_db non-null (needs next_dy): next_db (C) fp32 += the column sums of next_dy, the bf16
// values written (the bias gradient of the projection whose output the next site drops),
// deterministic; fused into the kernels' sums where C % 128 == 0 (and 3 x 4 x C floats of
// shared memory fit a block), else column_sum of next_dy after it is written.
enum class LayerNormBackwardKernel { shared, registers };
void layernorm_backward_dropout(float* dx, bool accumulate, float* dw, float* db, float* partial, const bf16* dy,
                                const float* x, const float* mean, const float* rstd, const float* w, int64_t N, int C,
                                bf16* next_dy, const DropoutSite& next, cudaStream_t stream,
                                LayerNormBackwardKernel kernel = LayerNormBackwardKernel::shared,
                                float* next_db = nullptr);

// Which kernel computes the classifier's softmax (kernels/classifier.cuh): `two_pass` reads
// each row twice, `cluster` once (a cluster of blocks per row holding it in registers; it
// falls back to two_pass for Vp > 131072 or a device without clusters), `l2_two_pass` twice
// from a persistent grid of grid_blocks_per_sm (1, 2, 4 or 8) blocks per SM, few enough rows
// in flight that the second read comes from L2. Same results within rounding (the sums run
// in different orders); each is deterministic.
enum class ClassifierKernel { two_pass, cluster, l2_two_pass };

// Per row of logits (rows, Vp) bf16: losses[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]];
// with write_grad, logits[r, c] = (softmax - onehot) * dloss for c < V and 0 for V <= c < Vp.
// grid_blocks_per_sm and grid_sms are read by l2_two_pass only: its grid covers grid_sms
// multiprocessors (0 or more than the device has: all of them), so that a kernel running
// beside it on another stream keeps the rest (GptCuda's overlapped classifier).
void classifier_softmax_xent(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V, int64_t Vp,
                             float dloss, bool write_grad, cudaStream_t stream,
                             ClassifierKernel kernel = ClassifierKernel::two_pass, int grid_blocks_per_sm = 1,
                             int grid_sms = 0);
// *out = sum of losses (n), in double, in a fixed order.
void loss_sum(double* out, const float* losses, int64_t n, cudaStream_t stream);

// One AdamW step over the flat buffers (n floats), refreshing params_bf16.
void adamw_update(float* params, bf16* params_bf16, const float* grads, float* m, float* v, int64_t n,
                  const ParamSegments& segments, const AdamWArgs& args, cudaStream_t stream);
// Doubles of the `partial` workspace of sum_squares.
size_t sum_squares_partial_doubles();
// *out = sum of x[i]^2 (double), deterministic.
void sum_squares(double* out, double* partial, const float* x, int64_t n, cudaStream_t stream);
// Floats of the `partial` workspace of column_sum for M columns.
size_t column_sum_partial_floats(int M);
// out (M) fp32 += column sums of x (N, M) bf16 (bias gradients), deterministic.
void column_sum(float* out, float* partial, const bf16* x, int64_t N, int M, cudaStream_t stream);
// out (rows, width) fp32 += rows of `in` (fp32 or bf16) starting in_stride elements apart:
// the bias gradients cuBLASLt's epilogues wrote, into the gradients.
void add_rows(float* out, const float* in, int64_t rows, int64_t width, int64_t in_stride, cudaStream_t stream);
void add_rows(float* out, const bf16* in, int64_t rows, int64_t width, int64_t in_stride, cudaStream_t stream);
// The bias-ones weight gradient (FLASHGPT_BIAS_ONES, gpt_cuda.cc): ext (out, ld) fp32 =
// dY^T [x | 1 | 0 ...], the weight product over a LayerNorm output whose column `in` is 1.
// dw (out, in) fp32 and db (out) fp32 get ext's first `in` columns and its column `in`:
// added when accumulate (as the gradients are), else written. ld > in.
void split_weight_bias_grad(float* dw, float* db, const float* ext, int64_t out, int in, int64_t ld, bool accumulate,
                            cudaStream_t stream);
// x (rows, ld) bf16: column C = 1 and columns C + 1 .. ld - 1 = 0 in every row (the constant
// columns of a LayerNorm output stored ld apart for split_weight_bias_grad's product).
void write_ones_column(bf16* x, int64_t rows, int C, int64_t ld, cudaStream_t stream);
// out (n) bf16 = in (n) fp32, round to nearest even.
void float_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream);

}  // namespace flashgpt::model_cuda
