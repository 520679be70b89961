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
  ours=$("$build"/flashgpt bench tokenizer -e "$encoding" --vocab-dir "$data/tokenizers" --threads "$threads" \
    --repeat 3 "$text" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['batch_mb_s'])")
  theirs=$(python3 - "$data" "$text" "$threads" "$encoding" <<'PY'
import json, sys, time, tiktoken
from tiktoken.load import load_tiktoken_bpe
data, path, threads, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
meta = json.load(open(f"{data}/tokenizers/{name}.meta.json"))
enc = tiktoken.Encoding(name, pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                        mergeable_ranks=load_tiktoken_bpe(f"{data}/tokenizers/{name}.tiktoken"))
text = open(path, encoding="utf-8").read()
lines = text.split("\n")
docs = ["\n".join(lines[i:i + 64]) + "\n" for i in range(0, len(lines), 64)]
best = 1e9
for _ in range(3):
    t0 = time.perf_counter(); enc.encode_ordinary_batch(docs, num_threads=threads); best = min(best, time.perf_counter() - t0)
print(round(len(text.encode()) / best / 1e6, 1))
PY
)
  echo "$threads $ours $theirs"
done
