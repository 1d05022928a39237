"""Each example of examples/python runs on a small subset and prints sane figures."""

import os
import re
import subprocess
import sys

from conftest import SUBPROCESS_ENV as _ENV
from helpers import ROOT
from qat.mobile import mobile_formats


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "python" / script),
                             *args], env=_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _figure(pattern: str, out: str) -> float:
    match = re.search(pattern, out)
    assert match, f"{pattern!r} not in:\n{out}"
    return float(match[1])


def test_ptq():
    out = _run("ptq.py", "--train-limit", "3000", "--limit", "1000",
               "--calibration-images", "256")
    float_accuracy = _figure(r"float accuracy ([\d.]+)", out)
    int_accuracy = _figure(r"int8 accuracy ([\d.]+)", out)
    assert float_accuracy > 0.6 and int_accuracy > 0.6  # chance: 0.1
    assert abs(float_accuracy - int_accuracy) < 0.02
    assert _figure(r"top-1 agreement ([\d.]+)", out) >= 0.99


def test_dynamic_text():
    out = _run("dynamic_text.py", "--train-limit", "5000", "--limit", "1000")
    assert "4 ops on integer kernels" in out  # the bag and three linears
    assert _figure(r"float accuracy ([\d.]+)", out) > 0.5  # chance: 0.25
    assert _figure(r"dynamic int8 accuracy ([\d.]+)", out) > 0.5
    assert _figure(r"top-1 agreement ([\d.]+)", out) >= 0.98
    assert _figure(r"SQNR ([\d.]+) dB", out) > 30


def test_mixed_precision(tmp_path):
    out = _run("mixed_precision.py", "--float-steps", "100", "--qat-steps", "20",
               "--limit", "1000", "--out", str(tmp_path))
    bits = re.findall(r"\((conv\d|fc)\): .*?FakeQuantize\(\s+bits=(\d+)", out, re.S)
    assert dict(bits) == {"conv1": "8", "conv2": "4", "conv3": "4", "fc": "8"}, bits
    for name in ("mixed", "int8"):
        path = tmp_path / f"{name}.ptl"
        assert _figure(rf"{name}: accuracy ([\d.]+)", out) > 0.6
        assert _figure(rf"{re.escape(str(path))}: (\d+) bytes", out) == path.stat().st_size
    assert _figure(r"mixed / int8 file size ([\d.]+)", out) < 0.85


def test_custom_estimator():
    out = _run("custom_estimator.py", "--steps", "50", "--limit", "1000")
    assert "(range [-1, 1]): [0.1, 1.0, 1.0, 1.0, 0.1]" in out
    assert _figure(r"leaky_ste vs ste: relative difference ([\d.]+)", out) > 0.001
    assert _figure(r"with leaky_ste: ([\d.]+)", out) > 0.3  # chance: 0.1



def test_fashion_mnist_demo(tmp_path):
    """The main job on a subset: every model exported in every mobile format this
    installation runs (.ptl where the lite interpreter exists, .pte where ExecuTorch is
    installed, .onnx where ONNX Runtime is), measured in its runtime and plotted."""
    import json

    out = _run("fashion_mnist_demo.py", "--train-limit", "2000", "--test-limit", "500",
               "--epochs", "1", "--qat-epochs", "1", "--latency-iterations", "5",
               "--out", str(tmp_path))
    tables = json.loads((tmp_path / "results.json").read_text())
    assert list(tables) == mobile_formats()
    expected = {"ptl": ["float", "qat int8", "qat w4a8", "qat auto", "torch int8"],
                "pte": ["float", "qat int8", "qat w4a8", "qat auto"],
                "onnx": ["float", "qat int8", "qat w4a8", "qat auto"]}
    for fmt, rows in tables.items():
        assert list(rows) == expected[fmt], fmt
        assert f"\n.{fmt}: Fashion-MNIST test set (500 images)" in out
        for name, row in rows.items():
            assert row["path"].endswith(f".{fmt}") and os.path.getsize(row["path"]) == row["bytes"]
            assert row["accuracy"] > 0.5 and row["latency_ms"] > 0, name  # chance: 0.1
            assert f"{100 * row['accuracy']:.2f}%" in out
        for name in ("qat int8", "qat w4a8", "qat auto"):
            # Ours: the integer file computes what the simulation does.
            assert rows[name]["top1_agreement"] >= 0.99, (fmt, name)
            assert abs(rows[name]["accuracy"] - rows[name]["simulation_accuracy"]) <= 0.01, \
                (fmt, name)
        assert rows["qat int8"]["bytes"] < 0.6 * rows["float"]["bytes"], fmt
        if fmt != "onnx":  # .onnx stores 4-bit weights as int8 (docs/onnx.md)
            assert rows["qat w4a8"]["bytes"] < 0.9 * rows["qat int8"]["bytes"], fmt
    for plot in ("accuracy_vs_size.png", "sensitivity.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
