// Entry points of the model's CUDA kernels: validate, then call the launcher (kernels/*.cuh).
// nvcc cannot compile fmt (flashgpt/error.h), so messages are built with std::string here
// and thrown through error_throw.
#include "gpt_cuda_ops.h"

#include <flashgpt/philox.h>

#include <flashgpt/cuda_check.h>
#include "kernels/classifier.cuh"
#include "kernels/dropout.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/optimizer.cuh"

#include <algorithm>
#include <initializer_list>
#include <string>

namespace flashgpt {
[[noreturn]] void error_throw(const char* file, int line, const std::string& message);
}

namespace flashgpt::model_cuda {
namespace {

#define MODEL_CUDA_REQUIRE(cond, message)                                  \
  do {                                                                     \
    if (!(cond)) ::flashgpt::error_throw(__FILE__, __LINE__, (message));   \
  } while (0)

std::string num(int64_t v) { return std::to_string(v); }

void require_pointer(const void* p, const char* op, const char* name) {
  MODEL_CUDA_REQUIRE(p != nullptr, std::string(op) + ": " + name + " must not be null");
}

void require_aligned16(const void* p, const char* op, const char* name) {
  MODEL_CUDA_REQUIRE(reinterpret_cast<uintptr_t>(p) % 16 == 0,
                     std::string(op) + ": " + name + " must be 16-byte aligned for vector access");
}

void require_rows(int64_t N, int C, const char* op) {
  MODEL_CUDA_REQUIRE(N >= 0 && C > 0, std::string(op) + ": needs N >= 0 rows of C > 0 channels, got N " + num(N) +
                                          ", C " + num(C));
}

// A bf16 output's row stride: at least C, and where C % 8 == 0 (the vector paths' 16-byte
// rows) a multiple of 8.
void require_row_stride(int64_t ld, int C, const char* op) {
  MODEL_CUDA_REQUIRE(ld >= C && (C % 8 != 0 || ld % 8 == 0),
                     std::string(op) + ": the output's row stride " + num(ld) + " must be at least C " + num(C) +
                         (C % 8 == 0 ? " and a multiple of 8" : ""));
}

void require_site(const DropoutSite& d, const char* op) {
  MODEL_CUDA_REQUIRE(d.threshold <= 256, std::string(op) + ": dropout threshold must be in [0, 256], got " +
                                             num(d.threshold));
}

// Thread-block clusters need compute capability 9.0 (asked once per process, of the
// device current at the first call).
bool device_has_clusters() {
  static const bool has = [] {
    int device = 0, major = 0;
    FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
    FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 9;
  }();
  return has;
}

}  // namespace

DropoutSite dropout_site(uint64_t seed, uint64_t step, int64_t site, float p) {
  DropoutSite d;
  d.seed = seed;
  d.step = step;
  d.site = site;
  d.threshold = dropout_threshold(p);
  d.scale = static_cast<float>(dropout_keep_scale(d.threshold));
  return d;
}

int device_sm_count() {
  int device = 0, count = 0;
  FLASHGPT_CUDA_CHECK(cudaGetDevice(&device));
  FLASHGPT_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

void encoder_forward(float* x0, const int32_t* tokens, const float* wte, const float* wpe, int64_t N, int T, int C,
                     const DropoutSite& drop, cudaStream_t stream) {
  const char* op = "encoder forward (CUDA)";
  require_rows(N, C, op);
  MODEL_CUDA_REQUIRE(T > 0 && N % T == 0, std::string(op) + ": N " + num(N) + " must be a multiple of T " + num(T));
  require_pointer(x0, op, "x0");
  require_pointer(tokens, op, "tokens");
  require_pointer(wte, op, "wte");
  require_pointer(wpe, op, "wpe");
  require_site(drop, op);
  if (C % 16 == 0) {  // the vector path reads rows as float4
    require_aligned16(x0, op, "x0");
    require_aligned16(wte, op, "wte");
    require_aligned16(wpe, op, "wpe");
  }
  if (N == 0) return;
  encoder_forward_launch(x0, tokens, wte, wpe, N, T, C, drop, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("encoder_forward_kernel");
}

void encoder_backward_wpe(float* dwpe, const float* dx0, int B, int T, int C, cudaStream_t stream) {
  const char* op = "encoder backward (CUDA)";
  MODEL_CUDA_REQUIRE(B >= 0 && T > 0 && C > 0, std::string(op) + ": bad shape B " + num(B) + ", T " + num(T) +
                                                   ", C " + num(C));
  require_pointer(dwpe, op, "dwpe");
  require_pointer(dx0, op, "dx0");
  encoder_backward_wpe_launch(dwpe, dx0, B, T, C, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("encoder_backward_wpe_kernel");
}

void encoder_backward_wte(float* dwte, const float* dx0, const int32_t* unique_tokens, const int32_t* starts,
                          const int32_t* positions, const int32_t* unique_count, int64_t max_unique, int C,
                          cudaStream_t stream) {
  const char* op = "encoder backward (CUDA)";
  MODEL_CUDA_REQUIRE(C > 0 && max_unique >= 0 && max_unique < (int64_t{1} << 31),
                     std::string(op) + ": bad C " + num(C) + " or max_unique " + num(max_unique));
  require_pointer(dwte, op, "dwte");
  require_pointer(dx0, op, "dx0");
  require_pointer(unique_tokens, op, "unique_tokens");
  require_pointer(starts, op, "starts");
  require_pointer(positions, op, "positions");
  require_pointer(unique_count, op, "unique_count");
  if (max_unique == 0) return;
  encoder_backward_wte_launch(dwte, dx0, unique_tokens, starts, positions, unique_count, max_unique, C, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("encoder_backward_wte_kernel");
}

void residual_forward(float* out, const float* in, const bf16* y, int64_t N, int C, const DropoutSite& drop,
                      cudaStream_t stream) {
  const char* op = "residual forward (CUDA)";
  require_rows(N, C, op);
  require_pointer(out, op, "out");
  require_pointer(in, op, "in");
  require_pointer(y, op, "y");
  require_site(drop, op);
  if (C % 16 == 0) {
    require_aligned16(out, op, "out");
    require_aligned16(in, op, "in");
    require_aligned16(y, op, "y");
  }
  if (N == 0) return;
  residual_forward_launch(out, in, y, N, C, drop, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("residual_forward_kernel");
}

void dropout_backward(bf16* dy, const float* dout, int64_t N, int C, const DropoutSite& drop, cudaStream_t stream) {
  const char* op = "dropout backward (CUDA)";
  require_rows(N, C, op);
  require_pointer(dy, op, "dy");
  require_pointer(dout, op, "dout");
  require_site(drop, op);
  if (C % 16 == 0) {
    require_aligned16(dy, op, "dy");
    require_aligned16(dout, op, "dout");
  }
  if (N == 0) return;
  dropout_backward_launch(dy, dout, N, C, drop, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("dropout_backward_kernel<bf16>");
}

void dropout_backward(float* dy, const float* dout, int64_t N, int C, const DropoutSite& drop, cudaStream_t stream) {
  const char* op = "dropout backward (CUDA)";
  require_rows(N, C, op);
  require_pointer(dy, op, "dy");
  require_pointer(dout, op, "dout");
  require_site(drop, op);
  if (C % 16 == 0) {
    require_aligned16(dy, op, "dy");
    require_aligned16(dout, op, "dout");
  }
  if (N == 0) return;
  dropout_backward_launch(dy, dout, N, C, drop, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("dropout_backward_kernel<float>");
}

void layernorm_forward(bf16* out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t N,
                       int C, cudaStream_t stream, int64_t ld_out) {
  const char* op = "layernorm forward (CUDA)";
  require_rows(N, C, op);
  if (ld_out == 0) ld_out = C;
  require_row_stride(ld_out, C, op);
  require_pointer(out, op, "out");
  require_pointer(mean, op, "mean");
  require_pointer(rstd, op, "rstd");
  require_pointer(x, op, "x");
  require_pointer(w, op, "w");
  require_pointer(b, op, "b");
  if (C % 128 == 0) {  // the vector path: float4 rows, 8-byte bf16 groups
    for (const void* p : {static_cast<const void*>(out), static_cast<const void*>(x), static_cast<const void*>(w),
                          static_cast<const void*>(b)})
      require_aligned16(p, op, "every tensor");
  }
  if (N == 0) return;
  layernorm_forward_launch(out, mean, rstd, x, w, b, N, C, ld_out, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("layernorm_forward_kernel");
}

void residual_layernorm_forward(float* out, bf16* ln, float* mean, float* rstd, const float* in, const bf16* y,
                                const float* w, const float* b, int64_t N, int C, const DropoutSite& drop,
                                cudaStream_t stream, int64_t ld_ln) {
  const char* op = "residual + layernorm forward (CUDA)";
  require_rows(N, C, op);
  if (ld_ln == 0) ld_ln = C;
  require_row_stride(ld_ln, C, op);
  require_pointer(out, op, "out");
  require_pointer(ln, op, "ln");
  require_pointer(mean, op, "mean");
  require_pointer(rstd, op, "rstd");
  require_pointer(in, op, "in");
  require_pointer(y, op, "y");
  require_pointer(w, op, "w");
  require_pointer(b, op, "b");
  require_site(drop, op);
  bool aligned = true;
  for (const void* p : {static_cast<const void*>(out), static_cast<const void*>(ln), static_cast<const void*>(in),
                        static_cast<const void*>(y), static_cast<const void*>(w), static_cast<const void*>(b)})
    aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (!residual_layernorm_fusable(C) || !aligned) {
    residual_forward(out, in, y, N, C, drop, stream);
    layernorm_forward(ln, mean, rstd, out, w, b, N, C, stream, ld_ln);
    return;
  }
  if (N == 0) return;
  residual_layernorm_forward_launch(out, ln, mean, rstd, in, y, w, b, N, C, ld_ln, drop, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("residual_layernorm_forward_kernel");
}

size_t layernorm_backward_partial_floats(int64_t N, int C) {
  // Rows of 3C with the next sums; the unfused fallback's column_sum takes the same workspace.
  const size_t sums = size_t(layernorm_backward_blocks(N, device_sm_count())) * 3 * size_t(C);
  return std::max(sums, column_sum_partial_floats(C));
}

void layernorm_backward(float* dx, bool accumulate, float* dw, float* db, float* partial, const bf16* dy,
                        const float* x, const float* mean, const float* rstd, const float* w, int64_t N, int C,
                        cudaStream_t stream) {
  layernorm_backward_dropout(dx, accumulate, dw, db, partial, dy, x, mean, rstd, w, N, C, nullptr, DropoutSite{},
                             stream);
}

void layernorm_backward_dropout(float* dx, bool accumulate, float* dw, float* db, float* partial, const bf16* dy,
                                const float* x, const float* mean, const float* rstd, const float* w, int64_t N, int C,
                                bf16* next_dy, const DropoutSite& next, cudaStream_t stream,
                                LayerNormBackwardKernel kernel, float* next_db) {
  const char* op = "layernorm backward (CUDA)";
  require_rows(N, C, op);
  require_pointer(dx, op, "dx");
  require_pointer(dw, op, "dw");
  require_pointer(db, op, "db");
  require_pointer(partial, op, "partial");
  require_pointer(dy, op, "dy");
  require_pointer(x, op, "x");
  require_pointer(mean, op, "mean");
  require_pointer(rstd, op, "rstd");
  require_pointer(w, op, "w");
  if (C % 128 == 0) {
    for (const void* p : {static_cast<const void*>(dx), static_cast<const void*>(dy), static_cast<const void*>(x),
                          static_cast<const void*>(w)})
      require_aligned16(p, op, "every tensor");
  }
  MODEL_CUDA_REQUIRE(layernorm_backward_shared_bytes(C) <= 227 * 1024,
                     std::string(op) + ": C " + num(C) + " needs more shared memory than a block has");
  MODEL_CUDA_REQUIRE(next_db == nullptr || next_dy != nullptr,
                     std::string(op) + ": next_db sums next_dy, so it needs next_dy");
  const bool fused = next_dy != nullptr && C % 128 == 0;
  // The next sums inside the kernels where their third section of shared memory fits.
  const bool sums_fused =
      next_db != nullptr && fused && layernorm_backward_shared_bytes(C, /*sum_next=*/true) <= 227 * 1024;
  const size_t shared = layernorm_backward_shared_bytes(C, sums_fused);
  static size_t raised_to = 0;  // the most shared memory the limit was raised to
  if (shared > 48 * 1024 && raised_to < shared) {
    FLASHGPT_CUDA_CHECK(layernorm_backward_allow_shared(shared));
    raised_to = shared;
  }
  const int blocks = layernorm_backward_blocks(N, device_sm_count());
  if (next_dy != nullptr) {
    require_site(next, op);
    if (fused) require_aligned16(next_dy, op, "next_dy");
  }
  layernorm_backward_launch(dx, accumulate, dw, db, partial, blocks, dy, x, mean, rstd, w, N, C, stream,
                            fused ? next_dy : nullptr, next, kernel == LayerNormBackwardKernel::registers,
                            device_sm_count(), sums_fused ? next_db : nullptr);
  FLASHGPT_CUDA_CHECK_LAUNCH("layernorm_backward_kernel");
  if (next_dy != nullptr && !fused) dropout_backward(next_dy, dx, N, C, next, stream);
  // The next sums where the kernels do not take them: column_sum over what was written (the
  // same bf16 values, summed in another order), in the same workspace.
  if (next_db != nullptr && !sums_fused) column_sum(next_db, partial, next_dy, N, C, stream);
}

void classifier_softmax_xent(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V, int64_t Vp,
                             float dloss, bool write_grad, cudaStream_t stream, ClassifierKernel kernel,
                             int grid_blocks_per_sm, int grid_sms) {
  const char* op = "classifier (CUDA)";
  MODEL_CUDA_REQUIRE(rows >= 0 && V > 0 && Vp >= V && Vp % 8 == 0,
                     std::string(op) + ": needs rows >= 0, 0 < V <= Vp and Vp % 8 == 0, got rows " + num(rows) +
                         ", V " + num(V) + ", Vp " + num(Vp));
  require_pointer(logits, op, "logits");
  require_pointer(losses, op, "losses");
  require_pointer(targets, op, "targets");
  require_aligned16(logits, op, "logits");
  if (kernel == ClassifierKernel::l2_two_pass) {
    MODEL_CUDA_REQUIRE(classifier_grid_blocks_valid(grid_blocks_per_sm),
                       std::string(op) + ": l2_two_pass needs 1, 2, 4 or 8 blocks per SM, got " +
                           num(grid_blocks_per_sm));
    MODEL_CUDA_REQUIRE(grid_sms >= 0, std::string(op) + ": grid_sms must be 0 (all) or positive, got " + num(grid_sms));
    const int sms = device_sm_count();
    classifier_grid_launch(logits, losses, targets, rows, V, Vp, dloss, write_grad, grid_blocks_per_sm,
                           grid_sms == 0 ? sms : std::min(grid_sms, sms), stream);
    FLASHGPT_CUDA_CHECK_LAUNCH("classifier_grid_kernel");
    return;
  }
  if (kernel == ClassifierKernel::cluster && Vp <= kClusterMaxColumns && device_has_clusters()) {
    FLASHGPT_CUDA_CHECK(classifier_cluster_launch(logits, losses, targets, rows, V, Vp, dloss, write_grad, stream));
    FLASHGPT_CUDA_CHECK_LAUNCH("classifier_cluster_kernel");
    return;
  }
  classifier_launch(logits, losses, targets, rows, V, Vp, dloss, write_grad, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("classifier_kernel");
}

void loss_sum(double* out, const float* losses, int64_t n, cudaStream_t stream) {
  require_pointer(out, "loss sum (CUDA)", "out");
  require_pointer(losses, "loss sum (CUDA)", "losses");
  loss_sum_launch(out, losses, n, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("loss_sum_kernel");
}

void adamw_update(float* params, bf16* params_bf16, const float* grads, float* m, float* v, int64_t n,
                  const ParamSegments& segments, const AdamWArgs& args, cudaStream_t stream) {
  const char* op = "AdamW (CUDA)";
  require_pointer(params, op, "params");
  require_pointer(params_bf16, op, "params_bf16");
  require_pointer(grads, op, "grads");
  require_pointer(m, op, "m");
  require_pointer(v, op, "v");
  MODEL_CUDA_REQUIRE(segments.count > 0 && segments.count <= kMaxSegments && segments.end[segments.count - 1] == n,
                     std::string(op) + ": the segments must cover the " + num(n) + " parameters exactly");
  if (n == 0) return;
  adamw_launch(params, params_bf16, grads, m, v, n, segments, args, device_sm_count(), stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("adamw_kernel");
}


size_t sum_squares_partial_doubles() { return kNormBlocks; }

void sum_squares(double* out, double* partial, const float* x, int64_t n, cudaStream_t stream) {
  require_pointer(out, "sum of squares (CUDA)", "out");
  require_pointer(partial, "sum of squares (CUDA)", "partial");
  require_pointer(x, "sum of squares (CUDA)", "x");
  sum_squares_launch(out, partial, x, n, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("sum_squares_kernel");
}

size_t column_sum_partial_floats(int M) { return size_t(kColumnRowBlocks) * size_t(M); }

void column_sum(float* out, float* partial, const bf16* x, int64_t N, int M, cudaStream_t stream) {
  const char* op = "column sum (CUDA)";
  require_rows(N, M, op);
  require_pointer(out, op, "out");
  require_pointer(partial, op, "partial");
  require_pointer(x, op, "x");
  column_sum_launch(out, partial, x, N, M, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("column_sum_kernel");
}

namespace {
template <typename In>
void add_rows_checked(float* out, const In* in, int64_t rows, int64_t width, int64_t in_stride, cudaStream_t stream) {
  require_pointer(out, "add rows (CUDA)", "out");
  require_pointer(in, "add rows (CUDA)", "in");
  MODEL_CUDA_REQUIRE(rows >= 0 && width >= 0 && in_stride >= width,
                     "add rows (CUDA): needs rows, width >= 0 and in_stride >= width, got rows " + num(rows) +
                         ", width " + num(width) + ", in_stride " + num(in_stride));
  if (rows == 0 || width == 0) return;
  add_rows_launch(out, in, rows, width, in_stride, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("add_rows_kernel");
}
}  // namespace

void add_rows(float* out, const float* in, int64_t rows, int64_t width, int64_t in_stride, cudaStream_t stream) {
  add_rows_checked(out, in, rows, width, in_stride, stream);
}

void add_rows(float* out, const bf16* in, int64_t rows, int64_t width, int64_t in_stride, cudaStream_t stream) {
  add_rows_checked(out, in, rows, width, in_stride, stream);
}

void split_weight_bias_grad(float* dw, float* db, const float* ext, int64_t out, int in, int64_t ld, bool accumulate,
                            cudaStream_t stream) {
  const char* op = "split weight and bias gradient (CUDA)";
  require_pointer(dw, op, "dw");
  require_pointer(db, op, "db");
  require_pointer(ext, op, "ext");
  MODEL_CUDA_REQUIRE(out >= 0 && in > 0 && ld > in, std::string(op) + ": needs out >= 0, in > 0 and ld > in, got out " +
                                                        num(out) + ", in " + num(in) + ", ld " + num(ld));
  if (out == 0) return;
  split_weight_bias_grad_launch(dw, db, ext, out, in, ld, accumulate, device_sm_count(), stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("split_weight_bias_grad_kernel");
}

void write_ones_column(bf16* x, int64_t rows, int C, int64_t ld, cudaStream_t stream) {
  const char* op = "write ones column (CUDA)";
  require_pointer(x, op, "x");
  MODEL_CUDA_REQUIRE(rows >= 0 && C >= 0 && ld > C, std::string(op) + ": needs rows >= 0, C >= 0 and ld > C, got rows " +
                                                         num(rows) + ", C " + num(C) + ", ld " + num(ld));
  if (rows == 0) return;
  write_ones_column_launch(x, rows, C, ld, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("write_ones_column_kernel");
}

void float_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  require_pointer(out, "float to bf16 (CUDA)", "out");
  require_pointer(in, "float to bf16 (CUDA)", "in");
  if (n == 0) return;
  float_to_bf16_launch(out, in, n, stream);
  FLASHGPT_CUDA_CHECK_LAUNCH("float_to_bf16_kernel");
}

}  // namespace flashgpt::model_cuda
