// bf16 matrix products through cuBLASLt (fp32 accumulation), with the epilogues the model
// uses. Row-major language: every call is Y = X W^T (forward), dX = dY W (backward input),
// or dW += dY^T X (backward weight, fp32 output accumulated in place). Plans (descriptors
// and the chosen algorithm) are cached per shape, so within a process the same shape always
// runs the same algorithm.
//
// With autotuning (on unless FLASHGPT_MATMUL_AUTOTUNE=0, read once; docs/model_gpu.md, v8) a
// new plan times up to kAutotuneCandidates heuristic results on its own shapes, inputs and
// stream, writing into scratch outputs allocated for the timing (never into D, aux or the
// bias gradient), and keeps the fastest, so two processes may pick different algorithms.
// Without it, and always in deterministic mode, the algorithm is cuBLASLt's first heuristic
// result and repeat runs give the same bits. A plan first met while its stream captures a
// CUDA graph runs heuristic #0 in that graph and is tuned later, outside the capture: by
// tune_pending, or at its next eager call. FLASHGPT_MATMUL_AUTOTUNE_LOG=1 prints one line per
// tuned plan to stderr.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

namespace flashgpt::model_cuda {

enum class Epilogue {
  none,
  bias,           // Y = X W^T + b
  gelu_aux_bias,  // pre = X W^T + b written to aux, Y = gelu_tanh(pre)
  dgelu,          // dX = (dY W) * gelu_tanh'(aux)
  // The backward epilogue with the bias gradient (written, not accumulated):
  bgradb,         // dW += dY^T X, dbias (out) = column sums of dY
};

class Matmul {
 public:
  // workspace_bytes of device memory are allocated here, once (cuBLASLt's scratch).
  Matmul(size_t workspace_bytes, bool deterministic);
  ~Matmul();
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;

  // Y (rows, out) bf16 = X (rows, in) bf16 W (out, in)^T [+ bias (out) bf16] with the
  // epilogue: none, bias, or gelu_aux_bias (aux (rows, out) bf16 gets the pre-activation).
  // ld_x: X's row stride, in (or 0) or more (a LayerNorm output with constant columns after
  // its `in` channels, FLASHGPT_BIAS_ONES).
  void forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t rows, int64_t in,
               int64_t out, Epilogue epilogue, const __nv_bfloat16* bias, __nv_bfloat16* aux, cudaStream_t stream,
               int64_t ld_x = 0);
  // Y (rows, out) fp32 = X W^T (no epilogue): logits for forward_logits.
  void forward_f32(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t rows, int64_t in, int64_t out,
                   cudaStream_t stream);
  // dX (rows, in) bf16 = dY (rows, out) W (out, in); with dgelu, times gelu'(aux (rows, in)).
  void backward_input(__nv_bfloat16* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w, int64_t rows, int64_t in,
                      int64_t out, Epilogue epilogue, const __nv_bfloat16* aux, cudaStream_t stream);
  // dW (out, in) fp32 += dY (rows, out)^T X (rows, in); without accumulate, = (dW not read).
  void backward_weight(float* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x, int64_t rows, int64_t in,
                       int64_t out, cudaStream_t stream, bool accumulate = true);
  // backward_weight with the bias gradient folded in by cuBLASLt's BGRADB epilogue: dbias
  // (out) = column sums of dY, written, not accumulated, as fp32 where cuBLASLt takes an fp32
  // bias for the shape, else as bf16 (the return value says which; dbias must hold the fp32
  // size). It returns none, having done nothing, where cuBLASLt offers no algorithm or in
  // deterministic mode (the epilogue's reduction is not documented as run-to-run exact): the
  // caller then sums the columns itself. The GELU backward keeps DGELU plus column sums: the
  // DGELU_BGRAD epilogue was slower at the seed size (docs/model_gpu.md).
  enum class BiasGrad { none, f32, bf16 };
  BiasGrad backward_weight_bgrad(float* dw, void* dbias, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                                 int64_t rows, int64_t in, int64_t out, cudaStream_t stream);

  // Autotuning for this instance (default: FLASHGPT_MATMUL_AUTOTUNE); inactive in
  // deterministic mode whatever this says. Plans made before the call keep their algorithm.
  void set_autotune(bool on) { autotune_ = on; }
  // cuBLASLt's SM_COUNT_TARGET for the plans made after the call (0: the device's count):
  // algorithms chosen for that many multiprocessors, where another stream runs beside.
  void set_sm_count_target(int sms) { sm_count_target_ = sms; }
  // Times the plans made while their stream was capturing (they run heuristic #0 so far) on
  // `stream`, which must not be capturing, with the input pointers (A, B, a forward bias,
  // dgelu's aux) their first call was given: those must still hold valid memory. Returns
  // true where a plan now runs another algorithm, so that graphs captured with it should be
  // captured again to use it. Synchronizes with `stream`.
  bool tune_pending(cudaStream_t stream);
  int tuned_plans() const { return tuned_plans_; }     // plans timed so far
  int pending_plans() const { return static_cast<int>(pending_.size()); }

  static constexpr int kAutotuneCandidates = 16;

  struct Plan;

 private:
  // Column-major D (m, n) = op(A) op(B) (+ beta C, C = D); see matmul_cublaslt.cc. With
  // `optional`, returns false (nothing enqueued) where no algorithm exists, else throws.
  bool run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
           int64_t ldb, void* d, int64_t ldd, bool d_fp32, float beta, Epilogue epilogue, const void* bias,
           void* aux, int64_t ld_aux, cudaStream_t stream, bool optional = false);

  void* handle_ = nullptr;  // cublasLtHandle_t
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  bool deterministic_ = false;
  bool last_bias_bf16_ = false;  // the bias type of the last optional epilogue run
  bool autotune_ = false;
  int sm_count_target_ = 0;
  int tuned_plans_ = 0;
  std::vector<Plan*> pending_;  // made while capturing, not yet tuned (owned by plans_)

  bool tuning() const { return autotune_ && !deterministic_; }
  // Times plan.candidates with the given inputs on `stream` (not capturing) and keeps the
  // fastest; returns true where that is not heuristic #0.
  bool tune(Plan& plan, const void* a, const void* b, const void* bias_in, const void* aux_in, cudaStream_t stream);
  std::map<std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int>,
           std::unique_ptr<Plan>>
      plans_;
};

}  // namespace flashgpt::model_cuda
