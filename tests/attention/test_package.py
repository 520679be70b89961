"""The pip package of the PyTorch binding (pyproject.toml, scikit-build-core), as far as a machine
without a GPU can check it: the sdist builds and holds what the binding's build reads, with the
right metadata; and where torch is missing, `pip wheel` stops at the configure step with a
message naming it rather than failing somewhere in a compile (without nvcc the wheel is built for
CPU tensors alone). The wheel itself (CUDA kernels, torch) is built, imported and tested on a GPU
machine (docs/packaging.md)."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

if importlib.util.find_spec("scikit_build_core") is None:
    pytest.exit("SKIP: scikit-build-core is not installed (scripts/install-deps.sh installs it)", returncode=77)


def test_sdist_holds_the_binding_sources_and_metadata(tmp_path):
    out = subprocess.run([sys.executable, "-c", f"import scikit_build_core.build as b; print(b.build_sdist({str(tmp_path)!r}))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip().splitlines()[-1]
    assert name == "flashgpt_attn-0.1.0.tar.gz"
    with tarfile.open(tmp_path / name) as tar:
        files = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
        pkg_info = tar.extractfile("flashgpt_attn-0.1.0/PKG-INFO").read().decode()
    for needed in ["pyproject.toml", "CMakeLists.txt", "python/CMakeLists.txt", "python/flashgpt_attn/__init__.py",
                   "python/flashgpt_attn/binding.cpp", "python/flashgpt_attn/philox.py", "cmake/FlashgptCuda.cmake",
                   "include/flashgpt/attention.h", "src/attention/CMakeLists.txt", "src/common/CMakeLists.txt"]:
        assert needed in files, f"{needed} missing from the sdist"
    assert not any(f.startswith(("tests/", "src/data/", "src/model/", "build")) for f in files), sorted(files)[:20]
    assert "Name: flashgpt-attn" in pkg_info and "Version: 0.1.0" in pkg_info
    assert "Requires-Dist: torch" in pkg_info


def _torch_importable():
    return importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(_torch_importable(), reason="torch is here: the wheel would build (the GPU machine's test; "
                    "without nvcc, for CPU tensors alone)")
def test_wheel_without_torch_fails_with_a_clear_message(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path / "dist"), f"--config-settings=build-dir={tmp_path / 'build'}", str(REPO)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "flashgpt_attn: building the binding needs PyTorch importable" in text, text[-3000:]
    assert not list((tmp_path / "dist").glob("*.whl"))
