"""The Python and C++ front ends compute the same integer model: the same float Sequential,
prepared, calibrated on the same batches and exported by qat (Python) and by
qat_cross_front_end (C++, tests/cpp/tools, built with the tests into the build folder) gives
the same quantizer placement, the same qparams and integer weights bit for bit, exported
files whose outputs are bit-identical, and sub-8-bit weights packed alike."""

import importlib
import os
import subprocess
import zipfile

import pytest
import torch
from torch import nn

import qat
from qat.datasets import load_fashion_mnist

from helpers import BUILD_DIR

TOOL = BUILD_DIR / "qat_cross_front_end"
# qat.export is the function; its module holds read_metadata.
read_metadata = importlib.import_module("qat.export").read_metadata


def _conv_bn_relu():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _conv_bn_relu6():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU6())


def _linear_relu():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn():
    """Residual-free: conv-bn-relu, pooling, conv-bn-relu6, pooling and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.MaxPool2d(7), nn.Flatten(),
        nn.Linear(16, 10))


def _standalone_relu6():
    """A ReLU6 that no conv or linear fuses: it requantizes its output in both front ends."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2), nn.ReLU6(),
                         nn.Flatten(), nn.Linear(8 * 14 * 14, 10))


def _linear_sigmoid_tanh():
    """Ops of fixed output range, which get fixed qparams in both front ends."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Sigmoid(), nn.Linear(16, 16),
                         nn.Tanh(), nn.Linear(16, 10))


def _conv1d():
    """A keyword-spotting-style 1-D net on the images' rows as 28 channels: conv-bn-relu,
    pooling, conv-relu, conv-bn-relu6, a transposed conv-relu and a linear head."""
    return nn.Sequential(
        nn.Flatten(1, 2),
        nn.Conv1d(28, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv1d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU6(),
        nn.ConvTranspose1d(32, 16, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 14, 10))


def _conv_transpose():
    """Down and up again (a U-Net's decoder step): a strided conv, a transposed conv with
    output padding, a transposed conv without bias fusing no ReLU, pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1), nn.ReLU6(),
        nn.ConvTranspose2d(8, 4, 2, stride=1, bias=False), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(4 * 7 * 7, 10))


def _grouped_transpose():
    """A grouped transposed conv (one weight scale per output channel of a group, which no
    integer kernel keeps): float in both front ends on its fake-quantized weight, followed by
    a ReLU, between integer convs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2, groups=4), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4 * 7 * 7, 10))


def _embedding():
    """A text model's table (weight-only: indices in, float rows out), a ReLU6 on its float
    rows (it requantizes whatever its input) and a linear head."""
    return nn.Sequential(nn.Embedding(64, 8), nn.ReLU6(), nn.Flatten(), nn.Linear(28 * 8, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def _pool_first():
    """Average pooling on the model's input: the input is quantized where it enters, and
    the pooling requantizes, in both front ends."""
    return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(14 * 14, 10))


def _conv3d():
    """A video-style 3-D net (input: each image as 4 frames of 7 rows): conv-bn-relu,
    max pooling (float in both front ends), conv-bn-relu6, average pooling, a linear head."""
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(8, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU6(),
        nn.AvgPool3d(2), nn.Flatten(), nn.Linear(8 * 7, 10))


def _standalone_bn():
    """Batch norms that no conv folds (one on the model's input, one after a conv's ReLU):
    both requantize, on quantized::batch_norm2d in both front ends."""
    return nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.BatchNorm2d(8), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 10))


def _norms():
    """A layer norm, an ELU, a group norm and a leaky ReLU, each requantizing on its
    quantized kernel in both front ends."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8),
                         nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 32), nn.LayerNorm(32), nn.ELU(0.5),
                         nn.Linear(32, 10))


def _embedding_bag():
    """A bag-of-words model: the mean of each image's row tokens, a linear head."""
    return nn.Sequential(nn.EmbeddingBag(64, 8, mode="mean"), nn.Linear(8, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def _embedding_bag_max():
    """A bag no integer kernel reads as the simulation does, kept float (its table
    fake-quantized) by both front ends: mode max, leaving the blank rows' token out
    (padding index 0)."""
    return nn.Sequential(nn.EmbeddingBag(64, 8, mode="max", padding_idx=0), nn.Linear(8, 16),
                         nn.ReLU(), nn.Linear(16, 10))


def _embedding_max_norm():
    """A table renormalizing the rows it reads (max_norm): both front ends store it with
    every row renormalized, in integers."""
    return nn.Sequential(nn.Embedding(64, 8, max_norm=1.0), nn.ReLU6(), nn.Flatten(),
                         nn.Linear(28 * 8, 16), nn.ReLU(), nn.Linear(16, 10))


def _inputs(name, images):
    """The model's inputs from Fashion-MNIST images: the images; for the embedding models
    one token per image row (its mean brightness in 64 levels); for the 3-D model each image
    as a clip of 4 frames of 7 x 28."""
    if name.startswith("embedding"):
        return (images[:, 0].mean(2) * 63).round().long()
    if name == "conv3d":
        return images.reshape(-1, 1, 4, 7, 28)
    return images


MODELS = {"conv_bn_relu": _conv_bn_relu, "conv_bn_relu6": _conv_bn_relu6,
          "linear_relu": _linear_relu, "cnn": _cnn, "standalone_relu6": _standalone_relu6,
          "linear_sigmoid_tanh": _linear_sigmoid_tanh, "conv1d": _conv1d,
          "conv_transpose": _conv_transpose, "grouped_transpose": _grouped_transpose,
          "embedding": _embedding, "pool_first": _pool_first,
          "conv3d": _conv3d, "standalone_bn": _standalone_bn, "norms": _norms,
          "embedding_bag": _embedding_bag, "embedding_bag_max": _embedding_bag_max,
          "embedding_max_norm": _embedding_max_norm}


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding")
# Each layer type's fields in qat_cross_front_end's layer list, after its lower-case name.
_FIELDS = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _CONV + ("bias",)),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d),
                    _CONV + ("output_padding", "bias", "groups")),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), ("num_features",)),
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d),
                    ("kernel_size",)),
    **dict.fromkeys((nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh), ()),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm"),
    nn.EmbeddingBag: ("num_embeddings", "embedding_dim", "mode", "padding_idx"),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.ELU: ("alpha",),
    nn.LeakyReLU: ("negative_slope",),
}


def _field(module, name):
    """A field as the layer list spells it: a bias as 0 / 1, a size tuple by its first
    value (the models use square sizes), an optional index or norm left out as -1."""
    value = getattr(module, name)
    if name == "bias":
        return int(value is not None)
    if value is None:
        return -1
    return value[0] if isinstance(value, tuple) else value


def _layers(model):
    """The model as qat_cross_front_end's layer list."""
    return "".join(" ".join([type(m).__name__.lower()] +
                            [str(_field(m, f)) for f in _FIELDS[type(m)]]) + "\n"
                   for m in model)


def _float_model(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    # Batch norms with statistics of their own and norms with affine parameters of their
    # own, as after float training: folding and lowering them is part of what both front
    # ends must agree on.
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return model.eval()


def _children_placement(children, fake_quants):
    """(the child each activation FakeQuantize precedes, or "end") in chain order."""
    placement = []
    for i, child in enumerate(children):
        if child in fake_quants:
            following = [c for c in children[i + 1:] if c not in fake_quants]
            placement.append(following[0] if following else "end")
    return placement


def _python_placement(prepared):
    """Python's activation quantizers, read from the prepared graph: the same form."""
    calls = [n for n in prepared.graph.nodes if n.op == "call_module"]
    quantizers = [n.target for n in calls
                  if isinstance(prepared.get_submodule(n.target), qat.FakeQuantize)]
    return quantizers, _children_placement([n.target for n in calls], set(quantizers))


def _qparams(fake_quant):
    return fake_quant.scale.double().flatten(), fake_quant.zero_point.double().flatten()


def _unpack(cpp_values, fixed):
    """[fixed, scales..., zero points...] from the C++ report."""
    values = torch.tensor(cpp_values, dtype=torch.float64)
    assert bool(values[0]) == fixed
    scales, zero_points = values[1:].chunk(2)
    return scales, zero_points


_STORED = ("weight_data", "weight_scale", "weight_zero_point", "bias")


def _stored_weights(path):
    """The integer weights and their qparams as the file stores them, by layer: Python's in
    the layer's submodule ("0.weight_data"), C++'s on the root ("_0_weight_data")."""
    module = torch.jit.load(str(path))
    stored = {}
    for name, buffer in module.named_buffers():
        field = next((f for f in _STORED if name.endswith(f)), None)
        if field is not None:
            layer = name[:-len(field)].strip("._")
            stored.setdefault(layer, {})[field] = buffer
    return module, stored


@pytest.fixture(scope="module")
def fashion():
    images, _ = load_fashion_mnist(train=False)
    return images[:64], images[64:192]


@pytest.mark.parametrize("preset", ["int8", "w4a8"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_python_and_cpp_front_ends_compute_the_same_integer_model(tmp_path, fashion, name,
                                                                  preset):
    assert TOOL.is_file(), (
        f"{TOOL} is missing: it is built with the tests (QAT_BUILD_TESTS=1, scripts/build.sh)")
    calibration, test_x = (_inputs(name, images) for images in fashion)
    batches = list(calibration.split(16))
    example = test_x[:8]
    model = _float_model(name)
    (tmp_path / "layers.txt").write_text(_layers(model))
    # A plain dict: torch::pickle_load cannot rebuild an OrderedDict with its _metadata.
    torch.save(dict(model.state_dict()), tmp_path / "state.pt")
    torch.save({"calibration": batches, "example": example, "test": test_x},
               tmp_path / "data.pt")
    run = subprocess.run(
        [str(TOOL), str(tmp_path / "layers.txt"), str(tmp_path / "state.pt"),
         str(tmp_path / "data.pt"), preset, str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # Our own file (torch::pickle_save tags its types, which weights_only refuses).
    report = torch.load(tmp_path / "report.pt", weights_only=False)

    prepared = qat.prepare(model, getattr(qat.presets, preset)())
    qat.calibrate(prepared, batches)
    python_path = tmp_path / "python.pt"
    qat.export(prepared, python_path, example, mobile=False)

    # Placement: the activation quantizers sit before the same layers, the fixed [0, 6] ones
    # after the same ReLU6s.
    cpp_fake_quants = report["fake_quant"]
    cpp_activation = [c for c in report["children"] if c in cpp_fake_quants]
    py_activation, py_placement = _python_placement(prepared)
    assert _children_placement(report["children"], set(cpp_activation)) == py_placement
    assert len(py_activation) == len(cpp_activation)

    # Qparams bit for bit: activations in chain order, weights by layer name.
    pairs = [(prepared.get_submodule(p), cpp_fake_quants[c])
             for p, c in zip(py_activation, cpp_activation)]
    weight_names = [n for n, m in prepared.named_modules()
                    if n.endswith(".weight_fake_quant") and isinstance(m, qat.FakeQuantize)]
    assert sorted(weight_names) == sorted(n for n in cpp_fake_quants if "." in n)
    pairs += [(prepared.get_submodule(n), cpp_fake_quants[n]) for n in weight_names]
    for python_fq, cpp_values in pairs:
        fixed = isinstance(python_fq, qat.FixedQParamsFakeQuantize)
        cpp_scale, cpp_zero_point = _unpack(cpp_values, fixed)
        scale, zero_point = _qparams(python_fq)
        assert torch.equal(cpp_scale, scale), (python_fq, cpp_scale, scale)
        assert torch.equal(cpp_zero_point, zero_point), (python_fq, cpp_zero_point, zero_point)

    # The simulations agree bit for bit (the C++ layers round their bias to the int32 grid
    # of the integer kernels, as Python's do).
    qat.disable_observer(prepared)
    with torch.no_grad():
        simulation = prepared.eval()(test_x)
    assert torch.equal(report["simulation"], simulation)

    # The files: the same stored integer weights (packed alike below 8 bits), qparams and
    # biases, and bit-identical outputs on data neither front end saw.
    python_file, python_weights = _stored_weights(python_path)
    cpp_file, cpp_weights = _stored_weights(tmp_path / "model.pt")
    assert python_weights.keys() == cpp_weights.keys() and python_weights
    for layer, fields in python_weights.items():
        assert fields.keys() == cpp_weights[layer].keys(), layer
        for field, value in fields.items():
            assert torch.equal(value, cpp_weights[layer][field]), (layer, field)
    with torch.no_grad():
        python_out, cpp_out = python_file(test_x), cpp_file(test_x)
    assert torch.equal(python_out, cpp_out)
    assert torch.equal(cpp_out, qat.convert(prepared)(test_x))
    # The integer model computes what the simulation computed, up to a step of the output.
    output_scale = prepared.get_submodule(py_activation[-1]).scale
    assert ((cpp_out - simulation).abs() <= output_scale * 1.001).float().mean() >= 0.99

    # The same metadata, example input shapes included (`python -m qat bench` reads them),
    # but for the names each front end gives its input quantizer and the torch version
    # string (Python's torch.__version__ has a suffix the C++ headers' TORCH_VERSION lacks).
    def comparable(metadata):
        layers = [{k: v for k, v in layer.items()
                   if not (k == "name" and layer["type"] in ("Quantize", "Requantize"))}
                  for layer in metadata["layers"]]
        return dict(metadata, torch_version=None, layers=layers)

    assert comparable(read_metadata(tmp_path / "model.pt")) == comparable(
        read_metadata(python_path))
    # The weights are stored alike (above): the files differ only in their code and
    # metadata, a few KB whatever the number of weights, and the C++ file is no larger.
    python_size, cpp_size = os.path.getsize(python_path), os.path.getsize(tmp_path / "model.pt")
    print(f"{name} {preset}: Python file {python_size} bytes, C++ file {cpp_size} bytes")
    assert cpp_size <= python_size + 4096, (cpp_size, python_size)
    # Both exports compact the archive alike (qat::detail::compact_archive).
    with zipfile.ZipFile(tmp_path / "model.pt") as cpp, zipfile.ZipFile(python_path) as python:
        for archive in (cpp, python):
            kinds = {i.filename.split("/", 1)[1]: i.compress_type for i in archive.infolist()}
            assert kinds["data.pkl"] == zipfile.ZIP_DEFLATED
            assert not [n for n in kinds if n.endswith(".debug_pkl")]
