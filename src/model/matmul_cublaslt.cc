// cuBLASLt plans for the model's three product shapes. cuBLASLt is column-major: a
// row-major (r, c) matrix is a column-major (c, r) one, so Y = X W^T (row-major) is the
// column-major D (out, rows) = op_T(W: in x out) op_N(X: in x rows), and so on below.
#include "matmul_cublaslt.h"

#include <flashgpt/env_switch.h>
#include <flashgpt/error.h>

#include <flashgpt/cuda_check.h>

#include <cublasLt.h>

#include <algorithm>
#include <bit>
#include <cstdio>

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
  // What autotuning needs: the shape (for the scratch outputs and the log line), the
  // heuristic results still to time (empty once tuned, or when not tuning) and, for a plan
  // made while capturing, the input pointers of its first call.
  bool trans_a = false, trans_b = false, d_fp32 = false;
  int64_t m = 0, n = 0, k = 0, ldd = 0, ld_aux = 0;
  float beta = 0.0f;
  Epilogue epilogue = Epilogue::none;
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;
  const void* pending_a = nullptr;
  const void* pending_b = nullptr;
  const void* pending_bias = nullptr;
  const void* pending_aux = nullptr;
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

// FLASHGPT_MATMUL_AUTOTUNE / FLASHGPT_MATMUL_AUTOTUNE_LOG (flashgpt/env_switch.h), read once.
// On by default since the H100 A/B of 2026-12-07 (docs/model_gpu.md, v8): the logits product
// alone ran 1.80 -> 1.59 ms a chunk; FLASHGPT_MATMUL_AUTOTUNE=0 keeps heuristic #0.
bool autotune_env() {
  static const bool on = env_switch("FLASHGPT_MATMUL_AUTOTUNE", true);
  return on;
}
bool autotune_log_env() {
  static const bool on = env_switch("FLASHGPT_MATMUL_AUTOTUNE_LOG", false);
  return on;
}

// True where `stream` is capturing a graph (or the query itself fails, as on the legacy
// stream while another stream captures in global mode): no synchronization, no cudaMalloc.
bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

constexpr int kAutotuneWarmups = 3;   // launches before each candidate's timing
constexpr int kAutotuneLaunches = 5;  // timed launches per candidate

size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The per-call pointers of the plan's epilogue (the descriptor is shared by all calls of the shape).
void set_epilogue_pointers(Matmul::Plan& plan, const void* bias, const void* aux) {
  const Epilogue e = plan.epilogue;
  if (e == Epilogue::bias || e == Epilogue::gelu_aux_bias || e == Epilogue::bgradb) {
    MODEL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  if (e == Epilogue::gelu_aux_bias || e == Epilogue::dgelu) {
    MODEL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
  }
}

}  // namespace

Matmul::Matmul(size_t workspace_bytes, bool deterministic)
    : workspace_bytes_(workspace_bytes), deterministic_(deterministic), autotune_(autotune_env()) {
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
    if (sm_count_target_ > 0) {
      const int32_t target = sm_count_target_;
      MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &target,
                                                        sizeof(target)));
    }
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
    // Tuning asks for kAutotuneCandidates results (best estimate first) where today's choice asks for one.
    const bool tune_plan = tuning();
    const int wanted = tune_plan ? kAutotuneCandidates : 1;
    std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(wanted));
    cublasLtMatmulHeuristicResult_t& result = results[0];
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
                                                                   plan->d, pref, wanted, results.data(), &found);
      if (optional && status != CUBLAS_STATUS_SUCCESS) {
        found = 0;  // H100, cuBLASLt 13: BGRADB with an fp32 bias answers "invalid value" (7)
      } else {
        MODEL_CUBLAS_CHECK(status);
      }
      if (found == 0 && optional && bias_grad) {
        MODEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type,
                                                          sizeof(bf16_type)));
        const cublasStatus_t retry = cublasLtMatmulAlgoGetHeuristic(lt(handle_), plan->desc, plan->a, plan->b,
                                                                    plan->c, plan->d, pref, wanted, results.data(),
                                                                    &found);
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
    plan->trans_a = trans_a;
    plan->trans_b = trans_b;
    plan->d_fp32 = d_fp32;
    plan->m = m;
    plan->n = n;
    plan->k = k;
    plan->ldd = ldd;
    plan->ld_aux = ld_aux;
    plan->beta = beta;
    plan->epilogue = epilogue;
    if (tune_plan) {
      plan->candidates.assign(results.begin(), results.begin() + found);
      // Inputs only: the outputs (D, aux of gelu_aux_bias, bgradb's bias) are never timed into.
      plan->pending_a = a;
      plan->pending_b = b;
      plan->pending_bias = epilogue == Epilogue::bias || epilogue == Epilogue::gelu_aux_bias ? bias : nullptr;
      plan->pending_aux = epilogue == Epilogue::dgelu ? aux : nullptr;
      pending_.push_back(plan.get());
    }
    slot = std::move(plan);
  }
  Plan& plan = *slot;
  if (!plan.supported) return false;
  if (!plan.candidates.empty() && !stream_capturing(stream)) {
    // A new plan, or one made while capturing, at its first eager call: time it now, on this
    // call's inputs (ordered after whatever this stream wrote into them).
    pending_.erase(std::find(pending_.begin(), pending_.end(), &plan));
    tune(plan, a, b, bias, aux, stream);
  }
  last_bias_bf16_ = plan.bias_bf16;
  set_epilogue_pointers(plan, bias, aux);
  const float alpha = 1.0f;
  MODEL_CUBLAS_CHECK(cublasLtMatmul(lt(handle_), plan.desc, &alpha, a, plan.a, b, plan.b, &beta, d, plan.c, d, plan.d,
                                    &plan.algo, workspace_, workspace_bytes_, stream));
  return true;
}

bool Matmul::tune(Plan& plan, const void* a, const void* b, const void* bias_in, const void* aux_in,
                  cudaStream_t stream) {
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;
  candidates.swap(plan.candidates);  // tuned once, whatever happens below
  ++tuned_plans_;
  const Epilogue epilogue = plan.epilogue;
  if (epilogue != Epilogue::bias && epilogue != Epilogue::gelu_aux_bias) bias_in = nullptr;
  if (epilogue != Epilogue::dgelu) aux_in = nullptr;
  // Scratch outputs: D (m, n) with ldd, which beta = 1 also reads (zeroed); the
  // pre-activation of gelu_aux_bias (m, n) with ld_aux; bgradb's bias gradient, one per column
  // of D (n = out of backward_weight_bias: dW is (in, out) column-major), fp32-sized.
  const size_t d_bytes = round_up_256(size_t(plan.ldd) * size_t(plan.n) * (plan.d_fp32 ? 4 : 2));
  const size_t aux_bytes =
      epilogue == Epilogue::gelu_aux_bias ? round_up_256(size_t(plan.ld_aux) * size_t(plan.n) * 2) : 0;
  const size_t bias_bytes = epilogue == Epilogue::bgradb ? round_up_256(size_t(plan.n) * 4) : 0;
  char* scratch = nullptr;
  const bool log = autotune_log_env();
  auto describe = [&] {
    std::fprintf(stderr, "matmul autotune: m %lld n %lld k %lld trans %c%c epilogue %s out %s%s beta %g: ",
                 static_cast<long long>(plan.m), static_cast<long long>(plan.n), static_cast<long long>(plan.k),
                 plan.trans_a ? 'T' : 'N', plan.trans_b ? 'T' : 'N', epilogue_name(epilogue),
                 plan.d_fp32 ? "fp32" : "bf16",
                 epilogue == Epilogue::bgradb ? (plan.bias_bf16 ? " (bias bf16)" : " (bias fp32)") : "",
                 static_cast<double>(plan.beta));
  };
  if (candidates.size() < 2) {
    if (log) {
      describe();
      std::fprintf(stderr, "%zu heuristic result(s), nothing to choose\n", candidates.size());
    }
    return false;
  }
  if (cudaMalloc(&scratch, d_bytes + aux_bytes + bias_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    if (log) {
      describe();
      std::fprintf(stderr, "no memory for %zu bytes of scratch outputs, heuristic #0 kept\n",
                   d_bytes + aux_bytes + bias_bytes);
    }
    return false;
  }
  struct Scratch {
    char* p;
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Scratch() {
      if (start) cudaEventDestroy(start);
      if (stop) cudaEventDestroy(stop);
      cudaFree(p);  // synchronizes: the timed launches are done
    }
  } guard{scratch};
  void* d = scratch;
  void* aux = epilogue == Epilogue::gelu_aux_bias ? scratch + d_bytes : const_cast<void*>(aux_in);
  const void* bias = epilogue == Epilogue::bgradb ? scratch + d_bytes + aux_bytes : bias_in;
  FLASHGPT_CUDA_CHECK(cudaMemsetAsync(d, 0, d_bytes, stream));
  set_epilogue_pointers(plan, bias, aux);  // every call sets its own again before it launches
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&guard.start));
  FLASHGPT_CUDA_CHECK(cudaEventCreate(&guard.stop));
  const float alpha = 1.0f;
  // Mean milliseconds per launch, or a negative value where cuBLASLt refuses the algorithm.
  auto time_ms = [&](const cublasLtMatmulAlgo_t& algo) -> float {
    auto launch = [&] {
      return cublasLtMatmul(lt(handle_), plan.desc, &alpha, a, plan.a, b, plan.b, &plan.beta, d, plan.c, d, plan.d,
                            &algo, workspace_, workspace_bytes_, stream);
    };
    for (int i = 0; i < kAutotuneWarmups; ++i) {
      if (launch() != CUBLAS_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        return -1.0f;
      }
    }
    FLASHGPT_CUDA_CHECK(cudaEventRecord(guard.start, stream));
    for (int i = 0; i < kAutotuneLaunches; ++i) {
      if (launch() != CUBLAS_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        return -1.0f;
      }
    }
    FLASHGPT_CUDA_CHECK(cudaEventRecord(guard.stop, stream));
    FLASHGPT_CUDA_CHECK(cudaEventSynchronize(guard.stop));
    float ms = 0.0f;
    FLASHGPT_CUDA_CHECK(cudaEventElapsedTime(&ms, guard.start, guard.stop));
    return ms / kAutotuneLaunches;
  };
  std::vector<float> ms(candidates.size(), -1.0f);
  int tried = 0;
  size_t best = 0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i].state != CUBLAS_STATUS_SUCCESS) continue;
    ms[i] = time_ms(candidates[i].algo);
    if (ms[i] < 0) continue;
    ++tried;
    if (ms[best] < 0 || ms[i] < ms[best]) best = i;
  }
  // #0 went first, perhaps on clocks still rising: time it again and keep its better time.
  if (ms[0] >= 0) {
    const float again = time_ms(candidates[0].algo);
    if (again >= 0 && again < ms[0]) ms[0] = again;
    if (ms[0] <= ms[best]) best = 0;
  }
  if (ms[best] < 0) best = 0;  // nothing ran: #0 stays, as without tuning
  plan.algo = candidates[best].algo;
  if (log) {
    describe();
    std::fprintf(stderr, "heuristic #0 %.4f ms, best %.4f ms (#%zu), %d of %zu tried\n", static_cast<double>(ms[0]),
                 static_cast<double>(ms[best]), best, tried, candidates.size());
  }
  return best != 0;
}

bool Matmul::tune_pending(cudaStream_t stream) {
  FLASHGPT_CHECK(!stream_capturing(stream), "matmul tune_pending: the stream is capturing a graph");
  std::vector<Plan*> plans;
  plans.swap(pending_);
  bool changed = false;
  for (Plan* plan : plans) {
    if (plan->candidates.empty()) continue;
    changed |= tune(*plan, plan->pending_a, plan->pending_b, plan->pending_bias, plan->pending_aux, stream);
  }
  return changed;
}

void Matmul::forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t rows, int64_t in,
                     int64_t out, Epilogue epilogue, const __nv_bfloat16* bias, __nv_bfloat16* aux,
                     cudaStream_t stream, int64_t ld_x) {
  FLASHGPT_CHECK(epilogue == Epilogue::none || epilogue == Epilogue::bias || epilogue == Epilogue::gelu_aux_bias,
                 "matmul forward: epilogue {} is a backward one", epilogue_name(epilogue));
  FLASHGPT_CHECK(epilogue == Epilogue::none || bias != nullptr, "matmul forward: epilogue {} needs a bias",
                 epilogue_name(epilogue));
  FLASHGPT_CHECK(epilogue != Epilogue::gelu_aux_bias || aux != nullptr, "matmul forward: gelu_aux_bias needs aux");
  if (ld_x == 0) ld_x = in;
  FLASHGPT_CHECK(ld_x >= in, "matmul forward: X's row stride {} is below its {} columns", ld_x, in);
  run(/*trans_a=*/true, /*trans_b=*/false, out, rows, in, w, in, x, ld_x, y, out, /*d_fp32=*/false, 0.0f, epilogue,
      bias, aux, out, stream);
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
                             int64_t out, cudaStream_t stream, bool accumulate) {
  if (rows == 0) {
    if (!accumulate) FLASHGPT_CUDA_CHECK(cudaMemsetAsync(dw, 0, size_t(out) * size_t(in) * sizeof(float), stream));
    return;
  }
  run(/*trans_a=*/false, /*trans_b=*/true, in, out, rows, x, in, dy, out, dw, in, /*d_fp32=*/true,
      accumulate ? 1.0f : 0.0f, Epilogue::none, nullptr, nullptr, 0, stream);
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
