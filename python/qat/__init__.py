"""qat: quantization-aware training for PyTorch.

Fake-quantize operators with a registry of straight-through estimators, implemented in
C++ and reachable as ``qat.ops.fake_quantize`` and ``torch.ops.qat.fake_quantize``.
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

__version__ = _C.__version__

__all__ = ["__version__", "estimators", "fake_quantize", "ops"]
