#!/usr/bin/env bash
# The L2-ahead weight prefetch (FLASHGPT_DECODE_L2_AHEAD=1: each layer kernel prefetches the
# weights its role reads in the next layer) on and off through the fused, attnproj and layer3
# decode paths on the GPU machine, in one command, from a folder of binaries built elsewhere
# (see docs/generate.md, "Reproduce"):
#   bench/generate/run_gpu_l2ahead.sh DIR
# DIR holds flashgpt, generate_inference_cuda_test and lib/ (libfmt, libgomp). In order, each
# step bounded so that the whole stays under DEADLINE seconds (default 200): the switch's test
# (InferenceCuda.L2Ahead*: the same logits and tokens on and off through each path),
# compute-sanitizer memcheck of a short tiny-preset generate through layer3 with the switch
# on, then the seed decode bench at batch 1 (128-token prompts, 256 steps) for fused,
# attnproj and layer3, each with the switch off and on, two interleaved rounds, and a table
# of tokens/s, % of the bound the bench measures on the same card and the ratio to the fused
# path's mean (variants "<path>+l2ahead" have the switch on). Logs go to $OUT/logs (or
# results/generate_l2ahead).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu_l2ahead.sh DIR}")
OUT=${OUT:-results/generate_l2ahead}
DEADLINE=${DEADLINE:-200}
L=$OUT/logs
mkdir -p "$L"
HERE=$(dirname "${BASH_SOURCE[0]}")
if [ -f "$HERE/../gpu_libs.sh" ]; then source "$HERE/../gpu_libs.sh"; else source "$HERE/gpu_libs.sh"; fi
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
lim() { local l=$((DEADLINE - SECONDS)); [ $l -gt $1 ] && l=$1; [ $l -lt 3 ] && l=3; echo $l; }
t0=$SECONDS
timeout $(lim 90) "$DIR/generate_inference_cuda_test" --gtest_filter='InferenceCuda.L2Ahead*' >"$L/test_l2ahead.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
echo "== L2-ahead test: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/test_l2ahead.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|Failure' -A3 "$L/test_l2ahead.log" | head -24
[ $rc = 124 ] && { echo "timed out (a hang?): stopping"; exit 1; }
t0=$SECONDS
timeout $(lim 30) env FLASHGPT_CUDA_DECODE=layer3 FLASHGPT_DECODE_L2_AHEAD=1 compute-sanitizer --tool memcheck \
  --error-exitcode 9 "$DIR/flashgpt" bench generate --device cuda --preset tiny --batch 3 --prompt-tokens 6 \
  --new-tokens 6 >"$L/memcheck.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== memcheck (layer3, L2 ahead) rc $rc ($((SECONDS - t0)) s): $(grep -E 'ERROR SUMMARY' "$L/memcheck.log")"
: >"$L/bench.jsonl"
: >"$L/bench.log"
bench() {  # mode l2ahead(0|1) run
  local label=$1
  [ "$2" = 1 ] && label=$1+l2ahead
  local log="$L/bench_${label}_r$3.tmp"
  timeout $(lim 25) env FLASHGPT_CUDA_DECODE=$1 FLASHGPT_DECODE_L2_AHEAD=$2 "$DIR/flashgpt" bench generate \
    --device cuda --preset seed --batch 1 --prompt-tokens 128 --new-tokens 256 >"$log" 2>&1 || status=1
  echo "== $label run $3: $(grep -E 'tokens/s|bound' "$log" | grep -vE '^\{' | tr '\n' ' ')"
  grep -E '^\{' "$log" | sed "s/^{/{\"variant\": \"$label\", \"run\": $3, /" >>"$L/bench.jsonl"
  { echo "==== $label batch 1 run $3"; cat "$log"; } >>"$L/bench.log"
  rm -f "$log"
}
for r in 1 2; do for v in fused attnproj layer3; do for a in 0 1; do bench $v $a $r; done; done; done
python3 "$HERE/decode_table.py" "$L/bench.jsonl" | tee "$L/table.txt"
echo "== total $SECONDS s, status $status"
exit $status
