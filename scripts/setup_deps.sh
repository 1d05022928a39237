#!/usr/bin/env bash
# Installs the Debian packages qat needs, skipping those already installed. There is no
# PyPI here: torch, pybind11, pytest and the rest all come from Debian.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache        # toolchain
  libtorch-dev python3-torch libsleef-dev         # LibTorch 1.13 (+ SLEEF for its AVX2 vector headers)
  pybind11-dev python3-dev libfmt-dev catch2      # bindings, formatting, C++ tests
  python3-venv python3-pip python3-setuptools     # the venv that `pip install -e .` uses
  python3-numpy python3-pytest python3-hypothesis python3-tqdm  # Python tests
  python3-matplotlib                              # the main job's plots
  python3-torchvision                             # real architectures for prepare tests
  dataset-fashion-mnist                           # real data (convert parity test, examples)
  zlib1g-dev                                      # gzip reader of the C++ Fashion-MNIST example
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup_deps: all ${#PACKAGES[@]} Debian packages are installed"
  exit 0
fi

echo "setup_deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup_deps: run as root or install sudo" >&2; exit 1; }
  SUDO=sudo
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
