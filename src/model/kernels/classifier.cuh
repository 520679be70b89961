// The fused classifier's pointwise part, on one chunk of rows of bf16 logits (R, Vp) that
// cuBLASLt just wrote: per row, softmax over the first V columns, the cross-entropy of the
// target, and (with gradients) dlogits = (softmax - onehot(target)) * dloss written in place
// over the logits, the padding columns V..Vp-1 set to 0. Three kernels (ClassifierKernel):
//
//   two_pass: one block per row, which reads the row twice (online max and sum, then the
//     gradient) and writes it once. A variant that kept the row in shared memory and read
//     it once was slower at V = 100277 (docs/model_gpu.md): one 200 KB row per block left one
//     block per SM, with too few loads in flight.
//   l2_two_pass: the same two passes from a persistent grid of B blocks per SM (B = 1, 2, 4,
//     8; 1024 / B threads each, so 1024 threads per SM in every case), each block taking rows
//     r = blockIdx.x, r + gridDim.x, ... Only B x SMs rows are in flight (B = 1: 132 x 200 KB
//     = 26 MB at V = 100277, against two_pass's 4 x 132 rows = 105 MB), so the second read of
//     a row finds it in the 50 MB L2. Each thread issues kGridUnroll 16-byte loads before it
//     uses any (64 KB in flight per SM, Little's law asks for about 20 KB at 3 TB/s).
//   cluster: a thread-block cluster of S <= 8 blocks per row, each block holding its slice of
//     the row in registers (at most kClusterVecs 16-byte vectors per thread, all loaded before
//     any is used). Each block reduces its slice to (max, sum of exp), the blocks exchange the
//     S pairs through distributed shared memory and combine them in rank order (the same
//     bits in every block), and each writes its slice's gradient from registers: the row is
//     read once and written once, and several blocks per SM keep loads in flight while others
//     reduce. Rows wider than kClusterMaxBlocks * kClusterThreads * kClusterVecs * 8 columns
//     (131072) take two_pass.
#pragma once

#include "common.cuh"

#include <cooperative_groups.h>

#include <algorithm>

namespace flashgpt::model_cuda {

constexpr int kClassifierThreads = 512;

// The end of a row's first pass, shared by two_pass and l2_two_pass: the columns [first, V)
// past the last whole 16-byte vector folded into each thread's online (max m, sum s), the
// row's log-sum-exp from every thread's pair, and thread 0's loss lse - row[target]. Every
// thread of the block calls it; the caller synchronizes before overwriting row[target].
__device__ __forceinline__ float finish_row(const bf16* row, int64_t first, int64_t V, float m, float s,
                                            int64_t target, float* loss, float* scratch) {
  for (int64_t c = first + threadIdx.x; c < V; c += blockDim.x) {
    const float x = __bfloat162float(row[c]);
    const float new_m = fmaxf(m, x);
    s = s * __expf(m - new_m) + __expf(x - new_m);
    m = new_m;
  }
  const float row_max = block_max(m, scratch);
  const float row_sum = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - row_max), scratch);
  const float lse = row_max + __logf(row_sum);
  if (threadIdx.x == 0) *loss = lse - __bfloat162float(row[target]);
  return lse;
}

template <bool kWriteGrad>
__global__ void __launch_bounds__(kClassifierThreads)
    classifier_kernel(bf16* __restrict__ logits, float* __restrict__ losses, const int32_t* __restrict__ targets,
                      int64_t V, int64_t Vp, float dloss) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  bf16* row = logits + r * Vp;
  // Online max and sum of exp over the real vocabulary, 8 columns (16 bytes) at a time.
  float m = -INFINITY, s = 0.0f;
  const int64_t vec_end = V / 8 * 8;
  for (int64_t c = int64_t{threadIdx.x} * 8; c < vec_end; c += int64_t{blockDim.x} * 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    const bf16* v = reinterpret_cast<const bf16*>(&raw);
    float local_max = __bfloat162float(v[0]);
#pragma unroll
    for (int k = 1; k < 8; ++k) local_max = fmaxf(local_max, __bfloat162float(v[k]));
    const float new_m = fmaxf(m, local_max);
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) add += __expf(__bfloat162float(v[k]) - new_m);
    s = s * __expf(m - new_m) + add;
    m = new_m;
  }
  const int64_t target = targets[r];
  const float lse = finish_row(row, vec_end, V, m, s, target, losses + r, scratch);
  if (!kWriteGrad) return;
  __syncthreads();  // thread 0 has read row[target] (finish_row) before it is overwritten
  for (int64_t c = int64_t{threadIdx.x} * 8; c < Vp; c += int64_t{blockDim.x} * 8) {
    uint4 raw = *reinterpret_cast<const uint4*>(row + c);
    bf16* v = reinterpret_cast<bf16*>(&raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t col = c + k;
      float g = 0.0f;
      if (col < V) g = (__expf(__bfloat162float(v[k]) - lse) - (col == target ? 1.0f : 0.0f)) * dloss;
      v[k] = __float2bfloat16_rn(g);
    }
    *reinterpret_cast<uint4*>(row + c) = raw;
  }
}

constexpr int kGridThreadsPerSm = 1024;  // blockDim.x = kGridThreadsPerSm / blocks per SM
constexpr int kGridUnroll = 4;           // 16-byte loads per thread issued before any is used
// The gradient's stores as st.global.cs (evict-first): a finished row's lines leave L2 before
// those of rows whose second read is still to come. The loads keep the default policy: an
// evict_last load would also need its lines demoted afterwards, or they would outlive the
// kernel in L2. false gives plain stores.
constexpr bool kGridStreamingStores = true;

inline bool classifier_grid_blocks_valid(int blocks_per_sm) {
  return blocks_per_sm == 1 || blocks_per_sm == 2 || blocks_per_sm == 4 || blocks_per_sm == 8;
}

// Grid: min(rows, blocks per SM x SMs) blocks of kGridThreadsPerSm / blocks per SM threads;
// logits (rows, Vp), targets and losses (rows). Per row the arithmetic of classifier_kernel,
// with the max taken over kGridUnroll vectors at a time instead of one.
template <bool kWriteGrad>
__global__ void __launch_bounds__(kGridThreadsPerSm, 1)
    classifier_grid_kernel(bf16* __restrict__ logits, float* __restrict__ losses,
                           const int32_t* __restrict__ targets, int64_t rows, int64_t V, int64_t Vp, float dloss) {
  __shared__ float scratch[32];
  const int64_t vec_end = V / 8, total_vecs = Vp / 8;
  const int64_t stride = int64_t{blockDim.x} * kGridUnroll;
  // Eight bf16 -inf (0xff80): a vector past the end adds exp(-inf) = 0 and leaves the max.
  const uint4 neg_inf = make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
  // No barrier is needed between rows: block_max's first __syncthreads keeps the next row's
  // writes to scratch behind every thread's read of this row's block_sum, and each row's
  // gradient overwrites only that row.
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    bf16* row = logits + r * Vp;
    uint4* vrow = reinterpret_cast<uint4*>(row);
    // Pass 1: online max and sum of exp over the real vocabulary. Vector base + j blockDim.x
    // for j < kGridUnroll; vector `base` is real, so local_max is finite.
    float m = -INFINITY, s = 0.0f;
    for (int64_t base = threadIdx.x; base < vec_end; base += stride) {
      uint4 raw[kGridUnroll];
#pragma unroll
      for (int j = 0; j < kGridUnroll; ++j) {
        const int64_t vec = base + int64_t{j} * blockDim.x;
        raw[j] = vec < vec_end ? vrow[vec] : neg_inf;
      }
      float local_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kGridUnroll; ++j) {
        const bf16* v = reinterpret_cast<const bf16*>(&raw[j]);
#pragma unroll
        for (int k = 0; k < 8; ++k) local_max = fmaxf(local_max, __bfloat162float(v[k]));
      }
      const float new_m = fmaxf(m, local_max);
      float add = 0.0f;
#pragma unroll
      for (int j = 0; j < kGridUnroll; ++j) {
        const bf16* v = reinterpret_cast<const bf16*>(&raw[j]);
#pragma unroll
        for (int k = 0; k < 8; ++k) add += __expf(__bfloat162float(v[k]) - new_m);
      }
      s = s * __expf(m - new_m) + add;
      m = new_m;
    }
    const int64_t target = targets[r];
    const float lse = finish_row(row, vec_end * 8, V, m, s, target, losses + r, scratch);
    if constexpr (kWriteGrad) {
      __syncthreads();  // thread 0 has read row[target] (finish_row) before it is overwritten
      // Pass 2, from L2: the gradient of every column, 0 in the padding.
      for (int64_t base = threadIdx.x; base < total_vecs; base += stride) {
        uint4 raw[kGridUnroll];
#pragma unroll
        for (int j = 0; j < kGridUnroll; ++j) {
          const int64_t vec = base + int64_t{j} * blockDim.x;
          if (vec < total_vecs) raw[j] = vrow[vec];
        }
#pragma unroll
        for (int j = 0; j < kGridUnroll; ++j) {
          const int64_t vec = base + int64_t{j} * blockDim.x;
          if (vec >= total_vecs) continue;
          bf16* v = reinterpret_cast<bf16*>(&raw[j]);
          // Column vec * 8 + k is real for k < real and the target for k == target_k (32-bit
          // compares against the unrolled k, not 64-bit ones per column).
          const int real = V - vec * 8 < 8 ? static_cast<int>(V - vec * 8) : 8;
          const int64_t target_offset = target - vec * 8;
          const int target_k = target_offset >= 0 && target_offset < 8 ? static_cast<int>(target_offset) : -1;
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            float g = 0.0f;
            if (k < real) g = (__expf(__bfloat162float(v[k]) - lse) - (k == target_k ? 1.0f : 0.0f)) * dloss;
            v[k] = __float2bfloat16_rn(g);
          }
          if constexpr (kGridStreamingStores) {
            __stcs(vrow + vec, raw[j]);
          } else {
            vrow[vec] = raw[j];
          }
        }
      }
    }
  }
}

constexpr int kClusterThreads = 256;
constexpr int kClusterVecs = 8;       // 16-byte vectors (8 bf16) per thread at most: 32 registers
constexpr int kClusterMaxBlocks = 8;  // the portable cluster size
constexpr int64_t kClusterMaxColumns = int64_t{kClusterMaxBlocks} * kClusterThreads * kClusterVecs * 8;

// Grid: rows * S blocks in clusters of S (consecutive blockIdx.x); block `rank` of row r holds
// the vectors [rank * block_vecs, (rank + 1) * block_vecs) of the row's Vp / 8, where
// S * block_vecs >= Vp / 8 and block_vecs <= kClusterThreads * kClusterVecs.
template <bool kWriteGrad>
__global__ void __launch_bounds__(kClusterThreads, 4)
    classifier_cluster_kernel(bf16* __restrict__ logits, float* __restrict__ losses,
                              const int32_t* __restrict__ targets, int64_t V, int64_t Vp, int block_vecs,
                              float dloss) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; classifier_softmax_xent never launches this on older devices
#else
  namespace cg = cooperative_groups;
  __shared__ float scratch[32];
  __shared__ float2 partial;  // this block's (max, sum of exp(x - max)), read by the whole cluster
  const cg::cluster_group cluster = cg::this_cluster();
  const int S = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t r = blockIdx.x / S;
  bf16* row = logits + r * Vp;
  const int64_t total_vecs = Vp / 8;
  const int64_t first = int64_t{rank} * block_vecs;
  // Every load of the slice first, then the arithmetic.
  uint4 data[kClusterVecs];
#pragma unroll
  for (int k = 0; k < kClusterVecs; ++k) {
    const int i = k * kClusterThreads + static_cast<int>(threadIdx.x);
    const int64_t vec = first + i;
    if (i < block_vecs && vec < total_vecs) {
      data[k] = *reinterpret_cast<const uint4*>(row + vec * 8);
    } else {
      data[k] = make_uint4(0, 0, 0, 0);
    }
  }
  const int64_t target = targets[r];
  // The target's logit, read by one thread before any block of the cluster overwrites it
  // (the writes start after the cluster barrier below).
  float target_logit = 0.0f;
  if (rank == 0 && threadIdx.x == 0) target_logit = __bfloat162float(row[target]);
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < kClusterVecs; ++k) {
    const int64_t col = (first + k * kClusterThreads + threadIdx.x) * 8;
    const bf16* v = reinterpret_cast<const bf16*>(&data[k]);
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (col + j < V && k * kClusterThreads + static_cast<int>(threadIdx.x) < block_vecs)
        m = fmaxf(m, __bfloat162float(v[j]));
  }
  const float block_m = block_max(m, scratch);
  float s = 0.0f;
  if (block_m != -INFINITY) {
#pragma unroll
    for (int k = 0; k < kClusterVecs; ++k) {
      const int64_t col = (first + k * kClusterThreads + threadIdx.x) * 8;
      const bf16* v = reinterpret_cast<const bf16*>(&data[k]);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (col + j < V && k * kClusterThreads + static_cast<int>(threadIdx.x) < block_vecs)
          s += __expf(__bfloat162float(v[j]) - block_m);
    }
  }
  const float block_s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial = make_float2(block_m, block_s);
  cluster.sync();  // every block's partial is written
  // Combine the S partials in rank order: the same bits in every block of the cluster.
  float row_max = -INFINITY;
  for (int q = 0; q < S; ++q) row_max = fmaxf(row_max, cluster.map_shared_rank(&partial, q)->x);
  float row_sum = 0.0f;
  for (int q = 0; q < S; ++q) {
    const float2 p = *cluster.map_shared_rank(&partial, q);
    if (p.x != -INFINITY) row_sum += p.y * __expf(p.x - row_max);
  }
  cluster.sync();  // no block leaves (its shared memory) while another still reads it
  const float lse = row_max + __logf(row_sum);
  if (rank == 0 && threadIdx.x == 0) losses[r] = lse - target_logit;
  if (!kWriteGrad) return;
#pragma unroll
  for (int k = 0; k < kClusterVecs; ++k) {
    const int i = k * kClusterThreads + static_cast<int>(threadIdx.x);
    const int64_t vec = first + i;
    if (i >= block_vecs || vec >= total_vecs) continue;
    const int64_t col = vec * 8;
    uint4 out;
    const bf16* v = reinterpret_cast<const bf16*>(&data[k]);
    bf16* o = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float g = 0.0f;
      if (col + j < V) g = (__expf(__bfloat162float(v[j]) - lse) - (col + j == target ? 1.0f : 0.0f)) * dloss;
      o[j] = __float2bfloat16_rn(g);
    }
    *reinterpret_cast<uint4*>(row + col) = out;
  }
#endif
}

// sum over losses[0 .. n) in double, in a fixed order (one block): *out = sum.
__global__ void loss_sum_kernel(double* __restrict__ out, const float* __restrict__ losses, int64_t n) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += losses[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s;
}

// ---- launchers ----

// rows: the chunk's rows; logits (rows, Vp) with Vp % 8 == 0; targets, losses: (rows).
inline void classifier_launch(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V,
                              int64_t Vp, float dloss, bool write_grad, cudaStream_t stream) {
  if (rows <= 0) return;
  if (write_grad) {
    classifier_kernel<true><<<static_cast<unsigned>(rows), kClassifierThreads, 0, stream>>>(logits, losses, targets, V,
                                                                                            Vp, dloss);
  } else {
    classifier_kernel<false><<<static_cast<unsigned>(rows), kClassifierThreads, 0, stream>>>(logits, losses, targets,
                                                                                             V, Vp, dloss);
  }
}

// The persistent-grid kernel: blocks_per_sm (classifier_grid_blocks_valid) blocks per SM of
// sm_count, at most one per row.
inline void classifier_grid_launch(bf16* logits, float* losses, const int32_t* targets, int64_t rows, int64_t V,
                                   int64_t Vp, float dloss, bool write_grad, int blocks_per_sm, int sm_count,
                                   cudaStream_t stream) {
  if (rows <= 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, int64_t{blocks_per_sm} * sm_count));
  const unsigned threads = static_cast<unsigned>(kGridThreadsPerSm / blocks_per_sm);
  if (write_grad) {
    classifier_grid_kernel<true><<<blocks, threads, 0, stream>>>(logits, losses, targets, rows, V, Vp, dloss);
  } else {
    classifier_grid_kernel<false><<<blocks, threads, 0, stream>>>(logits, losses, targets, rows, V, Vp, dloss);
  }
}

// The cluster kernel for Vp <= kClusterMaxColumns (the caller checks): S blocks per row, the
// fewest that hold the row, and the row's vectors spread evenly over them.
inline cudaError_t classifier_cluster_launch(bf16* logits, float* losses, const int32_t* targets, int64_t rows,
                                             int64_t V, int64_t Vp, float dloss, bool write_grad,
                                             cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int64_t total_vecs = Vp / 8;
  const int64_t per_block = int64_t{kClusterThreads} * kClusterVecs;
  const int S = static_cast<int>((total_vecs + per_block - 1) / per_block);
  const int block_vecs = static_cast<int>((total_vecs + S - 1) / S);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * S));
  config.blockDim = dim3(kClusterThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(S);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (write_grad) return cudaLaunchKernelEx(&config, classifier_cluster_kernel<true>, logits, losses, targets, V, Vp,
                                            block_vecs, dloss);
  return cudaLaunchKernelEx(&config, classifier_cluster_kernel<false>, logits, losses, targets, V, Vp, block_vecs,
                            dloss);
}

inline void loss_sum_launch(double* out, const float* losses, int64_t n, cudaStream_t stream) {
  loss_sum_kernel<<<1, 1024, 0, stream>>>(out, losses, n);
}

}  // namespace flashgpt::model_cuda
