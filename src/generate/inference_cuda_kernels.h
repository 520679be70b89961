// The CUDA inference engine's kernels (inference_cuda_kernels.cu), one launcher each; all
// pointers are device memory, every launch is enqueued on `stream` without synchronizing.
// Private to src/generate. Shapes row-major; N tokens in a call, C channels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace flashgpt::inference_cuda {

using bf16 = __nv_bfloat16;

// Where each token of a call goes: its id, its position in its slot, its slot.
struct TokenPlace {
  int32_t token, pos, slot;
};

// Sampling parameters as the sampling kernel reads them from device memory (so a captured
// graph sees each step's values).
struct SampleParams {
  int32_t greedy = 1;
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

// x (N, C) fp32 = wte[token] + wpe[pos].
void embed(float* x, const TokenPlace* places, const float* wte, const float* wpe, int N, int C, cudaStream_t stream);

// For each output row n < rows: r = row_index ? row_index[n] : n; xr = x[r] (+ y[r] + bias
// when y is given); h[n] = LayerNorm(xr) * w + b (bf16); x[r] = xr when write_x.
// loads_first: a lane issues all its loads before it adds (1), a branch per column (0), or
// FLASHGPT_DECODE_LN_LOADS_FIRST (-1; 1 unless it is 0). The same bits either way.
void residual_layernorm(float* x, const bf16* y, const float* bias, const float* w, const float* b, bf16* h,
                        const int32_t* row_index, int rows, int C, bool write_x, cudaStream_t stream,
                        int loads_first = -1);

// qkv (N, 3C) bf16 + bias (3C): q (N, C) bf16 gets the first C columns, the K and V caches
// (slot, pos) rows the next two (cache row stride C, slot stride T C).
void split_qkv(bf16* q, bf16* k_cache, bf16* v_cache, const bf16* qkv, const float* bias, const TokenPlace* places,
               int N, int C, int64_t slot_stride, cudaStream_t stream);

// ff (N, F) bf16 = gelu_tanh(ff + bias), in place.
void bias_gelu(bf16* ff, const float* bias, int64_t N, int F, cudaStream_t stream);

// y (rows, out) (row stride ldy; fp32 or bf16) = x (rows, in) W (out, in)^T, then, when
// bias_gelu is given, gelu_tanh(y + bias_gelu). For decode steps of at most kGemvMaxRows
// rows: returns false (nothing launched) for a shape it does not take (rows outside
// 1 .. kGemvMaxRows, in % 8 != 0), and the caller runs cuBLAS instead.
constexpr int kGemvMaxRows = 8;
bool gemv(void* y, bool y_f32, int64_t ldy, const bf16* x, const bf16* w, const float* bias_gelu, int rows, int in,
          int out, cudaStream_t stream);

// Bytes toward L2 with the evict-last priority, a hint issued before griddepcontrol.wait and
// split over the grid's threads, one prefetch per 128-byte line (prefetch_l2_range): the
// head's first rows (FLASHGPT_HEAD_L2_PREFETCH) or, with FLASHGPT_DECODE_L2_AHEAD=1, the
// weights the kernel's role reads in the next layer. Null: none.
struct L2Range {
  const void* ptr = nullptr;
  int64_t bytes = 0;
};

// ---- the fused decode path (calls of at most kGemvMaxRows rows) -------------------------
//
// One kernel per matrix of a layer: y = op(in) W^T with its prologue and epilogue fused, so
// a decode step is embed, then per layer ln1+qkv(+cache write), attention, proj(+residual),
// ln2+fc(+GELU), fc_proj(+residual), then lnf+head(+argmax partials) and sampling. Each
// warp streams one output row of W (16-byte loads, 8 in flight per lane before the first
// use), a grid-stride loop covers the rest; the first loads are issued before
// griddepcontrol.wait, so with programmatic dependent launch (`programmatic`) they overlap
// the previous kernel's tail.
enum class GemvEpilogue {
  store_bf16,     // y (rows, ldy) bf16 = acc (+ bias when given)
  bias_gelu,      // y (rows, ldy) bf16 = gelu_tanh(acc + bias)
  residual,       // residual (rows, out) fp32 += acc + bias
  qkv_cache,      // out = 3C: acc + bias to q (rows, C) bf16 and the K/V cache rows at places[r]
  logits_argmax,  // y (rows, ldy) fp32 = acc; argmax partials over columns < valid_out
};

struct FusedGemvParams {
  // The input rows: LayerNorm(x_f32[row_index ? row_index[r] : r]) * ln_w + ln_b rounded to
  // bf16 when ln_w is given (x_f32 row stride `in`), else the bf16 rows x_bf16 (stride in).
  const float* x_f32 = nullptr;
  const float* ln_w = nullptr;
  const float* ln_b = nullptr;
  const int32_t* row_index = nullptr;
  const bf16* x_bf16 = nullptr;
  // With ln_w: the row's LayerNorm statistics as ln_parts (mean, M2) pairs of column chunks
  // of ln_width (the last ones shorter or empty), row r's at ln_stats + src * ln_parts, as
  // the layer3 path's producers leave them (ln_stats_merge); null: computed from the row.
  const float2* ln_stats = nullptr;
  int ln_parts = 0, ln_width = 0;
  const bf16* w = nullptr;  // (out, in)
  int rows = 0, in = 0, out = 0;
  const float* bias = nullptr;  // (out) or null
  void* y = nullptr;
  int64_t ldy = 0;
  float* residual = nullptr;
  // qkv_cache
  bf16* q = nullptr;
  bf16* k_cache = nullptr;
  bf16* v_cache = nullptr;
  const TokenPlace* places = nullptr;
  int64_t slot_stride = 0;
  // logits_argmax: per (row, block) the block's best logit and its column (lowest on a tie)
  float* part_val = nullptr;  // (rows, gemv_fused_blocks(...))
  int32_t* part_idx = nullptr;
  int valid_out = 0;
  bool programmatic = false;
  // The residual epilogue with 2048 < in <= 3072 (fc_proj at d_ff 3072): 12 loads a lane in
  // flight instead of 8, so a row's loads all go out before the wait (FLASHGPT_GEMV_WIDE=1).
  bool wide = false;
  L2Range l2_prefetch;  // optional: the next layer's matrix of this role, or the head's first rows
  // At 2 .. 8 input rows and every epilogue but the head's, the tensor-core kernel (mma.sync
  // m16n8k16, the input rows as the 8 columns; gemv_mma_taken). Not the same bits: another order
  // of sums. The engine sets it unless FLASHGPT_GEMV_MMA=0.
  bool mma = false;
};

// Blocks the fused kernel launches for `out` output rows (the head's argmax partials are
// that many per row).
int gemv_fused_blocks(int out);
// Returns false (nothing launched) for a shape it does not take: rows outside
// 1 .. kGemvMaxRows, in % 8 != 0, or rows x in bf16 (plus 64 bytes a row with the
// LayerNorm at 1 or 2 rows, 64 for the head's argmax) above 48 KB of shared memory. The
// pointers must be 16-byte aligned (cudaMalloc'd buffers at offsets of whole rows).
bool gemv_fused(const FusedGemvParams& p, GemvEpilogue epilogue, cudaStream_t stream);

// Whether gemv_fused takes p (p.mma set) on the tensor-core kernel: 2 .. kGemvMaxRows rows,
// not the head (logits_argmax), a shape gemv_fused takes. Decided from the shape alone.
bool gemv_mma_taken(const FusedGemvParams& p, GemvEpilogue epilogue);
// The tensor-core kernel's launches so far in this process (a test's proof that a switch took it).
int64_t gemv_mma_launch_count();

// x (N, C) fp32 = wte[token] + wpe[pos], launched as part of the fused path. With stats
// (the layer3 path; C % 32 == 0): also each row's LayerNorm statistics as C / 32 (mean, M2)
// pairs of 32-column chunks, row n's at stats + n * C / 32.
void embed_fused(float* x, const TokenPlace* places, const float* wte, const float* wpe, int N, int C,
                 bool programmatic, cudaStream_t stream, float2* stats = nullptr);

// tokens[b] = the token drawn from logits row b (row stride ld, V real columns) as
// sampling_draw does: argmax (lowest id on a tie) when greedy, else temperature, top-k,
// top-p and a Philox draw keyed (seed, prompt_index[b], step[b]).
// With part_val/part_idx (the head's argmax partials, `parts` per row) a greedy row reduces
// those instead of scanning the logits.
void sample(int32_t* tokens, const float* logits, int64_t ld, int V, int rows, const SampleParams* params,
            const uint64_t* prompt_index, const uint64_t* step, cudaStream_t stream,
            const float* part_val = nullptr, const int32_t* part_idx = nullptr, int parts = 0,
            bool programmatic = false);


// ---- attention + proj in one kernel (FLASHGPT_CUDA_DECODE=attnproj) --------------------
//
// residual[q_rows[r]] += bias + W_proj bf16(attention(q row r, the first lengths[r] keys of
// slot slots[r])), for decode rows only: the fused path's attention and proj launches
// become one. Block (column block j, head h, row r) of `col_blocks` x heads x rows: 256
// threads compute head h's attention over all the row's keys (no split of the keys, so no
// partials to combine: every key is read by the same block, a group of head_dim / 8 lanes a
// key, 16-byte loads, up to 8 keys a lane in flight), round it to bf16 as the fused path's
// attention output is, multiply it by its columns' slice of W_proj (loaded before
// griddepcontrol.wait: it depends on no earlier kernel) and write the head's partial sums
// (rows, heads, C). The last of the heads' blocks of (row, j) to finish (an atomic count,
// reset by that block) adds the heads' partials in head order, the bias and the residual:
// the sums do not depend on which block came last. Head dims 32, 64 and 128.
struct AttentionProjParams {
  const bf16* q = nullptr;  // row r's head h at q + q_rows[r] * C + h * head_dim
  const bf16* k_cache = nullptr;  // slot s, position t at k_cache + s * slot_stride + t * C
  const bf16* v_cache = nullptr;
  const int32_t* q_rows = nullptr;   // (rows): q's and the residual's row of decode row r
  const int32_t* slots = nullptr;    // (rows)
  const int32_t* lengths = nullptr;  // (rows): keys attended, 1 .. max_length
  const bf16* w = nullptr;           // (C, C) proj weight, (out, in)
  const float* bias = nullptr;       // (C)
  float* residual = nullptr;         // (., C) fp32
  float* partials = nullptr;         // (rows, heads, C) scratch
  unsigned* counters = nullptr;      // (rows, col_blocks), zero; left zero
  // Optional (the layer3 path): the new residual row's LayerNorm statistics, one (mean, M2)
  // pair per column block (its ceil(C / col_blocks) columns), row r's at ln_stats + r *
  // col_blocks, written by the block that adds that column block.
  float2* ln_stats = nullptr;
  int rows = 0, heads = 0, head_dim = 0, C = 0, max_length = 0, col_blocks = 1;
  int64_t slot_stride = 0;
  bool programmatic = false;
  L2Range l2_prefetch;  // optional: the next layer's W_proj, or head rows
};
// The column blocks the engine uses for `rows` x `heads` (at least 1, at most 8; enough
// blocks to spread W_proj's loads, few enough that the redundant attention stays cheap).
int attention_proj_col_blocks(int rows, int heads);
// Whether it takes this shape (head dim 32, 64 or 128, the scores of max_length keys in
// shared memory, col_blocks 1 .. 64); false: nothing launched.
bool attention_proj_supported(int head_dim, int max_length, int col_blocks);
// Throws std::invalid_argument for a shape it does not take or a null pointer.
void attention_proj(const AttentionProjParams& p, cudaStream_t stream);

// ---- ln2 + fc + GELU + fc_proj + residual in one kernel (FLASHGPT_CUDA_DECODE=layer3) ----
//
// x[r] += fc_proj_b + W_fcp bf16(gelu(W_fc bf16(LayerNorm(x[r])) + fc_b)) for rows r <
// rows (decode rows, residual row r), the fused path's fc and fc_proj launches in one.
// Block b of F / kMlpSlice owns fc's outputs b kMlpSlice .. + kMlpSlice: 8 warps, two fc
// rows each (their weights and the block's (C, kMlpSlice) slice of W_fcp loaded before
// griddepcontrol.wait), the LayerNorm from the statistics its producer left (no reduction
// over the row), then the block's partial of fc_proj over its slice, all C columns, to
// partials (blocks, rows, C). The last C / 32 blocks to arrive (an atomic 64-bit ticket,
// never reset: a launch adds exactly its grid) each wait until every block has arrived and
// reduce one 32-column chunk: the blocks' partials summed in block order (so the result
// does not depend on which block arrived when), + bias + residual, and the chunk's
// LayerNorm statistics (mean, M2) for the next layer's ln1 (or lnf). The wait needs every
// block resident at once: mlp_fused_plan checks it with the occupancy calculator.
constexpr int kMlpSlice = 16;
struct MlpParams {
  float* x = nullptr;                  // (rows, C) fp32 residual, updated
  const float* ln_w = nullptr;         // ln2 (C)
  const float* ln_b = nullptr;
  const float2* ln_stats = nullptr;    // the row's statistics in: ln_parts chunks of ln_width
  int ln_parts = 0, ln_width = 0;
  const bf16* fc_w = nullptr;          // (F, C)
  const float* fc_b = nullptr;         // (F)
  const bf16* fcp_w = nullptr;         // (C, F)
  const float* fcp_b = nullptr;        // (C)
  float* partials = nullptr;           // (F / kMlpSlice, rows, C) scratch
  unsigned long long* arrive = nullptr;  // one counter, zero at the engine's start
  float2* stats_out = nullptr;         // (rows, C / 32): the new row's statistics
  int rows = 0, C = 0, F = 0;
  bool programmatic = false;
  L2Range l2_prefetch[2];  // optional: the next layer's W_fc and W_fcp, or head rows
};
struct MlpPlan {
  bool ok = false;
  std::string why;   // when not ok
  int rows_max = 0;  // 1 .. kMlpMaxRows
  int grid = 0;
};
constexpr int kMlpMaxRows = 4;
// Whether the kernel takes (C, F) for up to rows_max rows on this device: C % 32 == 0,
// C <= 2048, F % kMlpSlice == 0, C / 32 <= F / kMlpSlice, and all F / kMlpSlice blocks
// resident at once; rows_max is the most rows (<= the argument, <= kMlpMaxRows) it fits.
MlpPlan mlp_fused_plan(int rows_max, int C, int F);
// Throws std::invalid_argument for a null pointer or rows outside 1 .. plan.rows_max.
void mlp_fused(const MlpParams& p, const MlpPlan& plan, cudaStream_t stream);

// ---- the persistent decode path (decode steps of 1 .. kGemvMaxRows rows) ----------------
//
// Every layer of a decode step in one cooperative launch (decode_persistent.cu): one block
// per multiprocessor, five phases a layer (ln1+qkv+cache write, attention, proj+residual,
// ln2+fc+GELU, fc_proj+residual) separated by grid-wide barriers; each block's slice of the
// next product phases' weights streams into a ring of shared-memory buffers
// (cp.async.bulk) while the dependent chain runs. It starts from the tokens (the
// embedding) and leaves the residual stream in x; the head runs after it.
struct PersistentDecodeParams {
  // Layer 0's matrices (bf16, (out, in)); layer l's at l * out * in further.
  const bf16* qkv_w = nullptr;
  const bf16* proj_w = nullptr;
  const bf16* fc_w = nullptr;
  const bf16* fcp_w = nullptr;
  // fp32, layer 0's; layer l's at l * out further.
  const float* qkv_b = nullptr;
  const float* proj_b = nullptr;
  const float* fc_b = nullptr;
  const float* fcp_b = nullptr;
  const float* ln1_w = nullptr;
  const float* ln1_b = nullptr;
  const float* ln2_w = nullptr;
  const float* ln2_b = nullptr;
  const float* wte = nullptr;  // fp32 (V, C)
  const float* wpe = nullptr;  // fp32 (context, C)
  const TokenPlace* places = nullptr;  // (rows): token, position (its cache length - 1), slot
  float* x = nullptr;                  // (rows, C) the residual stream out
  bf16* q = nullptr;                   // (rows, C) scratch
  bf16* att = nullptr;                 // (rows, C) scratch
  bf16* ff = nullptr;                  // (rows, F) scratch
  bf16* k_cache = nullptr;             // (L, S, T, C)
  bf16* v_cache = nullptr;
  int64_t slot_stride = 0;   // T C
  int64_t layer_stride = 0;  // S T C
  int rows = 0, C = 0, F = 0, L = 0, heads = 0, head_dim = 0, max_length = 0;  // max_length: T
  // Optional: the head in the same launch (lnf, then the tied head over head_rows (Vp)
  // rows of head_w, streamed through the same buffers; logits (rows, ldl) fp32 and one
  // argmax partial per (row, block): part_val/part_idx (rows, grid), columns >= valid_out
  // skipped). Null head_w: the kernel ends with x.
  const bf16* head_w = nullptr;
  const float* lnf_w = nullptr;
  const float* lnf_b = nullptr;
  float* logits = nullptr;
  int64_t ldl = 0;
  float* part_val = nullptr;
  int32_t* part_idx = nullptr;
  int head_rows = 0, valid_out = 0;
  // Optional timing: (2 + 2 (5 L - 1)) clock64 stamps of block 0 (start, before and after
  // each grid barrier, end); null when off.
  long long* trace = nullptr;
  // Filled by persistent_decode from the plan.
  int slots = 0, xres_stride = 0, head_chunk = 0;
  int64_t slot_bytes = 0, off_xin = 0, off_xres = 0, off_ln = 0, off_bias = 0, off_red = 0, off_att = 0;
};

struct PersistentDecodePlan {
  bool ok = false;
  std::string why;  // when not ok: what the path does not take
  int grid = 0, rows_max = 0, head_dim = 0, slots = 0, xres_stride = 0, head_chunk = 0;
  int64_t slot_bytes = 0, shared = 0, off_xin = 0, off_xres = 0, off_ln = 0, off_bias = 0, off_red = 0, off_att = 0;
};

// Whether (and how) the path runs this shape on the current device: up to rows_max rows
// (1 .. kGemvMaxRows), head dim 32, 64 or 128, d_model <= 2048, a compute capability of 9.0
// or more with cooperative launch, and every block resident at once with at least two
// weight buffers of shared memory (checked with the occupancy calculator).
PersistentDecodePlan persistent_decode_plan(int rows_max, int C, int F, int heads, int head_dim, int max_length);
// Launches it (cudaLaunchCooperativeKernel, capturable into a graph). params.rows <= the
// plan's rows_max; every pointer 16-byte aligned.
void persistent_decode(const PersistentDecodeParams& params, const PersistentDecodePlan& plan, cudaStream_t stream);

}  // namespace flashgpt::inference_cuda
