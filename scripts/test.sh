#!/usr/bin/env bash
# Every test: set up, build, then the Catch2 tests through CTest and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
.venv/bin/python -m pytest tests/python -q -p no:cacheprovider "$@"
