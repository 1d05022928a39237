#!/usr/bin/env bash
# The main job: set up, build, then run the fake-quantize demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build/fake_quantize_demo "$@"
