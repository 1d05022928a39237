"""Manual mixed precision: the first conv and the head at 8-bit weights, the other convs at
4 bits, fine-tuned with QAT on Fashion-MNIST and exported; file size and accuracy against
uniform int8."""

import argparse
import os
import tempfile
from collections import OrderedDict

import torch
from torch import nn

import qat
from qat.datasets import DEFAULT_FASHION_MNIST, load_fashion_mnist


def net() -> nn.Module:
    layers = OrderedDict()
    for i, (c_in, c_out) in enumerate([(1, 16), (16, 64), (64, 64)], 1):
        layers.update({f"conv{i}": nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                       f"bn{i}": nn.BatchNorm2d(c_out), f"relu{i}": nn.ReLU(),
                       f"pool{i}": nn.MaxPool2d(2) if i < 3 else nn.Identity()})
    layers.update(flatten=nn.Flatten(), fc=nn.Linear(64 * 7 * 7, 10))
    return nn.Sequential(layers)


def train(model, images, labels, steps, lr):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        i = step * 64 % len(images)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[i:i + 64]), labels[i:i + 64]).backward()
        optimizer.step()
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_FASHION_MNIST, help="Fashion-MNIST folder")
    parser.add_argument("--float-steps", type=int, default=900, help="float batches of 64")
    parser.add_argument("--qat-steps", type=int, default=200, help="QAT batches of 64")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--out", help="folder of the .ptl files (default: a new temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    images, labels = load_fashion_mnist(args.data, train=True)
    test_images, test_labels = (t[:args.limit] for t in load_fashion_mnist(args.data, False))
    model = train(net(), images, labels, args.float_steps, 2e-3)

    int8 = qat.presets.int8()
    mixed = qat.Config(weight=qat.presets.w4a8().weight,
                       overrides={"conv1": (int8.weight, None), "fc": (int8.weight, None)})
    sizes = {}
    for name, config in (("mixed", mixed), ("int8", int8)):
        qmodel = qat.prepare(model, config)  # a new module in train mode
        qat.calibrate(qmodel, images[:512].split(64), progress=False)
        train(qmodel, images, labels, args.qat_steps, 2e-4)
        if name == "mixed":
            print(qmodel)  # each layer's weight FakeQuantize shows its bits
        path = os.path.join(out, f"{name}.ptl")
        int_model = qat.export(qmodel, path, test_images[:1])
        with torch.no_grad():
            accuracy = (int_model(test_images).argmax(1) == test_labels).float().mean().item()
        sizes[name] = os.path.getsize(path)
        print(f"{name}: accuracy {accuracy:.4f}, {path}: {sizes[name]} bytes")
    print(f"mixed / int8 file size {sizes['mixed'] / sizes['int8']:.3f}")
