"""Plain functions, classes and paths shared by several test files (fixtures and the
ATen-arithmetic references stay in conftest.py, the observer references in
observer_reference.py). Test files import it as ``from helpers import ...``: pytest puts
this folder on sys.path, as it has no __init__.py."""

import copy
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import qat
from qat.convert import _Converter, _output_step

ROOT = Path(__file__).resolve().parents[2]
# The build folder scripts/build.sh makes (QAT_BUILD_DIR, as in setup.py).
BUILD_DIR = Path(os.environ.get("QAT_BUILD_DIR", ROOT / "build")).resolve()

# PyTorch Mobile runs qnnpack; on x86 a fresh process defaults to fbgemm, whose kernels
# round differently, so a script selects qnnpack as the phone would have it.
LOAD_LITE_MODEL = """
import sys, torch
from torch.jit.mobile import _load_for_lite_interpreter
torch.backends.quantized.engine = "qnnpack"
model = _load_for_lite_interpreter(sys.argv[1])
"""

# Loads the .ptl at argv[1] as LOAD_LITE_MODEL does, runs it on the tensor saved at argv[2]
# and saves the output at argv[3]: the file's own outputs, computed without qat.
RUN_LITE_MODEL = LOAD_LITE_MODEL + """
out = model(torch.load(sys.argv[2]))
assert "qat" not in sys.modules, "the lite model pulled in qat"
torch.save(out, sys.argv[3])
"""


def run_python(code, *args, **kwargs) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter (``python -c``), ``args`` its sys.argv[1:];
    ``kwargs`` go to subprocess.run."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(model, *also_ignore):
    """torch.jit.script(model), quiet about the warnings matching ``also_ignore`` too."""
    with warnings.catch_warnings():
        # torch.fx's GraphModule.__init__ annotates an attribute in a way torch.jit warns
        # about; the attribute is not part of the scripted model.
        warnings.filterwarnings("ignore", message="The TorchScript type system")
        for message in also_ignore:
            warnings.filterwarnings("ignore", message=message)
        return torch.jit.script(model)


def sgd_losses(model, x, y, steps, lr, loss_fn=F.cross_entropy):
    """Losses of ``steps`` plain SGD steps on one batch, each taken before its step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def sqnr_db(reference, approximation) -> float:
    """Signal-to-quantization-noise ratio of ``approximation`` in dB, summed in float64
    (tensors or arrays)."""
    reference = torch.as_tensor(reference).to(torch.float64)
    noise = (reference - torch.as_tensor(approximation).to(torch.float64)).pow(2).sum()
    return 10 * math.log10(reference.pow(2).sum().item() / noise.item())


class FashionNet(nn.Module):
    """A Fashion-MNIST CNN: conv-bn-relu blocks, a residual add, a cat, average pooling and
    a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv4 = nn.Conv2d(32, 32, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        y = F.relu(self.bn3(self.conv3(x)) + x)
        z = torch.cat([y, F.relu(self.bn4(self.conv4(y)))], 1)
        return self.fc(torch.flatten(self.pool(z), 1))


class KeywordNet(nn.Module):
    """A keyword-spotting-style 1-D conv net: Conv1d + BatchNorm1d + ReLU blocks, average
    pooling, a linear head."""

    def __init__(self, padding_mode: str = "zeros"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(8, 16, 3, padding=1, bias=False, padding_mode=padding_mode),
            nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 16, 1, padding_mode=padding_mode))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TextCNN(nn.Module):
    """Most of its weights in an embedding table: tokens -> embedding -> Conv1d -> max over
    time -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.conv = nn.Conv1d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        return self.fc(F.relu(self.conv(x)).amax(2))


class UpNet(nn.Module):
    """Up-sampling with transposed convs (strided, output padding, one without a bias), a
    ReLU after the first, in ``dims`` (1 or 2) dimensions."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        transposed = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        self.down = conv(3, 8, 3, stride=2, padding=1)
        self.up = transposed(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.head = transposed(6, 4, 2, stride=2, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.down(x)))))


class Activations(nn.Module):
    """ELU and leaky ReLU as modules and as functions, between convs, and a linear head
    (for ``size`` x ``size`` inputs)."""

    def __init__(self, size: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.elu = nn.ELU(0.7)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(8 * size * size, 4)

    def forward(self, x):
        x = F.leaky_relu(self.conv2(self.elu(self.conv1(x))), negative_slope=0.2)
        return self.fc(torch.flatten(F.elu(self.leaky(x)), 1))


class GroupAndLayerNormed(nn.Module):
    """A conv, a GroupNorm, a linear and a LayerNorm: both norms on integer kernels (the
    .pte and .onnx exporters' tests)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 12 * 12, 16)
        self.layer_norm = nn.LayerNorm(16)

    def forward(self, x):
        x = F.relu(self.group_norm(self.conv(x)))
        return self.layer_norm(self.fc(torch.flatten(x, 1)))


def small_swin(v2: bool = False) -> nn.Module:
    """torchvision's Swin in two stages small enough to train here: windows of 4 x 4 tokens,
    the second block of each stage shifted (V1, or V2's blocks and patch merging)."""
    from torchvision.models import swin_transformer as swin
    kwargs = dict(block=swin.SwinTransformerBlockV2,
                  downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=4,
                                **kwargs)


class TextEncoder(nn.Module):
    """Embedding, a two-layer transformer encoder and a linear head; with ``padding``, the
    token 0 is padding, masked out of attention."""

    def __init__(self, vocabulary: int = 50, padding: bool = False):
        super().__init__()
        self.padding = padding
        self.embed = nn.Embedding(vocabulary, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens):
        mask = tokens == 0 if self.padding else None
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=mask).mean(1))


def train(model, images, labels, steps, lr, gen, batch=128, transform=None,
          optimizer="sgd"):
    """``steps`` SGD (momentum 0.9) or Adam steps on random batches of ``images`` (through
    ``transform``)."""
    optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
                 else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx] if transform is None else transform(images[idx])
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fashion_float_model(gen: torch.Generator):
    """The parity tests' Fashion-MNIST CNN trained in float (seeded; 300 SGD steps at lr
    0.05 on batches drawn with ``gen``), with the splits: (model, train_x, train_y, test_x,
    test_y)."""
    from qat.datasets import load_fashion_mnist

    torch.manual_seed(0)
    train_x, train_y = load_fashion_mnist(train=True)
    test_x, test_y = load_fashion_mnist(train=False)
    model = FashionNet()
    train(model, train_x, train_y, 300, 0.05, gen)
    return model, train_x, train_y, test_x, test_y


def fashion_qat_fine_tune(model, train_x, train_y, gen: torch.Generator, config=None,
                      calibration=None):
    """The recipe's QAT fine-tuning of ``model`` (which stays as it is): prepared with
    ``config``, calibrated on the ``calibration`` batches when given, 150 SGD steps at lr
    0.01 on batches drawn with ``gen``, observers off; in eval mode."""
    qmodel = qat.prepare(model, config)
    if calibration is not None:
        qat.calibrate(qmodel, calibration, progress=False)
    train(qmodel, train_x, train_y, 150, 0.01, gen)
    qat.disable_observer(qmodel)
    return qmodel.eval()


def traced_size(model: nn.Module, example, path: str) -> int:
    """The bytes of ``model`` traced on ``example`` and saved as TorchScript at ``path``:
    the float file an exported integer model is measured against."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # check_trace=False: the float transformer takes a native fast path that the
        # trace checker reads as a different graph on each call.
        torch.jit.save(torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False),
                       path)
    return os.path.getsize(path)


class _Recorder(fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.values = {}

    def run_node(self, n):
        value = super().run_node(n)
        # A copy: in-place ops later in the graph (ReLU(inplace=True)) would change it.
        self.values[n.name] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def per_op_steps(qmodel: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """For each integer conv / linear of ``qmodel``'s conversion, given the simulation's own
    (quantized) input on ``x``: (largest difference from the simulation's output in output
    steps, share of outputs more than half a step off). Errors that compound through a chain
    are not counted: each op starts from the simulation's values."""
    gm = copy.deepcopy(qmodel)  # the converter swaps integer modules into it
    converter = _Converter(gm)
    converter.run()
    int_model = fx.GraphModule(gm, converter.graph)
    simulation = _Recorder(qmodel)
    with torch.no_grad():
        simulation.run(x)
    # The simulation's node behind each value of the integer graph: its FakeQuantize where
    # it has one (an op's output), else the first (max pooling passing a value on).
    source, any_source = {}, {}
    for old, new in converter.env.items():
        any_source.setdefault(new, old)
        if old.op == "call_module" and isinstance(qmodel.get_submodule(old.target),
                                                  qat.FakeQuantize):
            source.setdefault(new, old)
    steps = {}
    for node in converter.graph.nodes:
        if node.op != "call_module" or node not in source or not isinstance(
                int_model.get_submodule(node.target), qat.quantized._IntegerLayer):
            continue
        (arg,) = node.args
        scale, zero_point, dtype = converter.qparams[arg]
        q_input = torch.quantize_per_tensor(simulation.values[any_source[arg].name], scale,
                                            zero_point, dtype)
        with torch.no_grad():
            out = int_model.get_submodule(node.target)(q_input).dequantize()
        off = (out - simulation.values[source[node].name]).abs() / converter.qparams[node][0]
        steps[node.target] = (off.max().item(), (off > 0.5).float().mean().item())
    return steps


def fashion_rgb(images, size=32):
    """Fashion-MNIST as the torchvision models take it: 3 channels, size x size."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False).repeat(
        1, 3, 1, 1)


def settle_batch_norm(model, images, transform):
    """Batch-norm running statistics as the exact average over ``images`` (8 batches), as
    a trained model has them: a briefly trained model's (torchvision's momentum) lag."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the cumulative average
    model.train()
    with torch.no_grad():
        for i in range(8):
            model(transform(images[i * 64:(i + 1) * 64]))


# The torchvision parity recipe (tests/python/test_convert.py, benchmarks/bench_pte_parity.py):
# (torchvision builder, input size, optimizer, float steps, QAT steps). squeezenet1_1 needs
# 64x64 inputs (at 32x32 its last ReLU dies and every output is 0) and, with
# mobilenet_v3_small and efficientnet_b0, Adam to learn in 100 steps. efficientnet_b0's 16
# squeeze-excitation blocks amplify rare one-step flips (those of the integer model, float32
# ties, are gone since its eval simulation computes as the kernels do; those of the .pte and
# .onnx files, whose kernels round otherwise, remain): at 64x64
# it needed 800 + 200 steps (12 minutes of CI per PyTorch) to reach 30.5 dB on 1.13 and 30.8
# dB on 2.15, a thin margin. At 32x32, 300 + 100 steps give 34.8 dB on 1.13 and 34.2 dB on
# 2.15 (800 + 200 give 35.8 and 38.0) in a sixth of the time.
TORCHVISION_PARITY = [
    ("resnet18", 32, "sgd", 100, 50),
    ("mobilenet_v2", 32, "sgd", 100, 50),
    ("shufflenet_v2_x0_5", 32, "sgd", 100, 50),
    ("mobilenet_v3_small", 64, "adam", 100, 50),
    ("squeezenet1_1", 64, "adam", 100, 50),
    ("efficientnet_b0", 32, "adam", 300, 100),
]


def parity_lr(optimizer: str) -> float:
    """The float learning rate of the recipe (QAT fine-tunes at a quarter of it)."""
    return 0.02 if optimizer == "sgd" else 1e-3


def torchvision_model(name: str, size: int) -> nn.Module:
    """torchvision's builder ``name`` for 10 classes and ``size`` x ``size`` inputs, as a
    training loop takes it: one output (no auxiliary heads), the input size told to the
    builders whose position embeddings or windows depend on it."""
    kwargs = {"weights": None, "num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    elif name.startswith("vit_"):
        kwargs["image_size"] = size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    return getattr(torchvision.models, name)(**kwargs)


def train_torchvision_float(name, size, optimizer, float_steps, images, labels, gen,
                            lr=None):
    """The recipe's float half: torchvision's ``name`` (seeded) trained on Fashion-MNIST
    at ``size`` x ``size`` (at ``lr``, by default the recipe's), batch-norm statistics
    settled; returns it and its input transform."""
    torch.manual_seed(0)

    def transform(batch):
        return fashion_rgb(batch, size)

    model = torchvision_model(name, size)
    train(model, images, labels, float_steps, lr or parity_lr(optimizer), gen, batch=32,
          transform=transform, optimizer=optimizer)
    settle_batch_norm(model, images, transform)
    return model, transform


def calibration_batches(images, transform):
    """The recipe's four calibration batches (images the BN settling did not use)."""
    return [transform(images[i * 64:(i + 1) * 64]) for i in range(8, 12)]


def train_torchvision_qat(model, transform, optimizer, qat_steps, images, labels, gen,
                          lr=None):
    """The recipe's QAT half on a copy of ``model``: prepared, calibrated, fine-tuned (at a
    quarter of the float ``lr``, by default the recipe's), observers off, batch-norm
    statistics settled; returned in eval mode."""
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, calibration_batches(images, transform), progress=False)
    train(qmodel, images, labels, qat_steps, (lr or parity_lr(optimizer)) / 4, gen, batch=32,
          transform=transform, optimizer=optimizer)
    qat.disable_observer(qmodel)
    settle_batch_norm(qmodel, images, transform)
    return qmodel.eval()


def calibrated(model: nn.Module, x: torch.Tensor, config=None) -> nn.Module:
    torch.manual_seed(0)
    qmodel = qat.prepare(model, config) if config is not None else qat.prepare(model)
    qat.calibrate(qmodel, [x[i:i + 16] for i in range(0, len(x), 16)])
    return qmodel.eval()


def steps_apart(qmodel, expected: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Per output element, how many steps of the model's output quantization apart."""
    return (expected.float() - got.float()).abs() / _output_step(qmodel)


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.pool(F.relu(self.depthwise(x)))
        return self.fc(torch.flatten(x, 1))


class Branches(nn.Module):
    """add, mul, cat, hardswish and a fixed-range sigmoid between convs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(12, 4, 1)
        self.head = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = torch.cat([F.hardswish(a + b), a * b], 1)
        return torch.sigmoid(self.head(torch.flatten(self.c(y), 1)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


# Op patterns that each QDQ emitter (.pte, .onnx) must carry to integer kernels: model class,
# sample shape, preset.
QDQ_PATTERNS = {
    "conv_bn_relu_depthwise_maxpool_linear": (ConvBnRelu, (3, 12, 12), None),
    "add_mul_cat_hardswish_sigmoid": (Branches, (3, 12, 12), None),
    "linear_relu": (Mlp, (20,), None),
    "conv1d_bn_relu_keyword": (KeywordNet, (8, 40), None),
    "conv_transpose2d_up": (UpNet, (3, 12, 12), None),
    "fashion_cnn_w4a8": (FashionNet, (1, 28, 28), "w4a8"),
}
