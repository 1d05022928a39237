"""torch.ops.qat.fake_quantize inside TorchScript: scripting, saving and loading."""

from typing import Optional

import torch

import qat
from conftest import reference_fake_quantize


@torch.jit.script
def scripted_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           axis: Optional[int], estimator: str) -> torch.Tensor:
    return torch.ops.qat.fake_quantize(x, scale, zero_point, -128, 127, axis, estimator)


def test_scripted_function():
    x = torch.randn(4, 6, 5) * 3
    scale = torch.rand(6) * 0.05 + 0.01
    zero_point = torch.randint(-5, 5, (6,), dtype=torch.int32)
    for axis in (None, 1):
        s = scale[:1] if axis is None else scale
        z = zero_point[:1] if axis is None else zero_point
        out = scripted_fake_quantize(x, s, z, axis, "ste")
        assert torch.equal(out, reference_fake_quantize(x, s, z, -128, 127, axis))
    assert "qat::fake_quantize" in str(scripted_fake_quantize.graph)


def test_scripted_function_backward():
    x = torch.randn(50, requires_grad=True)
    scale = torch.tensor([0.02], requires_grad=True)
    out = scripted_fake_quantize(x, scale, torch.tensor([0]), None, "lsq")
    out.backward(torch.ones_like(out))
    eager_x = x.detach().clone().requires_grad_()
    eager_scale = scale.detach().clone().requires_grad_()
    qat.ops.fake_quantize(eager_x, eager_scale, torch.tensor([0]), -128, 127,
                          estimator="lsq").sum().backward()
    assert torch.equal(x.grad, eager_x.grad)
    assert scale.grad is not None and torch.equal(scale.grad, eager_scale.grad)


class FakeQuant(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.01, 0.1, channels))
        self.register_buffer("zero_point", torch.arange(channels, dtype=torch.int32) - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qat.fake_quantize(x, self.scale, self.zero_point, -8, 7, 1, "lsq",
                                           None, 0.001)


def test_scripted_module_save_and_load(tmp_path):
    module = torch.jit.script(FakeQuant(5))
    x = torch.randn(3, 5, 4, 4)
    expected = module(x)
    assert torch.equal(expected, reference_fake_quantize(
        x, module.scale, module.zero_point, -8, 7, 1))
    path = tmp_path / "fake_quant.pt"
    torch.jit.save(module, str(path))
    loaded = torch.jit.load(str(path))
    assert torch.equal(loaded(x), expected)
    assert torch.equal(loaded.zero_point, module.zero_point)
    # The loaded module still trains its scale.
    loaded(x).sum().backward()
    assert loaded.scale.grad is not None and loaded.scale.grad.abs().sum() > 0
