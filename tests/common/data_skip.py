"""The one way a Python test skips when the shared corpora or the tokenizer's rank files are
missing: exit 77 (ctest's SKIP_RETURN_CODE) with a message that names what is missing and
how to get it, or fail instead when FLASHGPT_REQUIRE_DATA=1 (CI sets it, so that CI still
runs everything). The C++ tests do the same through FLASHGPT_SKIP_MISSING (test_support.h).

Use: sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common")); import data_skip"""
import os
import sys

SKIP = 77
TOKENIZER_MISSING = (
    "no tokenizer rank files (r50k_base, cl100k_base, o200k_base .tiktoken, with their .meta.json): set "
    "FLASHGPT_TOKENIZER_DIR to their folder or put them in ../shared/data/tokenizers")
SHARED_DATA_MISSING = (
    "no shared corpora (wmt14/ and extra/, see wmt14/SOURCES.md there): set FLASHGPT_DATA_DIR to the "
    "folder that holds them or put it at ../shared/data beside the checkout")


def required():
    return os.environ.get("FLASHGPT_REQUIRE_DATA") == "1"


def exit_missing(what):
    """Ends the test: skipped (77), or failed (1) under FLASHGPT_REQUIRE_DATA=1."""
    if required():
        print(f"FAIL: {what} (FLASHGPT_REQUIRE_DATA=1: required)", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"SKIP: {what}", file=sys.stderr, flush=True)
    sys.exit(SKIP)


def tokenizer_dir_usable(path):
    """Whether `path` holds all three rank files and their meta.json (what the tiktoken
    comparisons read)."""
    if path is None or not os.path.isdir(path):
        return False
    return all(os.path.isfile(os.path.join(path, f"{name}.{ext}"))
               for name in ("r50k_base", "cl100k_base", "o200k_base") for ext in ("tiktoken", "meta.json"))
