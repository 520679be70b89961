#!/usr/bin/env bash
# Builds, on this (CPU) machine, what bench/pending/run.sh needs on the GPU machine and packs
# it into .gpu/pending/ (git-ignored), the folder a device call carries:
#   bench/pending/stage.sh
# A CUDA build (sm_90a; head dims 32, 64, 96, 128; MPI, NCCL off) in build-pending/ of flashgpt and
# the four CUDA test binaries, stripped, with lib/libfmt.so.9 and lib/libgomp.so.1 beside them
# (the GPU machine lacks both), in bins.tar.xz, and COMMIT. The optional libraries the GPU
# machine also lacks (libcurl, libarchive, OpenBLAS, liblzma) are left out of the build, and
# the binaries' ldd is checked for anything else. About 5 minutes on 2 cores; the package is
# about 40 MB, under the 64 MiB a call carries with the tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
export PATH="/usr/local/cuda/bin:$PATH"
PKG=.gpu/pending
TARGETS=(flashgpt attention_cuda_test generate_inference_cuda_test model_cuda_ops_test model_cuda_test)
CONFIG=(-G Ninja -DFLASHGPT_CUDA=ON -DFLASHGPT_MPI=OFF -DFLASHGPT_NCCL=OFF "-DFLASHGPT_ATTENTION_HEAD_DIMS=32;64;96;128"
        -DCMAKE_DISABLE_FIND_PACKAGE_CURL=ON -DCMAKE_DISABLE_FIND_PACKAGE_LibArchive=ON
        -DCMAKE_DISABLE_FIND_PACKAGE_BLAS=ON -DCMAKE_DISABLE_FIND_PACKAGE_LibLZMA=ON)
cmake -S . -B build-pending "${CONFIG[@]}" >/dev/null
cmake --build build-pending -j "$(nproc)" --target "${TARGETS[@]}"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib"
for t in "${TARGETS[@]}"; do cp "$(find build-pending -name "$t" -type f -perm -u+x | head -1)" "$stage/"; done
for b in "$stage"/*; do if [ -f "$b" ]; then strip "$b"; fi; done
for lib in libfmt.so.9 libgomp.so.1; do cp -L "$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')" "$stage/lib/"; done
# Everything the binaries need beyond these and the CUDA libraries must be on the GPU machine.
extra=$(for b in "$stage"/*; do if [ -f "$b" ]; then ldd "$b"; fi; done | awk '{print $1}' | sort -u |
        grep -vE '^(linux-vdso|/lib64/ld-linux|lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+|z|fmt|gomp|cuda|cudart|cublas|cublasLt)\.so)' || true)
[ -z "$extra" ] || { echo "stage.sh: the binaries need libraries the GPU machine may lack:" $extra >&2; exit 1; }
mkdir -p "$PKG"
tar -cJf "$PKG/bins.tar.xz" -C "$stage" .
git rev-parse --short HEAD >"$PKG/COMMIT"
git diff --quiet HEAD || echo "stage.sh: the tree has uncommitted changes; COMMIT names HEAD only" >&2
echo "staged $PKG ($(du -sh "$PKG" | cut -f1), commit $(cat "$PKG/COMMIT")); on the GPU machine: bash bench/pending/run.sh"
