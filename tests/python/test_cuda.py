"""CUDA kernels against the plain-PyTorch reference and against the CPU kernels.

Runs only where torch sees a CUDA device (scripts/device_check.sh on the accelerator
machine); on a machine without one the whole module is skipped, since there is no
kernel to run.
"""

import pytest
import torch
from torch import nn

import qat
from conftest import (classify, per_channel_sum, reference_fake_quantize,
                      reference_ste_grad, sample_values)
from helpers import script, sgd_losses

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = [((4, 6, 33, 17), None), ((4, 6, 33, 17), 1), ((4, 6, 33, 17), -1), ((257,), 0),
           ((3, 1, 5), 1), ((0, 6), 1)]


def qparams(shape, axis, quant_min, quant_max, generator):
    channels = 1 if axis is None else shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.1 + 0.01
    zp = torch.randint(quant_min // 2, quant_max // 2 + 1, (channels,), generator=generator)
    return scale, zp.to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_forward_and_ste_gradient_match_the_reference(dtype, shape, axis):
    gen = torch.Generator().manual_seed(7)
    quant_min, quant_max = -128, 127
    scale, zp = qparams(shape, axis, quant_min, quant_max, gen)
    x = sample_values(shape, scale, zp, quant_min, quant_max, axis, gen, dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    xc = x.cuda().requires_grad_()
    y = qat.ops.fake_quantize(xc, scale.cuda(), zp.cuda(), quant_min, quant_max, axis)
    y.backward(g.cuda())
    assert y.device.type == "cuda" and y.dtype == dtype
    assert torch.equal(y.cpu(), reference_fake_quantize(x, scale, zp, quant_min, quant_max, axis))
    assert torch.equal(
        xc.grad.cpu(), reference_ste_grad(g, x, scale, zp, quant_min, quant_max, axis))


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus", "pact", "ewgs"])
@pytest.mark.parametrize("axis", [None, 1])
def test_estimator_gradients_match_the_cpu_kernels(estimator, axis):
    gen = torch.Generator().manual_seed(8)
    shape = (8, 16, 129)
    scale, zp = qparams(shape, axis, -8, 7, gen)
    zp = zp.float()
    x = sample_values(shape, scale, zp, -8, 7, axis, gen, torch.float32)
    g = torch.randn(shape, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device, copy=True).requires_grad_()
        sd = scale.to(device, copy=True).requires_grad_()
        zd = zp.to(device, copy=True).requires_grad_(estimator == "lsq_plus")
        y = qat.ops.fake_quantize(xd, sd, zd, -8, 7, axis, estimator)
        y.backward(g.to(device))
        results.append((y.cpu(), xd.grad.cpu(), sd.grad, zd.grad))
    (y0, dx0, ds0, dz0), (y1, dx1, ds1, dz1) = results
    assert torch.equal(y0, y1)
    assert torch.equal(dx0, dx1)
    if ds0 is None:
        assert ds1 is None
    else:
        torch.testing.assert_close(ds1.cpu(), ds0, rtol=1e-4, atol=1e-4)
    if estimator == "lsq_plus":
        torch.testing.assert_close(dz1.cpu(), dz0, rtol=1e-4, atol=1e-4)


def test_channels_last_keeps_its_layout_on_cuda():
    x = torch.randn(2, 8, 5, 7).cuda().contiguous(memory_format=torch.channels_last)
    scale = torch.rand(8).cuda() * 0.1 + 0.01
    y = qat.ops.fake_quantize(x, scale, torch.zeros(8, dtype=torch.int32).cuda(), -128, 127, 1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(
        y.cpu(), reference_fake_quantize(x.cpu(), scale.cpu(), torch.zeros(8), -128, 127, 1))


def test_per_tensor_qparams_may_stay_on_the_cpu():
    x = torch.randn(100).cuda()
    y = qat.ops.fake_quantize(x, torch.tensor([0.1]), torch.tensor([0]), -128, 127)
    assert torch.equal(y.cpu(), reference_fake_quantize(x.cpu(), 0.1, 0, -128, 127))


def test_pact_scale_gradient_matches_the_clamped_sum_on_cuda():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4096, generator=gen) * 3
    g = torch.randn(4096, generator=gen)
    s = torch.tensor([0.05], device="cuda", requires_grad=True)
    qat.ops.fake_quantize(x.cuda(), s, torch.tensor([0]).cuda(), 0, 15, None, "pact").backward(
        g.cuda())
    _, below, above = classify(x, 0.05, 0, 0, 15)
    expected = per_channel_sum(g * (above.double() * 15), None)
    torch.testing.assert_close(s.grad.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("observer,estimator", [("moving_average", "ste"), ("minmax", "lsq")])
def test_folded_weight_fake_quantize_matches_the_cpu(observer, estimator):
    """fake_quantize_folded (the conv + batch norm weight path) on CUDA against the same
    module on the CPU: outputs, weight and scale gradients, and the observer's buffers,
    with negative and tiny factors among the channels."""
    gen = torch.Generator().manual_seed(10)
    spec = qat.QuantSpec(observer=observer, estimator=estimator, symmetric=True,
                         per_channel=True, axis=0)
    weight = torch.randn(6, 4, 3, 3, generator=gen)
    factor = torch.tensor([0.5, -2.0, 1.0, 3e-3, -0.7, 1.25])
    g = torch.randn(6, 4, 3, 3, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        fq = qat.FakeQuantize(spec).to(device)
        w = weight.to(device, copy=True).requires_grad_()
        f = factor.to(device)
        for _ in range(3):
            w.grad = None
            out = fq.fake_quantize_folded(w, f)
            out.backward(g.to(device))
        assert out.device.type == device
        state = {k: v.cpu() for k, v in fq.state_dict().items() if isinstance(v, torch.Tensor)}
        scale_grad = None if fq.scale.grad is None else fq.scale.grad.cpu()
        results.append((out.detach().cpu(), w.grad.cpu(), scale_grad, state))
    (y0, dw0, ds0, s0), (y1, dw1, ds1, s1) = results
    step = (s0["scale"] / factor.abs()).reshape(-1, 1, 1, 1)
    # Same integers; a division by |f| may round the last float bit differently.
    assert ((y1 - y0).abs() / step).max() <= 1e-3
    assert (dw0 == dw1).float().mean() >= 0.999
    if ds0 is not None:
        torch.testing.assert_close(ds1, ds0, rtol=1e-4, atol=1e-5)
    for key in s0:
        torch.testing.assert_close(s1[key], s0[key], rtol=1e-6, atol=0, msg=key)


def _small_cnn():
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_prepared_model_trains_on_cuda_as_on_the_cpu():
    """A prepared conv + batch norm model trained a few SGD steps on CUDA gives the CPU's
    losses (TF32 off, so that both devices multiply in float32), and its scripted copy
    runs on CUDA with the same outputs as Python."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 3, 12, 12, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    losses = {}
    models = {}
    for device in ("cpu", "cuda"):
        model = qat.prepare(_small_cnn()).to(device)
        losses[device] = sgd_losses(model, x.to(device), y.to(device), steps=5, lr=0.05)
        models[device] = model
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]),
                               rtol=1e-3, atol=1e-4)
    assert losses["cuda"][-1] < losses["cuda"][0]
    for model in models.values():
        # Observers run in eval mode too (as PyTorch's do); freeze the qparams to compare.
        qat.disable_observer(model)
        model.eval()
    gpu = models["cuda"]
    scripted = script(gpu)
    with torch.no_grad():
        expected = gpu(x.cuda())
        assert torch.equal(scripted(x.cuda()), expected)
        # The eval outputs agree across devices to within two output quantization steps
        # (a rounding tie that falls differently in one layer moves the next ones by one).
        head_step = _output_fake_quantize(gpu).scale.max().item()
        assert (expected.cpu() - models["cpu"](x)).abs().max() <= 2 * head_step + 1e-5


def _output_fake_quantize(model):
    """The FakeQuantize module the graph calls last: the one on the model's output."""
    modules = dict(model.named_modules())
    calls = [modules[node.target] for node in model.graph.nodes
             if node.op == "call_module" and isinstance(modules[node.target], qat.FakeQuantize)]
    return calls[-1]
