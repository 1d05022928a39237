"""Per-layer precision: how much quantizing one layer's weight alone hurts a model
(:func:`sensitivity`), and per-layer weight widths chosen from those measurements under a
model-size budget (:func:`auto_precision`), returned as a :class:`qat.Config`."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .calibrate import calibrate, disable_fake_quant, disable_observer, run_batch
from .config import Config
from .fake_quant import FakeQuantize
from .prepare import prepare

__all__ = [
    "METRICS",
    "SensitivityReport",
    "SensitivityRow",
    "auto_precision",
    "model_size",
    "sensitivity",
    "weight_bits",
]

#: Metrics :func:`sensitivity` measures.
METRICS = ("sqnr", "accuracy")

# The integer kernels take signed 8-bit weights at most (qat.convert).
_MIN_BITS, _MAX_BITS = 2, 8
# Bytes per element of a parameter left in float (float32).
_FLOAT_BYTES = 4

_Layers = List[Tuple[str, nn.Module]]


class SensitivityRow(NamedTuple):
    """One measurement: ``layer``'s weight alone quantized to ``bits``, giving ``value``
    (SQNR in dB, or the top-1 accuracy drop in points); ``params``: its weight's elements."""

    layer: str
    bits: int
    value: float
    params: int


@dataclass
class SensitivityReport:
    """What :func:`sensitivity` measured: ``table`` has one :class:`SensitivityRow` per
    layer and bit width, layers in the model's order, widths from the highest.

    ``metric`` is ``"sqnr"`` (values: SQNR of the model output in dB, higher is better) or
    ``"accuracy"`` (values: top-1 accuracy drop against the float model in percentage
    points, lower is better; ``float_accuracy`` is the float model's, in percent).
    """

    metric: str
    table: List[SensitivityRow] = field(default_factory=list)
    float_accuracy: Optional[float] = None

    @property
    def layers(self) -> List[str]:
        """The layer names, in the order measured."""
        return list(dict.fromkeys(row.layer for row in self.table))

    @property
    def bits(self) -> List[int]:
        """The bit widths measured, highest first."""
        return sorted({row.bits for row in self.table}, reverse=True)

    @property
    def unit(self) -> str:
        return "dB" if self.metric == "sqnr" else "points"

    def value(self, layer: str, bits: int) -> float:
        """The measurement of ``layer`` at ``bits``.

        Raises:
            KeyError: when that pair was not measured.
        """
        for row in self.table:
            if row.layer == layer and row.bits == bits:
                return row.value
        raise KeyError(f"SensitivityReport: no measurement of {layer!r} at {bits} bits")

    def params(self, layer: str) -> int:
        """The number of elements of ``layer``'s weight."""
        return next(row.params for row in self.table if row.layer == layer)

    def most_sensitive(self, bits: Optional[Sequence[int]] = None) -> str:
        """The layer that quantization hurts most: the lowest mean SQNR (or the highest
        mean accuracy drop) over ``bits`` (default: every width measured). A mean over the
        widths rather than the value at the lowest one, where every layer is far off and
        the ranking is mostly noise."""
        bits = self.bits if bits is None else list(bits)

        def mean(layer: str) -> float:
            return sum(self.value(layer, b) for b in bits) / len(bits)

        if self.metric == "sqnr":
            return min(self.layers, key=mean)
        return max(self.layers, key=mean)

    def _title(self) -> str:
        if self.metric == "sqnr":
            return "SQNR (dB) of the output, one layer's weight quantized (higher is better)"
        return (f"top-1 accuracy drop (points) from float {self.float_accuracy:.2f}%, one "
                f"layer's weight quantized (lower is better)")

    def to_dict(self) -> dict:
        """The report as plain data (an infinite SQNR stays ``float("inf")``)."""
        return {
            "metric": self.metric,
            "unit": self.unit,
            "float_accuracy": self.float_accuracy,
            "table": [row._asdict() for row in self.table],
        }

    def __str__(self) -> str:
        bits = self.bits
        header = ["layer", "weights"] + [f"{b} bits" for b in bits]
        lines = [[layer, str(self.params(layer))]
                 + [f"{self.value(layer, b):.2f}" for b in bits] for layer in self.layers]
        widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

        def fmt(row):
            return "  ".join([row[0].ljust(widths[0])]
                             + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])

        return "\n".join([self._title(), fmt(header)] + [fmt(row) for row in lines])

    def plot(self, path: str) -> str:
        """Writes a PNG to ``path``: the metric across layers, one line per bit width.
        Returns ``path``. Needs matplotlib (imported here, so ``import qat`` does not)."""
        # The Agg canvas draws to a file without touching pyplot's global backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layers = self.layers
        figure = Figure(figsize=(max(6.0, 0.5 * len(layers) + 2.0), 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = range(len(layers))
        for b in self.bits:
            # An exact output (infinite SQNR) has no point on a finite axis.
            values = [self.value(layer, b) if math.isfinite(self.value(layer, b)) else math.nan
                      for layer in layers]
            axes.plot(positions, values, marker="o", label=f"{b}-bit weights")
        axes.set_xticks(list(positions))
        axes.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
        axes.set_xlabel("layer (only its weight quantized)")
        axes.set_ylabel("output SQNR (dB), higher is better" if self.metric == "sqnr"
                        else "top-1 accuracy drop (points), lower is better")
        title = "Per-layer sensitivity"
        if self.metric == "accuracy":
            title += f" (float top-1 accuracy {self.float_accuracy:.2f}%)"
        axes.set_title(title, fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        return path


# -- validation ------------------------------------------------------------------------

def _check_metric(where: str, metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"{where}: metric must be one of {', '.join(map(repr, METRICS))}; "
                         f"got {metric!r}")
    return metric


def _check_bits(where: str, candidate_bits) -> List[int]:
    """The candidate widths, unique, highest first."""
    if isinstance(candidate_bits, (int, str)) or not isinstance(candidate_bits, Sequence):
        raise ValueError(f"{where}: candidate_bits must be a sequence of integers such as "
                         f"(8, 4, 2), got {candidate_bits!r}")
    if not candidate_bits:
        raise ValueError(f"{where}: candidate_bits must not be empty")
    for b in candidate_bits:
        if isinstance(b, bool) or not isinstance(b, int) or not _MIN_BITS <= b <= _MAX_BITS:
            raise ValueError(
                f"{where}: candidate_bits must be integers in {_MIN_BITS}..{_MAX_BITS} (the "
                f"integer kernels take weights of 8 bits at most), got {b!r}")
    return sorted(set(candidate_bits), reverse=True)


def _check_config(where: str, name: str, config) -> Config:
    if config is None:
        return Config()
    if not isinstance(config, Config):
        raise TypeError(f"{where}: {name} must be a qat.Config, got {type(config).__name__}")
    return config


def _check_batches(where: str, batches) -> list:
    """The batches as a list: each (layer, width) pair runs them all once more."""
    if batches is None:
        raise ValueError(f"{where}: batches must be given (an iterable of batches)")
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    if not batches:
        raise ValueError(f"{where}: batches is empty; sensitivity needs at least one batch")
    for i, batch in enumerate(batches):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(inputs, dict):
            inputs = list(inputs.values())
        for t in inputs if isinstance(inputs, (tuple, list)) else [inputs]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(
                    torch.isfinite(t).all()):
                # One NaN makes every SQNR NaN, and a choice made on NaNs is arbitrary.
                raise ValueError(
                    f"{where}: batches[{i}] holds {int((~torch.isfinite(t)).sum())} NaN or "
                    f"inf values; drop or clean that batch (no decision is made on NaN)")
    return batches


def _labels(where: str, metric: str, batches: list, targets) -> Optional[List[torch.Tensor]]:
    """The labels of each batch for the accuracy metric: ``targets``, or the second item
    of each ``(inputs, labels)`` batch."""
    if metric != "accuracy":
        if targets is not None:
            raise ValueError(f"{where}: targets is only used with metric='accuracy'")
        return None
    if targets is not None:
        targets = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        if len(targets) != len(batches):
            raise ValueError(f"{where}: targets holds {len(targets)} label tensors for "
                             f"{len(batches)} batches; give one per batch")
        return targets
    if not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
        raise ValueError(f"{where}: metric='accuracy' needs labels: give batches as "
                         f"(inputs, labels) pairs or pass targets")
    return [b[1] for b in batches]


# -- measurement -----------------------------------------------------------------------

def _quantizable(model: nn.Module, config: Config,
                 where: Optional[str] = None) -> Tuple[nn.Module, _Layers]:
    """The model prepared with ``config``'s weight specs and float activations (as for
    dynamic quantization), and its layers with a weight FakeQuantize, in module order;
    with ``where``, a ValueError naming it when there are none."""
    qmodel = prepare(model, dataclasses.replace(config, dynamic=True))
    layers = [(name, m) for name, m in qmodel.named_modules()
              if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantize)]
    if where is not None and not layers:
        raise ValueError(f"{where}: the model has no layer that qat.prepare quantizes with "
                         f"this config")
    return qmodel, layers


def _outputs(where: str, model: nn.Module, batches: list) -> List[torch.Tensor]:
    """``model``'s outputs on ``batches`` in eval mode without gradients; the training
    flags are restored afterwards."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            outputs = [run_batch(where, model, batch) for batch in batches]
    finally:
        for m, mode in training.items():
            m.training = mode
    for output in outputs:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"qat.sensitivity: the model must return a tensor, got "
                            f"{type(output).__name__}")
    return [output.float() for output in outputs]


def _sqnr_db(reference: List[torch.Tensor], outputs: List[torch.Tensor]) -> float:
    signal = sum(r.pow(2).sum().item() for r in reference)
    noise = sum((r - o).pow(2).sum().item() for r, o in zip(reference, outputs))
    if noise == 0:
        return math.inf
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def _check_labels(where: str, outputs: List[torch.Tensor], labels: List[torch.Tensor]) -> None:
    """Fails unless each batch's labels fit the model's class scores along dim 1 (the
    float model's outputs: the quantized model's have their shapes)."""
    for i, (o, t) in enumerate(zip(outputs, labels)):
        if o.dim() < 2:
            raise ValueError(f"{where}: metric='accuracy' needs class scores along "
                             f"dim 1; the model's output on batches[{i}] has shape "
                             f"{tuple(o.shape)}")
        # Compared as they are, labels of shape (N, 1) would broadcast against (N,).
        expected = o.shape[:1] + o.shape[2:]
        if not isinstance(t, torch.Tensor) or t.shape != expected:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{where}: the labels of batches[{i}] have shape {shape}; the model's "
                f"output there, of shape {tuple(o.shape)}, takes labels of shape "
                f"{tuple(expected)}")


def _accuracy(outputs: List[torch.Tensor], labels: List[torch.Tensor]) -> float:
    """Top-1 accuracy in percent (class scores along dim 1, labels checked by
    :func:`_check_labels`)."""
    correct = sum((o.argmax(1) == t.to(o.device)).sum().item() for o, t in zip(outputs, labels))
    total = sum(t.numel() for t in labels)
    return 100.0 * correct / total


def _measure(where: str, model: nn.Module, qmodel: nn.Module, layers: _Layers,
             batches: list, metric: str, bits: List[int], labels,
             progress: bool) -> SensitivityReport:
    qmodel.eval()
    disable_fake_quant(qmodel)
    disable_observer(qmodel)
    reference = _outputs(where, model, batches)
    for i, output in enumerate(reference):
        if not bool(torch.isfinite(output).all()):
            raise ValueError(f"{where}: the float model's output on batches[{i}] is "
                             f"not finite (NaN or inf), so no SQNR or accuracy can be measured")
    float_accuracy = None
    if metric == "accuracy":
        _check_labels(where, reference, labels)
        float_accuracy = _accuracy(reference, labels)
    report = SensitivityReport(metric, float_accuracy=float_accuracy)
    with tqdm(total=len(layers) * len(bits), desc="qat.sensitivity",
              disable=not progress) as bar:
        for name, layer in layers:
            original = layer.weight_fake_quant
            for b in bits:
                layer.weight_fake_quant = FakeQuantize(
                    dataclasses.replace(original.spec, bits=b)).to(layer.weight.device)
                # Only this weight quantizes; its range does not depend on the data, so one
                # batch through the model (which folds batch norm as it will) calibrates it.
                calibrate(qmodel, batches, num_batches=1, progress=False)
                disable_observer(qmodel)
                outputs = _outputs(where, qmodel, batches)
                value = (_sqnr_db(reference, outputs) if metric == "sqnr"
                         else float_accuracy - _accuracy(outputs, labels))
                report.table.append(SensitivityRow(name, b, value, layer.weight.numel()))
                bar.update()
            layer.weight_fake_quant = original
    return report


def sensitivity(model: nn.Module, batches, metric: str = "sqnr",
                candidate_bits: Sequence[int] = (8, 4, 2), config: Optional[Config] = None,
                targets=None, progress: bool = True) -> SensitivityReport:
    """Per-layer sensitivity of a float model to the width of its weights, after
    calibration only (no training).

    For each layer :func:`qat.prepare` quantizes with ``config`` (those that get a weight
    FakeQuantize: Linear, ConvNd, conv + batch norm, ...) and each width in
    ``candidate_bits``, only that layer's weight is fake-quantized, with the layer's
    weight spec from ``config`` at that width, and every other layer stays in float. The
    model is prepared once; the layers not under test have fake quantization off.

    Activations stay in float (the model is prepared as for dynamic quantization). The
    measurement then shows what the choice of weight widths changes: 8-bit activation
    noise, shared by every candidate, would bound all SQNRs near one value and hide the
    differences between layers at 8 and at 4 bits.

    Args:
        model: the float model (not modified; it is prepared on a copy).
        batches: an iterable of batches, as :func:`qat.calibrate` takes them (a tensor, or
            ``(inputs, labels)`` pairs); it is read into a list, since it is run once per
            layer and width. The first batch calibrates the weight under test.
        metric: ``"sqnr"``: the SQNR in dB of the model's output against the float model's,
            over all batches (higher is better); ``"accuracy"``: the top-1 accuracy drop
            against the float model, in percentage points (class scores along dim 1).
        candidate_bits: the weight widths to measure, integers in 2..8.
        config: gives each layer's weight spec (all but its bits) and the layers left in
            float (default: ``qat.Config()``).
        targets: for ``"accuracy"``, the label tensor of each batch; without it, each
            batch must be an ``(inputs, labels)`` pair.
        progress: show a tqdm progress bar over the (layer, width) pairs.

    Returns:
        A :class:`SensitivityReport`.

    Raises:
        ValueError: on an unknown metric, empty or out-of-range ``candidate_bits``, no
            batches, missing labels for ``"accuracy"``, or a model with nothing to quantize.
    """
    where = "qat.sensitivity"
    metric = _check_metric(where, metric)
    bits = _check_bits(where, candidate_bits)
    config = _check_config(where, "config", config)
    batches = _check_batches(where, batches)
    labels = _labels(where, metric, batches, targets)
    qmodel, layers = _quantizable(model, config, where)
    return _measure(where, model, qmodel, layers, batches, metric, bits, labels, progress)


# -- size and search -------------------------------------------------------------------

def _float_params(model: nn.Module, layers: _Layers) -> int:
    """Elements of the model's parameters that are not the weight of a quantized layer."""
    quantized = sum(layer.weight.numel() for _, layer in layers)
    return sum(p.numel() for p in model.parameters()) - quantized


def _size(bits: Dict[str, int], params: Dict[str, int], float_params: int) -> float:
    return sum(params[name] * b for name, b in bits.items()) / 8 + _FLOAT_BYTES * float_params


def weight_bits(config: Config, model: nn.Module) -> Dict[str, int]:
    """The weight width of each layer that :func:`qat.prepare` quantizes in ``model`` with
    ``config``, by layer name, in module order."""
    _, layers = _quantizable(model, _check_config("qat.precision.weight_bits", "config", config))
    return {name: layer.weight_fake_quant.spec.bits for name, layer in layers}


def model_size(config: Config, model: nn.Module) -> float:
    """Estimated size in bytes of ``model`` quantized with ``config``: the weight of each
    layer that :func:`qat.prepare` quantizes counts ``weight.numel() * bits / 8`` bytes;
    every other parameter of the model (biases, batch norm, layers left in float) counts 4
    bytes (float32) per element. Buffers (batch norm statistics, which the integer model
    folds away), scales and zero points are not counted."""
    config = _check_config("qat.precision.model_size", "config", config)
    _, layers = _quantizable(model, config)
    params = {name: layer.weight.numel() for name, layer in layers}
    bits = {name: layer.weight_fake_quant.spec.bits for name, layer in layers}
    return _size(bits, params, _float_params(model, layers))


def _budget_bytes(size_budget, all_8bit: float) -> float:
    where = "qat.auto_precision"
    if isinstance(size_budget, bool) or not isinstance(size_budget, (int, float)):
        raise ValueError(f"{where}: size_budget must be a number of bytes or a fraction in "
                         f"(0, 1], got {size_budget!r}")
    if not math.isfinite(size_budget) or size_budget <= 0:
        raise ValueError(f"{where}: size_budget must be positive and finite, got {size_budget!r}")
    if isinstance(size_budget, float) and size_budget <= 1:
        return size_budget * all_8bit
    return float(size_budget)


def _costs(report: SensitivityReport, names: List[str],
           bits: List[int]) -> Dict[str, Dict[int, float]]:
    """Each layer's estimated loss at each width, non-increasing in the width.

    SQNR becomes the relative noise power ``10^(-SQNR/10)``, which adds up over layers
    when their errors are independent; an accuracy drop counts as it is (a gain as 0)."""
    costs = {}
    for name in names:
        worst = 0.0
        costs[name] = {}
        for b in bits:  # highest first
            value = report.value(name, b)
            cost = 10 ** (-value / 10) if report.metric == "sqnr" else max(value, 0.0)
            # Measurement noise must not make a narrower width look better than a wider one.
            worst = max(worst, cost)
            costs[name][b] = worst
    return costs


def _search(costs: Dict[str, Dict[int, float]], params: Dict[str, int], bits: List[int],
            capacity: float, fragile: str) -> Dict[str, int]:
    """Widths minimizing the summed cost with ``sum(params * bits) <= capacity`` (in bits),
    the layer ``fragile`` at the highest width of all. An exact multiple-choice knapsack:
    one Pareto front of (size, cost) per prefix of the layers, solved once per width of
    ``fragile``."""
    names = list(costs)
    best = None
    for top in bits:
        allowed = {name: [b for b in bits if b <= top] for name in names}
        allowed[fragile] = [top]
        # The least the layers after each position still need, to drop states early.
        rest = [sum(params[n] * min(allowed[n]) for n in names[i + 1:])
                for i in range(len(names))]
        # States are (size, cost, choices), the choices a linked list (width, earlier
        # choices), so that extending a state does not copy its history.
        front = [(0, 0.0, None)]
        for i, name in enumerate(names):
            states = sorted(((size + params[name] * b, cost + costs[name][b], (b, chosen))
                             for size, cost, chosen in front for b in allowed[name]
                             if size + params[name] * b + rest[i] <= capacity),
                            key=lambda state: (state[0], state[1]))
            # Keep only the states no smaller one beats on cost.
            front = []
            for state in states:
                if not front or state[1] < front[-1][1]:
                    front.append(state)
        if front and (best is None or (front[-1][1], front[-1][0]) < (best[1], best[0])):
            best = front[-1]
    chosen, widths = best[2], []
    while chosen is not None:
        b, chosen = chosen
        widths.append(b)
    return dict(zip(names, reversed(widths)))


def auto_precision(model: nn.Module, batches, size_budget,
                   candidate_bits: Sequence[int] = (8, 4, 2), metric: str = "sqnr",
                   base_config: Optional[Config] = None,
                   sensitivity: Optional[SensitivityReport] = None, targets=None,
                   progress: bool = True) -> Config:
    """Per-layer weight widths for ``model`` under a model-size budget, chosen from the
    per-layer sensitivities (:func:`sensitivity`), as a :class:`qat.Config` to inspect,
    edit and pass to :func:`qat.prepare`.

    Size: :func:`model_size`: each quantized layer's weight at its width
    (``numel * bits / 8`` bytes) plus 4 bytes per element of every other parameter.

    Search: each layer's loss at each width is estimated from its sensitivity alone: for
    SQNR the relative noise power ``10^(-SQNR/10)`` (noise from independent layers adds
    up), for accuracy the drop in points. The widths minimizing the summed loss within the
    budget are found exactly (a multiple-choice knapsack), with one constraint: the most
    sensitive layer (:meth:`SensitivityReport.most_sensitive` over the candidate widths)
    keeps the highest width of all layers, so that the additive estimate never trades the
    layer that quantization hurts most for smaller ones. Among equal losses the smaller
    model wins.

    Args:
        model: the float model.
        batches: data for :func:`sensitivity` (unused when ``sensitivity`` is given).
        size_budget: the largest estimated size, in bytes (an int, or a float above 1), or
            a float in (0, 1]: that fraction of the size with every quantized weight at 8
            bits.
        candidate_bits: the widths to choose from, integers in 2..8.
        metric: ``"sqnr"`` or ``"accuracy"``, as in :func:`sensitivity`.
        base_config: every setting but the chosen widths (weight and activation specs,
            skipped layers, backend); default ``qat.Config()``.
        sensitivity: a report measured before (with this metric, covering every quantized
            layer at every candidate width), instead of measuring here.
        targets: labels for ``metric="accuracy"``, as in :func:`sensitivity`.
        progress: show progress bars.

    Returns:
        ``base_config`` with an override, by exact name, for each quantized layer whose
        chosen width differs from its spec in ``base_config``: that weight spec at the
        chosen width (and its activation spec when it differs from the default).
        :func:`model_size` gives its size and :func:`weight_bits` its widths.

    Raises:
        ValueError: on bad arguments, a ``sensitivity`` report that does not fit, or a
            budget below the smallest possible size (every layer at the lowest width;
            the message gives that size).
    """
    where = "qat.auto_precision"
    metric = _check_metric(where, metric)
    bits = _check_bits(where, candidate_bits)
    base_config = _check_config(where, "base_config", base_config)
    qmodel, layers = _quantizable(model, base_config, where)
    names = [name for name, _ in layers]
    params = {name: layer.weight.numel() for name, layer in layers}
    float_params = _float_params(model, layers)
    budget = _budget_bytes(size_budget, _size(dict.fromkeys(names, 8), params, float_params))
    smallest = _size(dict.fromkeys(names, bits[-1]), params, float_params)
    if budget < smallest:
        raise ValueError(
            f"{where}: size_budget {budget:.0f} bytes is below the smallest possible size, "
            f"{smallest:.0f} bytes (every layer at {bits[-1]} bits)")

    if sensitivity is None:
        batches = _check_batches(where, batches)
        labels = _labels(where, metric, batches, targets)
        report = _measure(where, model, qmodel, layers, batches, metric, bits, labels,
                          progress)
    else:
        if not isinstance(sensitivity, SensitivityReport):
            raise TypeError(f"{where}: sensitivity must be a SensitivityReport, got "
                            f"{type(sensitivity).__name__}")
        if sensitivity.metric != metric:
            raise ValueError(f"{where}: the sensitivity report measured {sensitivity.metric!r} "
                             f"but metric={metric!r}")
        measured = {(row.layer, row.bits) for row in sensitivity.table}
        missing = [f"{n}@{b}" for n in names for b in bits if (n, b) not in measured]
        if missing:
            raise ValueError(f"{where}: the sensitivity report lacks {', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}; measure it with these "
                             f"candidate_bits and base_config")
        report = sensitivity

    capacity = (budget - _FLOAT_BYTES * float_params) * 8
    chosen = _search(_costs(report, names, bits), params, bits, capacity,
                     report.most_sensitive(bits))
    overrides = dict(base_config.overrides)
    for name, b in chosen.items():
        weight, activation = base_config.spec_for(name, model.get_submodule(name))
        if b == weight.bits:
            continue  # the base config already says so: no override to carry around
        overrides[name] = (dataclasses.replace(weight, bits=b),
                           None if activation == base_config.activation else activation)
    return dataclasses.replace(base_config, overrides=overrides)
