#!/usr/bin/env bash
# Every test against the newest PyTorch on PyPI (requirements/pypi.txt): qat built and
# installed into that PyTorch's venv with its Catch2 tests (scripts/build_pypi.sh), then the
# Catch2 tests through CTest and the pytest suite, on the installed package. Arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(QAT_BUILD_TESTS=1 scripts/build_pypi.sh | tail -n 1)
# The tests that build or run against qat's C++ build (the installed CMake package, the C++
# front end's binaries) read QAT_BUILD_DIR: this build's, not the Debian one in build/.
export QAT_BUILD_DIR="$PWD/build-pypi"
ctest --test-dir "$QAT_BUILD_DIR" --output-on-failure -j "$(nproc)"
"$venv/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
