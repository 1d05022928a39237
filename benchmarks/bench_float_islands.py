"""What the float islands cost: the averages qat.convert leaves in float between a
dequantize and a quantize, timed against PyTorch's quantized kernel for the same op and
against the whole integer model.

    PYTHONPATH=python python benchmarks/bench_float_islands.py [--models NAME ...]
        [--threads 2] [--iterations 200]

Average pooling and mean have quantized kernels, but those write their output on the
input's grid: the requantization to the output's qparams (the FakeQuantize the simulation
puts after the average) would round a second time where the simulation rounds once, and
move outputs by a step. So the integer model runs them in float: dequantize, the op,
quantize. This measures what that choice costs at run time.

Per model (torchvision, 10 classes, 1x3x224x224, qnnpack; prepared, calibrated on random
data, converted), each float op of the ConversionReport on the tensor it sees there, timed
round-robin with the whole integer model (TorchScript, batch 1):
- float island: dequantize, the op, quantize to the output's qparams (what qat runs);
- quantized kernel: the op on the quantized tensor, then the requantization (two roundings);
and the islands' share of the model's time. The script reports; it does not assert.
"""

import argparse
import warnings

import torch
import torch.fx as fx
import torchvision

import qat
from qat.mobile import round_robin_ms


class _Recorder(fx.Interpreter):
    """Runs the integer model and keeps, for each float op named in ``names``, its node
    and the quantized tensor its dequantize read."""

    def __init__(self, gm: fx.GraphModule, names):
        super().__init__(gm)
        self.names, self.seen, self.dequantized = set(names), {}, {}

    def run_node(self, node: fx.Node):
        if isinstance(node.args[0] if node.args else None, fx.Node):
            # The interpreter frees a value after its last use: keep what each dequantize
            # reads while it is there.
            self.dequantized[node] = self.env.get(node.args[0])
        result = super().run_node(node)
        if node.name in self.names:
            self.seen[node.name] = (node, self.dequantized[node.args[0]])
        return result


def _call(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor):
    """``node``'s op on ``x`` in place of its first argument."""
    args = (x, *node.args[1:])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **node.kwargs)
    if node.op == "call_method":
        return getattr(x, node.target)(*node.args[1:], **node.kwargs)
    return node.target(*args, **node.kwargs)


def measure(name: str, iterations: int) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    qmodel = qat.prepare(model)
    x = torch.randn(1, 3, 224, 224)
    qat.calibrate(qmodel, [torch.randn(4, 3, 224, 224) for _ in range(2)], progress=False)
    int_model, report = qat.convert(qmodel.eval(), return_report=True)
    names = [entry.split(" ")[0] for entry in report.float]
    recorder = _Recorder(int_model, names)
    with torch.no_grad():
        recorder.run(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.freeze(torch.jit.script(int_model.eval()))
    calls = {"model": lambda: scripted(x)}
    for op_name, (node, q) in recorder.seen.items():
        (user,) = node.users  # the Quantize after the island
        out = int_model.get_submodule(user.target)
        scale, zero_point, dtype = out.scale, out.zero_point, out.dtype

        def island(node=node, q=q, scale=scale, zero_point=zero_point, dtype=dtype):
            return torch.quantize_per_tensor(_call(int_model, node, q.dequantize()), scale,
                                             zero_point, dtype)

        def kernel(node=node, q=q, scale=scale, zero_point=zero_point, dtype=dtype):
            return torch.quantize_per_tensor(_call(int_model, node, q).dequantize(), scale,
                                             zero_point, dtype)

        calls[f"{op_name} float"] = island
        calls[f"{op_name} kernel"] = kernel
    with torch.no_grad():
        times = round_robin_ms(calls, iterations)
    total = times["model"][0]
    islands = sum(t[0] for key, t in times.items() if key.endswith(" float"))
    print(f"\n{name}: integer model {total:.2f} ms (median of {iterations}); float ops "
          f"{', '.join(recorder.seen) or 'none'}")
    print("| op | input shape | float island ms | quantized kernel + requantize ms | "
          "island / model |")
    print("|---|---|---|---|---|")
    for op_name, (_, q) in recorder.seen.items():
        island, kernel = times[f"{op_name} float"][0], times[f"{op_name} kernel"][0]
        print(f"| {op_name} | {list(q.shape)} | {island:.4f} | {kernel:.4f} | "
              f"{100 * island / total:.2f}% |")
    print(f"all islands: {100 * islands / total:.2f}% of the model's time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "qnnpack"
    print(f"torch {torch.__version__}, qat {qat.__version__}, qnnpack, "
          f"{args.threads} threads")
    for name in args.models:
        measure(name, args.iterations)


if __name__ == "__main__":
    main()
