// Attention on NVIDIA GPUs (bf16/fp16 inputs, fp32 accumulation), FlashAttention-2 style:
// one fused forward kernel, and a backward pass of preprocess / main / convert kernels.
// Conventions (layout, LSE, causal alignment, dropout) are those of attention.h.
//
// Every entry point validates the parameters (attention_validate plus the GPU-specific
// rules below), throws flashgpt::Error with a readable message on a problem, and enqueues
// its kernels on `stream` without synchronizing. Nothing is allocated: the backward pass
// takes a caller-provided workspace of attention_backward_workspace_bytes() bytes.
//
// GPU-specific rules: dtype bf16 or f16; head_dim one of the compiled head dims
// (attention_cuda_head_dim_compiled); q, k, v, o, d_o, dq, dk, dv 16-byte aligned and
// every row/head/batch stride a multiple of 8 elements (16-byte vector copies); all
// pointers (cu_seqlens too) in device memory. cu_seqlens are not read on the host: the
// caller guarantees them (attention_validate_cu_seqlens_host checks a host copy).
#pragma once

#include <flashgpt/attention.h>

#include <cstddef>

#ifdef FLASHGPT_WITH_CUDA
#include <cuda_runtime.h>
#else
using cudaStream_t = struct CUstream_st*;
#endif

namespace flashgpt {

// Whether the kernels for this head dim were built (CMake option FLASHGPT_ATTENTION_HEAD_DIMS).
bool attention_cuda_head_dim_compiled(int head_dim);

// Which forward kernel runs for this head dim on the current device, for a dense batch:
// "wgmma-tma" (the warp-specialized TMA kernel: Hopper, sm_90a builds, head dims 64 and 128,
// dense batches with or without dropout), "wgmma" (Hopper, sm_90a builds, head dims 64, 96,
// 128 and 256, varlen too) or "mma.sync". FLASHGPT_ATTN_FWD_KERNEL in the environment overrides
// the choice: mma_sync, wgmma, or tma (where it applies).
const char* attention_cuda_forward_kernel(int head_dim);
// The same for these params (varlen batches never take "wgmma-tma").
const char* attention_cuda_forward_kernel(const AttentionParams& params);
// Forces the forward kernel of every later call as FLASHGPT_ATTN_FWD_KERNEL does: "mma_sync",
// "wgmma", "tma" (where it applies), or "" / nullptr for the automatic choice; returns the
// override before (one of those names, "" for none). For tests and benchmarks that compare two
// kernels in one process; a call racing with a forward on another thread may see either.
// Throws flashgpt::Error for any other name.
const char* attention_cuda_force_forward_kernel(const char* kernel);
// The same for the backward's main kernel, for a dense batch: "wgmma" (Hopper, sm_90a builds,
// head dims 64 and 128, and 32 and 96 unless attention_cuda_force_backward_padded is off),
// "wgmma-tma" (the warp-specialized TMA backward, head dims 64 and 128, dense batches: d128's
// default for fast-mode calls without dropout while its dQ warp is on, elsewhere only where
// forced) or "mma.sync". The int overload reports a fast-mode call without dropout; a
// deterministic call takes "wgmma" where this reports "wgmma-tma" by default.
// FLASHGPT_ATTN_BWD_KERNEL in the environment overrides the choice: mma_sync, wgmma, or tma
// (where it applies).
const char* attention_cuda_backward_kernel(int head_dim);
// The same for these params (varlen batches never take "wgmma-tma").
const char* attention_cuda_backward_kernel(const AttentionParams& params);
// Forces the backward's main kernel of every later call as FLASHGPT_ATTN_BWD_KERNEL does:
// "mma_sync", "wgmma", "tma" (where it applies), or "" / nullptr for the automatic choice;
// returns the override before ("" for none). For tests and benchmarks comparing two kernels in
// one process. Throws flashgpt::Error for any other name.
const char* attention_cuda_force_backward_kernel(const char* kernel);
// Whether a backward with these params converts dQ inside its main kernel (the fused dQ convert:
// the "wgmma" and "wgmma-tma" kernels, where it is switched on) instead of in a separate convert
// kernel; the same dQ either way (bit for bit in deterministic mode). Off by default until it is
// timed; FLASHGPT_ATTN_BWD_FUSED_CONVERT=0 or 1 in the environment sets it (anything else is an
// error at the first backward).
bool attention_cuda_backward_fused_dq_convert(const AttentionParams& params);
// Switches the fused dQ convert of every later backward: 1 on, 0 off, -1 the default; returns
// whether it was on. For tests and benchmarks comparing both in one process. Throws
// flashgpt::Error for any other value.
bool attention_cuda_force_fused_dq_convert(int fused);
// Whether a fast-mode backward with these params adds dQ through the TMA backward's dQ warp
// (bulk reduce-adds from shared memory instead of the consumers' atomics: the same fp32
// addends in another order): the "wgmma-tma" kernel, where it is switched on, and only without
// the fused dQ convert (deterministic calls keep the atomics). On by default (with it the TMA
// backward is d128's default for fast-mode calls without dropout); FLASHGPT_ATTN_BWD_DQ_WARP=0
// or 1 in the environment sets it (anything else is an error at the first backward).
bool attention_cuda_backward_dq_warp(const AttentionParams& params);
// Switches the dQ warp of every later backward: 1 on, 0 off, -1 the default; returns whether
// it was on. For tests and benchmarks comparing both in one process. Throws flashgpt::Error
// for any other value.
bool attention_cuda_force_backward_dq_warp(int on);
// Whether a fast-mode backward with these params runs the d64 variant of the TMA backward (query
// blocks of 64 rows, four stages, two dQ buffers of its own; always with the dQ warp): head dim
// 64, the "wgmma-tma" kernel, the dQ warp on and the variant switched on. Then d64 dense
// fast-mode calls take the TMA backward unless another kernel is forced, with or without
// dropout. Off by default; FLASHGPT_ATTN_BWD_TMA64_VARIANT=0 or 1 in the environment sets it
// (anything else is an error at the first backward).
bool attention_cuda_backward_tma64_variant(const AttentionParams& params);
// Switches the d64 TMA variant of every later backward: 1 on, 0 off, -1 the default; returns
// whether it was on. Throws flashgpt::Error for any other value.
bool attention_cuda_force_backward_tma64_variant(int on);
// The padded wgmma backward: head dims 32 and 96 run the d64 and d128 wgmma backward with the
// head dim padded in shared memory (sm_90a builds, Hopper) instead of the mma.sync backward.
// On by default; FLASHGPT_ATTN_BWD_PADDED=0 or 1 in the environment sets it (anything else is
// an error at the first backward). This switches it for every later
// backward: 1 on, 0 off, -1 the default; returns whether it was on. Throws flashgpt::Error for
// any other value.
bool attention_cuda_force_backward_padded(int padded);

// The d64 TMA forward's tiles (query rows x keys a step, K/V stages, CTAs per SM; the table is in
// docs/attention_gpu.md): how many this build has (0 without the TMA forward), and forcing one
// of them on every later d64 call that the TMA forward takes (dense batches), which also
// selects the TMA forward unless FLASHGPT_ATTN_FWD_KERNEL forces another kernel; -1 returns to
// the choice by shape; returns the tile forced before. FLASHGPT_ATTN_TMA_TILE=k in the
// environment forces tile k from the start. For tests and benchmarks; a call racing with a
// forward on another thread may see either tile. Throws flashgpt::Error for an index outside
// [-1, count).
int attention_cuda_tma64_tile_count();
int attention_cuda_force_tma64_tile(int tile);
// The same for the d128 TMA forward's tiles (kTma128Tiles in the same file; tile 1 is the
// default, tile 0 that of dropout calls), forced from the start by FLASHGPT_ATTN_TMA128_TILE=k
// in the environment. An index outside the table, in either variable, is an error at the first
// call. For A/B runs of the tiles in one build.
int attention_cuda_tma128_tile_count();
int attention_cuda_force_tma128_tile(int tile);
// The TMA forward tile a call with these params runs (an index of its head dim's table: the
// forced one, else the default, which at d128 depends on dropout), or -1 where another kernel
// runs. Benchmarks name it beside attention_cuda_forward_kernel.
int attention_cuda_forward_tma_tile(const AttentionParams& params);

// Writes o and lse.
void attention_forward_cuda(const AttentionParams& params, cudaStream_t stream = nullptr);

enum class Determinism {
  fast,           // dQ accumulated with fp32 atomics in whatever order the CTAs arrive
  deterministic,  // the same atomics, but in key-block order: identical bits on repeat
};

// Bytes of device workspace the backward pass needs for these params (dQ accumulator in
// fp32, rowsum(dO * O), semaphores): about batch * heads_q * seqlen_q * (head_dim + 1) * 4.
size_t attention_backward_workspace_bytes(const AttentionParams& params);

// Reads q, k, v, o, lse, d_o; writes dq, dk, dv. `workspace` is device memory of at least
// attention_backward_workspace_bytes(params) bytes, 256-byte aligned, not shared with any
// concurrent call; its contents need not be initialized.
void attention_backward_cuda(const AttentionParams& params, void* workspace, size_t workspace_bytes,
                             Determinism determinism = Determinism::fast, cudaStream_t stream = nullptr);

}  // namespace flashgpt
