"""Bad and unusual inputs against the public API: each gives a clear error that names its
cause, or the right result; none gives a wrong model without a word."""

import importlib
import json
import math
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

import qat
from qat import Config, FakeQuantize, FixedQParamsFakeQuantize, QuantSpec, _onnx, _pte

from qat.modules import registry

from conftest import SUBPROCESS_ENV
from helpers import LOAD_LITE_MODEL, run_python

# qat.export is the function; its module holds the helpers and names.
export_module = importlib.import_module("qat.export")


def _calibrated(model, shape=(8, 4), batches=3):
    qmodel = qat.prepare(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(batches):
        qmodel(torch.randn(shape, generator=gen))
    return qmodel


class _ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _convbn_calibrated():
    return _calibrated(_ConvBnNet(), shape=(4, 3, 8, 8))


def _engine(name):
    """Sets the quantized engine for a test; the caller restores it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    return previous


# -- 1. non-finite parameters ---------------------------------------------------------------

@pytest.mark.parametrize("where,value,named", [
    ("fc.weight", math.nan, "fc.weight (1 NaN)"),
    ("fc.bias", math.inf, "fc.bias (1 inf)"),
    ("conv.bn.running_mean", math.nan, "conv.bn.running_mean (1 NaN)"),
    ("conv.weight_fake_quant.scale", math.nan, "conv.weight_fake_quant.scale (1 NaN)"),
])
def test_nonfinite_parameters_are_refused_naming_them(where, value, named, tmp_path):
    qmodel = _convbn_calibrated()
    tensors = dict(qmodel.named_parameters())
    tensors.update(qmodel.named_buffers())
    with torch.no_grad():
        tensors[where].view(-1)[0] = value
    with pytest.raises(ValueError, match=r"qat\.convert: non-finite values in " + named.replace(
            "(", r"\(").replace(")", r"\)")):
        qat.convert(qmodel)
    path = tmp_path / "m.ptl"
    with pytest.raises(ValueError, match="non-finite values in"):
        qat.export(qmodel, path, torch.randn(2, 3, 8, 8))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_negative_batch_norm_variance_is_refused_at_convert():
    qmodel = _convbn_calibrated()
    with torch.no_grad():
        qmodel.conv.bn.running_var[1] = -0.5
    with pytest.raises(ValueError, match=r"negative batch-norm variance in "
                                         r"conv\.bn\.running_var \(min -0\.5\)"):
        qat.convert(qmodel)


def test_export_check_treats_nan_outputs_as_a_mismatch(tmp_path):
    # An integer (non-QAT) model is exported as it is; one whose output is NaN cannot be
    # checked, so it must not be written as verified.
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias[0] = math.nan
    with pytest.raises(RuntimeError, match="outputs on example_inputs are not finite"):
        qat.export(model, tmp_path / "m.pt", torch.randn(2, 4), mobile=False)
    assert os.listdir(tmp_path) == []


def test_export_refuses_nonfinite_example_inputs(tmp_path):
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    x = torch.randn(2, 4)
    x[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"example_inputs\[0\] holds NaN or inf"):
        qat.export(qmodel, tmp_path / "m.ptl", x)


@pytest.mark.parametrize("fmt", [None, "pte", "onnx"])
def test_export_names_a_path_that_is_not_one_and_arguments_given_swapped(tmp_path, fmt):
    """Checked before the format is chosen from the path's suffix (which read it as a
    path and raised Python's own TypeError)."""
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"path must be a file path \(str or os.PathLike\), "
                                        r"got Tensor \(the arguments are model, path, "
                                        r"example_inputs\)"):
        qat.export(qmodel, x, str(tmp_path / "m.ptl"), format=fmt)
    with pytest.raises(TypeError, match=r"path must be a file path .*, got int$"):
        qat.export(qmodel, 3, x, format=fmt)
    assert os.listdir(tmp_path) == []


# -- 2. integer Linear input width ----------------------------------------------------------

def _linear_message():
    with pytest.raises(RuntimeError) as error:
        nn.Linear(4, 3)(torch.randn(2, 5))
    return str(error.value)


def test_integer_linear_checks_the_input_width_like_nn_linear():
    expected = _linear_message()  # "mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"
    int_model = qat.convert(_calibrated(nn.Sequential(nn.Linear(4, 3))))
    with pytest.raises(RuntimeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        int_model(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"2x5 and 4x3"):
        torch.jit.script(int_model)(torch.randn(2, 5))
    assert int_model(torch.randn(2, 4)).shape == (2, 3)


def test_dynamic_integer_linear_checks_the_input_width():
    qmodel = qat.prepare(nn.Sequential(nn.Linear(4, 3)), qat.presets.w8a8_dynamic())
    int_model = qat.convert(qmodel)
    with pytest.raises(RuntimeError, match=r"2x5 and 4x3"):
        int_model(torch.randn(2, 5))
    assert int_model(torch.randn(2, 4)).shape == (2, 3)


_WIDTH_CHECK = LOAD_LITE_MODEL + """
assert model(torch.randn(2, 4)).shape == (2, 3)
try:
    model(torch.randn(2, 5))
except RuntimeError as error:
    assert "2x5 and 4x3" in str(error), str(error)
    print("refused")
"""


def test_exported_file_checks_the_input_width_in_a_fresh_process(tmp_path):
    # A fresh process without qat: the check is in the file, and an out-of-bounds read
    # there could crash the process, which the subprocess contains.
    path = tmp_path / "linear.ptl"
    qat.export(_calibrated(nn.Sequential(nn.Linear(4, 3))), path, torch.randn(2, 4))
    done = run_python(_WIDTH_CHECK, path, cwd=tmp_path, env=SUBPROCESS_ENV,
                      capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"


# -- 3. atomic export -----------------------------------------------------------------------

def test_a_failed_export_leaves_the_previous_file_untouched(tmp_path):
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    path = tmp_path / "m.ptl"
    qat.export(qmodel, path, torch.randn(2, 4))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"qat\.export: the example input \(\[2, 5\]\) does "
                                         r"not fit the model: (addmm: )?mat1 and mat2 shapes"):
        qat.export(qmodel, path, torch.randn(2, 5))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.ptl"]


def test_a_file_that_fails_its_check_is_not_kept(tmp_path, monkeypatch):
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    path = tmp_path / "m.pt"
    qat.export(qmodel, path, torch.randn(2, 4), mobile=False)
    before = path.read_bytes()

    def mismatch(*args, **kwargs):
        raise RuntimeError("qat.export: the file written computes other outputs")

    monkeypatch.setattr(export_module, "_check_outputs", mismatch)
    with pytest.raises(RuntimeError, match="computes other outputs"):
        qat.export(qmodel, path, torch.randn(2, 4), mobile=False)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]


def test_export_keeps_the_file_mode_of_the_file_it_replaces(tmp_path):
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    path = tmp_path / "m.ptl"
    qat.export(qmodel, path, torch.randn(2, 4))
    os.chmod(path, 0o640)
    qat.export(qmodel, path, torch.randn(2, 4))
    assert os.stat(path).st_mode & 0o777 == 0o640


# -- 4. NaN in sensitivity / auto_precision -------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_sensitivity_and_auto_precision_refuse_nonfinite_batches():
    batches = [torch.randn(16, 8) for _ in range(3)]
    batches[1][3, 2] = math.nan
    with pytest.raises(ValueError, match=r"qat\.sensitivity: batches\[1\] holds 1 NaN or inf "
                                         r"values"):
        qat.sensitivity(_mlp(), batches, progress=False)
    with pytest.raises(ValueError, match=r"qat\.auto_precision: batches\[1\] holds 1 NaN"):
        qat.auto_precision(_mlp(), batches, size_budget=0.5, progress=False)


# -- 5. a FakeQuantize whose observer never saw data ----------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantize_disabled_before_any_data_raises(per_channel):
    fq = FakeQuantize(QuantSpec(per_channel=per_channel, symmetric=per_channel)).disable_observer()
    with pytest.raises(RuntimeError, match=r"scale is not known yet: the observer was "
                                           r"disabled before it saw a batch"):
        fq(torch.randn(4, 3))
    # Once it has seen data, turning the observer off keeps the scale it chose.
    fq.enable_observer()
    x = torch.randn(4, 3)
    fq(x)
    fq.disable_observer()
    assert fq(x).shape == x.shape


# -- 6. ScriptModules -----------------------------------------------------------------------

def test_prepare_refuses_script_modules():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(TypeError, match=r"qat\.prepare: model is a TorchScript module .*"
                                        r"prepare the Python nn\.Module"):
        qat.prepare(scripted)
    with pytest.raises(TypeError, match=r"qat\.prepare: model must be a torch\.nn\.Module, "
                                        r"got function"):
        qat.prepare(lambda x: x)


# -- 7. backends ----------------------------------------------------------------------------

def test_config_backend_is_honoured_or_refused():
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        with pytest.raises(ValueError, match=r"Config\.backend: 'fbgemm' is not a quantized "
                                             r"engine of this PyTorch .*; it has qnnpack"):
            Config(backend="fbgemm")
        return
    qmodel = qat.prepare(nn.Sequential(nn.Linear(4, 3)), Config(backend="fbgemm"))
    qmodel(torch.randn(8, 4))
    previous = _engine("qnnpack")
    try:
        with pytest.warns(UserWarning, match="from 'qnnpack' to 'fbgemm'"):
            int_model = qat.convert(qmodel)
        assert torch.backends.quantized.engine == "fbgemm"
        x = torch.randn(16, 4)
        assert qat.compare(qmodel, int_model, x)["max_steps"] <= 1.0 + 1e-3
    finally:
        torch.backends.quantized.engine = previous


def test_convert_refuses_backend_none_up_front():
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="qat.convert: backend must be one of qnnpack, "
                                         "fbgemm; got 'none'"):
        qat.convert(qmodel, backend="none")


def test_convert_sets_the_engine_and_says_so():
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    other = next(e for e in torch.backends.quantized.supported_engines
                 if e not in ("qnnpack", "none"))
    previous = _engine(other)
    try:
        with pytest.warns(UserWarning, match=f"engine from '{other}' to 'qnnpack'"):
            qat.convert(qmodel)
        assert torch.backends.quantized.engine == "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # already qnnpack: nothing to say
            qat.convert(qmodel)
    finally:
        torch.backends.quantized.engine = previous


# -- 8. choose_qparams ----------------------------------------------------------------------

@pytest.mark.parametrize("lo,hi", [(-math.inf, 1.0), (-1.0, math.inf), (math.nan, 1.0)])
def test_choose_qparams_refuses_nonfinite_ranges(lo, hi):
    with pytest.raises(RuntimeError, match=r"qat::choose_qparams: min and max must be finite"):
        torch.ops.qat.choose_qparams(torch.tensor([lo]), torch.tensor([hi]), 0, 255, False)


def test_choose_qparams_keeps_the_empty_range():
    # +inf / -inf is what an observer holds before any data: scale 1, zero point 0.
    scale, zero_point = torch.ops.qat.choose_qparams(
        torch.tensor([math.inf]), torch.tensor([-math.inf]), 0, 255, False)
    assert scale.item() == 1.0 and zero_point.item() == 0


# -- 9. estimators returning the wrong tensor -----------------------------------------------

@pytest.mark.parametrize("bad,named", [
    (lambda x: x.sum(), r"returned shape \[\], Float on cpu for an input of shape \[4, 3\]"),
    (lambda x: x.double(), r"returned shape \[4, 3\], Double on cpu"),
])
def test_registered_estimator_output_is_checked(bad, named):
    name = "test_bad_output"
    qat.estimators.register(name, lambda x, *args: bad(x), replace=True)
    try:
        with pytest.raises(RuntimeError, match=f"estimator '{name}' {named}"):
            qat.ops.fake_quantize(torch.randn(4, 3), 0.1, 0, 0, 255, estimator=name)
    finally:
        qat.estimators.unregister(name)


# -- 10. a module called twice --------------------------------------------------------------

class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_a_module_called_twice_is_supported(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = qat.prepare(_Twice())
    assert isinstance(qmodel.fc, qat.modules.Linear)
    calls = [n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == "fc"]
    assert len(calls) == 2
    # Each call site quantizes its own output.
    outputs = {next(iter(n.users)).target for n in calls}
    assert len(outputs) == 2
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        qmodel(torch.randn(8, 4, generator=gen))
    previous = _engine("qnnpack")
    try:
        int_model = qat.convert(qmodel)
        x = torch.randn(16, 4, generator=gen)
        assert qat.compare(qmodel, int_model, x)["max_steps"] == 0.0
        qat.export(qmodel, tmp_path / "twice.ptl", x)
    finally:
        torch.backends.quantized.engine = previous


# -- errors that must name their cause ------------------------------------------------------

def test_fold_factor_of_a_bad_batch_norm_is_named_in_training():
    qmodel = _convbn_calibrated()
    qmodel.eval()  # the running statistics fold into the weight
    with torch.no_grad():
        qmodel.conv.bn.running_var[2] = -1.0
    with pytest.raises(RuntimeError, match=r"conv\.weight_fake_quant \(qat\.FakeQuantize\): "
                                           r".*fold factor of output channel 2 is -?nan .*"
                                           r"running_var negative"):
        qmodel(torch.randn(2, 3, 8, 8))


def test_fold_factor_of_a_batch_norm_weight_gone_nan_is_named_in_training():
    # What a diverged training step leaves: the optimizer writes a NaN gradient into the
    # batch norm's weight, and the next forward folds it.
    qmodel = _convbn_calibrated()
    with torch.no_grad():
        qmodel.conv.bn.weight[1] = math.nan
    with pytest.raises(RuntimeError, match=r"conv\.weight_fake_quant \(qat\.FakeQuantize\): "
                                           r".*fold factor of output channel 1 is -?nan .*"
                                           r"is the weight not finite"):
        qmodel(torch.randn(2, 3, 8, 8))


def test_activations_overflowing_float32_are_named():
    # The first batch sets the range as it is (later ones move an average towards it).
    qmodel = qat.prepare(nn.Sequential(nn.Linear(4, 3)))
    x = torch.tensor([[3e38, -3e38, 0.0, 1.0]])
    with pytest.raises(RuntimeError, match=r"^_input_0_fake_quant|fake_quant.*observed range "
                                           r"\[-3e\+38, 3e\+38\] of channel 0 is too wide for "
                                           r"float32"):
        qmodel(x)


@pytest.mark.parametrize("output_range", [(1.0, 0.0), (1.0, 1.0), (0.5, 1.0),
                                          (0.0, math.inf), (0.0,)])
def test_fixed_qparams_range_is_validated(output_range):
    with pytest.raises(ValueError, match=r"qat\.FixedQParamsFakeQuantize: output_range must"):
        FixedQParamsFakeQuantize(None, output_range)


def test_spec_assignment_is_validated():
    spec = QuantSpec()
    with pytest.raises(ValueError, match=r"QuantSpec\.observer must be one of .*got 'bogus'"):
        spec.observer = "bogus"
    assert spec.observer == "moving_average"
    assert FakeQuantize(spec).spec.observer == "moving_average"
    with pytest.raises(ValueError, match=r"QuantSpec\.bins must be an integer in 1\.\.65536"):
        QuantSpec(bins=2**40)


def test_meta_tensors_are_refused_by_name():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(RuntimeError, match="meta tensors are not supported; input is on the "
                                           "meta device"):
        qat.ops.fake_quantize(meta, 0.1, 0, 0, 255)
    with pytest.raises(RuntimeError, match="meta tensors are not supported"):
        FakeQuantize()(meta)
    with pytest.raises(RuntimeError, match="meta tensors are not supported; scale or "
                                           "zero_point is on the meta device"):
        qat.ops.fake_quantize(torch.randn(3), torch.ones(1, device="meta"), 0, 0, 255)


def _damage_metadata(path, text):
    """Rewrites the file's qat/metadata.json entry with ``text``."""
    with zipfile.ZipFile(path) as archive:
        entries = {info: archive.read(info.filename) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries.items():
            if info.filename.endswith("/extra/" + export_module.METADATA_FILE):
                data = text.encode()
            archive.writestr(info, data)


@pytest.mark.parametrize("damage,named", [
    ("{not json", r"is not valid JSON"),
    ('{"qat_version": "1"}', r"lacks the field 'torch_version'"),
    (None, r"lacks the field 'layers\[0\]\.scale'"),
    ("[1, 2]", r"the top level is a list, not an object"),
])
def test_damaged_metadata_names_the_file_and_the_field(tmp_path, damage, named):
    path = tmp_path / "m.ptl"
    qat.export(_calibrated(nn.Sequential(nn.Linear(4, 3))), path, torch.randn(2, 4))
    if damage is None:
        meta = qat.read_metadata(path)
        del meta["layers"][0]["scale"]
        damage = json.dumps(meta)
    _damage_metadata(path, damage)
    with pytest.raises(ValueError, match=named) as error:
        qat.read_metadata(path)
    assert repr(str(path)) in str(error.value)
    done = subprocess.run([sys.executable, "-m", "qat", "inspect", str(path)],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert str(path) in done.stderr and "metadata" in done.stderr


def test_compare_with_no_batches_says_so():
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    int_model = qat.convert(qmodel)
    with pytest.raises(ValueError, match="qat.compare: inputs holds no batches"):
        qat.compare(qmodel, int_model, [])


def test_compare_names_a_model_that_was_not_prepared():
    # It said the model "took qat.prepare's eager fallback".
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    int_model = qat.convert(qmodel)
    with pytest.raises(TypeError, match=r"qat.compare: expected a model prepared by "
                                        r"qat.prepare .*, got Sequential without any"):
        qat.compare(nn.Sequential(nn.Linear(4, 3)), int_model, torch.randn(2, 4))


# Real limits: ExecuTorch and ONNX exist only for the PyPI leg's PyTorch.
_PTE_MISSING, _ONNX_MISSING = _pte.available(), _onnx.available()


@pytest.mark.parametrize("fmt", [
    "ptl", "pt",
    pytest.param("pte", marks=pytest.mark.skipif(_PTE_MISSING is not None,
                                                 reason=str(_PTE_MISSING))),
    pytest.param("onnx", marks=pytest.mark.skipif(_ONNX_MISSING is not None,
                                                  reason=str(_ONNX_MISSING)))])
def test_export_refuses_an_empty_example_input(tmp_path, fmt):
    # A .ptl / .pt was written and "checked" on no values; the .pte and .onnx exports
    # failed inside ExecuTorch's lowering or the batch probe, without naming the input.
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is empty \(shape \[0, 4\]\)"):
        qat.export(qmodel, tmp_path / f"m.{fmt}", torch.randn(0, 4))
    assert os.listdir(tmp_path) == []


class _TwoOutputs(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return {"a": self.a(x), "b": self.b(x)} if self.as_dict else (self.a(x), self.b(x))


class _Nested(_TwoOutputs):
    def __init__(self):
        super().__init__(as_dict=False)

    def forward(self, x):
        return self.a(x), (self.b(x), self.b(x))


def test_outputs_other_than_tensors_are_named(tmp_path):
    # export failed with "'str' object has no attribute 'is_quantized'" (a dict's keys taken
    # for its outputs); compare said the output came from no FakeQuantize.
    x = torch.randn(8, 4)
    as_dict = _calibrated(_TwoOutputs(as_dict=True))
    with pytest.raises(TypeError, match="qat.export: the model returns a dict; an exported "
                                        "model's outputs must be a tensor or a tuple or list"):
        qat.export(as_dict, tmp_path / "m.ptl", x)
    assert os.listdir(tmp_path) == []
    # A recurrent model's (output, (h, c)): the message says how to return it.
    nested = _calibrated(_Nested())
    with pytest.raises(TypeError, match=r"returns a tuple of Tensor, tuple; .* \(return nested "
                                        r"ones flat: an LSTM's \(output, \(h, c\)\) as "
                                        r"\(output, h, c\)\)"):
        qat.export(nested, tmp_path / "m.ptl", x)
    assert os.listdir(tmp_path) == []
    as_tuple = _calibrated(_TwoOutputs(as_dict=False))
    for qmodel, kind in ((as_dict, "dict"), (as_tuple, "tuple")):
        with pytest.raises(ValueError, match=f"qat.compare: the model returns a {kind} of "
                                             f"outputs; compare measures models with one"):
            qat.compare(qmodel, qat.convert(qmodel), x)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_a_batch_read_as_input_and_targets_says_so():
    # (x, y) for a model of two inputs is read as (input, target): the model's own "missing
    # 1 required positional argument" did not say that qat took y for a target.
    qmodel = qat.prepare(_TwoInputs())
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    expected = (r"a batch that is a tuple of 2 is taken as \(inputs, \*targets\), so the "
                r"model was called with its first element only, which its forward does not "
                r"take \(missing a required argument: 'y'\)\. .*\(\(input_1, input_2, "
                r"\.\.\.\), \*targets\)")
    with pytest.raises(TypeError, match="qat.calibrate: " + expected):
        qat.calibrate(qmodel, [(x, y)], progress=False)
    # The form the message gives calibrates; compare reads batches the same way.
    qat.calibrate(qmodel, [((x, y), None)], progress=False)
    int_model = qat.convert(qmodel)
    with pytest.raises(TypeError, match="qat.compare: " + expected):
        qat.compare(qmodel, int_model, [(x, y)])
    with pytest.raises(TypeError, match="qat.sensitivity: " + expected):
        qat.sensitivity(_TwoInputs(), [(x, y)], progress=False)
    # A TypeError from inside a model that takes the input is the model's own, as it was.
    broken = qat.prepare(nn.Sequential(nn.Linear(4, 3), _RaisesTypeError()))
    with pytest.raises(TypeError, match=r"^an error of the model's own$"):
        qat.calibrate(broken, [(x, y)], progress=False)


class _RaisesTypeError(nn.Module):
    def forward(self, x):
        raise TypeError("an error of the model's own")


def test_export_with_an_input_that_does_not_fit_leaves_no_file(tmp_path):
    qmodel = _calibrated(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="does not fit the model"):
        qat.export(qmodel, tmp_path / "m.ptl", torch.randn(2, 5))
    assert os.listdir(tmp_path) == []


def test_recursive_estimator_error_stops_at_the_first_level():
    name = "test_recursive"

    def recursive(x, scale, zero_point, quant_min, quant_max, axis, grad_scale, delta):
        return qat.ops.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis,
                                     estimator=name)

    qat.estimators.register(name, recursive, replace=True)
    try:
        with pytest.raises(RuntimeError, match=f"estimator '{name}' calls fake_quantize with "
                                               f"estimator='{name}' itself") as error:
            qat.ops.fake_quantize(torch.randn(4), 0.1, 0, 0, 255, estimator=name)
        assert len(str(error.value)) < 2000
    finally:
        qat.estimators.unregister(name)


# -- also -----------------------------------------------------------------------------------

class _RefusingQat(nn.Module):
    """A QAT class whose from_float refuses the layer (as a custom one may)."""

    @classmethod
    def from_float(cls, module, spec=None):
        raise ValueError("refused on purpose")


def test_failed_inplace_prepare_leaves_the_model_as_it_was(monkeypatch):
    # The refused layer comes after one prepare has already swapped.
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.LayerNorm(3), nn.Linear(3, 2)).eval()
    before = [(name, type(m)) for name, m in model.named_modules()]
    params = {name: p for name, p in model.named_parameters()}
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    qat.register_module(nn.LayerNorm, _RefusingQat)
    with pytest.raises(ValueError, match="refused on purpose"):
        qat.prepare(model, inplace=True)
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert {name: p for name, p in model.named_parameters()} == params
    assert not model.training


def test_ste_refuses_qparams_that_require_grad_naming_the_learners():
    scale = torch.tensor([0.1], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scale requires grad, but estimator 'ste' does not "
                                           r"learn the scale .*\(lsq, lsq_plus, pact\)"):
        qat.ops.fake_quantize(torch.randn(5, requires_grad=True), scale, 0, 0, 255)
    with torch.no_grad():  # nothing is learned without grad mode: no error
        qat.ops.fake_quantize(torch.randn(5), scale, 0, 0, 255)


@pytest.mark.parametrize("estimator", ["ste", "lsq", "lsq_plus", "pact", "ewgs"])
def test_nan_inputs_stay_nan_through_every_estimator(estimator):
    x = torch.tensor([0.5, math.nan, -0.25, math.nan])
    out = qat.ops.fake_quantize(x, 0.1, 0, -128, 127, estimator=estimator)
    assert torch.isnan(out[[1, 3]]).all()
    assert torch.isfinite(out[[0, 2]]).all()
    assert "NaN propagates" in qat.ops.fake_quantize.__doc__


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        return x * self.weight


class _QatScale(_Scale):
    @classmethod
    def from_float(cls, module, spec=None):
        qat_module = cls()
        qat_module.weight = module.weight
        return qat_module


def test_a_registered_user_layer_is_swapped_not_traced_through(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    qat.register_module(_Scale, _QatScale)
    model = nn.Sequential(nn.Linear(4, 3), _Scale())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stay in float" warning for it
        qmodel = qat.prepare(model)
    assert type(qmodel.get_submodule("1")) is _QatScale
    assert torch.equal(qmodel.get_submodule("1").weight, torch.full((3,), 2.0))
