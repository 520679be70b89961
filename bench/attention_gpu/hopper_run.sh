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
#             (FLASHGPT_ATTN_FWD_KERNEL=wgmma) and with the TMA one, then each d64 TMA tile of
#             TMA_TILES (FLASHGPT_ATTN_TMA_TILE=k, d64 rows only, bench_tma_t<k>.csv), then cuDNN;
#             DROPOUT=p times every row of the wgmma and TMA runs also with dropout p (--dropout)
#   tiles:    the d64 tiles that were fastest in at least one bench row (bench_tma_t*.csv; at
#             most MAX_TILES of them, most rows won first), each through the whole
#             attention_cuda_test with the TMA forward forced (test_tile<k>.log), then memcheck
#             of the small shapes through each; DEADLINE (seconds since the start) skips a run
#             that would start later than it
set -uo pipefail
DIR=${1:?usage: hopper_run.sh DIR [test|sanitize|bench|all]...}
shift
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT/logs"
L=$OUT/logs
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
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
      for tile in ${TMA_TILES:-}; do
        FLASHGPT_ATTN_FWD_KERNEL=tma FLASHGPT_ATTN_TMA_TILE=$tile "$DIR/flashgpt" bench attention --device cuda \
          --no-backward --head-dim 64 --min-time ${MIN_TIME:-0.3} --out "$L/bench_t$tile" >"$L/bench_t$tile.log" 2>&1 || status=1
        echo "== tma tile $tile"; grep -E "^ *[0-9]+ +[0-9]+ +[0-9]+|rror" "$L/bench_t$tile.log" | grep -v " 0.1 |"
        cp "$L/bench_t$tile/attention_cuda.csv" "$OUT/bench_tma_t$tile.csv" 2>/dev/null
      done
      for kernel in wgmma tma $([ -x "$DIR/flashgpt_b" ] && echo tma_b); do
        bin=$DIR/flashgpt; [ $kernel = tma_b ] && bin=$DIR/flashgpt_b
        FLASHGPT_ATTN_FWD_KERNEL=${kernel%_b} "$bin" bench attention --device cuda --no-backward \
          --min-time ${MIN_TIME:-0.3} ${DROPOUT:+--dropout $DROPOUT} --out "$L/bench_$kernel" \
          >"$L/bench_$kernel.log" 2>&1 || status=1
        echo "== $kernel"; grep -E "validate|^ *[0-9]+ +[0-9]+ +[0-9]+|rror" "$L/bench_$kernel.log"
        cp "$L/bench_$kernel/attention_cuda.csv" "$OUT/bench_$kernel.csv" 2>/dev/null
      done
      python3 "$DIR/cudnn_fwd.py" --out "$OUT" --min-time-s ${MIN_TIME:-0.3} >"$L/cudnn.log" 2>&1 || status=1
      echo "== cudnn"; cat "$L/cudnn.log" | tail -30 ;;
    tiles)
      winners=$(python3 - "$OUT" "${MAX_TILES:-3}" <<'PY'
import collections, csv, glob, os, re, sys
best = {}
for path in glob.glob(os.path.join(sys.argv[1], "bench_tma_t*.csv")):
    tile = int(re.search(r"_t(\d+)\.csv$", path).group(1))
    for r in csv.DictReader(open(path)):
        if float(r["dropout"]) != 0.0: continue
        k = (r["batch"], r["heads"], r["seqlen"], r["causal"])
        if k not in best or float(r["fwd_tflops"]) > best[k][0]: best[k] = (float(r["fwd_tflops"]), tile)
wins = collections.Counter(t for _, t in best.values())
print(" ".join(str(t) for t, _ in wins.most_common(int(sys.argv[2]))))
PY
)
      echo "tiles fastest in at least one d64 row (most rows first): $winners"
      for tile in $winners; do
        if [ $SECONDS -gt ${DEADLINE:-100000} ]; then echo "tile $tile: not tested (deadline)"; continue; fi
        start=$SECONDS
        FLASHGPT_ATTN_FWD_KERNEL=tma FLASHGPT_ATTN_TMA_TILE=$tile ${TEST_TIMEOUT:+timeout $TEST_TIMEOUT} \
          "$DIR/attention_cuda_test" >"$L/test_tile$tile.log" 2>&1 || status=1
        echo "test (tma tile $tile): $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/test_tile$tile.log" | tr '\n' ' ') ($((SECONDS - start)) s)"
        grep -E '^\[  FAILED  \]|Failure|rror' "$L/test_tile$tile.log" | head -12
      done
      for tile in $winners; do
        if [ $SECONDS -gt ${DEADLINE:-100000} ]; then echo "tile $tile: no memcheck (deadline)"; continue; fi
        FLASHGPT_ATTN_FWD_KERNEL=tma FLASHGPT_ATTN_TMA_TILE=$tile timeout 60 compute-sanitizer --tool memcheck \
          --error-exitcode 9 "$DIR/attention_cuda_test" --gtest_filter='*ReportsKernels*:*SmallShapes*:AttentionOp/cuda.len*' \
          >"$L/memcheck_tile$tile.log" 2>&1 || status=1
        echo "memcheck (tma tile $tile): $(grep -E 'ERROR SUMMARY' "$L/memcheck_tile$tile.log" | tail -1)"
      done ;;
  esac
done
tar -czf "$OUT/hopper_logs.tgz" -C "$OUT" logs && rm -rf "$L"
exit $status
