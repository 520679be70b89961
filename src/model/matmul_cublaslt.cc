// cuBLASLt plans for the model's three product shapes. cuBLASLt is column-major: a
// row-major (r, c) matrix is a column-major (c, r) one, so Y = X W^T (row-major) is the
// column-major D (out, rows) = op_T(W: in x out) op_N(X: in x rows), and so on below.
#include "matmul_cublaslt.h"

#include <flashgpt/error.h>

#include <flashgpt/cuda_check.h>

#include <cublasLt.h>

#include <algorithm>
#include <bit>

namespace flashgpt::model_cuda {

#define MODEL_CUBLAS_CHECK(call)                                                                        \
  do {                                                                                                  \
    const cublasStatus_t status_ = (call);                                                              \
    FLASHGPT_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt call `{}` failed: {} ({})", #call,       \
                   cublasLtGetStatusString(status_), static_cast<int>(status_));                        \
  } while (0)

struct Matmul::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool supported = true;  // false: cuBLASLt found no algorithm (an optional epilogue)
  bool bias_bf16 = false;  // a bias-gradient epilogue writes bf16 (cuBLASLt took no fp32 bias)
  ~Plan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

namespace {

cublasLtHandle_t lt(void* handle) { return static_cast<cublasLtHandle_t>(handle); }

// The largest power of two (up to 256) that divides the address; 256 for null.
int alignment_of(const void* p) {
  const auto bits = reinterpret_cast<uintptr_t>(p);
  if (bits == 0) return 256;
  const int low = std::countr_zero(bits);
  return low >= 8 ? 256 : 1 << low;
}

cublasLtEpilogue_t epilogue_of(Epilogue e) {
  switch (e) {
    case Epilogue::none: return CUBLASLT_EPILOGUE_DEFAULT;
    case Epilogue::bias: return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::gelu_aux_bias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case Epilogue::dgelu: return CUBLASLT_EPILOGUE_DGELU;
    case Epilogue::bgradb: return CUBLASLT_EPILOGUE_BGRADB;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::none: return "none";
    case Epilogue::bias: return "bias";
    case Epilogue::gelu_aux_bias: return "gelu_aux_bias";
    case Epilogue::dgelu: return "dgelu";
    case Epilogue::bgradb: return "bgradb";
  }
  return "?";
}

}  // namespace

Matmul::Matmul(size_t workspace_bytes, bool deterministic)
    : workspace_bytes_(workspace_bytes), deterministic_(deterministic) {
  cublasLtHandle_t handle = nullptr;
  MODEL_CUBLAS_CHECK(cublasLtCreate(&handle));
  handle_ = handle;
  if (workspace_bytes_ > 0) FLASHGPT_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

Matmul::~Matmul() {
  plans_.clear();
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(lt(handle_));
}

bool Matmul::run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                 const void* b, int64_t ldb, void* d, int64_t ldd, bool d_fp32, float beta, Epilogue epilogue,
                 const void* bias, void* aux, int64_t ld_aux, cudaStream_t stream, bool optional) {
  if (m == 0 || n == 0) return true;
  const int align = std::min({alignment_of(a), alignment_of(b), alignment_of(d), alignment_of(aux)});
  FLASHGPT_CHECK(align >= 2, "matmul (cuBLASLt): operands must be at least 2-byte aligned");
  const auto key = std::make_tuple(int{trans_a}, int{trans_b}, m, n, k, lda, ldb, ldd, int{d_fp32}, int{beta != 0.0f},
                                   static_cast<int>(epilogue), align);
  std::unique_ptr<Plan>& slot = plans_[key];
  if (!slot) {
    auto plan = std::make_unique<Plan>();
    MODEL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    const cublasLtEpilogue_t epi = epilogue_of(epilogue);
    MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    const cudaDataType_t bf16_type = CUDA_R_16BF, f32_type = CUDA_R_32F;
    if (epilogue == Epilogue::bias || epilogue == Epilogue::gelu_aux_bias) {
      MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type,
                                                        sizeof(bf16_type)));
      MODEL_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    const bool bias_grad = epilogue == Epilogue::bgradb;
    if (bias_grad) {  // fp32 bias gradients first; bf16 below if cuBLASLt refuses them
      MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &f32_type,
                                                        sizeof(f32_type)));
      MODEL_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    if (epilogue == Epilogue::gelu_aux_bias || epilogue == Epilogue::dgelu) {
      FLASHGPT_CHECK(ld_aux % 8 == 0, "matmul (cuBLASLt): the GELU epilogue needs an aux leading dimension that is a "
                                      "multiple of 8, got {}", ld_aux);
      MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux,
                                                        sizeof(ld_aux)));
      MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE,
                                                        &bf16_type, sizeof(bf16_type)));
      MODEL_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
    }
    const cudaDataType_t d_type = d_fp32 ? CUDA_R_32F : CUDA_R_16BF;
    MODEL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, trans_a ? k : m, trans_a ? m : k, lda));
    MODEL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, trans_b ? n : k, trans_b ? k : n, ldb));
    MODEL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, d_type, m, n, ldd));
    MODEL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->d, d_type, m, n, ldd));

    cublasLtMatmulPreference_t pref = nullptr;
    MODEL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    struct PrefGuard {
      cublasLtMatmulPreference_t p;
      ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
    } guard{pref};
    MODEL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &workspace_bytes_, sizeof(workspace_bytes_)));
    const uint32_t align_bytes = static_cast<uint32_t>(align);
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      MODEL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align_bytes, sizeof(align_bytes)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    if (deterministic_) {
      // Split-K reductions in the output type can depend on scheduling; keep the ones that do not
      // (none, or in a workspace), and fall back to any algorithm if that leaves nothing.
      const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_INPLACE |
                            CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      MODEL_CUBLAS_CHECK(
          cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask)));
      MODEL_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt(handle_), plan->desc, plan->a, plan->b, plan->c, plan->d,
                                                        pref, 1, &result, &found));
      if (found == 0) {
        const uint32_t any = CUBLASLT_REDUCTION_SCHEME_MASK;
        MODEL_CUBLAS_CHECK(
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &any, sizeof(any)));
      }
    }
    if (found == 0) {
      const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt(handle_), plan->desc, plan->a, plan->b, plan->c,
                                                                   plan->d, pref, 1, &result, &found);
      if (optional && status != CUBLAS_STATUS_SUCCESS) {
        found = 0;  // H100, cuBLASLt 13: BGRADB with an fp32 bias answers "invalid value" (7)
      } else {
        MODEL_CUBLAS_CHECK(status);
      }
      if (found == 0 && optional && bias_grad) {
        MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type,
                                                          sizeof(bf16_type)));
        const cublasStatus_t retry = cublasLtMatmulAlgoGetHeuristic(lt(handle_), plan->desc, plan->a, plan->b,
                                                                    plan->c, plan->d, pref, 1, &result, &found);
        if (retry != CUBLAS_STATUS_SUCCESS) found = 0;
        plan->bias_bf16 = found > 0;
      }
    }
    if (found == 0 && optional) {
      plan->supported = false;
      slot = std::move(plan);
      return false;
    }
    FLASHGPT_CHECK(found > 0,
                   "matmul (cuBLASLt): no algorithm for m {} n {} k {} (trans {}{}, ld {} {} {}, output {}, epilogue "
                   "{}, alignment {} bytes)",
                   m, n, k, trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', lda, ldb, ldd, d_fp32 ? "fp32" : "bf16",
                   epilogue_name(epilogue), align);
    plan->algo = result.algo;
    slot = std::move(plan);
  }
  Plan& plan = *slot;
  if (!plan.supported) return false;
  last_bias_bf16_ = plan.bias_bf16;
  if (epilogue == Epilogue::bias || epilogue == Epilogue::gelu_aux_bias || epilogue == Epilogue::bgradb) {
    MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  if (epilogue == Epilogue::gelu_aux_bias || epilogue == Epilogue::dgelu) {
    MODEL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
  }
  const float alpha = 1.0f;
  MODEL_CUBLAS_CHECK(cublasLtMatmul(lt(handle_), plan.desc, &alpha, a, plan.a, b, plan.b, &beta, d, plan.c, d, plan.d,
                                    &plan.algo, workspace_, workspace_bytes_, stream));
  return true;
}

void Matmul::forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t rows, int64_t in,
                     int64_t out, Epilogue epilogue, const __nv_bfloat16* bias, __nv_bfloat16* aux,
                     cudaStream_t stream) {
  FLASHGPT_CHECK(epilogue == Epilogue::none || epilogue == Epilogue::bias || epilogue == Epilogue::gelu_aux_bias,
                 "matmul forward: epilogue {} is a backward one", epilogue_name(epilogue));
  FLASHGPT_CHECK(epilogue == Epilogue::none || bias != nullptr, "matmul forward: epilogue {} needs a bias",
                 epilogue_name(epilogue));
  FLASHGPT_CHECK(epilogue != Epilogue::gelu_aux_bias || aux != nullptr, "matmul forward: gelu_aux_bias needs aux");
  run(/*trans_a=*/true, /*trans_b=*/false, out, rows, in, w, in, x, in, y, out, /*d_fp32=*/false, 0.0f, epilogue, bias,
      aux, out, stream);
}

void Matmul::forward_f32(float* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t rows, int64_t in,
                         int64_t out, cudaStream_t stream) {
  run(/*trans_a=*/true, /*trans_b=*/false, out, rows, in, w, in, x, in, y, out, /*d_fp32=*/true, 0.0f, Epilogue::none,
      nullptr, nullptr, 0, stream);
}

void Matmul::backward_input(__nv_bfloat16* dx, const __nv_bfloat16* dy, const __nv_bfloat16* w, int64_t rows,
                            int64_t in, int64_t out, Epilogue epilogue, const __nv_bfloat16* aux, cudaStream_t stream) {
  FLASHGPT_CHECK(epilogue == Epilogue::none || epilogue == Epilogue::dgelu,
                 "matmul backward: epilogue {} is a forward one", epilogue_name(epilogue));
  FLASHGPT_CHECK(epilogue == Epilogue::none || aux != nullptr, "matmul backward: dgelu needs aux");
  run(/*trans_a=*/false, /*trans_b=*/false, in, rows, out, w, in, dy, out, dx, in, /*d_fp32=*/false, 0.0f, epilogue,
      nullptr, const_cast<__nv_bfloat16*>(aux), in, stream);
}

void Matmul::backward_weight(float* dw, const __nv_bfloat16* dy, const __nv_bfloat16* x, int64_t rows, int64_t in,
                             int64_t out, cudaStream_t stream) {
  if (rows == 0) return;
  run(/*trans_a=*/false, /*trans_b=*/true, in, out, rows, x, in, dy, out, dw, in, /*d_fp32=*/true, 1.0f,
      Epilogue::none, nullptr, nullptr, 0, stream);
}

Matmul::BiasGrad Matmul::backward_weight_bgrad(float* dw, void* dbias, const __nv_bfloat16* dy,
                                               const __nv_bfloat16* x, int64_t rows, int64_t in, int64_t out,
                                               cudaStream_t stream) {
  FLASHGPT_CHECK(dbias != nullptr, "matmul backward_weight_bgrad: dbias must not be null");
  if (deterministic_ || rows == 0) return BiasGrad::none;
  if (!run(/*trans_a=*/false, /*trans_b=*/true, in, out, rows, x, in, dy, out, dw, in, /*d_fp32=*/true, 1.0f,
           Epilogue::bgradb, dbias, nullptr, 0, stream, /*optional=*/true)) {
    return BiasGrad::none;
  }
  return last_bias_bf16_ ? BiasGrad::bf16 : BiasGrad::f32;
}

}  // namespace flashgpt::model_cuda
