#!/usr/bin/env bash
# Makes, once, the venv of the PyPI leg: the newest PyTorch from PyPI with the packages
# pinned in requirements/pypi.txt, in a venv of its own made from /usr/bin/python3.
#
# The venv lives outside the clone, under ${QAT_CACHE_DIR:-~/.cache/qat}, named by the
# lock file's hash: CI's fresh clones on the same machine reuse it, and pip's own cache
# keeps the wheels (about 3 GB with torch's nvidia-* wheels) for a new one. A venv whose
# install did not finish has no stamp file and is made again. QAT_PYPI_VENV names another
# folder instead.
#
# Progress goes to stderr; the last line on stdout is the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup_deps.sh >&2

lock=requirements/pypi.txt
cache=${QAT_CACHE_DIR:-$HOME/.cache/qat}
key=$(sha256sum "$lock" | cut -c1-16)
venv=${QAT_PYPI_VENV:-$cache/venv-pypi-$key}
stamp="$venv/.qat-installed-$key"

if [ ! -f "$stamp" ]; then
  echo "setup_pypi: installing $lock into $venv (downloads about 3 GB the first time)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --no-input --progress-bar off --disable-pip-version-check \
    -r "$lock" >"$venv.log" 2>&1 || {
    tail -n 40 "$venv.log" >&2
    echo "setup_pypi: pip install failed, full log in $venv.log" >&2
    exit 1
  }
  touch "$stamp"
  # Venvs of earlier locks are 6 GB each and nothing uses them any more.
  if [ -z "${QAT_PYPI_VENV:-}" ]; then
    find "$cache" -maxdepth 1 -name 'venv-pypi-*' ! -name "venv-pypi-$key*" \
      -exec rm -rf {} + 2>/dev/null || true
  fi
fi
"$venv/bin/python" -c "import torch; print('setup_pypi: torch', torch.__version__)" >&2
echo "$venv"
