#!/usr/bin/env bash
# The TMA forward's device run, from a folder of binaries built elsewhere (the device tool sends
# prebuilt executables; see docs/attention_gpu.md, "Hopper TMA forward"):
#   bench/attention_gpu/hopper_run.sh DIR [test|sanitize|bench|all]...
# DIR holds flashgpt, attention_cuda_test, cudnn_fwd.py and lib/ (libfmt, libgomp). Logs and
# CSVs go to $OUT (or results/attention_gpu), packed into $OUT/hopper_logs.tgz at the end.
#   test:     attention_cuda_test with the TMA forward forced (FLASHGPT_ATTN_FWD_KERNEL=tma), then
#             with the automatic choice (GTEST_FILTER / AUTO_FILTER narrow them; TEST_TIMEOUT bounds each)
#   sanitize: compute-sanitizer memcheck on small shapes through the TMA forward
#   bench:    flashgpt bench attention --device cuda --no-backward with the cp.async wgmma forward
#             (FLASHGPT_ATTN_FWD_KERNEL=wgmma) and with the TMA one, then cuDNN (cudnn_fwd.py)
set -uo pipefail
DIR=${1:?usage: hopper_run.sh DIR [test|sanitize|bench|all]...}
shift
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT/logs"
L=$OUT/logs
export LD_LIBRARY_PATH="$DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
if ldd "$DIR/flashgpt" | grep -q "not found"; then
  extra=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/*/lib/lib*.so*')})))" 2>/dev/null)
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$extra"
  ldd "$DIR/flashgpt" | grep "not found" && echo "missing shared libraries" && exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
status=0
for step in "${@:-all}"; do
  case $step in
    test|all)
      for kernel in tma auto; do
        start=$SECONDS
        FLASHGPT_ATTN_FWD_KERNEL=$([ $kernel = tma ] && echo tma || echo "") ${TEST_TIMEOUT:+timeout $TEST_TIMEOUT} \
          "$DIR/attention_cuda_test" --gtest_filter="$([ $kernel = tma ] && echo "${GTEST_FILTER:-*}" || echo "${AUTO_FILTER:-*}")" \
          >"$L/test_$kernel.log" 2>&1 || status=1
        echo "test ($kernel forward): $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/test_$kernel.log" | tr '\n' ' ') ($((SECONDS - start)) s)"
        grep -E '^\[  FAILED  \]|Failure|rror' "$L/test_$kernel.log" | head -12
        grep -E "forward kernel" "$L/test_$kernel.log" | head -3
      done ;;&
    sanitize|all)
      FLASHGPT_ATTN_FWD_KERNEL=tma compute-sanitizer --tool memcheck --error-exitcode 9 "$DIR/attention_cuda_test" \
        --gtest_filter='*ReportsKernels*:*SmallShapes*:AttentionOp/cuda.len*' >"$L/memcheck_tma.log" 2>&1 || status=1
      echo "memcheck (tma): $(grep -E 'ERROR SUMMARY' "$L/memcheck_tma.log" | tail -1)" ;;&
    bench|all)
      # tma_b: a lab variant's binary (flashgpt_b, built with other FLASHGPT_TMA* macros), if present.
      for kernel in wgmma tma $([ -x "$DIR/flashgpt_b" ] && echo tma_b); do
        bin=$DIR/flashgpt; [ $kernel = tma_b ] && bin=$DIR/flashgpt_b
        FLASHGPT_ATTN_FWD_KERNEL=${kernel%_b} "$bin" bench attention --device cuda --no-backward \
          --min-time ${MIN_TIME:-0.3} --out "$L/bench_$kernel" >"$L/bench_$kernel.log" 2>&1 || status=1
        echo "== $kernel"; grep -E "validate|^ *[0-9]+ +[0-9]+ +[0-9]+|rror" "$L/bench_$kernel.log"
        cp "$L/bench_$kernel/attention_cuda.csv" "$OUT/bench_$kernel.csv" 2>/dev/null
      done
      python3 "$DIR/cudnn_fwd.py" --out "$OUT" --min-time-s ${MIN_TIME:-0.3} >"$L/cudnn.log" 2>&1 || status=1
      echo "== cudnn"; cat "$L/cudnn.log" | tail -30 ;;
  esac
done
tar -czf "$OUT/hopper_logs.tgz" -C "$OUT" logs && rm -rf "$L"
exit $status
