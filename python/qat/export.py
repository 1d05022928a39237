"""``qat.export``: an integer model as a frozen TorchScript file for PyTorch Mobile (``.ptl``,
the lite interpreter), full TorchScript (``.pt``), an ExecuTorch program (``.pte``, integer
ops on XNNPACK) or a QDQ ONNX model (``.onnx``, integer ops in ONNX Runtime), with qat's
metadata inside, checked against the in-memory model after it is
written; and ``read_metadata`` to get it back."""

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from . import _C, _onnx, _pte, quantized
from ._torch_support import (require_lite_interpreter, require_torchscript,
                             torch_deprecations_once, uncompiled, warn_once,
                             xnnpack_available)
from .convert import ConversionReport, convert, weight_elements
from .fake_quant import FakeQuantize, holds_fake_quantize

__all__ = ["FORMATS", "METADATA_FILE", "describe", "export", "load", "read_metadata"]

# The extra file of the archive that holds qat's metadata (JSON).
METADATA_FILE = "qat/metadata.json"

# What export writes: the lite interpreter's .ptl, full TorchScript's .pt, ExecuTorch's .pte,
# ONNX Runtime's .onnx.
FORMATS = ("ptl", "pt", "pte", "onnx")

# An ExecuTorch program is a flatbuffer whose identifier stands at bytes 4 to 8.
_PTE_MAGIC = b"ET12"


def _is_pte(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8)[4:8] == _PTE_MAGIC


def _is_onnx(path) -> bool:
    """An ONNX model is a protobuf ModelProto, which starts with its ir_version (field 1, a
    varint: byte 0x08); neither a zip archive nor an ExecuTorch program does."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x08"


def _choose_format(path, mobile: bool, format) -> str:
    """``format`` when given; else ``pte`` for a ``.pte`` path, and ``ptl`` or ``pt`` as
    ``mobile`` says for any other."""
    if format is None:
        for suffix in ("pte", "onnx"):
            if os.fspath(path).endswith("." + suffix):
                return suffix
        return "ptl" if mobile else "pt"
    if format not in FORMATS:
        raise ValueError(f"qat.export: format must be one of {', '.join(FORMATS)} (or None: "
                         f"from the path's suffix), got {format!r}")
    return format


def require_executorch(caller: str) -> None:
    """Raises a RuntimeError naming ``caller`` where ExecuTorch cannot be imported."""
    reason = _pte.available()
    if reason is not None:
        raise RuntimeError(f"{caller}: cannot write or run .pte files: {reason} (install the "
                           f"executorch package pinned in requirements/pypi.txt)")


def require_onnx(caller: str) -> None:
    """Raises a RuntimeError naming ``caller`` where onnx or ONNX Runtime cannot be imported."""
    reason = _onnx.available()
    if reason is not None:
        raise RuntimeError(f"{caller}: cannot write or run .onnx files: {reason} (install "
                           f"the onnx and onnxruntime packages pinned in requirements/pypi.txt)")


def _check_writable(path: str) -> None:
    """Fails before any work when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ValueError(f"qat.export: path {path!r} is a directory, not a file")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"qat.export: the folder of {path!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"qat.export: {path!r} is not writable")


def _metadata(model: nn.Module, inputs: tuple) -> str:
    """The metadata JSON, by the writer both front ends share (``qat::metadata_json``)."""
    ops = [m.lowered(name) for name, m in model.named_modules()
           if isinstance(m, (quantized.Quantize, quantized._WithOutputQParams,
                             quantized.Embedding))]
    return _C._metadata_json(ops, getattr(model, "qat_config", "{}") or "{}",
                             torch.backends.quantized.engine, torch.__version__, list(inputs))


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("qat.export: example_inputs must be a tensor or a tuple of tensors, got "
                    f"{type(example_inputs).__name__}")


def _script(model: nn.Module, inputs: tuple, eager: bool):
    """``model`` scripted, or traced where scripting fails, except for a model that took
    qat.prepare's eager fallback (``eager``): torch.fx could not trace it, most often for
    control flow on tensors, which a trace would fix to the branches ``inputs`` take while
    the export's check runs those same inputs."""
    # A scripted file gets the stored weights, not the kernels' packed form (rebuilt on the
    # first forward after loading).
    for module in model.modules():
        if isinstance(module, quantized._PacksOnFirstForward):
            module._packed_params = None
    try:
        with warnings.catch_warnings():
            # torch.fx's GraphModule.__init__ annotates an attribute in a way torch.jit
            # warns about; the attribute is not part of the scripted model.
            warnings.filterwarnings("ignore", message="The TorchScript type system")
            return torch.jit.script(model)
    except Exception as error:  # noqa: BLE001 - any scripting failure tries tracing
        message = str(error).strip()
    if eager:
        raise RuntimeError(
            f"qat.export: torch.jit.script failed on a model that took qat.prepare's eager "
            f"fallback, and a trace would keep only the branches of its control flow that "
            f"example_inputs take, so nothing was written; make its forward scriptable "
            f"(TorchScript said:\n{message})")
    warnings.warn(
        f"qat.export: torch.jit.script failed, so the model was traced with example_inputs "
        f"instead (control flow is fixed to what they took): {message.splitlines()[0]}",
        stacklevel=3)
    try:
        # The weights packed again before the trace: its check run would otherwise record
        # the packing, which only the first call does, and find another graph.
        with torch.no_grad():
            model(*inputs)
        return torch.jit.trace(model, inputs)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(
            f"qat.export: the model can be neither scripted nor traced. Scripting said:\n"
            f"{message}\nTracing said: {error}") from error


def optimize_for_mobile(frozen):
    """``torch.utils.mobile_optimizer.optimize_for_mobile(frozen)`` where this PyTorch has
    XNNPACK; ``frozen`` as it is, with a warning once per process, where it has none (the
    official builds from 2.13 on: optimize_for_mobile asserts there). The lite interpreter
    runs the frozen module either way; the rewrites only speed up float ops."""
    if xnnpack_available():
        from torch.utils.mobile_optimizer import optimize_for_mobile as optimize

        return optimize(frozen)
    warn_once(f"qat: this PyTorch ({torch.__version__}) has no XNNPACK, so .ptl files "
              f"are written without optimize_for_mobile's rewrites (they run as they are; "
              f"the rewrites only speed up float ops)", stacklevel=3)
    return frozen


def export(model: nn.Module, path: Union[str, os.PathLike], example_inputs,
           mobile: bool = True, format: Optional[str] = None) -> nn.Module:
    """Writes ``model`` as a frozen TorchScript file, an ExecuTorch program or an ONNX model
    and returns the converted integer model it holds.

    A QAT model (holding :class:`qat.FakeQuantize` modules) is converted first with
    :func:`qat.convert`; an integer model is taken as it is. The model is scripted
    (traced with ``example_inputs`` only when scripting fails, with a warning, and never
    for a model that took :func:`qat.prepare`'s eager fallback: a trace would fix its
    control flow to the example's branches), frozen,
    and with ``mobile`` optimized with ``optimize_for_mobile`` (where this PyTorch has
    XNNPACK, which official builds from 2.13 on lack: then the frozen module is saved as it
    is, with a warning once per process) and saved for the lite interpreter (``.ptl``);
    without, saved as full TorchScript (``.pt``). PyTorch's deprecation notes on
    TorchScript and the lite interpreter are passed on once per process, not on every
    call. The archive carries ``qat/metadata.json`` (qat and torch versions, the quantized
    engine, the config of :func:`qat.prepare`, per layer its type, weight bits and scales and output
    qparams, and the shapes and dtypes of ``example_inputs``), which :func:`read_metadata`,
    ``python -m qat inspect FILE`` and ``python -m qat bench FILE`` read.
    The file is then loaded back and must give, on ``example_inputs``, bit for bit the
    outputs of the module it was written from, and the in-memory model's outputs up to what
    freezing and the mobile passes change in float ops (an SQNR of at least 40 dB; an
    all-integer model matches bit for bit).

    A ``.pte`` path (or ``format="pte"``) writes an ExecuTorch program instead: each integer
    op as float arithmetic between quantize / dequantize pairs with the integer model's
    weights and qparams, lowered with XNNPACK's partitioner so that XNNPACK runs it on int8
    kernels (see ``docs/executorch.md``). Its ``qat_metadata`` method returns the metadata,
    with an ``executorch`` entry saying how many convs and linears XNNPACK runs and which ops
    run outside it. The file is run by ExecuTorch's runtime in a fresh process that does not
    import qat, and must give the in-memory model's outputs up to XNNPACK's rounding (an
    SQNR of at least 30 dB on ``example_inputs``).

    An ``.onnx`` path (or ``format="onnx"``) writes a QDQ ONNX model (opset 17): each
    integer op as its ONNX op between ``DequantizeLinear`` inputs and a ``QuantizeLinear``
    / ``DequantizeLinear`` pair with the integer model's qparams, weights stored as their
    int8 integers with per-channel scales, biases on the kernels' int32 grid (see
    ``docs/onnx.md``); the batch dimension is left free where the file, run at another
    batch, follows the integer model (dim 0, or dim 1 of sequence-first inputs; otherwise
    the example's shapes are kept, with a warning). The metadata is the model's
    ``qat_metadata`` metadata_props entry, with an ``onnx`` entry saying how many convs and
    linears ONNX Runtime's optimizer fuses into integer kernels and which float ops remain.
    The file is checked with
    ``onnx.checker``, run by ONNX Runtime in a fresh process that imports neither qat nor
    torch, and must give the in-memory model's outputs up to ONNX Runtime's rounding (an
    SQNR of at least 30 dB).

    Raises:
        FileNotFoundError, PermissionError, ValueError: ``path`` cannot be written (before
            any work is done).
        ValueError: a QAT model that was never calibrated or trained (from
            :func:`qat.convert`).
        RuntimeError: the model can be neither scripted nor traced (an eager-fallback
            model: not scripted; for ``.pte``: not exported by ``torch.export``), or the
            written file does not reproduce the model's outputs; this PyTorch has no
            TorchScript, or (with ``mobile``) no lite interpreter; a ``.pte`` is asked for
            and ExecuTorch is not installed (an ``.onnx`` and onnx / onnxruntime are not).
        TypeError: an op of the model has no ``.pte`` / ``.onnx`` lowering (naming it).
    """
    if not isinstance(path, (str, os.PathLike)):
        swapped = isinstance(example_inputs, (str, os.PathLike))
        raise TypeError(
            f"qat.export: path must be a file path (str or os.PathLike), got "
            f"{type(path).__name__}"
            + (" (the arguments are model, path, example_inputs)" if swapped else ""))
    kind = _choose_format(path, mobile, format)
    _check_writable(path)
    {"pte": require_executorch, "onnx": require_onnx, "ptl": require_lite_interpreter}.get(
        kind, require_torchscript)("qat.export")
    with torch_deprecations_once():
        if kind in ("pte", "onnx"):
            return _export_qdq(model, os.fspath(path), example_inputs, kind)
        return _export(model, os.fspath(path), example_inputs, kind == "ptl")


def _simulation_runs(simulation: Optional[nn.Module], inputs: tuple) -> bool:
    """Whether a copy of the QAT model (in eval: its observers and batch norms keep their
    state) runs on ``inputs``."""
    if simulation is None:
        return False
    try:
        with torch.no_grad():
            copy.deepcopy(simulation).eval()(*inputs)
    except Exception:  # noqa: BLE001 - any failure means the inputs do not fit
        return False
    return True


def _run_example(int_model: nn.Module, inputs: tuple, simulation: Optional[nn.Module] = None):
    """The integer model's outputs on ``inputs``, which must fit it and give finite
    values (a NaN output cannot be checked against the file). When it fails where
    ``simulation``, the QAT model it was converted from, runs, the inputs fit: a kernel
    refused the integer model, and the error says so."""
    for i, t in enumerate(inputs):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"qat.export: example_inputs[{i}] holds NaN or inf; give finite "
                             f"inputs to check the file on")
    try:
        with torch.no_grad():
            expected = int_model(*inputs)
    except Exception as error:  # noqa: BLE001 - whatever the model raises on them
        shapes = ", ".join(str(list(t.shape)) for t in inputs)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[0] if lines else type(error).__name__
        if cause.endswith(":") and len(lines) > 1:
            cause += " " + lines[1]  # newer PyTorch: the op's name ("mm:"), then the error
        if _simulation_runs(simulation, inputs):
            raise RuntimeError(
                f"qat.export: the integer model fails on the example input ({shapes}), on "
                f"which the QAT model runs: a quantized kernel refused it: {cause}") from error
        raise ValueError(f"qat.export: the example input ({shapes}) does not fit the model: "
                         f"{cause}") from error
    outputs = (expected,) if isinstance(expected, torch.Tensor) else expected
    if not isinstance(outputs, (tuple, list)) or not all(
            isinstance(out, torch.Tensor) for out in outputs):
        # The file's check compares outputs tensor by tensor, in order.
        held = ("" if not isinstance(expected, (tuple, list)) else " of " + ", ".join(
            sorted({type(out).__name__ for out in expected})))
        nested = isinstance(expected, (tuple, list)) and any(
            isinstance(out, (tuple, list)) for out in expected)
        raise TypeError(f"qat.export: the model returns a {type(expected).__name__}{held}; "
                        f"an exported model's outputs must be a tensor or a tuple or list of "
                        f"tensors" + (" (return nested ones flat: an LSTM's (output, (h, c)) "
                                      "as (output, h, c))" if nested else ""))
    if all(out.numel() == 0 for out in outputs):
        # Nothing would be checked (an input the model ignores may be empty: a bag's
        # unused offsets).
        empty = ", ".join(f"example_inputs[{i}] is empty (shape {list(t.shape)})"
                          for i, t in enumerate(inputs) if t.numel() == 0)
        raise ValueError(f"qat.export: the model's outputs on the example input are empty, "
                         f"so nothing would be checked ({empty or 'no input is empty'}); give "
                         f"at least one sample")
    for out in outputs:
        values = out.dequantize() if out.is_quantized else out
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise RuntimeError("qat.export: the integer model's outputs on example_inputs are "
                               "not finite (NaN or inf); the file cannot be checked")
    return expected


def _integer_model(model: nn.Module, inputs: tuple):
    """(integer model, its outputs on ``inputs``): ``model`` converted when it is a QAT
    model, taken as it is when it is an integer one (either under torch.compile or not)."""
    model = uncompiled(model)
    simulation = model if holds_fake_quantize(model) else None
    int_model = convert(model) if simulation is not None else model
    int_model.eval()
    _warn_float_weights(int_model)
    return int_model, _run_example(int_model, inputs, simulation)


# Below this share of weight elements stored as integers, a file is mostly a float model.
INTEGER_WEIGHT_SHARE_WARNING = 0.95


def _warn_float_weights(int_model: nn.Module) -> None:
    """Warns, naming the largest float layers, when less than 95% of the weight elements
    are stored as integers: those layers are 4x larger and run on float kernels."""
    integer, floats = weight_elements(int_model)
    report = ConversionReport(integer_weights=integer, float_weights=floats)
    if report.integer_weight_share < INTEGER_WEIGHT_SHARE_WARNING:
        warnings.warn(
            f"qat.export: only {100 * report.integer_weight_share:.1f}% of the weight elements "
            f"are stored as integers (layers without an integer kernel stay float); the "
            f"largest float layers: {', '.join(report.largest_float_layers())}", stacklevel=5)


def _write_checked(path: str, write: Callable[[str], None], check: Callable[[str], None]):
    """Writes the file with ``write(temporary)`` next to ``path`` and renames it over
    ``path`` once ``check(temporary)`` passed: a failure leaves the previous file as it was,
    and a reader never sees half a file."""
    folder, name = os.path.split(os.path.abspath(path))
    # The temporary file has the final name, in a private folder next to ``path`` (the
    # rename stays atomic): a TorchScript archive names its records after its file, so the
    # file is the one a direct save gives, not one whose every record header repeats a long
    # temporary name. Created as any new folder and file are (mkstemp would make them 0600).
    staging = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(staging)
    temporary = os.path.join(staging, name)
    try:
        write(temporary)
        check(temporary)
        if os.path.exists(path):
            # The file it replaces keeps the permissions the user gave it.
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_qat_ops(scripted, int_model: nn.Module, path: str) -> None:
    """Refuses a module whose code calls qat's own operators: the file would load only
    where qat is installed, and a phone has no qat (the check runs here, where qat is
    loaded, so loading the file back would not catch it)."""
    ops = sorted({name for name in torch.jit.export_opnames(scripted)
                  if name.split("::")[0] == "qat"})
    if not ops:
        return
    layers = [f"{name} ({type(m).__name__})" for name, m in int_model.named_modules()
              if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantize)]
    raise RuntimeError(
        f"qat.export: the converted model still calls qat's own operators "
        f"({', '.join(ops)}), which a runtime without qat does not have, so {path!r} was not "
        f"written; QAT layers left as they were: {', '.join(layers[:8]) or 'none'}"
        f"{' ...' if len(layers) > 8 else ''}. Skip such layers in the Config (they then "
        f"stay plain float layers)")


def _export(model: nn.Module, path: str, example_inputs, mobile: bool) -> nn.Module:
    inputs = _as_tuple(example_inputs)
    int_model, expected = _integer_model(model, inputs)
    scripted = _script(int_model, inputs, _took_eager_fallback(model))
    frozen = torch.jit.freeze(scripted.eval())
    extra = {METADATA_FILE: _metadata(int_model, inputs)}
    saved = optimize_for_mobile(frozen) if mobile else frozen
    _refuse_qat_ops(saved, int_model, path)

    def write(temporary: str) -> None:
        if mobile:
            saved._save_for_lite_interpreter(temporary, _extra_files=extra)
        else:
            torch.jit.save(saved, temporary, _extra_files=extra)
        # Pickles, code and metadata deflated (a tenth of a small int8 file); the check
        # below loads the file as it is written.
        _C._compact_archive(temporary)

    def check(temporary: str) -> None:
        if mobile:
            from torch.jit.mobile import _load_for_lite_interpreter

            loaded = _load_for_lite_interpreter(temporary)
        else:
            loaded = torch.jit.load(temporary)
        with torch.no_grad():
            got = loaded(*inputs)
            written = saved(*inputs)
        # The file must compute exactly what was saved; freezing and the mobile passes may
        # reorder float arithmetic (folding a float conv + batch norm, XNNPACK linears), so
        # against the in-memory model a few one-step flips downstream are allowed, no more.
        _check_outputs(written, got, path, "the module it was written from", min_sqnr_db=None)
        _check_outputs(expected, got, path, "the in-memory model", min_sqnr_db=40.0)

    _write_checked(path, write, check)
    return int_model


def _export_qdq(model: nn.Module, path: str, example_inputs, kind: str) -> nn.Module:
    """A ``.pte`` or ``.onnx``: the integer model re-expressed as quantize / dequantize pairs
    around float ops, which the runtime's own optimizer runs on its integer kernels."""
    if _took_eager_fallback(model):
        raise TypeError(f"qat.export: a .{kind} file is emitted from the graph of a traced "
                        f"model; this one took qat.prepare's eager fallback (torch.fx could "
                        f"not trace it): export it to .ptl or .pt, which script the model")
    inputs = _as_tuple(example_inputs)
    int_model, expected = _integer_model(model, inputs)
    emitter = _pte if kind == "pte" else _onnx
    metadata = json.loads(_metadata(int_model, inputs))
    if kind == "onnx":
        program = _onnx_with_free_batch(int_model, inputs, metadata, path)
    else:
        program, _ = _pte.emit(int_model, inputs, metadata)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as f:
            f.write(program)

    _write_checked(path, write,
                   lambda temporary: _check_qdq_file(emitter, temporary, inputs, expected, path))
    return int_model


def _took_eager_fallback(model: nn.Module) -> bool:
    """Whether ``model`` is a QAT model prepared without a graph, or its conversion."""
    model = uncompiled(model)
    return not isinstance(model, fx.GraphModule) and any(
        isinstance(m, (FakeQuantize, quantized._WeightOnly, quantized.FakeQuantizeOutput))
        for m in model.modules())


def _check_qdq_file(emitter, file: str, inputs: tuple, expected, path: str) -> None:
    """The ``.pte`` / ``.onnx`` at ``file``, run by its runtime in a fresh process on
    ``inputs``, gives ``expected`` (the integer model's outputs). XNNPACK and ONNX Runtime
    round their int8 requantization their own way (fp32 multipliers), so a one-step flip may
    pass from layer to layer: an SQNR floor, not equality."""
    got = emitter.run_fresh(file, inputs)
    runtime = "ONNX Runtime's" if emitter is _onnx else "XNNPACK's (ExecuTorch)"
    _check_outputs(expected, got[0] if len(got) == 1 else got, path, "the in-memory model",
                   min_sqnr_db=30.0, why=(
                       f"often {runtime} integer kernels, which round their requantization "
                       f"their own way, and a deep model that carries such one-step "
                       f"differences from layer to layer (a normalization right after a "
                       f"quantized op amplifies them); otherwise an op this format computes "
                       f"otherwise than PyTorch's kernel. A .pt file runs PyTorch's kernels, "
                       f"the integer model bit for bit"))


def _onnx_with_free_batch(int_model: nn.Module, inputs: tuple, metadata: dict,
                          path: str) -> bytes:
    """The ``.onnx`` program whose batch dimension is free where a file can leave it so:
    for each place the batch may lie (``_onnx.batch_layouts``: dim 0, or dim 1 of inputs of
    rank 3 and more, that first where the model holds a sequence-first layer), the file is
    run in a fresh process on the example with one batch entry more there and must give
    the integer model's outputs on it; the first layout that does is kept. Where none does
    (a reshape to a fixed size, the file's reshapes baking the batch), the inputs keep the
    example's shapes, with a warning: a dimension the file declares free is one it was run
    with."""
    sequence_first = any(getattr(m, "batch_first", True) is False for m in int_model.modules())
    layouts = _onnx.batch_layouts(inputs, sequence_first)
    for layout in layouts:
        more = _onnx.grown(inputs, layout)
        try:
            with torch.no_grad():
                more_expected = int_model(*more)
        except Exception:  # noqa: BLE001 - the model itself takes no other batch there
            continue
        program, _ = _onnx.emit(int_model, inputs, metadata, layout, more_expected)
        with tempfile.TemporaryDirectory() as folder:
            trial = os.path.join(folder, "trial.onnx")
            with open(trial, "wb") as f:
                f.write(program)
            try:
                _check_qdq_file(_onnx, trial, more, more_expected, path)
            except RuntimeError:
                continue
        return program
    if layouts:
        warnings.warn(
            f"qat.export: {path!r}: no input dimension can be left free as the batch (the "
            f"file, run with one more batch entry along dim 0, or along dim 1 of inputs of "
            f"rank 3 and more, failed or gave other outputs than the integer model); the "
            f"file's inputs keep the example's shapes", stacklevel=3)
    program, _ = _onnx.emit(int_model, inputs, metadata)
    return program


def _check_outputs(expected, got, path: str, what: str, min_sqnr_db, why: str = "") -> None:
    """``got`` equals ``expected`` (``min_sqnr_db`` None) or is within that SQNR of it;
    ``why`` says, in the error, what makes a file fall below that floor."""
    if isinstance(expected, torch.Tensor):
        expected, got = [expected], [got]
    for a, b in zip(expected, got):
        a = a.dequantize() if a.is_quantized else a
        b = b.dequantize() if b.is_quantized else b
        if a.shape != b.shape:
            raise RuntimeError(f"qat.export: the file written to {path!r} gives outputs of "
                               f"shape {tuple(b.shape)}, {what} {tuple(a.shape)}")
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):
            # NaN equals nothing, not even NaN: never a match.
            raise RuntimeError(f"qat.export: the file written to {path!r} gives outputs "
                               f"that are not finite (NaN or inf)")
        if torch.equal(a, b):
            continue
        noise = (a - b).double().pow(2).sum()
        sqnr = 10 * torch.log10(a.double().pow(2).sum() / noise).item()
        if min_sqnr_db is None or not sqnr >= min_sqnr_db:
            floor = "" if min_sqnr_db is None else f", below the {min_sqnr_db:g} dB floor"
            raise RuntimeError(
                f"qat.export: the file written to {path!r} computes other outputs than "
                f"{what} (max difference {(a - b).abs().max().item():.3g}, "
                f"SQNR {sqnr:.1f} dB{floor}), so it was not kept" + (f": {why}" if why else ""))


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """The metadata :func:`export` put in the file at ``path`` (a ``.ptl``, ``.pt``, ``.pte``
    or ``.onnx``).

    Raises:
        ValueError: when the file is not a TorchScript archive, ExecuTorch program or ONNX
            model written by qat.export, or its metadata is not valid JSON or lacks a field
            (naming the file and the field).
        RuntimeError: the file is an ExecuTorch program and ExecuTorch is not installed.
    """
    if _is_pte(path):
        require_executorch("qat.read_metadata")
        text = _pte.read_metadata_text(os.fspath(path))
        if text is None:
            raise ValueError(f"qat: {os.fspath(path)!r} has no qat_metadata method: it was "
                             f"not written by qat.export")
        return _parse_metadata(os.fspath(path), text, "qat_metadata")
    if _is_onnx(path):
        require_onnx("qat.read_metadata")
        text = _onnx.read_metadata_text(os.fspath(path))
        if text is None:
            raise ValueError(f"qat: {os.fspath(path)!r} has no {_onnx.METADATA_KEY} entry in "
                             f"its metadata_props: it was not written by qat.export")
        return _parse_metadata(os.fspath(path), text, _onnx.METADATA_KEY)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_FILE)]
            if not names:
                raise ValueError(f"qat: {os.fspath(path)!r} holds no {METADATA_FILE}: it was "
                                 f"not written by qat.export")
            text = archive.read(names[0])
    except zipfile.BadZipFile as error:
        raise ValueError(f"qat: {os.fspath(path)!r} is not a TorchScript archive, an "
                         f"ExecuTorch program or an ONNX model") from error
    return _parse_metadata(os.fspath(path), text, METADATA_FILE)


def _parse_metadata(path: str, text, where: str) -> Dict[str, object]:
    try:
        meta = json.loads(text)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"qat: the {where} of {path!r} is not valid JSON ({error})") from None
    _check_metadata(path, meta)
    return meta


# The fields read_metadata guarantees, with their JSON types; per layer and per spec too.
_METADATA_FIELDS = {"qat_version": str, "torch_version": str, "quantized_engine": str,
                    "config": dict, "layers": list}
_LAYER_FIELDS = {"name": str, "type": str, "scale": (int, float), "zero_point": int}
_SPEC_FIELDS = {"bits": int, "symmetric": bool, "per_channel": bool}


def _check_fields(path: str, where: str, value, fields) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"qat: the metadata of {path!r} is damaged: {where or 'the top level'} "
                         f"is a {type(value).__name__}, not an object")
    for key, kind in fields.items():
        name = f"{where}.{key}" if where else key
        if key not in value:
            raise ValueError(f"qat: the metadata of {path!r} lacks the field {name!r}")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise ValueError(f"qat: the metadata of {path!r} is damaged: {name!r} is "
                             f"{value[key]!r}")


def _check_metadata(path: str, meta) -> None:
    _check_fields(path, "", meta, _METADATA_FIELDS)
    for role in ("weight", "activation"):
        if meta["config"].get(role) is not None:
            _check_fields(path, f"config.{role}", meta["config"][role], _SPEC_FIELDS)
    overrides = meta["config"].get("overrides") or {}
    _check_fields(path, "config.overrides", overrides, {})
    for key, pair in overrides.items():
        _check_fields(path, f"config.overrides[{key!r}]", pair, {})
        for role, spec in pair.items():
            if spec is not None:
                _check_fields(path, f"config.overrides[{key!r}].{role}", spec, _SPEC_FIELDS)
    for i, layer in enumerate(meta["layers"]):
        _check_fields(path, f"layers[{i}]", layer, _LAYER_FIELDS)


def _cause(error: Exception) -> str:
    """The line of a TorchScript error that says what went wrong: full TorchScript puts it
    last, after a traceback of the scripted code (``RuntimeError: ...``); the lite
    interpreter first, before debug handles."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [match.group(1) for match in map(re.compile(r"^\w+Error: (.+)").match, lines)
              if match]
    return causes[-1] if causes else lines[0] if lines else type(error).__name__


def _load_pte(path: str) -> Tuple[Callable, str]:
    require_executorch(path)
    program = _pte.load(path)
    # Read once: bench times this callable.
    signature = _pte.input_signature(program)

    def forward(*inputs):
        _pte.check_inputs(path, signature, inputs)
        try:
            return program.forward(list(inputs))[0]
        except RuntimeError as error:
            raise RuntimeError(f"ExecuTorch: {error}") from None

    return forward, "ExecuTorch"


def _load_onnx(path: str) -> Tuple[Callable, str]:
    require_onnx(path)
    session = _onnx.load(path)
    names = [i.name for i in session.get_inputs()]

    def forward(*inputs):
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(names, inputs)}
        try:
            return torch.from_numpy(session.run(None, feeds)[0])
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's own exception types
            raise RuntimeError(f"ONNX Runtime: {error}") from None

    return forward, "ONNX Runtime"


def load(path: Union[str, os.PathLike]) -> Tuple[Callable, str]:
    """(callable model, the runtime it runs in) of a file :func:`export` wrote: a ``.pte``
    in ExecuTorch's runtime, an ``.onnx`` in ONNX Runtime (CPU), a ``.ptl`` in the lite
    interpreter, a ``.pt`` with ``torch.jit.load``. The kind is told by content: an
    ExecuTorch program by its flatbuffer identifier, an ONNX model by its first protobuf
    field, and of the TorchScript archives only a lite interpreter file holds
    ``bytecode.pkl``. For TorchScript files the quantized engine is set to the one the file
    was converted for (else qnnpack, PyTorch Mobile's): weights are packed for the engine
    selected when they load. A ``.pte``'s callable refuses, with a ValueError naming what the
    program takes, inputs of another shape, dtype or count than the example input's.

    Raises:
        ValueError: ``path`` is not such a file (naming it).
        RuntimeError: the runtime the file needs is not available here.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    if _is_pte(path):
        return _load_pte(path)
    if _is_onnx(path):
        return _load_onnx(path)
    try:
        with zipfile.ZipFile(path) as archive:
            lite = any(name.split("/")[-1] == "bytecode.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a TorchScript file (not a zip archive)") from None
    try:
        engine = read_metadata(path).get("quantized_engine", "qnnpack")
    except ValueError:
        engine = "qnnpack"  # a file written otherwise
    if engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine
    (require_lite_interpreter if lite else require_torchscript)(path)
    try:
        with torch_deprecations_once():
            if lite:
                from torch.jit.mobile import _load_for_lite_interpreter

                return _load_for_lite_interpreter(path), "lite interpreter"
            return torch.jit.load(path, map_location="cpu").eval(), "TorchScript"
    except RuntimeError as error:
        raise ValueError(f"{path}: not a TorchScript file ({_cause(error)})") from None


def _format_table(rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def describe(path: Union[str, os.PathLike]) -> str:
    """A text report of an exported file: size, versions, config and layers."""
    meta = read_metadata(path)
    config = meta.get("config") or {}
    lines = [
        f"{os.fspath(path)}: {os.path.getsize(path):,} bytes",
        f"qat {meta.get('qat_version')}, torch {meta.get('torch_version')}, engine "
        f"{meta.get('quantized_engine')}",
    ]
    for role in ("weight", "activation"):
        spec = config.get(role)
        if spec:
            lines.append(f"{role}: {spec['bits']} bits, "
                         f"{'symmetric' if spec['symmetric'] else 'affine'}, "
                         f"{'per channel' if spec['per_channel'] else 'per tensor'}")
    for key, pair in (config.get("overrides") or {}).items():
        parts = [f"{role} {spec['bits']} bits" for role, spec in pair.items() if spec]
        lines.append(f"override {key}: {', '.join(parts) or 'defaults'}")
    rows = [("layer", "type", "weight bits", "weight scales", "out scale", "out zero point")]
    for layer in meta.get("layers", []):
        scales = (f"{layer['weight_scale_min']:.3g}..{layer['weight_scale_max']:.3g}"
                  if "weight_scale_min" in layer else "")
        rows.append((layer["name"], layer["type"], layer.get("weight_bits", ""), scales,
                     f"{layer['scale']:.4g}", layer["zero_point"]))
    lines.append(_format_table(rows))
    onnx = meta.get("onnx")
    if onnx:
        floats = ", ".join(onnx["float_ops"]) or "none"
        lines.append(f"ONNX Runtime runs {onnx['layers_integer']} of {onnx['layers']} convs / "
                     f"linears on integer kernels (opset {onnx['opset']}); float ops: {floats}")
        if onnx.get("sub_8bit_weights_as_int8"):
            lines.append("sub-8-bit weights stored as int8 (4-bit types need opset 21): "
                         + ", ".join(onnx["sub_8bit_weights_as_int8"]))
    delegation = meta.get("executorch")
    if delegation:
        outside = ", ".join(delegation["not_delegated"]) or "none"
        lines.append(f"XNNPACK runs {delegation['layers_delegated']} of "
                     f"{delegation['layers']} convs / linears; ops outside it: {outside}")
        if delegation.get("sub_8bit_weights_as_int8"):
            lines.append("sub-8-bit weights stored as int8 (XNNPACK's 4-bit kernels are for "
                         "linears): " + ", ".join(delegation["sub_8bit_weights_as_int8"]))
        if delegation.get("weights_as_float"):
            lines.append("weights stored in float (no integer embedding or recurrent kernel "
                         "in ExecuTorch's default runtime): "
                         + ", ".join(delegation["weights_as_float"]))
    return "\n".join(lines)
