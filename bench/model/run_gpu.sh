#!/usr/bin/env bash
# Everything the GPU machine does for the CUDA model backend, in one command, from a folder
# holding binaries built elsewhere (the device tool sends prebuilt executables):
#   bench/model/run_gpu.sh DIR [test|bench|train|sanitize|all]...
# DIR holds flashgpt, model_cuda_test, model_cuda_ops_test, train_logits_tool, torch_gpt.py,
# train_gpu_test.py, train_fixtures.py and lib/ (shared libraries the machine lacks, e.g.
# libfmt). Logs go to $OUT (or results/model_gpu). `all` runs test, bench, train, sanitize;
# `profile` (on request) times the step without CUDA graphs and prints the per-op profile.
set -uo pipefail
DIR=${1:?usage: run_gpu.sh DIR [test|bench|train|sanitize|profile|all]...}
shift
OUT=${OUT:-results/model_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
for step in "${@:-all}"; do
  case $step in
    test|all)
      for t in model_cuda_ops_test model_cuda_test; do
        start=$SECONDS
        "$DIR/$t" >"$OUT/$t.log" 2>&1 || status=1
        echo "$t: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/$t.log" | tr '\n' ' ') ($((SECONDS - start)) s)"
        grep -E '^\[  FAILED  \]|Failure|error' "$OUT/$t.log" | head -20
      done
      grep -E "relative error|loss cpu|loss: start|BGRADB" "$OUT/model_cuda_test.log" "$OUT/model_cuda_ops_test.log" |
        sort -t' ' -k1,1 -s | head -80 ;;&
    bench|all)
      start=$SECONDS
      python3 "$DIR/torch_gpt.py" --flashgpt "$DIR/flashgpt" --out "$OUT/bench_train.json" ${BENCH_ARGS:-} \
        >"$OUT/bench.log" 2>&1 || status=1
      grep -E "^card|validate|bench train:|tokens/s|Error|error" "$OUT/bench.log" | head -30
      sed -n '/^seed preset/,$p' "$OUT/bench.log"
      echo "bench: $((SECONDS - start)) s" ;;&
    train|all)
      # flashgpt train/export on the GPU: resume equals uninterrupted, HF export vs our CUDA logits.
      start=$SECONDS
      python3 "$DIR/train_gpu_test.py" "$DIR/flashgpt" "$DIR/train_logits_tool" >"$OUT/train_gpu_test.log" 2>&1 ||
        status=1
      grep -E "FAIL|head dim|passed|skipped|failed" "$OUT/train_gpu_test.log" | head -20
      echo "train_gpu_test: $((SECONDS - start)) s" ;;&
    sanitize|all)
      # A model step through the CUDA-graph path (the default) under memcheck.
      start=$SECONDS
      compute-sanitizer --tool memcheck --error-exitcode 9 "$DIR/model_cuda_test" \
        --gtest_filter='*GradientsAccumulate*' >"$OUT/sanitize_memcheck.log" 2>&1 || status=1
      echo "memcheck: $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_memcheck.log" | tail -1) ($((SECONDS - start)) s)" ;;&
    profile)
      # Not in `all`: our step without CUDA graphs (their gain), and the per-op GPU profile
      # (FLASHGPT_MODEL_PROFILE=1 runs eagerly), seed at V = 100277.
      start=$SECONDS
      args=(bench train --vocab 100277 --batch 64 --context 512 --warmup 2)
      { FLASHGPT_CUDA_GRAPH=0 "$DIR/flashgpt" "${args[@]}" --steps 6 &&
        FLASHGPT_MODEL_PROFILE=1 "$DIR/flashgpt" "${args[@]}" --steps 4; } >"$OUT/profile.log" 2>&1 || status=1
      grep -oE '"tokens_per_s":[0-9.]+|"step_ms":[0-9.]+' "$OUT/profile.log"
      grep -E "^profile:" "$OUT/profile.log"
      echo "profile: $((SECONDS - start)) s" ;;
  esac
done
exit $status
