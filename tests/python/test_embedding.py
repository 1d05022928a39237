"""qat.modules.Embedding / EmbeddingBag against F.embedding / F.embedding_bag on a table
fake-quantized per row by plain torch; gradients (straight through, none for padding_idx),
max_norm, parameter sharing, argument errors, state_dict and training."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat import QuantSpec
from qat.export import load

EPS = torch.finfo(torch.float32).eps


def reference_table(weight, quant_min=0, quant_max=255, symmetric=False):
    """(fake-quantized table, scale, zero_point): per-row min/max qparams computed here with
    plain tensor ops (the range widened to contain 0, scale at least float32 eps), then
    fake-quantized by ATen."""
    w = weight.detach()
    lo = torch.clamp(w.amin(dim=1), max=0)
    hi = torch.clamp(w.amax(dim=1), min=0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((quant_max - quant_min) / 2), min=EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=EPS)
        zero_point = torch.clamp(quant_min - torch.round(lo / scale), quant_min,
                                 quant_max).to(torch.int32)
    table = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, quant_min,
                                                   quant_max)
    return table, scale, zero_point


def check_qparams(fq, scale, zero_point):
    torch.testing.assert_close(fq.scale, scale, rtol=0, atol=0)
    assert torch.equal(fq.zero_point, zero_point)


def test_embedding_matches_reference():
    torch.manual_seed(0)
    float_mod = nn.Embedding(20, 8, padding_idx=3)
    mod = qat.modules.Embedding.from_float(float_mod)
    idx = torch.randint(0, 20, (4, 6))
    idx[0, 0] = 3
    out = mod(idx)
    table, scale, zero_point = reference_table(float_mod.weight)
    check_qparams(mod.weight_fake_quant, scale, zero_point)
    torch.testing.assert_close(out, F.embedding(idx, table), rtol=0, atol=0)
    assert not torch.equal(out, float_mod(idx))  # the table really was quantized
    assert torch.all(out[0, 0] == 0)  # the padding row is zero and stays zero quantized


def test_default_spec_is_per_row_affine_uint8():
    fq = qat.modules.Embedding(5, 3).weight_fake_quant
    assert fq.spec.per_channel and fq.spec.axis == 0 and not fq.spec.symmetric
    assert (fq.quant_min, fq.quant_max) == (0, 255)


def test_weight_spec_is_per_row_whatever_axis_it_names():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=True, per_channel=True, axis=1, observer="minmax")
    mod = qat.modules.Embedding.from_float(nn.Embedding(12, 5), spec)
    assert mod.weight_fake_quant.spec.axis == 0 and spec.axis == 1
    idx = torch.arange(12)
    table, scale, zero_point = reference_table(mod.weight, -8, 7, symmetric=True)
    out = mod(idx)
    check_qparams(mod.weight_fake_quant, scale, zero_point)
    torch.testing.assert_close(out, table, rtol=0, atol=0)


def test_empty_input():
    mod = qat.modules.Embedding(7, 3)
    assert mod(torch.zeros(0, dtype=torch.long)).shape == (0, 3)
    bag = qat.modules.EmbeddingBag(7, 3, mode="sum")
    out = bag(torch.tensor([1, 2]), torch.tensor([0, 0, 2]))  # the first bag is empty
    assert out.shape == (3, 3) and torch.all(out[0] == 0)


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_gradients_straight_through(scale_grad_by_freq):
    torch.manual_seed(0)
    mod = qat.modules.Embedding(10, 4, padding_idx=1, scale_grad_by_freq=scale_grad_by_freq)
    idx = torch.tensor([[1, 2, 2, 5], [1, 9, 2, 0]])
    upstream = torch.randn(2, 4, 4)
    mod(idx).backward(upstream)

    # The per-row min/max range holds every element, so the straight-through estimator
    # passes the lookup's gradient unchanged to the float table.
    table = reference_table(mod.weight)[0].requires_grad_()
    F.embedding(idx, table, padding_idx=1, scale_grad_by_freq=scale_grad_by_freq).backward(
        upstream)
    torch.testing.assert_close(mod.weight.grad, table.grad, rtol=0, atol=0)
    assert torch.all(mod.weight.grad[1] == 0)  # padding_idx
    assert torch.all(mod.weight.grad[2] != 0)
    assert torch.all(mod.weight.grad[3] == 0)  # not looked up


BAGS = [
    dict(mode="sum"),
    dict(mode="mean"),
    dict(mode="max"),
    dict(mode="mean", include_last_offset=True),
    dict(mode="sum", padding_idx=0),
]


@pytest.mark.parametrize("kwargs", BAGS, ids=["sum", "mean", "max", "last_offset", "padding"])
def test_embedding_bag_matches_reference(kwargs):
    torch.manual_seed(0)
    float_mod = nn.EmbeddingBag(15, 6, **kwargs)
    mod = qat.modules.EmbeddingBag.from_float(float_mod)
    idx = torch.tensor([0, 3, 4, 0, 7, 14, 2, 2, 9])
    offsets = torch.tensor([0, 2, 5, 9] if kwargs.get("include_last_offset") else [0, 2, 5])
    out = mod(idx, offsets)
    table = reference_table(float_mod.weight)[0].requires_grad_()
    expected = F.embedding_bag(idx, table, offsets, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(out, float_mod(idx, offsets))

    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(float_mod.weight.grad, table.grad, rtol=0, atol=0)
    if "padding_idx" in kwargs:
        assert torch.all(float_mod.weight.grad[0] == 0)


def test_embedding_bag_2d_input():
    torch.manual_seed(0)
    mod = qat.modules.EmbeddingBag(10, 4, mode="max")
    idx = torch.randint(0, 10, (3, 5))
    out = mod(idx)
    table = reference_table(mod.weight)[0]
    torch.testing.assert_close(out, F.embedding_bag(idx, table, mode="max"), rtol=0, atol=0)


def test_embedding_bag_per_sample_weights():
    torch.manual_seed(0)
    mod = qat.modules.EmbeddingBag(10, 4, mode="sum")
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
    offsets = torch.tensor([0, 4])
    weights = torch.rand(8, requires_grad=True)
    out = mod(idx, offsets, per_sample_weights=weights)

    table = reference_table(mod.weight)[0]
    expected = torch.stack([
        (table[idx[:4]] * weights[:4, None]).sum(0),
        (table[idx[4:]] * weights[4:, None]).sum(0),
    ])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    # d(sum of bag)/d(weight_i) is the sum of row idx[i] of the quantized table.
    torch.testing.assert_close(weights.grad, table[idx].sum(1))
    assert mod.weight.grad is not None and torch.all(mod.weight.grad[0] == 0)


def test_per_sample_weights_need_sum_mode():
    mod = qat.modules.EmbeddingBag(10, 4, mode="mean")
    with pytest.raises(NotImplementedError, match="per_sample_weights"):
        mod(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "bag"])
def test_max_norm_renormalizes_the_float_table(bag):
    torch.manual_seed(0)
    kwargs = dict(max_norm=1.0, norm_type=2.0)
    if bag:
        float_mod, qat_cls = nn.EmbeddingBag(10, 4, mode="sum", **kwargs), qat.modules.EmbeddingBag
    else:
        float_mod, qat_cls = nn.Embedding(10, 4, **kwargs), qat.modules.Embedding
    with torch.no_grad():
        float_mod.weight.mul_(3)  # every row's norm above max_norm
    twin = type(float_mod)(10, 4, **kwargs)
    twin.load_state_dict(float_mod.state_dict())
    mod = qat_cls.from_float(float_mod)
    before = float_mod.weight.detach().clone()
    idx = torch.tensor([[1, 2, 2, 5]])
    out = mod(idx)
    twin(idx)  # nn.Embedding(Bag)'s own in-place renormalization

    torch.testing.assert_close(float_mod.weight, twin.weight, rtol=0, atol=0)
    norms = float_mod.weight.detach().norm(dim=1)
    assert torch.all(norms[[1, 2, 5]] <= 1.0 + 1e-6)
    torch.testing.assert_close(float_mod.weight[0], before[0], rtol=0, atol=0)  # not looked up
    table = reference_table(float_mod.weight)[0]
    expected = F.embedding_bag(idx, table, mode="sum") if bag else F.embedding(idx, table)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "bag"])
def test_max_norm_table_converts_with_every_row_renormalized(bag):
    """The converted table holds every row as a lookup would renormalize it, rows the
    calibration never read included, quantized with the simulation's qparams: an integer
    table, read as it is (no in-place change at run time)."""
    torch.manual_seed(0)
    table = (nn.EmbeddingBag(10, 4, mode="sum", max_norm=1.0) if bag
             else nn.Embedding(10, 4, max_norm=1.0))
    with torch.no_grad():
        table.weight.mul_(3)  # every row's norm above max_norm
    qmodel = qat.prepare(nn.Sequential(table))
    qat.calibrate(qmodel, [torch.tensor([[0, 1, 2, 3, 4]])], progress=False)  # rows 5-9 unread
    int_model, report = qat.convert(qmodel, return_report=True)
    assert isinstance(int_model.get_submodule("0"), qat.quantized.Embedding)
    assert report.integer_weight_share == 1.0
    # Renormalized here with plain tensor ops (max_norm / (norm + 1e-7), as nn.Embedding),
    # quantized by ATen with the simulation's per-row qparams.
    weight = qmodel.get_submodule("0").weight.detach()
    norms = weight.norm(dim=1, keepdim=True)
    renormed = torch.where(norms > 1.0, weight * (1.0 / (norms + 1e-7)), weight)
    fq = qmodel.get_submodule("0").weight_fake_quant
    reference = torch.fake_quantize_per_channel_affine(renormed, fq.scale, fq.zero_point, 0,
                                                       fq.quant_min, fq.quant_max)
    every_row = torch.arange(10).reshape(2, 5)
    expected = (F.embedding_bag(every_row, reference, mode="sum") if bag
                else F.embedding(every_row, reference))
    with torch.no_grad():
        got = int_model(every_row)
        # The simulation renormalizes rows 5-9 as it reads them, and agrees.
        simulation = qmodel.eval()(every_row)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(simulation, expected, rtol=1e-6, atol=1e-6)
    assert "embedding_renorm" not in int_model.code


@pytest.mark.parametrize("max_norm", [None, 1.0], ids=["plain", "max_norm"])
def test_skipped_table_reads_indices_and_converts_as_the_float_table(tmp_path, max_norm):
    """A table skipped in the Config stays the float nn.Embedding: its indices get no
    FakeQuantize, and the converted model and its file read each row as the float model's
    lookup does, rows never read before conversion included (with max_norm: renormalized
    at conversion, as a lookup renormalizes it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, max_norm=max_norm), nn.Flatten(),
                          nn.Linear(30, 3))
    with torch.no_grad():
        model[0].weight.mul_(3)  # every row's norm above max_norm
    float_table = copy.deepcopy(model[0])
    qmodel = qat.prepare(model, dataclasses.replace(qat.presets.int8(), skip=("0",)))
    placeholder = next(n for n in qmodel.graph.nodes if n.op == "placeholder")
    assert [u.target for u in placeholder.users] == ["0"]
    assert type(qmodel.get_submodule("0")) is nn.Embedding
    seen = torch.randint(0, 10, (8, 5))  # rows 10-19 never read before conversion
    qat.calibrate(qmodel, [seen], progress=False)
    path = tmp_path / "table.pt"
    int_model = qat.export(qmodel, path, seen, mobile=False)
    every_row = torch.arange(20).reshape(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(int_model.get_submodule("0")(every_row),
                                   float_table(every_row), rtol=0, atol=0)
        torch.testing.assert_close(torch.jit.load(str(path))(every_row), int_model(every_row),
                                   rtol=0, atol=0)


def test_from_float_shares_parameters_and_settings():
    float_mod = nn.Embedding(9, 3, padding_idx=-1, max_norm=2.0, norm_type=1.0,
                             scale_grad_by_freq=True).eval()
    mod = qat.modules.lookup(float_mod).from_float(float_mod)
    assert type(mod) is qat.modules.Embedding
    assert mod.weight is float_mod.weight and list(mod.parameters()) == [float_mod.weight]
    assert (mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq) == (
        8, 2.0, 1.0, True)
    assert not mod.training

    float_bag = nn.EmbeddingBag(9, 3, mode="max", include_last_offset=True, padding_idx=2)
    bag = qat.modules.lookup(float_bag).from_float(float_bag)
    assert type(bag) is qat.modules.EmbeddingBag and bag.weight is float_bag.weight
    assert (bag.mode, bag.include_last_offset, bag.padding_idx) == ("max", True, 2)
    assert bag.training


def test_weight_only_attribute():
    assert qat.modules.Embedding.weight_only is True
    assert qat.modules.EmbeddingBag.weight_only is True
    assert getattr(qat.modules.Linear, "weight_only", False) is False


@pytest.mark.parametrize("qat_cls", [qat.modules.Embedding, qat.modules.EmbeddingBag])
def test_from_float_rejects_other_classes(qat_cls):
    expected = rf"expected a torch\.nn\.modules\.sparse\.{qat_cls._FLOAT_MODULE.__name__}, "
    with pytest.raises(TypeError, match=expected + "got Linear"):
        qat_cls.from_float(nn.Linear(3, 4))

    # A subclass that overrides a method may compute something else; one that overrides
    # nothing computes as the float class (qat.modules.registry.registered_base).
    class MyEmbedding(qat_cls._FLOAT_MODULE):
        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    with pytest.raises(TypeError, match="got MyEmbedding"):
        qat_cls.from_float(MyEmbedding(5, 2))

    class PlainEmbedding(qat_cls._FLOAT_MODULE):
        pass

    float_module = PlainEmbedding(5, 2)
    assert qat_cls.from_float(float_module).weight is float_module.weight


@pytest.mark.parametrize("float_cls", [nn.Embedding, nn.EmbeddingBag])
def test_sparse_is_refused(float_cls):
    qat_cls = qat.modules.lookup(float_cls)
    with pytest.raises(ValueError, match="sparse=True"):
        qat_cls(5, 2, sparse=True)
    with pytest.raises(ValueError, match="sparse=True"):
        qat_cls.from_float(float_cls(5, 2, sparse=True))


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "bag"])
def test_state_dict_round_trip(bag):
    torch.manual_seed(0)
    qat_cls = qat.modules.EmbeddingBag if bag else qat.modules.Embedding
    mod = qat_cls(11, 4)
    idx = torch.randint(0, 11, (3, 4))
    out = mod(idx)
    state = mod.state_dict()
    assert state["weight_fake_quant.scale"].shape == (11,)

    fresh = qat_cls(11, 4)
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    for name, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
        else:  # the FakeQuantize's extra state: its spec
            assert value == state[name], name
    fresh.weight_fake_quant.disable_observer()  # the loaded qparams alone must reproduce it
    torch.testing.assert_close(fresh(idx), out, rtol=0, atol=0)


def test_training_reduces_loss():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(30, 8, mode="mean")
    mod = qat.modules.EmbeddingBag.from_float(bag)
    head = nn.Linear(8, 1)
    idx = torch.randint(0, 30, (64, 5))
    target = torch.randn(64, 1)
    optimizer = torch.optim.SGD(list(bag.parameters()) + list(head.parameters()), lr=0.5)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(head(mod(idx)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _config_table(bag):
    """reference_table with the range of the config's spec (per row, symmetric int8)."""
    fq = bag.weight_fake_quant
    return reference_table(bag.weight, fq.quant_min, fq.quant_max, symmetric=fq.spec.symmetric)


class _BagNet(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.bag = nn.EmbeddingBag(15, 6, **kwargs)
        self.fc = nn.Linear(6, 3)

    def forward(self, idx, offsets=None, per_sample_weights=None):
        return self.fc(self.bag(idx, offsets, per_sample_weights))


_IDX = torch.tensor([0, 3, 4, 0, 7, 14, 2, 2, 9])
# (bag kwargs, call arguments): 1-D indices with offsets (an empty bag among them), the
# offsets' end included, per-sample weights, 2-D indices (bags of one length).
_INTEGER_BAGS = [
    (dict(mode="sum"), (_IDX, torch.tensor([0, 2, 2, 5]))),
    (dict(mode="mean"), (_IDX, torch.tensor([0, 2, 2, 5]))),
    (dict(mode="mean", include_last_offset=True), (_IDX, torch.tensor([0, 2, 2, 5, 9]))),
    (dict(mode="sum"), (_IDX, torch.tensor([0, 4]), torch.linspace(0.1, 2, 9))),
    (dict(mode="mean"), (_IDX[:8].reshape(2, 4),)),
]


@pytest.mark.parametrize("kwargs, args", _INTEGER_BAGS,
                         ids=["sum", "mean", "last_offset", "per_sample_weights", "2d"])
def test_converted_bag_sums_the_simulations_row_wise_integers(kwargs, args):
    torch.manual_seed(0)
    qmodel = qat.prepare(_BagNet(**kwargs))
    qat.calibrate(qmodel, [(args,)], progress=False)
    int_model, report = qat.convert(qmodel, return_report=True)
    layer = int_model.bag
    assert isinstance(layer, qat.quantized.EmbeddingBag)
    assert report.integer_weight_share == 1.0
    fq = qmodel.bag.weight_fake_quant
    table, scale, zero_point = _config_table(qmodel.bag)
    # The stored rows are the simulation's integers (shifted to the kernel's unsigned
    # rows), with its per-row scales.
    torch.testing.assert_close(layer.table().dequantize(), table, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight_scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight_zero_point, (zero_point - fq.quant_min).float(),
                               rtol=0, atol=0)
    call = dict(zip(("offsets", "per_sample_weights"), args[1:]))
    expected = F.embedding_bag(args[0], table, **call, **kwargs)
    with torch.no_grad():
        # The kernel adds q * scale - zero_point * scale, the simulation (q - zero_point) *
        # scale: float rounding apart.
        torch.testing.assert_close(layer(*args), expected, rtol=1e-6, atol=1e-6)
        parity = qat.compare(qmodel, int_model, [(args,)])
    assert parity["sqnr_db"] > 60, parity


@pytest.mark.parametrize("kwargs", [dict(mode="max"), dict(mode="sum", padding_idx=0)],
                         ids=["max", "padding"])
def test_bags_the_kernel_cannot_reduce_stay_float(kwargs):
    """The kernel sums every entry: max bags and bags that leave padding out run the float
    bag over the fake-quantized table."""
    torch.manual_seed(0)
    qmodel = qat.prepare(_BagNet(**kwargs))
    args = (_IDX, torch.tensor([0, 2, 5]))
    qat.calibrate(qmodel, [(args,)], progress=False)
    int_model, report = qat.convert(qmodel, return_report=True)
    assert type(int_model.bag) is nn.EmbeddingBag
    assert "bag" in report.float_weights
    expected = F.embedding_bag(args[0], _config_table(qmodel.bag)[0], args[1], **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(int_model.bag(*args), expected, rtol=0, atol=0)


def test_integer_bag_model_exports_a_file_that_runs_without_qat(tmp_path):
    """qat.export runs the written .ptl in a fresh process without qat (and refuses a file
    that calls qat's operators); the file computes what the integer model computes."""
    torch.manual_seed(0)
    qmodel = qat.prepare(_BagNet(mode="mean"))
    args = (_IDX, torch.tensor([0, 2, 2, 5]))
    qat.calibrate(qmodel, [(args,)], progress=False)
    path = tmp_path / "bag.ptl"
    int_model = qat.export(qmodel, path, args)
    assert isinstance(int_model.bag, qat.quantized.EmbeddingBag)
    program, _ = load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(program(*args), int_model(*args), rtol=0, atol=0)
    parity = qat.compare(qmodel, str(path), [(args,)])
    assert parity["max_steps"] <= 1 + 1e-3, parity
