#!/usr/bin/env bash
# Batch encoding's scaling with threads, flashgpt beside tiktoken's encode_ordinary_batch, on
# the WMT14 text cut into documents of 64 lines (as bench/tokenizer_bench.py does).
#   bench/tokenizer/batch_scaling.sh BUILD_DIR [DATA_DIR] [ENCODING]
set -euo pipefail
build=$1
data=${2:-.data}
encoding=${3:-cl100k_base}
text=/tmp/batch_scaling.txt
xzcat "$data"/wmt14/*.en.xz "$data"/wmt14/*.fr.xz >"$text"
echo "threads flashgpt_batch_mb_s tiktoken_batch_mb_s"
for threads in 1 2 4 8 $(nproc); do
  ours=$("$build"/flashgpt bench tokenizer -e "$encoding" --tokenizer-dir "$data/tokenizers" --threads "$threads" \
    --repeat 3 "$text" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['batch_mb_s'])")
  theirs=$(python3 "$(dirname "$0")/tiktoken_time.py" "$data/tokenizers" "$text" --encoding "$encoding" \
    --batch-threads "$threads")
  echo "$threads $ours $theirs"
done
