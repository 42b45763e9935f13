"""Build the native extension ``mixnn_fast._C`` with CMake (and Ninja when present).

Follows pybind/cmake_example: CMake gets the output directory, the Python
executable and the build type; extra flags come from the ``CMAKE_ARGS``
environment variable (e.g. ``CMAKE_ARGS="-DMIXNN_CUDA=OFF"``).  The CMake build
tree is kept under ``build/cmake`` so that re-running the set-up rebuilds only
what changed (nvcc is slow; a fresh temporary tree every time would recompile
the CUDA sources on every install).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("MIXNN_BUILD_TYPE", "Release")
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        try:
            import ninja  # noqa: F401

            if not (build_dir / "CMakeCache.txt").exists() or (build_dir / "build.ninja").exists():
                cmake_args.append("-GNinja")
        except ImportError:
            pass
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ext.source_dir), *cmake_args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("mixnn_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
