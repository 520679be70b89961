#!/usr/bin/env bash
# Everything the GPU machine does for the CUDA inference engine, in one command, from a
# folder holding binaries built elsewhere:
#   bench/generate/run_gpu.sh DIR DATA
# DIR holds flashgpt, generate_inference_cuda_test, eval_translate_cuda_test,
# torch_static_kv.py and lib/ (libfmt, libgomp); DATA is the compressed shared data
# (tokenizers/, wmt14/*.xz). Logs go to $OUT (or results/generate_gpu).
set -uo pipefail
DIR=$(realpath "${1:?usage: run_gpu.sh DIR DATA}")
DATA=$(realpath "${2:?usage: run_gpu.sh DIR DATA}")
OUT=${OUT:-results/generate_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$DIR" "$DIR/flashgpt" || exit 1
export FLASHGPT_TOKENIZER_DIR="$DATA/tokenizers" FLASHGPT_BINARY_DIR="$DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
start=$SECONDS
timeout 120 "$DIR/generate_inference_cuda_test" >"$OUT/cuda_test.log" 2>&1 || status=1
echo "generate_inference_cuda_test: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/cuda_test.log" | tr '\n' ' ') ($((SECONDS - start)) s)"
grep -E '^\[  FAILED  \]|Failure|rror|GPU vs CPU' -A4 "$OUT/cuda_test.log" | head -40
start=$SECONDS
timeout 120 "$DIR/eval_translate_cuda_test" >"$OUT/translate_test.log" 2>&1 || status=1
echo "eval_translate_test: $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/translate_test.log" | tr '\n' ' ') ($((SECONDS - start)) s)"
grep -E '^\[  FAILED  \]|Failure|identical' -A4 "$OUT/translate_test.log" | head -30
for B in 1 64; do
  timeout 60 "$DIR/flashgpt" bench generate --device cuda --preset seed --batch $B --prompt-tokens 128 \
    --new-tokens 256 $([ $B = 1 ] && echo --prefill-tokens 512) 2>&1 | tee "$OUT/bench_b$B.log" | grep -v '^{' || status=1
done
# The integrator's run: all of newstest2014, both directions, K = 0, 1, 5, on a random seed model.
mkdir -p /tmp/wmt14
python3 - "$DATA/wmt14" /tmp/wmt14 <<'PY'
import lzma, sys, pathlib
src, dst = map(pathlib.Path, sys.argv[1:])
for f in src.glob("newstest201[234].fr-en.[ef][nr].xz"):
    (dst / f.name[:-3]).write_bytes(lzma.open(f).read())
PY
start=$SECONDS
FLASHGPT_TRANSLATE_BENCH_DATA=/tmp/wmt14 FLASHGPT_TRANSLATE_BENCH_LOG=$OUT/translate_seed_progress.log timeout ${TRANSLATE_TIMEOUT:-150} "$DIR/eval_translate_cuda_test" \
  --gtest_filter='*Timing*' >"$OUT/translate_seed.log" 2>&1 || status=1
echo "translate timing: $((SECONDS - start)) s"; grep -E "shot|en-fr|fr-en|BLEU|3003|s$|FAILED|rror" "$OUT/translate_seed.log" | head -30
tr '\r' '\n' <"$OUT/translate_seed_progress.log" | grep -v '^$' | tail -8
timeout ${TORCH_TIMEOUT:-200} python3 "$DIR/torch_static_kv.py" --flashgpt "$DIR/flashgpt" --ours "$OUT" \
  >"$OUT/torch.log" 2>&1 || status=1
grep -vE '^\{' "$OUT/torch.log" | tail -25
exit $status
