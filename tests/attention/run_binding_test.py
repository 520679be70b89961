"""ctest's entry to the PyTorch-binding test (test_flashgpt_attn.py, label gpu): runs it where
torch, a CUDA device and the compiled flashgpt_attn are there, else exits 77 (ctest: Skipped)
with a message naming what is missing. pytest alone would report a module of skips as passed."""
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
if not torch.cuda.is_available():
    skip("no CUDA device (torch.cuda.is_available() is False)")
try:
    importlib.import_module("flashgpt_attn._C")
except ImportError as e:
    skip(f"flashgpt_attn._C is not built ({e}): build with CUDA where torch is importable "
         "(FLASHGPT_PYTHON=AUTO or ON puts it in <build>/python) or pip install --no-build-isolation .")

import pytest  # noqa: E402

test = pathlib.Path(__file__).resolve().parent / "test_flashgpt_attn.py"
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", str(test), *sys.argv[1:]]))
