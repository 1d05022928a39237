"""A prepared model under torch.compile (PyTorch 2): qat's operators run as graph breaks
(they have no fake-tensor implementation for the compiler to trace), the rest is compiled,
and training computes what eager training computes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.export import load

from helpers import steps_apart

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"),
                                reason="torch.compile is PyTorch 2's; Debian's 1.13 has none")

LSQ = qat.Config(
    weight=qat.QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0, observer="minmax",
                         estimator="lsq"),
    activation=qat.QuantSpec(bits=8, observer="moving_average", estimator="lsq"))


class _Net(nn.Module):
    """Each kind of qat operator on the training path: conv + batch norm (the folded
    weight), its ReLU6 (a clamping fixed-range quantizer), a plain conv, a sigmoid (fixed
    qparams), an add, and Linear (its blocked fake-quantized matmul)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu6(self.bn(self.conv(x)))
        x = x + torch.sigmoid(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _train(model, steps, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("config", [None, LSQ], ids=["int8", "lsq"])
def test_compiled_training_computes_what_eager_training_computes(config, tmp_path):
    """aot_eager compiles the graph between the breaks as PyTorch's own ops, so every loss,
    parameter (learned scales too) and observer state is eager's to the bit, as are the
    eval outputs and the converted integer model (of the compiled model itself too)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
    eager = qat.prepare(_Net(), config) if config is not None else qat.prepare(_Net())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    assert _train(compiled, 4, x, y) == _train(eager, 4, x, y)
    expected = eager.state_dict()
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        else:  # a quantizer's extra state: its spec
            assert value == expected[name], name
    model.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
        # convert, compare and export take the compiled model as they take the one it
        # wraps.
        int_model = qat.convert(eager)
        torch.testing.assert_close(qat.convert(compiled)(x), int_model(x), rtol=0, atol=0)
        assert qat.compare(compiled, int_model, x) == qat.compare(eager, int_model, x)
        qat.export(compiled, tmp_path / "model.pt", x[:2], mobile=False)
        loaded, _ = load(tmp_path / "model.pt")
        torch.testing.assert_close(loaded(x[:2]), int_model(x[:2]), rtol=0, atol=0)


def test_the_default_compiler_trains_a_prepared_model():
    """Inductor (torch.compile's default) fuses and reorders float ops, so its losses are
    eager's only to rounding; it trains the model and its eval outputs stay within a
    quantization step or two of eager's."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
    eager = qat.prepare(_Net())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    losses = _train(compiled, 4, x, y)
    expected = _train(eager, 4, x, y)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-3, atol=0)
    model.eval()
    eager.eval()
    with torch.no_grad():
        got, want = compiled(x), eager(x)
    assert steps_apart(eager, want, got).max().item() <= 2
