#!/usr/bin/env bash
# Every test against the newest PyTorch on PyPI (requirements/pypi.txt): qat built and
# installed into that PyTorch's venv with its Catch2 tests (scripts/build_pypi.sh), then the
# Catch2 tests through CTest and the pytest suite, on the installed package. Arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(QAT_BUILD_TESTS=1 scripts/build_pypi.sh | tail -n 1)
ctest --test-dir "$PWD/build-pypi" --output-on-failure -j "$(nproc)"
"$venv/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
