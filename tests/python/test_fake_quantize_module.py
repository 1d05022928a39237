"""qat.FakeQuantize and qat.calibrate: training steps against numpy references, the
fused and the module path agreeing, the switches, learned-qparam initialization, .to(),
checkpoints mid-training, and DistributedDataParallel with a one-process gloo group."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import qat
from qat import FakeQuantize, QuantSpec
from observer_reference import channel_rows, finite_minmax, reference_qparams
from conftest import reference_fake_quantize, reference_ste_grad
from helpers import free_port


def batches(shape, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + i % 3) + i * 0.1 for i in range(count)]


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Axis 0 with channel runs of 64 values and more: the fused operator's one-pass path; at 1 MiB
# and more (the last shape, its channels starting on and off 32-byte boundaries), its output
# is written around the caches.
@pytest.mark.parametrize("axis,shape", [(None, (8, 5)), (1, (8, 5)), (-1, (3, 4, 6)),
                                        (0, (6, 70)), (0, (4, 3, 5, 5)),
                                        (0, (70, 3, 41, 31))], ids=str)
@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
def test_training_steps_match_reference(axis, shape, observer):
    spec = QuantSpec(observer=observer, averaging_constant=0.2, per_channel=axis is not None,
                     axis=0 if axis is None else axis)
    fq = FakeQuantize(spec)
    running = None
    for x in batches(shape, 5, seed=1):
        x.requires_grad_()
        out = fq(x)
        lo, hi = finite_minmax(channel_rows(x, axis))
        if running is None:
            running = lo, hi
        elif observer == "minmax":
            running = np.minimum(running[0], lo), np.maximum(running[1], hi)
        else:
            running = tuple(r + np.float32(0.2) * (b - r) for r, b in zip(running, (lo, hi)))
        scale, zero_point = reference_qparams(*running, spec.quant_min, spec.quant_max, False)
        np.testing.assert_allclose(fq.scale.numpy(), scale, rtol=1e-6)
        np.testing.assert_array_equal(fq.zero_point.numpy(), zero_point)
        expected = reference_fake_quantize(x, fq.scale, fq.zero_point, spec.quant_min,
                                           spec.quant_max, axis)
        assert torch.equal(out, expected)
        grad = torch.randn_like(x)
        out.backward(grad)
        assert torch.equal(x.grad, reference_ste_grad(grad, x, fq.scale, fq.zero_point,
                                                      spec.quant_min, spec.quant_max, axis))


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("axis,shape", [(None, (6, 4, 5)), (1, (6, 4, 5)), (0, (6, 4, 20))],
                         ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_operator_and_observer_module_agree(monkeypatch, cpu_capability, observer, axis,
                                                  shape, symmetric):
    """The fused operator (used outside torch.distributed; in one pass over a weight whose
    channels are runs of 64 values or more) and the observer module followed by
    fake_quantize (used under it) reach the same state and output, NaN included."""
    spec = QuantSpec(observer=observer, symmetric=symmetric, per_channel=axis is not None,
                     axis=axis or 0, averaging_constant=0.1)
    fused, modular = FakeQuantize(spec), FakeQuantize(spec)
    monkeypatch.setattr(modular, "_uses_fused_op", lambda: False)
    assert fused._uses_fused_op()
    xs = batches(shape, 6, seed=2)
    xs[2][0, 1] = math.nan
    xs[3][:, 2] = math.inf
    empty = list(shape)
    empty[1 if axis == 0 else 0] = 0  # no values, the channels kept
    xs.insert(4, torch.empty(empty))
    for x in xs:
        a, b = fused(x), modular(x)
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num())
    for name in ("scale", "zero_point", "observer.min_val", "observer.max_val"):
        assert torch.equal(fused.state_dict()[name], modular.state_dict()[name]), name


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
def test_depthwise_weight_keeps_its_clamped_positions(cpu_capability, observer):
    """A depthwise conv's 3x3 weight clamps each channel's extreme (one value in nine, far
    more than the one in 64 at which a large tensor's record turns to codes): a tensor this
    small keeps their positions, batch after batch, with the straight-through gradient."""
    spec = QuantSpec(observer=observer, symmetric=True, per_channel=True, axis=0,
                     averaging_constant=0.5)
    fq = FakeQuantize(spec)
    for weight in batches((384, 1, 3, 3), 3, seed=6):
        weight.requires_grad_()
        out = fq(weight)
        assert out.grad_fn.name() == "qat::FakeQuantizeBackward"
        grad = torch.randn_like(weight)
        out.backward(grad)
        args = (fq.scale, fq.zero_point, spec.quant_min, spec.quant_max, 0)
        assert torch.equal(out, reference_fake_quantize(weight.detach(), *args))
        expected = reference_ste_grad(grad, weight.detach(), *args)
        assert torch.equal(weight.grad, expected)
        assert (expected == 0).sum() >= 100  # many clamped, so the route is the one tested


@pytest.mark.parametrize("outlier_channel", [None, 0, 137])
@pytest.mark.parametrize("inner", [1100, 1700], ids=["cached", "streamed"])
def test_one_pass_weight_gradient_across_pieces_and_blocks(cpu_capability, outlier_channel,
                                                           inner):
    """A large weight on the one-pass path: its clamped values are found while it is
    fake-quantized, in pieces of work and blocks of 512 values, or, where a piece holds too
    many (a channel grown 10x past its moving-average range), recomputed as codes; the
    output and the straight-through gradient are right wherever they fall. 160 x 1700 values
    (1.04 MiB) are written around the caches, with gradients and without."""
    spec = QuantSpec(observer="moving_average", averaging_constant=0.01, symmetric=True,
                     per_channel=True, axis=0)
    fq = FakeQuantize(spec)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(160, inner, generator=generator)
    with torch.no_grad():
        fq(weight)
    weight = weight * (1 + 0.05 * torch.rand(160, 1, generator=generator))
    if outlier_channel is not None:
        weight[outlier_channel] *= 10
    # Without gradients first (no clamped positions recorded), then from the same state with.
    state = copy.deepcopy(fq.state_dict())
    with torch.no_grad():
        without_grad = fq(weight)
    assert torch.equal(without_grad, reference_fake_quantize(
        weight, fq.scale, fq.zero_point, spec.quant_min, spec.quant_max, 0))
    fq.load_state_dict(state)
    weight.requires_grad_()
    grad = torch.randn(160, inner, generator=generator)
    out = fq(weight)
    out.backward(grad)
    expected = reference_fake_quantize(weight.detach(), fq.scale, fq.zero_point, spec.quant_min,
                                       spec.quant_max, 0)
    assert torch.equal(out.detach(), expected)
    assert torch.equal(out.detach(), without_grad)
    expected_grad = reference_ste_grad(grad, weight.detach(), fq.scale, fq.zero_point,
                                       spec.quant_min, spec.quant_max, 0)
    assert torch.equal(weight.grad, expected_grad)
    clamped = expected_grad == 0
    assert clamped.any(dim=1).sum() >= 40  # spread over the pieces
    if outlier_channel is not None:
        assert clamped[outlier_channel].float().mean() > 0.5


def test_switches_freeze_and_bypass():
    fq = FakeQuantize(QuantSpec(observer="minmax"))
    x = torch.randn(100)
    fq(x)
    scale = fq.scale.clone()
    fq.disable_observer()
    out = fq(x * 10)
    assert torch.equal(fq.scale, scale)  # frozen
    assert out.abs().max() <= x.abs().max() + scale  # clamped to the frozen range
    fq.disable_fake_quant()
    y = x * 10
    assert fq(y) is y
    fq.enable_observer()
    out = fq(y)
    assert torch.equal(out, y)  # observes, passes through
    assert fq.scale > scale
    assert fq.state_dict()["observer_enabled"].tolist() == [1]
    assert fq.state_dict()["fake_quant_enabled"].tolist() == [0]
    fresh = FakeQuantize(QuantSpec(observer="minmax"))
    fresh.load_state_dict(fq.state_dict())
    assert fresh(y) is not y and torch.equal(fresh(y), y)
    assert int(fresh.fake_quant_enabled) == 0


def test_model_helpers_and_calibrate():
    model = nn.Sequential(nn.Linear(4, 6), FakeQuantize(QuantSpec(observer="minmax")),
                          nn.BatchNorm1d(6), nn.ReLU(),
                          FakeQuantize(QuantSpec(observer="percentile", bits=4)))
    fqs = [model[1], model[4]]
    qat.disable_observer(model)
    assert all(int(m.observer_enabled) == 0 for m in fqs)
    qat.enable_observer(model)
    qat.disable_fake_quant(model)
    assert all(int(m.fake_quant_enabled) == 0 for m in fqs)
    qat.enable_fake_quant(model)
    data = batches((16, 4), 7, seed=3)
    bn_mean = model[2].running_mean.clone()
    model.train()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(
        (int(m.fake_quant_enabled), torch.equal(o, i[0]), torch.is_grad_enabled())))
    calls = []
    choose = model[4].observer.calculate_qparams
    model[4].observer.calculate_qparams = lambda: calls.append(1) or choose()
    assert qat.calibrate(model, [(x, None) for x in data], num_batches=5, progress=False) is model
    assert seen == [(0, True, False)] * 5
    assert len(calls) == 1  # the histogram's range is chosen once, at the end
    del model[4].observer.calculate_qparams
    for fq in fqs:
        scale, zero_point = fq.observer.calculate_qparams()
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point)
    assert model.training and model[2].training
    assert torch.equal(model[2].running_mean, bn_mean)  # ran in eval mode
    assert all(int(m.fake_quant_enabled) == 1 and int(m.observer_enabled) == 1 for m in fqs)
    activations = torch.cat([model[0](x) for x in data[:5]])
    assert model[1].observer.min_val.item() == activations.min().item()
    assert model[1].observer.max_val.item() == activations.max().item()
    # A fake quantizer that was off before calibration stays off; plain tensors, dicts work.
    model[4].disable_fake_quant()
    qat.calibrate(model, data[5:], progress=False)
    qat.calibrate(nn.ModuleDict({"fq": model[1]}).fq, iter(data), progress=False)
    assert int(model[4].fake_quant_enabled) == 0 and int(model[1].fake_quant_enabled) == 1
    with pytest.raises(ValueError, match="num_batches must be None or an integer >= 0, got -1"):
        qat.calibrate(model, data, num_batches=-1)
    # No batch at all, or one tensor (iterated, it would be fed one sample at a time): refused,
    # the switches and training flags restored.
    before = {name: t.clone() for name, t in model.named_buffers()}
    for empty in ([], iter([]), torch.utils.data.DataLoader([])):
        with pytest.raises(ValueError, match="batches gave no batch, so nothing was observed"):
            qat.calibrate(model, empty, progress=False)
    assert qat.calibrate(model, [], num_batches=0, progress=False) is model
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches .* got one "
                                        r"Tensor; pass \[x\] or x.split\(batch_size\)"):
        qat.calibrate(model, data[0], progress=False)
    assert model.training and int(model[4].fake_quant_enabled) == 0
    assert all(torch.equal(t, before[name]) for name, t in model.named_buffers())


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus", "pact"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_qparams_are_initialized_by_the_observer_then_trained(estimator, per_channel):
    spec = QuantSpec(observer="minmax", estimator=estimator, per_channel=per_channel, axis=1,
                     symmetric=estimator == "pact")
    fq = FakeQuantize(spec)
    assert isinstance(fq.scale, nn.Parameter)
    assert isinstance(fq.zero_point, nn.Parameter) == (estimator == "lsq_plus")
    assert not fq._uses_fused_op()
    optimizer = torch.optim.SGD(fq.parameters(), lr=0.01)
    data = batches((32, 3), 6, seed=4)
    # Calibration: fake quantization off, the observer follows every batch.
    qat.calibrate(fq, data[:2], progress=False)
    axis = 1 if per_channel else None
    lo, hi = finite_minmax(np.concatenate([channel_rows(x, axis) for x in data[:2]], axis=1))
    scale, zero_point = reference_qparams(lo, hi, spec.quant_min, spec.quant_max, spec.symmetric)
    np.testing.assert_array_equal(fq.scale.detach().numpy(), scale)
    np.testing.assert_array_equal(fq.zero_point.detach().numpy(), zero_point)
    assert int(fq.observer_enabled) == 1
    # The first training batch is observed once more, then the observer is switched off.
    fq(data[2])
    assert int(fq.observer_enabled) == 0
    lo, hi = finite_minmax(np.concatenate([channel_rows(x, axis) for x in data[:3]], axis=1))
    scale, _ = reference_qparams(lo, hi, spec.quant_min, spec.quant_max, spec.symmetric)
    np.testing.assert_array_equal(fq.scale.detach().numpy(), scale)
    range_after = fq.observer.max_val.clone()
    for step, x in enumerate(data[3:]):
        # Inputs six times wider than the observed range: the learned range must grow.
        optimizer.zero_grad()
        (fq(x * 6) - x * 6).pow(2).mean().backward()
        if step == 0:
            assert (fq.scale.grad != 0).all()
        optimizer.step()
    assert torch.equal(fq.observer.max_val, range_after)  # not observing any more
    assert (fq.scale.detach().numpy() > scale).all()  # learning


def test_to_keeps_qparam_dtypes_and_works_after_half():
    model = nn.Sequential(nn.Linear(4, 4), FakeQuantize(QuantSpec(observer="entropy")),
                          FakeQuantize(QuantSpec(observer="minmax", estimator="lsq_plus")))
    x = torch.randn(64, 4)
    model(x)
    dtypes = {k: v.dtype for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.to("cpu").half()
    assert model[0].weight.dtype == torch.float16
    after = {k: v.dtype for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    dtypes.update({"0.weight": torch.float16, "0.bias": torch.float16})
    assert after == dtypes
    out = model[2](model[1](x.half()))
    assert out.dtype == torch.float16
    model.to(torch.float64)
    assert model[2].scale.dtype == torch.float32
    assert model[1].observer.histogram.dtype == torch.float64


def test_per_channel_scale_unknown_before_any_batch_is_an_error():
    fq = FakeQuantize(QuantSpec(per_channel=True, axis=1)).disable_observer()
    with pytest.raises(RuntimeError, match="per-channel scale is not known yet"):
        fq(torch.randn(2, 3))


def test_extra_repr_shows_bits_qparams_estimator():
    fq = FakeQuantize(QuantSpec(bits=4, symmetric=True, estimator="lsq", observer="minmax"))
    fq(torch.tensor([-2.0, 1.0]))
    text = repr(fq)
    assert "bits=4, signed, symmetric, per_tensor" in text
    assert f"scale={fq.scale.item():.6g}, zero_point=0, estimator=lsq" in text
    assert "observer_enabled=0, fake_quant_enabled=1" in text
    assert "(observer): MinMaxObserver(bits=4" in text


class TinyNet(nn.Module):
    """A linear layer with a per-channel learned weight quantizer and two activation
    quantizers whose channel count (per-channel) is known only after the first batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.weight_fq = FakeQuantize(QuantSpec(bits=4, symmetric=True, per_channel=True,
                                                axis=0, observer="minmax", estimator="lsq"))
        self.act_fq = FakeQuantize(QuantSpec(per_channel=True, axis=1, averaging_constant=0.3))
        self.out_fq = FakeQuantize(QuantSpec(observer="entropy", bits=6))

    def forward(self, x):
        w = self.weight_fq(self.linear.weight)
        y = self.act_fq(nn.functional.linear(x, w, self.linear.bias))
        return self.out_fq(torch.tanh(y))


def test_checkpoint_mid_training_continues_identically():
    data = batches((12, 6), 8, seed=5)
    torch.manual_seed(0)
    a = TinyNet()
    optimizer_a = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.5)

    def step(model, optimizer, x):
        optimizer.zero_grad()
        out = model(x)
        (out - x[:, :5]).pow(2).mean().backward()
        optimizer.step()
        return out.detach()

    for x in data[:4]:
        step(a, optimizer_a, x)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "optimizer": optimizer_a.state_dict()}, buffer)
    buffer.seek(0)

    torch.manual_seed(1)  # a fresh model, other weights
    b = TinyNet()
    assert b.act_fq.scale.numel() == 0 and b.weight_fq.scale.numel() == 0
    checkpoint = torch.load(buffer)
    b.load_state_dict(checkpoint["model"])
    optimizer_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.5)
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    assert int(b.weight_fq.observer_enabled) == 0
    for x in data[4:]:
        assert torch.equal(step(a, optimizer_a, x), step(b, optimizer_b, x))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name


def _prepared_conv_net():
    return qat.prepare(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 6)))


@pytest.mark.parametrize("build, shape", [(TinyNet, (12, 6)), (_prepared_conv_net, (12, 3, 8, 8))],
                         ids=["fake_quantize", "prepared"])
@pytest.mark.parametrize("route", ["module", "state_dict"])
def test_saved_before_the_first_batch_loads_and_trains_like_the_original(build, shape, route):
    # The per-channel state is still empty when saved; a tensor loaded from the file lives in
    # the file's storage, and the first batch must still be able to size it.
    torch.manual_seed(0)
    original = build()
    buffer = io.BytesIO()
    torch.save(original if route == "module" else original.state_dict(), buffer)
    buffer.seek(0)
    if route == "module":
        loaded = torch.load(buffer, weights_only=False)
    else:
        torch.manual_seed(1)  # a fresh model, other weights
        loaded = build()
        loaded.load_state_dict(torch.load(buffer))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.5)
                  for m in (original, loaded)]
    for x in batches(shape, 3, seed=6):
        outputs = []
        for model, optimizer in zip((original, loaded), optimizers):
            optimizer.zero_grad()
            out = model(x)
            out.pow(2).mean().backward()
            optimizer.step()
            outputs.append(out.detach())
        assert torch.equal(*outputs)
    # A GraphModule loaded whole lists its state in another order.
    restored = loaded.state_dict()
    assert sorted(restored) == sorted(original.state_dict())
    for name, p in original.state_dict().items():
        if isinstance(p, torch.Tensor):
            assert p.numel() > 0 and torch.equal(p, restored[name]), name


def test_checkpoint_of_another_shape_or_config_fails_naming_it():
    a = FakeQuantize(QuantSpec(per_channel=True, axis=1))
    a(torch.randn(2, 4))
    b = FakeQuantize(QuantSpec(per_channel=True, axis=1))
    b(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"FakeQuantize: cannot load 'fq.scale': expected shape "
                                           r"\[3\], the checkpoint has \[4\]"):
        nn.ModuleDict({"fq": b}).load_state_dict(nn.ModuleDict({"fq": a}).state_dict())
    with pytest.raises(RuntimeError, match=r"cannot load '_extra_state': the checkpoint was saved "
                                           r"with bits=8, this module has bits=4"):
        FakeQuantize(QuantSpec(bits=4, per_channel=True, axis=1)).load_state_dict(a.state_dict())
    with pytest.raises(RuntimeError, match=r"saved with estimator='ste', this module has "
                                           r"estimator='lsq'"):
        FakeQuantize(QuantSpec(per_channel=True, axis=1, estimator="lsq")).load_state_dict(
            a.state_dict())
    with pytest.raises(RuntimeError, match=r"cannot load '_extra_state': the checkpoint was saved "
                                           r"with observer='moving_average', this module has "
                                           r"observer='mse'"):
        FakeQuantize(QuantSpec(per_channel=True, axis=1, observer="mse")).load_state_dict(
            a.state_dict(), strict=False)


def test_distributed_data_parallel_with_one_process(one_process_group):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), FakeQuantize(QuantSpec(observer="moving_average")),
                          nn.Linear(4, 3),
                          FakeQuantize(QuantSpec(per_channel=True, axis=1, observer="mse")),
                          FakeQuantize(QuantSpec(observer="minmax", estimator="lsq")))
    reference = copy.deepcopy(model)
    model = model.to("cpu")
    assert not model[1]._uses_fused_op()  # statistics go through the observers' reductions
    assert all(b is not None for b in model.buffers())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    for x in batches((16, 5), 4, seed=6):
        for net, optimizer in ((ddp, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            (net(x) - x[:, :3]).pow(2).mean().backward()
            optimizer.step()
    assert model[3].scale.shape == (3,)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("estimator", ["ste", "lsq"])
def test_cuda_module_matches_cpu(observer, estimator):
    spec = QuantSpec(observer=observer, estimator=estimator, per_channel=True, axis=1)
    cpu = FakeQuantize(spec)
    gpu = FakeQuantize(spec).to("cuda")
    for x in batches((64, 4), 4, seed=7):
        a, b = cpu(x), gpu(x.cuda())
        assert b.device.type == "cuda"
        assert torch.equal(b.cpu(), a)
    for key, value in cpu.state_dict().items():
        if isinstance(value, torch.Tensor):
            on_gpu = gpu.state_dict()[key]
            assert on_gpu.device.type == "cuda", key
            assert torch.equal(on_gpu.cpu(), value), key


def test_two_forwards_then_one_backward_use_each_forwards_qparams():
    """Gradient accumulation: the observer rewrites scale and zero point on the second
    forward; the first forward's backward still sees the qparams it used."""
    fq = FakeQuantize(QuantSpec(observer="minmax"))
    a = torch.linspace(-1, 1, 11, requires_grad=True)
    b = torch.linspace(-4, 4, 11, requires_grad=True)
    first = fq(a)
    first_scale = fq.scale.clone()
    second = fq(b * 0.5)
    assert fq.scale.item() != first_scale.item()
    (first.sum() + second.sum()).backward()
    # STE: gradient 1 inside each forward's own clamping range (both ranges hold all
    # of their inputs here).
    torch.testing.assert_close(a.grad, torch.ones(11))
    torch.testing.assert_close(b.grad, torch.full((11,), 0.5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_folded_equals_quantizing_the_scaled_weight(symmetric):
    """fake_quantize_folded(w, f) against fq(w * f) / f computed with PyTorch's own
    per-channel fake quantization on the explicitly scaled weight, with a negative and a
    tiny factor among the channels."""
    torch.manual_seed(0)
    spec = QuantSpec(observer="minmax", symmetric=symmetric, per_channel=True, axis=0)
    fq = FakeQuantize(spec)
    weight = torch.randn(5, 3, 3, 3, requires_grad=True)
    factor = torch.tensor([0.5, -2.0, 1.0, 3e-3, -0.7])
    out = fq.fake_quantize_folded(weight, factor)

    scaled = (weight * factor.reshape(-1, 1, 1, 1)).detach()
    torch.testing.assert_close(fq.observer.min_val, scaled.amin((1, 2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(fq.observer.max_val, scaled.amax((1, 2, 3)), rtol=0, atol=0)
    expected = torch.fake_quantize_per_channel_affine(
        scaled, fq.scale, fq.zero_point, 0, fq.quant_min, fq.quant_max)
    expected = expected / factor.reshape(-1, 1, 1, 1)
    step = (fq.scale / factor.abs()).reshape(-1, 1, 1, 1)
    difference = (out - expected).abs() / step
    # The same integers, but for a rare tie rounded the other way in float32.
    assert difference.max() <= 1.0 + 1e-3
    assert (difference < 1e-3).float().mean() >= 0.99
    out.sum().backward()
    # Straight through where the reference does not clamp (its own STE mask).
    ref_weight = weight.detach().clone().requires_grad_()
    torch.fake_quantize_per_channel_affine(
        ref_weight * factor.reshape(-1, 1, 1, 1), fq.scale, fq.zero_point, 0, fq.quant_min,
        fq.quant_max).div(factor.reshape(-1, 1, 1, 1)).sum().backward()
    assert (weight.grad == ref_weight.grad).float().mean() >= 0.99


@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("channels", [5, 100], ids=["cached", "streamed"])
def test_fake_quantize_folded_in_one_pass_equals_two(cpu_capability, observer, symmetric,
                                                     channels):
    """A contiguous weight whose channels hold 64 values or more is observed and folded in
    one pass over it; a channels-last copy of it takes the two-pass path (tested against
    PyTorch above). Batch after batch, NaN and inf included, with negative and tiny
    factors, both give the same state, output and gradient; 100 x 21 x 11 x 13 values
    (1.15 MiB) are written around the caches."""
    spec = QuantSpec(observer=observer, symmetric=symmetric, per_channel=True, axis=0,
                     averaging_constant=0.3)
    one, two = FakeQuantize(spec), FakeQuantize(spec)
    factor = torch.tensor([0.5, -2.0, 1.0, 3e-3, -0.7]).repeat(channels // 5)
    generator = torch.Generator().manual_seed(4)
    shape = (channels, 8, 3, 3) if channels == 5 else (channels, 21, 11, 13)
    for step in range(4):
        weight = torch.randn(shape, generator=generator) * (1 + step)
        if step == 2:
            weight[1, 0, 0, 0] = math.nan
            weight[3, 2, 1, 1] = -math.inf
        grad = torch.randn(shape, generator=generator)
        a = weight.clone().requires_grad_()
        b = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
        out_a, out_b = one.fake_quantize_folded(a, factor), two.fake_quantize_folded(b, factor)
        assert torch.equal(out_a.isnan(), out_b.isnan())
        assert torch.equal(out_a.nan_to_num(), out_b.nan_to_num())
        out_a.backward(grad)
        out_b.backward(grad)
        assert torch.equal(a.grad, b.grad)
        theirs = two.state_dict()
        for name, value in one.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, theirs[name]), (step, name)


def test_fake_quantize_folded_falls_back_for_histogram_observers():
    torch.manual_seed(0)
    fq = FakeQuantize(QuantSpec(observer="mse", symmetric=True, per_channel=True, bins=64))
    weight = torch.randn(4, 6)
    factor = torch.tensor([1.5, -0.5, 2.0, 0.25])
    out = fq.fake_quantize_folded(weight, factor)
    reference = FakeQuantize(QuantSpec(observer="mse", symmetric=True, per_channel=True,
                                       bins=64))
    expected = reference(weight * factor.reshape(-1, 1)) / factor.reshape(-1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fake_quantize_folded_operator_rejects_a_factor_of_the_wrong_size():
    fq = FakeQuantize(QuantSpec(observer="minmax", symmetric=True, per_channel=True))
    with pytest.raises(RuntimeError, match="factor must hold one value per output channel"):
        torch.ops.qat.fake_quantize_folded(
            torch.randn(4, 3), torch.ones(3), fq.observer.min_val, fq.observer.max_val,
            fq.scale, fq.zero_point, -128, 127)


def test_fake_quantize_folded_learned_scale_gets_the_unfolded_gradient():
    """With a learned (LSQ) scale, the folded path gives the scale the gradient that
    fq(w * f) / f gives it, negative factors included."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=True, per_channel=True, estimator="lsq")
    weight = torch.randn(4, 8)
    factor = torch.tensor([0.5, -2.0, 1.5, -0.3])
    grads = []
    for folded in (True, False):
        fq = FakeQuantize(spec)
        fq(weight * factor.reshape(-1, 1))  # the observer initializes the scale, then stops
        assert not fq.observer_enabled.item()
        out = (fq.fake_quantize_folded(weight, factor) if folded
               else fq(weight * factor.reshape(-1, 1)) / factor.reshape(-1, 1))
        (out * torch.arange(32.0).reshape(4, 8)).sum().backward()
        grads.append((out.detach(), fq.scale.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_learned_scale_survives_two_forwards_before_one_backward():
    """The clamp that keeps a learned scale positive runs every forward; it must not make
    the scale an earlier forward saved look modified in place."""
    torch.manual_seed(0)
    fq = FakeQuantize(QuantSpec(bits=4, estimator="lsq"))
    x = torch.randn(64)
    fq(x)  # the first batch sets the scale from the observer
    (fq(x).sum() + fq(2 * x).sum()).backward()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("width", [40, 80])
def test_fused_forward_counts_every_nonfinite_value(per_channel, width):
    # The fused operator folds the batch's counts (one per channel for a per-channel
    # spec) into the observer's single counter, batch after batch.
    fq = qat.FakeQuantize(qat.QuantSpec(per_channel=per_channel, axis=0, symmetric=True,
                                        signed=True))
    total = 0
    for seed in range(3):
        w = torch.randn(6, width, generator=torch.Generator().manual_seed(seed))
        flat = w.view(-1)
        picks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(10 + seed))
        flat[picks[:seed + 2]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])[:seed + 2]
        total += seed + 2
        fq(w)
        assert fq.observer.nonfinite_count.numel() == 1
        assert int(fq.observer.nonfinite_count) == total
