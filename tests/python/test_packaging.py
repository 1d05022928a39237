"""`pip install --no-build-isolation .` into a fresh venv that already sees a torch (the way
PyTorch extensions are installed) gives a working qat outside the source tree, built
against that torch, without the C++ tests and examples (the editable install is what
scripts/build.sh uses)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import qat

from helpers import ROOT


def test_pip_install_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    # Without a pip (and setuptools) of its own: the venv sees the torch this suite runs
    # with (Debian's 1.13 or the PyPI leg's) and that folder's other packages, pip and
    # setuptools included, through a .pth file: an environment that has torch.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    venv_site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "torch_env.pth").write_text(torch_site + "\n")
    env = dict(os.environ)
    env.pop("QAT_BUILD_TESTS", None)
    env.pop("QAT_CMAKE_ARGS", None)
    # Its own build folder, so the development build is left alone. It sits in the source
    # tree at build/'s depth: ccache keys on the compile commands' paths relative to the
    # tree (CMakeLists.txt), which are then those of the main build and of every clone, so
    # the compiles are cache hits (in a folder outside the tree they named this clone's
    # path and missed: 4-6 minutes of CI).
    build = ROOT / f".build-packaging-test-{os.getpid()}"
    env["QAT_BUILD_DIR"] = str(build)
    try:
        # No --no-deps: the declared dependencies (torch, numpy, tqdm) must be met by what
        # the environment has, Debian's torch "1.13.0a0" included, with no index to fetch
        # from.
        install = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-build-isolation",
             "--no-index", str(ROOT)],
            cwd=tmp_path, env=env, capture_output=True, text=True)
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        # A plain install builds the library and the module only.
        assert (build / "CMakeCache.txt").is_file()
        assert not (build / "tests" / "cpp" / "qat_tests").exists()
        assert not (build / "fashion_mnist").exists()
    finally:
        shutil.rmtree(build, ignore_errors=True)

    probe = textwrap.dedent("""
        import torch, qat
        assert qat.__file__.startswith(%r), qat.__file__
        y = torch.ops.qat.fake_quantize(
            torch.tensor([0.26, -3.0]), torch.tensor([0.1]), torch.tensor([0]), -8, 7)
        print(qat.__version__, torch.__version__, y.tolist())
    """ % str(venv))
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
        text=True)
    assert run.returncode == 0, run.stderr
    version, torch_version, values = run.stdout.split(" ", 2)
    assert version == qat.__version__
    assert torch_version == torch.__version__  # built against, and run with, that torch
    # 0.26 / 0.1 rounds to level 3; -3.0 / 0.1 clamps to level -8; values in float32.
    assert values.strip() == str([torch.tensor(0.3).item(), torch.tensor(-0.8).item()])
