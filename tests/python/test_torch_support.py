"""qat on every supported PyTorch (Debian's 1.13 and the newest on PyPI): no warning of
qat's own in a whole workflow, PyTorch's deprecation notes once per process, export without
XNNPACK, clear errors where TorchScript or the lite interpreter is missing, and nothing
needed from torch.ao.quantization."""

import importlib
import json
import textwrap
import warnings

import pytest
import torch
from torch import nn

import qat
import qat._torch_support as support
from conftest import SUBPROCESS_ENV
from helpers import run_python

# The module qat.export (the name qat.export is the function).
export_module = importlib.import_module("qat.export")

# Runs the whole user workflow twice in a fresh process (so that no earlier test has shown
# a warning already) and prints, per pass, every warning raised, with all filters "always".
_WORKFLOW = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from torch import nn
    import qat, qat.mobile

    LSQ = qat.Config(
        weight=qat.QuantSpec(bits=8, symmetric=True, per_channel=True, axis=0,
                             observer="minmax", estimator="lsq"),
        activation=qat.QuantSpec(bits=8, symmetric=False, observer="moving_average",
                                 estimator="lsq"))

    def workflow(folder, tag):
        for config, name in ((qat.presets.int8(), "int8"), (LSQ, "lsq")):
            one_config(config, folder, f"{tag}_{name}")

    def one_config(config, folder, tag):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 10))
        qmodel = qat.prepare(model, config, example_inputs=(torch.rand(2, 1, 8, 8),))
        optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
        x = torch.rand(8, 1, 8, 8)
        nn.functional.cross_entropy(qmodel(x), torch.arange(8) % 10).backward()
        optimizer.step()
        qat.calibrate(qmodel, [torch.rand(4, 1, 8, 8)], progress=False)
        int_model = qat.convert(qmodel)
        int_model(x)
        qat.export(qmodel, f"{folder}/{tag}.ptl", x[:1])
        qat.export(qmodel, f"{folder}/{tag}.pt", x[:1], mobile=False)
        qat.compare(qmodel.eval(), int_model, [x])
        qat.mobile.save_for_lite_interpreter(model, f"{folder}/{tag}_float.ptl")
        qat.mobile.lite_latency_ms({"m": f"{folder}/{tag}.ptl"}, x[:1], 2, 1)

    engine = torch.backends.quantized.engine  # a fresh process's default
    passes = []
    for tag in ("first", "second"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            workflow(sys.argv[1], tag)
        passes.append([{"category": w.category.__name__, "message": str(w.message),
                        "file": w.filename} for w in caught])
    print(json.dumps({"passes": passes, "engine": engine}))
""")


def test_a_workflow_gives_no_warning_of_qats_own_and_torchs_deprecations_once(tmp_path):
    run = run_python(_WORKFLOW, tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True,
                     timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    first, second = result["passes"]
    # Nothing is said twice: not within the first pass, and nothing at all in the second.
    assert second == [], second
    messages = [(w["category"], w["message"]) for w in first]
    assert len(messages) == len(set(messages)), messages
    # qat's own warnings: the one that says the .ptl files are written without XNNPACK's
    # rewrites, only where this PyTorch has no XNNPACK; and the one that says convert set
    # the process's quantized engine to qnnpack, only where it was another one (a fresh
    # process on x86 starts with fbgemm, x86 or onednn).
    own = [w["message"] for w in first if w["message"].startswith("qat")]
    expected = [] if support.xnnpack_available() else ["no XNNPACK"]
    if result["engine"] != "qnnpack":
        expected.append(f"set torch.backends.quantized.engine from '{result['engine']}' to "
                        f"'qnnpack'")
    assert sorted(next(e for e in expected if e in m) for m in own) == sorted(expected), own
    # Whatever else came is one of PyTorch's deprecation notes.
    others = [w for w in first if not w["message"].startswith("qat")]
    assert all("deprecated" in w["message"].lower() for w in others), others


def _calibrated_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    qmodel = qat.prepare(model)
    qat.calibrate(qmodel, [torch.rand(4, 1, 8, 8)], progress=False)
    return qmodel


def test_export_without_xnnpack_writes_a_working_ptl_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "xnnpack_available", lambda: False)
    monkeypatch.setattr(support, "_SHOWN", set())
    qmodel = _calibrated_model()
    x = torch.rand(3, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("a.ptl", "b.ptl"):
            int_model = qat.export(qmodel, tmp_path / name, x)
    notes = [str(w.message) for w in caught if "no XNNPACK" in str(w.message)]
    assert len(notes) == 1, notes
    assert notes[0].startswith("qat: this PyTorch")
    from torch.jit.mobile import _load_for_lite_interpreter

    loaded = _load_for_lite_interpreter(str(tmp_path / "b.ptl"))
    with torch.no_grad():
        assert torch.equal(loaded(x), int_model(x))


def test_without_a_lite_interpreter_export_names_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(support, "has_lite_interpreter", lambda: False)
    qmodel = _calibrated_model()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match=r"qat\.export: this PyTorch .* has no lite "
                                           r"interpreter.*mobile=False"):
        qat.export(qmodel, tmp_path / "m.ptl", x)
    assert not (tmp_path / "m.ptl").exists()
    # Full TorchScript still works.
    qat.export(qmodel, tmp_path / "m.pt", x, mobile=False)
    assert (tmp_path / "m.pt").is_file()


def test_without_torchscript_export_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(support, "has_torchscript", lambda: False)
    with pytest.raises(RuntimeError, match=r"qat\.export: this PyTorch .* has no TorchScript"):
        qat.export(_calibrated_model(), tmp_path / "m.pt", torch.rand(2, 1, 8, 8),
                   mobile=False)


def test_deprecation_notes_pass_once_and_other_warnings_each_time(monkeypatch):
    monkeypatch.setattr(support, "_SHOWN", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with support.torch_deprecations_once():
                with support.torch_deprecations_once():  # nested: collected once, outside
                    warnings.warn("`torch.jit.script` is deprecated", FutureWarning)
                warnings.warn("Lite Interpreter is deprecated", DeprecationWarning)
                warnings.warn("a note that is not a deprecation", UserWarning)
    said = [(w.category, str(w.message)) for w in caught]
    assert said.count((FutureWarning, "`torch.jit.script` is deprecated")) == 1
    assert said.count((DeprecationWarning, "Lite Interpreter is deprecated")) == 1
    assert said.count((UserWarning, "a note that is not a deprecation")) == 3


def test_warnings_of_a_failing_body_are_still_passed_on(monkeypatch):
    monkeypatch.setattr(support, "_SHOWN", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="body failed"):
            with support.torch_deprecations_once():
                warnings.warn("said before the error")
                raise ValueError("body failed")
    assert [str(w.message) for w in caught] == ["said before the error"]


# prepare, calibrate and convert with torch.ao.quantization and both intrinsic packages
# made unimportable, as in a PyTorch that has removed them. (Export is left out: TorchScript
# itself imports torch.ao.quantization in the PyTorch versions that still have it.)
_WITHOUT_TORCH_AO = textwrap.dedent("""
    import sys
    import importlib.abc

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("torch.ao.quantization", "torch.ao.nn.intrinsic",
                                "torch.nn.intrinsic")):
                raise ImportError(f"{name} is refused by this test")
            return None

    import torch
    import torch.ao.nn
    # torch imports them itself: unload them, then refuse them to qat.
    for name in [name for name in sys.modules
                 if name.startswith(("torch.ao.quantization", "torch.ao.nn.intrinsic",
                                     "torch.nn.intrinsic"))]:
        del sys.modules[name]
    for package, name in ((torch.ao, "quantization"), (torch.ao.nn, "intrinsic"),
                          (torch.nn, "intrinsic")):
        if hasattr(package, name):
            delattr(package, name)
    sys.meta_path.insert(0, Refuse())
    from torch import nn
    import qat
    from qat.modules import fused

    assert fused.TORCH_EQUIVALENTS == {}, fused.TORCH_EQUIVALENTS
    assert not any(name.startswith(("torch.ao.quantization", "torch.ao.nn.intrinsic"))
                   for name in sys.modules), sorted(sys.modules)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    qmodel = qat.prepare(model)
    assert type(qmodel.get_submodule("0")).__name__ == "ConvBnReLU2d", qmodel
    qat.calibrate(qmodel, [torch.rand(4, 1, 8, 8)], progress=False)
    x = torch.rand(2, 1, 8, 8)
    int_model = qat.convert(qmodel)
    print(int_model(x).shape)
""")


def test_prepare_and_convert_need_nothing_from_torch_ao():
    run = run_python(_WITHOUT_TORCH_AO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                     timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "torch.Size([2, 10])"


def test_a_model_fused_by_pytorch_is_matched_where_pytorch_has_fused_modules():
    from qat.modules import fused

    # A real limit, not a failure: a PyTorch without torch.ao.nn.intrinsic has no fused
    # models to match (1.13 and 2.15 both have them, so the test runs on both legs).
    if not fused.TORCH_EQUIVALENTS:
        pytest.skip("this PyTorch has no fused conv + batch norm modules")
    try:
        from torch.ao.quantization import fuse_modules_qat
    except ImportError:
        from torch.quantization import fuse_modules_qat
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    fused_model = fuse_modules_qat(model, [["0", "1", "2"]])
    torch_fused = fused_model[0]
    assert type(torch_fused) in fused.TORCH_EQUIVALENTS
    assert qat.modules.lookup(torch_fused) is qat.modules.ConvBnReLU2d
    conv_bn_relu = qat.modules.ConvBnReLU2d.from_float(torch_fused)
    # It shares the fused model's parameters, as from qat's own fusion.
    assert conv_bn_relu.weight is torch_fused[0].weight
    assert conv_bn_relu.bn.running_var is torch_fused[1].running_var
    # And a model holding one is prepared into the same QAT module.
    qmodel = qat.prepare(fused_model)
    assert any(isinstance(m, qat.modules.ConvBnReLU2d) for m in qmodel.modules()), qmodel
