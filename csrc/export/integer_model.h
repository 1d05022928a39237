#pragma once

// Internal to csrc/export: the integer model qat::convert builds, with what qat::export_model
// writes about it in the file's metadata.

#include <qat/config.h>
#include <qat/export.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace qat {
namespace detail {

/// One integer op of the model, as the metadata describes it (Python's export names the
/// same fields).
struct LayerInfo {
  std::string name;  // the prepared module's path ("0", "features.1", "input_fake_quant")
  std::string type;  // "Conv2d", "Linear", "Quantize" or "Requantize"
  // Weighted layers only.
  c10::optional<QuantSpec> weight_spec;
  std::vector<int64_t> weight_shape;
  double weight_scale_min = 0;
  double weight_scale_max = 0;
  bool relu = false;
  // The spec and qparams of the output (of the FakeQuantize that gives them).
  QuantSpec activation_spec;
  double scale = 1;
  int64_t zero_point = 0;
};

struct IntegerModel {
  torch::jit::Module module;
  std::vector<LayerInfo> layers;
};

/// The integer model of `prepared` for `backend` (which is made the quantized engine).
IntegerModel build_integer_model(torch::nn::Module& prepared, const std::string& backend);

/// `module`'s output on `input`, without gradients.
/// @throws std::invalid_argument "<caller>: the example input does not fit the model: <cause>"
///         when the module fails on it.
c10::IValue run_example(torch::jit::Module& module, const torch::Tensor& input, const char* caller);

/// The first line of what went wrong in `error`'s message, without the exception class
/// names that prefix it ("RuntimeError: "); for a failure inside the TorchScript
/// interpreter, the first line of the error after its traceback.
std::string error_cause(const std::exception& error);

}  // namespace detail
}  // namespace qat
