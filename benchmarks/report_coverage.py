"""Integer coverage on small architectures beyond the ImageNet classics: how much of each
model ``qat.convert`` puts on integer kernels, whether its exported ``.ptl`` runs without
qat, and how closely that file follows the simulation.

    PYTHONPATH=python python benchmarks/report_coverage.py [--models NAME ...]

Six models of the kinds issue 15 names (keyword spotting on 1-D convs, a DenseNet-style
block net, a U-Net with transposed convs, a text CNN over an embedding, a transformer
encoder, an LSTM classifier), each trained briefly (SGD on generated data with a learnable
rule, so that weights, batch-norm statistics and qparams move), then converted and exported
with ``qat.export`` (which runs the written file in a fresh process and refuses a file that
calls qat's operators). Per model: the share of weight elements stored as integers, the
ops left in float, the ``.ptl`` size against the float model's, and the output SQNR and
within-one-step share of the file against the simulation on a held-out batch; the LSTM
classifier uses the dynamic preset and is measured against the float model.

Targets (issue 15): >= 99% of weight elements as integers (transformer and LSTM: every
Linear / RNN weight), >= 30 dB. The script reports; it does not assert.
"""

import argparse
import math
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import qat

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from helpers import (KeywordNet, TextCNN, TextEncoder, sqnr_db,  # noqa: E402 (the tests' models)
                     traced_size)
from qat.export import load  # noqa: E402


class DenseBlockNet(nn.Module):
    """Pre-activation DenseNet-style blocks: BN-ReLU-Conv layers whose outputs are
    concatenated with their inputs, a transition, a linear head."""

    def __init__(self, growth: int = 8, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        channels = 16
        self.norms, self.convs = nn.ModuleList(), nn.ModuleList()
        for _ in range(layers):
            self.norms.append(nn.BatchNorm2d(channels))
            self.convs.append(nn.Conv2d(channels, growth, 3, padding=1, bias=False))
            channels += growth
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                        nn.Conv2d(channels, 16, 1, bias=False))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        for norm, conv in zip(self.norms, self.convs):
            x = torch.cat([x, conv(F.relu(norm(x)))], 1)
        x = self.transition(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SmallUNet(nn.Module):
    """Two down steps, two transposed-conv up steps with skip concatenations, a 1x1 head
    (per-pixel logits)."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.down1, self.down2, self.bottom = block(3, 8), block(8, 16), block(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = block(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = block(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return self.head(u1)


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 48, batch_first=True)
        self.fc = nn.Linear(48, 4)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


def _values(shape):
    def make(n, gen):
        return torch.randn(n, *shape, generator=gen)
    return make


def _tokens(vocabulary, length):
    def make(n, gen):
        return torch.randint(0, vocabulary, (n, length), generator=gen)
    return make


# name -> (model class, input maker, preset).
MODELS = {
    "kws_1d": (KeywordNet, _values((8, 40)), "int8"),
    "densenet_blocks": (DenseBlockNet, _values((3, 16, 16)), "int8"),
    "unet_transposed": (SmallUNet, _values((3, 16, 16)), "int8"),
    "text_cnn": (TextCNN, _tokens(500, 20), "int8"),
    "transformer": (TextEncoder, _tokens(50, 12), "int8"),
    "lstm_dynamic": (LSTMClassifier, _values((10, 16)), "w8a8_dynamic"),
}


def _train(model, make, steps: int, gen) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = make(32, gen)
        out = model(x)
        # The target: whether the input's mean is positive, for every output (a rule there
        # is to learn whatever the output's shape).
        positive = (x.float().flatten(1).mean(1) > 0).float()
        target = positive.reshape([-1] + [1] * (out.dim() - 1)).expand_as(out)
        loss = F.binary_cross_entropy_with_logits(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def measure(name: str, folder: str) -> dict:
    cls, make, preset = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = cls()
    _train(model, make, 60, gen)
    qmodel = qat.prepare(model, getattr(qat.presets, preset)())
    if preset != "w8a8_dynamic":  # dynamic quantization is post-training: compared to float
        _train(qmodel, make, 30, gen)
    qmodel.eval()
    qat.disable_observer(qmodel)
    held_out = make(64, gen)
    row = {"model": name, "preset": preset}
    try:
        _, report = qat.convert(qmodel, return_report=True)
    except Exception as error:  # noqa: BLE001 - a row says why, the others still run
        return {**row, "error": f"convert: {error}"}
    row["integer_weights"] = report.integer_weight_share
    row["float_ops"] = len(report.float)
    row["largest_float"] = ", ".join(report.largest_float_layers(2)) or "-"
    path = os.path.join(folder, f"{name}.ptl")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat.export(qmodel, path, held_out[:1])
    except Exception as error:  # noqa: BLE001
        # The first clause names the cause (the rest is advice and paths).
        return {**row, "error": f"export: {str(error).split(', which')[0][:160]}"}
    row["size_ratio"] = os.path.getsize(path) / traced_size(
        model, held_out[:1], os.path.join(folder, f"{name}_float.pt"))
    with torch.no_grad():
        if preset == "w8a8_dynamic":
            reference = model.eval()(held_out)
            program = load(path)[0]
            got = torch.cat([program(held_out[i:i + 1]) for i in range(len(held_out))])
            row["sqnr_db"] = sqnr_db(reference, got)
            row["within_one_step"] = math.nan
        else:
            parity = qat.compare(qmodel, path, [held_out[i:i + 1] for i in range(len(held_out))])
            row["sqnr_db"] = parity["sqnr_db"]
            row["within_one_step"] = parity["within_one_step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "qnnpack"
    print(f"torch {torch.__version__}, qat {qat.__version__}")
    print("| model | preset | weights as integers | float ops | largest float layers | "
          ".ptl / float size | SQNR vs simulation | within one step |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            row = measure(name, folder)
            if "error" in row and "integer_weights" not in row:
                print(f"| {name} | {row['preset']} | {row['error']} | | | | | |")
                continue
            head = (f"| {name} | {row['preset']} | {100 * row['integer_weights']:.1f}% | "
                    f"{row['float_ops']} | {row['largest_float']} |")
            if "error" in row:
                print(f"{head} {row['error']} | | |")
                continue
            within = ("-" if math.isnan(row["within_one_step"])
                      else f"{100 * row['within_one_step']:.2f}%")
            sqnr = row["sqnr_db"]
            label = " (vs float)" if row["preset"] == "w8a8_dynamic" else ""
            print(f"{head} {row['size_ratio']:.3f} | {sqnr:.1f} dB{label} | {within} |",
                  flush=True)


if __name__ == "__main__":
    main()
