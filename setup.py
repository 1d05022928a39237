"""Builds qat with CMake: the core library, the pybind11 module qat._C, and (for
development) the Catch2 tests and C++ examples, into one build folder.

    python -m venv --system-site-packages .venv    # from /usr/bin/python3 on Debian
    .venv/bin/pip install --no-build-isolation -e .

Environment: QAT_BUILD_DIR (default ./build), QAT_CMAKE_ARGS (extra -D options),
QAT_BUILD_JOBS (default: all cores).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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
    the package (python/qat for editable installs, the wheel's qat/ otherwise)."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(os.environ.get("QAT_BUILD_DIR", ROOT / "build")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DQAT_PYTHON_EXECUTABLE={sys.executable}",
            f"-DQAT_PYTHON_OUTPUT_DIR={out_dir}",
        ] + shlex.split(os.environ.get("QAT_CMAKE_ARGS", ""))
        jobs = os.environ.get("QAT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


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
)
