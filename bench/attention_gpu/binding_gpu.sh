#!/usr/bin/env bash
# The pip package on a GPU machine, built as a user builds it, in one command:
#   bench/attention_gpu/binding_gpu.sh NEW_SDIST [OLD_SDIST]
# (an sdist: python3 -c "import scikit_build_core.build as b; b.build_sdist('dist')"). At once:
# a wheel from each sdist with `pip wheel --no-build-isolation` (CUDA kernels for $HEAD_DIMS,
# default "64;128") and a CPU-only wheel from NEW_SDIST (FLASHGPT_CUDA=OFF), each installed with
# pip --target. Then the binding's test (tests/attention/run_binding_test.py) against the
# CPU-only wheel while the CUDA wheels build, and against the new CUDA wheel (CPU and CUDA
# cases); then binding_bench.py, the old wheel beside the new one and torch SDPA. Logs and
# binding_bench.csv go to $OUT; exit status 0 only if every step passed.
# DEPS (optional) holds what a bare machine lacks: wheels/ (scikit-build-core and its needs),
# fmt/ (a prefix with fmt's headers and CMake files) and omp/ (include/omp.h, lib/libgomp.so,
# libgomp.so.1, libgomp.spec); the wheels and omp/ are used only where the machine has none.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 NEW_SDIST [OLD_SDIST]" >&2; exit 2; }
NEW=$(realpath "$1")
OLD=${2:+$(realpath "$2")}
OUT=${OUT:-results/binding_gpu}
HEAD_DIMS=${HEAD_DIMS:-64;128}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "python $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'), $(cmake --version | head -1), $(nproc) cores"

defines=(-Ccmake.define.FLASHGPT_ATTENTION_HEAD_DIMS="$HEAD_DIMS")
if [ -n "${DEPS:-}" ]; then
  DEPS=$(realpath "$DEPS")
  if ! python3 -c "import scikit_build_core" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-compile --target "$W/site" "$DEPS"/wheels/*.whl || exit 1
    export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "scikit-build-core from DEPS/wheels"
  fi
  if [ -d "$DEPS/fmt" ]; then
    defines+=(-Ccmake.define.fmt_DIR="$(echo "$DEPS"/fmt/lib/*/cmake/fmt)")
    echo "fmt from DEPS/fmt"
  fi
  if ! printf '#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n' |
      c++ -fopenmp -x c++ - -o "$W/omp_probe" 2>/dev/null; then
    export CPATH="$DEPS/omp/include${CPATH:+:$CPATH}" LIBRARY_PATH="$DEPS/omp/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$DEPS/omp/lib"
    echo "OpenMP (omp.h, libgomp) from DEPS/omp"
  fi
fi

# build NAME SDIST [pip args...]: wheel into $W/dist-NAME, installed into $W/NAME.
build() {
  local name=$1 sdist=$2 t0=$SECONDS
  shift 2
  python3 -m pip wheel -v --no-build-isolation --no-deps -w "$W/dist-$name" "${defines[@]}" "$@" "$sdist" \
    >"$OUT/wheel_$name.log" 2>&1 &&
    python3 -m pip install -q --no-deps --no-compile --target "$W/$name" "$W/dist-$name"/*.whl >>"$OUT/wheel_$name.log" 2>&1
  local rc=$?
  echo "wheel $name: rc $rc, $((SECONDS - t0)) s, $(cd "$W/dist-$name" 2>/dev/null && ls)"
  [ $rc -eq 0 ] || grep -E "error|Error|FAILED" "$OUT/wheel_$name.log" | head -12
  return $rc
}
# test NAME LOG [pytest args...]: the binding's test against the wheel installed in $W/NAME.
run_test() {
  local name=$1 log=$2 t0=$SECONDS
  shift 2
  PYTHONPATH="$W/$name${PYTHONPATH:+:$PYTHONPATH}" timeout "${TEST_TIMEOUT:-150}" \
    python3 "$ROOT/tests/attention/run_binding_test.py" -rs "$@" >"$OUT/$log" 2>&1
  local rc=$?
  echo "test ($name wheel): rc $rc, $((SECONDS - t0)) s: $(grep -E "passed|failed|error" "$OUT/$log" | tail -1)"
  grep -E "^FAILED|^ERROR|Error:" "$OUT/$log" | head -10
  return $rc
}

build cpu "$NEW" -Ccmake.define.FLASHGPT_CUDA=OFF & cpu_pid=$!
build new "$NEW" & new_pid=$!
if [ -n "$OLD" ]; then build old "$OLD" & old_pid=$!; fi
if wait $cpu_pid; then
  OMP_NUM_THREADS=4 run_test cpu test_cpu_wheel.log || status=1
else
  status=1
fi
wait $new_pid || { echo "the new CUDA wheel did not build"; exit 1; }
ldd "$W"/new/flashgpt_attn/_C*.so | grep -E "not found|gomp|fmt|cudart" | grep -vE "lib(c10|torch)" | sed 's/^/ldd _C: /'
python3 -c "import sys; sys.path.insert(0, '$W/new'); import flashgpt_attn as f; print('imported', f._extension().__file__, 'built_with_cuda', f._extension().built_with_cuda)"
run_test new test_cuda_wheel.log || status=1
impls=(--impl new="$W/new")
if [ -n "$OLD" ]; then
  if wait $old_pid; then impls=(--impl old="$W/old" "${impls[@]}"); else status=1; fi
fi
t0=$SECONDS
timeout "${BENCH_TIMEOUT:-120}" python3 "$HERE/binding_bench.py" "${impls[@]}" --out "$OUT" ${BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1 || status=1
echo "bench: $((SECONDS - t0)) s"
cat "$OUT/bench.log"
echo "total $((SECONDS - start)) s, status $status"
exit $status
