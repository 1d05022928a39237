"""Times one training step (forward, cross-entropy, backward, SGD with momentum, zero_grad)
of the float model and of its QAT versions, side by side in one run:

- resnet18 and mobilenet_v2 (torchvision, 3x64x64) and ``demo``, the Fashion-MNIST demo's
  small CNN (1x28x28): float; ``qat.prepare(model)`` (the int8 preset); PyTorch's FX QAT
  (``prepare_qat_fx``, qnnpack default QAT qconfig mapping) where this PyTorch still has
  it; PyTorch's PT2E QAT (``torch.export`` + ``prepare_qat_pt2e`` with an XNNPACK
  quantizer, per-channel int8 weights) where torchao or executorch provides it;
- ``linear``, a Linear-only MLP: float; qat; torchao's ``quantize_(model, QATConfig(...))``
  with int8 per-token activations and int8 per-channel weights, where torchao is installed;
- with ``--compile`` (PyTorch 2), also the float model and qat's under ``torch.compile``
  (inductor; compiled during the warm-up steps), each table then giving compiled qat's ratio
  to compiled float too.

    .venv/bin/python benchmarks/bench_qat_step.py \\
        [--models resnet18 mobilenet_v2 demo linear] [--batches 8 32] [--size 64]
        [--iterations 21] [--warmup 3] [--threads 2] [--keep-freed-memory]
        [--epoch [--epoch-rounds 3]]
        [--compile] [--float-and-qat] [--one-rotation] [--in-process]

Each variant steps in turn with the float model alone (one step of each, repeat, after
warm-up): qat with float; compiled qat with compiled float; then each of PyTorch's flows
with float, built when its turn comes. Each table shows the median step, its ratio to the
float median of the rotation it ran in, and the spread (the quartiles of the ratio's
numerator, and the fastest step). The allocator is glibc's as a user's script has it;
``--keep-freed-memory`` tells glibc to keep freed blocks (a tuning trick, reported as such
in the header).

Each model and batch runs in a fresh Python process (``--in-process``: all in this one), as
a user's script trains one model: the heap that one table's steps leave changes what the
next table's steps cost (mobilenet_v2 at batch 8 on torch 2.15, qat over float: 1.04-1.10x
in a process of its own, float's median step 55-59 ms; 1.19x after the resnet18 tables in
the same process, float's 47 ms).

Why rotations of two: a user's script trains one model, and the steps of the others change
what a step costs. With glibc's default settings, a large tensor freed goes back to the OS
and a new one takes fresh pages, whose faults and zeroing are a large part of a small
model's step; PyTorch's flows leave the heap grown, and a float step beside them finds its
memory already mapped, as with ``--keep-freed-memory``. mobilenet_v2 at batch 8 on torch
1.13, float's median step: 97-107 ms beside qat alone, 56-68 ms with the FX flow in the
same rotation, 51-56 ms beside qat with ``--keep-freed-memory``; qat's ratio 0.94-0.95x,
1.16-1.17x and 1.20-1.21x (qat's kernels write into their own pool,
``qat.ops.buffer_pool_stats``, so they take fewer fresh pages). ``--one-rotation`` steps
every variant in one rotation (the previous default) and ``--float-and-qat`` leaves
PyTorch's flows out; the header says which. ``--epoch`` instead trains the demo's model for
one full Fashion-MNIST epoch (batch 128, Adam, as the demo does), float and QAT each in a
fresh process, alternating for ``--epoch-rounds`` rounds (3), and prints each epoch's time,
median step and page faults per step (epoch_seconds), and the ratio of the medians; with
``--in-process``, float and QAT step by step in turn over the same batches in one process
(the default before the third session of 2026-12-07). In
one process each model's steps change the other's: the demo's float epoch on torch 1.13
took 10.2-10.6 s beside one QAT build and 12.1 s beside another whose activation
quantizers allocate less.

Targets: qat <= 1.15x float per step (issue 16; <= 1.25x, issue 12), a QAT epoch <= 1.10x a
float one, and qat's median step and ratio below every other QAT flow's in the same run.
The ratios are the result; absolute times depend on the machine and its load. The script
reports; it does not assert.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import qat
from _timing import keep_freed_memory, round_robin_samples

# The environment the tables' processes get: the user's, as before the demo's import sets
# OMP_WAIT_POLICY=PASSIVE for its own runtimes' figures (its OpenMP threads then sleep between
# parallel regions: resnet18's float step at batch 8 took 84-86 ms in such a process against
# 61-66 ms).
ENVIRONMENT = dict(os.environ)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                "python"))
from fashion_mnist_demo import BATCH as DEMO_BATCH, DemoNet, batches  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "demo", "linear")
STEP_TARGET = 1.15
EPOCH_TARGET = 1.10


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[..., None]:
    """One training step of ``model``; called with (x, target) it steps on those instead."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(inputs: torch.Tensor = x, labels: torch.Tensor = target):
        loss = F.cross_entropy(model(inputs), labels)
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


COMPILED = ", torch.compile"


def base_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "linear":
        return mlp().train()
    if name == "demo":
        return DemoNet().train()
    return getattr(torchvision.models, name)(weights=None, num_classes=10).train()


def variants(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
             compiled: bool = False) -> Dict[str, Callable[..., None]]:
    """One training step each of the float model, qat's, and with ``compiled`` both under
    torch.compile, each on its own copy of ``model``."""
    models: Dict[str, nn.Module] = {"float": model}
    ours = qat.prepare(copy.deepcopy(model))
    with torch.no_grad():
        ours(x)  # the first batch sizes the per-channel state
    models["qat"] = ours
    if compiled:
        for label in ("float", "qat"):
            models[label + COMPILED] = torch.compile(copy.deepcopy(models[label]))
    return {label: make_step(m, x, target) for label, m in models.items()}


def other_flows(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """PyTorch's QAT flows for ``model``, each built on a copy of it when called: label ->
    a function giving (its training step, "") or (None, why it cannot run here)."""
    builders = ({"torchao QATConfig": torchao_qat} if name == "linear" else
                {"torch FX QAT": lambda m: fx_qat(m, x),
                 "torch PT2E QAT": lambda m: pt2e_qat(m, x)})

    def built(build):
        try:
            flow, note = build(copy.deepcopy(model))
        except Exception as error:  # noqa: BLE001 - reported as a row, not a crash
            return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return (None, note) if flow is None else (make_step(flow, x, target), note)

    return {label: (lambda build=build: built(build)) for label, build in builders.items()}


def input_shape(name: str, size: int):
    return {"linear": (3, 32, 32), "demo": (1, 28, 28)}.get(name, (3, size, size))


def rotations(args, steps: Dict[str, Callable[..., None]], others) -> Tuple[Dict, Dict]:
    """The step times of the variants, label -> (samples, the float median of the rotation
    it ran in), and the flows that cannot run here, label -> why.

    By default each variant runs in turn with the float model alone: qat (and, compiled,
    qat under torch.compile with float under it), then each other flow, built only when
    its turn comes. ``args.one_rotation`` runs them all in one rotation."""
    timed: Dict[str, Tuple[list, float]] = {}
    missing: Dict[str, str] = {}

    def run(calls: Dict[str, Callable[..., None]], baseline: str) -> None:
        samples = round_robin_samples(calls, args.iterations, args.warmup)
        for label, values in samples.items():
            timed.setdefault(label, (values, statistics.median(samples[baseline])))

    def build(label: str, builder) -> Tuple[Optional[Callable[..., None]], str]:
        step, note = builder()
        if step is None:
            missing[label] = note
        return step, label + (f" ({note})" if note else "")

    flows = {} if args.float_and_qat else others
    if args.one_rotation:
        for label, builder in flows.items():
            step, shown = build(label, builder)
            if step is not None:
                steps = dict(steps, **{shown: step})
        run(steps, "float")
        return timed, missing
    run({"float": steps["float"], "qat": steps["qat"]}, "float")
    if "qat" + COMPILED in steps:
        run({k: steps[k] for k in ("float" + COMPILED, "qat" + COMPILED)}, "float" + COMPILED)
    for label, builder in flows.items():
        step, shown = build(label, builder)
        if step is not None:
            run({"float": steps["float"], shown: step}, "float")
    return timed, missing


def step_tables(args) -> list:
    """One table per model and batch; returns (label, qat / float, the other flows'
    (median, ratio), qat's median)."""
    verdicts = []
    for name in args.models:
        for batch in args.batches:
            torch.manual_seed(0)
            x = torch.randn(batch, *input_shape(name, args.size))
            target = torch.randint(0, 10, (batch,))
            model = base_model(name)
            # The other flows start from the weights the float model starts from, though
            # they are built after it has stepped.
            initial = copy.deepcopy(model)
            steps = variants(model, x, target, args.compile)
            timed, missing = rotations(args, steps, other_flows(name, initial, x, target))
            ms = {variant: statistics.median(values) for variant, (values, _) in timed.items()}
            print(f"\n{name} ({'x'.join(map(str, x.shape))})")
            print(f"{'variant':<40}{'median ms':>10}{'/ float':>9}{'quartiles ms':>18}"
                  f"{'min ms':>9}")
            for variant, (values, baseline) in timed.items():
                q1, _, q3 = statistics.quantiles(values, n=4)
                own = not args.one_rotation and variant not in ("float", "qat") \
                    and not variant.endswith(COMPILED)
                print(f"{variant:<40}{ms[variant]:>10.2f}{ms[variant] / baseline:>9.2f}"
                      f"{q1:>10.2f}-{q3:<7.2f}{min(values):>9.2f}"
                      + (f"  (float {baseline:.2f} ms beside it)" if own else ""))
            for variant, why in missing.items():
                print(f"{variant:<40}{'n/a':>10}  {why}")
            if args.compile:
                ratio = ms["qat" + COMPILED] / ms["float" + COMPILED]
                print(f"under torch.compile: qat {ratio:.2f}x float")
            # Each other flow: (its median, its ratio to the float beside it).
            others = {v: (t, t / timed[v][1]) for v, t in ms.items()
                      if v not in ("float", "qat") and not v.endswith(COMPILED)}
            verdicts.append((f"{name} batch {batch}", ms["qat"] / ms["float"], others,
                             ms["qat"]))
    return verdicts


def in_fresh_process(argv: List[str], options: List[str]):
    """This script run in a fresh Python process with the command line ``argv`` it was
    given, then ``options`` (argparse keeps the last of an option given twice), with the
    environment as it was before the demo's import; returns what the child wrote to its
    ``--verdicts`` file. What the child prints comes as it prints it."""
    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "verdicts.json")
        subprocess.run([sys.executable, os.path.abspath(__file__)] + argv + options
                       + ["--verdicts", path], check=True, env=ENVIRONMENT)
        with open(path) as f:
            return json.load(f)


def isolated_tables(args, argv: List[str]) -> list:
    """step_tables for each model and batch in a fresh Python process (in_fresh_process, one
    model and batch, ``--in-process``), whose tables print as they come; returns their
    verdicts."""
    verdicts = []
    for name in args.models:
        for batch in args.batches:
            table = in_fresh_process(
                argv, ["--models", name, "--batches", str(batch), "--in-process"])
            verdicts += [(label, ratio, {k: tuple(v) for k, v in others.items()}, ours)
                         for label, ratio, others, ours in table]
    return verdicts


def epoch_seconds(variants: List[str]) -> Tuple[Dict[str, float], int, int, Dict[str, str]]:
    """One Fashion-MNIST epoch of the demo's model for each of ``variants`` ("float",
    "qat"), step by step in turn over the same batches: (seconds by variant, images,
    steps, each variant's median step and the process's page faults per step).

    The faults tell an epoch's memory regime: glibc either keeps the step's large blocks
    mapped or hands them back to the OS and faults them in again every step. On the host
    of 2026-12-08 the demo's median step went from 22-27 ms at 1,400-2,500 faults a step to
    30-33 ms at 3,000-6,600, float and qat alike, from one process to the next."""
    from qat.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(train=True)
    torch.manual_seed(0)
    model = DemoNet().train()
    # Only the variants timed: a QAT model built beside the float one would change the
    # float process's heap.
    models = {label: model if label == "float" else qat.prepare(copy.deepcopy(model))
              for label in variants}
    steps = {label: make_step(m, images[:1], labels[:1], torch.optim.Adam(m.parameters(), 1e-3))
             for label, m in models.items()}
    times: Dict[str, List[float]] = {label: [] for label in steps}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for x, y in batches(images, labels, torch.Generator().manual_seed(0)):
        for label, step in steps.items():
            start = time.perf_counter()
            step(x, y)
            times[label].append(time.perf_counter() - start)
    count = len(times[variants[0]])
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count
    seconds = {label: sum(values) for label, values in times.items()}
    regime = {label: f"median step {statistics.median(values) * 1e3:.1f} ms, "
                     f"{per_step:.0f} page faults a step"
              for label, values in times.items()}
    return seconds, len(images), count, regime


def epoch_table(args, argv: List[str]) -> None:
    """The float and QAT epochs (epoch_seconds), each in a fresh process, alternating for
    ``--epoch-rounds`` rounds, or (``--in-process``) step by step in turn in this one."""
    if args.in_process:
        seconds, images, count, regimes = epoch_seconds(["float", "qat"])
        rounds = [(seconds, regimes)]
    else:
        rounds = []
        for _ in range(args.epoch_rounds):
            seconds, regimes = {}, {}
            for variant in ("float", "qat"):
                measured, images, count, regime = in_fresh_process(
                    argv, ["--epoch-variant", variant])
                seconds.update(measured)
                regimes.update(regime)
            rounds.append((seconds, regimes))
    print(f"\nFashion-MNIST epoch ({images} images, {count} steps of {DEMO_BATCH}, Adam), "
          + ("float and qat step by step in turn in one process" if args.in_process else
             f"each epoch in a fresh process, float then qat, {len(rounds)} round(s)"))
    for number, (seconds, regimes) in enumerate(rounds, 1):
        print(("" if args.in_process else f"round {number}: ") + ", ".join(
            f"{label} {value:.2f} s ({regimes[label]})" for label, value in seconds.items())
            + f", qat {seconds['qat'] / seconds['float']:.2f}x float")
    medians = {label: statistics.median(r[label] for r, _ in rounds)
               for label in ("float", "qat")}
    ratio = medians["qat"] / medians["float"]
    print(f"epoch: qat {ratio:.2f}x float, median {medians['qat']:.2f} s over "
          f"{medians['float']:.2f} s ({'<=' if ratio <= EPOCH_TARGET else '>'} "
          f"{EPOCH_TARGET:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--size", type=int, default=64, help="torchvision input height, width")
    parser.add_argument("--iterations", type=int, default=21, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tell glibc to keep freed memory (a tuning trick; off by default)")
    parser.add_argument("--epoch", action="store_true",
                        help="time one Fashion-MNIST epoch of the demo's model instead")
    parser.add_argument("--epoch-rounds", type=int, default=3,
                        help="--epoch: rounds of a float and a qat epoch, each in a fresh "
                             "process")
    # The one variant whose epoch a process of its own times (epoch_table).
    parser.add_argument("--epoch-variant", choices=("float", "qat"), help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true",
                        help="also time the float and qat models under torch.compile")
    parser.add_argument("--float-and-qat", action="store_true",
                        help="time float and qat only, not PyTorch's QAT flows")
    parser.add_argument("--one-rotation", action="store_true",
                        help="step every variant in one rotation instead of each in turn "
                             "with float alone")
    parser.add_argument("--in-process", action="store_true",
                        help="run every model and batch in this process instead of each in a "
                             "fresh one")
    # Where a table run in a process of its own writes its verdicts (isolated_tables).
    parser.add_argument("--verdicts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile and not hasattr(torch, "compile"):
        parser.error(f"--compile: this PyTorch ({torch.__version__}) has no torch.compile")
    malloc = "default allocator"
    if args.keep_freed_memory:
        malloc = ("glibc keeping freed memory (--keep-freed-memory)" if keep_freed_memory()
                  else "default allocator (mallopt failed)")

    torch.set_num_threads(args.threads)
    if "qnnpack" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "qnnpack"
    if args.verdicts:
        with open(args.verdicts, "w") as f:
            json.dump(epoch_seconds([args.epoch_variant]) if args.epoch_variant
                      else step_tables(args), f)
        return
    print(f"qat {qat.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {args.threads} threads, {malloc}"
          + ("" if args.epoch else
             f", median of {args.iterations} steps after {args.warmup} warm-up")
          + (", float and qat only (--float-and-qat)" if args.float_and_qat else
             ", every variant in one rotation (--one-rotation)" if args.one_rotation else
             ", each variant in turn with float alone")
          + ("" if args.epoch or args.in_process else ", each model and batch in a fresh process"))
    if args.epoch:
        epoch_table(args, sys.argv[1:])
        return
    verdicts = step_tables(args) if args.in_process else isolated_tables(args, sys.argv[1:])
    print()
    held = True
    for label, ratio, others, ours in verdicts:
        # Below on both counts: the rotations run one after the other, so a change in the
        # machine's load between them moves the medians, and the ratios are each to the
        # float step beside them.
        beats = all(ours < t and ratio < r for t, r in others.values())
        held = held and ratio <= STEP_TARGET and beats
        print(f"{label}: qat {ratio:.2f}x float ({'<=' if ratio <= STEP_TARGET else '>'} "
              f"{STEP_TARGET}x)" + ("" if args.float_and_qat else
                                    f", {'below' if beats else 'not below'} the {len(others)} "
                                    f"other QAT flow(s) run"))
    if args.float_and_qat:
        print(f"target (qat <= {STEP_TARGET}x float; no other QAT flow run): "
              + ("holds" if held else "does not hold"))
        return
    print(f"targets (qat <= {STEP_TARGET}x float and below every other QAT flow): "
          + ("hold" if held else "do not hold"))


if __name__ == "__main__":
    main()
