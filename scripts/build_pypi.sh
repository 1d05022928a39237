#!/usr/bin/env bash
# Builds qat against the newest PyTorch on PyPI (requirements/pypi.txt) and installs it into
# that PyTorch's venv (scripts/setup_pypi.sh), non-editable, the way a user installs a
# PyTorch extension: C++20, and the CUDA kernels with nvcc where torch has CUDA (they
# compile and link here, they run only on a GPU). Shared by scripts/test_pypi.sh and
# scripts/run_pypi.sh.
#
# Its build folder is build-pypi/ (QAT_BUILD_DIR), so it never touches the Debian build in
# build/ or the editable install's libraries in python/qat. QAT_BUILD_TESTS=1 also builds
# the Catch2 tests; QAT_REQUIRE_CUDA_KERNELS=1 (CI) makes a build without the CUDA kernels
# a failure. Progress goes to stderr; the last line on stdout is the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(scripts/setup_pypi.sh | tail -n 1)
export QAT_BUILD_DIR="$PWD/build-pypi"
if ! "$venv/bin/pip" install -v --no-build-isolation --no-deps --no-index \
    --force-reinstall . >build-pypi.log 2>&1; then
  tail -n 60 build-pypi.log >&2
  echo "build (PyPI torch): failed, full log in build-pypi.log" >&2
  exit 1
fi
grep -E -- "-- qat: " build-pypi.log | sort -u >&2 || true
if [ -f "$QAT_BUILD_DIR/CMakeFiles/qat.dir/csrc/ops/cuda/fake_quantize_kernel.cu.o" ]; then
  echo "build (PyPI torch): done, CUDA kernels compiled and linked into libqat ($venv)" >&2
elif [ "${QAT_REQUIRE_CUDA_KERNELS:-0}" = 1 ]; then
  echo "build (PyPI torch): the CUDA kernels were not compiled (see build-pypi.log)" >&2
  exit 1
else
  echo "build (PyPI torch): done, without CUDA kernels ($venv)" >&2
fi
echo "$venv"
