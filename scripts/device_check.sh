#!/usr/bin/env bash
# On the accelerator machine (torch 2.x with CUDA, pip's pybind11, no Debian packages):
# builds the library and qat._C against that torch with the CUDA kernels, then runs the
# pytest suite, CUDA tests included. Catch2 and fmt are not there, so the C++ tests and
# examples are left out. Prints the build's and the tests' summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
build=${QAT_BUILD_DIR:-/tmp/qat-device-build}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DQAT_PYTHON_EXECUTABLE="$(command -v "$PYTHON")" \
  -DQAT_BUILD_TESTS=OFF -DQAT_BUILD_EXAMPLES=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="${QAT_CUDA_ARCHITECTURES:-native}" 2>&1 | tail -n 5
cmake --build "$build" -j "$(nproc)" 2>&1 | grep -E "warning|error|Linking" || true
test -f python/qat/libqat.so
PYTHONPATH=python "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -x \
  --deselect tests/python/test_packaging.py "$@"
PYTHONPATH=python "$PYTHON" benchmarks/bench_fake_quantize.py --threads "$(nproc)" --repeats 11
