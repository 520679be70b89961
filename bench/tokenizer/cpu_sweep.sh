#!/usr/bin/env bash
# Is a machine's single-thread speed the same on every core? Runs one build's single-thread
# encode pinned to each CPU in turn (twice over), tiktoken's encode_ordinary pinned to a few,
# and the same build on a text of few distinct pieces (the first 100 kB of WMT14, 100 times),
# whose lookups stay in the CPU caches: the gap to the real text is what misses cost.
#   bench/tokenizer/cpu_sweep.sh BUILD_DIR [DATA_DIR]
set -euo pipefail
build=$1
data=${2:-.data}
text=/tmp/cpu_sweep.txt
xzcat "$data"/wmt14/*.en.xz "$data"/wmt14/*.fr.xz >"$text"
head -c 100000 "$text" >/tmp/cpu_sweep_100k.txt
for _ in $(seq 100); do cat /tmp/cpu_sweep_100k.txt; done >/tmp/cpu_sweep_rep.txt
bench() {
  "$build"/flashgpt bench tokenizer -e cl100k_base --vocab-dir "$data/tokenizers" --threads 1 --repeat 2 --warm \
    --single-only "$1" 2>/dev/null | python3 -c "import json,sys; j=json.load(sys.stdin); print(j['single_cpu_mb_s'], j['single_warm_cpu_mb_s'])"
}
echo "sweep cpu cold_mb_s warm_mb_s"
for sweep in 1 2; do
  for cpu in $(seq 0 $(( $(nproc) - 1 ))); do echo "$sweep $cpu $(taskset -c "$cpu" bash -c "$(declare -f bench); build=$build data=$data bench $text")"; done
done
echo "text run cold_mb_s warm_mb_s (unpinned)"
for run in 1 2 3; do
  echo "wmt14 $run $(bench $text)"
  echo "few-pieces $run $(bench /tmp/cpu_sweep_rep.txt)"
done
echo "tiktoken cpu mb_s"
for cpu in 0 5 10 15; do
  taskset -c "$cpu" python3 - "$data" "$text" "$cpu" <<'PY'
import sys, time, tiktoken
from tiktoken.load import load_tiktoken_bpe
import json
data, path, cpu = sys.argv[1:]
meta = json.load(open(f"{data}/tokenizers/cl100k_base.meta.json"))
enc = tiktoken.Encoding("cl100k_base", pat_str=meta["pat_str"], mergeable_ranks=load_tiktoken_bpe(f"{data}/tokenizers/cl100k_base.tiktoken"),
                        special_tokens={k: int(v) for k, v in meta["special_tokens"].items()})
text = open(path, encoding="utf-8").read()
best = 1e9
for _ in range(2):
    t0 = time.thread_time(); enc.encode_ordinary(text); best = min(best, time.thread_time() - t0)
print(cpu, round(len(text.encode()) / best / 1e6, 2))
PY
done
