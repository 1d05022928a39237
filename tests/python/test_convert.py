"""qat.convert and qat.compare: the integer model against the QAT simulation it was
converted from, on a Fashion-MNIST CNN trained for real (whole model) and on resnet18 (each
integer op on the simulation's own inputs); the report, scripting and the lite
interpreter, and the refusals."""

import copy
import io
import operator
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qat
from qat import _onnx, _pte
from qat.datasets import load_fashion_mnist

from helpers import (RUN_LITE_MODEL, TORCHVISION_PARITY, calibration_batches, fashion_rgb,
                     per_op_steps, run_python, script, settle_batch_norm, sqnr_db,
                     torchvision_model, train_torchvision_float, train_torchvision_qat)


def test_fashion_mnist_integer_model_matches_the_simulation(fashion_qat_model):
    qmodel, test_x, test_y = fashion_qat_model
    int_model, report = qat.convert(qmodel, return_report=True)
    batches = [test_x[i:i + 1000] for i in range(0, len(test_x), 1000)]
    parity = qat.compare(qmodel, int_model, batches)
    with torch.no_grad():
        accuracy = {name: (m(test_x).argmax(1) == test_y).float().mean().item()
                    for name, m in (("simulation", qmodel), ("integer", int_model))}
    print(f"\nFashion-MNIST test set (10,000): {parity}, accuracy {accuracy}\n{report}")
    assert parity["within_one_step"] >= 0.99
    assert parity["top1_agreement"] >= 0.995
    assert accuracy["simulation"] > 0.6, "the model did learn"
    # Everything but the average pooling runs on integer kernels.
    assert [name.split(" ")[0] for name in report.float] == ["pool"]
    assert len(report.integer) == 7


def test_converted_model_scripts_and_runs_in_the_lite_interpreter(fashion_qat_model, tmp_path):
    from torch.jit.mobile import _load_for_lite_interpreter
    from qat.export import optimize_for_mobile  # without XNNPACK: the frozen module

    qmodel, test_x, _ = fashion_qat_model
    int_model = qat.convert(qmodel)
    x = test_x[:64]
    with torch.no_grad():
        expected = int_model(x)
    scripted = script(int_model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), expected, rtol=0, atol=0)
    mobile = optimize_for_mobile(torch.jit.freeze(scripted.eval()))
    path = str(tmp_path / "model.ptl")
    mobile._save_for_lite_interpreter(path)
    torch.testing.assert_close(_load_for_lite_interpreter(path)(x), expected, rtol=0, atol=0)


def _settled_resnet18():
    """resnet18 with batch-norm statistics settled on random data and calibrated."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    data = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average, as in a trained model
    with torch.no_grad():
        for x in data:
            model(x)
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, data, progress=False)
    return qmodel.eval(), data[0]


def test_each_integer_op_matches_the_simulation_on_its_own_inputs():
    """Every integer op of resnet18, given the simulation's own (quantized) inputs, writes
    the simulation's output to within one step, and almost always exactly: errors that
    compound through a chain are not the ops' own."""
    qmodel, x = _settled_resnet18()
    torch.backends.quantized.engine = "qnnpack"
    qat.disable_observer(qmodel)
    steps = per_op_steps(qmodel, x)
    for name, (largest, off) in steps.items():
        assert largest <= 1.0 + 1e-3, (name, largest)
        assert off <= 0.005, name
    assert len(steps) == 21  # 20 convs (batch norm folded) and fc


def test_the_eval_simulation_writes_the_integer_models_outputs_bit_for_bit():
    """efficientnet_b0 at 32 pixels (depthwise convs, squeeze-excitation pools and SiLU /
    sigmoid in float, residual adds), calibrated on Fashion-MNIST: the integer model's
    outputs equal the eval simulation's, to the bit, on 256 images. Before the layers
    computed their eval outputs as their kernels do (qat.requantize) and the float pools
    summed contiguous tensors as the simulation's do, float32 ties set 8 of the 2560 logits
    apart, by up to 8.4. The stored biases are on the kernels' int32 grid (what FBGEMM, which
    adds a float bias as it is, needs to add what the simulation added)."""
    images, _ = load_fashion_mnist(train=True)
    torch.manual_seed(0)
    model = torchvision_model("efficientnet_b0", 32)
    settle_batch_norm(model, images, fashion_rgb)
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, calibration_batches(images, fashion_rgb), progress=False)
    qat.disable_observer(qmodel)
    qmodel.eval()
    torch.backends.quantized.engine = "qnnpack"
    int_model = qat.convert(copy.deepcopy(qmodel))
    x = fashion_rgb(images[2000:2256])
    with torch.no_grad():
        assert torch.equal(int_model(x), qmodel(x))
    layers = [n for n in qmodel.graph.nodes if "kernel_qparams" in n.kwargs]
    assert len(layers) == 82  # every conv and the classifier compute as their kernels
    for node in layers:
        layer = int_model.get_submodule(node.target)
        input_scale = qmodel.get_submodule(node.kwargs["input_scale"].target.rpartition(".")[0])
        on_grid = torch.ops.qat.round_bias(layer.bias, input_scale.scale, layer.weight_scale)
        assert torch.equal(on_grid, layer.bias), node.target


class _ScaledBranch(nn.Module):
    """A residual branch scaled far below the sum, as ConvNeXt's layer scale is at
    initialization (1e-6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 1e-6))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


def test_an_add_whose_scales_qnnpack_refuses_runs_in_float_as_the_simulation_adds(
        tmp_path, monkeypatch):
    """qnnpack's add refuses inputs whose scale over the output's is outside [2^-14, 2^8)
    (the converted model failed on its first run, and export blamed the example input):
    such an add stays in float, listed in the report, and gives the simulation's outputs
    bit for bit, in memory and from the .ptl."""
    torch.manual_seed(0)
    qmodel = qat.prepare(_ScaledBranch())
    x = torch.randn(2, 4, 8, 8)
    qat.calibrate(qmodel, [x], progress=False)
    qmodel.eval()
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target in
            (operator.add, torch.add)]
    assert len(adds) == 1
    int_model, report = qat.convert(qmodel, return_report=True)
    # The layer scale's product (a parameter times a tensor) is a float op already.
    assert [name.split(" ")[0] for name in report.float] == ["mul", adds[0].name]
    with torch.no_grad():
        expected = qmodel(x)
        torch.testing.assert_close(int_model(x), expected, rtol=0, atol=0)
    path = str(tmp_path / "model.ptl")
    qat.export(qmodel, path, x)
    from torch.jit.mobile import _load_for_lite_interpreter
    with torch.no_grad():
        torch.testing.assert_close(_load_for_lite_interpreter(path)(x), expected, rtol=0, atol=0)
    # Given to the kernel anyway, the add fails on the first run: export says a kernel
    # refused the integer model (the QAT model runs on the same input), not that the input
    # does not fit, and leaves the QAT model's state as it was.
    monkeypatch.setattr(qat.quantized.Add, "takes", staticmethod(lambda *scales: True))
    state = {k: v.clone() for k, v in qmodel.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match=r"the integer model fails on the example input "
                                           r"\(\[2, 4, 8, 8\]\), on which the QAT model runs"):
        qat.export(qmodel, str(tmp_path / "refused.ptl"), x)
    assert not (tmp_path / "refused.ptl").exists()
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in state.items())


def test_transposed_convs_compute_as_their_kernels_too():
    """A conv, a transposed conv (stride 2, output padding) and a 1x1 conv, each computing
    its eval output as its qnnpack kernel does: the integer model's outputs to the bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
                          nn.ReLU(), nn.Conv2d(4, 2, 1))
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, [torch.randn(16, 3, 12, 12) for _ in range(3)], progress=False)
    qat.disable_observer(qmodel)
    qmodel.eval()
    assert [n.target for n in qmodel.graph.nodes if "kernel_qparams" in n.kwargs] == \
        ["0", "2", "4"]
    torch.backends.quantized.engine = "qnnpack"
    int_model = qat.convert(copy.deepcopy(qmodel))
    x = torch.randn(64, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(int_model(x), qmodel(x))


def test_convert_leaves_the_qat_model_as_it_was(fashion_qat_model):
    qmodel, test_x, _ = fashion_qat_model
    before = copy.deepcopy(qmodel.state_dict())
    qat.convert(qmodel)
    after = qmodel.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key


def test_convert_refuses_models_it_cannot_convert():
    with pytest.raises(TypeError, match="qat.prepare"):
        qat.convert(nn.Linear(2, 2))

    traced = qat.prepare(nn.Sequential(nn.Linear(2, 2)))
    traced(torch.randn(4, 2))
    with pytest.raises(ValueError, match="backend must be one of qnnpack, fbgemm; got 'nope'"):
        qat.convert(traced, backend="nope")
    wide = qat.prepare(nn.Sequential(nn.Linear(2, 2)),
                       qat.Config(activation=qat.QuantSpec(bits=12)))
    wide(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\[0, 4095\]"):
        qat.convert(wide)


class _TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(100, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.embed(tokens))))


def test_dynamic_config_converts_linears_to_dynamic_kernels_without_calibration():
    torch.manual_seed(0)
    qmodel = qat.prepare(_TextClassifier(), qat.presets.w8a8_dynamic())
    int_model, report = qat.convert(qmodel, return_report=True)  # no batch ever ran
    assert isinstance(int_model.fc1, qat.quantized.LinearDynamic)
    assert isinstance(int_model.fc2, qat.quantized.LinearDynamic)
    # The bag's table (weight-only quantization in every config) on its integer kernel.
    assert isinstance(int_model.embed, qat.quantized.EmbeddingBag)
    assert report.float == [] and len(report.integer) == 3
    assert report.integer_weight_share == 1.0
    tokens = torch.randint(0, 100, (16, 12))
    with torch.no_grad():
        simulation = qmodel.eval()(tokens)  # float activations, fake-quantized weights
        got = int_model(tokens)
    # The kernels also quantize the activations at run time, which the simulation does
    # not: close, not equal.
    sqnr = sqnr_db(simulation, got)
    assert sqnr > 30, sqnr
    # The integer weights are those of the simulation.
    weight = int_model.fc1.quantized_weight()
    torch.testing.assert_close(weight.dequantize(),
                               qmodel.fc1.weight_fake_quant(qmodel.fc1.weight), rtol=0, atol=0)
    torch.testing.assert_close(script(int_model)(tokens), got, rtol=0, atol=0)


class _ShuffleBlock(nn.Module):
    """shufflenet's moves (chunk, channel shuffle through sizes, view and transpose) with a
    hardswish."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.fc(x.mean((2, 3)))


def test_data_movement_and_hardswish_run_on_quantized_tensors():
    torch.manual_seed(0)
    qmodel = qat.prepare(_ShuffleBlock())
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    qat.calibrate(qmodel, data, progress=False)
    int_model, report = qat.convert(qmodel, return_report=True)
    assert [name.split(" ")[0] for name in report.float] == ["mean"]
    assert isinstance(int_model.get_submodule("hardswish_int"), qat.quantized.Hardswish)
    parity = qat.compare(qmodel, int_model, data)
    assert parity["within_one_step"] >= 0.99 and parity["max_steps"] <= 2, parity
    torch.testing.assert_close(script(int_model)(data[0]), int_model(data[0]), rtol=0, atol=0)


@pytest.mark.parametrize("name,size,optimizer,float_steps,qat_steps", TORCHVISION_PARITY,
                         ids=[entry[0] for entry in TORCHVISION_PARITY])
def test_torchvision_integer_model_follows_the_simulation(name, size, optimizer, float_steps,
                                                          qat_steps, tmp_path):
    """Trained briefly on Fashion-MNIST (an untrained network is chaotic: one step of
    noise on 0.1% of its inputs moves its own simulation's output to 10-23 dB), batch-norm
    statistics settled, calibrated, QAT fine-tuned: the integer model's SQNR against the
    simulation; where ExecuTorch and ONNX Runtime are installed (the PyPI leg), that of its
    .pte and .onnx too, each run in its runtime (the training is shared: efficientnet_b0's
    takes minutes)."""
    images, labels = load_fashion_mnist(train=True)
    test_images, _ = load_fashion_mnist(train=False)
    gen = torch.Generator().manual_seed(0)
    model, transform = train_torchvision_float(name, size, optimizer, float_steps, images,
                                               labels, gen)
    qmodel = train_torchvision_qat(model, transform, optimizer, qat_steps, images, labels, gen)
    int_model = qat.convert(qmodel)
    batches = [transform(test_images[i:i + 250]) for i in range(0, 500, 250)]
    parity = qat.compare(qmodel, int_model, batches)
    print(f"\n{name}: {parity}")
    # The eval simulation computes as the kernels do (issue 15's targets for the file).
    assert parity["sqnr_db"] >= 30, parity
    assert parity["top1_agreement"] >= 0.99, parity
    if _pte.available() is None:
        qat.export(qmodel, tmp_path / "model.pte", batches[0])
        parity = qat.compare(qmodel, str(tmp_path / "model.pte"), batches)
        print(f"{name} .pte in ExecuTorch: {parity}")
        assert parity["sqnr_db"] >= 30, parity
        assert parity["top1_agreement"] >= 0.95, parity
    if _onnx.available() is None:
        qat.export(qmodel, tmp_path / "model.onnx", batches[0][:1])
        parity = qat.compare(qmodel, str(tmp_path / "model.onnx"), batches)
        print(f"{name} .onnx in ONNX Runtime: {parity}")
        assert parity["sqnr_db"] >= 30, parity
        assert parity["top1_agreement"] >= 0.95, parity
        assert qat.read_metadata(tmp_path / "model.onnx")["onnx"]["layers_float"] == 0


def test_convert_refuses_activations_narrower_than_the_kernels_saturate():
    """4-bit activations clip at 15 steps in the simulation; the integer kernels would only
    saturate at 255, so the model would not compute what it was trained as."""
    torch.manual_seed(0)
    qmodel = qat.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), qat.presets.w4a4())
    qat.calibrate(qmodel, [torch.randn(2, 1, 6, 6)], progress=False)
    with pytest.raises(ValueError, match=r"activations quantized to \[0, 15\] have no integer "
                                         r"kernel.*8-bit activations"):
        qat.convert(qmodel)


class _Untraceable(nn.Module):
    """Convs, a transposed conv, batch norm and a linear around control flow on a tensor,
    which torch.fx cannot trace: qat.prepare takes its eager fallback."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2)
        self.fc = nn.Linear(8, 256)
        self.mid = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if x.mean() > 0.15:
            x = x * 0.5
        x = F.relu(self.up(F.relu(self.conv2(x))))
        return self.head(F.relu(self.mid(F.relu(self.fc(x.mean((2, 3)))))))


def _trained_eager_model():
    """An eager-fallback QAT model, calibrated, trained a few steps, in eval with its
    observers off (the simulation convert follows), and inputs that take both branches."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="eager fallback"):
        qmodel = qat.prepare(_Untraceable())
    x = torch.rand(64, 3, 12, 12)
    qat.calibrate(qmodel, [x[i:i + 16] for i in range(0, 64, 16)], progress=False)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for i in range(4):
        loss = F.cross_entropy(qmodel(x[i * 16:(i + 1) * 16]), torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.disable_observer(qmodel)
    return qmodel.eval(), torch.cat([x[:8], 2 * x[8:16]])


def test_an_eager_fallback_model_converts_to_the_simulation_bit_for_bit():
    qmodel, x = _trained_eager_model()
    with torch.no_grad():
        branches = {bool(F.relu(qmodel.bn1(qmodel.conv1(x[i:i + 1]))).mean() > 0.15)
                    for i in range(len(x))}
    assert branches == {False, True}, "the inputs take both branches"
    int_model, report = qat.convert(qmodel, return_report=True)
    assert type(int_model) is _Untraceable
    for name in ("conv1", "conv2"):
        assert type(getattr(int_model, name)) is qat.quantized.WeightOnlyConv
    for name in ("fc", "mid", "head"):
        assert type(getattr(int_model, name)) is qat.quantized.WeightOnlyLinear
    assert type(int_model.up) is qat.quantized.WeightOnlyConvTranspose
    assert type(int_model.bn1) is nn.BatchNorm2d
    assert not any(isinstance(m, qat.FakeQuantize) for m in int_model.modules())
    with torch.no_grad():
        for i in range(len(x)):  # one input at a time: each takes its own branch
            assert torch.equal(int_model(x[i:i + 1]), qmodel(x[i:i + 1]))
    # The stored integers are the simulation's: round(w / scale), clamped, per channel.
    fq = qmodel.conv2.weight_fake_quant
    scale = fq.scale.reshape(-1, 1, 1, 1)
    expected = torch.clamp(torch.round(qmodel.conv2.weight.detach() / scale), -128, 127)
    assert torch.equal(int_model.conv2.quantized_weight().int_repr().float(), expected)
    assert report.integer == []
    assert report.float == [f"{name} (integer weights, float arithmetic)"
                            for name in ("conv1", "conv2", "up", "fc", "mid", "head")]
    integer = sum(getattr(qmodel, n).weight.numel()
                  for n in ("conv1", "conv2", "up", "fc", "mid", "head"))
    assert report.integer_weights == integer
    assert report.float_weights == {}
    # The QAT model is left as it was.
    assert type(qmodel.conv1) is qat.modules.Conv2d


def _runs_without_qat(qmodel: nn.Module, tmp_path, example, inputs):
    """Exports ``qmodel`` to a .ptl and checks that the file, run on ``inputs`` by a fresh
    process without qat, gives the simulation's outputs bit for bit; returns (path, the
    integer model export returned)."""
    path, saved, outputs = (str(tmp_path / n) for n in ("model.ptl", "x.pt", "y.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        int_model = qat.export(qmodel, path, example)
    # Scripted, not traced: a trace keeps only the branches the example took.
    assert not [w for w in caught if "torch.jit.script failed" in str(w.message)]
    torch.save(inputs, saved)
    run_python(RUN_LITE_MODEL, path, saved, outputs, check=True,
               env=dict(os.environ, PYTHONPATH=""))
    with torch.no_grad():
        assert torch.equal(torch.load(outputs), qmodel(inputs))
    return path, int_model


def _calibrated_eager(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """``model`` through qat.prepare's eager fallback, calibrated on the two halves of
    ``inputs``, in eval with its observers off (the simulation convert follows)."""
    with pytest.warns(UserWarning, match="eager fallback"):
        qmodel = qat.prepare(model)
    half = len(inputs) // 2
    qat.calibrate(qmodel, [inputs[:half], inputs[half:]], progress=False)
    return qat.disable_observer(qmodel.eval())


def _doubled(*tensors):
    # A variable number of arguments: TorchScript cannot compile this.
    return [t * 2 for t in tensors]


class _UntraceableUnscriptable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            (y,) = _doubled(y)
        return y


def test_an_eager_fallback_model_is_never_traced_for_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    qmodel = _calibrated_eager(_UntraceableUnscriptable(), x)
    path = tmp_path / "model.ptl"
    with pytest.raises(RuntimeError, match=r"torch.jit.script failed on a model that took "
                                           r"qat.prepare's eager fallback.*nothing was written"):
        qat.export(qmodel, str(path), x[:1])
    assert not path.exists()


class _UntraceablePadded(nn.Module):
    """Convs padded every way nn.Conv2d pads (strings, an even kernel, padding modes),
    around control flow on a tensor (qat.prepare's eager fallback)."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same")
        # dilation * (kernel - 1) = 3: one more on the right than on the left.
        self.even = nn.Conv2d(8, 8, 4, padding="same", bias=False)
        self.valid = nn.Conv2d(8, 8, 3, padding="valid")
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv1d(8, 4, 3, padding=2, padding_mode="circular")

    def forward(self, x):
        y = self.even(self.same(x))
        if y.mean() > 0:
            y = y * 2
        y = self.reflect(self.valid(y))
        return self.circular(y.mean(2))


def test_an_eager_fallback_conv_keeps_its_padding(tmp_path):
    torch.manual_seed(0)
    # Offsets of both signs: the two convs before the branch are linear in them.
    x = torch.randn(16, 3, 10, 10) + torch.tensor([4.0, -4.0]).repeat(8).view(16, 1, 1, 1)
    qmodel = _calibrated_eager(_UntraceablePadded(), x)
    int_model, report = qat.convert(qmodel, return_report=True)
    names = ("same", "even", "valid", "reflect", "circular")
    for name in names:
        assert type(getattr(int_model, name)) is qat.quantized.WeightOnlyConv, name
    assert report.float_weights == {}
    with torch.no_grad():
        assert len({bool(qmodel.even(qmodel.same(x[i:i + 1])).mean() > 0)
                    for i in range(len(x))}) == 2, "the inputs take both branches"
        for i in range(len(x)):
            assert torch.equal(int_model(x[i:i + 1]), qmodel(x[i:i + 1]))
    _runs_without_qat(qmodel, tmp_path, x[:1], x[:4])


class _StringPadded(nn.Module):
    """Convs padded by strings, as Keras-style code writes them: "same" (plain, dilated with
    a batch norm folded in, and with an even kernel, which pads one more on the right) and
    "valid"."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same")
        self.dilated = nn.Conv2d(8, 8, 5, padding="same", dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.even = nn.Conv2d(8, 8, 4, padding="same")
        self.valid = nn.Conv2d(8, 4, 3, padding="valid")

    def forward(self, x):
        y = torch.relu(self.bn(self.dilated(self.same(x))))
        return self.valid(self.even(y))


def test_string_paddings_that_pad_both_sides_alike_run_on_integer_kernels(tmp_path):
    # A conv with padding="same" or "valid" stayed a float conv in the integer model (a
    # float weight, 4x the size), though the kernels take the sizes the strings mean.
    torch.manual_seed(0)
    x = torch.randn(32, 3, 11, 11)
    qmodel = qat.prepare(_StringPadded())
    qat.calibrate(qmodel, [x[:16], x[16:]], progress=False)
    qat.disable_observer(qmodel.eval())
    int_model, report = qat.convert(qmodel, return_report=True)
    convs = {name: type(getattr(int_model, name)) for name in ("same", "dilated", "valid")}
    assert convs == {name: qat.quantized.Conv2d for name in convs}
    assert (int_model.same.padding, int_model.dilated.padding, int_model.valid.padding) == (
        [1, 1], [4, 4], [0, 0])
    # Asymmetric: no kernel pads so, and the report says it stays float, padded first by
    # the odd one on the right and bottom (a string padding fails torch 1.13's mobile
    # optimizer).
    pad, conv = int_model.even
    assert (type(pad), pad.padding, type(conv), conv.padding) == (
        nn.ConstantPad2d, (0, 1, 0, 1), nn.Conv2d, (1, 1))
    assert set(report.float_weights) == {"even.1"}
    with torch.no_grad():
        assert torch.equal(int_model(x), qmodel(x))
    _runs_without_qat(qmodel, tmp_path, x[:1], x[:4])


class _Resplit(nn.Module):
    """A conv's channels split and put back together in another order: by a slice of the
    split (one node's tuple, not a list in the graph) and part by part."""

    def __init__(self, sliced: bool):
        super().__init__()
        self.sliced = sliced
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        parts = torch.split(self.conv(x), [3, 5], 1)
        y = torch.cat(parts[::-1], 1) if self.sliced else torch.cat([parts[1], parts[0]], 1)
        return self.head(y)


@pytest.mark.parametrize("sliced", [True, False], ids=["slice_of_split", "parts"])
def test_a_cat_of_split_parts_converts(sliced):
    # torch.cat(parts[::-1]) failed convert with "'Node' object is not iterable" (the cat's
    # tensors one node, not a list), and the slice was taken for one quantized tensor.
    torch.manual_seed(0)
    x = torch.randn(16, 3, 6, 6)
    qmodel = qat.prepare(_Resplit(sliced))
    qat.calibrate(qmodel, [x], progress=False)
    qat.disable_observer(qmodel.eval())
    int_model = qat.convert(qmodel)
    with torch.no_grad():
        assert torch.equal(int_model(x), qmodel(x))


class _UntraceableUpsampler(nn.Module):
    """A grouped transposed conv without bias, called with the output size it must give,
    after control flow on a tensor (qat.prepare's eager fallback)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, groups=2, bias=False)

    def forward(self, x):
        y = self.down(x)
        if y.mean() > 0:
            y = y * 2
        return self.up(y, output_size=x.shape[-2:])


def test_an_eager_fallback_transposed_conv_keeps_output_size_and_groups(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    qmodel = _calibrated_eager(_UntraceableUpsampler(), x)
    int_model = qat.convert(qmodel)
    assert type(int_model.up) is qat.quantized.WeightOnlyConvTranspose
    with torch.no_grad():
        # 12 x 12 in, 6 x 6 in the middle: without output_size the transposed conv gives
        # 11 x 11; 11 and 12 are both reachable, so both are asked for.
        for size in ([12, 12], [11, 11]):
            expected = qmodel.up(qmodel.down(x), output_size=size)
            assert expected.shape[-2:] == tuple(size)
            assert torch.equal(int_model.up(int_model.down(x), output_size=size), expected)
        assert torch.equal(int_model(x), qmodel(x))
        with pytest.raises(ValueError, match=r"output_size: spatial size 0 must lie in "
                                             r"\[11, 12\] for this input, got 14"):
            int_model.up(int_model.down(x), output_size=[14, 14])
    _runs_without_qat(qmodel, tmp_path, x[:1], x[:2])


class _UntraceableText(nn.Module):
    """An embedding and a mean embedding bag around control flow on a tensor, which
    torch.fx cannot trace: qat.prepare takes its eager fallback."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 32)
        self.bag = nn.EmbeddingBag(1000, 32, mode="mean")
        self.fc = nn.Linear(64, 4)

    def forward(self, tokens):
        words = self.emb(tokens).mean(1)
        if words.sum() > 0:
            words = words * 2
        return self.fc(torch.cat([words, self.bag(tokens)], 1))


def test_an_eager_fallback_model_keeps_its_tables_as_integers(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (64, 6))
    qmodel = _calibrated_eager(_UntraceableText(), tokens)
    int_model, report = qat.convert(qmodel, return_report=True)
    assert type(int_model.emb) is qat.quantized.Embedding
    assert type(int_model.bag) is qat.quantized.EmbeddingBag
    assert report.integer == ["emb (integer table)", "bag (integer table)"]
    assert report.float == ["fc (integer weights, float arithmetic)"]
    assert report.float_weights == {}
    with torch.no_grad():
        sums = [float(qmodel.emb(tokens[i:i + 1]).mean(1).sum()) for i in range(len(tokens))]
        assert min(sums) < 0 < max(sums), "the inputs take both branches"
        for i in range(len(tokens)):
            assert torch.equal(int_model(tokens[i:i + 1]), qmodel(tokens[i:i + 1]))
    # Each row's integers are round(w * (1 / scale)) clamped to int8 (PyTorch's
    # fake-quantize formula, whose product can be a tie where w / scale is not), stored
    # unsigned (+128).
    for name in ("emb", "bag"):
        layer = getattr(qmodel, name)
        inverse = 1.0 / layer.weight_fake_quant.scale.reshape(-1, 1)
        expected = torch.clamp(torch.round(layer.weight.detach() * inverse), -128, 127) + 128
        assert torch.equal(getattr(int_model, name).table().int_repr().float(), expected)
    # The file runs where qat is not installed and stores the tables as bytes.
    path, _ = _runs_without_qat(qmodel, tmp_path, tokens[:1], tokens[:3])
    float_path = str(tmp_path / "float.ptl")
    torch.jit.freeze(torch.jit.script(_UntraceableText().eval()))._save_for_lite_interpreter(
        float_path)
    assert os.path.getsize(path) < 0.35 * os.path.getsize(float_path)


def test_an_eager_fallback_model_exports_a_file_that_runs_without_qat(tmp_path):
    qmodel, x = _trained_eager_model()
    path, int_model = _runs_without_qat(qmodel, tmp_path, x[:1], x[8:9])
    with torch.no_grad():
        assert torch.equal(int_model(x[8:9]), qmodel(x[8:9]))
    layers = {layer["name"]: layer["type"] for layer in qat.read_metadata(path)["layers"]}
    assert layers == {"conv1": "WeightOnlyConv", "conv2": "WeightOnlyConv",
                      "up": "WeightOnlyConvTranspose", "fc": "WeightOnlyLinear",
                      "mid": "WeightOnlyLinear", "head": "WeightOnlyLinear"}
    # The weights are stored as their integers, not as the float constants freezing would
    # fold the dequantized weights into: the file is far below the float model's.
    float_path = str(tmp_path / "float.ptl")
    float_model = torch.jit.freeze(torch.jit.script(_Untraceable().eval()))
    float_model._save_for_lite_interpreter(float_path)
    assert os.path.getsize(path) < 0.5 * os.path.getsize(float_path)
    # The .pte and .onnx emitters read the graph (where this PyTorch has their runtimes).
    for kind in [k for k, emitter in (("pte", _pte), ("onnx", _onnx))
                 if emitter.available() is None]:
        for model in (qmodel, int_model):
            with pytest.raises(TypeError, match="eager fallback.*export it to .ptl or .pt"):
                qat.export(model, str(tmp_path / f"model.{kind}"), x[:1], format=kind)

