"""Plain functions, classes and paths shared by several test files (fixtures and the
ATen-arithmetic references stay in conftest.py, the observer references in
observer_reference.py). Test files import it as ``from helpers import ...``: pytest puts
this folder on sys.path, as it has no __init__.py."""

import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
