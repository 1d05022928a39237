"""Times one training step (forward, cross-entropy, backward, SGD with momentum, zero_grad)
of the float model and of its QAT versions, side by side in one run:

- resnet18 and mobilenet_v2 (torchvision): float; ``qat.prepare(model)`` (the int8
  preset); PyTorch's FX QAT (``prepare_qat_fx``, qnnpack default QAT qconfig mapping) where
  this PyTorch still has it; PyTorch's PT2E QAT (``torch.export`` + ``prepare_qat_pt2e``
  with an XNNPACK quantizer, per-channel int8 weights) where torchao or executorch
  provides it;
- ``linear``, a Linear-only MLP: float; qat; torchao's ``quantize_(model, QATConfig(...))``
  with int8 per-token activations and int8 per-channel weights, where torchao is installed.

    .venv/bin/python benchmarks/bench_qat_step.py \\
        [--models resnet18 mobilenet_v2 linear] [--batch 8] [--size 64] [--iterations 21]
        [--warmup 3] [--threads 2] [--keep-freed-memory]

Steps run round-robin (one step of each variant, repeat) after warm-up; each table shows
the median step, its ratio to float, and the fastest step. By default the allocator is
glibc's as a user's script has it; ``--keep-freed-memory`` tells glibc to keep freed blocks
(a tuning trick, reported as such in the header).

Target (issue 12): ours <= 1.25x float, and below every other QAT flow in the same run. The
ratios are the result; absolute times depend on the machine and its load. The script
reports; it does not assert.
"""

import argparse
import copy
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qat
from _timing import keep_freed_memory, round_robin_ms

MODELS = ("resnet18", "mobilenet_v2", "linear")


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def fx_qat(model: nn.Module, x: torch.Tensor) -> Tuple[Optional[nn.Module], str]:
    """PyTorch's FX QAT, or (None, why not)."""
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx
    except ImportError as error:
        return None, f"torch.ao.quantization's FX flow is not in this PyTorch ({error})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes on its own API
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("qnnpack"), (x,)), ""


def _xnnpack_quantizer():
    """(XNNPACKQuantizer, get_symmetric_quantization_config, prepare_qat_pt2e, source)."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        return XNNPACKQuantizer, get_symmetric_quantization_config, prepare_qat_pt2e, \
            "executorch"
    except ImportError:
        pass
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (XNNPACKQuantizer,
                                                         get_symmetric_quantization_config)
    return XNNPACKQuantizer, get_symmetric_quantization_config, prepare_qat_pt2e, "torchao"


def pt2e_qat(model: nn.Module, x: torch.Tensor) -> Tuple[Optional[nn.Module], str]:
    """PyTorch's PT2E QAT with an XNNPACK quantizer, or (None, why not)."""
    try:
        quantizer_cls, config, prepare_qat_pt2e, source = _xnnpack_quantizer()
    except ImportError as error:
        return None, f"no PT2E QAT here: neither torchao nor executorch is installed ({error})"
    quantizer = quantizer_cls().set_global(config(is_per_channel=True, is_qat=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (x,)).module()
        return prepare_qat_pt2e(exported, quantizer), source


def torchao_qat(model: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """torchao's ``quantize_(model, QATConfig(...))``: int8 per-token activations, int8
    per-channel weights, on every Linear; or (None, why not)."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError as error:
        return None, f"torchao is not installed ({error})"
    config = QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare")
    quantize_(model, config)
    return model, ""


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def variants(name: str, x: torch.Tensor, target: torch.Tensor):
    """One training step per variant, each on its own copy of the same initial model, and
    the reasons of the variants that this PyTorch cannot run."""
    torch.manual_seed(0)
    if name == "linear":
        model = mlp().train()
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=10).train()
    models: Dict[str, nn.Module] = {"float": model}
    missing: Dict[str, str] = {}

    ours = qat.prepare(copy.deepcopy(model))
    with torch.no_grad():
        ours(x)  # the first batch sizes the per-channel state
    models["qat"] = ours
    others = ({"torchao QATConfig": torchao_qat} if name == "linear" else
              {"torch FX QAT": lambda m: fx_qat(m, x), "torch PT2E QAT": lambda m: pt2e_qat(m, x)})
    for label, build in others.items():
        try:
            built, note = build(copy.deepcopy(model))
        except Exception as error:  # noqa: BLE001 - reported as a row, not a crash
            built, note = None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if built is None:
            missing[label] = note
        else:
            models[label + (f" ({note})" if note else "")] = built
    return {label: make_step(m, x, target) for label, m in models.items()}, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--iterations", type=int, default=21, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc to keep freed memory (a tuning trick; off by default)")
    args = parser.parse_args()
    malloc = "default allocator"
    if args.keep_freed_memory:
        malloc = ("glibc keeping freed memory (--keep-freed-memory)" if keep_freed_memory()
                  else "default allocator (mallopt failed)")

    torch.set_num_threads(args.threads)
    if "qnnpack" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "qnnpack"
    print(f"qat {qat.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, batch {args.batch}, {args.threads} threads, median of "
          f"{args.iterations} steps after {args.warmup} warm-up, {malloc}")
    verdicts = []
    for name in args.models:
        torch.manual_seed(0)
        size = 32 if name == "linear" else args.size
        x = torch.randn(args.batch, 3, size, size)
        target = torch.randint(0, 10, (args.batch,))
        steps, missing = variants(name, x, target)
        timed = round_robin_ms(steps, args.iterations, args.warmup)
        ms = {variant: median for variant, (median, _) in timed.items()}
        print(f"\n{name} ({'x'.join(map(str, x.shape))})")
        print(f"{'variant':<36}{'median ms':>11}{'/ float':>9}{'min ms':>9}")
        for variant, value in ms.items():
            print(f"{variant:<36}{value:>11.2f}{value / ms['float']:>9.2f}"
                  f"{timed[variant][1]:>9.2f}")
        for variant, why in missing.items():
            print(f"{variant:<36}{'n/a':>11}  {why}")
        others = {v: t for v, t in ms.items() if v not in ("float", "qat")}
        fast = ms["qat"] / ms["float"] <= 1.25
        beats = all(ms["qat"] < t for t in others.values())
        verdicts.append((name, ms["qat"] / ms["float"], fast, beats, len(others)))

    print()
    for name, ratio, fast, beats, count in verdicts:
        print(f"{name}: qat {ratio:.2f}x float ({'<=' if fast else '>'} 1.25x), "
              f"{'below' if beats else 'not below'} the {count} other QAT flow(s) run")
    held = all(fast and beats for _, _, fast, beats, _ in verdicts)
    print("targets (qat <= 1.25x float and below every other QAT flow): "
          + ("hold" if held else "do not hold"))


if __name__ == "__main__":
    main()
