"""A non-editable `pip install --no-build-isolation .` into a fresh venv gives a working
qat outside the source tree (the editable install is what scripts/build.sh uses)."""

import os
import subprocess
import textwrap
from pathlib import Path

import torch

import qat

ROOT = Path(__file__).resolve().parents[2]


def test_pip_install_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = dict(os.environ)
    # Its own build folder, so the development build in build/ is left alone; ccache
    # makes the compile cheap after the main build.
    env["QAT_BUILD_DIR"] = str(tmp_path / "build")
    env["QAT_CMAKE_ARGS"] = "-DQAT_BUILD_TESTS=OFF -DQAT_BUILD_EXAMPLES=OFF"
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-deps", "--no-index",
         str(ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    probe = textwrap.dedent("""
        import torch, qat
        assert qat.__file__.startswith(%r), qat.__file__
        y = torch.ops.qat.fake_quantize(
            torch.tensor([0.26, -3.0]), torch.tensor([0.1]), torch.tensor([0]), -8, 7)
        print(qat.__version__, y.tolist())
    """ % str(venv))
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
        text=True)
    assert run.returncode == 0, run.stderr
    version, values = run.stdout.split(" ", 1)
    assert version == qat.__version__
    # 0.26 / 0.1 rounds to level 3; -3.0 / 0.1 clamps to level -8; values in float32.
    assert values.strip() == str([torch.tensor(0.3).item(), torch.tensor(-0.8).item()])
