#!/usr/bin/env bash
# The seed's experiment on the GPU machine, in one call (its weights never leave the
# machine): unpack the corpora, prepare the dataset, train the seed preset on the GPU,
# export it, translate newstest2014 zero/one/few-shot and score it.
#   bench/model/seed_run.sh BIN_DIR DATA_DIR
# BIN_DIR holds a CUDA build of flashgpt and lib/ (shared libraries the machine lacks);
# DATA_DIR holds wmt14/ and extra/ (.xz, as in ../shared/data) and tokenizers/.
# Environment: RECIPE=random (the seed's: one random side per pair) or bilingual
# (BILINGUAL_RATE of the pairs as bilingual documents); EPOCHS (5); TRAIN_SECONDS (the
# wall-clock cap, after which SIGINT makes the trainer checkpoint and stop); LIMIT (test
# sentences scored per setting, 0 = all 3003); SHOTS (0,1,5). Results go to $OUT.
set -uo pipefail
BIN=${1:?usage: seed_run.sh BIN_DIR DATA_DIR}
DATA=${2:?usage: seed_run.sh BIN_DIR DATA_DIR}
OUT=${OUT:-results/seed_run}
RECIPE=${RECIPE:-random}
EPOCHS=${EPOCHS:-5}
TRAIN_SECONDS=${TRAIN_SECONDS:-360}
LIMIT=${LIMIT:-500}
SHOTS=${SHOTS:-0,1,5}
BILINGUAL_RATE=${BILINGUAL_RATE:-0.5}
WORK=${WORK:-/tmp/seed_run}
mkdir -p "$OUT" "$WORK"
export LD_LIBRARY_PATH="$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PYTHONUNBUFFERED=1
FG="$BIN/flashgpt"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The machine has no liblzma for our reader: python3's lzma module unpacks the corpora.
stamp "unpack"
python3 - "$DATA" "$WORK/data" <<'EOF' || exit 1
import lzma, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for sub in ("wmt14", "extra"):
    os.makedirs(os.path.join(dst, sub), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(src, sub))):
        if name.endswith(".xz") and not name.endswith(".docs.tsv.xz"):
            with lzma.open(os.path.join(src, sub, name)) as fin, open(os.path.join(dst, sub, name[:-3]), "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
EOF

stamp "prepare ($RECIPE)"
rate=0
[ "$RECIPE" = bilingual ] && rate=$BILINGUAL_RATE
"$FG" data prepare --data-dir "$WORK/data" --tokenizer-dir "$DATA/tokenizers" --out "$WORK/ds" \
  --bilingual-rate "$rate" --quiet 2>&1 | tee "$OUT/prepare.log" | tail -3
[ -f "$WORK/ds/summary.json" ] || { echo "prepare failed"; exit 1; }
cp "$WORK/ds/summary.json" "$OUT/dataset_summary.json"

stamp "train (seed preset, $EPOCHS epochs, cap $TRAIN_SECONDS s)"
rm -rf "$WORK/run"
timeout -s INT "$TRAIN_SECONDS" "$FG" train --preset seed --device cuda --data "$WORK/ds" --out "$WORK/run" \
  --epochs "$EPOCHS" --batch 64 --eval-batches 40 --log-every 50 --no-plot ${TRAIN_ARGS:-} >"$OUT/train.log" 2>&1
echo "train exit $?"
grep -vE "^\s*$" "$OUT/train.log" | tail -6
cp "$WORK/run/log.jsonl" "$WORK/run/config.json" "$OUT/" 2>/dev/null
python3 scripts/plot_loss.py "$OUT/log.jsonl" "$OUT/loss.png" || echo "no loss plot"
python3 - "$OUT/log.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r.get("type") in ("epoch", "val", "end"):
        print(json.dumps(r))
EOF

stamp "export + translate"
"$FG" export --format hf "$WORK/run" --out "$WORK/hf" >"$OUT/export.log" 2>&1 || { cat "$OUT/export.log"; exit 1; }
python3 "$(dirname "$0")/translate_hf.py" --hf "$WORK/hf" --wmt14 "$WORK/data/wmt14" --flashgpt "$FG" \
  --tokenizer-dir "$DATA/tokenizers" --out "$WORK/translate" --limit "$LIMIT" --shots "$SHOTS" 2>&1 | tee "$OUT/translate.log" | tail -40
cp "$WORK/translate/translate.json" "$OUT/" 2>/dev/null
stamp "done"
