"""qat.export to ExecuTorch (.pte): each op pattern, the fresh-process round trip in
ExecuTorch's runtime (without qat), parity on the Fashion-MNIST CNN, the delegation report,
the metadata, the command line, and the refusals.

The reference is the integer model on PyTorch's quantized kernels (qat.convert's), which the
.pte re-expresses as quantize / dequantize pairs for XNNPACK: XNNPACK's int8 kernels round
their requantization in their own way, so outputs are held to one quantization step of the
output per element (a step that flips in one layer may move the output by more, rarely)."""

import functools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat import _pte
from qat.export import describe, load
from qat.mobile import executorch_latency_ms

from helpers import (QDQ_PATTERNS, Activations, ConvBnRelu, FashionNet,
                     GroupAndLayerNormed, KeywordNet, Mlp, TextCNN, TextEncoder, calibrated,
                     small_swin, sqnr_db, steps_apart)

MISSING = _pte.available()
# A real limit: ExecuTorch exists only for the PyPI leg's PyTorch (executorch is pinned in
# requirements/pypi.txt); Debian's 1.13 has none, and there the refusal test below runs.
needs_executorch = pytest.mark.skipif(
    MISSING is not None, reason=f"{MISSING} (the .pte tests run on the PyPI leg)")


@needs_executorch
@pytest.mark.parametrize("name", QDQ_PATTERNS)
def test_each_op_pattern_runs_on_xnnpack_as_the_integer_model(name, tmp_path):
    cls, shape, preset = QDQ_PATTERNS[name]
    x = torch.rand(64, *shape)
    config = getattr(qat.presets, preset)() if preset else None
    qmodel = calibrated(cls(), x, config)
    path = str(tmp_path / "model.pte")
    int_model = qat.export(qmodel, path, x[:8])
    with torch.no_grad():
        expected = int_model(x[:8])
    got = _pte.run_fresh(path, (x[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99, steps.max()
    assert steps.max().item() <= 3
    report = qat.read_metadata(path)["executorch"]
    # Every conv and linear of the model runs on XNNPACK.
    layers = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
                 for m in cls().modules())
    assert report["layers"] == layers
    assert report["layers_delegated"] == layers
    # 1-D average pooling is XNNPACK's 2-D pooling between an unsqueeze and a squeeze,
    # which run outside it (as copies of a few values).
    views = (["aten.unsqueeze_copy.default", "aten.squeeze_copy.dims"]
             if cls is KeywordNet else [])
    assert report["not_delegated"] == views
    convs = [n for n, m in cls().named_modules() if isinstance(m, nn.Conv2d)]
    assert report["sub_8bit_weights_as_int8"] == (convs if preset == "w4a8" else [])


@needs_executorch
def test_3d_convs_are_refused_naming_the_layer(tmp_path):
    """Neither XNNPACK nor ExecuTorch's portable kernels have a 3-D convolution: a clear
    error naming the layer, and no file left behind."""
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 3 * 4 * 4, 2))
    x = torch.randn(8, 2, 3, 4, 4)
    qmodel = calibrated(model, x)
    with pytest.raises(TypeError, match=r"no \.pte lowering for the 3-D conv 0: neither "
                                        r"XNNPACK nor ExecuTorch's portable kernels"):
        qat.export(qmodel, tmp_path / "model.pte", x[:1])
    assert os.listdir(tmp_path) == []


@needs_executorch
@pytest.mark.parametrize("mode,offsets,skipped", [
    ("mean", False, False), ("sum", True, False), ("mean", True, False), ("max", True, True)],
    ids=["rows_mean", "offsets_sum_weighted", "offsets_mean", "float_offsets_max"])
def test_embedding_bags_give_the_integer_models_bags(mode, offsets, skipped, tmp_path):
    """embedding_bag is not in the Core ATen opset ExecuTorch lowers: a bag is looked up
    and summed in ops that are (one bag per row of 2-D indices; 1-D indices cut at their
    offsets, empty bags and a last offset that only ends the last bag included, per-sample
    weights with sum; a bag the Config leaves in float too, in mode max), and the program
    gives the integer model's outputs."""
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 6, mode=mode, include_last_offset=offsets)
            self.fc = nn.Linear(6, 2)

        def forward(self, tokens, starts, weights):
            if not offsets:
                return self.fc(self.bag(tokens))
            return self.fc(self.bag(tokens, starts, per_sample_weights=weights
                                    if mode == "sum" else None))

    torch.manual_seed(0)
    if offsets:
        inputs = (torch.randint(0, 20, (14,)), torch.tensor([0, 3, 3, 9, 14]), torch.rand(14))
    else:
        inputs = (torch.randint(0, 20, (4, 5)), torch.zeros(0), torch.zeros(0))
    config = qat.Config(skip=["bag"]) if skipped else qat.Config()
    qmodel = qat.prepare(Bags(), config)
    qat.calibrate(qmodel, [(inputs,)], progress=False)
    path = str(tmp_path / "bags.pte")
    int_model = qat.export(qmodel, path, inputs)
    with torch.no_grad():
        expected = int_model(*inputs)
    got = _pte.run_fresh(path, inputs)[0]
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).all()
    assert qat.read_metadata(path)["executorch"]["weights_as_float"] == ([] if skipped
                                                                        else ["bag"])


@needs_executorch
def test_embedding_tables_are_stored_in_float_and_said_so(tmp_path):
    """XNNPACK has no embedding kernel and ExecuTorch's default runtime no quantized one:
    the table is stored as the float values of its integers, the program gives the integer
    model's outputs, and the report names the table."""
    torch.manual_seed(0)
    qmodel = qat.prepare(TextCNN())
    tokens = torch.randint(0, 500, (32, 20))
    qat.calibrate(qmodel, [tokens[:16], tokens[16:]], progress=False)
    path = str(tmp_path / "text.pte")
    int_model = qat.export(qmodel, path, tokens[:8])  # the program's fixed shape
    with torch.no_grad():
        expected = int_model(tokens[:8])
    got = _pte.run_fresh(path, (tokens[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    assert qat.read_metadata(path)["executorch"]["weights_as_float"] == ["embed"]
    assert "weights stored in float (no integer embedding or recurrent kernel in " \
        "ExecuTorch's default runtime): embed" in describe(path)


@needs_executorch
@pytest.mark.parametrize("height,width", [(32, 32), (36, 16)],
                         ids=["whole_windows", "padded_shifted_along_rows_only"])
def test_swin_window_attention_runs_and_follows_the_integer_model(height, width, tmp_path):
    """torchvision's Swin (V1) through qat's window attention: every linear and the patch
    conv delegated to XNNPACK; its pads (none needed on whole windows and even sides, real
    ones on padded windows, a roll after them) load in ExecuTorch's runtime, where XNNPACK
    refused to build them; the program follows the integer model."""
    torch.manual_seed(0)
    x = torch.randn(24, 3, height, width)
    qmodel = qat.prepare(small_swin())
    qat.calibrate(qmodel, [x[:8], x[8:16]], progress=False)
    path = str(tmp_path / "swin.pte")
    int_model = qat.export(qmodel, path, x[:4])  # the program's fixed shape
    got = _pte.run_fresh(path, (x[16:20],))[0]
    with torch.no_grad():
        expected = int_model(x[16:20])
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["executorch"]
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in small_swin().modules())
    assert report["layers"] == report["layers_delegated"] == layers


@needs_executorch
def test_transformer_encoder_projections_run_on_xnnpack(tmp_path):
    """Every projection of the encoder's attention and feed-forward layers is delegated to
    XNNPACK as an int8 linear; the attention itself, the layer norms and the table run
    in float, and the program follows the integer model."""
    torch.manual_seed(0)
    qmodel = qat.prepare(TextEncoder(padding=True))
    tokens = torch.randint(1, 50, (32, 12))
    tokens[::4, 8:] = 0
    qat.calibrate(qmodel, [tokens[:16], tokens[16:]], progress=False)
    path = str(tmp_path / "encoder.pte")
    int_model = qat.export(qmodel, path, tokens[:8])
    with torch.no_grad():
        expected = int_model(tokens[:8])
    got = _pte.run_fresh(path, (tokens[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()
    report = qat.read_metadata(path)["executorch"]
    # Per layer: query, key, value and output projections and two feed-forward linears;
    # and the head.
    assert report["layers"] == report["layers_delegated"] == 2 * 6 + 1


class _PreActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 12 * 12, 3)

    def forward(self, x):
        x = self.conv(self.bn_in(x))
        return self.fc(torch.flatten(F.relu(self.bn(x + x.mean(1, keepdim=True))), 1))


@needs_executorch
@pytest.mark.parametrize("cls, kernels", [
    (_PreActivation, {"bn_in": qat.quantized.BatchNorm, "bn": qat.quantized.BatchNorm}),
    (GroupAndLayerNormed, {"group_norm": qat.quantized.GroupNorm,
                   "layer_norm": qat.quantized.LayerNorm}),
    (functools.partial(Activations, 12), {
        "elu": qat.quantized.ELU, "leaky_relu_int": qat.quantized.LeakyReLU,
        "leaky": qat.quantized.LeakyReLU, "elu_1_int": qat.quantized.ELU}),
], ids=["batch_norm", "group_and_layer_norm", "elu_and_leaky_relu"])
def test_norms_and_activations_follow_the_integer_model(cls, kernels, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(64, 3, 12, 12)
    model = cls()
    with torch.no_grad():  # running statistics that are not the identity
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    qmodel = calibrated(model, x)
    path = str(tmp_path / "model.pte")
    int_model = qat.export(qmodel, path, x[:8])
    assert {name: type(int_model.get_submodule(name)) for name in kernels} == kernels
    with torch.no_grad():
        expected = int_model(x[:8])
    got = _pte.run_fresh(path, (x[:8],))[0]
    steps = steps_apart(qmodel, expected, got)
    assert (steps <= 1 + 1e-3).float().mean().item() >= 0.99 and steps.max() <= 3, steps.max()


@needs_executorch
def test_dynamic_recurrent_layers_are_stored_in_float_and_said_so(tmp_path):
    """ExecuTorch has no dynamic quantized LSTM: the program runs a float LSTM on the
    values of the integer weights (the reference's own integers), reported as float."""
    torch.manual_seed(0)
    qmodel = qat.prepare(_LastStep(nn.LSTM(12, 24, batch_first=True)),
                         qat.presets.w8a8_dynamic()).eval()
    x = torch.randn(4, 7, 12)
    path = str(tmp_path / "lstm.pte")
    int_model = qat.export(qmodel, path, x)
    got = _pte.run_fresh(path, (x,))[0]
    with torch.no_grad():
        # The integer model also quantizes the LSTM's inputs at run time; the program's
        # float LSTM does not: close, not equal.
        assert sqnr_db(int_model(x), got) >= 30
    assert qat.read_metadata(path)["executorch"]["weights_as_float"] == ["lstm"]


class _LastStep(nn.Module):
    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm
        self.fc = nn.Linear(lstm.hidden_size, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


@needs_executorch
def test_w4a8_linear_weights_are_stored_at_4_bits(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(64, 256)
    sizes = {}
    for preset in ("int8", "w4a8"):
        path = tmp_path / f"{preset}.pte"
        qat.export(calibrated(model, x, getattr(qat.presets, preset)()), path, x[:1])
        sizes[preset] = path.stat().st_size
    weights = 256 * 256 + 256 * 10
    # Half a byte less per weight, less what the 4-bit layout adds (scales stay fp32).
    assert sizes["int8"] - sizes["w4a8"] >= 0.45 * weights, sizes


# Loads a .pte where qat cannot be imported at all and runs it: the file needs only
# ExecuTorch's runtime.
_WITHOUT_QAT = """
import sys
sys.modules["qat"] = None  # import qat now fails
import torch
from executorch.extension.pybindings.portable_lib import _load_for_executorch
program = _load_for_executorch(sys.argv[1])
out = program.forward([torch.load(sys.argv[2])])[0]
torch.save(out, sys.argv[3])
"""


@needs_executorch
def test_the_file_runs_in_a_fresh_process_that_cannot_import_qat(tmp_path):
    x = torch.rand(32, 1, 28, 28)
    qmodel = calibrated(FashionNet(), x)
    path = tmp_path / "fashion.pte"
    int_model = qat.export(qmodel, path, x[:4])
    torch.save(x[:4], tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", _WITHOUT_QAT, str(path),
                           str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = int_model(x[:4])
    assert got.shape == expected.shape
    assert (steps_apart(qmodel, expected, got) <= 1 + 1e-3).float().mean().item() >= 0.99


@needs_executorch
def test_fashion_mnist_pte_matches_the_simulation(fashion_qat_model, tmp_path):
    qmodel, test_x, test_y = fashion_qat_model
    batch = 500
    path = str(tmp_path / "fashion.pte")
    qat.export(qmodel, path, test_x[:batch])
    batches = [test_x[i:i + batch] for i in range(0, len(test_x), batch)]
    parity = qat.compare(qmodel, path, batches)
    program, _ = load(path)
    with torch.no_grad():
        accuracy = {
            "simulation": (qmodel(test_x).argmax(1) == test_y).float().mean().item(),
            "pte": (torch.cat([program(b) for b in batches]).argmax(1) == test_y)
            .float().mean().item()}
    print(f"\nFashion-MNIST test set (10,000), .pte in ExecuTorch: {parity}, "
          f"accuracy {accuracy}")
    assert parity["within_one_step"] >= 0.99
    assert parity["top1_agreement"] >= 0.995
    assert accuracy["simulation"] > 0.6, "the model did learn"


@needs_executorch
def test_the_report_names_the_ops_that_run_outside_xnnpack(tmp_path):
    class Erf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.erf(self.conv(x))

    x = torch.randn(16, 1, 8, 8)
    path = str(tmp_path / "erf.pte")
    qat.export(calibrated(Erf(), x), path, x[:2])
    report = qat.read_metadata(path)
    assert report["executorch"] == {"layers": 1, "layers_delegated": 1,
                                    "not_delegated": ["aten.erf.default"],
                                    "sub_8bit_weights_as_int8": [],
                                    "weights_as_float": []}
    assert "XNNPACK runs 1 of 1 convs / linears; ops outside it: aten.erf.default" in \
        describe(path)


@needs_executorch
def test_metadata_is_the_shared_writers_with_the_delegation_report(tmp_path):
    x = torch.rand(32, 3, 12, 12)
    qmodel = calibrated(ConvBnRelu(), x)
    qat.export(qmodel, tmp_path / "m.pte", x[:2])
    qat.export(qmodel, tmp_path / "m.pt", x[:2], mobile=False)
    pte = qat.read_metadata(tmp_path / "m.pte")
    pt = qat.read_metadata(tmp_path / "m.pt")
    assert set(pte) - set(pt) == {"executorch"}
    assert {k: v for k, v in pte.items() if k != "executorch"} == pt
    assert pte["example_inputs"] == [{"shape": [2, 3, 12, 12], "dtype": "torch.float32"}]


@needs_executorch
def test_dynamic_linears_keep_their_int8_weights(tmp_path):
    x = torch.randn(32, 20)
    qmodel = calibrated(Mlp(), x, qat.presets.w8a8_dynamic())
    path = str(tmp_path / "dynamic.pte")
    int_model = qat.export(qmodel, path, x[:4])
    with torch.no_grad():
        expected = int_model(x[:4])
    got = _pte.run_fresh(path, (x[:4],))[0]
    # Both quantize each input at run time to its own range; XNNPACK chooses and rounds
    # those qparams its own way.
    assert sqnr_db(expected, got) >= 30
    report = qat.read_metadata(path)["executorch"]
    # XNNPACK's dynamically quantized linear runs both (int8 input, int8 weights).
    assert (report["layers"], report["layers_delegated"]) == (2, 2)


@needs_executorch
def test_format_forces_the_kind_whatever_the_suffix(tmp_path):
    x = torch.rand(16, 20)
    path = tmp_path / "model.bin"
    qat.export(calibrated(Mlp(), x), path, x[:2], format="pte")
    assert path.read_bytes()[4:8] == b"ET12"


@needs_executorch
def test_inputs_that_do_not_fit_the_program_are_named(tmp_path):
    # ExecuTorch's runtime itself only answers "Failed to execute method forward, error:
    # 0x10" (a shape) or 0x12 (a dtype, a count).
    x = torch.rand(16, 20)
    qmodel = calibrated(Mlp(), x)
    path = str(tmp_path / "model.pte")
    qat.export(qmodel, path, x[:2])
    forward, _ = load(path)
    bad = {"input 0 has shape (4, 20), but the program takes (2, 20)": [x[:4]],
           "input 0 has dtype torch.float64, but the program takes torch.float32":
               [x[:2].double()],
           "the program takes 1 input(s), got 2": [x[:2], x[:2]],
           "input 0 must be a tensor of shape (2, 20)": [[0.5] * 20]}
    for message, inputs in bad.items():
        with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
            forward(*inputs)
    with pytest.raises(ValueError, match=re.escape("example input it was exported with")):
        qat.compare(qmodel, path, [x[:4]])
    with pytest.raises(ValueError, match=re.escape("input 0 has shape (3, 20)")):
        executorch_latency_ms({"model": path}, x[:3], 1, 0)
    # The shape it was exported with runs.
    assert forward(x[:2]).shape == (2, 8)
    assert qat.compare(qmodel, path, [x[:2], x[2:4]])["top1_agreement"] == 1.0


@needs_executorch
def test_an_op_executorch_cannot_lower_is_named_and_no_file_is_left(tmp_path):
    class Unique(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.unique(self.fc(x))

    x = torch.randn(16, 4)
    qmodel = calibrated(Unique(), x)
    path = tmp_path / "unique.pte"
    path.write_bytes(b"the previous file")
    with pytest.raises(RuntimeError, match=r"ExecuTorch cannot lower this model to its edge "
                                           r"dialect \(at aten\._unique2\.default\), so no "
                                           r"\.pte was written"):
        qat.export(qmodel, path, x[:2])
    assert path.read_bytes() == b"the previous file"
    assert sorted(os.listdir(tmp_path)) == ["unique.pte"]


@needs_executorch
def test_a_model_neither_prepared_nor_converted_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"a \.pte is written from a QAT model or one "
                                        r"converted by qat\.convert .* got Linear"):
        qat.export(nn.Linear(2, 2), tmp_path / "m.pte", torch.randn(1, 2))
    assert os.listdir(tmp_path) == []


def test_an_unknown_format_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"qat.export: format must be one of ptl, pt, pte, "
                                         r"onnx \(or None: from the path's suffix\), got "
                                         r"'tflite'"):
        qat.export(nn.Linear(2, 2), tmp_path / "m.tflite", torch.randn(1, 2), format="tflite")
    assert os.listdir(tmp_path) == []


# The refusal can only be seen where ExecuTorch is absent (the Debian leg runs it).
@pytest.mark.skipif(MISSING is None, reason="ExecuTorch is installed here")
def test_without_executorch_a_pte_is_refused_with_the_reason(tmp_path):
    x = torch.rand(16, 20)
    with pytest.raises(RuntimeError, match=r"qat.export: cannot write or run .pte files: "
                                           r"ExecuTorch is not installed for this PyTorch"):
        qat.export(calibrated(Mlp(), x), tmp_path / "m.pte", x[:2])
    assert os.listdir(tmp_path) == []


@needs_executorch
def test_command_line_inspects_benches_and_compares_pte_files(tmp_path, fashion_qat_model):
    qmodel, test_x, _ = fashion_qat_model
    qat.export(qmodel, tmp_path / "int.pte", test_x[:4])
    qat.export(qmodel, tmp_path / "int.pt", test_x[:1], mobile=False)

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "qat", *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    out = cli("inspect", tmp_path / "int.pte")
    assert "XNNPACK runs 5 of 5 convs / linears" in out
    # Without --batch, the batch the program was exported with: the only one it runs.
    out = cli("bench", tmp_path / "int.pte", "--iterations", "5", "--threads", "1")
    assert "ExecuTorch, engine XNNPACK, threads 1, input 4x1x28x28 float32" in out
    done = subprocess.run([sys.executable, "-m", "qat", "bench", str(tmp_path / "int.pte"),
                           "--batch", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    assert "runs the input shape it was exported with, 4x1x28x28; pass --batch 4" in \
        done.stderr
    out = cli("compare", tmp_path / "int.pt", tmp_path / "int.pte", "--limit", "200",
              "--batch", "4")
    agreement = float(out.split("top-1 agreement ")[1].split()[0])
    assert agreement >= 0.99
    # Batches of 64 do not fit a program exported for 4 images: one line that says so (the
    # runtime's error code came out as a traceback).
    done = subprocess.run([sys.executable, "-m", "qat", "compare", str(tmp_path / "int.pt"),
                           str(tmp_path / "int.pte"), "--limit", "200", "--batch", "64"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "int.pte: input 0 has shape (64, 1, 28, 28), but the program takes (4, 1, 28, 28)" \
        in done.stderr
