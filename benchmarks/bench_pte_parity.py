"""How closely each QAT flow's ExecuTorch program follows the simulation it was trained as:
qat (``qat.prepare`` ... ``qat.export`` to ``.pte``) and PyTorch's PT2E flow
(``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``, ``convert_pt2e``, XNNPACK's
partitioner), side by side in one run on the same float model, data and schedule.

    PYTHONPATH=python python benchmarks/bench_pte_parity.py [--models NAME ...] [--threads 2]

Per model: float training on Fashion-MNIST, then QAT of a copy in each flow (the same
batches, optimizer and steps), then each flow's simulation (its QAT model in eval) and its
``.pte`` run in ExecuTorch's runtime on the first 1,000 test images: the SQNR of the
program's outputs against the simulation's, their top-1 agreement, and each accuracy. The
recipes are the parity tests' own (imported, not copied): the Fashion-MNIST CNN of
``tests/python/conftest.py`` (300 float + 150 QAT SGD steps at batch 128) and the six
torchvision models of ``tests/python/test_convert.py`` (``helpers.TORCHVISION_PARITY``:
float training, batch-norm statistics settled, four calibration batches, QAT). PT2E gets
the same calibration batches (observers on, fake quantization off, eval mode) and the same
QAT steps; its exported graph has no BatchNorm modules whose statistics could be settled,
so it keeps the running statistics its QAT left (consistent between its simulation and its
program, which is what is measured), and it trains efficientnet_b0 without stochastic depth
(its random op would stay in PT2E's exported graph in eval). efficientnet_b0 alone takes
about 11 minutes on 2 cores.

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
import torchvision

import qat
from qat import _pte
from qat.datasets import load_fashion_mnist
from qat.mobile import save_for_executorch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
# The parity tests' models and recipes, not copies.
from helpers import (TORCHVISION_PARITY, FashionNet, calibration_batches,  # noqa: E402
                     parity_lr, train, train_torchvision_float, train_torchvision_qat)

EVAL = 1000
BATCH = 500  # a .pte runs the shape it was exported with
RECIPES = {entry[0]: entry[1:] for entry in TORCHVISION_PARITY}
MODELS = ["fashion_cnn"] + list(RECIPES)


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


def _fashion_cnn(images, labels, gen):
    """conftest.py's ``fashion_qat_model`` recipe, the PT2E half left to the caller."""
    torch.manual_seed(0)
    model = FashionNet()
    train(model, images, labels, 300, 0.05, gen)
    state = gen.get_state()
    qmodel = qat.prepare(model)
    train(qmodel, images, labels, 150, 0.01, gen)
    qat.disable_observer(qmodel)
    pt2e = dict(calibration=[], steps=150, lr=0.01, batch=128, optimizer="sgd",
                example=images[:128])
    return model, qmodel.eval(), (lambda x: x), state, pt2e


def _torchvision(name, images, labels, gen):
    size, optimizer, float_steps, qat_steps = RECIPES[name]
    model, transform = train_torchvision_float(name, size, optimizer, float_steps, images,
                                               labels, gen)
    state = gen.get_state()
    qmodel = train_torchvision_qat(model, transform, optimizer, qat_steps, images, labels, gen)
    pt2e = dict(calibration=calibration_batches(images, transform), steps=qat_steps,
                lr=parity_lr(optimizer) / 4, batch=32, optimizer=optimizer,
                example=transform(images[:32]))
    return model, qmodel, transform, state, pt2e


def _pt2e_qat(model, images, labels, gen, transform, recipe):
    """PyTorch's PT2E QAT of a copy of ``model`` on the same schedule; its simulation."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e import (allow_exported_model_train_eval,
                                           disable_fake_quant, disable_observer,
                                           enable_fake_quant)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    model = copy.deepcopy(model).train()
    for m in model.modules():
        # The settled statistics' cumulative average (momentum None) divides by a counter,
        # which torch.export cannot trace: back to PyTorch's default for QAT.
        if isinstance(m, torch.nn.BatchNorm2d) and m.momentum is None:
            m.momentum = 0.1
        # torch.export bakes a train-mode random op into the graph, and torchao's switch to
        # eval rewrites only dropout and batch norm: efficientnet_b0's stochastic depth
        # would stay random in PT2E's simulation and be refused by ExecuTorch (a bernoulli
        # op), so PT2E trains without it.
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    # Any batch: trained at the recipe's batch, evaluated at BATCH.
    graph = torch.export.export(model, (recipe["example"],),
                                strict=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},)
                                ).module()
    prepared = prepare_qat_pt2e(graph, quantizer)
    allow_exported_model_train_eval(prepared)
    if recipe["calibration"]:
        prepared.eval()
        prepared.apply(disable_fake_quant)
        with torch.no_grad():
            for batch in recipe["calibration"]:
                prepared(batch)
        prepared.apply(enable_fake_quant)
    train(prepared, images, labels, recipe["steps"], recipe["lr"], gen, batch=recipe["batch"],
          transform=transform, optimizer=recipe["optimizer"])
    prepared.apply(disable_observer)
    prepared.eval()  # torchao's replacement returns None, not the module
    return prepared


def run_model(name: str, folder: str) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    images, labels = load_fashion_mnist(train=True)
    test_x, test_y = load_fashion_mnist(train=False)
    gen = torch.Generator().manual_seed(0)
    if name == "fashion_cnn":
        model, qmodel, transform, state, recipe = _fashion_cnn(images, labels, gen)
    else:
        model, qmodel, transform, state, recipe = _torchvision(name, images, labels, gen)
    batches = [transform(test_x[i:i + BATCH]) for i in range(0, EVAL, BATCH)]
    test_y = test_y[:EVAL]

    ours_path = os.path.join(folder, f"{name}-qat.pte")
    qat.export(qmodel, ours_path, batches[0])
    with torch.no_grad():
        ours_sim = torch.cat([qmodel(b) for b in batches])
    ours_pte = _run_pte(ours_path, batches)

    gen.set_state(state)  # PT2E's QAT draws the batches qat's did
    prepared = _pt2e_qat(model, images, labels, gen, transform, recipe)
    with torch.no_grad():
        pt2e_sim = torch.cat([prepared(b) for b in batches])
    pt2e_path = os.path.join(folder, f"{name}-pt2e.pte")
    save_for_executorch(convert_pt2e(prepared), pt2e_path, batches[0])
    pt2e_pte = _run_pte(pt2e_path, batches)

    print(f"\n{name}: {len(test_y)} test images, .pte vs its own simulation", flush=True)
    print(f"{'flow':<6} {'SQNR dB':>9} {'top-1 agr':>10} {'acc sim':>9} {'acc pte':>9}")
    print(_row("qat", ours_sim, ours_pte, test_y))
    print(_row("PT2E", pt2e_sim, pt2e_pte, test_y), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
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
