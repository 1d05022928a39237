"""Every Python example of README.md runs as written, in a fresh interpreter, with small
stand-ins for the names it leaves to the reader (``MyNet``, the batches, the loader); what
an example says it prints is what it prints."""

import re
import subprocess
import sys

import pytest

from conftest import SUBPROCESS_ENV
from helpers import ROOT
from qat import _onnx, _pte

# The names the examples leave to the reader: a small CNN, batches of the example input's
# shape (an ExecuTorch program keeps that shape), a two-batch loader.
PRELUDE = """
import torch
from torch import nn

torch.manual_seed(0)


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.features(x))


example_input = torch.randn(1, 3, 32, 32)
calibration_batches = batches = test_batches = [torch.randn(1, 3, 32, 32) for _ in range(3)]
train_loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
"""

# Each README example by a line only it has.
EXAMPLES = {
    "quick start": "model = MyNet()",
    "operators": "qat.ops.fake_quantize(x, scale, zero_point, -128, 127, estimator=\"lsq\")",
    "estimator registration": "@qat.estimators.register(\"clipped_ste\"",
    "modules": "fq = qat.FakeQuantize(spec)",
    "prepare": "model = torchvision.models.resnet18(weights=None)",
    "convert": "int_model, report = qat.convert(qmodel, return_report=True)",
    "executorch": "qat.export(qmodel, \"model.pte\", example_input)",
    "onnx": "qat.export(qmodel, \"model.onnx\", example_input)",
}


def python_examples():
    """{name: source} of README.md's ```python blocks, each found by its EXAMPLES line."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(),
                        re.S | re.M)
    found = {}
    for name, line in EXAMPLES.items():
        holders = [block for block in blocks if line in block]
        assert len(holders) == 1, f"README: {len(holders)} Python examples hold {line!r}"
        found[name] = holders[0]
    untested = [block.splitlines()[0] for block in blocks if block not in found.values()]
    assert not untested, f"README examples this test does not run: {untested}"
    return found


def run(tmp_path, *names) -> str:
    examples = python_examples()
    code = PRELUDE + "\n".join(examples[name] for name in names)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_start(tmp_path):
    out = run(tmp_path, "quick start")
    assert (tmp_path / "model.ptl").stat().st_size > 0
    assert "'top1_agreement': 1.0" in out


def test_operators_print_what_their_comments_say(tmp_path):
    out = run(tmp_path, "operators", "estimator registration")
    listed = re.search(r"print\(qat\.estimators\.available\(\)\)\s+#\s*(\[.*\])",
                       python_examples()["operators"])
    assert listed, "the README no longer says what qat.estimators.available() prints"
    assert out.splitlines()[0] == listed[1]
    assert "'name': 'pact'" in out.splitlines()[1]


def test_modules(tmp_path):
    out = run(tmp_path, "modules")
    assert out.startswith("FakeQuantize(\n  bits=8, unsigned, affine, per_tensor")


def test_prepare_convert_and_export(tmp_path):
    out = run(tmp_path, "prepare", "convert")
    assert re.search(r"\d+ ops on integer kernels", out)
    assert "'top1_agreement': 1.0" in out
    assert (tmp_path / "model.ptl").stat().st_size > 0


# Real limits: ExecuTorch, ONNX and ONNX Runtime exist only for the PyPI leg's PyTorch
# (requirements/pypi.txt); the other examples run on both legs.
@pytest.mark.skipif(_pte.available() is not None, reason=str(_pte.available()))
def test_executorch(tmp_path):
    run(tmp_path, "prepare", "executorch")
    assert (tmp_path / "model.pte").read_bytes()[4:8] == b"ET12"


@pytest.mark.skipif(_onnx.available() is not None, reason=str(_onnx.available()))
def test_onnx(tmp_path):
    run(tmp_path, "prepare", "onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 0
