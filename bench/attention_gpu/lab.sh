#!/usr/bin/env bash
# Kernel lab: builds the library once per variant (compile-time macros of
# src/attention/kernels/flash_tiles.cuh and the kernels) and benchmarks each against torch's
# FA2 backend in the same process.
#   bench/attention_gpu/lab.sh "name:-DFLASHGPT_FWD64_BLOCK_N=32 -DFLASHGPT_FWD64_MTILES=2" ...
# Each variant's build also links the PyTorch binding (python/CMakeLists.txt; its object file is
# compiled once per build folder, ~40 s on the H100 machine), which bench_attention.py imports
# from <build>/python.
# Environment: LAB_SEQLENS (1024,4096,16384), LAB_HEAD_DIMS (64,128), LAB_REP_MS (40), LAB_EXTRA
# (more rows, bench_attention.py --extra), LAB_CMAKE_ARGS (more CMake arguments, e.g.
# -DFLASHGPT_ATTENTION_HEAD_DIMS="32;64;96;256"); the
# forward kernel follows FLASHGPT_ATTN_FWD_KERNEL as everywhere.
set -uo pipefail
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT"
for variant in "$@"; do
  name=${variant%%:*}
  flags=${variant#*:}
  dir=build-lab-$name
  # The tile macros reach nvcc only: the instances report their workspace size themselves.
  { cmake -S . -B "$dir" -G Ninja -DFLASHGPT_CUDA=ON -DFLASHGPT_PYTHON=ON -DFLASHGPT_BUILD_TESTS=OFF -DCMAKE_CUDA_FLAGS="$flags" \
      ${LAB_CMAKE_ARGS:-} &&
    cmake --build "$dir" -j16 --target flashgpt_attn_ext; } >"$OUT/lab_build_$name.log" 2>&1 || { echo "$name: build failed"; continue; }
  FLASHGPT_BUILD_DIR=$PWD/$dir python3 bench/attention_gpu/bench_attention.py --out "$OUT/lab_$name" \
    --methods flashgpt,torch-fa2 --seqlens "${LAB_SEQLENS:-1024,4096,16384}" --head-dims "${LAB_HEAD_DIMS:-64,128}" \
    --rep-ms "${LAB_REP_MS:-40}" --extra "${LAB_EXTRA:-}" >"$OUT/lab_$name.log" 2>&1
  echo "== $name ($flags)"
  sed -n '/^TFLOP/,/^wrote/p' "$OUT/lab_$name.log" | grep -v wrote | cut -c1-110
done
