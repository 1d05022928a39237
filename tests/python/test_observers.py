"""qat.observers and qat.QuantSpec: every observer, per tensor and per channel, against
numpy references (observer_reference.py); the EMA, empty batches, NaN / inf, the config's
checks, checkpoints and extra_repr."""

import dataclasses
import io
import math
import re

import numpy as np
import pytest
import torch

import qat
from qat import QuantSpec
from observer_reference import (
    channel_rows,
    finite_minmax,
    reference_fake_quantize,
    reference_qparams,
    reference_rebin,
    entropy_divergences,
    stack_rows,
)

OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
HISTOGRAM_OBSERVERS = ("percentile", "mse", "entropy")
CLASSES = {
    "minmax": qat.observers.MinMaxObserver,
    "moving_average": qat.observers.MovingAverageObserver,
    "percentile": qat.observers.PercentileObserver,
    "mse": qat.observers.MSEObserver,
    "entropy": qat.observers.EntropyObserver,
}
# (axis, shape): per tensor, and per channel along the first, a middle and the last axis.
LAYOUTS = [(None, (4, 5, 6)), (0, (4, 5, 6)), (1, (4, 5, 6)), (-1, (4, 5, 6))]


def spec_for(observer, axis=None, **fields):
    return QuantSpec(observer=observer, per_channel=axis is not None,
                     axis=0 if axis is None else axis, **fields)


def make_batches(shape, count, seed, nonfinite=False):
    """Batches whose scale and offset change from one to the next (and per position, so
    that channels differ), optionally with NaN / +inf / -inf sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        x = torch.randn(shape, generator=gen) * (1 + i) + torch.rand(shape, generator=gen) * i
        if nonfinite:
            x.view(-1)[torch.randint(0, x.numel(), (5,), generator=gen)] = math.nan
            x.view(-1)[i] = math.inf
            x.view(-1)[-1 - i] = -math.inf
        batches.append(x)
    return batches


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# -- QuantSpec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bits", 1, "QuantSpec.bits must be an integer in 2..16, got 1"),
        ("bits", 17, "QuantSpec.bits must be an integer in 2..16, got 17"),
        ("bits", 8.0, "QuantSpec.bits must be an integer in 2..16, got 8.0"),
        ("observer", "histogram", "QuantSpec.observer must be one of minmax, moving_average, "
                                  "percentile, mse, entropy; got 'histogram'"),
        ("estimator", "nope", "QuantSpec.estimator must be one of the registered estimators "
                              "ewgs, lsq, lsq_plus, pact, ste; got 'nope'"),
        ("averaging_constant", 0, "QuantSpec.averaging_constant must be in (0, 1], got 0"),
        ("averaging_constant", -0.5, "QuantSpec.averaging_constant must be in (0, 1], got -0.5"),
        ("averaging_constant", 1.5, "QuantSpec.averaging_constant must be in (0, 1], got 1.5"),
        ("percentile", 0, "QuantSpec.percentile must be in (0, 100], got 0"),
        ("percentile", 100.5, "QuantSpec.percentile must be in (0, 100], got 100.5"),
        ("percentile", -1.0, "QuantSpec.percentile must be in (0, 100], got -1.0"),
        ("bins", 0, "QuantSpec.bins must be an integer in 1..65536, got 0"),
        ("bins", 2**40, "QuantSpec.bins must be an integer in 1..65536, got 1099511627776"),
        ("symmetric", 1, "QuantSpec.symmetric must be True or False, got 1"),
        ("signed", "yes", "QuantSpec.signed must be True, False or None"),
        ("axis", None, "QuantSpec.axis must be an integer, got None"),
    ],
)
def test_spec_rejects_bad_fields_naming_them(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantSpec(**{field: value})
    # Assigned after construction, the same check; the spec keeps its old value.
    spec = QuantSpec()
    with pytest.raises(ValueError, match=re.escape(message)):
        setattr(spec, field, value)
    assert spec == QuantSpec()


def test_spec_accepts_the_bounds_of_each_range():
    for fields in ({"bits": 2}, {"bits": 16}, {"averaging_constant": 1.0},
                   {"averaging_constant": 1e-6}, {"percentile": 100}, {"percentile": 1e-3},
                   {"bins": 1}):
        assert dataclasses.asdict(QuantSpec(**fields)).items() >= fields.items()


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({}, (0, 255)),
        ({"symmetric": True}, (-128, 127)),
        ({"symmetric": True, "signed": False}, (0, 255)),
        ({"signed": True}, (-128, 127)),
        ({"symmetric": True, "narrow_range": True}, (-127, 127)),
        ({"bits": 4}, (0, 15)),
        ({"bits": 4, "signed": True, "narrow_range": True}, (-7, 7)),
        ({"bits": 2, "symmetric": True}, (-2, 1)),
        ({"bits": 16, "signed": True}, (-32768, 32767)),
    ],
)
def test_spec_quant_range(fields, expected):
    spec = QuantSpec(**fields)
    assert (spec.quant_min, spec.quant_max) == expected
    assert spec.is_signed == (expected[0] < 0)


# -- range and qparams ---------------------------------------------------------------------


@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_observer_matches_reference(axis, shape, symmetric):
    spec = spec_for("minmax", axis, symmetric=symmetric)
    observer = qat.observers.MinMaxObserver(spec)
    xs = make_batches(shape, 4, seed=1)
    for x in xs:
        assert observer(x) is x
    lo, hi = finite_minmax(stack_rows(xs, axis))
    np.testing.assert_array_equal(observer.min_val.numpy(), lo)
    np.testing.assert_array_equal(observer.max_val.numpy(), hi)
    scale, zero_point = observer.calculate_qparams()
    ref_scale, ref_zero_point = reference_qparams(lo, hi, spec.quant_min, spec.quant_max,
                                                  symmetric)
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)


@pytest.mark.parametrize("axis,shape", LAYOUTS, ids=str)
@pytest.mark.parametrize("constant", [0.01, 0.3, 1.0])
def test_moving_average_observer_is_an_ema_of_batch_ranges(axis, shape, constant):
    spec = spec_for("moving_average", axis, averaging_constant=constant)
    observer = qat.observers.MovingAverageObserver(spec)
    xs = make_batches(shape, 5, seed=2)
    running = None
    c = np.float32(constant)
    for x in xs:
        observer(x)
        batch = finite_minmax(channel_rows(x, axis))
        # The first batch sets the average; then running += c * (batch - running), in float32.
        if running is None:
            running = batch
        else:
            running = tuple(r + c * (b - r) for r, b in zip(running, batch))
        np.testing.assert_allclose(observer.min_val.numpy(), running[0], rtol=1e-6)
        np.testing.assert_allclose(observer.max_val.numpy(), running[1], rtol=1e-6)
    # Not the plain min/max of everything: the EMA trails the growing ranges.
    if constant < 1:
        assert (observer.max_val.numpy() < finite_minmax(stack_rows(xs, axis))[1]).all()
    scale, zero_point = observer.calculate_qparams()
    ref_scale, ref_zero_point = reference_qparams(
        observer.min_val.numpy(), observer.max_val.numpy(), spec.quant_min, spec.quant_max, False)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)


@pytest.mark.parametrize("bits,signed,symmetric,narrow",
                         [(8, False, False, False), (8, True, True, False), (8, True, True, True),
                          (4, False, True, False), (4, True, False, False), (2, False, False, True),
                          (16, True, False, False), (3, False, True, True)])
def test_qparams_of_degenerate_and_ordinary_ranges(bits, signed, symmetric, narrow):
    """One channel each: all zeros, a positive constant, a negative constant, a tiny range,
    an ordinary range, an all-positive one, and one with no finite value (never seen)."""
    spec = QuantSpec(observer="minmax", bits=bits, signed=signed, symmetric=symmetric,
                     narrow_range=narrow, per_channel=True, axis=1)
    observer = qat.observers.MinMaxObserver(spec)
    x = torch.zeros(3, 7)
    x[:, 1] = 3.0
    x[:, 2] = -2.0
    x[:, 3] = torch.tensor([1e-30, -1e-30, 0.0])
    x[:, 4] = torch.tensor([-1.5, 0.25, 4.0])
    x[:, 5] = torch.tensor([2.0, 5.0, 9.0])
    x[:, 6] = math.nan
    observer(x)
    lo, hi = finite_minmax(channel_rows(x, 1))
    scale, zero_point = observer.calculate_qparams()
    ref_scale, ref_zero_point = reference_qparams(lo, hi, spec.quant_min, spec.quant_max,
                                                  symmetric)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    np.testing.assert_array_equal(zero_point.numpy(), ref_zero_point)
    assert scale[0] == np.finfo(np.float32).eps and scale[6] == 1.0


def test_qparams_match_pytorch_observers_at_8_bits():
    """Anchors the reference: PyTorch's own observers agree at its default 8-bit ranges."""
    from torch.ao.quantization import observer as ao

    xs = make_batches((6, 5, 4), 3, seed=3)
    cases = [
        (ao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
         QuantSpec(observer="minmax")),
        (ao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
         QuantSpec(observer="minmax", symmetric=True)),
        (ao.MovingAverageMinMaxObserver(averaging_constant=0.25, dtype=torch.quint8),
         QuantSpec(observer="moving_average", averaging_constant=0.25)),
        (ao.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8,
                                     qscheme=torch.per_channel_symmetric),
         QuantSpec(observer="minmax", symmetric=True, per_channel=True, axis=1)),
        (ao.PerChannelMinMaxObserver(ch_axis=2, dtype=torch.quint8,
                                     qscheme=torch.per_channel_affine),
         QuantSpec(observer="minmax", per_channel=True, axis=2)),
    ]
    for theirs, spec in cases:
        ours = qat.observers.build(spec)
        for x in xs:
            theirs(x)
            ours(x)
        their_scale, their_zero_point = theirs.calculate_qparams()
        scale, zero_point = ours.calculate_qparams()
        torch.testing.assert_close(scale, their_scale.reshape(scale.shape).float(), rtol=1e-6,
                                   atol=0)
        assert torch.equal(zero_point, their_zero_point.reshape(-1).to(torch.int32)), spec


# -- histogram observers -------------------------------------------------------------------


def centred_values(gen, lo, hi, bins, count):
    """Values at bin centres of [lo, hi] (exact in float32 for these ranges), plus both
    ends, so that the observed range is exactly [lo, hi] and no value sits on an edge."""
    width = (hi - lo) / bins
    index = torch.randint(0, bins, (count,), generator=gen).to(torch.float64)
    values = lo + (index + 0.5) * width
    return torch.cat([torch.tensor([lo, hi], dtype=torch.float64), values]).to(torch.float32)


@pytest.mark.parametrize("observer_name", HISTOGRAM_OBSERVERS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_histogram_counts_and_growth_match_numpy(observer_name, per_channel):
    """First batch over [-32, 32] (bin width 1), second over [-96, 64]: the old counts are
    re-binned in proportion to the overlap, then the new batch is added."""
    bins = 64
    gen = torch.Generator().manual_seed(4)
    channels = 3 if per_channel else 1
    first = torch.stack([centred_values(gen, -32.0, 32.0, bins, 500) for _ in range(channels)])
    second = torch.stack([centred_values(gen, -96.0, 64.0, bins, 300) for _ in range(channels)])
    axis = 0 if per_channel else None
    spec = spec_for(observer_name, axis, bins=bins)
    observer = qat.observers.build(spec)
    if not per_channel:
        first, second = first.reshape(-1), second.reshape(-1)

    observer(first)
    expected = [np.histogram(row, bins=bins, range=(-32, 32))[0]
                for row in channel_rows(first, axis)]
    np.testing.assert_array_equal(observer.histogram.numpy().reshape(channels, bins), expected)
    np.testing.assert_array_equal(observer.hist_min.numpy(), np.full(channels, -32.0))
    np.testing.assert_array_equal(observer.hist_max.numpy(), np.full(channels, 32.0))

    observer(second)
    expected = np.stack([
        reference_rebin(old, -32, 32, -96, 64) + np.histogram(row, bins=bins, range=(-96, 64))[0]
        for old, row in zip(expected, channel_rows(second, axis))])
    histogram = observer.histogram.numpy().reshape(channels, bins)
    np.testing.assert_allclose(histogram, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(histogram.sum(axis=1), np.full(channels, 502 + 302), rtol=1e-12)
    np.testing.assert_array_equal(observer.hist_min.numpy(), np.full(channels, -96.0))
    np.testing.assert_array_equal(observer.hist_max.numpy(), np.full(channels, 64.0))


def test_histogram_grows_from_a_constant_first_batch():
    """A first batch of zeros has a histogram of zero width; widening it keeps its mass at 0."""
    observer = qat.observers.PercentileObserver(bins=100)
    observer(torch.zeros(50))
    observer(torch.tensor([-1.0, 1.0]))
    histogram = observer.histogram.numpy()
    assert histogram.sum() == 52
    # 0 is the lower edge of bin 50 of [-1, 1]: all 50 zeros land there.
    assert histogram[50] == 50 and histogram[0] == 1 and histogram[99] == 1


def laplace_rows(seed, channels, count, outliers=()):
    """Laplace(0, b) rows with b = 1, 2, 3, ... and the given outliers appended to each."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([rng.laplace(0.0, 1.0 + c, count), np.asarray(outliers) * (1 + c)])
            for c in range(channels)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_observer_matches_numpy_percentiles(per_channel, symmetric, percentile):
    x = laplace_rows(5, 2, 100_000, outliers=[-60.0, 45.0])
    axis = 0 if per_channel else None
    spec = spec_for("percentile", axis, symmetric=symmetric, percentile=percentile)
    observer = qat.observers.build(spec)
    for chunk in torch.chunk(x if per_channel else x.reshape(-1), 4, dim=-1):
        observer(chunk)
    lo, hi = (t.numpy() for t in observer.calculate_range())
    width = ((observer.hist_max - observer.hist_min) / spec.bins).numpy()
    for i, row in enumerate(channel_rows(x, axis)):
        if symmetric:
            bound = np.percentile(np.abs(row), percentile)
            expected = (-bound, bound)
        else:
            expected = (min(np.percentile(row, (100 - percentile) / 2), 0.0),
                        max(np.percentile(row, (100 + percentile) / 2), 0.0))
        # The histogram resolves the percentile to a bin; re-binning may smear one more.
        assert abs(lo[i] - expected[0]) <= 2 * width[i], (lo[i], expected)
        assert abs(hi[i] - expected[1]) <= 2 * width[i], (hi[i], expected)


def quantization_mse(row, lo, hi, spec):
    scale, zero_point = reference_qparams(lo, hi, spec.quant_min, spec.quant_max, spec.symmetric)
    return np.mean((reference_fake_quantize(row[None], scale, zero_point, spec.quant_min,
                                            spec.quant_max)[0] - row) ** 2)


def best_mse_by_search(row, spec, steps=60):
    """The least fake-quantization MSE over a grid of clipping ranges (|x| bounds for
    symmetric, (min, max) pairs for affine), each evaluated on the data itself."""
    lo_all, hi_all = float(row.min()), float(row.max())
    best = np.inf
    if spec.symmetric:
        for t in np.linspace(max(-lo_all, hi_all) / steps, max(-lo_all, hi_all), 4 * steps):
            best = min(best, quantization_mse(row, -t, t, spec))
    else:
        for lo in np.linspace(lo_all, 0, steps, endpoint=False):
            for hi in np.linspace(hi_all / steps, hi_all, steps):
                best = min(best, quantization_mse(row, lo, hi, spec))
    return best


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_observer_finds_the_least_squared_error_range(per_channel, symmetric):
    x = laplace_rows(6, 2, 8_000, outliers=[-30.0, 25.0])
    axis = 0 if per_channel else None
    spec = spec_for("mse", axis, symmetric=symmetric, bits=4)
    observer = qat.observers.build(spec)
    observer(x if per_channel else x.reshape(-1))
    lo, hi = (t.numpy() for t in observer.calculate_range())
    for i, row in enumerate(channel_rows(x, axis)):
        row = row.astype(np.float64)
        found = quantization_mse(row, lo[i], hi[i], spec)
        minmax = quantization_mse(row, row.min(), row.max(), spec)
        best = best_mse_by_search(row, spec)
        # The search runs on the data, the observer on its 2048-bin histogram.
        assert found <= 1.05 * best, (found, best)
        assert found < 0.5 * minmax, (found, minmax)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_affine_range_is_no_worse_than_the_symmetric_one(bits):
    """Affine qparams over the symmetric search's best range [-t, t] are among the affine
    search's candidates (to a bin), so the affine range can have no larger error. Many
    samples and three far outliers make the error's landscape one that a greedy search
    gets lost in."""
    x = laplace_rows(0, 1, 1 << 16, outliers=[100.0, -90.0, 80.0]).reshape(-1)
    row = x.numpy().astype(np.float64)
    errors = {}
    for symmetric in (False, True):
        observer = qat.observers.build(QuantSpec(observer="mse", bits=bits, symmetric=symmetric))
        observer(x)
        lo, hi = (t.item() for t in observer.calculate_range())
        errors[symmetric] = quantization_mse(row, lo, hi, QuantSpec(bits=bits))
    assert errors[False] <= 1.02 * errors[True], errors


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_entropy_observer_minimizes_the_kl_divergence(per_channel, bits):
    """The threshold chosen is (near) the least-KL one of an independent TensorRT-style
    search over a histogram of |x| of the same data; it clips the outliers."""
    x = laplace_rows(7, 2, 50_000, outliers=[-40.0, 35.0])
    axis = 0 if per_channel else None
    spec = spec_for("entropy", axis, symmetric=True, bits=bits)
    observer = qat.observers.build(spec)
    for chunk in torch.chunk(x if per_channel else x.reshape(-1), 3, dim=-1):
        observer(chunk)
    lo, hi = (t.numpy() for t in observer.calculate_range())
    levels = (spec.quant_max - spec.quant_min + 1) // 2
    for i, row in enumerate(channel_rows(x, axis)):
        magnitudes = np.abs(row.astype(np.float64))
        assert lo[i] == -hi[i] and hi[i] < 0.5 * magnitudes.max()
        width, divergences = entropy_divergences(magnitudes, spec.bins, levels)
        best = min(divergences.values())
        chosen = divergences[min(divergences, key=lambda k: abs(k - hi[i] / width))]
        # Both searches run on slightly different histograms (the observer's |x| histogram
        # is folded from a signed one, and re-binned as the range grew).
        assert chosen <= best + 0.02 * abs(best) + 1e-4, (hi[i], chosen, best)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("observer_name", OBSERVERS)
@pytest.mark.parametrize("axis,shape", [(None, (6, 5)), (1, (6, 5))], ids=str)
def test_empty_batch_leaves_state_unchanged(observer_name, axis, shape):
    observer = qat.observers.build(spec_for(observer_name, axis))
    fresh = state(observer)
    empty = torch.empty(0, shape[1])
    assert observer(empty) is empty
    assert_state_equal(state(observer), fresh)
    for x in make_batches(shape, 2, seed=7):
        observer(x)
    before = state(observer)
    qparams = observer.calculate_qparams()
    assert observer(empty) is empty
    if axis is None:
        observer(torch.empty(0))
        observer(torch.empty(3, 0, 2))
    assert_state_equal(state(observer), before)
    for a, b in zip(observer.calculate_qparams(), qparams):
        assert torch.equal(a, b)


@pytest.mark.parametrize("observer_name", OBSERVERS)
@pytest.mark.parametrize("axis,shape", [(None, (8, 6)), (1, (8, 6))], ids=str)
def test_nonfinite_values_are_skipped_and_counted(observer_name, axis, shape):
    xs = make_batches(shape, 3, seed=8, nonfinite=True)
    xs[1][:, -1] = math.nan  # per channel: this batch has no finite value in the last channel
    spec = spec_for(observer_name, axis, bins=256, averaging_constant=0.5)
    observer = qat.observers.build(spec)
    for x in xs:
        observer(x)
    rows = stack_rows(xs, axis)
    assert int(observer.nonfinite_count) == int((~np.isfinite(rows)).sum()) > 3 * 7
    if observer_name == "moving_average":
        # A channel without a finite value in a batch keeps its average.
        lo, hi = finite_minmax(channel_rows(xs[0], axis))
        for x in xs[1:]:
            b_lo, b_hi = finite_minmax(channel_rows(x, axis))
            lo = np.where(np.isfinite(b_lo), lo + np.float32(0.5) * (b_lo - lo), lo)
            hi = np.where(np.isfinite(b_hi), hi + np.float32(0.5) * (b_hi - hi), hi)
    else:
        lo, hi = finite_minmax(rows)
    np.testing.assert_allclose(observer.min_val.numpy(), lo, rtol=1e-6)
    np.testing.assert_allclose(observer.max_val.numpy(), hi, rtol=1e-6)
    scale, _ = observer.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    if observer_name in HISTOGRAM_OBSERVERS:
        counts = observer.histogram.reshape(-1, spec.bins).sum(1).numpy()
        # (re-binning splits counts into fractions: the sum may be off in the last bit)
        np.testing.assert_allclose(counts, np.isfinite(rows).sum(1), rtol=1e-12)
    if axis is None:
        # The same state as an observer that was given only the finite values.
        clean = qat.observers.build(spec)
        for x in xs:
            clean(x[torch.isfinite(x)])
        expected = state(clean)
        expected["nonfinite_count"] = observer.nonfinite_count
        assert_state_equal(state(observer), expected)


@pytest.mark.parametrize("observer_name", OBSERVERS)
def test_channel_without_finite_values_gets_default_qparams(observer_name):
    observer = qat.observers.build(QuantSpec(observer=observer_name, per_channel=True, axis=0))
    x = torch.tensor([[1.0, -2.0], [math.nan, math.inf]])
    observer(x)
    observer(x)
    assert observer.min_val.tolist() == [-2.0, math.inf]
    assert observer.max_val.tolist() == [1.0, -math.inf]
    assert int(observer.nonfinite_count) == 4
    scale, zero_point = observer.calculate_qparams()
    assert scale[1] == 1.0 and zero_point[1] == 0
    if observer_name in HISTOGRAM_OBSERVERS:
        assert 0 < scale[0] <= np.float32(3.0) / 255
    else:
        assert scale[0] == np.float32(3.0) / 255


def test_channel_count_and_axis_errors_name_the_problem():
    observer = qat.observers.MinMaxObserver(per_channel=True, axis=1)
    observer(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="the input has 4 channels along axis 1, but the "
                                           r"observed state \('min_val'\) has 3"):
        observer(torch.randn(2, 4))
    with pytest.raises(IndexError, match=r"axis 1 is out of range for an input of shape \[5\]"):
        observer(torch.randn(5))


# -- modules: state, checkpoints, repr -----------------------------------------------------


@pytest.mark.parametrize("observer_name", OBSERVERS)
def test_build_and_buffers(observer_name):
    observer = qat.observers.build(QuantSpec(observer=observer_name))
    assert type(observer) is CLASSES[observer_name]
    assert observer.min_val.tolist() == [math.inf] and observer.max_val.tolist() == [-math.inf]
    per_channel = qat.observers.build(QuantSpec(observer=observer_name, per_channel=True))
    assert all(b.numel() == 0 for n, b in per_channel.named_buffers() if n != "nonfinite_count")
    assert all(t.shape == (0,) for t in per_channel.calculate_qparams())
    assert "min=[], max=[], range=([], []), scale=[], zero_point=[]" in repr(per_channel)
    # A class given a spec for another observer is still itself.
    assert CLASSES[observer_name](QuantSpec(observer="minmax")).spec.observer == observer_name
    with pytest.raises(TypeError, match="spec must be a QuantSpec, got dict"):
        qat.observers.build({"observer": observer_name})


@pytest.mark.parametrize("observer_name", OBSERVERS)
@pytest.mark.parametrize("axis", [None, 1])
def test_checkpoint_into_a_fresh_observer_continues_identically(observer_name, axis):
    spec = spec_for(observer_name, axis, bins=512)
    xs = make_batches((6, 4, 3), 6, seed=9)
    a = qat.observers.build(spec)
    for x in xs[:3]:
        a(x)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = qat.observers.build(spec)
    b.load_state_dict(torch.load(buffer))
    for x in xs[3:]:
        a(x)
        b(x)
    assert_state_equal(state(a), state(b))
    for p, q in zip(a.calculate_qparams(), b.calculate_qparams()):
        assert torch.equal(p, q)


def test_checkpoint_errors_name_the_key_and_the_field():
    a = qat.observers.MinMaxObserver(per_channel=True, axis=1)
    a(torch.randn(2, 3))
    b = qat.observers.MinMaxObserver(per_channel=True, axis=1)
    b(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"MinMaxObserver: cannot load 'min_val': expected "
                                           r"shape \[4\], the checkpoint has \[3\]"):
        b.load_state_dict(a.state_dict())
    per_tensor = qat.observers.MinMaxObserver()
    bad = per_tensor.state_dict()
    bad["max_val"] = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"cannot load 'max_val': expected shape \[1\], the "
                                           r"checkpoint has \[2\]"):
        per_tensor.load_state_dict(bad)
    for field, value, extra in [("bits", 4, {}), ("signed", True, {}),
                                ("symmetric", True, {"signed": False}),
                                ("narrow_range", True, {}), ("per_channel", True, {})]:
        other = qat.observers.MinMaxObserver(**{field: value}, **extra)
        with pytest.raises(RuntimeError, match=f"cannot load '_extra_state': the checkpoint was "
                                               f"saved with {field}={value!r}, this module has "
                                               f"{field}="):
            per_tensor.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="saved with observer='entropy', this module has "
                                           "observer='minmax'"):
        per_tensor.load_state_dict(qat.observers.EntropyObserver().state_dict(), strict=False)
    # A failed load changed nothing.
    assert per_tensor.min_val.tolist() == [math.inf]


def test_half_and_double_keep_the_state_dtypes_and_counts():
    observer = qat.observers.EntropyObserver()
    observer(torch.randn(5000))
    before = state(observer)
    observer.half()
    assert_state_equal(state(observer), before)
    observer.double()
    assert_state_equal(state(observer), before)
    observer(torch.randn(100, dtype=torch.float16))
    assert observer.histogram.sum() == 5100


@pytest.mark.parametrize("observer_name", OBSERVERS)
def test_extra_repr_shows_range_qparams_and_bits(observer_name):
    observer = qat.observers.build(QuantSpec(observer=observer_name, bits=4))
    observer(torch.tensor([-1.0, 0.5, 3.0]))
    text = repr(observer)
    assert text.startswith(type(observer).__name__ + "(bits=4, unsigned, affine, per_tensor")
    assert "min=-1, max=3" in text
    scale, zero_point = observer.calculate_qparams()
    assert f"scale={scale.item():.6g}" in text and f"zero_point={zero_point.item()}" in text
    per_channel = qat.observers.build(QuantSpec(observer=observer_name, symmetric=True,
                                                per_channel=True, axis=0))
    per_channel(torch.arange(12.0).reshape(6, 2) - 3)
    assert "bits=8, signed, symmetric, per_channel(axis=0)" in repr(per_channel)
    assert "min=[-3, -1, 1, 3, ...] (6)" in repr(per_channel)


def test_merge_range_is_the_one_update_of_minmax_and_moving_average():
    # The operator both front ends' observers call, against its definition.
    running_min = torch.tensor([-1.0, 0.5, math.inf])
    running_max = torch.tensor([2.0, 1.0, -math.inf])
    batch_min = torch.tensor([-3.0, math.inf, -0.5])
    batch_max = torch.tensor([1.0, -math.inf, 0.5])
    lo, hi = running_min.clone(), running_max.clone()
    torch.ops.qat.merge_range(lo, hi, batch_min, batch_max)
    assert lo.tolist() == [-3.0, 0.5, -0.5] and hi.tolist() == [2.0, 1.0, 0.5]
    lo, hi = running_min.clone(), running_max.clone()
    torch.ops.qat.merge_range(lo, hi, batch_min, batch_max, 0.25)
    c = np.float32(0.25)
    # channel 0 averages, channel 1 saw nothing finite, channel 2 starts at its first batch
    assert lo.tolist() == [float(np.float32(-1) + c * np.float32(-2)), 0.5, -0.5]
    assert hi.tolist() == [float(np.float32(2) + c * np.float32(-1)), 1.0, 0.5]
    with pytest.raises(RuntimeError, match="running range has 3 entries and the batch's 2"):
        torch.ops.qat.merge_range(lo, hi, batch_min[:2], batch_max[:2])
    with pytest.raises(RuntimeError, match=r"averaging_constant must be in \(0, 1\]"):
        torch.ops.qat.merge_range(lo, hi, batch_min, batch_max, 1.5)


@pytest.mark.parametrize("shape,axis", [((1000,), None), ((37, 70), 0), ((6, 33, 9), 0),
                                        ((5, 3, 41), 1), ((4, 300), 1), ((7,), None)])
@pytest.mark.parametrize("poison", ["none", "nan", "inf", "-inf", "all_nan"])
def test_aminmax_matches_numpy_with_and_without_nonfinite_values(shape, axis, poison):
    # Runs shorter and longer than the kernels' vector blocks, a value out of place at the
    # start, middle or end of a run: the finite fast path must hand each case on intact.
    gen = torch.Generator().manual_seed(sum(shape) + len(poison))
    x = torch.randn(shape, generator=gen) * 3
    flat = x.view(-1)
    positions = [0, flat.numel() // 2, flat.numel() - 1]
    if poison == "all_nan":
        flat[:] = math.nan
    elif poison != "none":
        for p in positions:
            flat[p] = float(poison)
    lo, hi, count = torch.ops.qat.aminmax(x, axis)
    rows = x.numpy().reshape(1, -1) if axis is None else np.moveaxis(x.numpy(), axis, 0).reshape(
        shape[axis], -1)
    for c, row in enumerate(rows):
        finite = row[np.isfinite(row)]
        expected_lo = finite.min() if finite.size else math.inf
        expected_hi = finite.max() if finite.size else -math.inf
        assert (float(lo[c]), float(hi[c])) == (expected_lo, expected_hi)
        assert int(count[c]) == int((~np.isfinite(row)).sum())
