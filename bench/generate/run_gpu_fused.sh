#!/usr/bin/env bash
# The fused decode path (the default) on the GPU machine, in one command, from a folder of
# binaries built elsewhere (see docs/generate.md, "Reproduce"):
#   bench/generate/run_gpu_fused.sh DIR
# DIR holds flashgpt, generate_inference_cuda_test, torch_static_kv.py and lib/ (libfmt,
# libgomp). In order, each step bounded so that the whole stays under DEADLINE seconds
# (default 240): every CUDA engine test (the persistent path's compare against the fused
# one at the seed shape), the seed decode bench at batch 1 and 8 (each twice, to see the
# spread) and 64, the PyTorch loop (eager) on the same card, and compute-sanitizer memcheck
# of a short generate of the tiny preset. Logs go to $OUT (or results/generate_fused).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu_fused.sh DIR}")
OUT=${OUT:-results/generate_fused}
DEADLINE=${DEADLINE:-240}
L=$OUT
mkdir -p "$L/run1" "$L/run2"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
lim() { local l=$((DEADLINE - SECONDS)); [ $l -gt $1 ] && l=$1; [ $l -lt 3 ] && l=3; echo $l; }
t0=$SECONDS
timeout $(lim 90) "$DIR/generate_inference_cuda_test" >"$L/cuda_test.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== CUDA engine tests: rc $rc ($((SECONDS - t0)) s) $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/cuda_test.log" | tr '\n' ' ')"
grep -E '^\[  FAILED  \]|Failure' -A2 "$L/cuda_test.log" | head -20
[ $rc = 124 ] && { echo "timed out (a hang?): stopping"; exit 1; }
bench() {  # run batch
  timeout $(lim 30) env FLASHGPT_CUDA_DECODE=fused "$DIR/flashgpt" bench generate --device cuda --preset seed --batch $2 \
    --prompt-tokens 128 --new-tokens 256 $([ $2 = 1 ] && echo --prefill-tokens 512) >"$L/$1/bench_b$2.log" 2>&1 || status=1
  echo "== $1 b$2: $(grep -vE '^\{' "$L/$1/bench_b$2.log" | tail -2 | tr '\n' ' ')"
}
for b in 1 8 64; do bench run1 $b; done
for b in 1 8; do bench run2 $b; done
t0=$SECONDS
timeout $(lim 100) python3 "$DIR/torch_static_kv.py" --flashgpt "$DIR/flashgpt" --ours "$L/run1" \
  --batches 1,8,64 --no-compile --out "$L/torch.json" >"$L/torch.log" 2>&1 || status=1
echo "== torch ($((SECONDS - t0)) s)"; grep -vE '^\{' "$L/torch.log" | tail -14
timeout $(lim 45) compute-sanitizer --tool memcheck --error-exitcode 9 "$DIR/flashgpt" \
  bench generate --device cuda --preset tiny --batch 3 --prompt-tokens 6 --new-tokens 6 >"$L/memcheck.log" 2>&1; rc=$?
[ $rc -ne 0 ] && status=1
echo "== memcheck rc $rc: $(grep -E 'ERROR SUMMARY' "$L/memcheck.log")"
exit $status
