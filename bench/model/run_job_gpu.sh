#!/usr/bin/env bash
# `flashgpt run --device cuda` (the README's main job, the `translate` recipe) on the GPU
# machine in one call, within a per-command limit; the weights never leave the machine:
#   bench/model/run_job_gpu.sh BIN_DIR DATA_DIR
# BIN_DIR holds a CUDA build of flashgpt and lib/ (shared libraries the machine lacks);
# DATA_DIR holds wmt14/, extra/ (.xz, as in ../shared/data) and tokenizers/. A build without
# liblzma unpacks the .xz files itself (python3's lzma, into the job's corpora/ folder).
#
# Environment: OUT (what comes back: the report, its plots and JSON, the training log and
# configuration; default results/run_gpu), WORK (the job's folder, checkpoints included;
# default /tmp/flashgpt_run_gpu), MINUTES (the whole job's budget, default 8: a report
# within a 10-minute command), RUN_ARGS (added to flashgpt run, e.g. "--eval-sentences 500"),
# DEVICE (cuda); a CPU smoke run of the script: DEVICE=cpu MINUTES=3 RUN_ARGS="--recipe
# translate --preset tiny --steps 10 --batch 4 --eval-sentences 3 --max-new-tokens 8".
set -uo pipefail
BIN=${1:?usage: run_job_gpu.sh BIN_DIR DATA_DIR}
DATA=${2:?usage: run_job_gpu.sh BIN_DIR DATA_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-results/run_gpu}
WORK=${WORK:-/tmp/flashgpt_run_gpu}
MINUTES=${MINUTES:-8}
RUN_ARGS=${RUN_ARGS:-}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
rm -rf "$WORK"
export PYTHONUNBUFFERED=1
export FLASHGPT_SOURCE_DIR="$(cd "$HERE/../.." && pwd)"  # scripts/plot_*.py
FG="$BIN/flashgpt"
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$BIN" "$FG" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
"$FG" version | tee "$OUT/version.txt"

start=$SECONDS
# shellcheck disable=SC2086  # RUN_ARGS are words
"$FG" run --device "$DEVICE" --data shared --data-dir "$DATA" --tokenizer-dir "$DATA/tokenizers" --minutes "$MINUTES" \
  --out "$WORK" $RUN_ARGS >"$OUT/run.log" 2>&1
rc=$?
echo "flashgpt run: exit $rc in $((SECONDS - start)) s"
grep -E "^==== |^run: |^data: |time limit|best validation|skipped|^translate |^note|^warning|rror" "$OUT/run.log" | head -60
# Everything but the weights and the corpora.
for f in report.md report.json loss.png kshot.png eval/translate.json train/config.json train/log.jsonl \
  train/best/best.json data/summary.json; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(echo "$f" | tr / _)"
done
[ -f "$WORK/report.md" ] && sed -n '/^## Summary/,/^## Machine/p;/^## Training/,/^## Example/p' "$WORK/report.md"
exit $rc
