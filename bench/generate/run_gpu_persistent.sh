#!/usr/bin/env bash
# The persistent decode path on the GPU machine, in one command, from a folder of binaries
# built elsewhere (see docs/generate.md, "Reproduce"):
#   bench/generate/run_gpu_persistent.sh DIR
# DIR holds flashgpt, generate_inference_cuda_test, torch_static_kv.py and lib/ (libfmt,
# libgomp). In order, each step bounded so that the whole stays under DEADLINE seconds
# (default 300): the persistent path's tests alone (a hang shows here first), the seed
# decode bench at batch 1, 8, 64 for the persistent path (FLASHGPT_CUDA_DECODE=persistent),
# its head-inside variant (FLASHGPT_PERSISTENT_HEAD=1) and the fused path
# (FLASHGPT_CUDA_DECODE=fused), the PyTorch loop (eager; torch.compile with TORCH_ARGS=""),
# block 0's barrier trace at batch 1 and 8, the rest of the CUDA engine's tests, and
# compute-sanitizer memcheck on a short generate of the tiny preset through the path.
# Logs go to $OUT (or results/generate_persistent).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu_persistent.sh DIR}")
OUT=${OUT:-results/generate_persistent}
DEADLINE=${DEADLINE:-300}
L=$OUT
mkdir -p "$L/persistent" "$L/fused" "$L/persistent_head"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
lim() { local l=$((DEADLINE - SECONDS)); [ $l -gt $1 ] && l=$1; [ $l -lt 3 ] && l=3; echo $l; }
t0=$SECONDS
timeout $(lim 40) "$DIR/generate_inference_cuda_test" --gtest_filter='*Persistent*' >"$L/persistent_test.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== persistent tests: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/persistent_test.log" | tr '\n' ' ')"
grep -E 'Failure|persistent vs|plan' -A2 "$L/persistent_test.log" | head -20
[ $rc = 124 ] && { echo "timed out (a hang?): stopping"; exit 1; }
bench() {  # dir batch env...
  local d=$1 b=$2; shift 2
  timeout $(lim 30) env "$@" "$DIR/flashgpt" bench generate --device cuda --preset seed --batch $b --prompt-tokens 128 \
    --new-tokens 256 $([ $b = 1 ] && echo --prefill-tokens 512) >"$L/$d/bench_b$b.log" 2>&1 || status=1
  echo "== $d b$b: $(grep -vE '^\{' "$L/$d/bench_b$b.log" | tail -2 | tr '\n' ' ')"
}
for b in 1 8 64; do
  bench persistent $b FLASHGPT_CUDA_DECODE=persistent
  [ $b != 64 ] && bench persistent_head $b FLASHGPT_CUDA_DECODE=persistent FLASHGPT_PERSISTENT_HEAD=1
  bench fused $b FLASHGPT_CUDA_DECODE=fused
done
t0=$SECONDS
timeout $(lim ${TORCH_TIMEOUT:-120}) python3 "$DIR/torch_static_kv.py" --flashgpt "$DIR/flashgpt" --ours "$L/persistent" \
  --batches 1,8,64 ${TORCH_ARGS---no-compile} --out "$L/torch.json" >"$L/torch.log" 2>&1 || status=1
echo "== torch ($((SECONDS - t0)) s)"; grep -vE '^\{' "$L/torch.log" | tail -14
for b in 1 8; do
  FLASHGPT_CUDA_DECODE=persistent FLASHGPT_PERSISTENT_TRACE=1 timeout $(lim 20) "$DIR/flashgpt" bench generate --device cuda \
    --preset seed --batch $b --prompt-tokens 128 --new-tokens 32 >"$L/persistent/trace_b$b.log" 2>&1
  echo "== trace b$b: $(grep -E 'persistent trace' "$L/persistent/trace_b$b.log")"
done
t0=$SECONDS
timeout $(lim 90) "$DIR/generate_inference_cuda_test" --gtest_filter='-*Persistent*' >"$L/cuda_test.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== other CUDA engine tests: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/cuda_test.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|Failure' -A2 "$L/cuda_test.log" | head -20
timeout $(lim 45) env FLASHGPT_CUDA_DECODE=persistent compute-sanitizer --tool memcheck --error-exitcode 9 "$DIR/flashgpt" \
  bench generate --device cuda --preset tiny --batch 3 --prompt-tokens 6 --new-tokens 6 >"$L/memcheck.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== memcheck rc $rc: $(grep -E 'ERROR SUMMARY' "$L/memcheck.log")"
exit $status
