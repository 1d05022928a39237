"""``qat.export``: an integer model as a frozen TorchScript file for PyTorch Mobile (``.ptl``,
the lite interpreter) or full TorchScript (``.pt``), with qat's metadata inside, checked
against the in-memory model after it is written; and ``read_metadata`` to get it back."""

import json
import os
import uuid
import warnings
import zipfile
from typing import Dict, Sequence, Union

import torch
from torch import nn

from . import _C, quantized
from ._torch_support import (require_lite_interpreter, require_torchscript,
                             torch_deprecations_once, warn_once, xnnpack_available)
from .convert import convert
from .fake_quant import FakeQuantize

__all__ = ["METADATA_FILE", "describe", "export", "read_metadata"]

# The extra file of the archive that holds qat's metadata (JSON).
METADATA_FILE = "qat/metadata.json"


def _check_writable(path: str) -> None:
    """Fails before any work when ``path`` cannot be written."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"qat.export: path must be a file path, got {type(path).__name__}")
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
           if isinstance(m, (quantized.Quantize, quantized._WithOutputQParams))]
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


def _script(model: nn.Module, inputs: tuple):
    try:
        with warnings.catch_warnings():
            # torch.fx's GraphModule.__init__ annotates an attribute in a way torch.jit
            # warns about; the attribute is not part of the scripted model.
            warnings.filterwarnings("ignore", message="The TorchScript type system")
            return torch.jit.script(model)
    except Exception as error:  # noqa: BLE001 - any scripting failure tries tracing
        message = str(error).strip()
    warnings.warn(
        f"qat.export: torch.jit.script failed, so the model was traced with example_inputs "
        f"instead (control flow is fixed to what they took): {message.splitlines()[0]}",
        stacklevel=3)
    try:
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
           mobile: bool = True) -> nn.Module:
    """Writes ``model`` as a frozen TorchScript file and returns the converted integer
    model it holds.

    A QAT model (holding :class:`qat.FakeQuantize` modules) is converted first with
    :func:`qat.convert`; an integer model is taken as it is. The model is scripted
    (traced with ``example_inputs`` only when scripting fails, with a warning), frozen,
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

    Raises:
        FileNotFoundError, PermissionError, ValueError: ``path`` cannot be written (before
            any work is done).
        ValueError: a QAT model that was never calibrated or trained (from
            :func:`qat.convert`).
        RuntimeError: the model can be neither scripted nor traced, or the written file
            does not reproduce the model's outputs; this PyTorch has no TorchScript, or
            (with ``mobile``) no lite interpreter.
    """
    _check_writable(path)
    if mobile:
        require_lite_interpreter("qat.export")
    else:
        require_torchscript("qat.export")
    with torch_deprecations_once():
        return _export(model, os.fspath(path), example_inputs, mobile)


def _run_example(int_model: nn.Module, inputs: tuple):
    """The integer model's outputs on ``inputs``, which must fit it and give finite
    values (a NaN output cannot be checked against the file)."""
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
        raise ValueError(f"qat.export: the example input ({shapes}) does not fit the model: "
                         f"{cause}") from error
    for out in (expected,) if isinstance(expected, torch.Tensor) else tuple(expected):
        values = out.dequantize() if out.is_quantized else out
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            raise RuntimeError("qat.export: the integer model's outputs on example_inputs are "
                               "not finite (NaN or inf); the file cannot be checked")
    return expected


def _export(model: nn.Module, path: str, example_inputs, mobile: bool) -> nn.Module:
    inputs = _as_tuple(example_inputs)
    int_model = convert(model) if any(isinstance(m, FakeQuantize) for m in model.modules()) \
        else model
    int_model.eval()
    expected = _run_example(int_model, inputs)
    # The file gets the stored weights, not the kernels' packed form (rebuilt on the first
    # forward after loading).
    for module in int_model.modules():
        if isinstance(module, quantized._IntegerLayer):
            module._packed_params = None
    scripted = _script(int_model, inputs)
    frozen = torch.jit.freeze(scripted.eval())
    extra = {METADATA_FILE: _metadata(int_model, inputs)}
    saved = optimize_for_mobile(frozen) if mobile else frozen
    # Written next to the target and renamed over it only once checked: a failure leaves
    # the previous file as it was, and a reader never sees half a file.
    folder, name = os.path.split(os.path.abspath(path))
    # Created by the save below as any new file is (mkstemp would make it 0600).
    temporary = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        if mobile:
            from torch.jit.mobile import _load_for_lite_interpreter

            saved._save_for_lite_interpreter(temporary, _extra_files=extra)
            loaded = _load_for_lite_interpreter(temporary)
        else:
            torch.jit.save(saved, temporary, _extra_files=extra)
            loaded = torch.jit.load(temporary)
        with torch.no_grad():
            got = loaded(*inputs)
            written = saved(*inputs)
        # The file must compute exactly what was saved; freezing and the mobile passes may
        # reorder float arithmetic (folding a float conv + batch norm, XNNPACK linears), so
        # against the in-memory model a few one-step flips downstream are allowed, no more.
        _check_outputs(written, got, path, "the module it was written from", min_sqnr_db=None)
        _check_outputs(expected, got, path, "the in-memory model", min_sqnr_db=40.0)
        if os.path.exists(path):
            # The file it replaces keeps the permissions the user gave it.
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return int_model


def _check_outputs(expected, got, path: str, what: str, min_sqnr_db) -> None:
    """``got`` equals ``expected`` (``min_sqnr_db`` None) or is within that SQNR of it."""
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
            raise RuntimeError(
                f"qat.export: the file written to {path!r} computes other outputs than "
                f"{what} (max difference {(a - b).abs().max().item():.3g}, "
                f"SQNR {sqnr:.1f} dB)")


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """The metadata :func:`export` put in the file at ``path`` (a ``.ptl`` or ``.pt``).

    Raises:
        ValueError: when the file is not a TorchScript archive written by qat.export, or
            its metadata is not valid JSON or lacks a field (naming the file and the field).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_FILE)]
            if not names:
                raise ValueError(f"qat: {os.fspath(path)!r} holds no {METADATA_FILE}: it was "
                                 f"not written by qat.export")
            text = archive.read(names[0])
    except zipfile.BadZipFile as error:
        raise ValueError(f"qat: {os.fspath(path)!r} is not a TorchScript archive") from error
    try:
        meta = json.loads(text)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"qat: the {METADATA_FILE} of {os.fspath(path)!r} is not valid JSON "
                         f"({error})") from None
    _check_metadata(os.fspath(path), meta)
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
    return "\n".join(lines)
