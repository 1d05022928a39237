#!/usr/bin/env bash
# The main job: set up, build, then the Fashion-MNIST QAT demo (float, int8, w4a8, automatic
# mixed precision and PyTorch's own QAT, exported and compared). Arguments go to the demo:
# --data DIR, --out DIR, --epochs N, --qat-epochs N (see examples/python/fashion_mnist_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
.venv/bin/python examples/python/fashion_mnist_demo.py "$@"
