// The one metadata writer: the JSON of qat/metadata.json for the files of both front ends
// (read by qat.export.read_metadata and `python -m qat inspect`).

#include "integer_model.h"

#include <qat/fake_quantize.h>
#include <qat/lowered.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <stdexcept>

namespace qat {
namespace {

std::string json(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json(double value) {
  return fmt::format("{}", value);
}

std::string json(bool value) {
  return value ? "true" : "false";
}

// A spec as Python's dataclasses.asdict(QuantSpec) gives it.
std::string json(const QuantSpec& spec) {
  const auto is_signed = spec.signed_range();
  return fmt::format(
      "{{\"bits\": {}, \"symmetric\": {}, \"signed\": {}, \"per_channel\": {}, \"axis\": {}, "
      "\"narrow_range\": {}, \"observer\": {}, \"estimator\": {}, \"averaging_constant\": {}, "
      "\"percentile\": {}, \"bins\": {}}}",
      spec.bits(), json(spec.symmetric()), is_signed ? json(*is_signed) : "null",
      json(spec.per_channel()), spec.axis(), json(spec.narrow_range()), json(spec.observer()),
      json(spec.estimator()), json(spec.averaging_constant()), json(spec.percentile()),
      spec.bins());
}

std::string op_json(const LoweredOp& op) {
  std::string weight;
  if (op.weight.defined()) {
    const auto scales = op.weight.qscheme() == at::kPerChannelAffine
                            ? op.weight.q_per_channel_scales()
                            : at::full({1}, op.weight.q_scale(), at::kDouble);
    weight = fmt::format(
        ", \"weight_bits\": {}, \"weight_shape\": [{}], \"weight_scale_min\": {}, "
        "\"weight_scale_max\": {}, \"relu\": {}",
        op.weight_bits, fmt::join(op.weight.sizes(), ", "), json(scales.min().item<double>()),
        json(scales.max().item<double>()), json(op.relu));
  }
  return fmt::format(
      "{{\"name\": {}, \"type\": {}{}, \"scale\": {}, \"zero_point\": {}}}", json(op.name),
      json(op.kind), weight, json(op.scale), op.zero_point);
}

// Python's names of the dtypes (str(torch.float32)); c10 spells them "Float", "Long"...
std::string python_dtype(c10::ScalarType type) {
  static const std::map<c10::ScalarType, const char*> names = {
      {c10::kFloat, "torch.float32"}, {c10::kDouble, "torch.float64"},
      {c10::kHalf, "torch.float16"},  {c10::kBFloat16, "torch.bfloat16"},
      {c10::kByte, "torch.uint8"},    {c10::kChar, "torch.int8"},
      {c10::kShort, "torch.int16"},   {c10::kInt, "torch.int32"},
      {c10::kLong, "torch.int64"},    {c10::kBool, "torch.bool"}};
  const auto found = names.find(type);
  if (found == names.end()) {
    throw std::invalid_argument(fmt::format(
        "qat: an example input has dtype {}, which the metadata cannot name (give float, "
        "integer or bool inputs)",
        c10::toString(type)));
  }
  return found->second;
}

}  // namespace

std::string metadata_json(
    const std::vector<LoweredOp>& ops, const std::string& config_json, const std::string& engine,
    const std::string& torch_version, const std::vector<at::Tensor>& example_inputs) {
  std::vector<std::string> entries;
  for (const auto& op : ops) {
    entries.push_back(op_json(op));
  }
  std::vector<std::string> inputs;
  for (const auto& input : example_inputs) {
    inputs.push_back(fmt::format(
        "{{\"shape\": [{}], \"dtype\": {}}}", fmt::join(input.sizes(), ", "),
        json(python_dtype(input.scalar_type()))));
  }
  return fmt::format(
      "{{\n \"qat_version\": {},\n \"torch_version\": {},\n \"quantized_engine\": {},\n "
      "\"config\": {},\n \"layers\": [\n  {}\n ],\n \"example_inputs\": [{}]\n}}\n",
      json(std::string(version())), json(torch_version), json(engine), config_json,
      fmt::join(entries, ",\n  "), fmt::join(inputs, ", "));
}

namespace detail {

// A C++ model does not keep the Config it was prepared with, so it is read back from the
// modules: the first layer's specs are the defaults, and a layer quantized otherwise is an
// override under its name.
std::string config_json(const std::vector<LayerInfo>& layers, const std::string& backend) {
  c10::optional<QuantSpec> weight;
  c10::optional<QuantSpec> activation;
  for (const auto& layer : layers) {
    if (!weight && layer.weight_spec) {
      weight = layer.weight_spec;
    }
    if (!activation) {
      activation = layer.activation_spec;
    }
  }
  std::vector<std::string> overrides;
  for (const auto& layer : layers) {
    const bool other_weight = layer.weight_spec && *layer.weight_spec != *weight;
    const bool other_activation = layer.activation_spec && *layer.activation_spec != *activation;
    if (other_weight || other_activation) {
      overrides.push_back(fmt::format(
          "{}: {{\"weight\": {}, \"activation\": {}}}", json(layer.op.name),
          other_weight ? json(*layer.weight_spec) : "null",
          other_activation ? json(*layer.activation_spec) : "null"));
    }
  }
  return fmt::format(
      "{{\"weight\": {}, \"activation\": {}, \"overrides\": {{{}}}, \"skip\": [], \"backend\": "
      "{}, \"dynamic\": false}}",
      weight ? json(*weight) : "null", activation ? json(*activation) : "null",
      fmt::join(overrides, ", "), json(backend));
}

}  // namespace detail
}  // namespace qat
