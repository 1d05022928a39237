#!/usr/bin/env bash
# Every test against the newest PyTorch on PyPI (requirements/pypi.txt): makes its venv
# (scripts/setup_pypi.sh), builds qat against that torch (C++20, and the CUDA kernels with
# nvcc where torch has CUDA: they compile and link here, they run only on a GPU) and
# installs it into the venv non-editable, the way a user installs a PyTorch extension; then
# the Catch2 tests through CTest and the pytest suite, on the installed package.
#
# Its build folder is build-pypi/ (QAT_BUILD_DIR), so it never touches the Debian build in
# build/ or the editable install's libraries in python/qat. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(scripts/setup_pypi.sh | tail -n 1)
export QAT_BUILD_DIR="$PWD/build-pypi"
if ! QAT_BUILD_TESTS=1 "$venv/bin/pip" install -v --no-build-isolation --no-deps --no-index \
    --force-reinstall . >build-pypi.log 2>&1; then
  tail -n 60 build-pypi.log >&2
  echo "build (PyPI torch): failed, full log in build-pypi.log" >&2
  exit 1
fi
grep -E -- "-- qat: " build-pypi.log | sort -u || true
# QAT_REQUIRE_CUDA_KERNELS=1 (CI) makes a build without them a failure.
if [ -f "$QAT_BUILD_DIR/CMakeFiles/qat.dir/csrc/ops/cuda/fake_quantize_kernel.cu.o" ]; then
  echo "build (PyPI torch): done, CUDA kernels compiled and linked into libqat ($venv)"
elif [ "${QAT_REQUIRE_CUDA_KERNELS:-0}" = 1 ]; then
  echo "build (PyPI torch): the CUDA kernels were not compiled (see build-pypi.log)" >&2
  exit 1
else
  echo "build (PyPI torch): done, without CUDA kernels ($venv)"
fi
ctest --test-dir "$QAT_BUILD_DIR" --output-on-failure -j "$(nproc)"
"$venv/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
