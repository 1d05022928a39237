"""Builds qat with CMake against the torch of the interpreter that runs it: the core
library and the pybind11 module qat._C, and when asked the Catch2 tests and C++ examples,
into one build folder.

    pip install --no-build-isolation .             # into an environment that has torch
    QAT_BUILD_TESTS=1 pip install --no-build-isolation -e .   # development (scripts/build.sh)

Environment: QAT_BUILD_DIR (default ./build), QAT_BUILD_TESTS (1: also the Catch2 tests
and the C++ examples), QAT_CMAKE_ARGS (extra -D options, applied last), QAT_BUILD_JOBS
(default: all cores).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("QAT_BUILD_DIR", ROOT / "build")).resolve()


def read_version() -> str:
    for line in (ROOT / "CMakeLists.txt").read_text().splitlines():
        if line.startswith("project(qat VERSION"):
            return line.split("VERSION")[1].split()[0].rstrip(")")
    raise RuntimeError("setup.py: no `project(qat VERSION x.y.z ...)` line in CMakeLists.txt")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project; the module and libqat land next to
    the package: python/qat for editable installs, the wheel's qat/ otherwise."""

    def build_extension(self, ext: Extension) -> None:
        # An editable install imports qat from python/qat, so both libraries are written
        # there. setuptools would copy only the extension (_C) there, not libqat, and from
        # a staging folder that an editable build deletes afterwards.
        if self.editable_mode:
            out_dir = ROOT / "python" / "qat"
        else:
            out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = BUILD_DIR
        build_dir.mkdir(parents=True, exist_ok=True)
        tests = "ON" if os.environ.get("QAT_BUILD_TESTS", "0") not in ("", "0", "OFF") else "OFF"
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DQAT_PYTHON_EXECUTABLE={sys.executable}",
            f"-DQAT_PYTHON_OUTPUT_DIR={out_dir}",
            f"-DQAT_BUILD_TESTS={tests}",
            f"-DQAT_BUILD_EXAMPLES={tests}",
        ] + shlex.split(os.environ.get("QAT_CMAKE_ARGS", ""))
        jobs = os.environ.get("QAT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])

    def copy_extensions_to_source(self) -> None:
        # Editable builds wrote the libraries into the source folder already.
        if not self.editable_mode:
            super().copy_extensions_to_source()


setup(
    name="qat",
    version=read_version(),
    description="Quantization-aware training for PyTorch: fake-quantize operators, "
    "estimators, and integer export for PyTorch Mobile",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("qat._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
    # setuptools' own staging folders (lib.*, bdist.*) go inside the CMake build folder, so
    # that two builds against two torches from one source tree never share them.
    options={"build": {"build_base": str(BUILD_DIR / "setuptools")}},
)
