#!/usr/bin/env bash
# Tokenizer lab: builds the CLI once per variant (compile-time macros of src/tokenizer) and
# times single-thread encode_ordinary of every variant in turn, the order rotated each round,
# so that a machine's drift falls on all of them alike. Prints per variant the median
# thread-CPU MB/s of a first pass (cold piece cache) and of a second (warm), and the median of
# the per-round ratios against the first variant.
#   bench/tokenizer/lab.sh "base:" "ahead16:-DFLASHGPT_TOK_AHEAD=16" ...
# A name of the form name@DIR builds the source tree in DIR instead of this one (for example
# main's, from `git archive`).
# Environment: LAB_TEXT (a text file; default: every WMT14 file of $LAB_DATA joined),
# LAB_DATA (.data), LAB_ENCODINGS (cl100k_base), LAB_ROUNDS (6), LAB_REPEAT (3).
set -euo pipefail
data=${LAB_DATA:-.data}
text=${LAB_TEXT:-/tmp/tokenizer_lab.txt}
[ -f "$text" ] || xzcat "$data"/wmt14/*.en.xz "$data"/wmt14/*.fr.xz >"$text"
names=()
jobs=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))
for variant in "$@"; do
  name=${variant%%:*}
  flags=${variant#*:}
  source=.
  if [[ $name == *@* ]]; then source=${name#*@}; name=${name%%@*}; fi
  names+=("$name")
  dir=build-toklab-$name
  { cmake -S "$source" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHGPT_CUDA=OFF -DFLASHGPT_BUILD_TESTS=OFF \
      -DFLASHGPT_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS="$flags" >"/tmp/toklab_$name.log" 2>&1 &&
    cmake --build "$dir" -j "$jobs" --target flashgpt >>"/tmp/toklab_$name.log" 2>&1 ||
    { echo "$name: build failed"; tail -20 "/tmp/toklab_$name.log"; exit 1; }; } &
done
wait
results=/tmp/toklab_results.txt
: >"$results"
for encoding in ${LAB_ENCODINGS:-cl100k_base}; do
  for round in $(seq 1 "${LAB_ROUNDS:-6}"); do
    n=${#names[@]}
    for k in $(seq 0 $((n - 1))); do
      name=${names[$(( (k + round) % n ))]}
      json=$(build-toklab-"$name"/flashgpt bench tokenizer -e "$encoding" --tokenizer-dir "$data/tokenizers" \
        --threads 1 --repeat "${LAB_REPEAT:-3}" --warm --single-only "$text" 2>/dev/null)
      echo "$encoding $round $name $json" >>"$results"
    done
  done
done
python3 - "$results" "${names[@]}" <<'PY'
import json, statistics, sys
rows = [line.split(" ", 3) for line in open(sys.argv[1])]
names = sys.argv[2:]
for encoding in dict.fromkeys(r[0] for r in rows):
    by = {}
    for enc, rnd, name, js in rows:
        if enc == encoding:
            by.setdefault(name, {})[rnd] = json.loads(js)
    base = by[names[0]]
    print(f"== {encoding}: thread-CPU MB/s, median over {len(base)} rounds (ratio: median of per-round ratios to {names[0]})")
    print(f"{'variant':<24} {'cold':>8} {'ratio':>7} {'wins':>5} {'warm':>8} {'ratio':>7}")
    for name in names:
        v = by[name]
        cold = [v[r]["single_cpu_mb_s"] for r in v]
        warm = [v[r]["single_warm_cpu_mb_s"] for r in v]
        rc = [v[r]["single_cpu_mb_s"] / base[r]["single_cpu_mb_s"] for r in v]
        rw = [v[r]["single_warm_cpu_mb_s"] / base[r]["single_warm_cpu_mb_s"] for r in v]
        wins = sum(x > 1 for x in rc)
        print(f"{name:<24} {statistics.median(cold):8.1f} {statistics.median(rc):7.3f} {wins:5d} "
              f"{statistics.median(warm):8.1f} {statistics.median(rw):7.3f}")
PY
