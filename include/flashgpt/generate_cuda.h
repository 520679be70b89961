// The flash-decoding attention kernel of the CUDA inference engine, exposed for its test.
//
// Each query row (one new token of a sequence) attends to the first lengths[r] keys of its
// slot's bf16 K/V cache. The keys are split into blocks of keys_per_split, one thread
// block per (block of keys, head, row), so even one row fills the GPU; each writes its
// (max score, sum of exponentials, unnormalised output) to `partials`, and a second kernel
// combines a row's blocks through their log-sum-exp. attention_decode_split_reference
// (generate.h) is the same algorithm on the CPU. With `counters` given, there is no second
// kernel: the last block of each (head, row) to finish (an atomic count, reset by that
// block) combines them.
#pragma once

#include <flashgpt/attention_cuda.h>

#include <cstddef>
#include <cstdint>

namespace flashgpt {

struct DecodeAttentionCudaParams {
  const void* q = nullptr;  // bf16: row r, head h at q + q_rows[r] * q_row_stride + h * head_dim
  const void* k = nullptr;  // bf16: slot s, position j, head h at k + s * slot_stride + j * row_stride + h * head_dim
  const void* v = nullptr;  // bf16, like k
  void* o = nullptr;        // bf16: like q with o_row_stride
  float* partials = nullptr;  // attention_decode_cuda_partial_floats(...) floats of device memory
  const int32_t* q_rows = nullptr;   // (rows) device
  const int32_t* slots = nullptr;    // (rows) device
  const int32_t* lengths = nullptr;  // (rows) device: keys attended, 1 .. max_length
  int rows = 0, heads = 0, head_dim = 0;  // head_dim 32, 64, 96 or 128
  int64_t q_row_stride = 0, o_row_stride = 0, row_stride = 0, slot_stride = 0;  // elements
  int max_length = 0;      // the most keys any row may attend (the grid covers it; blocks past a row's length exit)
  int keys_per_split = 0;  // 8 .. 256, a multiple of 8
  // Optional (rows * heads) zeroed device counters: fuses the combine into the first kernel
  // (the counters are left zero again). Null: a second kernel combines.
  unsigned* counters = nullptr;
  // Launch with programmatic dependent launch (the kernels wait for the previous kernel in
  // the stream with griddepcontrol.wait before reading q or the cache; q_rows, slots and
  // lengths are read before that wait, so no kernel still running may write them).
  bool programmatic = false;
  // Keys a warp loads before it uses the first: 4, 8 or 16; 0 takes FLASHGPT_DECODE_KEY_GROUP
  // (default 8). The same bits either way: only how many loads are in flight changes.
  int key_group = 0;
};

size_t attention_decode_cuda_partial_floats(int rows, int heads, int head_dim, int max_length, int keys_per_split);
void attention_decode_cuda(const DecodeAttentionCudaParams& params, cudaStream_t stream);

}  // namespace flashgpt
