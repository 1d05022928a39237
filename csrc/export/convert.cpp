// qat::convert: a prepared torch::nn::Sequential becomes a TorchScript module on PyTorch's
// native quantized operators, the C++ twin of python/qat/convert.py for Sequential chains.
//
// Each integer op takes its qparams from the simulation: a conv's weights are the very
// integers its FakeQuantize produces, its output scale and zero point those of the
// FakeQuantize after it. Nothing is re-derived, so the simulation and the integer model round
// the same numbers.

#include "integer_model.h"

#include <qat/lowered.h>
#include <qat/lowering.h>
#include <qat/nn.h>
#include <qat/op_roles.h>
#include <qat/prepare.h>

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/pooling.h>
#include <torch/utils.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cctype>
#include <cmath>
#include <limits>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace qat {
namespace detail {
namespace {

// A quantized tensor's qparams, as the FakeQuantize that gave them holds them.
struct QParams {
  double scale;
  int64_t zero_point;
  c10::ScalarType dtype;

  bool operator==(const QParams& other) const {
    return scale == other.scale && zero_point == other.zero_point && dtype == other.dtype;
  }
};

std::string path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// A float literal of TorchScript source that reads back as exactly `value` (and always as a
// float: "1" would be an int).
std::string literal(double value) {
  return fmt::format("{:.17e}", value);
}

std::string literal(bool value) {
  return value ? "True" : "False";
}

std::string literal(at::IntArrayRef values) {
  return fmt::format("[{}]", fmt::join(values, ", "));
}

// TorchScript compiled without Python resolves no `torch.quint8`; a dtype argument is the
// ScalarType's number.
std::string dtype_literal(c10::ScalarType dtype) {
  return std::to_string(static_cast<int>(dtype));
}

// The quantized dtype of `fq`'s activations (qat::activation_dtype), or the reason there
// is none.
c10::ScalarType activation_dtype(const FakeQuantizeImpl& fq, const std::string& name) {
  if (const auto dtype = qat::activation_dtype(fq.quant_min(), fq.quant_max())) {
    return *dtype;
  }
  throw std::invalid_argument(fmt::format(
      "qat::convert: '{}' quantizes activations to [{}, {}], which have no integer kernel: "
      "the kernels hold activations in [0, 255] or [-128, 127] and saturate only there; "
      "train with 8-bit activations to convert",
      name, fq.quant_min(), fq.quant_max()));
}

QParams qparams_of(const FakeQuantizeImpl& fq, const std::string& name) {
  if (fq.spec().per_channel() || fq.scale.numel() != 1) {
    throw std::invalid_argument(fmt::format(
        "qat::convert: '{}' quantizes activations per channel; the integer kernels take "
        "per-tensor activations",
        name));
  }
  // A learned (float) zero point is rounded half to even, as the simulation rounds it.
  const double zero_point =
      std::nearbyint(fq.zero_point.detach().to(torch::kDouble).item<double>());
  return {
      fq.scale.detach().to(torch::kDouble).item<double>(), static_cast<int64_t>(zero_point),
      activation_dtype(fq, name)};
}

// gamma / sqrt(running_var + eps), the per-channel factor of a batch norm in eval, after
// checking the statistics it comes from: a negative variance (a corrupt checkpoint, a hand
// edit) or a factor that overflows would otherwise surface as a NaN scale deep in the
// kernels, far from its cause.
template <typename BatchNorm>
torch::Tensor batch_norm_factor(const BatchNorm& bn, const std::string& name) {
  torch::NoGradGuard no_grad;
  const torch::Tensor& running_var = bn.running_var;
  const auto channels = running_var.numel();
  const auto negative = (running_var < 0).sum().item<int64_t>();
  if (negative > 0) {
    throw std::invalid_argument(fmt::format(
        "qat::convert: the batch norm '{}' has a negative running_var at {} of {} channels "
        "(min {:.6g}); a variance cannot be negative, so its running statistics are corrupt",
        name, negative, channels, running_var.min().item<double>()));
  }
  const torch::Tensor factor = qat::batch_norm_factor(bn.weight, running_var, bn.options.eps());
  const auto nonfinite = (~torch::isfinite(factor)).sum().item<int64_t>();
  if (nonfinite > 0) {
    throw std::invalid_argument(fmt::format(
        "qat::convert: the batch norm '{}' has a non-finite factor weight / sqrt(running_var + "
        "eps) at {} of {} channels (running_var + eps is 0 or the weight too large there)",
        name, nonfinite, channels));
  }
  return factor;
}

// Runs a weight FakeQuantize as the simulation does in eval (fake quantization on, observer
// off), then puts its switches back.
template <typename Fn>
torch::Tensor simulate_weight(FakeQuantizeImpl& fq, Fn fn) {
  const bool observing = fq.is_observer_enabled();
  const bool quantizing = fq.is_fake_quant_enabled();
  fq.disable_observer();
  fq.enable_fake_quant();
  torch::NoGradGuard no_grad;
  auto result = fn();
  fq.enable_observer(observing);
  fq.enable_fake_quant(quantizing);
  return result.detach();
}

// The int8 tensor whose dequantized values are `fq_weight`, the fake-quantized weight with
// `fq`'s qparams (per channel along its spec's axis: 1 for a transposed conv), as
// qat::integer_weight gives it, naming the layer when it cannot.
torch::Tensor integer_weight(
    const torch::Tensor& fq_weight, const FakeQuantizeImpl& fq, const std::string& name) {
  try {
    return qat::integer_weight(
        fq_weight, fq.scale, fq.zero_point, fq.quant_min(), fq.quant_max(), fq.spec().per_channel(),
        fq.spec().axis());
  } catch (const c10::Error& error) {
    throw std::invalid_argument(
        fmt::format("qat::convert: '{}': {}", name, error.what_without_backtrace()));
  }
}

// Calls a registered operator by name (the quantized prepack ops return custom-class objects
// whose C++ types are not in LibTorch's public headers).
c10::IValue call_op(const char* name, torch::jit::Stack stack) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack.at(0);
}

// A conv's padding as a list per side, or nullopt for a "same" that pads the right more
// than the left (an odd dilation * (kernel - 1): ATen pads the odd one on the right, which
// no integer conv does). ConvOptions::padding() is a c10::variant in LibTorch 1.x and a
// std::variant in 2.x; unqualified `visit` finds the one of its namespace.
struct PaddingList {
  std::vector<int64_t> kernel_size;
  std::vector<int64_t> dilation;
  template <size_t D>
  c10::optional<std::vector<int64_t>> operator()(const torch::ExpandingArray<D>& padding) const {
    return at::IntArrayRef(padding).vec();
  }
  c10::optional<std::vector<int64_t>> operator()(const torch::enumtype::kValid&) const {
    return std::vector<int64_t>(kernel_size.size(), 0);
  }
  c10::optional<std::vector<int64_t>> operator()(const torch::enumtype::kSame&) const {
    const auto sides = same_padding(kernel_size, dilation);
    std::vector<int64_t> left;
    for (size_t d = 0; d < kernel_size.size(); ++d) {
      if (sides[2 * d] != sides[2 * d + 1]) {
        return c10::nullopt;
      }
      left.push_back(sides[2 * d]);
    }
    return left;
  }
};

template <typename Options>
std::vector<int64_t> conv_padding(const Options& options, const std::string& name) {
  const auto mode = torch::enumtype::get_enum_name(options.padding_mode());
  const auto padding = visit(
      PaddingList{
          at::IntArrayRef(options.kernel_size()).vec(), at::IntArrayRef(options.dilation()).vec()},
      options.padding());
  if (mode != "kZeros" || !padding.has_value()) {
    throw std::invalid_argument(fmt::format(
        "qat::convert: '{}' pads with padding_mode {} or with a padding 'same' that pads one "
        "side more than the other (an odd dilation * (kernel - 1)), which qat::convert does "
        "not write as a conv's padding sizes; use zero padding that pads both sides alike",
        name, mode));
  }
  return *padding;
}

// Resolves the names of the generated source without Python: `torch` as the aten operators
// (as LibTorch's native resolver does) and `quantized` as PyTorch's quantized ones.
struct OperatorResolver : torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(
      const std::string& name, torch::jit::GraphFunction& /*method*/,
      const torch::jit::SourceRange& /*location*/) override {
    if (name == "torch") {
      return std::make_shared<torch::jit::BuiltinModule>("aten");
    }
    if (name == "quantized") {
      return std::make_shared<torch::jit::BuiltinModule>("quantized");
    }
    return nullptr;
  }

  torch::jit::TypePtr resolveType(
      const std::string& /*name*/, const torch::jit::SourceRange& /*location*/) override {
    return nullptr;
  }
};

// Builds the TorchScript module: one `forward` over the chain, with the packed weights and
// float tensors as attributes.
class Converter {
 public:
  Converter() : module_(c10::QualifiedName("__torch__.qat.IntegerModel")) {}

  IntegerModel run(torch::nn::SequentialImpl& root) {
    chain(root, "");
    emit(quantized_ ? "return x.dequantize()" : "return x");
    module_.define(
        "def forward(self, x: Tensor) -> Tensor:\n" + body_, std::make_shared<OperatorResolver>());
    module_.eval();
    return {module_, layers_};
  }

 private:
  void emit(const std::string& line) { body_ += "    " + line + "\n"; }

  // An attribute name for the module at `name` ("features.0" -> "features_0_<what>").
  static std::string attribute(const std::string& name, const std::string& what) {
    std::string out;
    for (const char c : name) {
      out += std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
    }
    if (out.empty() || std::isdigit(static_cast<unsigned char>(out[0]))) {
      out = "_" + out;
    }
    return out + "_" + what;
  }

  std::string tensor_attribute(
      const std::string& name, const std::string& what, const torch::Tensor& t) {
    if (!t.defined()) {
      return "None";
    }
    const auto attr = attribute(name, what);
    module_.register_buffer(attr, t.detach().to(torch::kCPU).clone());
    return "self." + attr;
  }

  void chain(torch::nn::SequentialImpl& sequential, const std::string& prefix) {
    std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> items;
    for (const auto& item : sequential.named_children()) {
      items.emplace_back(item.key(), item.value());
    }
    for (size_t i = 0; i < items.size(); ++i) {
      const auto name = path(prefix, items[i].first);
      auto& module = *items[i].second;
      if (auto* nested = dynamic_cast<torch::nn::SequentialImpl*>(&module)) {
        chain(*nested, name);
      } else if (auto* fq = dynamic_cast<FakeQuantizeImpl*>(&module)) {
        quantize(*fq, name);
      } else if (auto* table = dynamic_cast<EmbeddingImpl*>(&module)) {
        embedding(*table, name);
      } else if (auto* bag = dynamic_cast<EmbeddingBagImpl*>(&module)) {
        embedding(*bag, name);
      } else if (is_layer(module)) {
        // qat::prepare quantizes a layer + ReLU6 after the ReLU6 with the fixed qparams of
        // [0, 6], where the integer kernel's ReLU saturates at the 6: one fused kernel.
        const bool relu6 = i + 2 < items.size() &&
                           dynamic_cast<torch::nn::ReLU6Impl*>(items[i + 1].second.get()) &&
                           is_fixed(items[i + 2].second.get());
        const size_t at = relu6 ? i + 2 : i + 1;
        auto* out =
            at < items.size() ? dynamic_cast<FakeQuantizeImpl*>(items[at].second.get()) : nullptr;
        if (out == nullptr) {
          throw std::invalid_argument(fmt::format(
              "qat::convert: '{}' ({}) has no qat::FakeQuantize after it, so its output has "
              "no qparams; convert a model from qat::prepare (dynamic quantization, "
              "Config::dynamic, has no C++ conversion yet)",
              name, module.name()));
        }
        layer(module, name, *out, path(prefix, items[at].first), relu6);
        i = at;  // the FakeQuantize is the layer's output quantization
      } else if (
          i + 1 < items.size() &&
          output_qparams_kernel(
              module, name, dynamic_cast<FakeQuantizeImpl*>(items[i + 1].second.get()),
              path(prefix, items[i + 1].first))) {
        ++i;  // the FakeQuantize is the op's output quantization
      } else if (fixed_range_kernel(module)) {
        // Its FakeQuantize after it requantizes to the fixed qparams, as Python's convert does.
      } else if (!passes(module) && !float_op(module, name)) {
        throw std::invalid_argument(fmt::format(
            "qat::convert: '{}' is a {}, which has no integer or float conversion (supported: "
            "qat::FakeQuantize, qat::Conv1d / 2d / 3d, qat::ConvBn1d / 2d / 3d, "
            "qat::ConvTranspose1d / 2d, qat::Linear, qat::Embedding, qat::EmbeddingBag, "
            "Sequential, "
            "ReLU, MaxPool1d, MaxPool2d, Flatten, Dropout, Identity, "
            "and in float Linear, Conv1d / 2d / 3d, ConvTranspose1d / 2d, Embedding, "
            "EmbeddingBag, "
            "BatchNorm1d / 2d / 3d, MaxPool3d, AvgPool1d / 2d / 3d, "
            "AdaptiveAvgPool1d / 2d / 3d, LayerNorm, GroupNorm, ELU, LeakyReLU, ReLU6, "
            "Hardtanh, Sigmoid, Tanh; a standalone batch norm, LayerNorm, GroupNorm, ELU and "
            "LeakyReLU run on their quantized kernels when their input is quantized)",
            name, module.name()));
      }
    }
  }

  static bool is_fixed(const torch::nn::Module* module) {
    const auto* fq = dynamic_cast<const FakeQuantizeImpl*>(module);
    return fq != nullptr && fq->has_fixed_qparams();
  }

  // Whether `module` is a `T`; never for T void (a conv type that does not exist).
  template <typename T>
  static bool is_a(const torch::nn::Module& module) {
    if constexpr (std::is_void_v<T>) {
      return false;
    } else {
      return dynamic_cast<const T*>(&module) != nullptr;
    }
  }

  template <size_t D>
  static bool is_conv(const torch::nn::Module& module) {
    using Types = detail::ConvTypes<D>;
    return is_a<typename Types::QatConv>(module) || is_a<typename Types::QatConvBn>(module) ||
           is_a<typename Types::QatConvTranspose>(module);
  }

  static bool is_layer(const torch::nn::Module& module) {
    return is_conv<1>(module) || is_conv<2>(module) || is_conv<3>(module) ||
           dynamic_cast<const LinearImpl*>(&module) != nullptr;
  }

  void quantize(FakeQuantizeImpl& fq, const std::string& name) {
    const auto q = qparams_of(fq, name);
    if (quantized_ && *quantized_ == q) {
      return;
    }
    const auto call = fmt::format(
        "torch.quantize_per_tensor(x{}, {}, {}, {})", quantized_ ? ".dequantize()" : "",
        literal(q.scale), q.zero_point, dtype_literal(q.dtype));
    LayerInfo info;
    info.op.name = name;
    info.op.kind = quantized_ ? "Requantize" : "Quantize";
    info.op.scale = q.scale;
    info.op.zero_point = q.zero_point;
    info.activation_spec = fq.spec();
    layers_.push_back(info);
    emit("x = " + call);
    quantized_ = q;
  }

  // Stores a layer's weight as Python's qat.quantized layers do (the integers, packed two or
  // four to a byte at 4 bits or fewer, with float32 scales, int32 zero points only when one
  // is not 0, and the float bias), and emits the code that builds the kernels' packed form
  // from them on the first forward. Returns the name of the local that holds that form.
  // `prepack` is the prepack call with {weight} and {bias} to fill in; `packed_type` the
  // type of what it returns.
  std::string packed_weight(
      const LoweredOp& op, const std::string& prepack, const c10::TypePtr& packed_type) {
    const auto& name = op.name;
    const auto& qweight = op.weight;
    const bool per_channel = qweight.qscheme() == at::kPerChannelAffine;
    const auto scales = per_channel ? qweight.q_per_channel_scales()
                                    : torch::full({1}, qweight.q_scale(), torch::kDouble);
    const auto zero_points = per_channel ? qweight.q_per_channel_zero_points()
                                         : torch::full({1}, qweight.q_zero_point(), torch::kLong);
    // An embedding table is stored as the kernel reads it (python/qat/quantized.py's
    // Embedding): unsigned rows (packed below 8 bits), float zero points, always.
    const bool table = op.kind == "Embedding" || op.kind == "EmbeddingBag";
    const auto per_byte = qat::values_per_byte(op.weight_bits);
    const auto data = tensor_attribute(
        name, "weight_data",
        table && per_byte == 1
            ? qweight.int_repr()
            : qat::pack_weight(qweight.int_repr(), op.weight_bits, op.weight_quant_min));
    const auto scale = tensor_attribute(name, "weight_scale", scales.to(torch::kFloat));
    const bool zero = !table && !zero_points.any().item<bool>();
    // Symmetric weights store no zero points (as Python's layers): a file gives every tensor,
    // even an empty one, a record of its own.
    const auto zero_point =
        zero ? std::string("None")
             : tensor_attribute(
                   name, "weight_zero_point", zero_points.to(table ? torch::kFloat : torch::kInt));
    const auto bias_attr = tensor_attribute(name, "bias", op.bias);
    const auto attr = attribute(name, "packed_params");
    module_.register_attribute(attr, c10::OptionalType::create(packed_type), c10::IValue());
    const auto packed = attr;
    const auto shape = qweight.sizes().vec();
    // The unpacking is torch.ops.qat.unpack_weight in TorchScript (the file must run without
    // qat), as python/qat/quantized.py has it; the cross-front-end test keeps them equal.
    const auto width = 8 / per_byte;
    std::string ints = table ? data : fmt::format("{}.to({})", data, dtype_literal(c10::kChar));
    if (per_byte > 1) {
      ints = fmt::format(
          "torch.stack([torch.bitwise_and(torch.bitwise_right_shift({0}, {1} * i), {2}) for i in "
          "range({3})], 1).flatten()[:{4}]",
          data, width, (1 << width) - 1, per_byte, qweight.numel());
      if (!table) {
        ints = fmt::format(
            "({}.to({}) + {}).to({})", ints, dtype_literal(c10::kShort), op.weight_quant_min,
            dtype_literal(c10::kChar));
      }
    }
    ints = fmt::format("{}.reshape({})", ints, literal(at::IntArrayRef(shape)));
    const auto zero_points_code =
        zero ? fmt::format("torch.zeros([{}], dtype={})", scales.numel(), dtype_literal(c10::kLong))
        : table ? zero_point
                : fmt::format("{}.to({})", zero_point, dtype_literal(c10::kLong));
    const auto weight_code =
        per_channel
            ? fmt::format(
                  "torch._make_per_channel_quantized_tensor({}, {}.to({}), {}, {})", ints, scale,
                  dtype_literal(c10::kDouble), zero_points_code, qweight.q_per_channel_axis())
            : fmt::format(
                  "torch._make_per_tensor_quantized_tensor({}, float({}[0]), int({}[0]))", ints,
                  scale, zero_points_code);
    emit(fmt::format("{} = self.{}", packed, attr));
    emit(fmt::format("if {} is None:", packed));
    emit(fmt::format(
        "    {} = {}", packed,
        fmt::format(
            fmt::runtime(prepack), fmt::arg("weight", weight_code), fmt::arg("bias", bias_attr))));
    emit(fmt::format("    self.{} = {}", attr, packed));
    // torch.jit.freeze folds every attribute that nothing writes into a constant, and
    // would fold the unpacking with it: the stored tensors are written back to themselves.
    for (const auto& stored : {data, scale, zero_point, bias_attr}) {
      if (stored != "None") {
        emit(fmt::format("    {0} = {0}", stored));
      }
    }
    return packed;
  }

  // A layer's weight as the simulation computes it in eval, its bias, weight quantizer and
  // fused ReLU.
  struct Weighted {
    torch::Tensor weight;
    torch::Tensor bias;
    FakeQuantizeImpl* weight_fq = nullptr;
    bool relu = false;
    // A transposed conv's weight: output channels along axis 1.
    bool transposed = false;
  };

  // Reads a qat::Conv<D>d, ConvTranspose<D>d or ConvBn<D>d (the batch norm folded in) into
  // `op` and `weighted`; false when `module` is none of them.
  template <size_t D>
  static bool conv_layer(torch::nn::Module& module, LoweredOp& op, Weighted& weighted) {
    // What a conv, transposed or not, and a fold share: kind, stride, dilation, groups.
    const auto geometry = [&](const auto& options, const char* kind) {
      op.kind = fmt::format("{}{}d", kind, D);
      op.stride = at::IntArrayRef(options.stride()).vec();
      op.dilation = at::IntArrayRef(options.dilation()).vec();
      op.groups = options.groups();
    };
    // A conv without a batch norm: its weight as the simulation fake-quantizes it.
    const auto plain = [&](auto& conv, bool transposed) {
      auto* weight_fq = conv.weight_fake_quant.get();
      weighted = {
          simulate_weight(*weight_fq, [&] { return weight_fq->forward(conv.weight); }), conv.bias,
          weight_fq, conv.relu, transposed};
    };
    if (auto* conv = dynamic_cast<typename detail::ConvTypes<D>::QatConv*>(&module)) {
      geometry(conv->options, "Conv");
      op.padding = conv_padding(conv->options, op.name);
      plain(*conv, false);
      return true;
    }
    using QatConvTranspose = typename detail::ConvTypes<D>::QatConvTranspose;
    if constexpr (!std::is_void_v<QatConvTranspose>) {
      if (auto* conv = dynamic_cast<QatConvTranspose*>(&module)) {
        geometry(conv->options, "ConvTranspose");
        op.padding = at::IntArrayRef(conv->options.padding()).vec();
        op.output_padding = at::IntArrayRef(conv->options.output_padding()).vec();
        plain(*conv, true);
        return true;
      }
    }
    auto* fold = dynamic_cast<typename detail::ConvTypes<D>::QatConvBn*>(&module);
    if (fold == nullptr) {
      return false;
    }
    geometry(fold->options, "Conv");
    op.padding = conv_padding(fold->options, op.name);
    auto* weight_fq = fold->weight_fake_quant.get();
    const auto& bn = *fold->bn;
    torch::NoGradGuard no_grad;
    // What the simulation's eval forward computes: bn(conv(x, fq(w * f) / f) + b) with
    // the running statistics is conv(x, fq(w * f)) + beta + f * (b - mean).
    const auto factor = batch_norm_factor(bn, path(op.name, "bn"));
    std::vector<int64_t> shape(fold->weight.dim(), 1);
    shape[0] = -1;
    weighted = {
        simulate_weight(
            *weight_fq, [&] { return weight_fq->forward_folded(fold->weight, factor); }) *
            factor.reshape(shape),
        qat::fold_bias(fold->bias, bn.bias, bn.running_mean, factor), weight_fq, fold->relu};
    return true;
  }

  void layer(
      torch::nn::Module& module, const std::string& name, FakeQuantizeImpl& out,
      const std::string& out_name, bool relu6) {
    if (!quantized_) {
      throw std::invalid_argument(fmt::format(
          "qat::convert: '{}' ({}) takes a float input; qat::prepare places a "
          "qat::FakeQuantize before it",
          name, module.name()));
    }
    const auto q = qparams_of(out, out_name);
    LayerInfo info;
    auto& op = info.op;
    op.name = name;
    Weighted weighted;
    if (auto* linear = dynamic_cast<LinearImpl*>(&module)) {
      op.kind = "Linear";
      auto* weight_fq = linear->weight_fake_quant.get();
      weighted = {
          simulate_weight(*weight_fq, [&] { return weight_fq->forward(linear->weight); }),
          linear->bias, weight_fq, linear->relu};
    } else if (!conv_layer<1>(module, op, weighted) && !conv_layer<2>(module, op, weighted)) {
      conv_layer<3>(module, op, weighted);
    }
    if (!dynamic_cast<InputQuantized&>(module).has_integer_kernel()) {
      grouped_transposed(op, weighted);
      quantize(out, out_name);  // saturating at 6 for a ReLU6 after the layer
      return;
    }
    auto* weight_fq = weighted.weight_fq;
    const auto bias = dynamic_cast<InputQuantized&>(module).kernel_bias(weighted.bias, *weight_fq);
    op.scale = q.scale;
    op.zero_point = q.zero_point;
    op.relu = weighted.relu || relu6;
    op.weight = integer_weight(weighted.weight, *weight_fq, name);
    // A zero bias computes what no bias does.
    op.bias = bias.defined() ? bias.detach().to(torch::kCPU, torch::kFloat).clone()
                             : torch::zeros({op.weight.size(weighted.transposed ? 1 : 0)});
    op.weight_bits = weight_fq->spec().bits();
    op.weight_quant_min = weight_fq->quant_min();
    info.weight_spec = weight_fq->spec();
    if (weighted.transposed && info.weight_spec->per_channel()) {
      // The config's spec, as the metadata records it: the module moved its axis to the
      // transposed weight's output channels, as it moves a conv's to 0.
      info.weight_spec->axis(0);
    }
    info.activation_spec = out.spec();
    emit_layer(op);
    quantized_ = q;
    layers_.push_back(info);
  }

  // A grouped transposed conv: no integer kernel keeps one weight scale per output channel of
  // a group, so it runs in float on the simulation's fake-quantized weight and float bias, as
  // Python's convert keeps it (the bias, not rounded to a kernel's grid, as in training).
  void grouped_transposed(const LoweredOp& op, const Weighted& weighted) {
    emit("x = x.dequantize()");
    quantized_ = c10::nullopt;
    emit(fmt::format(
        "x = torch.conv_transpose{}d(x, {}, {}, {}, {}, {}, {}, {})", op.stride.size(),
        tensor_attribute(op.name, "weight", weighted.weight),
        tensor_attribute(op.name, "bias", weighted.bias), literal(op.stride), literal(op.padding),
        literal(op.output_padding), op.groups, literal(op.dilation)));
    if (weighted.relu) {
      emit("x = torch.relu(x)");
    }
  }

  // Whether an embedding bag's mode is `Mode` (visit by argument-dependent lookup: the
  // variant is c10's in torch 1.13 and std's later).
  template <typename Mode>
  static bool is_mode(const torch::nn::EmbeddingBagMode& mode) {
    return visit(
        [](const auto& value) { return std::is_same_v<std::decay_t<decltype(value)>, Mode>; },
        mode);
  }

  // A table's weight as its lookups read it (qat::renormalized_table, Python's convert's
  // call too), and its options with max_norm cleared: the converted table is read as it is.
  template <typename Options>
  static std::pair<torch::Tensor, Options> renormalized(
      const torch::Tensor& weight, Options options) {
    auto table = qat::renormalized_table(weight, options.max_norm(), options.norm_type());
    options.max_norm(c10::nullopt);
    return {table, options};
  }

  // A table lookup in float, as torch.nn.functional's embedding / embedding_bag compute it
  // (so these and Python's float layers give the same values), on the table `weight`: the
  // rows of the indices x (of a bag: a bag per row of 2-D indices). Returns the call.
  template <typename Options>
  std::string float_table(
      const std::string& name, const torch::Tensor& weight, const Options& options) {
    constexpr bool bag = std::is_same_v<Options, torch::nn::EmbeddingBagOptions>;
    TORCH_INTERNAL_ASSERT(!options.max_norm(), "float_table takes a renormalized table");
    const auto table = tensor_attribute(name, "weight", weight);
    const auto scale_grad = literal(options.scale_grad_by_freq());
    if constexpr (!bag) {
      return fmt::format(
          "torch.embedding({}, x, {}, {}, False)", table, options.padding_idx().value_or(-1),
          scale_grad);
    } else {
      // embedding_bag's padding index is optional (-1 would be the last row).
      const auto padding =
          options.padding_idx() ? std::to_string(*options.padding_idx()) : std::string("None");
      const int mode = is_mode<torch::enumtype::kSum>(options.mode())    ? 0
                       : is_mode<torch::enumtype::kMean>(options.mode()) ? 1
                                                                         : 2;
      emit("bag_offsets = torch.arange(0, x.numel(), x.size(1), dtype=x.dtype, device=x.device)");
      return fmt::format(
          "torch.embedding_bag({}, x.reshape([-1]), bag_offsets, {}, {}, False, None, {}, {})[0]",
          table, scale_grad, mode, literal(options.include_last_offset()), padding);
    }
  }

  // A table looked up by quantized::embedding_byte (a bag: embedding_bag_byte): float rows
  // out, from the simulation's integers as the kernel's unsigned rows (qat::unsigned_rows,
  // as Python's qat.quantized.Embedding / EmbeddingBag store them). A table no kernel reads
  // as the simulation does stays float, fake-quantized, as Python's convert keeps it: one
  // scale per tensor (the kernels take one per row), a bag of mode max or with a padding
  // index (the kernel sums every entry). With max_norm every row is renormalized first, as a
  // lookup would renormalize it (Python's convert: qat.convert._table): the converted table
  // is read as it is, and each row is what the simulation looks up.
  template <typename Table>
  void embedding(Table& module, const std::string& name) {
    constexpr bool bag = std::is_same_v<Table, EmbeddingBagImpl>;
    const auto what = fmt::format("'{}' ({})", name, Table::display_name());
    auto& fq = *module.weight_fake_quant;
    if (quantized_) {
      throw std::invalid_argument(
          fmt::format("qat::convert: {} takes indices, but its input is quantized here", what));
    }
    // Not structured bindings: the lambda below captures the weight (C++20 only for those).
    const auto read = renormalized(module.weight, module.options);
    const auto& weight = read.first;
    const auto& options = read.second;
    const auto table = simulate_weight(fq, [&] { return fq.forward(weight); });
    bool integer = fq.spec().per_channel();
    if constexpr (bag) {
      integer =
          integer && !is_mode<torch::enumtype::kMax>(options.mode()) && !options.padding_idx();
    }
    if (!integer) {
      emit("x = " + float_table(name, table, options));
      return;
    }
    const auto ints = integer_weight(table, fq, name);
    LayerInfo info;
    auto& op = info.op;
    op.name = name;
    op.kind = bag ? "EmbeddingBag" : "Embedding";
    op.weight = qat::unsigned_rows(ints, fq.quant_min());
    op.weight_bits = fq.spec().bits();
    op.weight_quant_min = 0;
    info.weight_spec = fq.spec();
    const auto sample = call_op(
        "quantized::embedding_bag_prepack",
        {at::_make_per_channel_quantized_tensor(
            op.weight.int_repr(), op.weight.q_per_channel_scales(),
            op.weight.q_per_channel_zero_points().to(torch::kFloat), 0)});
    const auto packed =
        packed_weight(op, "quantized.embedding_bag_prepack({weight})", sample.type());
    if constexpr (!bag) {
      emit(fmt::format(
          "x = quantized.embedding_byte({}, x.reshape([-1]), False).reshape(x.size() + [{}])",
          packed, op.weight.size(1)));
    } else {
      // One bag per row of the 2-D indices, as Python's qat.quantized.EmbeddingBag computes
      // it (the kernel sums whatever mode it is given; a mean divides by the bag's size).
      emit("bag_offsets = torch.arange(0, x.numel(), x.size(1), dtype=x.dtype, device=x.device)");
      emit("bag_indices = x.reshape([-1])");
      emit(fmt::format(
          "x = quantized.embedding_bag_byte({}, bag_indices, bag_offsets, False, 0, False, None, "
          "None, False)",
          packed));
      if (is_mode<torch::enumtype::kMean>(module.options.mode())) {
        emit(
            "x = x / (torch.cat([bag_offsets[1:], torch.full_like(bag_offsets[:1], "
            "bag_indices.numel())]) - bag_offsets).clamp_min(1).unsqueeze(1).to(x.dtype)");
      }
    }
    layers_.push_back(info);
  }

  // The TorchScript of a lowered conv, transposed conv or Linear on PyTorch's quantized
  // kernels.
  void emit_layer(const LoweredOp& op) {
    std::string kernel;
    std::string prepack;
    // The kernels' packed form, built here for its type (the file builds its own).
    c10::IValue sample;
    if (op.kind == "Linear") {
      sample = call_op("quantized::linear_prepack", {op.weight, op.bias});
      prepack = "quantized.linear_prepack({weight}, {bias})";
      kernel = op.relu ? "linear_relu" : "linear";
      // quantized::linear does not check the input's width against the packed weight
      // (qnnpack reads past the input), so the check torch::nn::Linear makes is part of the
      // scripted code, and so of the files written from it. As in Python's
      // qat.quantized.Linear, the error is torch.addmm's (what torch::nn::Linear runs on a
      // batch of rows) on empty stand-ins, built only when the widths differ:
      // torch::nn::Linear's RuntimeError and message ("mat1 and mat2 shapes cannot be
      // multiplied (2x5 and 4x3)"), where a TorchScript assert would raise another kind. Its
      // result is assigned so that dead-code elimination keeps it.
      const auto in_features = op.weight.size(1);
      emit(fmt::format("if x.size(-1) != {}:", in_features));
      // On x's device, which freezing cannot fold: a constant-sized empty tensor would be
      // folded into a constant that the file stores (as large as a float weight).
      emit(fmt::format(
          "    x = torch.addmm(torch.empty([{1}], device=x.device), "
          "torch.empty([x.numel() // max(x.size(-1), 1), x.size(-1)], device=x.device), "
          "torch.empty([{0}, {1}], device=x.device))",
          in_features, op.weight.size(0)));
    } else if (op.kind.rfind("ConvTranspose", 0) == 0) {
      const auto conv = fmt::format("conv_transpose{}d", op.stride.size());
      sample = call_op(
          fmt::format("quantized::{}_prepack", conv).c_str(),
          {op.weight, op.bias, op.stride, op.padding, op.output_padding, op.dilation, op.groups});
      prepack = fmt::format(
          "quantized.{}_prepack({{weight}}, {{bias}}, {}, {}, {}, {}, {})", conv,
          literal(op.stride), literal(op.padding), literal(op.output_padding), literal(op.dilation),
          op.groups);
      kernel = conv;
    } else {
      const auto conv = fmt::format("conv{}d", op.stride.size());
      sample = call_op(
          fmt::format("quantized::{}_prepack", conv).c_str(),
          {op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups});
      prepack = fmt::format(
          "quantized.{}_prepack({{weight}}, {{bias}}, {}, {}, {}, {})", conv, literal(op.stride),
          literal(op.padding), literal(op.dilation), op.groups);
      kernel = op.relu ? conv + "_relu" : conv;
    }
    const auto packed = packed_weight(op, prepack, sample.type());
    emit(fmt::format(
        "x = quantized.{}(x, {}, {}, {})", kernel, packed, literal(op.scale), op.zero_point));
    if (op.relu && kernel.rfind("conv_transpose", 0) == 0) {
      // The transposed kernels have no ReLU of their own: it runs on the quantized output,
      // exact since the output grid holds 0 (as Python's qat.quantized.ConvTranspose2d).
      emit("x = torch.relu(x)");
    }
  }

  // An op whose quantized kernel writes its output with the qparams it is given (a
  // standalone batch norm with running statistics, a layer norm, a group norm, an ELU, a
  // leaky ReLU) on a quantized input, its output quantized by the FakeQuantize `out` after
  // it: the kernel with that FakeQuantize's qparams, as Python's convert lowers it
  // (qat.quantized.BatchNorm, LayerNorm, ...). The kernels compute in float on the
  // dequantized input and round once, as the simulation does. False for anything else (on a
  // float input these ops run in float, float_op).
  bool output_qparams_kernel(
      torch::nn::Module& module, const std::string& name, FakeQuantizeImpl* out,
      const std::string& out_name) {
    if (out == nullptr || !quantized_) {
      return false;
    }
    const auto op = requantizing_op(module, name, /*kernel=*/true);
    if (op.kind.empty()) {
      return false;
    }
    const auto q = qparams_of(*out, out_name);
    emit(fmt::format(
        "x = {}{}, {}{}", op.kernel_head, literal(q.scale), q.zero_point, op.kernel_tail));
    LayerInfo info;
    info.op.name = name;
    info.op.kind = op.kind;
    info.op.scale = q.scale;
    info.op.zero_point = q.zero_point;
    info.activation_spec = out->spec();
    layers_.push_back(info);
    quantized_ = q;
    return true;
  }

  // The two forms of an op whose quantized kernel writes its output with the qparams it is
  // given (a batch norm with running statistics, a layer norm, a group norm, an ELU, a leaky
  // ReLU): the quantized call is kernel_head + "scale, zero_point" + kernel_tail (when
  // `kernel`), the float one `floating` (else). An empty kind for any other module.
  struct RequantizingOp {
    std::string kind;
    std::string kernel_head;
    std::string kernel_tail;
    std::string floating;
  };

  RequantizingOp requantizing_op(torch::nn::Module& module, const std::string& name, bool kernel) {
    if (auto* bn = dynamic_cast<torch::nn::BatchNorm1dImpl*>(&module)) {
      return batch_norm_op(*bn, 1, name, kernel);
    }
    if (auto* bn2d = dynamic_cast<torch::nn::BatchNorm2dImpl*>(&module)) {
      return batch_norm_op(*bn2d, 2, name, kernel);
    }
    if (auto* bn3d = dynamic_cast<torch::nn::BatchNorm3dImpl*>(&module)) {
      return batch_norm_op(*bn3d, 3, name, kernel);
    }
    if (auto* norm = dynamic_cast<torch::nn::LayerNormImpl*>(&module)) {
      return norm_op(
          "LayerNorm", "layer_norm", literal(at::IntArrayRef(norm->options.normalized_shape())),
          name, norm->weight, norm->bias, norm->options.eps());
    }
    if (auto* group = dynamic_cast<torch::nn::GroupNormImpl*>(&module)) {
      return norm_op(
          "GroupNorm", "group_norm", std::to_string(group->options.num_groups()), name,
          group->weight, group->bias, group->options.eps());
    }
    if (auto* elu = dynamic_cast<torch::nn::ELUImpl*>(&module)) {
      const auto alpha = literal(elu->options.alpha());
      return {"ELU", "quantized.elu(x, ", ", " + alpha + ")", "torch.elu(x, " + alpha + ")"};
    }
    if (auto* leaky = dynamic_cast<torch::nn::LeakyReLUImpl*>(&module)) {
      const auto slope = literal(leaky->options.negative_slope());
      return {
          "LeakyReLU", "quantized.leaky_relu(x, " + slope + ", False, ", ")",
          "torch.leaky_relu(x, " + slope + ")"};
    }
    return {};
  }

  // A layer or group norm's forms: quantized.<op>(x, <shape or groups>, weight, bias, eps,
  // qparams) and torch.<op> without the qparams.
  RequantizingOp norm_op(
      const char* kind, const char* op, const std::string& shape_or_groups, const std::string& name,
      const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
    const auto args = fmt::format(
        "{}, {}, {}, {}", shape_or_groups, tensor_attribute(name, "weight", weight),
        tensor_attribute(name, "bias", bias), literal(eps));
    return {
        kind, fmt::format("quantized.{}(x, {}, ", op, args), ")",
        fmt::format("torch.{}(x, {})", op, args)};
  }

  // A batch norm's forms: quantized::batch_norm<dims>d with its affine map
  // (qat::batch_norm_affine) and running statistics 0 and 1, as Python's
  // qat.quantized.BatchNorm stores it, or eval-mode torch.batch_norm with its own tensors.
  // One without running statistics has no eval form and is refused, naming it.
  template <typename BatchNorm>
  RequantizingOp batch_norm_op(
      const BatchNorm& bn, int dims, const std::string& name, bool kernel) {
    if (!bn.options.track_running_stats()) {
      throw std::invalid_argument(fmt::format(
          "qat::convert: '{}' ({}) keeps no running statistics, so it has no eval form", name,
          bn.name()));
    }
    batch_norm_factor(bn, name);  // refuses a negative or non-finite variance, naming it
    if (kernel) {
      const auto affine = qat::batch_norm_affine(
          bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.options.eps());
      const auto weight = tensor_attribute(name, "weight", std::get<0>(affine));
      return {
          "BatchNorm",
          fmt::format(
              "quantized.batch_norm{}d(x, {}, {}, torch.zeros_like({}), torch.ones_like({}), 0.0, ",
              dims, weight, tensor_attribute(name, "bias", std::get<1>(affine)), weight, weight),
          ")", ""};
    }
    const auto tensors = fmt::format(
        "{}, {}, {}, {}", tensor_attribute(name, "weight", bn.weight),
        tensor_attribute(name, "bias", bn.bias),
        tensor_attribute(name, "running_mean", bn.running_mean),
        tensor_attribute(name, "running_var", bn.running_var));
    return {
        "BatchNorm", "", "",
        fmt::format(
            "torch.batch_norm(x, {}, False, 0.0, {}, False)", tensors, literal(bn.options.eps()))};
  }

  // An op of fixed output range (sigmoid, tanh) whose quantized kernel the op-role table
  // lists, on a quantized input: the kernel writes its own qparams, which the requantize of
  // the FakeQuantize after it (the same fixed qparams) replaces.
  bool fixed_range_kernel(torch::nn::Module& module) {
    const auto* role = find_op_role(module);
    if (role == nullptr || role->role != OpRole::kFixedRange || !role->integer_kernel ||
        !quantized_) {
      return false;
    }
    emit(fmt::format("x = torch.{}(x)", role->name));
    // The kernel's qparams are not tracked: the next FakeQuantize always requantizes.
    quantized_->scale = std::numeric_limits<double>::quiet_NaN();
    return true;
  }

  // Ops that run on a quantized tensor as on a float one and keep its qparams (or vanish).
  bool passes(torch::nn::Module& module) {
    if (dynamic_cast<torch::nn::DropoutImpl*>(&module) != nullptr ||
        dynamic_cast<torch::nn::Dropout2dImpl*>(&module) != nullptr ||
        dynamic_cast<torch::nn::IdentityImpl*>(&module) != nullptr) {
      return true;  // identities in eval
    }
    if (dynamic_cast<torch::nn::ReLUImpl*>(&module) != nullptr) {
      emit("x = torch.relu(x)");
    } else if (auto* pool = dynamic_cast<torch::nn::MaxPool1dImpl*>(&module)) {
      emit("x = " + max_pool("max_pool1d", pool->options));
    } else if (auto* pool2d = dynamic_cast<torch::nn::MaxPool2dImpl*>(&module)) {
      emit("x = " + max_pool("max_pool2d", pool2d->options));
    } else if (auto* flatten = dynamic_cast<torch::nn::FlattenImpl*>(&module)) {
      emit(fmt::format(
          "x = torch.flatten(x, {}, {})", flatten->options.start_dim(),
          flatten->options.end_dim()));
    } else {
      return false;
    }
    return true;
  }

  template <typename Options>
  static std::string max_pool(const char* op, const Options& o) {
    return fmt::format(
        "torch.{}(x, {}, {}, {}, {}, {})", op, literal(o.kernel_size()), literal(o.stride()),
        literal(o.padding()), literal(o.dilation()), literal(o.ceil_mode()));
  }

  // avg_pool1d takes no divisor_override.
  template <size_t D>
  static std::string avg_pool(const torch::nn::AvgPoolOptions<D>& o) {
    const auto divisor = o.divisor_override() ? std::to_string(*o.divisor_override()) : "None";
    return fmt::format(
        "torch.avg_pool{}d(x, {}, {}, {}, {}, {}{})", D, literal(o.kernel_size()),
        literal(o.stride()), literal(o.padding()), literal(o.ceil_mode()),
        literal(o.count_include_pad()), D == 1 ? "" : ", " + divisor);
  }

  template <typename Options>
  std::string float_conv(
      const char* op, const std::string& name, const torch::Tensor& weight,
      const torch::Tensor& bias, const Options& o) {
    // A transposed conv's arguments: stride, padding, output padding, groups, dilation.
    const auto geometry =
        o.transposed()
            ? fmt::format(
                  "{}, {}, {}, {}, {}", literal(o.stride()), literal(conv_padding(o, name)),
                  literal(o.output_padding()), o.groups(), literal(o.dilation()))
            : fmt::format(
                  "{}, {}, {}, {}", literal(o.stride()), literal(conv_padding(o, name)),
                  literal(o.dilation()), o.groups());
    return fmt::format(
        "torch.{}(x, {}, {}, {})", op, tensor_attribute(name, "weight", weight),
        tensor_attribute(name, "bias", bias), geometry);
  }

  // An adaptive pool's output size as TorchScript: a missing size keeps the input's.
  template <size_t D>
  static std::string output_size(const std::array<c10::optional<int64_t>, D>& size) {
    std::vector<std::string> sizes;
    for (size_t i = 0; i < D; ++i) {
      sizes.push_back(
          size[i] ? std::to_string(*size[i]) : fmt::format("x.size({})", int64_t(i) - int64_t(D)));
    }
    return fmt::format("[{}]", fmt::join(sizes, ", "));
  }

  // Ops without an integer kernel here: they run in float after a dequantize, and the
  // FakeQuantize qat::prepare placed after them (if any) quantizes their output.
  bool float_op(torch::nn::Module& module, const std::string& name) {
    std::string call;
    if (auto* linear = dynamic_cast<torch::nn::LinearImpl*>(&module)) {
      call = fmt::format(
          "torch.linear(x, {}, {})", tensor_attribute(name, "weight", linear->weight),
          tensor_attribute(name, "bias", linear->bias));
    } else if (auto* conv = dynamic_cast<torch::nn::Conv1dImpl*>(&module)) {
      call = float_conv("conv1d", name, conv->weight, conv->bias, conv->options);
    } else if (auto* conv2d = dynamic_cast<torch::nn::Conv2dImpl*>(&module)) {
      call = float_conv("conv2d", name, conv2d->weight, conv2d->bias, conv2d->options);
    } else if (auto* conv3d = dynamic_cast<torch::nn::Conv3dImpl*>(&module)) {
      call = float_conv("conv3d", name, conv3d->weight, conv3d->bias, conv3d->options);
    } else if (auto* up = dynamic_cast<torch::nn::ConvTranspose1dImpl*>(&module)) {
      call = float_conv("conv_transpose1d", name, up->weight, up->bias, up->options);
    } else if (auto* up2d = dynamic_cast<torch::nn::ConvTranspose2dImpl*>(&module)) {
      call = float_conv("conv_transpose2d", name, up2d->weight, up2d->bias, up2d->options);
    } else if (auto* table = dynamic_cast<torch::nn::EmbeddingImpl*>(&module)) {
      const auto [weight, options] = renormalized(table->weight, table->options);
      call = float_table(name, weight, options);
    } else if (auto* bag = dynamic_cast<torch::nn::EmbeddingBagImpl*>(&module)) {
      const auto [weight, options] = renormalized(bag->weight, bag->options);
      call = float_table(name, weight, options);
    } else if (auto* max3d = dynamic_cast<torch::nn::MaxPool3dImpl*>(&module)) {
      // No quantized max_pool3d in the op-role table: in float, as Python's convert runs it.
      call = max_pool("max_pool3d", max3d->options);
    } else if (auto* pool = dynamic_cast<torch::nn::AvgPool1dImpl*>(&module)) {
      call = avg_pool(pool->options);
    } else if (auto* pool2d = dynamic_cast<torch::nn::AvgPool2dImpl*>(&module)) {
      call = avg_pool(pool2d->options);
    } else if (auto* pool3d = dynamic_cast<torch::nn::AvgPool3dImpl*>(&module)) {
      call = avg_pool(pool3d->options);
    } else if (auto* adaptive1d = dynamic_cast<torch::nn::AdaptiveAvgPool1dImpl*>(&module)) {
      call = fmt::format(
          "torch.adaptive_avg_pool1d(x, {})", literal(adaptive1d->options.output_size()));
    } else if (auto* adaptive = dynamic_cast<torch::nn::AdaptiveAvgPool2dImpl*>(&module)) {
      call = fmt::format(
          "torch.adaptive_avg_pool2d(x, {})", output_size(*adaptive->options.output_size()));
    } else if (auto* adaptive3d = dynamic_cast<torch::nn::AdaptiveAvgPool3dImpl*>(&module)) {
      call = fmt::format(
          "torch.adaptive_avg_pool3d(x, {})", output_size(*adaptive3d->options.output_size()));
    } else if (auto op = requantizing_op(module, name, /*kernel=*/false); !op.kind.empty()) {
      call = op.floating;
    } else if (dynamic_cast<torch::nn::ReLU6Impl*>(&module) != nullptr) {
      call = "torch.clamp(x, 0.0, 6.0)";
    } else if (auto* hardtanh = dynamic_cast<torch::nn::HardtanhImpl*>(&module)) {
      call = fmt::format(
          "torch.clamp(x, {}, {})", literal(hardtanh->options.min_val()),
          literal(hardtanh->options.max_val()));
    } else if (dynamic_cast<torch::nn::SigmoidImpl*>(&module) != nullptr) {
      call = "torch.sigmoid(x)";
    } else if (dynamic_cast<torch::nn::TanhImpl*>(&module) != nullptr) {
      call = "torch.tanh(x)";
    } else {
      return false;
    }
    const auto input = quantized_;
    if (input) {
      emit("x = x.dequantize()");
      quantized_ = c10::nullopt;
    }
    emit("x = " + call);
    return true;
  }

  torch::jit::Module module_;
  std::string body_;
  c10::optional<QParams> quantized_;  // the qparams of `x` at this point, when quantized
  std::vector<LayerInfo> layers_;
};

at::QEngine engine_of(const std::string& backend) {
  std::vector<std::string> names;
  for (const auto engine : at::globalContext().supportedQEngines()) {
    std::string name = c10::toString(engine);
    for (auto& c : name) {
      c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    if (name == backend) {
      return engine;
    }
    names.push_back(name);
  }
  throw std::invalid_argument(fmt::format(
      "qat::convert: backend '{}' is not a quantized engine of this LibTorch (supported: {})",
      backend, fmt::join(names, ", ")));
}

// FakeQuantize modules that never observed data still hold their initial qparams (scale 1),
// which would make an integer model of garbage.
void check_calibrated(torch::nn::Module& prepared) {
  std::vector<std::string> unobserved;
  for (const auto& item : prepared.named_modules()) {
    if (auto* fq = dynamic_cast<FakeQuantizeImpl*>(item.value().get())) {
      if (!fq->has_fixed_qparams() && !torch::isfinite(fq->observer->min_val).any().item<bool>()) {
        unobserved.push_back(item.key());
      }
    }
  }
  if (unobserved.empty()) {
    return;
  }
  const size_t shown = std::min<size_t>(unobserved.size(), 5);
  throw std::invalid_argument(fmt::format(
      "qat::convert: {} FakeQuantize modules never observed data, so their qparams are still "
      "the initial ones ({}{}); calibrate the model (qat::calibrate) or train it before "
      "converting",
      unobserved.size(),
      fmt::join(unobserved.begin(), unobserved.begin() + static_cast<std::ptrdiff_t>(shown), ", "),
      unobserved.size() > shown ? ", ..." : ""));
}

// NaN or inf in a weight, bias, batch norm statistic or qparam (a diverged training run, a
// corrupt checkpoint) would become garbage integers or NaN scales inside the kernels; the
// tensors are named here instead. The observers' ranges are left out: they start at +-inf
// and are not part of the integer model.
void check_finite(torch::nn::Module& prepared) {
  std::vector<std::string> found;
  auto check = [&](const std::string& name, const torch::Tensor& tensor) {
    if (!tensor.defined() || !tensor.is_floating_point()) {
      return;  // integer tensors (zero points, counters) are finite
    }
    const auto values = tensor.detach();
    if (torch::isfinite(values).all().item<bool>()) {
      return;  // one pass over the tensor where all is well, the usual case
    }
    const bool nan = torch::isnan(values).any().item<bool>();
    const bool inf = torch::isinf(values).any().item<bool>();
    const char* kind = nan && inf ? "NaN and inf" : (nan ? "NaN" : "inf");
    found.push_back(fmt::format("{} ({})", name, kind));
  };
  for (const auto& module : prepared.named_modules()) {
    if (dynamic_cast<ObserverImpl*>(module.value().get()) != nullptr) {
      continue;
    }
    for (const auto& item : module.value()->named_parameters(/*recurse=*/false)) {
      check(path(module.key(), item.key()), item.value());
    }
    for (const auto& item : module.value()->named_buffers(/*recurse=*/false)) {
      check(path(module.key(), item.key()), item.value());
    }
  }
  if (found.empty()) {
    return;
  }
  const size_t shown = std::min<size_t>(found.size(), 5);
  throw std::invalid_argument(fmt::format(
      "qat::convert: non-finite values in {}{}; the model cannot be converted (did the training "
      "diverge, or was a corrupt checkpoint loaded?)",
      fmt::join(found.begin(), found.begin() + static_cast<std::ptrdiff_t>(shown), ", "),
      found.size() > shown ? fmt::format(", ... ({} tensors in all)", found.size()) : ""));
}

}  // namespace

IntegerModel build_integer_model(torch::nn::Module& prepared, const std::string& backend) {
  at::globalContext().setQEngine(engine_of(backend));
  auto* root = dynamic_cast<torch::nn::SequentialImpl*>(&prepared);
  if (root == nullptr) {
    // A custom module's forward is C++ code the converter cannot read, so only a Sequential
    // chain says where each integer op's input and output quantizers are.
    throw std::invalid_argument(fmt::format(
        "qat::convert: expected a torch::nn::Sequential prepared by qat::prepare, got a {}: "
        "the C++ converter reads the data flow of Sequential chains only (a custom module's "
        "forward is compiled code); wrap the layers in a torch::nn::Sequential, or prepare "
        "and convert the model in Python and train it from C++ as a scripted model "
        "(examples/cpp/train_scripted.cpp)",
        prepared.name()));
  }
  if (fake_quantizers(prepared).empty()) {
    throw std::invalid_argument(
        "qat::convert: the model holds no qat::FakeQuantize; prepare it with qat::prepare "
        "(and train or calibrate it) first");
  }
  check_calibrated(prepared);
  check_finite(prepared);
  return Converter().run(*root);
}

torch::Tensor cpu_example(const torch::Tensor& example_input, const char* caller) {
  if (!example_input.defined()) {
    throw std::invalid_argument(fmt::format(
        "{}: example_input is undefined (a default-constructed torch::Tensor); give an input "
        "of the model to check the integer model on",
        caller));
  }
  return example_input.to(torch::kCPU);
}

c10::IValue run_example(
    torch::jit::Module& module, const torch::Tensor& input, const char* caller) {
  try {
    torch::NoGradGuard no_grad;
    // On a copy: the first forward fills each layer's packed_params attribute, which the
    // module (and a file saved from it) would otherwise carry as a second, unpacked copy of
    // every weight.
    return module.deepcopy().forward({input});
  } catch (const std::exception& error) {
    throw std::invalid_argument(fmt::format(
        "{}: the example input does not fit the model: {}", caller, error_cause(error)));
  }
}

std::string error_cause(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  const std::string message =
      c10_error != nullptr ? c10_error->what_without_backtrace() : error.what();
  // The TorchScript interpreter puts its traceback (source lines, indented) first and the
  // error after it, prefixed with class names ("RuntimeError: AssertionError: ...").
  static const std::regex class_names(R"(^(\w+(Error|Exception): )+)");
  const bool traceback = message.rfind("The following operation failed", 0) == 0;
  std::vector<std::string> lines;
  std::istringstream stream(message);
  for (std::string line; std::getline(stream, line);) {
    if (!line.empty()) {
      lines.push_back(line);
    }
  }
  size_t at = lines.size();
  for (size_t i = 0; i < lines.size(); ++i) {
    if (!traceback || std::regex_search(lines[i], class_names)) {
      at = i;
      if (!traceback) {
        break;
      }
    }
  }
  if (at == lines.size()) {
    return "(no message)";
  }
  std::string cause = std::regex_replace(lines[at], class_names, "");
  // Newer PyTorch names the op on a line of its own ("mm:") and says what failed below it.
  if (!cause.empty() && cause.back() == ':' && at + 1 < lines.size()) {
    const auto next = lines[at + 1].find_first_not_of(' ');
    cause += " " + lines[at + 1].substr(next == std::string::npos ? 0 : next);
  }
  return cause.empty() ? "(no message)" : cause;
}

}  // namespace detail

torch::jit::Module convert(
    torch::nn::Module& prepared, const torch::Tensor& example_input, const ExportOptions& options) {
  const auto input = detail::cpu_example(example_input, "qat::convert");
  auto model = detail::build_integer_model(prepared, options.backend);
  detail::run_example(model.module, input, "qat::convert");
  return model.module;
}

}  // namespace qat
