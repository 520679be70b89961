#!/usr/bin/env bash
# The attention + proj decode kernel (FLASHGPT_CUDA_DECODE=attnproj) against today's fused
# path on the GPU machine, in one command, from a folder of binaries built elsewhere (see
# docs/generate.md, "Reproduce"):
#   bench/generate/run_gpu_attnproj.sh DIR
# DIR holds flashgpt, generate_inference_cuda_test and lib/ (libfmt, libgomp). In order,
# each step bounded so that the whole stays under DEADLINE seconds (default 185): every CUDA
# engine test, compute-sanitizer memcheck of a short tiny-preset generate through the new
# path, then the seed decode bench (128-token prompts, 256 steps) for the fused path
# (today's default), attnproj (its column blocks chosen by the engine: 8 at batch 1, 2 at
# batch 8), both with FLASHGPT_GEMV_WIDE=1 (fused_wide, attnproj_wide), attnproj_wide with
# the head's first 24 MB prefetched toward L2 (FLASHGPT_HEAD_L2_PREFETCH=24), attnproj with
# 4 column blocks (FLASHGPT_ATTN_PROJ_COLS) and attnproj_wide on a grid of 2 blocks per
# multiprocessor (FLASHGPT_GEMV_BLOCKS_PER_SM=2): batch 1 twice (two rounds, to see the
# spread), 8 and 64 once; then a table of tokens/s, % of the bound the bench measures on
# the same card and the ratio to the fused path's mean. Logs go to $OUT/logs (or
# results/generate_attnproj).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu_attnproj.sh DIR}")
OUT=${OUT:-results/generate_attnproj}
DEADLINE=${DEADLINE:-185}
L=$OUT/logs
mkdir -p "$L"
export PYTHONUNBUFFERED=1
HERE=$(dirname "${BASH_SOURCE[0]}")
if [ -f "$HERE/../gpu_libs.sh" ]; then source "$HERE/../gpu_libs.sh"; else source "$HERE/gpu_libs.sh"; fi
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
lim() { local l=$((DEADLINE - SECONDS)); [ $l -gt $1 ] && l=$1; [ $l -lt 3 ] && l=3; echo $l; }
t0=$SECONDS
timeout $(lim 80) "$DIR/generate_inference_cuda_test" >"$L/cuda_test.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== CUDA engine tests: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/cuda_test.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|Failure' -A3 "$L/cuda_test.log" | head -24
grep -E '^attnproj vs fused' "$L/cuda_test.log" | head -8
[ $rc = 124 ] && { echo "timed out (a hang?): stopping"; exit 1; }
t0=$SECONDS
timeout $(lim 40) env FLASHGPT_CUDA_DECODE=attnproj FLASHGPT_GEMV_WIDE=1 FLASHGPT_HEAD_L2_PREFETCH=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$DIR/flashgpt" bench generate --device cuda --preset tiny --batch 3 --prompt-tokens 6 --new-tokens 6 \
  >"$L/memcheck.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== memcheck (attnproj) rc $rc ($((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY' "$L/memcheck.log")"
: >"$L/bench.jsonl"
bench() {  # variant batch run
  local mode=attnproj cols="" wide=0 bps=3 l2=0
  case $1 in
    fused) mode=fused ;;
    fused_wide) mode=fused wide=1 ;;
    attnproj_wide) wide=1 ;;
    attnproj_c4) cols=4 ;;
    attnproj_c16) cols=16 ;;
    attnproj_wide_bps2) wide=1 bps=2 ;;
    attnproj_wide_l2) wide=1 l2=24 ;;
  esac
  local log="$L/bench_$1_b$2_r$3.log"
  timeout $(lim 25) env FLASHGPT_CUDA_DECODE=$mode FLASHGPT_GEMV_WIDE=$wide FLASHGPT_GEMV_BLOCKS_PER_SM=$bps \
    FLASHGPT_HEAD_L2_PREFETCH=$l2 \
    ${cols:+FLASHGPT_ATTN_PROJ_COLS=$cols} \
    "$DIR/flashgpt" bench generate \
    --device cuda --preset seed --batch $2 --prompt-tokens 128 --new-tokens 256 >"$log" 2>&1 || status=1
  echo "== $1 b$2 run $3: $(grep -E 'tokens/s|bound' "$log" | grep -vE '^\{' | sed 's/.*decode/decode/' | tr '\n' ' ')"
  grep -E '^\{' "$log" | sed "s/^{/{\"variant\": \"$1\", \"run\": $3, /" >>"$L/bench.jsonl"
}
# Most important first (a step cut short by the deadline loses the least): batch 1, then 8
# and 64, then the second batch-1 round and the column-block variants.
for v in fused attnproj attnproj_wide fused_wide attnproj_wide_l2; do bench $v 1 1; done
for v in fused attnproj attnproj_wide; do bench $v 8 1; done
for v in fused attnproj_wide; do bench $v 64 1; done
for v in fused attnproj attnproj_wide fused_wide attnproj_wide_l2; do bench $v 1 2; done
for v in attnproj_c4 attnproj_wide_bps2; do bench $v 1 1; done
python3 "$HERE/decode_table.py" "$L/bench.jsonl" | tee "$L/table.txt"
echo "== total $SECONDS s, status $status"
exit $status
