#pragma once

// Internal to csrc/export: the integer model qat::convert builds, with its lowered form (what
// qat::export_model writes about it in the file's metadata).

#include <qat/config.h>
#include <qat/export.h>
#include <qat/lowered.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace qat {
namespace detail {

/// One integer op of the model: its lowered form, with the specs it was trained with (the
/// metadata's config is read back from them).
struct LayerInfo {
  LoweredOp op;
  c10::optional<QuantSpec> weight_spec;  // weighted layers only
  // Of the FakeQuantize that gives the output qparams (none for an embedding's float rows).
  c10::optional<QuantSpec> activation_spec;
};

struct IntegerModel {
  torch::jit::Module module;
  std::vector<LayerInfo> layers;

  std::vector<LoweredOp> ops() const {
    std::vector<LoweredOp> ops;
    for (const auto& layer : layers) {
      ops.push_back(layer.op);
    }
    return ops;
  }
};

/// The metadata's config, as Python's Config.to_dict writes it, read back from the layers.
std::string config_json(const std::vector<LayerInfo>& layers, const std::string& backend);

/// The integer model of `prepared` for `backend` (which is made the quantized engine).
IntegerModel build_integer_model(torch::nn::Module& prepared, const std::string& backend);

/// `example_input` on the CPU, where the quantized kernels run.
/// @throws std::invalid_argument "<caller>: example_input is undefined ..." for a
///         default-constructed tensor.
torch::Tensor cpu_example(const torch::Tensor& example_input, const char* caller);

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
