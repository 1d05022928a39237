"""A custom straight-through estimator registered from Python: ``leaky_ste`` passes the
gradient inside the quantization range, as ``ste`` does, and a tenth of it outside, where
``ste`` passes none, so clipped activations keep learning. It is used by name in a
QuantSpec, and a QAT model on Fashion-MNIST trains with it."""

import argparse

import torch
from torch import nn

import qat
from qat.datasets import DEFAULT_FASHION_MNIST, load_fashion_mnist


@qat.estimators.register("leaky_ste", description="STE with a 0.1 gradient past the range")
class LeakySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_scale, ewgs_delta):
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        s, z = scale.reshape(shape), zero_point.reshape(shape).to(x.dtype)
        ctx.save_for_backward((x >= (quant_min - z) * s) & (x <= (quant_max - z) * s))
        return torch.ops.qat.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return (torch.where(inside, grad, 0.1 * grad),) + (None,) * 7


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_FASHION_MNIST, help="Fashion-MNIST folder")
    parser.add_argument("--steps", type=int, default=300, help="QAT batches of 64")
    parser.add_argument("--limit", type=int, default=10000, help="test images evaluated")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = load_fashion_mnist(args.data, train=True)
    test_images, test_labels = (t[:args.limit] for t in load_fashion_mnist(args.data, False))
    x = torch.linspace(-2, 2, 5, requires_grad=True)
    qat.ops.fake_quantize(x, 1 / 127, 0, -127, 127, estimator="leaky_ste").sum().backward()
    print(f"leaky_ste gradient of fake_quantize on {x.tolist()} (range [-1, 1]): "
          f"{[round(g, 3) for g in x.grad.tolist()]}")

    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    grads = {}
    for estimator in ("ste", "leaky_ste"):
        # A low percentile clips 1% of each activation, so the estimators' gradients part.
        activation = qat.QuantSpec(observer="percentile", percentile=99.0, estimator=estimator)
        qmodel = qat.prepare(model, qat.Config(activation=activation))
        qat.calibrate(qmodel, images[:256].split(64), progress=False)
        nn.functional.cross_entropy(qmodel(images[:64]), labels[:64]).backward()
        grads[estimator] = qmodel.get_submodule("0").weight.grad.clone()
    difference = (grads["leaky_ste"] - grads["ste"]).norm() / grads["ste"].norm()
    print(f"first conv's weight gradient, leaky_ste vs ste: relative difference "
          f"{difference.item():.4f}")

    optimizer = torch.optim.Adam(qmodel.parameters(), lr=2e-3)  # the leaky_ste model
    for step in range(args.steps):
        i = 64 * (step + 1) % len(images)
        optimizer.zero_grad()
        nn.functional.cross_entropy(qmodel(images[i:i + 64]), labels[i:i + 64]).backward()
        optimizer.step()
    int_model = qat.convert(qmodel)
    with torch.no_grad():
        accuracy = (int_model(test_images).argmax(1) == test_labels).float().mean().item()
    print(f"int8 accuracy after {args.steps} QAT steps with leaky_ste: {accuracy:.4f}")
