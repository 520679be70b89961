#!/usr/bin/env bash
# Installs what flashgpt's build, tests and `make run` use on a fresh Debian 12 / Ubuntu
# machine, and nothing else: the build tools and libraries from Debian packages (zlib,
# liblzma, libcurl, libarchive, OpenBLAS and OpenMPI are optional to CMake but installed so
# that every test runs: OpenMPI for the data-parallel trainer's `mpirun -np 2` test), and the
# Python packages the tests and plots use (tiktoken and sacrebleu as test oracles, numpy and
# pytest for the Python tests, scikit-build-core for the pip package's test, matplotlib for
# `make run`'s plots). Idempotent and
# quiet when everything is already there. Docs-only tools (Graphviz for
# scripts/component_graph.sh) are not installed.
set -euo pipefail

debian_packages=(build-essential cmake ninja-build libcli11-dev nlohmann-json3-dev libfmt-dev libgtest-dev
  zlib1g-dev liblzma-dev libopenblas-dev xz-utils libcurl4-openssl-dev libarchive-dev libopenmpi-dev openmpi-bin)
python_packages=(tiktoken matplotlib numpy pytest sacrebleu scikit_build_core)

missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if command -v "$python" >/dev/null; then
  need=()
  for mod in "${python_packages[@]}"; do "$python" -c "import $mod" 2>/dev/null || need+=("$mod"); done
  if ((${#need[@]})); then
    echo "install-deps: installing Python packages: ${need[*]}"
    "$python" -m pip install -q "${need[@]}" 2>/dev/null ||
      "$python" -m pip install -q --break-system-packages "${need[@]}"
  fi
fi
