#!/usr/bin/env bash
# The training step's opt-in paths against the defaults, in one GPU call (issue 16;
# docs/model_gpu.md). From the repository root on the GPU machine, with $OUT set and a folder
# of stripped binaries (flashgpt, model_cuda_ops_test, model_cuda_test, lib/) as BINS_DIR:
#   SWITCHES="FLASHGPT_A=1 FLASHGPT_B=1" BINS_DIR=/tmp/pending_bins bash bench/model/ab_switches.sh
# Steps in order of priority, each capped, the rest skipped when DEADLINE (seconds) is near:
# model_cuda_ops_test (OPS_FILTER); model_cuda_test with the defaults and with every switch on
# (MODEL_TESTS: "default all", the default, one of them, or none); the seed step (V = 100277, batch 64 x 512)
# with the defaults, each switch alone (where SWITCHES names more than one), all on and each
# setting of EXTRA alone;
# torch.compile beside all on (TORCH_BESIDE, TORCH_VOCABS below; TORCH_VOCABS=none skips it); the per-op profile of all
# on and of the defaults; the defaults and all on again (the spread); memcheck of the ops tests (MEMCHECK_FILTER) with
# every switch on (and racecheck, synccheck with RACECHECK_FILTER);
# V = 50257 with the defaults and all on. Logs and summary.txt in $OUT/ab.
# With one switch the seed step runs default, on, (torch), profiled on, default, on, profiled
# default: two timed runs of each, interleaved, and one profile of each.
set -uo pipefail
R=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
B=${BINS_DIR:?set BINS_DIR to the folder of binaries}
DEADLINE=${DEADLINE:-400}
L=$OUT/ab
S=$L/summary.txt
mkdir -p "$L"
read -r -a sw <<<"${SWITCHES:?set SWITCHES to NAME=VALUE pairs}"
all=(env "${sw[@]}")
start=$SECONDS
status=0
step() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local left=$((DEADLINE - (SECONDS - start)))
  [ "$left" -lt "$secs" ] && secs=$left
  [ "$secs" -lt 5 ] && { echo "== $name: skipped, no time left" | tee -a "$S"; return; }
  local t0=$SECONDS
  timeout "$secs" "$@" >"$L/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  { echo "== $name: rc $rc, $((SECONDS - t0)) s: $(grep -E '^\[  (PASSED|FAILED)  \]|ERROR SUMMARY' "$L/$name.log" | tail -2 | tr '\n' ' ')"
    grep -oE '"step_ms":[0-9.]+|"tokens_per_s":[0-9.]+|"peak_gib":[0-9.]+' "$L/$name.log" | tr '\n' ' '; echo
    grep -E '^\[  FAILED  \]|Failure|rror:' "$L/$name.log" | head -8; } | tee -a "$S"
}
seed=(bench train --vocab 100277 --batch 64 --context 512 --warmup 3 --steps 10)
step ops_test 150 "$B/model_cuda_ops_test" --gtest_filter="${OPS_FILTER:-*}"
for t in ${MODEL_TESTS:-default all}; do
  case $t in
    default) step model_test_default 30 "$B/model_cuda_test" ;;
    all) step model_test_all 30 "${all[@]}" "$B/model_cuda_test" ;;
  esac
done
step bench_default_1 25 "$B/flashgpt" "${seed[@]}"
if [ ${#sw[@]} -gt 1 ]; then  # with one switch, the same run as all on
  for s in "${sw[@]}"; do step "bench_only_${s%%=*}" 25 env "$s" "$B/flashgpt" "${seed[@]}"; done
fi
step bench_all_1 25 "${all[@]}" "$B/flashgpt" "${seed[@]}"
# EXTRA ("NAME=VALUE ..."): more single settings, each alone against the defaults (another
# value of a switch above, say).
for s in ${EXTRA:-}; do step "bench_extra_${s//=/_}" 25 env "$s" "$B/flashgpt" "${seed[@]}"; done
# TORCH_BESIDE=default puts torch.compile beside the defaults instead of all on; TORCH_VOCABS
# (default 100277) the vocabularies it runs.
beside=("${all[@]}")
[ "${TORCH_BESIDE:-all}" = default ] && beside=(env)
read -r -a vocabs <<<"${TORCH_VOCABS:-100277}"
if [ "${vocabs[*]}" != none ]; then
  step torch_compile $((30 + 80 * ${#vocabs[@]})) "${beside[@]}" python3 "$R/bench/model/torch_gpt.py" --flashgpt "$B/flashgpt" \
    --vocab "${vocabs[@]}" --skip-eager --out "$L/torch_compile.json"
  sed -n '/^seed preset/,$p' "$L/torch_compile.log" | tee -a "$S"
fi
step profile_all 30 "${all[@]}" FLASHGPT_MODEL_PROFILE=1 "$B/flashgpt" "${seed[@]}"
grep -E "^profile:" "$L/profile_all.log" | sed 's/^/all: /' >>"$S"
step bench_default_2 25 "$B/flashgpt" "${seed[@]}"
step bench_all_2 25 "${all[@]}" "$B/flashgpt" "${seed[@]}"
step profile_default 30 env FLASHGPT_MODEL_PROFILE=1 "$B/flashgpt" "${seed[@]}"
grep -E "^profile:" "$L/profile_default.log" | sed 's/^/default: /' >>"$S"
if command -v compute-sanitizer >/dev/null; then
  if [ -n "${RACECHECK_FILTER:-}" ]; then  # shared-memory hand-offs of new kernels
    for tool in racecheck synccheck; do
      step "${tool}_ops_all" 60 "${all[@]}" compute-sanitizer --tool $tool --error-exitcode 9 "$B/model_cuda_ops_test" \
        --gtest_filter="$RACECHECK_FILTER"
    done
  fi
  step memcheck_ops_all 100 "${all[@]}" compute-sanitizer --tool memcheck --error-exitcode 9 "$B/model_cuda_ops_test" \
    --gtest_filter="${MEMCHECK_FILTER:-*}"
fi
step bench_50257_default 25 "$B/flashgpt" bench train --vocab 50257 --batch 64 --context 512 --warmup 3 --steps 10
step bench_50257_all 25 "${all[@]}" "$B/flashgpt" bench train --vocab 50257 --batch 64 --context 512 --warmup 3 --steps 10
echo "== ab total $((SECONDS - start)) s, status $status" | tee -a "$S"
exit $status
