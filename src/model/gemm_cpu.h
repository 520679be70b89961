// Row-major single-precision GEMM for the CPU layers: C = alpha op(A) op(B) + beta C,
// op(X) = X or X^T. Through BLAS sgemm where flashgpt is built with BLAS
// (FLASHGPT_HAVE_BLAS), else through plain OpenMP loops; both compute every element of C
// in an order that does not depend on the thread count. With BLAS, OpenMP spreads slabs
// of rows over its threads and each BLAS call runs on one thread: the first call sets
// OpenBLAS's own thread count to 1 for the process.
#pragma once

#include <cstdint>

namespace flashgpt::model {

enum class Trans { no, yes };

// C: (M, N) with row stride ldc; op(A): (M, K); op(B): (K, N). A is (M, K) with row stride
// lda when not transposed, (K, M) when transposed; B likewise (K, N) or (N, K).
void gemm_cpu(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The OpenMP loops alone (the fallback), callable in BLAS builds too so tests cover both.
void gemm_cpu_loops(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The same product on the calling thread only: for callers that spread their own tasks
// over OpenMP's threads (one BLAS call, or the loops without a parallel region).
void gemm_cpu_serial(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Sets BLAS up (done by the first gemm_cpu call otherwise): OpenBLAS on one thread per call,
// and its AVX-512 or AVX2 kernels where it did not recognise the CPU (gemm_cpu.cc). Call it
// outside parallel regions: it may set an environment variable for a moment.
void gemm_cpu_prepare();

// Whether gemm_cpu goes through BLAS in this build.
bool gemm_cpu_has_blas();

}  // namespace flashgpt::model
