#!/usr/bin/env bash
# Kernel lab: builds the library once per variant (compile-time macros of
# src/attention/attention_cuda_launch.h and the kernels) and benchmarks each against torch's
# FA2 backend in the same process.
#   bench/attention_gpu/lab.sh "name:-DFLASHGPT_FWD64_BLOCK_N=32 -DFLASHGPT_FWD64_MTILES=2" ...
# The PyTorch binding is compiled once (build-lab-ext) and only relinked against each variant's
# attention and common libraries (compiling it costs ~40 s a variant on the H100 machine; a relink ~2 s).
# Environment: LAB_SEQLENS (1024,4096,16384), LAB_HEAD_DIMS (64,128), LAB_REP_MS (40), LAB_EXTRA
# (more rows, bench_attention.py --extra), LAB_CMAKE_ARGS (more CMake arguments, e.g.
# -DFLASHGPT_ATTENTION_HEAD_DIMS="32;64;96;256"); the
# forward kernel follows FLASHGPT_ATTN_FWD_KERNEL as everywhere.
set -uo pipefail
OUT=${OUT:-results/attention_gpu}
mkdir -p "$OUT" build-lab-ext
for variant in "$@"; do
  name=${variant%%:*}
  flags=${variant#*:}
  dir=build-lab-$name
  # The -D flags go to the C++ compiler too: attention_cuda.cc sizes the backward workspace
  # from TileConfig (kBwdBlockM), which must agree with the kernels'.
  cxx_defines=$(printf '%s\n' $flags | grep '^-D' | tr '\n' ' ')
  { cmake -S . -B "$dir" -G Ninja -DFLASHGPT_CUDA=ON -DFLASHGPT_BUILD_TESTS=OFF -DCMAKE_CUDA_FLAGS="$flags" \
      -DCMAKE_CXX_FLAGS="$cxx_defines" ${LAB_CMAKE_ARGS:-} &&
    cmake --build "$dir" -j16 --target flashgpt_attention; } >"$OUT/lab_build_$name.log" 2>&1 || { echo "$name: build failed"; continue; }
  mkdir -p build-lab-ext/src/attention build-lab-ext/src/common
  cp "$dir/src/attention/libflashgpt_attention.a" build-lab-ext/src/attention/
  cp "$dir/src/common/libflashgpt_common.a" build-lab-ext/src/common/
  cp "$dir/CMakeCache.txt" build-lab-ext/
  rm -f build-lab-ext/torch_ext/*.so  # ninja does not see the library: force the relink
  FLASHGPT_BUILD_DIR=$PWD/build-lab-ext python3 bench/attention_gpu/bench_attention.py --out "$OUT/lab_$name" \
    --methods flashgpt,torch-fa2 --seqlens "${LAB_SEQLENS:-1024,4096,16384}" --head-dims "${LAB_HEAD_DIMS:-64,128}" \
    --rep-ms "${LAB_REP_MS:-40}" --extra "${LAB_EXTRA:-}" >"$OUT/lab_$name.log" 2>&1
  echo "== $name ($flags)"
  sed -n '/^TFLOP/,/^wrote/p' "$OUT/lab_$name.log" | grep -v wrote | cut -c1-110
done
