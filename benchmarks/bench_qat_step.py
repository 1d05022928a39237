"""Times one training step (forward, cross-entropy, backward, SGD with momentum, zero_grad)
of torchvision's resnet18 and mobilenet_v2 in three variants of the same model, measured
side by side in one run: the float model, ``qat.prepare(model)`` (default config, the int8
preset) and PyTorch's own QAT (``prepare_qat_fx`` with the qnnpack default QAT qconfig
mapping).

    PYTHONPATH=python /usr/bin/python3 benchmarks/bench_qat_step.py \\
        [--models resnet18 mobilenet_v2] [--batch 16] [--size 64] [--iterations 30]
        [--warmup 5] [--threads 2] [--system-malloc]

Each variant has its own copy of the same initial model and its own optimizer; steps run
round-robin (float, ours, torch QAT, repeat) after warm-up, and each table shows the median
and the fastest step. Ours runs one batch before timing, which sizes its per-channel state.

Targets: ours <= 1.25x float, and ours faster than torch's QAT. The ratios are the result;
absolute times depend on the machine and its load. The script reports; it does not assert.
"""

import argparse
import copy
import ctypes
import ctypes.util
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
# The same names and signatures in torch 1.13 and 2.x.
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

import qat

MODELS = ("resnet18", "mobilenet_v2")
VARIANTS = ("float", "ours", "torch QAT")


def keep_freed_memory() -> bool:
    """Keep freed blocks in glibc's heap instead of returning them to the OS after every
    free, so that page faults on fresh memory do not land on whichever variant runs next
    (see benchmarks/bench_fake_quantize.py)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(
        libc.mallopt(m_trim_threshold, 2**30))


def make_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def step_ms(steps: dict, iterations: int, warmup: int) -> dict:
    """(median, min) milliseconds per step of each variant, timed round-robin so that a
    change in the machine's load touches every variant alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(iterations):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def variants(name: str, x: torch.Tensor, target: torch.Tensor) -> dict:
    """One training step per variant, each on its own copy of the same initial model."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).train()

    ours = qat.prepare(copy.deepcopy(model))
    with torch.no_grad():
        ours(x)  # the first batch sizes the per-channel state

    theirs = prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("qnnpack"),
                            (x,)).train()
    return {"float": make_step(model, x, target), "ours": make_step(ours, x, target),
            "torch QAT": make_step(theirs, x, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--iterations", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's default trimming on (see keep_freed_memory)")
    args = parser.parse_args()
    malloc = "glibc defaults" if args.system_malloc else (
        "glibc keeping freed memory" if keep_freed_memory() else "glibc defaults (mallopt failed)")

    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "qnnpack"
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 10, (args.batch,))

    print(f"qat {qat.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, input {list(x.shape)}, {args.threads} threads, "
          f"median of {args.iterations} steps after {args.warmup} warm-up, {malloc}")
    verdicts = []
    for name in args.models:
        timed = step_ms(variants(name, x, target), args.iterations, args.warmup)
        ms = {variant: median for variant, (median, _) in timed.items()}
        ours_vs_float = ms["ours"] / ms["float"]
        ours_vs_torch = ms["ours"] / ms["torch QAT"]
        print(f"\n{name}")
        print(f"{'variant':<12}{'median ms':>11}{'/ float':>9}{'min ms':>9}")
        for variant in VARIANTS:
            print(f"{variant:<12}{ms[variant]:>11.2f}{ms[variant] / ms['float']:>9.2f}"
                  f"{timed[variant][1]:>9.2f}")
        print(f"ours vs torch QAT: {ours_vs_torch:.2f}x the time "
              f"({1 / ours_vs_torch:.2f}x as fast)")
        verdicts.append((name, ours_vs_float <= 1.25, ours_vs_torch < 1.0))

    print()
    print("targets (ours <= 1.25x float, ours faster than torch QAT): " + "; ".join(
        f"{name}: {'<= 1.25x float' if fast else '> 1.25x float'}, "
        f"{'faster' if beats else 'not faster'} than torch QAT"
        for name, fast, beats in verdicts)
        + (" -> hold" if all(f and b for _, f, b in verdicts) else " -> do not hold"))


if __name__ == "__main__":
    main()
