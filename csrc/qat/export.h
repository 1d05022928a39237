#pragma once

// From a prepared, trained or calibrated model to the integer model that ships: qat::convert
// builds it as TorchScript on PyTorch's native quantized operators, qat::export_model writes
// it as the same kind of file as Python's qat.export (a frozen TorchScript archive with
// qat/metadata.json inside, which `python -m qat inspect FILE` prints).
//
// @code
//   qat::prepare(*net, qat::presets::int8());
//   // ... train / calibrate ...
//   qat::export_model(*net, example_batch, "model.ptl");           // lite interpreter
//   qat::export_model(*net, example_batch, "model.pt", {"qnnpack", false});  // TorchScript
// @endcode

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>

#include <string>

namespace qat {

/// Options of convert / export_model.
struct ExportOptions {
  /// Quantized engine the integer model is built for: "qnnpack" (PyTorch Mobile's) or
  /// "fbgemm", where this LibTorch has it.
  std::string backend = "qnnpack";
  /// Write a lite-interpreter `.ptl` optimized for mobile (true) or full TorchScript `.pt`.
  bool mobile = true;
};

/// The integer TorchScript module (in eval mode, ready for torch::jit::freeze) of a
/// prepared, trained or calibrated module, the C++ twin of qat.convert.
///
/// `prepared` must be a torch::nn::Sequential that qat::prepare rewrote (nested Sequentials
/// are followed). Its qat::Conv1d / 2d / 3d, ConvBn1d / 2d / 3d, ConvTranspose1d / 2d and
/// Linear layers (with their fused ReLU, or a ReLU6 quantized after it with the fixed qparams
/// of [0, 6]) become `quantized::conv2d(_relu)`, `quantized::conv_transpose2d`,
/// `quantized::linear(_relu)` and their 1-D (and 3-D conv) kernels, with the very integers
/// their weight FakeQuantize produces (qat::integer_weight; per channel where
/// the spec says so; a ConvBn's folded weight, with bias qat::fold_bias) and the qparams of
/// the FakeQuantize after them; a qat::Embedding becomes `quantized::embedding_byte` and a
/// qat::EmbeddingBag (mode sum or mean, no padding index) `quantized::embedding_bag_byte`
/// (float rows out); on a quantized input a standalone BatchNorm1d / 2d / 3d, LayerNorm, GroupNorm,
/// ELU and LeakyReLU become `quantized::batch_norm1d / 2d / 3d`, `layer_norm`, `group_norm`,
/// `elu` and `leaky_relu` with the qparams of the FakeQuantize after them. The weights are
/// stored as Python's qat.convert stores them (4- and 2-bit weights packed by
/// qat::pack_weight) and built into the kernels' form on the first forward. ReLU,
/// MaxPool1d / 2d and Flatten run on the quantized tensors; float layers (Linear,
/// Conv1d / 2d / 3d, the norms and ELU / LeakyReLU on a float input, MaxPool3d,
/// AvgPool1d / 2d / 3d, AdaptiveAvgPool1d / 2d / 3d, a standalone ReLU6 or Hardtanh,
/// Sigmoid, Tanh) run between a dequantize and the quantize of the FakeQuantize after them;
/// Dropout and Identity vanish.
/// The module's forward takes and returns a float tensor. Like torch::nn::Linear, each
/// integer Linear checks that the input's last dimension is its in_features (an assert in
/// the scripted code, so the files written from it check it too: `quantized::linear` would
/// read past a narrower input).
///
/// Sets the process's quantized engine to `options.backend`, as qat.convert does: packed
/// weights belong to an engine, and a file loaded later is repacked for the current one.
///
/// @param prepared the model from qat::prepare, trained or calibrated; it is not modified.
/// @param example_input an input the integer model is run on once, to check that it runs.
/// @param options the backend (`mobile` is not used here).
/// @throws std::invalid_argument when the model was never calibrated or trained (its
///         qparams are still the initial ones); holds NaN or inf in a parameter or buffer
///         (weights, biases, batch norm weight / bias / running statistics, FakeQuantize
///         scale / zero point: "non-finite values in 0.weight (NaN)", each tensor named
///         with its path); holds a batch norm with a negative running_var or a non-finite
///         factor weight / sqrt(running_var + eps) (named with its path); holds a module
///         that has no conversion (named with its path and type); holds a conv (integer or
///         left in float) padded with a padding_mode other than zeros or with a padding
///         'same' that pads one side more than the other (an even kernel); has weights
///         outside 8 bits or activations other than the full 8-bit range ([0, 255] or
///         [-128, 127]); the
///         backend is not an engine of this LibTorch; `example_input` is undefined; or the
///         integer model fails on `example_input` ("the example input does not fit the
///         model: " and the first line of the error).
torch::jit::Module convert(
    torch::nn::Module& prepared, const torch::Tensor& example_input,
    const ExportOptions& options = {});

/// qat::convert, then freeze (and with `options.mobile` torch::jit::optimizeForMobile where
/// this LibTorch has XNNPACK; official builds from 2.13 on have none, and the frozen module is
/// then saved as it is, with a warning once per process), then write it: a lite-interpreter
/// file (`_save_for_mobile`) with `mobile`, else full TorchScript (`save`). The archive
/// carries `qat/metadata.json` (qat and torch versions, the engine, the config the layers
/// were prepared with, per layer its type, weight bits, weight scales and output qparams,
/// and the shape and dtype of `example_input`, which `python -m qat bench` builds inputs
/// from), as Python's qat.export writes it.
///
/// The file is written to a temporary file in the folder of `path`, loaded back from there
/// (torch::jit::_load_for_mobile or torch::jit::load) and checked, and only then renamed
/// over `path`: an export that fails leaves a file already at `path` as it was, and no
/// temporary file behind. The check: on `example_input`, the outputs of the in-memory
/// integer model, of the module written and of the file are finite, the file's equal bit for
/// bit those of the module it was written from, and the in-memory integer model's up to
/// what freezing and the mobile passes change in float ops (an SQNR of at least 40 dB).
///
/// @param prepared the model from qat::prepare, trained or calibrated; it is not modified.
/// @param example_input an input of the model (a batch of one or more).
/// @param path the file to write (`.ptl` for mobile, `.pt` otherwise, by convention).
/// @param options backend and file kind.
/// @throws std::invalid_argument when `path` cannot be written (before any work), when
///         `mobile` is asked of a LibTorch without the lite interpreter, when `example_input`
///         is undefined, empty or holds NaN or inf, when the integer
///         model fails on `example_input` ("the example input does not fit the model: " and
///         the first line of the error), and as qat::convert.
/// @throws std::runtime_error when the outputs on `example_input` are not finite (NaN or
///         inf), or the written file computes another output than the in-memory integer
///         model.
void export_model(
    torch::nn::Module& prepared, const torch::Tensor& example_input, const std::string& path,
    const ExportOptions& options = {});

namespace detail {

/// Rewrites the TorchScript archive (.pt / .ptl) at `path` in place with every record that is
/// not a tensor storage deflated (pickles, code, extra files) and without the code's source
/// ranges (`.debug_pkl`: error-message context of a full-JIT load); storages stay stored and
/// aligned. The file loads and runs as before, in any PyTorch (the readers inflate). Both
/// front ends' exports call it before checking the file.
/// @throws std::runtime_error when `path` is not a TorchScript archive.
void compact_archive(const std::string& path);

}  // namespace detail

}  // namespace qat
