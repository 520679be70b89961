// The launch layer: picks the tile traits of a (head_dim, dtype) instance, sizes the grid
// and launches on the caller's stream. Each instance is explicitly instantiated in its
// own translation unit under src/attention/instances/ so that nvcc runs in parallel.
#pragma once

#include "attention_cuda_launch.h"
#include <flashgpt/cuda_check.h>
#include "flash_bwd_kernel.cuh"
#include "flash_bwd_wgmma_kernel.cuh"
#include "flash_fwd_kernel.cuh"
#include "flash_fwd_wgmma_kernel.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace flashgpt::attn {

template <int kHeadDim, typename Element>
using FwdTraitsFor = FwdTraits<kHeadDim, TileConfig<kHeadDim>::kFwdBlockN, TileConfig<kHeadDim>::kFwdWarps,
                               TileConfig<kHeadDim>::kFwdMTiles, Element>;
template <int kHeadDim, typename Element>
using FwdWgmmaTraitsFor = FwdWgmmaTraits<kHeadDim, WgmmaTileConfig<kHeadDim>::kBlockN,
                                         WgmmaTileConfig<kHeadDim>::kWarpgroups, WgmmaTileConfig<kHeadDim>::kOverlap,
                                         Element>;
template <int kHeadDim, typename Element>
using BwdTraitsFor = BwdTraits<kHeadDim, TileConfig<kHeadDim>::kBwdBlockM, TileConfig<kHeadDim>::kBwdWarps, Element,
                               TileConfig<kHeadDim>::kBwdKTiles>;

template <int kHeadDim, typename Element>
using BwdWgmmaTraitsFor = BwdWgmmaTraits<kHeadDim, WgmmaTileConfig<kHeadDim>::kBwdBlockM, Element>;

template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    FLASHGPT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// One forward launch: a CTA per kBlockM query rows, per head, per batch entry. False when
// there is nothing to launch; the caller checks the launch (the check names the kernel).
template <typename Traits, typename Kernel>
bool launch_flash_fwd(Kernel kernel, const AttentionParams& p, float scale, cudaStream_t stream) {
  set_smem_limit(kernel, Traits::kSmemBytes);
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads_q, p.batch);
  if (grid.x == 0 || p.batch == 0) return false;
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, scale);
  return true;
}

template <int kHeadDim, typename Element>
void run_flash_fwd(const AttentionParams& p, float scale, cudaStream_t stream) {
  if constexpr (kHeadDim == 64 || kHeadDim == 96 || kHeadDim == 128 || kHeadDim == 256) {
    if (fwd_wgmma_selected(kHeadDim)) {
      using Traits = FwdWgmmaTraitsFor<kHeadDim, Element>;
      if (launch_flash_fwd<Traits>(flash_fwd_wgmma_kernel<Traits>, p, scale, stream))
        FLASHGPT_CUDA_CHECK_LAUNCH("flash_fwd_wgmma_kernel");
      return;
    }
  }
  using Traits = FwdTraitsFor<kHeadDim, Element>;
  if (launch_flash_fwd<Traits>(flash_fwd_kernel<Traits>, p, scale, stream)) FLASHGPT_CUDA_CHECK_LAUNCH("flash_fwd_kernel");
}

// The backward main kernel over key blocks: a CTA per Traits::kBlockN keys, per kv head, per
// batch entry. The caller checks the launch (the check names the kernel).
template <typename Traits, typename Kernel>
void launch_flash_bwd_main(Kernel kernel, const AttentionParams& p, float scale, const BwdWorkspace& ws,
                           bool deterministic, cudaStream_t stream) {
  const dim3 grid((p.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, p.heads_kv, p.batch);
  set_smem_limit(kernel, Traits::kSmemBytes);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, scale, ws, deterministic);
}

template <int kHeadDim, typename Element>
void run_flash_bwd(const AttentionParams& p, float scale, void* workspace, bool deterministic, cudaStream_t stream) {
  using Traits = BwdTraitsFor<kHeadDim, Element>;
  BwdWorkspace ws{};
  // The semaphores are sized for TileConfig's kBwdBlockM (attention_cuda.cc): a kernel with
  // larger query blocks uses a prefix of them.
  const size_t bytes = bwd_workspace_layout(p, Traits::kBlockM, static_cast<char*>(workspace), &ws);
  // The preprocess zeroes the dQ accumulator and writes D; the semaphores start at zero.
  if (deterministic && bytes > 0) {
    const size_t sem_offset = reinterpret_cast<char*>(ws.semaphores) - static_cast<char*>(workspace);
    FLASHGPT_CUDA_CHECK(cudaMemsetAsync(ws.semaphores, 0, bytes - sem_offset, stream));
  }
  if (p.batch > 0 && p.seqlen_q > 0) {
    using Shape = BwdPreprocessShape<kHeadDim>;
    const dim3 grid_pre(ws.dq_rows / Shape::kRows, p.heads_q, p.batch);
    flash_bwd_preprocess_kernel<Element, kHeadDim><<<grid_pre, Shape::kThreads, 0, stream>>>(p, ws);
    FLASHGPT_CUDA_CHECK_LAUNCH("flash_bwd_preprocess_kernel");
  }
  // The wgmma kernel (Hopper, d64 and d128) and its dQ accumulator layout, or mma.sync.
  bool wgmma = false;
  if constexpr (kHeadDim == 64 || kHeadDim == 128) wgmma = bwd_wgmma_selected(kHeadDim);
  // Both main kernels are compiled with and without dropout (a template parameter).
  const bool dropout = dropout_enabled(dropout_threshold(p.dropout_p));
  if (p.batch > 0 && p.seqlen_k > 0) {
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      if (wgmma) {
        using WgTraits = BwdWgmmaTraitsFor<kHeadDim, Element>;
        static_assert(WgTraits::kBlockM >= Traits::kBlockM, "the workspace has semaphores for kBwdBlockM");
        static_assert(kDqRowAlign % WgTraits::kBlockM == 0, "whole query blocks of dQ rows");
        // A CTA per (key block, kv head, batch entry), or persistent: at most one CTA per SM,
        // which take the tiles after their first from the counter that the preprocess zeroes.
        // (validate_cuda keeps the tile count within an int.)
        const int n_blocks = (p.seqlen_k + WgTraits::kBlockN - 1) / WgTraits::kBlockN;
        const int64_t tiles = int64_t{n_blocks} * p.heads_kv * p.batch;
        const bool persistent = WgTraits::persistent(dropout);
        const dim3 grid = persistent ? dim3(unsigned(std::min<int64_t>(tiles, current_device_sm_count())))
                                     : dim3(n_blocks, p.heads_kv, p.batch);
        if (persistent && p.seqlen_q <= 0)  // no preprocess ran
          FLASHGPT_CUDA_CHECK(cudaMemsetAsync(ws.tile_counter, 0, sizeof(int), stream));
        auto kernel = dropout ? flash_bwd_wgmma_kernel<WgTraits, true> : flash_bwd_wgmma_kernel<WgTraits, false>;
        set_smem_limit(kernel, WgTraits::kSmemBytes);
        kernel<<<grid, WgTraits::kThreads, WgTraits::kSmemBytes, stream>>>(p, scale, ws, deterministic);
        FLASHGPT_CUDA_CHECK_LAUNCH("flash_bwd_wgmma_kernel");
      }
    }
    if (!wgmma) {
      launch_flash_bwd_main<Traits>(dropout ? flash_bwd_main_kernel<Traits, true> : flash_bwd_main_kernel<Traits, false>,
                                    p, scale, ws, deterministic, stream);
      FLASHGPT_CUDA_CHECK_LAUNCH("flash_bwd_main_kernel");
    }
  }
  if (p.batch > 0 && p.seqlen_q > 0) {
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      if (wgmma) {
        const dim3 grid(convert_dq_blocks<kHeadDim, true>(p.seqlen_q), p.heads_q, p.batch);
        flash_bwd_convert_dq_kernel<Element, kHeadDim, true><<<grid, 256, 0, stream>>>(p, ws);
      }
    }
    if (!wgmma) {
      const dim3 grid(convert_dq_blocks<kHeadDim, false>(p.seqlen_q), p.heads_q, p.batch);
      flash_bwd_convert_dq_kernel<Element, kHeadDim, false><<<grid, 256, 0, stream>>>(p, ws);
    }
    FLASHGPT_CUDA_CHECK_LAUNCH("flash_bwd_convert_dq_kernel");
  }
}

}  // namespace flashgpt::attn
