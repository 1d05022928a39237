"""A QAT model prepared, calibrated, trained a step and scripted in Python keeps training in
C++: examples/cpp/train_scripted (built into the build folder by scripts/build.sh) loads it
with torch::jit::load, its qat operators registered by libqat, trains it with SGD, and
the losses and the saved model equal those of the same steps taken in Python."""

import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat

from helpers import BUILD_DIR, script, sgd_losses

TRAINER = BUILD_DIR / "train_scripted"

STEPS = 6
LR = 0.05


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def _scripted_qat_model(config, x, y):
    """``_Net`` prepared with ``config``, calibrated on ``x``, trained one step, scripted."""
    model = qat.prepare(_Net(), config)
    qat.calibrate(model, [x])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return script(model)


def _state(module):
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


# int8 learns nothing but the weights (observers set the qparams); w4a4 also learns
# every step size with LSQ, through the estimator's registered backward.
@pytest.mark.parametrize("preset", ["int8", "w4a4"])
def test_cpp_trainer_keeps_training_a_scripted_qat_model(tmp_path, preset):
    assert TRAINER.is_file(), (
        f"{TRAINER} is missing: scripts/build.sh builds it from examples/cpp/train_scripted.cpp "
        "(or set QAT_BUILD_DIR)")
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 3, (8,))
    model_path, data_path, trained_path = (
        tmp_path / "qat_model.pt", tmp_path / "batch.pt", tmp_path / "trained.pt")
    _scripted_qat_model(getattr(qat.presets, preset)(), x, y).save(str(model_path))
    torch.save({"inputs": x, "targets": y}, data_path)

    run = subprocess.run(
        [str(TRAINER), str(model_path), str(data_path), str(trained_path),
         "--steps", str(STEPS), "--lr", str(LR)],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    cpp_losses = [float(line.split()[-1]) for line in run.stdout.splitlines()
                  if line.startswith("step ")]
    assert len(cpp_losses) == STEPS, run.stdout
    assert cpp_losses[-1] < cpp_losses[0], cpp_losses

    # The same file, trained the same steps by Python: the same executor runs the same
    # graphs, so only the printed digits of the losses differ.
    reference = torch.jit.load(str(model_path))
    # train_scripted's loop: STEPS steps of SGD on one batch.
    reference.train()
    python_losses = sgd_losses(reference, x, y, STEPS, LR)
    torch.testing.assert_close(cpp_losses, python_losses, rtol=1e-5, atol=1e-6)

    trained = torch.jit.load(str(trained_path))
    torch.testing.assert_close(_state(trained), _state(reference), rtol=1e-5, atol=1e-6)
    trained.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(x), reference(x), rtol=1e-5, atol=1e-6)


def test_cpp_trainer_reports_bad_input_in_one_line(tmp_path):
    assert TRAINER.is_file(), f"{TRAINER} is missing: scripts/build.sh builds it"
    missing = tmp_path / "missing.pt"
    run = subprocess.run(
        [str(TRAINER), str(missing), str(missing), str(tmp_path / "out.pt")],
        capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("train_scripted: ") and run.stderr.count("\n") == 1, run.stderr
    assert str(missing) in run.stderr

    run = subprocess.run([str(TRAINER), "a", "b", "c", "--steps", "3x"],
                         capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (1, "train_scripted: --steps expects a number, got '3x'\n")
