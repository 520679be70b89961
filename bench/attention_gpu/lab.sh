#!/usr/bin/env bash
# Kernel lab: builds the library once per forward-tile variant (compile-time macros of
# src/attention/attention_cuda_launch.h) and benchmarks each against torch's FA2 backend.
#   bench/attention_gpu/lab.sh "name:-DFLASHGPT_FWD64_BLOCK_N=32 -DFLASHGPT_FWD64_MTILES=2" ...
set -uo pipefail
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT"
for variant in "$@"; do
  name=${variant%%:*}
  flags=${variant#*:}
  dir=build-lab-$name
  { cmake -S . -B "$dir" -G Ninja -DFLASHGPT_CUDA=ON -DFLASHGPT_BUILD_TESTS=OFF -DCMAKE_CUDA_FLAGS="$flags" &&
    cmake --build "$dir" -j16 --target flashgpt; } >"$OUT/lab_build_$name.log" 2>&1 || { echo "$name: build failed"; continue; }
  FLASHGPT_BUILD_DIR=$PWD/$dir python3 bench/attention_gpu/bench_attention.py --out "$OUT/lab_$name" \
    --methods flashgpt,torch-fa2 --seqlens ${LAB_SEQLENS:-1024,4096,16384} --rep-ms 40 >"$OUT/lab_$name.log" 2>&1
  echo "== $name ($flags)"
  sed -n '/^TFLOP/,/^wrote/p' "$OUT/lab_$name.log" | grep -v wrote | cut -c1-110
done
