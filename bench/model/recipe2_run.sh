#!/usr/bin/env bash
# Recipe 2, v2 (docs/experiments.md) on the GPU machine in one call of at most 600 s; the
# weights never leave the machine:
#   bench/model/recipe2_run.sh BIN_DIR DATA_DIR
# BIN_DIR holds a CUDA build of flashgpt and lib/ (shared libraries the machine lacks);
# DATA_DIR holds wmt14/, extra/ (.xz, as in ../shared/data) and tokenizers/.
#
# 1. unpack the corpora with python3's lzma (the machine has no liblzma for our reader);
# 2. `data prepare --recipe translate` (src/cli/recipes.h): multi-pair documents in eval
#    translate's K-shot prompt format, in-domain news repeated, newstest2013 in the prompt
#    format as the validation split;
# 3. `train --recipe translate`: the seed preset, 4,700 steps, cosine, --keep-best (the
#    lowest newstest2013 loss is RUN/best), with a wall-clock budget (--time-limit);
# 4. `eval translate --device cuda` on all 3003 newstest2014 sentences, one call per
#    (direction, K) in order of importance, each in its own run directory (links to
#    RUN/best) so a setting cut by the deadline costs only itself; without --device cuda
#    in the binary: `export --format hf` + translate_hf.py on the first LIMIT sentences.
#
# Budget (s, of DEADLINE = 560; estimates from the last H100 runs): unpack ~3, prepare ~3,
# model start ~5, training TRAIN_SECONDS = 390 (4,700 planned steps of 64 x 512 at 80-85 ms
# a step: the time limit only trims the cosine tail if the step is slower), final
# validation, checkpoint and best/ ~6, evaluation ~75 (the GPU decoder took 42 s for all
# six settings of a worst-case random model, plus ~5 s of start per call), leaving ~75 s
# of slack; MARGIN (5) is kept back from the last call's timeout.
#
# Environment: OUT (results, default results/recipe2), WORK (/tmp/recipe2), DEADLINE (560),
# TRAIN_SECONDS (390), RECIPE (translate; none: only the flags below), STEPS (the recipe's:
# 4700), LIMIT (sentences for the fallback: 500; eval translate gets all 3003 unless
# EVAL_LIMIT is set), PREPARE_ARGS / TRAIN_ARGS (flags after --recipe: each overrides the
# recipe's value, e.g. TRAIN_ARGS="--lr 3e-4"), EVAL_ARGS (added to each eval translate call,
# e.g. "--batch 256"); for a CPU smoke run of the pipeline: DEVICE=cpu PRESET=tiny
# TRAIN_SECONDS=120 EVAL_LIMIT=3 TRAIN_ARGS="--steps 30 --batch 8 --eval-every 10
# --eval-batches 5" (about 2 min on 2 cores).
set -uo pipefail
BIN=${1:?usage: recipe2_run.sh BIN_DIR DATA_DIR}
DATA=${2:?usage: recipe2_run.sh BIN_DIR DATA_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-results/recipe2}
WORK=${WORK:-/tmp/recipe2}
DEADLINE=${DEADLINE:-560}
MARGIN=${MARGIN:-5}
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
STEPS=${STEPS:-}
RECIPE=${RECIPE:-translate}
LIMIT=${LIMIT:-500}
EVAL_LIMIT=${EVAL_LIMIT:-0}
EVAL_ARGS=${EVAL_ARGS:-}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-seed}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export FLASHGPT_SOURCE_DIR="$ROOT"  # scripts/plot_*.py
FG="$BIN/flashgpt"
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/timeline.log"; }
left() { echo $((DEADLINE - MARGIN - (SECONDS - start))); }
source "$(dirname "${BASH_SOURCE[0]}")/../gpu_libs.sh"
gpu_libs "$BIN" "$FG" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

# The recipe's values live in src/cli/recipes.h (docs/experiments.md, "Recipe 2, v2" says
# why each choice); PREPARE_ARGS and TRAIN_ARGS override single values.
PREPARE_ARGS=${PREPARE_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
recipe_args=()
[ "$RECIPE" != none ] && recipe_args=(--recipe "$RECIPE")
steps_args=()
[ -n "$STEPS" ] && steps_args=(--steps "$STEPS")

stamp "unpack"
python3 - "$DATA" "$WORK/data" <<'EOF' || exit 1
import concurrent.futures, lzma, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
jobs = []
for sub in ("wmt14", "extra"):
    os.makedirs(os.path.join(dst, sub), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(src, sub))):
        # Every corpus file (the recipe picks its monolingual ones by name); not the document maps.
        if not name.endswith(".xz") or name.endswith(".docs.tsv.xz"):
            continue
        jobs.append((os.path.join(src, sub, name), os.path.join(dst, sub, name[:-3])))

def unpack(job):
    with lzma.open(job[0]) as fin, open(job[1], "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)

with concurrent.futures.ProcessPoolExecutor() as pool:  # the two Europarl sides dominate: ~2x
    list(pool.map(unpack, jobs))
EOF

stamp "prepare"
rm -rf "$WORK/ds"
# Every train.* pair of wmt14/ and extra/ (data prepare's default inputs under --data-dir).
# shellcheck disable=SC2086  # the overrides are words
"$FG" data prepare "${recipe_args[@]}" --data-dir "$WORK/data" --tokenizer-dir "$DATA/tokenizers" \
  --out "$WORK/ds" $PREPARE_ARGS --quiet >"$OUT/prepare.log" 2>&1
[ -f "$WORK/ds/summary.json" ] || { tail -20 "$OUT/prepare.log"; echo "prepare failed"; exit 1; }
tail -2 "$OUT/prepare.log"
cp "$WORK/ds/summary.json" "$OUT/dataset_summary.json"

stamp "train ($PRESET preset on $DEVICE, recipe $RECIPE, time limit $TRAIN_SECONDS s)"
rm -rf "$WORK/run"
# shellcheck disable=SC2086
"$FG" train "${recipe_args[@]}" --preset "$PRESET" --device "$DEVICE" --data "$WORK/ds" --out "$WORK/run" \
  --time-limit "$TRAIN_SECONDS" --log-every 100 --no-plot "${steps_args[@]}" $TRAIN_ARGS >"$OUT/train.log" 2>&1
echo "train exit $?"
grep -vE "^\s*$" "$OUT/train.log" | tail -4
cp "$WORK/run/config.json" "$OUT/" 2>/dev/null
cp "$WORK/run/best/best.json" "$OUT/" 2>/dev/null
python3 - "$WORK/run/log.jsonl" "$OUT/log_every10.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as out:
    for r in rows:
        if r.get("type") != "step" or r["step"] % 10 == 0:
            out.write(json.dumps(r) + "\n")
        if r.get("type") in ("val", "epoch", "best", "end"):
            print(json.dumps(r))
EOF
python3 "$ROOT/scripts/plot_loss.py" "$OUT/log_every10.jsonl" "$OUT/loss.png" >/dev/null 2>&1 || echo "no loss plot"
RUN="$WORK/run/best"
[ -f "$RUN/checkpoint.safetensors" ] || RUN="$WORK/run"
[ -f "$RUN/checkpoint.safetensors" ] || { echo "no checkpoint"; exit 1; }

device_args=()
"$FG" eval translate --help 2>/dev/null | grep -q -- "--device" && device_args=(--device "$DEVICE")
if [ ${#device_args[@]} -gt 0 ] || [ "$DEVICE" = cpu ]; then
  stamp "eval translate ${device_args[*]} (limit $EVAL_LIMIT, 0 = all sentences), $(left) s left"
  limit_args=()
  [ "$EVAL_LIMIT" != 0 ] && limit_args=(--limit "$EVAL_LIMIT")
  for setting in en-fr:5 en-fr:0 fr-en:0 fr-en:5 en-fr:1 fr-en:1; do
    dir=${setting%%:*} k=${setting##*:}
    budget=$(left)
    if [ "$budget" -lt 10 ]; then
      echo "skipped $dir $k-shot: $budget s left" | tee -a "$OUT/timeline.log"
      continue
    fi
    # A run directory of links per setting: its eval/ holds this setting's results only.
    sub="$WORK/eval_$dir.$k"
    rm -rf "$sub" && mkdir -p "$sub"
    ln -s "$(readlink -f "$RUN/checkpoint.safetensors")" "$sub/checkpoint.safetensors"
    ln -s "$(readlink -f "$RUN/config.json")" "$sub/config.json"
    t0=$SECONDS
    timeout -s TERM "$budget" "$FG" eval translate --run "$sub" "${device_args[@]}" --data-dir "$WORK/data/wmt14" \
      --tokenizer-dir "$DATA/tokenizers" --direction "$dir" --shots "$k" --no-plot --quiet "${limit_args[@]}" $EVAL_ARGS \
      >"$OUT/eval_$dir.$k.log" 2>&1
    rc=$?
    stamp "eval $dir $k-shot: exit $rc in $((SECONDS - t0)) s"
    if [ -f "$sub/eval/translate.json" ]; then
      cp "$sub/eval/translate.json" "$OUT/translate_$dir.$k.json"
      mkdir -p "$OUT/hypotheses" && cp "$sub"/eval/translate/*.txt "$OUT/hypotheses/" 2>/dev/null
    else
      tail -5 "$OUT/eval_$dir.$k.log"
    fi
  done
  # One report of every setting that finished, and the score-against-K plot.
  python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
merged = None
for path in sorted(glob.glob(os.path.join(out, "translate_*.json"))):
    j = json.load(open(path))
    if merged is None:
        merged = dict(j, results=[], examples=[])
    merged["results"] += j["results"]
    merged["examples"] += j.get("examples", [])
if merged is None:
    sys.exit("no evaluation finished")
merged["results"].sort(key=lambda r: (r["direction"], r["shots"]))
json.dump(merged, open(os.path.join(out, "translate.json"), "w"), indent=2, ensure_ascii=False)
print(f"newstest2014, {merged['test_set']['sentences']} of {merged['test_set']['of']} sentences, checkpoint step {merged['step']}")
print(f"{'dir':6} {'K':>2} {'BLEU':>6} {'chrF':>6} {'K given':>8} {'seconds':>8}")
for r in merged["results"]:
    print(f"{r['direction']:6} {r['shots']:>2} {r['bleu']:>6.2f} {r['chrf']:>6.2f} {r['shots_mean']:>8.2f} {r['seconds']:>8.1f}")
for e in merged["examples"]:
    if e["shots"] in (0, 5):
        print(f"[{e['direction']} {e['shots']}-shot] {e['source']} -> {e['output']}")
EOF
  python3 "$ROOT/scripts/plot_translate.py" "$OUT/translate.json" "$OUT/translate.png" >/dev/null 2>&1 ||
    echo "no translate plot"
else
  stamp "fallback: export + translate_hf.py (first $LIMIT sentences), $(left) s left"
  "$FG" export --format hf "$RUN" --out "$WORK/hf" >"$OUT/export.log" 2>&1 || { cat "$OUT/export.log"; exit 1; }
  timeout -s TERM "$(left)" python3 "$HERE/translate_hf.py" --hf "$WORK/hf" --wmt14 "$WORK/data/wmt14" \
    --flashgpt "$FG" --tokenizer-dir "$DATA/tokenizers" --out "$WORK/translate" --limit "$LIMIT" --shots 0,1,5 \
    >"$OUT/translate.log" 2>&1
  echo "translate_hf exit $?"
  grep -E '^\{' "$OUT/translate.log" | tail -6
  cp "$WORK/translate/translate.json" "$OUT/" 2>/dev/null
fi
stamp "done"
