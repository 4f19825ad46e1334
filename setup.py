# SPDX-License-Identifier: Apache-2.0
"""Builds dustin through CMake: `pip install --no-build-isolation .` (or `-e .`).

Environment: DUSTIN_CUDA=AUTO|ON|OFF, DUSTIN_CUDA_ARCHS="80;90a", CUTLASS_DIR=<include dir>,
DUSTIN_BUILD_JOBS=<n>, DUSTIN_BUILD_TYPE=Release|RelWithDebInfo|Debug.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        # _C and libdustin land together in the package folder (in place for -e installs).
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("DUSTIN_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DDUSTIN_CUDA={os.environ.get('DUSTIN_CUDA', 'AUTO')}",
            "-DDUSTIN_BUILD_EXAMPLES=OFF",
            "-GNinja",
        ]
        if "DUSTIN_CUDA_ARCHS" in os.environ:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['DUSTIN_CUDA_ARCHS']}")
        if "DUSTIN_EXT_CXX_STANDARD" in os.environ:
            args.append(f"-DDUSTIN_EXT_CXX_STANDARD={os.environ['DUSTIN_EXT_CXX_STANDARD']}")
        if "CUTLASS_DIR" in os.environ:
            args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        cuda_home = os.environ.get("CUDA_HOME")
        if cuda_home and Path(cuda_home, "bin", "nvcc").exists():
            args.append(f"-DCMAKE_CUDA_COMPILER={Path(cuda_home, 'bin', 'nvcc')}")
        jobs = os.environ.get("DUSTIN_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True
        )

    def copy_extensions_to_source(self) -> None:
        # Editable installs copy only _C into python/dustin; libdustin must sit beside it.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for lib in Path(regular_file).parent.glob("libdustin.so*"):
                self.copy_file(str(lib), str(Path(inplace_file).parent / lib.name))


setup(
    ext_modules=[CMakeExtension("dustin._C")],
    cmdclass={"build_ext": CMakeBuild},
)
