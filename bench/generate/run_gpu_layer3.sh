#!/usr/bin/env bash
# The three-launches-a-layer decode path (FLASHGPT_CUDA_DECODE=layer3) against the fused path
# (the default) and attnproj on the GPU machine, in one command, from a folder of binaries
# built elsewhere (see docs/generate.md, "Reproduce"):
#   bench/generate/run_gpu_layer3.sh DIR
# DIR holds flashgpt, generate_inference_cuda_test and lib/ (libfmt, libgomp). In order, each
# step bounded so that the whole stays under DEADLINE seconds (default 170): the layer3
# kernels' and paths' tests (MlpFusedCuda.*, AttentionProjCuda.*, InferenceCuda.Layer3*,
# InferenceCuda.L2Ahead*), compute-sanitizer memcheck of a short tiny-preset generate through
# layer3 with the L2-ahead prefetch, the seed decode bench at batch 1 (128-token prompts, 256
# steps) for each of VARIANTS (default "fused attnproj layer3"; a "+l2ahead" suffix adds
# FLASHGPT_DECODE_L2_AHEAD=1), two interleaved rounds, each printing the decode graph's
# launches (FLASHGPT_GRAPH_NODES=1),
# batch 4 for fused and layer3 once, then every other CUDA engine test with the time left,
# and a table of tokens/s, % of the bound the bench measures on the same card and the ratio
# to the fused path's mean. Logs go to $OUT/logs (or results/generate_layer3).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu_layer3.sh DIR}")
OUT=${OUT:-results/generate_layer3}
DEADLINE=${DEADLINE:-170}
L=$OUT/logs
mkdir -p "$L"
HERE=$(dirname "${BASH_SOURCE[0]}")
if [ -f "$HERE/../gpu_libs.sh" ]; then source "$HERE/../gpu_libs.sh"; else source "$HERE/gpu_libs.sh"; fi
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
lim() { local l=$((DEADLINE - SECONDS)); [ $l -gt $1 ] && l=$1; [ $l -lt 3 ] && l=3; echo $l; }
NEW='MlpFusedCuda.*:AttentionProjCuda.*:InferenceCuda.Layer3*:InferenceCuda.L2Ahead*'
t0=$SECONDS
timeout $(lim 60) "$DIR/generate_inference_cuda_test" --gtest_filter="$NEW" >"$L/test_layer3.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== layer3 tests: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/test_layer3.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|Failure' -A3 "$L/test_layer3.log" | head -24
grep -E '^layer3 vs fused' "$L/test_layer3.log" | head -8
[ $rc = 124 ] && { echo "timed out (a hang?): stopping"; exit 1; }
t0=$SECONDS
timeout $(lim 30) env FLASHGPT_CUDA_DECODE=layer3 FLASHGPT_DECODE_L2_AHEAD=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  "$DIR/flashgpt" bench generate --device cuda --preset tiny --batch 3 --prompt-tokens 6 --new-tokens 6 \
  >"$L/memcheck.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== memcheck (layer3) rc $rc ($((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY' "$L/memcheck.log")"
: >"$L/bench.jsonl"
: >"$L/bench.log"
bench() {  # variant (path or path+l2ahead) batch run
  local log="$L/bench_$1_b$2_r$3.tmp" ahead=0
  [ "${1%+l2ahead}" != "$1" ] && ahead=1
  timeout $(lim 25) env FLASHGPT_CUDA_DECODE=${1%+l2ahead} FLASHGPT_DECODE_L2_AHEAD=$ahead FLASHGPT_GRAPH_NODES=1 \
    "$DIR/flashgpt" bench generate \
    --device cuda --preset seed --batch $2 --prompt-tokens 128 --new-tokens 256 >"$log" 2>&1 || status=1
  echo "== $1 b$2 run $3: $(grep -E 'tokens/s|bound|decode graph' "$log" | grep -vE '^\{' | sed 's/.*decode/decode/' | tr '\n' ' ')"
  grep -E '^\{' "$log" | sed "s/^{/{\"variant\": \"$1\", \"run\": $3, /" >>"$L/bench.jsonl"
  { echo "==== $1 batch $2 run $3"; cat "$log"; } >>"$L/bench.log"
  rm -f "$log"
}
for r in 1 2; do for v in ${VARIANTS:-fused attnproj layer3}; do bench $v 1 $r; done; done
for v in fused layer3; do bench $v 4 1; done
python3 "$HERE/decode_table.py" "$L/bench.jsonl" | tee "$L/table.txt"
t0=$SECONDS
left=$((DEADLINE - SECONDS))
if [ $left -gt 15 ]; then
  timeout $((left - 3)) "$DIR/generate_inference_cuda_test" --gtest_filter="-$NEW" >"$L/test_rest.log" 2>&1; rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status=1
  echo "== the other engine tests: rc $rc ($((SECONDS - t0)) s; 124: cut by the deadline) $(grep -E '^\[  (PASSED|FAILED)  \]|^\[       OK \]' "$L/test_rest.log" | wc -l) done: $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/test_rest.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]|Failure' -A3 "$L/test_rest.log" | head -16
else
  echo "== the other engine tests: no time left"
fi
echo "== total $SECONDS s, status $status"
exit $status
