"""Post-training quantization: a small CNN trained in float on Fashion-MNIST, then only
calibrated (no quantization-aware training), converted to int8 and checked against the
simulation it was converted from."""

import argparse

import torch
from torch import nn

import qat
from qat.datasets import DEFAULT_FASHION_MNIST, load_fashion_mnist


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_FASHION_MNIST, help="Fashion-MNIST folder")
    parser.add_argument("--train-limit", type=int, default=60000, help="training images used")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--calibration-images", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = load_fashion_mnist(args.data, train=True)
    images, labels = images[:args.train_limit], labels[:args.train_limit]
    test_images, test_labels = load_fashion_mnist(args.data, train=False)
    test_images, test_labels = test_images[:args.limit], test_labels[:args.limit]

    model = small_cnn()  # one epoch of float training
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(0, len(images), 64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[i:i + 64]), labels[i:i + 64]).backward()
        optimizer.step()
    model.eval()

    qmodel = qat.prepare(model)  # default config: int8 weights and activations
    qat.calibrate(qmodel, images[:args.calibration_images].split(64))
    int_model = qat.convert(qmodel)
    parity = qat.compare(qmodel, int_model, test_images.split(256))
    print(f"float accuracy {accuracy(model, test_images, test_labels):.4f}")
    print(f"int8 accuracy {accuracy(int_model, test_images, test_labels):.4f} "
          f"(calibrated on {args.calibration_images} images, no training)")
    print(f"parity: top-1 agreement {parity['top1_agreement']:.4f}, within one step "
          f"{parity['within_one_step']:.4f}, SQNR {parity['sqnr_db']:.1f} dB")
