"""qat.FakeQuantize.linear (torch.ops.qat.fake_quantized_linear): the weight observed and
fake-quantized block by block with each block's matmul, against float64 references of
F.linear with the fake-quantized weight, the observer state of the plain module path, and
the fallbacks where the blocked path does not apply."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import qat
from qat import FakeQuantize, QuantSpec
from conftest import reference_fake_quantize, reference_ste_grad
from helpers import script

STATE = ("scale", "zero_point", "observer.min_val", "observer.max_val",
         "observer.nonfinite_count")


def weights(rows, columns, steps, seed, outliers=None):
    """A weight as training moves it: each step scaled a little per row; with
    ``outliers`` (rows), those grow 10x at the third step (past a moving-average range,
    so that many of their values clamp)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    for step in range(steps):
        weight = weight * (1 + 0.05 * torch.rand(rows, 1, generator=generator))
        if step == 2 and outliers is not None:
            weight[outliers] *= 10
        yield weight.clone()


def assert_close_to(actual, expected64, magnitude64):
    """``actual`` (float32 sums) within float32 rounding of the float64 ``expected64``:
    a few units of float32 epsilon of ``magnitude64``, the same sums of absolute values."""
    error = (actual.double() - expected64).abs()
    bound = 1e-5 * magnitude64 + 1e-6
    assert (error <= bound).all(), float((error / bound).max())


# 600 x 1100 float32: blocks of 238 output channels (1 MiB), so each of two threads hands
# over more than one block; 8 and 2 x 3 input rows take the blocked path, 160 rows (704 KB)
# the fallback (quantize, then one matmul).
@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("input_shape", [(8,), (2, 3), (160,)], ids=str)
@pytest.mark.parametrize("input_grad", [True, False])
def test_training_steps_match_linear_of_the_fake_quantized_weight(
        cpu_capability, observer, symmetric, input_shape, input_grad):
    spec = QuantSpec(observer=observer, symmetric=symmetric, per_channel=True, axis=0,
                     averaging_constant=0.05)
    blocked, plain = FakeQuantize(spec), FakeQuantize(spec)
    generator = torch.Generator().manual_seed(3)
    for step, w in enumerate(weights(600, 1100, 5, seed=4, outliers=slice(10, 40))):
        x = torch.randn(*input_shape, 1100, generator=generator)
        grad = torch.randn(*input_shape, 600, generator=generator)
        weight = w.clone().requires_grad_()
        inputs = x.clone().requires_grad_(input_grad)
        out = blocked.linear(inputs, weight)
        out.backward(grad)
        plain(w)
        for name in STATE:
            assert torch.equal(blocked.state_dict()[name], plain.state_dict()[name]), (step, name)
        quantized = reference_fake_quantize(w, blocked.scale, blocked.zero_point,
                                            spec.quant_min, spec.quant_max, 0)
        assert out.shape == (*input_shape, 600)
        # The blocked path records its own node; the fallback is F.linear's.
        assert ("ComputedLinear" in out.grad_fn.name()) == (input_shape != (160,))
        q64 = quantized.double()
        assert_close_to(out, x.double() @ q64.T, x.double().abs() @ q64.abs().T)
        rows, grad_rows = x.reshape(-1, 1100).double(), grad.reshape(-1, 600).double()
        weight_grad = reference_ste_grad(grad_rows.T @ rows, w, blocked.scale,
                                         blocked.zero_point, spec.quant_min, spec.quant_max, 0)
        assert_close_to(weight.grad, weight_grad, grad_rows.abs().T @ rows.abs())
        if input_grad:
            assert_close_to(inputs.grad, (grad_rows @ q64).reshape(x.shape),
                            (grad_rows.abs() @ q64.abs()).reshape(x.shape))
        else:
            assert inputs.grad is None
    if observer == "moving_average":
        # The grown rows clamp in about half their values: in the first block more than the
        # clamped positions hold (one value in 64), so the last steps' masks came from codes.
        assert (weight_grad[:238] == 0).double().mean() > 1 / 64


def test_nonfinite_weight_values_are_counted_and_propagate(cpu_capability):
    spec = QuantSpec(observer="minmax", symmetric=True, per_channel=True, axis=0)
    blocked, plain = FakeQuantize(spec), FakeQuantize(spec)
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(300, 1100, generator=generator)
    weight[5, 7] = math.nan
    weight[250, 0] = math.inf
    x = torch.randn(4, 1100, generator=generator)
    out = blocked.linear(x, weight)
    quantized = plain(weight)
    expected = F.linear(x, quantized)
    assert int(blocked.observer.nonfinite_count) == 2
    for name in STATE:
        assert torch.equal(blocked.state_dict()[name], plain.state_dict()[name]), name
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[:, 5].isnan().all()  # inf is clamped to the top level, NaN stays NaN
    # The blocks' matmuls sum in another order than one matmul: compared with float64 sums
    # within float32 rounding of their magnitude.
    finite = ~expected.isnan()
    q64 = quantized.double()
    assert_close_to(out[finite], (x.double() @ q64.T)[finite],
                    (x.double().abs() @ q64.abs().T)[finite])


@pytest.mark.parametrize("case", ["per_tensor", "observer_off", "fake_quant_off", "both_off",
                                  "no_grad", "lsq", "float64"])
def test_fallbacks_equal_linear_of_the_module_output(case):
    """Where the blocked path does not apply, the result is F.linear(x, fq(w)) computed
    the same way (the same kernels, so equal to the bit)."""
    spec = QuantSpec(per_channel=case != "per_tensor", axis=0, symmetric=True,
                     estimator="lsq" if case == "lsq" else "ste")
    blocked, plain = FakeQuantize(spec), FakeQuantize(spec)
    dtype = torch.float64 if case == "float64" else torch.float32
    weight = torch.randn(70, 130, dtype=dtype)
    x = torch.randn(5, 130, dtype=dtype)
    for fq in (blocked, plain):
        fq(weight)  # the first batch sizes (and for lsq initializes) the qparams
        if case in ("observer_off", "both_off"):
            fq.disable_observer()
        if case in ("fake_quant_off", "both_off"):
            fq.disable_fake_quant()
    if case == "no_grad":
        with torch.no_grad():
            assert torch.equal(blocked.linear(x, weight), F.linear(x, plain(weight)))
    else:
        assert torch.equal(blocked.linear(x, weight), F.linear(x, plain(weight)))
    for name in ("scale", "zero_point"):
        assert torch.equal(blocked.state_dict()[name], plain.state_dict()[name]), name


def test_qat_linear_trains_like_its_reference_eager_and_scripted():
    """qat.modules.Linear (its bias on the kernels' grid) in eager mode and scripted: the
    same outputs, gradients and state as F.linear with the module-path weight."""
    torch.manual_seed(0)
    float_linear = torch.nn.Linear(1100, 300)
    eager = qat.modules.Linear.from_float(copy.deepcopy(float_linear))
    plain = FakeQuantize(eager.weight_fake_quant.spec)
    input_scale = torch.tensor([0.02])
    with torch.no_grad():
        # Per-channel state is sized by a batch in Python before scripting.
        eager(torch.randn(8, 1100), input_scale)
        plain(float_linear.weight)
    scripted = script(copy.deepcopy(eager), "`torch.jit.script` is deprecated")
    for _ in range(3):
        x = torch.randn(8, 1100)
        out = eager(x, input_scale)
        script_out = scripted(x, input_scale)
        expected = F.linear(x, plain(float_linear.weight),
                            torch.ops.qat.round_bias(float_linear.bias, input_scale, plain.scale))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, script_out)
        out.sum().backward()
        script_out.sum().backward()
        assert torch.equal(eager.weight.grad, scripted.weight.grad)
    assert torch.equal(eager.weight_fake_quant.scale, plain.scale)


def test_bad_shapes_name_the_argument():
    fq = FakeQuantize(QuantSpec(per_channel=True, axis=0, symmetric=True))
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        torch.ops.qat.fake_quantized_linear(
            torch.randn(2, 4), torch.randn(4), fq.observer.min_val, fq.observer.max_val,
            fq.scale, fq.zero_point, -128, 127)
    with pytest.raises(RuntimeError, match=r"input and weight shapes cannot be multiplied: "
                                           r"input \[2, 5\] ends in 5 values, weight \[3, 4\] "
                                           r"takes in_features = 4"):
        fq.linear(torch.randn(2, 5), torch.randn(3, 4))
