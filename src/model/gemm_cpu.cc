// Row-major SGEMM: BLAS where available, OpenMP loops otherwise (gemm_cpu.h).
#include "gemm_cpu.h"
#include "parallel.h"

#include <flashgpt/cpu_isa.h>
#include <flashgpt/error.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#ifndef FLASHGPT_HAVE_BLAS
#define FLASHGPT_HAVE_BLAS 0
#endif

#if FLASHGPT_HAVE_BLAS
// The Fortran interface: every BLAS (OpenBLAS, reference, MKL) exports it, where cblas.h
// and libcblas are not always present. The trailing lengths are the hidden arguments
// gfortran passes for CHARACTER arguments.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc, size_t transa_len, size_t transb_len);
// OpenBLAS's thread control and, in its DYNAMIC_ARCH builds, its choice of kernels; weak:
// other BLAS libraries lack them.
extern "C" void openblas_set_num_threads(int threads) __attribute__((weak));
extern "C" char* openblas_get_corename() __attribute__((weak));
extern "C" void gotoblas_dynamic_init() __attribute__((weak));
extern "C" void gotoblas_dynamic_quit() __attribute__((weak));
#endif

namespace flashgpt::model {

namespace {

constexpr int64_t kRowBlock = 4;  // rows of C per task: each row of B read once serves 4 rows of C

// Rows [i0, i0 + rows) of C = alpha A B^T + beta C, A not transposed: dot products.
void gemm_rows_dot(int64_t i0, int64_t rows, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; ++j) {
    const float* b = B + j * ldb;
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = A + (i0 + r) * lda;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += a[k] * b[k];
      float& c = C[(i0 + r) * ldc + j];
      c = alpha * acc + (beta == 0.0f ? 0.0f : beta * c);
    }
  }
}

// Rows [i0, i0 + rows) of C = alpha op(A) B + beta C, B not transposed: row updates.
void gemm_rows_axpy(bool trans_a, int64_t i0, int64_t rows, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    float* c = C + (i0 + r) * ldc;
    if (beta == 0.0f) {
      std::fill(c, c + N, 0.0f);
    } else if (beta != 1.0f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const float a = alpha * (trans_a ? A[k * lda + i] : A[i * lda + k]);
      if (a == 0.0f) continue;
      float* c = C + i * ldc;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// Both transposed (unused by the model; kept so the function is total).
void gemm_rows_generic(int64_t i0, int64_t rows, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += A[k * lda + i] * B[j * ldb + k];
      float& c = C[i * ldc + j];
      c = alpha * acc + (beta == 0.0f ? 0.0f : beta * c);
    }
  }
}

// Rows [i0, i0 + rows) of C by the loop that reads op(B) along its rows.
void gemm_rows(Trans trans_a, Trans trans_b, int64_t i0, int64_t rows, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const bool ta = trans_a == Trans::yes, tb = trans_b == Trans::yes;
  if (!tb) {
    gemm_rows_axpy(ta, i0, rows, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else if (!ta) {
    gemm_rows_dot(i0, rows, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    gemm_rows_generic(i0, rows, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

#if FLASHGPT_HAVE_BLAS
// BLAS runs on one thread per call, on slabs of kBlasSlabRows rows (or, for a C wider
// than tall, kBlasSlabCols columns) of C that OpenMP spreads over its threads: every
// element of C comes from a call of the same shape whatever the thread count (OpenBLAS's
// own threading gives other bits for other thread counts), and OpenMP's thread count is
// the only one to set. The slabs are handed out dynamically (any thread may compute any
// slab): on shared cores a static share would leave one thread waiting for the other.
constexpr int64_t kBlasSlabRows = 64;
constexpr int64_t kBlasSlabCols = 256;

// OpenBLAS picks its kernels by CPU model when it loads; a model it does not know (0.3.21
// on Sapphire Rapids, say) gets its SSE3 "Prescott" kernels, 4x slower than its AVX-512
// ones here (1024^3 sgemm on one core: 28 against 110 GFLOP/s). Then the kernels cpu_isa()
// allows are chosen by name through OpenBLAS's own OPENBLAS_CORETYPE, set only for the
// re-initialisation. A user's OPENBLAS_CORETYPE is left alone.
void blas_choose_kernels() {
  if (openblas_get_corename == nullptr || gotoblas_dynamic_init == nullptr || gotoblas_dynamic_quit == nullptr) return;
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const char* name = openblas_get_corename();
  if (name == nullptr || std::strcmp(name, "Prescott") != 0) return;
  const CpuIsa isa = cpu_isa();
  const char* core = isa == CpuIsa::avx512 ? "SkylakeX" : isa == CpuIsa::avx2 ? "Haswell" : nullptr;
  if (core == nullptr) return;
  setenv("OPENBLAS_CORETYPE", core, 1);
  gotoblas_dynamic_quit();
  gotoblas_dynamic_init();
  unsetenv("OPENBLAS_CORETYPE");
}

void blas_single_threaded() {
  static const bool once = [] {
    blas_choose_kernels();
    if (openblas_set_num_threads != nullptr) openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

// Whether BLAS takes this product: sizes that fit its int arguments (K = 0 goes to the loops,
// which scale C by beta); then BLAS is set up (once per process).
bool blas_usable(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  constexpr int64_t kIntMax = 2147483647;
  if (K <= 0 || M > kIntMax || N > kIntMax || K > kIntMax || lda > kIntMax || ldb > kIntMax || ldc > kIntMax) return false;
  blas_single_threaded();
  return true;
}

// Row-major C = alpha op(A) op(B) + beta C as one sgemm: it is column-major
// C^T = op(B)^T op(A)^T, so the operands swap.
void blas_sgemm(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char ca = trans_b == Trans::yes ? 'T' : 'N', cb = trans_a == Trans::yes ? 'T' : 'N';
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&ca, &cb, &n, &m, &k, &alpha, B, &la, A, &lb, &beta, C, &lc, 1, 1);
}
#endif

void check_shape(int64_t M, int64_t N, int64_t K) {
  FLASHGPT_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm: negative size (M {}, N {}, K {})", M, N, K);
}

}  // namespace

void gemm_cpu_loops(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_shape(M, N, K);
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if(parallel : parallel_worth(M * N * K))
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * kRowBlock;
    gemm_rows(trans_a, trans_b, i0, std::min(kRowBlock, M - i0), N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

void gemm_cpu_serial(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_shape(M, N, K);
  if (M == 0 || N == 0) return;
#if FLASHGPT_HAVE_BLAS
  if (blas_usable(M, N, K, lda, ldb, ldc)) {
    blas_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
#endif
  gemm_rows(trans_a, trans_b, 0, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_cpu_prepare() {
#if FLASHGPT_HAVE_BLAS
  blas_single_threaded();
#endif
}

bool gemm_cpu_has_blas() { return FLASHGPT_HAVE_BLAS != 0; }

void gemm_cpu(Trans trans_a, Trans trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_shape(M, N, K);
  if (M == 0 || N == 0) return;
#if FLASHGPT_HAVE_BLAS
  if (blas_usable(M, N, K, lda, ldb, ldc)) {
    if (M >= N) {
      const int64_t slabs = (M + kBlasSlabRows - 1) / kBlasSlabRows;
#pragma omp parallel for schedule(dynamic) if(parallel : slabs > 1 && parallel_worth(M * N * K))
      for (int64_t slab = 0; slab < slabs; ++slab) {
        const int64_t i0 = slab * kBlasSlabRows;
        // Rows i0.. of op(A): row i0 of A, or column i0 of A^T.
        const float* a = trans_a == Trans::yes ? A + i0 : A + i0 * lda;
        blas_sgemm(trans_a, trans_b, std::min(kBlasSlabRows, M - i0), N, K, alpha, a, lda, B, ldb, beta, C + i0 * ldc,
                   ldc);
      }
    } else {
      // Wide C (the classifier's rows x V logits): slabs of columns.
      const int64_t slabs = (N + kBlasSlabCols - 1) / kBlasSlabCols;
#pragma omp parallel for schedule(dynamic) if(parallel : slabs > 1 && parallel_worth(M * N * K))
      for (int64_t slab = 0; slab < slabs; ++slab) {
        const int64_t j0 = slab * kBlasSlabCols;
        // Columns j0.. of op(B): column j0 of B, or row j0 of B^T.
        const float* b = trans_b == Trans::yes ? B + j0 * ldb : B + j0;
        blas_sgemm(trans_a, trans_b, M, std::min(kBlasSlabCols, N - j0), K, alpha, A, lda, b, ldb, beta, C + j0, ldc);
      }
    }
    return;
  }
#endif
  gemm_cpu_loops(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace flashgpt::model
