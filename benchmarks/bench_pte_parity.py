"""How closely each QAT flow's ExecuTorch program follows the simulation it was trained as:
qat (``qat.prepare`` ... ``qat.export`` to ``.pte``) and PyTorch's PT2E flow
(``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``, ``convert_pt2e``, XNNPACK's
partitioner), side by side in one run on the same float model, data and schedule.

    PYTHONPATH=python python benchmarks/bench_pte_parity.py \\
        [--models fashion_cnn resnet18 mobilenet_v2] [--threads 2]

Per model: float training on Fashion-MNIST, then QAT fine-tuning of a copy in each flow
(SGD, the same batches), then each flow's simulation (its QAT model in eval) and its
``.pte`` run in ExecuTorch's runtime on the first 1,000 test images: the SQNR of the
program's outputs against the simulation's, their top-1 agreement, and each accuracy. The
schedules are those of the parity tests (``tests/python/test_executorch.py``,
``tests/python/test_convert.py``): the Fashion-MNIST CNN 300 + 150 steps at batch 128,
torchvision models 100 + 50 steps at batch 32 on 32x32 RGB images.

Target (issue 17): qat's program agrees with its simulation at least as well as PT2E's
with its own. The script reports; it does not assert.
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
import torchvision

import qat
from qat import _pte
from qat.datasets import load_fashion_mnist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from helpers import FashionNet  # noqa: E402 - the parity tests' CNN, not a copy

EVAL = 1000
BATCH = 500  # a .pte runs the shape it was exported with


def _rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear",
                         align_corners=False).expand(-1, 3, -1, -1).contiguous()


MODELS = {
    # name: (factory, input transform, float steps, QAT steps, batch, learning rate)
    "fashion_cnn": (FashionNet, lambda x: x, 300, 150, 128, 0.05),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), lambda x: _rgb(x, 32),
                 100, 50, 32, 0.02),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10),
                     lambda x: _rgb(x, 32), 100, 50, 32, 0.02),
}


def _train(model, images, labels, steps, lr, batch, transform, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        loss = F.cross_entropy(model(transform(images[idx])), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _lower(model, example, path) -> None:
    with open(path, "wb") as f:
        f.write(_pte.lower(model, (example,))[0])


def _run_pte(path, batches):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    program = _load_for_executorch(path)
    return torch.cat([program.forward([b])[0] for b in batches])


def _row(name, simulation, program, labels) -> str:
    noise = (simulation - program).double().pow(2).sum().item()
    signal = simulation.double().pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    agree = (simulation.argmax(1) == program.argmax(1)).float().mean().item()
    acc_sim = (simulation.argmax(1) == labels).float().mean().item()
    acc_pte = (program.argmax(1) == labels).float().mean().item()
    return (f"{name:<6} {sqnr:9.1f} {agree:10.4f} {acc_sim:9.4f} {acc_pte:9.4f}")


def run_model(name: str, folder: str) -> None:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e import (move_exported_model_to_eval,
                                           move_exported_model_to_train)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    factory, transform, float_steps, qat_steps, batch, lr = MODELS[name]
    images, labels = load_fashion_mnist(train=True)
    test_x, test_y = load_fashion_mnist(train=False)
    batches = [transform(test_x[i:i + BATCH]) for i in range(0, EVAL, BATCH)]
    test_y = test_y[:EVAL]
    torch.manual_seed(0)
    model = factory()
    _train(model, images, labels, float_steps, lr, batch, transform, seed=0)

    # qat
    qmodel = qat.prepare(copy.deepcopy(model))
    _train(qmodel, images, labels, qat_steps, lr / 4, batch, transform, seed=1)
    qat.disable_observer(qmodel)
    qmodel.eval()
    ours_path = os.path.join(folder, f"{name}-qat.pte")
    qat.export(qmodel, ours_path, batches[0])
    with torch.no_grad():
        ours_sim = torch.cat([qmodel(b) for b in batches])
    ours_pte = _run_pte(ours_path, batches)

    # PT2E
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    example = transform(images[:batch])
    # Any batch: trained at ``batch``, evaluated at BATCH.
    graph = torch.export.export(copy.deepcopy(model).train(), (example,), strict=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},)
                                ).module()
    prepared = prepare_qat_pt2e(graph, quantizer)
    move_exported_model_to_train(prepared)
    _train(prepared, images, labels, qat_steps, lr / 4, batch, transform, seed=1)
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        pt2e_sim = torch.cat([prepared(b) for b in batches])
    converted = convert_pt2e(prepared)
    pt2e_path = os.path.join(folder, f"{name}-pt2e.pte")
    _lower(converted, batches[0], pt2e_path)
    pt2e_pte = _run_pte(pt2e_path, batches)

    print(f"\n{name}: {len(test_y)} test images, .pte vs its own simulation")
    print(f"{'flow':<6} {'SQNR dB':>9} {'top-1 agr':>10} {'acc sim':>9} {'acc pte':>9}")
    print(_row("qat", ours_sim, ours_pte, test_y))
    print(_row("PT2E", pt2e_sim, pt2e_pte, test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    reason = _pte.available()
    if reason is not None:
        sys.exit(f"bench_pte_parity: {reason}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            run_model(name, folder)


if __name__ == "__main__":
    main()
