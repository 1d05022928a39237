#include <qat/op_roles.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/pooling.h>

#include <typeindex>
#include <unordered_map>

namespace qat {

const std::vector<OpRoleInfo>& op_roles() {
  static const std::vector<OpRoleInfo> table{
      {"conv1d", OpRole::kLayer, true},
      {"conv2d", OpRole::kLayer, true},
      {"conv3d", OpRole::kLayer, true},
      {"linear", OpRole::kLayer, true},
      {"relu", OpRole::kPassesQParams, true},
      {"max_pool1d", OpRole::kPassesQParams, true},
      {"max_pool2d", OpRole::kPassesQParams, true},
      {"flatten", OpRole::kPassesQParams, true},
      {"reshape", OpRole::kPassesQParams, true},
      {"view", OpRole::kPassesQParams, true},
      {"contiguous", OpRole::kPassesQParams, true},
      // Identities in eval.
      {"dropout", OpRole::kPassesQParams, true},
      {"identity", OpRole::kPassesQParams, true},
      {"add", OpRole::kRequantizes, true},
      {"mul", OpRole::kRequantizes, true},
      {"cat", OpRole::kRequantizes, true},
      {"hardswish", OpRole::kRequantizes, true},
      // Their kernels compute on the dequantized input in float and round once, to the
      // output's grid, as the simulation does.
      {"elu", OpRole::kRequantizes, true},
      {"leaky_relu", OpRole::kRequantizes, true},
      // Standalone (a batch norm after a conv is folded into it): quantized::batch_norm*d
      // computes in float and rounds once, to the output's grid, as the simulation does.
      {"batch_norm", OpRole::kRequantizes, true},
      // Likewise: quantized::layer_norm / group_norm normalize in float and round once.
      {"layer_norm", OpRole::kRequantizes, true},
      {"group_norm", OpRole::kRequantizes, true},
      // Averages: the quantized kernels round to the input's grid, and the requantization
      // after would round a second time where the simulation rounds once.
      {"mean", OpRole::kRequantizes, false},
      {"avg_pool1d", OpRole::kRequantizes, false},
      {"avg_pool2d", OpRole::kRequantizes, false},
      {"avg_pool3d", OpRole::kRequantizes, false},
      {"adaptive_avg_pool1d", OpRole::kRequantizes, false},
      {"adaptive_avg_pool2d", OpRole::kRequantizes, false},
      {"adaptive_avg_pool3d", OpRole::kRequantizes, false},
      // A clamp not fused into a layer before it: its bound (6) is not on its input's grid,
      // so the clamped value is quantized again (qnnpack's quantized clamp also scrambles
      // channels-last tensors in torch 1.13, so it runs in float).
      {"relu6", OpRole::kRequantizes, false},
      {"hardtanh", OpRole::kRequantizes, false},
      {"sigmoid", OpRole::kFixedRange, true, 0.0, 1.0},
      {"hardsigmoid", OpRole::kFixedRange, true, 0.0, 1.0},
      {"tanh", OpRole::kFixedRange, true, -1.0, 1.0},
      {"transpose", OpRole::kMovesData, true},
      {"permute", OpRole::kMovesData, true},
      {"squeeze", OpRole::kMovesData, true},
      {"unsqueeze", OpRole::kMovesData, true},
      {"getitem", OpRole::kMovesData, true},
  };
  return table;
}

const OpRoleInfo* find_op_role(const std::string& name) {
  for (const auto& info : op_roles()) {
    if (info.name == name) {
      return &info;
    }
  }
  return nullptr;
}

const char* role_name(OpRole role) {
  switch (role) {
    case OpRole::kLayer:
      return "layer";
    case OpRole::kPassesQParams:
      return "passes_qparams";
    case OpRole::kRequantizes:
      return "requantizes";
    case OpRole::kFixedRange:
      return "fixed_range";
    case OpRole::kMovesData:
      return "moves_data";
  }
  return "";
}

std::string op_name(const torch::nn::Module& module) {
  // The C++ front end's spellings of the table's ops (exact types: a subclass's forward may
  // differ).
  static const std::unordered_map<std::type_index, std::string> names{
      {typeid(torch::nn::Conv1dImpl), "conv1d"},
      {typeid(torch::nn::Conv2dImpl), "conv2d"},
      {typeid(torch::nn::Conv3dImpl), "conv3d"},
      {typeid(torch::nn::LinearImpl), "linear"},
      {typeid(torch::nn::ReLUImpl), "relu"},
      {typeid(torch::nn::MaxPool1dImpl), "max_pool1d"},
      {typeid(torch::nn::MaxPool2dImpl), "max_pool2d"},
      {typeid(torch::nn::FlattenImpl), "flatten"},
      {typeid(torch::nn::DropoutImpl), "dropout"},
      {typeid(torch::nn::Dropout2dImpl), "dropout"},
      {typeid(torch::nn::IdentityImpl), "identity"},
      {typeid(torch::nn::AvgPool1dImpl), "avg_pool1d"},
      {typeid(torch::nn::AvgPool2dImpl), "avg_pool2d"},
      {typeid(torch::nn::AvgPool3dImpl), "avg_pool3d"},
      {typeid(torch::nn::AdaptiveAvgPool1dImpl), "adaptive_avg_pool1d"},
      {typeid(torch::nn::AdaptiveAvgPool2dImpl), "adaptive_avg_pool2d"},
      {typeid(torch::nn::AdaptiveAvgPool3dImpl), "adaptive_avg_pool3d"},
      {typeid(torch::nn::ReLU6Impl), "relu6"},
      {typeid(torch::nn::HardtanhImpl), "hardtanh"},
      {typeid(torch::nn::SigmoidImpl), "sigmoid"},
      {typeid(torch::nn::TanhImpl), "tanh"},
      {typeid(torch::nn::BatchNorm1dImpl), "batch_norm"},
      {typeid(torch::nn::BatchNorm2dImpl), "batch_norm"},
      {typeid(torch::nn::BatchNorm3dImpl), "batch_norm"},
      {typeid(torch::nn::LayerNormImpl), "layer_norm"},
      {typeid(torch::nn::GroupNormImpl), "group_norm"},
      {typeid(torch::nn::ELUImpl), "elu"},
      {typeid(torch::nn::LeakyReLUImpl), "leaky_relu"},
  };
  const auto found = names.find(typeid(module));
  return found == names.end() ? std::string() : found->second;
}

const OpRoleInfo* find_op_role(const torch::nn::Module& module) {
  return find_op_role(op_name(module));
}

}  // namespace qat
