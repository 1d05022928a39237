#!/usr/bin/env bash
# The main job on the newest PyTorch on PyPI: qat built and installed into that PyTorch's
# venv (scripts/build_pypi.sh), then the Fashion-MNIST QAT demo, which there adds ExecuTorch
# (.pte, XNNPACK) and ONNX Runtime (.onnx) rows to the lite interpreter's. Arguments go to the demo (see
# examples/python/fashion_mnist_demo.py); its files go to outputs/fashion_mnist_pypi unless
# --out says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/build_pypi.sh | tail -n 1)
"$venv/bin/python" examples/python/fashion_mnist_demo.py --out outputs/fashion_mnist_pypi "$@"
