"""ctest's entry to the PyTorch-binding test (test_flashgpt_attn.py, label gpu): runs it where
torch and the compiled flashgpt_attn are there (its CPU cases everywhere, its CUDA cases where a
CUDA device is and the extension was built with nvcc), else exits 77 (ctest: Skipped) with a
message naming what is missing. pytest alone would report a module of skips as passed."""
import importlib
import pathlib
import sys

SKIP = 77


def skip(why):
    print(f"SKIP: {why}", file=sys.stderr, flush=True)
    sys.exit(SKIP)


try:
    import torch
except ImportError:
    skip("PyTorch is not installed (pip install torch)")
try:
    ext = importlib.import_module("flashgpt_attn._C")
except ImportError as e:
    skip(f"flashgpt_attn._C is not built ({e}): build where torch is importable "
         "(FLASHGPT_PYTHON=AUTO or ON puts it in <build>/python) or pip install --no-build-isolation .")
if not (ext.built_with_cuda and torch.cuda.is_available()):
    print("flashgpt_attn: CPU cases only (" + ("no CUDA device" if ext.built_with_cuda else "built without nvcc") + ")",
          file=sys.stderr, flush=True)

import pytest  # noqa: E402

test = pathlib.Path(__file__).resolve().parent / "test_flashgpt_attn.py"
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", str(test), *sys.argv[1:]]))
