"""The installable CMake package: `cmake --install` of the build folder into a fresh
prefix, then tests/downstream (a LibTorch project outside the tree) finds it with
`find_package(qat)`, links `qat::qat`, builds and runs against it.

The build folder is the one scripts/build.sh makes (QAT_BUILD_DIR, as in setup.py,
default build/). Building the downstream program compiles one torch-including file
(about a minute on two cores)."""

import shutil
import subprocess

import torch

import qat

from helpers import BUILD_DIR, ROOT


def _run(command, **kwargs):
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def test_installed_package_builds_and_runs_a_downstream_project(tmp_path):
    assert (BUILD_DIR / "cmake_install.cmake").is_file(), (
        f"no configured build in {BUILD_DIR}: run scripts/build.sh (or set QAT_BUILD_DIR)")
    prefix = tmp_path / "prefix"
    _run(["cmake", "--install", BUILD_DIR, "--prefix", prefix])

    package = prefix / "lib" / "cmake" / "qat"
    for name in ("qatConfig.cmake", "qatConfigVersion.cmake", "qatTargets.cmake"):
        assert (package / name).is_file(), name
    assert (prefix / "lib" / "libqat.so").is_file()
    public = sorted(p.name for p in (ROOT / "csrc" / "qat").glob("*.h"))
    assert sorted(p.name for p in (prefix / "include" / "qat").glob("*.h")) == public
    assert not list(prefix.rglob("_C*.so")), "the Python module belongs to the Python package"
    # qat's private dependencies (header-only fmt, OpenMP) and this machine's paths stay
    # out of what consumers read.
    exported = "".join(p.read_text() for p in package.glob("*.cmake"))
    for private in ("fmt::", "OpenMP::", str(ROOT), str(BUILD_DIR)):
        assert private not in exported, private

    # A copy outside the source tree, as a user's project would be.
    source = tmp_path / "downstream"
    shutil.copytree(ROOT / "tests" / "downstream", source)
    build = tmp_path / "downstream-build"
    # LibTorch as a user of this torch finds it (Debian's is found without; a pip torch's
    # lives in the package).
    prefix_path = f"{prefix};{torch.utils.cmake_prefix_path}"
    _run(["cmake", "-S", source, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={prefix_path}"])
    _run(["cmake", "--build", build])
    output = _run([build / "downstream"]).splitlines()

    assert output == [
        f"version {qat.__version__}",
        "registered yes",
        # 2.5 and 3.5 round half to even; -12 and 7.6 clamp to -8 and 7 (times 0.25).
        "values 0.5 -2 1 1.75",
        # The straight-through estimator passes the gradient inside the range only.
        "grad 1 0 1 0",
    ]
