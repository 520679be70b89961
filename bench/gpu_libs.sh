# Sourced by the scripts the GPU machine runs (bench/*/): `gpu_libs DIR BINARY` puts DIR/lib
# (the shared libraries that machine lacks, copied beside the binaries: libfmt, libgomp) first
# on LD_LIBRARY_PATH and, where BINARY still misses a shared library (the CUDA ones its loader
# does not know), adds the library folders of PyTorch's nvidia wheels. Returns 1, naming what
# is missing, where something still is.
gpu_libs() {
  local dir=$1 binary=$2 extra
  export LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ldd "$binary" | grep -q "not found" || return 0
  extra=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/lib/lib*.so*', recursive=True)})))" 2>/dev/null)
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$extra"
  if ldd "$binary" | grep "not found"; then
    echo "missing shared libraries"
    return 1
  fi
}
