#!/usr/bin/env bash
# Is a machine's single-thread speed the same on every core? Runs one build's single-thread
# encode pinned to each CPU in turn (twice over), tiktoken's encode_ordinary pinned to up to four,
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
# MB/s of a first and a second pass over $1, run under the command that follows (taskset ...).
bench() {
  local text=$1
  shift
  "$@" "$build"/flashgpt bench tokenizer -e cl100k_base --tokenizer-dir "$data/tokenizers" --threads 1 --repeat 2 \
    --warm --single-only "$text" 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print(j['single_cpu_mb_s'], j['single_warm_cpu_mb_s'])"
}
echo "sweep cpu cold_mb_s warm_mb_s"
for sweep in 1 2; do
  for cpu in $(seq 0 $(( $(nproc) - 1 ))); do echo "$sweep $cpu $(bench "$text" taskset -c "$cpu")"; done
done
echo "text run cold_mb_s warm_mb_s (unpinned)"
for run in 1 2 3; do
  echo "wmt14 $run $(bench "$text")"
  echo "few-pieces $run $(bench /tmp/cpu_sweep_rep.txt)"
done
echo "tiktoken cpu mb_s"
for cpu in $(seq 0 $(( ($(nproc) + 3) / 4 )) $(( $(nproc) - 1 ))); do  # up to four, spread out
  echo "$cpu $(taskset -c "$cpu" python3 "$(dirname "$0")/tiktoken_time.py" "$data/tokenizers" "$text" --repeat 2)"
done
