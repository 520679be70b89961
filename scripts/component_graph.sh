#!/usr/bin/env bash
# Regenerates docs/components.dot and docs/components.svg, the component graph that
# docs/architecture.md shows, from CMake's --graphviz output of a CPU-only configure
# (tests and benchmarks off, external libraries left out). Needs Graphviz's `dot`
# (Debian: apt-get install graphviz); without it only the .dot is written.
# Usage: scripts/component_graph.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/build"
cat > "$tmp/build/CMakeGraphVizOptions.cmake" <<'OPTIONS'
set(GRAPHVIZ_GRAPH_NAME "flashgpt components")
set(GRAPHVIZ_EXTERNAL_LIBS FALSE)
set(GRAPHVIZ_GENERATE_PER_TARGET FALSE)
set(GRAPHVIZ_GENERATE_DEPENDERS FALSE)
OPTIONS
cmake -S "$root" -B "$tmp/build" -G Ninja -DFLASHGPT_CUDA=OFF -DFLASHGPT_BUILD_TESTS=OFF \
  -DFLASHGPT_BUILD_BENCH=OFF --graphviz="$tmp/components.dot" > "$tmp/configure.log"
# CMake numbers nodes in the order it meets them; the legend stays, the paths do not vary.
cp "$tmp/components.dot" "$root/docs/components.dot"
if command -v dot > /dev/null; then
  dot -Tsvg "$root/docs/components.dot" -o "$root/docs/components.svg"
  echo "wrote docs/components.dot and docs/components.svg"
else
  echo "wrote docs/components.dot; install Graphviz (dot) to render docs/components.svg" >&2
fi
