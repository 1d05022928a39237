#pragma once

// What each op does to quantization, in one table that prepare and convert read in both front
// ends: the C++ ones directly, Python's through qat._C._op_roles. A front end only maps its
// own spellings of an op (nn.ReLU, F.relu, "relu_"; torch::nn::ReLUImpl) to the op's name
// here; what the op does is decided once.
//
// A new role or op is added here (and its spellings in python/qat/_op_roles.py and, for a
// C++ module type, op_name in csrc/nn/op_roles.cpp); a new backend adds the column of what
// it runs on integers (as `integer_kernel` is PyTorch's quantized kernels').

#include <torch/nn/module.h>

#include <string>
#include <vector>

namespace qat {

enum class OpRole {
  /// A QAT layer (conv, linear): its integer kernel computes with the weight's integers,
  /// its output gets a FakeQuantize, and it fuses a ReLU after it (or a ReLU6, quantized
  /// with the fixed qparams of [0, 6]).
  kLayer,
  /// Its integer kernel keeps its input's qparams: a fake-quantized input stays
  /// fake-quantized through it, and it gets no FakeQuantize of its own.
  kPassesQParams,
  /// Its output is quantized again: a FakeQuantize of its own after it.
  kRequantizes,
  /// Its output range [lo, hi) is known: a FakeQuantize with the fixed qparams of that range.
  kFixedRange,
  /// Moves a quantized tensor's integers (transpose, indexing): convert runs it on the
  /// quantized tensor; prepare treats it as any op it does not know (its input's
  /// quantization ends there).
  kMovesData,
};

struct OpRoleInfo {
  /// The op's name, as PyTorch's functional spelling has it ("max_pool2d").
  std::string name;
  OpRole role;
  /// Whether PyTorch's quantized kernels (the .pt/.ptl backend) run it on quantized
  /// tensors; otherwise the integer model runs it in float, between a dequantize and the
  /// quantize of the FakeQuantize after it.
  bool integer_kernel;
  /// kFixedRange: the output range.
  double lo = 0.0;
  double hi = 0.0;
};

/// The table, in a fixed order.
const std::vector<OpRoleInfo>& op_roles();

/// The entry named `name`, or nullptr for an op the table does not hold (prepare ends the
/// quantization of its input; convert runs it in float).
const OpRoleInfo* find_op_role(const std::string& name);

/// "layer", "passes_qparams", "requantizes", "fixed_range", "moves_data".
const char* role_name(OpRole role);

/// The table's name of a float torch::nn module ("relu" for torch::nn::ReLUImpl), or "" for
/// a type the table does not hold.
std::string op_name(const torch::nn::Module& module);

/// The role of a float torch::nn module, or nullptr (see find_op_role).
const OpRoleInfo* find_op_role(const torch::nn::Module& module);

}  // namespace qat
