#pragma once

// The lowered form of an integer model: one backend-neutral description per integer op
// (what it computes, its integer weights, its qparams, how the weights are packed), produced
// by both front ends' converts and read by every emitter (PyTorch's quantized kernels for
// .pt / .ptl today; QDQ graphs next) and by the one metadata writer. docs/lowering.md says
// where each field comes from.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace qat {

struct LoweredOp {
  /// The prepared model's path of the module it lowers ("features.0", "input_fake_quant").
  std::string name;
  /// "Quantize", "Requantize", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
  /// "ConvTranspose2d", "Linear", "LinearDynamic", "Add", "Mul", "Cat", "Hardswish",
  /// "ELU", "LeakyReLU", "BatchNorm", "LayerNorm", "GroupNorm", "Embedding" or
  /// "EmbeddingBag".
  std::string kind;
  /// The output's qparams (those of the FakeQuantize after the op); 1 and 0 for
  /// LinearDynamic, Embedding and EmbeddingBag, whose outputs are float.
  double scale = 1.0;
  int64_t zero_point = 0;
  /// The kernel applies a ReLU before writing its output.
  bool relu = false;
  /// Convs / Linear / LinearDynamic: the integer weight (an int8 quantized tensor, per tensor
  /// or per channel along axis 0, axis 1 for transposed convs, from qat::integer_weight), the
  /// float bias the kernels round to the int32 grid, and the trained bit width and integer
  /// low end that packing needs.
  at::Tensor weight;
  at::Tensor bias;
  int64_t weight_bits = 8;
  int64_t weight_quant_min = -128;
  /// Conv geometry (output_padding: transposed convs').
  std::vector<int64_t> stride;
  std::vector<int64_t> padding;
  std::vector<int64_t> dilation;
  int64_t groups = 1;
  std::vector<int64_t> output_padding;
};

/// The JSON that qat writes into every .pt / .ptl as `qat/metadata.json`, from either front
/// end: versions, the quantized engine, the config (`config_json`, a JSON object as
/// Config.to_dict gives it), per op its kind, output qparams and weight facts, and the shape
/// and dtype of each example input (what `python -m qat bench` builds inputs from).
/// @throws std::invalid_argument when an example input's dtype has no Python name here.
std::string metadata_json(
    const std::vector<LoweredOp>& ops, const std::string& config_json, const std::string& engine,
    const std::string& torch_version, const std::vector<at::Tensor>& example_inputs);

}  // namespace qat
