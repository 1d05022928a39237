"""The lowered form (qat.quantized.LoweredOp, csrc/qat/lowered.h): what each integer module of
a converted model says of itself, checked against the simulation it came from, and the one
metadata writer (qat::metadata_json) that reads it."""

import json

import pytest
import torch
from torch import nn

import qat
from qat import quantized
from qat._C import _metadata_json
from qat.fake_quant import FakeQuantize


class _Net(nn.Module):
    """conv-bn-relu, a residual add with a ReLU, hardswish, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(x + self.conv2(x))
        x = nn.functional.hardswish(x)
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def _converted(config):
    torch.manual_seed(0)
    qmodel = qat.prepare(_Net(), config)
    with torch.no_grad():
        for _ in range(3):
            qmodel(torch.randn(4, 3, 16, 16))
    torch.backends.quantized.engine = "qnnpack"
    return qmodel, qat.convert(qmodel)


def _fake_quant_after(qmodel, name):
    """The FakeQuantize whose output the graph node of module ``name`` feeds (through a
    ReLU), read from the prepared graph: what the simulation quantizes that op's output
    with."""
    node = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == name)
    while True:
        (node,) = node.users
        module = qmodel.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuantize):
            return module


def _fake_quant_after_function(qmodel, name):
    node = next(n for n in qmodel.graph.nodes if n.name == name)
    (user,) = node.users
    return qmodel.get_submodule(user.target)


@pytest.mark.parametrize("config", [qat.presets.int8(), qat.presets.w4a8()],
                         ids=["int8", "w4a8"])
def test_each_integer_layer_lowers_to_the_simulations_integers_and_qparams(config):
    qmodel, int_model = _converted(config)
    simulation = qmodel.eval()
    qat.disable_observer(simulation)
    layers = {name: m for name, m in int_model.named_modules()
              if isinstance(m, quantized._IntegerLayer)}
    assert sorted(layers) == ["conv", "conv2", "fc"]
    for name, module in layers.items():
        op = module.lowered(name)
        qat_layer = qmodel.get_submodule(name)
        fq = qat_layer.weight_fake_quant
        with torch.no_grad():
            if hasattr(qat_layer, "bn"):
                bn = qat_layer.bn
                factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                expected = fq.fake_quantize_folded(qat_layer.weight, factor) * factor.reshape(
                    -1, 1, 1, 1)
            else:
                expected = fq(qat_layer.weight)
        assert op.name == name and op.kind == type(module).__name__
        # The stored integers are the simulation's weight, to the float32 rounding of a
        # scale times an integer.
        torch.testing.assert_close(op.weight.dequantize(), expected, rtol=0,
                                   atol=1e-6 * float(expected.abs().max()))
        assert op.weight.int_repr().min() >= fq.quant_min
        assert op.weight.int_repr().max() <= fq.quant_max
        assert op.weight_bits == config.weight.bits and op.weight_quant_min == fq.quant_min
        out = _fake_quant_after(qmodel, name)
        assert (op.scale, op.zero_point) == (float(out.scale), int(out.zero_point))
        if op.kind == "Conv2d":
            assert (op.stride, op.padding, op.dilation, op.groups) == (
                list(qat_layer.stride), list(qat_layer.padding), list(qat_layer.dilation),
                qat_layer.groups)
    assert layers["conv"].lowered("conv").relu
    assert not layers["conv2"].lowered("conv2").relu


def test_ops_without_weights_lower_to_their_output_qparams():
    qmodel, int_model = _converted(qat.presets.int8())
    kinds = {type(m).__name__: m.lowered(name) for name, m in int_model.named_modules()
             if isinstance(m, (quantized.Quantize, quantized._WithOutputQParams))
             and not isinstance(m, quantized._IntegerLayer)}
    assert {"Quantize", "Add", "Hardswish"} <= set(kinds)
    add = kinds["Add"]
    module = int_model.get_submodule(add.name)
    assert add.weight is None and add.bias is None
    assert (add.scale, add.zero_point, add.relu) == (module.scale, module.zero_point,
                                                     module.relu)
    # The add's output qparams are those of the FakeQuantize the simulation puts after it.
    fq = _fake_quant_after_function(qmodel, "add")
    assert (add.scale, add.zero_point) == (float(fq.scale), int(fq.zero_point))


def test_the_metadata_writer_describes_every_lowered_op(tmp_path):
    qmodel, int_model = _converted(qat.presets.w4a8())
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.pt"
    qat.export(int_model, path, x, mobile=False)
    meta = qat.read_metadata(path)
    ops = {name: m for name, m in int_model.named_modules()
           if isinstance(m, (quantized.Quantize, quantized._WithOutputQParams))}
    assert [layer["name"] for layer in meta["layers"]] == list(ops)
    for layer in meta["layers"]:
        module = ops[layer["name"]]
        assert layer["type"] == type(module).__name__
        assert (layer["scale"], layer["zero_point"]) == (module.scale, module.zero_point)
        if isinstance(module, quantized._IntegerLayer):
            assert layer["weight_bits"] == 4 and layer["relu"] == module.relu
            assert layer["weight_shape"] == list(module.weight_shape)
            assert layer["weight_scale_min"] == module.weight_scale.min().item()
            assert layer["weight_scale_max"] == module.weight_scale.max().item()
        else:
            assert "weight_bits" not in layer
    assert meta["example_inputs"] == [{"shape": [2, 3, 16, 16], "dtype": "torch.float32"}]
    assert meta["config"] == json.loads(qmodel.qat_config)
    assert meta["torch_version"] == torch.__version__
    assert meta["quantized_engine"] == "qnnpack"


def test_the_metadata_writer_names_a_dtype_it_cannot_write():
    op = quantized.LoweredOp("0", "Quantize", 0.5, 3)
    with pytest.raises(ValueError, match="dtype ComplexFloat, which the metadata cannot name"):
        _metadata_json([op], "{}", "qnnpack", torch.__version__,
                       [torch.zeros(2, dtype=torch.complex64)])
    meta = json.loads(_metadata_json([op], "{}", "qnnpack", "x", [torch.zeros(1, 2)]))
    assert meta["layers"] == [{"name": "0", "type": "Quantize", "scale": 0.5, "zero_point": 3}]
    assert meta["example_inputs"] == [{"shape": [1, 2], "dtype": "torch.float32"}]


def test_embedding_tables_lower_to_their_stored_rows_and_are_described(tmp_path):
    """An embedding (float out) lowers with scale 1 and zero point 0 and its table: the
    stored unsigned rows, per-row scales and zero points; the file's metadata lists it,
    so that python -m qat inspect shows it."""
    torch.manual_seed(0)
    qmodel = qat.prepare(nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2)),
                         qat.presets.w4a8())
    tokens = torch.randint(0, 20, (4, 3))
    qat.calibrate(qmodel, [tokens], progress=False)
    path = tmp_path / "model.pt"
    int_model = qat.export(qmodel, path, tokens, mobile=False)
    table = int_model.get_submodule("0")
    op = table.lowered("0")
    assert (op.kind, op.scale, op.zero_point, op.weight_bits) == ("Embedding", 1.0, 0, 4)
    stored = table.table()
    assert torch.equal(op.weight.int_repr(), stored.int_repr())
    torch.testing.assert_close(op.weight.dequantize(), stored.dequantize(), rtol=0, atol=0)
    layer = qat.read_metadata(path)["layers"][0]
    assert (layer["name"], layer["type"], layer["weight_bits"]) == ("0", "Embedding", 4)
    assert layer["weight_shape"] == [20, 8]
    assert layer["weight_scale_max"] == pytest.approx(table.weight_scale.max().item())
