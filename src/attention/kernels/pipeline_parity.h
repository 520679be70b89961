// The index and parity arithmetic of the warp-specialized kernels' mbarrier rings, in plain
// C++ (no CUDA include: g++ compiles it for the CPU model of the protocol,
// tests/attention/dq_handoff_model_test.cc, which thereby runs the kernels' own arithmetic).
//
// An mbarrier's phases complete in turn; try_wait.parity P returns once the phase of parity P
// has completed, i.e. while the current (incomplete) phase has parity !P. A wait therefore
// names one of the two latest phases, and a fresh barrier's "previous phase" (parity 1) counts
// as completed: a producer's first wait on an "empty" barrier passes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASHGPT_PIPELINE_FN __host__ __device__ __forceinline__
#else
#define FLASHGPT_PIPELINE_FN inline
#endif

namespace flashgpt::attn {

// Where a ring of kStages buffers stands: the stage in use and the parity of its barrier's
// current phase, which flips each time the index wraps.
template <int kStages>
struct PipelineState {
  int index = 0;
  uint32_t phase = 0;
  FLASHGPT_PIPELINE_FN void advance() {
    if (++index == kStages) {
      index = 0;
      phase ^= 1u;
    }
  }
};

// The consumers' side of the dQ warp's hand-off (flash_bwd_tma_kernel.cuh, kDqWarp), from one
// counter of the buffers filled so far (fewer live registers than an index and a parity): the
// next fill's buffer; the parity its "dQ empty" barrier is waited with (the dQ warp's release of
// that buffer's previous fill); and (kDqSplitKeys) the parity its "partial" barrier is waited
// with (the other warpgroup's partial of this fill stored).
template <int kDqBuffers>
FLASHGPT_PIPELINE_FN constexpr int dq_handoff_buffer(uint32_t fills) {
  return int(fills % kDqBuffers);
}
template <int kDqBuffers>
FLASHGPT_PIPELINE_FN constexpr uint32_t dq_handoff_free_parity(uint32_t fills) {
  return ((fills / kDqBuffers) & 1u) ^ 1u;
}
template <int kDqBuffers>
FLASHGPT_PIPELINE_FN constexpr uint32_t dq_handoff_partial_parity(uint32_t fills) {
  return dq_handoff_free_parity<kDqBuffers>(fills) ^ 1u;
}

// The barriers' expected arrivals: "dQ full" one per consumer warp (kDqSplitKeys: per warp of
// the buffer's summing warpgroup), "dQ empty" the dQ warp's first lane, "partial" one per warp
// of the other warpgroup.
FLASHGPT_PIPELINE_FN constexpr int dq_handoff_full_arrivals(int consumer_threads, bool split_keys) {
  return consumer_threads / 32 / (split_keys ? 2 : 1);
}
inline constexpr int kDqHandoffEmptyArrivals = 1;
inline constexpr int kDqHandoffPartialArrivals = 4;

}  // namespace flashgpt::attn
