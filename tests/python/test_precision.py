"""qat.sensitivity and qat.auto_precision on a small CNN whose conv2 weight has one large
outlier per output channel (so that low widths hurt it most), fed Fashion-MNIST images:
the table, an SQNR checked against a plain-PyTorch computation, the budget, the most
sensitive layer's width, the returned Config, the errors and the plot."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import qat
import qat.datasets
from qat.precision import SensitivityReport, SensitivityRow, model_size, weight_bits

from helpers import run_python, sqnr_db

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
SENSITIVE = "conv2"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(256, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.1, 0.1)
        net.bn1.running_var.uniform_(0.5, 1.5)
        # One weight per output channel 20 times larger: per-channel scales follow it, and
        # the channel's other weights lose most of their levels.
        weight = net.conv2.weight.view(16, -1)
        weight[torch.arange(16), torch.randint(0, weight.shape[1], (16,))] *= 20
    return net


@pytest.fixture(scope="module")
def data():
    images, labels = qat.datasets.load_fashion_mnist(train=False)
    return images[:256], labels[:256]


@pytest.fixture(scope="module")
def batches(data):
    return list(torch.split(data[0], 64))


@pytest.fixture(scope="module")
def report(model, batches):
    return qat.sensitivity(model, batches, progress=False)


def _float_params(model):
    """Elements of every parameter but the four layers' weights."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name not in {f"{layer}.weight" for layer in LAYERS})


def _size(model, bits):
    """The estimated size in bytes, written out independently of qat.precision."""
    weights = sum(model.get_submodule(layer).weight.numel() * bits[layer] for layer in LAYERS)
    return weights / 8 + 4 * _float_params(model)


def _chosen_bits(config):
    """The widths the returned Config gives the layers: its exact-name overrides, where the
    width differs from the config's weight spec, else that spec's."""
    assert set(config.overrides) <= set(LAYERS)
    for layer, (weight, _) in config.overrides.items():
        assert weight.bits != config.weight.bits, f"{layer}: an override that changes nothing"
    return {layer: (config.overrides[layer][0] if layer in config.overrides
                    else config.weight).bits for layer in LAYERS}


def _estimated_loss(report, bits):
    return sum(10 ** (-report.value(layer, b) / 10) for layer, b in bits.items())


# -- sensitivity -----------------------------------------------------------------------

def test_table_has_every_layer_at_every_width(model, report):
    assert report.metric == "sqnr" and report.unit == "dB"
    assert report.layers == LAYERS and report.bits == [8, 4, 2]
    assert len(report.table) == len(LAYERS) * 3
    for row in report.table:
        assert isinstance(row, SensitivityRow)
        assert row.params == model.get_submodule(row.layer).weight.numel()
        assert math.isfinite(row.value)
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["table"][0] == {"layer": "conv1", "bits": 8,
                                "value": report.value("conv1", 8), "params": 72}


def test_str_is_an_aligned_table(report):
    title, header, *rows = str(report).splitlines()
    assert "SQNR" in title
    assert header.split() == ["layer", "weights", "8", "bits", "4", "bits", "2", "bits"]
    assert [row.split()[0] for row in rows] == LAYERS
    assert len({len(line) for line in [header] + rows}) == 1
    assert f"{report.value('fc1', 4):.2f}" in rows[2]


def test_sqnr_grows_with_the_width(report):
    for layer in LAYERS:
        assert report.value(layer, 8) > report.value(layer, 4) > report.value(layer, 2), layer
        # About 6 dB per bit while the range is not clipped: 4 bits cost well over 10 dB.
        assert report.value(layer, 8) - report.value(layer, 4) > 10, layer


def test_the_layer_with_outliers_is_the_most_sensitive(report):
    assert report.most_sensitive() == SENSITIVE
    for b in (8, 4):
        assert min(LAYERS, key=lambda layer: report.value(layer, b)) == SENSITIVE


@pytest.mark.parametrize("layer, bits", [("fc2", 4), ("conv2", 4), ("fc1", 2)])
def test_sqnr_matches_a_plain_pytorch_computation(model, batches, report, layer, bits):
    quantized = copy.deepcopy(model)
    weight = quantized.get_submodule(layer).weight
    quant_min, quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # Symmetric per-channel minmax: the largest magnitude maps to half the integer span.
    amax = weight.detach().abs().reshape(len(weight), -1).amax(1)
    scale = amax / ((quant_max - quant_min) / 2)
    with torch.no_grad():
        weight.copy_(torch.fake_quantize_per_channel_affine(
            weight, scale, torch.zeros(len(weight), dtype=torch.int32), 0, quant_min,
            quant_max))
        reference = torch.cat([model(x) for x in batches])
        output = torch.cat([quantized(x) for x in batches])
    expected = sqnr_db(reference, output)
    # qat's model folds bn1 into conv1, which moves the output by float rounding only.
    assert report.value(layer, bits) == pytest.approx(expected, abs=0.01)


def test_sensitivity_leaves_the_model_as_it_was(model, batches):
    state = copy.deepcopy(model.state_dict())
    model.train()
    qat.sensitivity(model, batches[:1], candidate_bits=(4,), progress=False)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, qat.FakeQuantize) for m in model.modules())


def test_accuracy_metric(model, batches):
    # Labels the float model gets all right: every drop is the quantized model's disagreement.
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in batches]
    report = qat.sensitivity(model, batches, metric="accuracy", targets=labels, progress=False)
    assert report.metric == "accuracy" and report.unit == "points"
    assert report.float_accuracy == 100.0
    assert "from float 100.00%" in str(report)
    for layer in LAYERS:
        assert 0 <= report.value(layer, 8) <= report.value(layer, 2) <= 100, layer
    assert report.most_sensitive() == SENSITIVE
    pairs = qat.sensitivity(model, list(zip(batches, labels)), metric="accuracy",
                            progress=False)
    assert pairs.table == report.table


def test_config_sets_the_specs_and_the_layers_measured(model, batches):
    config = qat.Config(weight=qat.QuantSpec(bits=8, symmetric=True, per_channel=False,
                                             observer="minmax"), skip=["fc1"])
    per_tensor = qat.sensitivity(model, batches, candidate_bits=[4], config=config,
                                 progress=False)
    assert per_tensor.layers == ["conv1", "conv2", "fc2"] and per_tensor.bits == [4]
    per_channel = qat.sensitivity(model, batches, candidate_bits=[4], progress=False)
    # One scale for all of conv2's channels is set by the largest outlier of all.
    assert per_tensor.value("conv2", 4) < per_channel.value("conv2", 4)


def test_plot_writes_a_png(report, tmp_path):
    path = tmp_path / "sensitivity.png"
    assert report.plot(str(path)) == str(path)
    content = path.read_bytes()
    assert content.startswith(PNG_MAGIC) and len(content) > 5000


def test_import_qat_does_not_import_matplotlib():
    code = "import sys, qat; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    run_python(code, check=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(metric="mse"), "metric must be one of 'sqnr', 'accuracy'"),
    (dict(candidate_bits=()), "candidate_bits must not be empty"),
    (dict(candidate_bits=4), "candidate_bits must be a sequence"),
    (dict(candidate_bits=(8, 1)), r"integers in 2\.\.8"),
    (dict(candidate_bits=(16,)), r"integers in 2\.\.8"),
    (dict(candidate_bits=(4.0,)), r"integers in 2\.\.8"),
    (dict(metric="accuracy"), r"needs labels: give batches as \(inputs, labels\)"),
    (dict(targets=[torch.zeros(64)]), "targets is only used with metric='accuracy'"),
    (dict(metric="accuracy", targets=[torch.zeros(64)]), "1 label tensors for 4 batches"),
    # Labels of shape (64, 1) were broadcast against the (64,) argmax: accuracies over 100%.
    (dict(metric="accuracy", targets=[torch.zeros(64, dtype=torch.long)] * 3
          + [torch.zeros(64, 1, dtype=torch.long)]),
     r"the labels of batches\[3\] have shape \(64, 1\); the model's output there, of shape "
     r"\(64, 10\), takes labels of shape \(64,\)"),
    (dict(metric="accuracy", targets=[torch.zeros(63, dtype=torch.long)] * 4),
     r"the labels of batches\[0\] have shape \(63,\)"),
])
def test_sensitivity_rejects_bad_arguments(model, batches, kwargs, message):
    with pytest.raises(ValueError, match=message):
        qat.sensitivity(model, batches, progress=False, **kwargs)


def test_sensitivity_rejects_no_batches_and_a_prepared_model(model, batches):
    with pytest.raises(ValueError, match="batches is empty"):
        qat.sensitivity(model, [], progress=False)
    with pytest.raises(ValueError, match="batches must be given"):
        qat.sensitivity(model, None, progress=False)
    with pytest.raises(ValueError, match="already prepared"):
        qat.sensitivity(qat.prepare(model), batches, progress=False)
    with pytest.raises(TypeError, match="config must be a qat.Config"):
        qat.sensitivity(model, batches, config=qat.QuantSpec(), progress=False)


# -- auto_precision --------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.3, 0.35, 0.5, 0.6, 0.9])
def test_auto_precision_respects_the_budget(model, report, fraction):
    all_8bit = _size(model, dict.fromkeys(LAYERS, 8))
    config = qat.auto_precision(model, None, fraction, sensitivity=report, progress=False)
    bits = _chosen_bits(config)
    assert _size(model, bits) <= fraction * all_8bit
    assert model_size(config, model) == _size(model, bits)
    assert weight_bits(config, model) == bits
    # The most sensitive layer keeps the highest width of all.
    assert bits[SENSITIVE] == max(bits.values())


def test_budget_in_bytes_is_the_same_as_the_fraction(model, report):
    all_8bit = _size(model, dict.fromkeys(LAYERS, 8))
    by_fraction = qat.auto_precision(model, None, 0.5, sensitivity=report, progress=False)
    by_bytes = qat.auto_precision(model, None, int(0.5 * all_8bit), sensitivity=report,
                                  progress=False)
    assert _chosen_bits(by_bytes) == _chosen_bits(by_fraction)


def test_a_looser_budget_never_raises_the_estimated_loss(model, report):
    all_8bit = _size(model, dict.fromkeys(LAYERS, 8))
    losses, sizes = [], []
    for fraction in (0.27, 0.3, 0.35, 0.45, 0.55, 0.7, 0.99):
        bits = _chosen_bits(qat.auto_precision(model, None, fraction, sensitivity=report,
                                               progress=False))
        losses.append(_estimated_loss(report, bits))
        sizes.append(_size(model, bits))
        # No other choice within the budget has a lower estimated loss (all 81 checked),
        # among those keeping the sensitive layer at the highest width.
        for other in _all_choices((8, 4, 2)):
            if (_size(model, other) <= fraction * all_8bit
                    and other[SENSITIVE] == max(other.values())):
                assert losses[-1] <= _estimated_loss(report, other) * (1 + 1e-9), other
    assert losses == sorted(losses, reverse=True)
    assert losses[0] > 10 * losses[-1]
    full = qat.auto_precision(model, None, 1.0, sensitivity=report, progress=False)
    assert _chosen_bits(full) == dict.fromkeys(LAYERS, 8)


def _all_choices(widths):
    choices = [{}]
    for layer in LAYERS:
        choices = [dict(c, **{layer: b}) for c in choices for b in widths]
    return choices


def test_auto_precision_measures_when_not_given_a_report(model, batches, report):
    config = qat.auto_precision(model, batches, 0.5, progress=False)
    given = qat.auto_precision(model, None, 0.5, sensitivity=report, progress=False)
    assert _chosen_bits(config) == _chosen_bits(given)


def test_returned_config_keeps_the_base_config_and_trains(model, data):
    base = qat.presets.w4a8()
    config = qat.auto_precision(model, list(torch.split(data[0], 64)), 0.6,
                                candidate_bits=(8, 6, 4), base_config=base, progress=False)
    assert isinstance(config, qat.Config)
    assert config.activation == base.activation and config.weight == base.weight
    bits = _chosen_bits(config)
    assert set(bits.values()) <= {8, 6, 4} and _size(model, bits) <= 0.6 * _size(
        model, dict.fromkeys(LAYERS, 8))
    for layer, (weight, activation) in config.overrides.items():
        assert weight == qat.QuantSpec(**dict(vars(base.weight), bits=bits[layer]))
        assert activation is None

    qmodel = qat.prepare(model, config)
    assert {name: m.weight_fake_quant.spec.bits for name, m in qmodel.named_modules()
            if hasattr(m, "weight_fake_quant")} == bits
    before = copy.deepcopy(qmodel.fc2.weight.detach())
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(qmodel(data[0][:32]), data[1][:32])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, qmodel.fc2.weight)


@pytest.mark.parametrize("budget, message", [
    (0, "size_budget must be positive"),
    (-100, "size_budget must be positive"),
    (math.inf, "size_budget must be positive and finite"),
    (True, "size_budget must be a number of bytes or a fraction"),
    ("5kB", "size_budget must be a number of bytes or a fraction"),
])
def test_auto_precision_rejects_bad_budgets(model, report, budget, message):
    with pytest.raises(ValueError, match=message):
        qat.auto_precision(model, None, budget, sensitivity=report, progress=False)


def test_budget_below_the_smallest_size_names_it(model, report):
    smallest = _size(model, dict.fromkeys(LAYERS, 2))
    with pytest.raises(ValueError, match=f"smallest possible size, {smallest:.0f} bytes"):
        qat.auto_precision(model, None, int(smallest) - 1, sensitivity=report, progress=False)
    at_smallest = qat.auto_precision(model, None, smallest, sensitivity=report, progress=False)
    assert _chosen_bits(at_smallest) == dict.fromkeys(LAYERS, 2)


def test_auto_precision_rejects_a_report_that_does_not_fit(model, batches, report):
    with pytest.raises(ValueError, match="lacks conv1@6, conv2@6"):
        qat.auto_precision(model, None, 0.9, candidate_bits=(8, 6), sensitivity=report,
                           progress=False)
    accuracy = SensitivityReport("accuracy", report.table, float_accuracy=90.0)
    with pytest.raises(ValueError, match="measured 'accuracy' but metric='sqnr'"):
        qat.auto_precision(model, None, 0.5, sensitivity=accuracy, progress=False)
    with pytest.raises(TypeError, match="sensitivity must be a SensitivityReport"):
        qat.auto_precision(model, None, 0.5, sensitivity=report.to_dict(), progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        qat.auto_precision(model, [], 0.5, progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        qat.auto_precision(model, batches, 0.5, metric="top1", progress=False)
    with pytest.raises(ValueError, match="candidate_bits must not be empty"):
        qat.auto_precision(model, batches, 0.5, candidate_bits=[], progress=False)
