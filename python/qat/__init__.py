"""qat: quantization-aware training for PyTorch.

Fake-quantize operators with a registry of straight-through estimators, implemented in
C++ and reachable as ``qat.ops.fake_quantize`` and ``torch.ops.qat.fake_quantize``;
observers (``qat.observers``), ``qat.QuantSpec`` and ``qat.Config`` (presets in
``qat.presets``), the ``qat.FakeQuantize`` module, QAT modules (``qat.modules``, extended
with ``qat.register_module``), ``qat.prepare`` and ``qat.calibrate``; ``qat.convert`` to
an integer model on PyTorch's quantized kernels (``qat.quantized``), ``qat.compare`` of the
two, ``qat.export`` to a mobile (``.ptl``) or TorchScript file with metadata,
per-layer ``qat.sensitivity`` to the weight width and ``qat.auto_precision`` (per-layer
widths under a size budget, ``qat.precision``), and Fashion-MNIST from Debian's package
(``qat.datasets``).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "qat: cannot load the compiled extension qat._C: "
        f"{error}. Build it with `pip install --no-build-isolation -e .` "
        "(see README.md) using the Python that sees torch (/usr/bin/python3 on Debian)."
    ) from error

from . import estimators, ops  # noqa: E402
from .ops import fake_quantize  # noqa: E402
from .config import Config, QuantSpec  # noqa: E402
from . import observers  # noqa: E402
from .fake_quant import FakeQuantize, FixedQParamsFakeQuantize  # noqa: E402
from .calibrate import (  # noqa: E402
    calibrate,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from . import modules, presets  # noqa: E402
from .modules import register_module  # noqa: E402
from .prepare import prepare  # noqa: E402
from . import quantized  # noqa: E402
from .convert import ConversionReport, compare, convert  # noqa: E402
from .export import export, read_metadata  # noqa: E402
from .precision import auto_precision, sensitivity  # noqa: E402

__version__ = _C.__version__

__all__ = [
    "Config",
    "ConversionReport",
    "FakeQuantize",
    "FixedQParamsFakeQuantize",
    "QuantSpec",
    "__version__",
    "auto_precision",
    "calibrate",
    "compare",
    "convert",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "estimators",
    "export",
    "fake_quantize",
    "modules",
    "observers",
    "ops",
    "prepare",
    "presets",
    "quantized",
    "read_metadata",
    "register_module",
    "sensitivity",
]
