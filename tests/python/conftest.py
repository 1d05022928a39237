"""Shared fixtures and plain-PyTorch references for the qat Python tests.

The references below never call qat: they restate ATen's fake-quantize arithmetic with
ordinary tensor ops, so that qat's kernels can be checked against them bit for bit.
"""

import os
from typing import List, Optional, Tuple

import pytest
import torch

import qat

from helpers import fashion_float_model, fashion_qat_fine_tune

CPU_CAPABILITIES = ("default", "avx2")

# The environment of a subprocess that must run the qat under test: the folder this qat
# was imported from (python/ for the editable install, site-packages for an installed one)
# comes first on its path, whichever way the suite runs.
SUBPROCESS_ENV = dict(
    os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(qat.__file__))))


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Runs the test once per CPU code path of the kernels, restoring the previous one."""
    name = request.param
    if name == "avx2" and qat._C._best_cpu_capability() != "avx2":
        pytest.skip(
            "this processor lacks AVX2/FMA/F16C, so qat cannot select its avx2 kernels "
            f"(best capability: {qat._C._best_cpu_capability()})"
        )
    previous = qat._C._cpu_capability()
    qat._C._set_cpu_capability(name)
    assert qat._C._cpu_capability() == name
    yield name
    qat._C._set_cpu_capability(previous)


def int_range(bits: int, kind: str) -> Tuple[int, int]:
    """(quant_min, quant_max) of a ``bits``-wide signed, unsigned or narrow (symmetric
    signed) range."""
    if kind == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if kind == "unsigned":
        return 0, 2**bits - 1
    if kind == "narrow":
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    raise ValueError(kind)


def all_ranges() -> List[Tuple[int, int]]:
    """Every 2..8-bit signed / unsigned / narrow range, plus signed and unsigned 16-bit."""
    ranges = [int_range(b, k) for b in range(2, 9) for k in ("signed", "unsigned", "narrow")]
    return ranges + [int_range(16, "signed"), int_range(16, "unsigned")]


def broadcast_shape(x: torch.Tensor, axis: Optional[int]) -> List[int]:
    """Shape that lays a per-channel vector along ``axis`` of ``x`` (all ones for per-tensor)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return shape


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def levels(x, scale, zero_point, axis):
    """(v, r, zp): x * (1/scale) in the math dtype, its half-to-even rounding and the zero point.

    As ATen: the reciprocal of the float32 scale is taken in float32, then multiplied.
    A floating-point zero point is rounded half to even.
    """
    m = math_dtype(x.dtype)
    shape = broadcast_shape(x, axis)
    scale32 = torch.as_tensor(scale).detach().to(torch.float32).reshape(-1)
    inv = torch.reciprocal(scale32)
    zp = torch.round(torch.as_tensor(zero_point).detach().to(torch.float64)).reshape(-1)
    v = x.detach().to(m) * inv.to(m).view(shape)
    return v, torch.round(v), zp.to(m).view(shape)


def reference_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None):
    """(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale, math in float32
    (float64 for float64 input), result in x's dtype."""
    m = math_dtype(x.dtype)
    shape = broadcast_shape(x, axis)
    _, r, zp = levels(x, scale, zero_point, axis)
    scale_m = torch.as_tensor(scale).detach().to(torch.float32).reshape(-1).to(m).view(shape)
    q = torch.clamp(r + zp, quant_min, quant_max)
    return ((q - zp) * scale_m).to(x.dtype)


def classify(x, scale, zero_point, quant_min, quant_max, axis=None):
    """Boolean masks (inside, below, above) of where each element's level falls."""
    _, r, zp = levels(x, scale, zero_point, axis)
    q = r + zp
    return (q >= quant_min) & (q <= quant_max), q < quant_min, q > quant_max


def reference_ste_grad(grad, x, scale, zero_point, quant_min, quant_max, axis=None):
    """Straight-through input gradient: grad where the level is inside the range, else 0."""
    inside, _, _ = classify(x, scale, zero_point, quant_min, quant_max, axis)
    return torch.where(inside, grad, torch.zeros_like(grad))


def per_channel_sum(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Sum of ``t`` over all dimensions but ``axis`` (everything for per-tensor), in float64."""
    t = t.to(torch.float64)
    if axis is None:
        return t.sum().reshape(1)
    dims = [d for d in range(t.dim()) if d != axis % t.dim()]
    return t.sum(dim=dims) if dims else t


def sample_values(shape, scale, zero_point, quant_min, quant_max, axis=None, generator=None,
                  dtype=torch.float32, ties=True):
    """Values over the whole range and, for a tenth of them each, up to three levels beyond
    either end, with exact ties
    (level + 0.5) * scale on about a third of the elements (exact when the scale is a power
    of two) and uniform offsets elsewhere (everywhere without ``ties``)."""
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).view(bshape)
    z = torch.as_tensor(zero_point, dtype=torch.float64).reshape(-1).view(bshape)
    level = torch.randint(quant_min, quant_max + 1, shape, generator=generator)
    beyond = torch.randint(1, 4, shape, generator=generator)
    side = torch.rand(shape, generator=generator)
    level = torch.where(side < 0.1, quant_min - beyond, level)
    level = torch.where(side > 0.9, quant_max + beyond, level)
    frac = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    tie = torch.rand(shape, generator=generator) < (1.0 / 3.0 if ties else 0.0)
    frac = torch.where(tie, torch.full_like(frac, 0.5), frac)
    return ((level.to(torch.float64) - z + frac) * s).to(dtype)


@pytest.fixture(scope="session")
def fashion_qat_model():
    """A Fashion-MNIST CNN trained in float, then QAT fine-tuned; the test split (the
    integer-model parity tests of every format share it)."""
    gen = torch.Generator().manual_seed(0)
    model, train_x, train_y, test_x, test_y = fashion_float_model(gen)
    return fashion_qat_fine_tune(model, train_x, train_y, gen), test_x, test_y
