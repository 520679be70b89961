#!/usr/bin/env bash
# cls3 (issue 16): the one-pass classifier softmax (FLASHGPT_CLASSIFIER_CLUSTER), the fused
# residual + LayerNorm forward (FLASHGPT_FUSED_RESIDUAL_LN) and the register LayerNorm backward
# (FLASHGPT_LN_BACKWARD_REGISTERS), old (all 0) and new (all 1) in the same call.
# Copy it beside bins.tar.xz (stripped flashgpt, model_cuda_ops_test, model_cuda_test and lib/
# with libfmt.so.9, libgomp.so.1) and bench/model/torch_gpt.py, e.g. into .gpu/cls3/ as run.sh;
# then on the GPU machine, with $OUT set: bash .gpu/cls3/run.sh  (<= 300 s; docs/model_gpu.md, v7)
# or, from the repository root, with the package another script staged: BINS=PATH/bins.tar.xz
# bash bench/model/ab_v7.sh (bench/pending/run.sh's model part).
# Steps in order of priority (each capped, the rest skipped when DEADLINE is near): tests
# (the whole-model test with the old and the new paths), seed V=100277 old then new,
# torch.compile at V=100277 (beside the new paths), the new paths' per-op profile, V=50257
# new, old/new again, two logits chunks, memcheck of the new kernels' tests, each switch
# alone, V=50257 old, the old profile.
# Logs: $OUT/cls3_logs.tgz and $OUT/summary.txt.
set -uo pipefail
DEADLINE=${DEADLINE:-270}  # the steps; unpacking and packing the logs take about 10 s more
D=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
B=/tmp/cls3_bins
L="$OUT/logs"
mkdir -p "$L" "$B"
rm -rf "$B"; mkdir -p "$B"; python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "${BINS:-$D/bins.tar.xz}" "$B" || exit 1
export LD_LIBRARY_PATH="$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
extra=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/lib/lib*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$extra"
ldd "$B/flashgpt" | grep "not found" && { echo "missing shared libraries"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
start=$SECONDS
status=0
step() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local left=$((DEADLINE - (SECONDS - start)))
  [ "$left" -lt "$secs" ] && secs=$left
  [ "$secs" -lt 8 ] && { echo "== $name: skipped, no time left" | tee -a "$L/summary.txt"; return; }
  local t0=$SECONDS
  timeout "$secs" "$@" >"$L/$name.log" 2>&1; local rc=$?
  [ $rc -ne 0 ] && status=1
  { echo "== $name: rc $rc, $((SECONDS - t0)) s: $(grep -E '^\[  (PASSED|FAILED)  \]' "$L/$name.log" | tail -2 | tr '\n' ' ')"
    grep -oE '"step_ms":[0-9.]+|"tokens_per_s":[0-9.]+|"peak_gib":[0-9.]+' "$L/$name.log" | tr '\n' ' '; echo
    grep -E '^\[  FAILED  \]|Failure|rror' "$L/$name.log" | head -8; } | tee -a "$L/summary.txt"
}
old=(env FLASHGPT_CLASSIFIER_CLUSTER=0 FLASHGPT_FUSED_RESIDUAL_LN=0 FLASHGPT_LN_BACKWARD_REGISTERS=0)
new=(env FLASHGPT_CLASSIFIER_CLUSTER=1 FLASHGPT_FUSED_RESIDUAL_LN=1 FLASHGPT_LN_BACKWARD_REGISTERS=1)
seed=(bench train --vocab 100277 --batch 64 --context 512 --warmup 3 --steps 10)
step ops_test 70 "$B/model_cuda_ops_test"
step model_test_old 30 "${old[@]}" "$B/model_cuda_test"
step model_test_new 30 "${new[@]}" "$B/model_cuda_test"
step bench_old_1 25 "${old[@]}" "$B/flashgpt" "${seed[@]}"
step bench_new_1 25 "${new[@]}" "$B/flashgpt" "${seed[@]}"
# torch.compile beside the new paths, or beside the old ones where the new ones failed.
tc=("${new[@]}")
grep -q '"tokens_per_s"' "$L/bench_new_1.log" || { tc=("${old[@]}"); echo "torch_compile: beside the OLD paths" | tee -a "$L/summary.txt"; }
step torch_compile 110 "${tc[@]}" python3 "$D/torch_gpt.py" --flashgpt "$B/flashgpt" --vocab 100277 --skip-eager \
  --out "$L/torch_compile.json"
sed -n '/^seed preset/,$p' "$L/torch_compile.log" | tee -a "$L/summary.txt"
step profile_new 30 "${new[@]}" FLASHGPT_MODEL_PROFILE=1 "$B/flashgpt" bench train --vocab 100277 --batch 64 \
  --context 512 --warmup 2 --steps 4
grep -E "^profile:" "$L/profile_new.log" >>"$L/summary.txt"
step bench_50257_new 25 "${new[@]}" "$B/flashgpt" bench train --vocab 50257 --batch 64 --context 512 --warmup 3 --steps 10
step bench_old_2 25 "${old[@]}" "$B/flashgpt" "${seed[@]}"
step bench_new_2 25 "${new[@]}" "$B/flashgpt" "${seed[@]}"
# Two logits chunks of 16384 rows instead of four of 8192 (peak +1.1 GiB, still under torch.compile's).
step bench_new_chunk3136 25 "${new[@]}" FLASHGPT_LOGITS_CHUNK_MB=3136 "$B/flashgpt" "${seed[@]}"
if command -v compute-sanitizer >/dev/null; then  # the new kernels under memcheck, if time is left
  step memcheck_new_ops 40 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/model_cuda_ops_test" \
    --gtest_filter='*Classifier*:*ResidualLayerNorm*:*RegisterBackward*:*AdamW*:*ColumnSum*'
  grep -E "ERROR SUMMARY" "$L/memcheck_new_ops.log" | tail -1 >>"$L/summary.txt"
fi
step bench_cls_only 25 "${old[@]}" FLASHGPT_CLASSIFIER_CLUSTER=1 "$B/flashgpt" "${seed[@]}"
step bench_lnfwd_only 25 "${old[@]}" FLASHGPT_FUSED_RESIDUAL_LN=1 "$B/flashgpt" "${seed[@]}"
step bench_lnbwd_only 25 "${old[@]}" FLASHGPT_LN_BACKWARD_REGISTERS=1 "$B/flashgpt" "${seed[@]}"
step bench_50257_old 25 "${old[@]}" "$B/flashgpt" bench train --vocab 50257 --batch 64 --context 512 --warmup 3 --steps 10
step profile_old 30 "${old[@]}" FLASHGPT_MODEL_PROFILE=1 "$B/flashgpt" bench train --vocab 100277 --batch 64 \
  --context 512 --warmup 2 --steps 4
grep -E "^profile:" "$L/profile_old.log" >>"$L/summary.txt"
echo "total $((SECONDS - start)) s, status $status" | tee -a "$L/summary.txt"
cp "$L/summary.txt" "$OUT/summary.txt"
(cd "$OUT" && tar czf cls3_logs.tgz logs && rm -rf logs)
exit $status
