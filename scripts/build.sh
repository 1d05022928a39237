#!/usr/bin/env bash
# Installs the Debian dependencies, makes the venv .venv from Debian's Python (which sees
# Debian's torch), and builds everything with `pip install --no-build-isolation -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup_deps.sh

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# Quiet unless the build fails; the log says why.
if ! QAT_BUILD_TESTS=1 .venv/bin/pip install --no-build-isolation --no-deps --no-index -e . \
    >build.log 2>&1; then
  tail -n 60 build.log >&2
  echo "build: failed, full log in build.log" >&2
  exit 1
fi
echo "build: done (.venv, build/)"
