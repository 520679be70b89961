#!/usr/bin/env bash
# Everything the GPU machine does for the attention kernels, in one command, from the repo root:
#   bench/attention_gpu/run_gpu.sh [build|test|sanitize|bench|all]...
# Logs and results go to $OUT (the device tool's folder) or results/attention_gpu.
set -uo pipefail
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT"
export FLASHGPT_BUILD_DIR=$PWD/build PYTHONUNBUFFERED=1
status=0
for step in "${@:-all}"; do
  case $step in
    build|all)
      { cmake -S . -B build -G Ninja -DFLASHGPT_CUDA=ON -DFLASHGPT_PYTHON=ON ${HEAD_DIMS:+-DFLASHGPT_ATTENTION_HEAD_DIMS="$HEAD_DIMS"} &&
        cmake --build build -j16; } >"$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; grep -E "error|FAILED" "$OUT/build.log" | head -20; exit 1; }
      echo "build ok" ;;&
    test|all)
      ctest --test-dir build -L gpu --output-on-failure >"$OUT/ctest.log" 2>&1 || status=1
      grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest.log" | tail -8
      grep -E "flashgpt_attn_pytest" "$OUT/ctest.log" | tail -2 ;;&
    sanitize|all)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 build/tests/attention/attention_cuda_test \
          --gtest_filter='*ReportsKernels*:*SmallShapes*:*DropoutMask*' >"$OUT/sanitize_$tool.log" 2>&1 || status=1
        echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
      done ;;&
    bench|all)
      python3 bench/attention_gpu/bench_attention.py --out "$OUT" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1 || status=1
      sed -n '/^TFLOP/,$p' "$OUT/bench.log" ;;
  esac
done
exit $status
