"""Property-based tests: random shapes, axes, ranges, qparams, layouts and values (exact
ties included) against the plain-PyTorch reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qat
from conftest import (
    broadcast_shape,
    classify,
    int_range,
    levels,
    per_channel_sum,
    reference_fake_quantize,
    reference_ste_grad,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# The capability fixture is set once per test function, which is what these tests want.
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw, dtypes=DTYPES):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    if ndim > 0 and draw(st.booleans()):
        shape = shape[:-1] + (draw(st.integers(60, 140)),)  # long runs, vector bodies
    axis = draw(st.none() | st.integers(-ndim, ndim - 1)) if ndim > 0 else None
    bits = draw(st.sampled_from(list(range(2, 9)) + [16]))
    quant_min, quant_max = int_range(bits, draw(st.sampled_from(["signed", "unsigned",
                                                                   "narrow"])))
    channels = 1 if axis is None else shape[axis]
    # Powers of two make (k + 0.5) * scale an exact tie of x * (1/scale).
    scale_values = st.one_of(
        st.integers(-12, 3).map(lambda e: 2.0**e),
        st.floats(2.0**-13, 10.0, width=32),
    )
    scale = torch.tensor(draw(st.lists(scale_values, min_size=channels, max_size=channels)),
                         dtype=torch.float32)
    zero_point = torch.tensor(
        draw(st.lists(st.integers(quant_min, quant_max), min_size=channels, max_size=channels)),
        dtype=torch.int32)
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced"]))
    perm = draw(st.permutations(range(ndim)))
    return dict(shape=shape, axis=axis, quant_min=quant_min, quant_max=quant_max, scale=scale,
                zero_point=zero_point, seed=seed, dtype=dtype, layout=layout, perm=perm)


def make_input(case):
    """Levels over the range and a few beyond, half of them exact ties (level + 0.5) * scale,
    the rest at uniform offsets; in the drawn dtype and memory layout."""
    shape, axis = case["shape"], case["axis"]
    gen = torch.Generator().manual_seed(case["seed"])
    quant_min, quant_max = case["quant_min"], case["quant_max"]
    # A quarter near each end of the range, where clamping starts, the rest anywhere.
    level = torch.randint(quant_min - 3, quant_max + 4, shape, generator=gen)
    near = torch.randint(-3, 4, shape, generator=gen)
    where = torch.rand(shape, generator=gen)
    level = torch.where(where < 0.25, quant_min + near, level)
    level = torch.where(where > 0.75, quant_max + near, level)
    frac = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
    frac = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.full_like(frac, 0.5), frac)
    bshape = [1] * len(shape)
    if axis is not None:
        bshape[axis] = -1
    s = case["scale"].double().view(bshape)
    z = case["zero_point"].double().view(bshape)
    x = ((level.double() - z + frac) * s).to(case["dtype"])
    if case["layout"] == "permuted" and len(shape) > 1:
        perm = case["perm"]
        inverse = [perm.index(d) for d in range(len(shape))]
        x = x.permute(perm).contiguous().permute(inverse)
    elif case["layout"] == "sliced" and len(shape) > 0:
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    return x


def qparams_of(case):
    return (case["scale"], case["zero_point"], case["quant_min"], case["quant_max"],
            case["axis"])


@FUZZ
@given(case=cases())
def test_forward_and_ste_gradient(cpu_capability, case):
    x = make_input(case).requires_grad_()
    scale, zero_point, quant_min, quant_max, axis = qparams_of(case)
    out = qat.ops.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=axis)
    expected = reference_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, expected)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    out.backward(grad)
    assert torch.equal(x.grad,
                       reference_ste_grad(grad, x, scale, zero_point, quant_min, quant_max, axis))


@FUZZ
@given(case=cases(dtypes=[torch.float32, torch.float64]),
       estimator=st.sampled_from(["lsq", "lsq_plus", "pact", "ewgs"]))
def test_learned_gradients(cpu_capability, case, estimator):
    x = make_input(case).requires_grad_()
    scale, zero_point, quant_min, quant_max, axis = qparams_of(case)
    s = scale.clone().requires_grad_(estimator != "ewgs")
    zp = zero_point.float().requires_grad_(estimator == "lsq_plus")
    out = qat.ops.fake_quantize(x, s, zp, quant_min, quant_max, axis=axis, estimator=estimator,
                                grad_scale=1.0, ewgs_delta=0.1)
    assert torch.equal(out, reference_fake_quantize(x, scale, zero_point, quant_min, quant_max,
                                                    axis))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    out.backward(grad)

    v, r, zpm = levels(x, scale, zero_point, axis)
    inside, below, above = classify(x, scale, zero_point, quant_min, quant_max, axis)
    g = grad.to(v.dtype)
    if estimator == "ewgs":
        expected_dx = torch.where(inside, g * (1 + 0.1 * torch.sign(g) * (v - r)),
                                  torch.zeros_like(g))
        torch.testing.assert_close(x.grad, expected_dx.to(x.dtype), rtol=1e-6, atol=1e-6)
        assert s.grad is None
        return
    assert torch.equal(x.grad, torch.where(inside, grad, torch.zeros_like(grad)))
    g, v, r, zpm = g.double(), v.double(), r.double(), zpm.double()
    clamped = g * (below * (quant_min - zpm) + above * (quant_max - zpm))
    terms = clamped if estimator == "pact" else torch.where(inside, g * (r - v), clamped)
    magnitude = per_channel_sum(terms.abs(), axis)
    atol = 1e-6 * magnitude.max().item() if magnitude.numel() else 0.0
    torch.testing.assert_close(s.grad.double(), per_channel_sum(terms, axis),
                               rtol=2.0**-23, atol=atol)
    if estimator == "lsq_plus":
        sm = scale.double().view(broadcast_shape(x, axis))
        zp_terms = torch.where(inside, torch.zeros_like(g), -sm * g)
        torch.testing.assert_close(zp.grad.double(), per_channel_sum(zp_terms, axis),
                                   rtol=2.0**-23, atol=atol)
    else:
        assert zp.grad is None
