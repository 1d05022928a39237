#!/usr/bin/env bash
# On the accelerator machine (torch 2.x with CUDA, pip's pybind11, no Debian packages):
# builds the library and qat._C against that torch with the CUDA kernels, then runs the
# CUDA tests, the whole pytest suite and the fake-quantize benchmark. Catch2 is not there,
# so the C++ tests and examples are left out; fmt comes from torch's own headers. The GPU
# architectures are the machine's (torch's CMake detects them; TORCH_CUDA_ARCH_LIST
# overrides). Logs go to $LOG_DIR (default
# /tmp/qat-device-logs); the exit status is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
build=${QAT_BUILD_DIR:-/tmp/qat-device-build}
logs=${LOG_DIR:-/tmp/qat-device-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH=python
status=0
# Link with the distribution's g++: a toolchain that adds a static part of a newer
# libstdc++ (as /opt/gcc on that machine does, named by its CXX) puts a second copy of
# the stream code into libqat, whose locale facets then clash with the shared one: the
# first error message with a number in it crashed the process.
if [ -x /usr/bin/g++ ]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
fi
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DQAT_PYTHON_EXECUTABLE="$(command -v "$PYTHON")" \
  -DQAT_BUILD_TESTS=OFF -DQAT_BUILD_EXAMPLES=OFF >"$logs/configure.log" 2>&1 \
  || { tail -n 40 "$logs/configure.log"; exit 1; }
grep -E "CUDA|Torch|pybind11|qat:" "$logs/configure.log" | head -n 12
# -k 0: one run reports every translation unit that fails, not only the first.
cmake --build "$build" -j "$(nproc)" -- -k 0 >"$logs/build.log" 2>&1 || status=1
grep -E "warning|error|FAILED" "$logs/build.log" | head -n 60
test -f python/qat/libqat.so && test "$status" = 0 || { echo "build failed"; exit 1; }
"$PYTHON" -m pytest tests/python/test_cuda.py tests/python/test_fake_quantize_module.py -q \
  -p no:cacheprovider -k "cuda" -rfE 2>&1 | tee "$logs/pytest_cuda.log" | tail -n 3 || status=1
# The whole suite on torch 2.x (CUDA tests again included); xdist where it is installed.
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 8)
timeout "${QAT_PYTEST_TIMEOUT:-420}" "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -rfE "${workers[@]}" \
  --deselect tests/python/test_packaging.py "$@" >"$logs/pytest_all.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$logs/pytest_all.log" | head -n 60
timeout 90 "$PYTHON" benchmarks/bench_fake_quantize.py --threads "$(nproc)" --repeats 11 \
  2>&1 | tee "$logs/bench.log" | tail -n 30
exit "$status"
