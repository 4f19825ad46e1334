# SPDX-License-Identifier: Apache-2.0
"""libdustin as a native server sees it: cmake --install, find_package(dustin), link, run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_installed_package_links_and_runs(tmp_path):
    # The CPU path is what CI can run; DUSTIN_NATIVE_CUDA=ON builds the kernels in too.
    cuda = os.environ.get("DUSTIN_NATIVE_CUDA", "OFF")
    build, prefix, example = tmp_path / "build", tmp_path / "prefix", tmp_path / "example"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(
        ["cmake", "-S", ROOT, "-B", build, *generator, f"-DDUSTIN_CUDA={cuda}",
         "-DDUSTIN_BUILD_PYTHON=OFF", "-DDUSTIN_BUILD_EXAMPLES=OFF",
         f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_INSTALL_PREFIX={prefix}"]
    )
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 1)])
    _run(["cmake", "--install", build])
    assert (prefix / "include" / "dustin" / "dustin.h").exists()

    _run(
        ["cmake", "-S", ROOT / "examples" / "native", "-B", example, *generator,
         f"-DCMAKE_PREFIX_PATH={prefix}"]
    )
    _run(["cmake", "--build", example])
    out = _run([example / "dustin_native_example"])
    assert out.strip().endswith("ok"), out
