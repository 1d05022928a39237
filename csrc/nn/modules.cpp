// The observer, qat::FakeQuantize and the QAT layers of the C++ front end. Their numerics
// are the registered operators (called through the dispatcher), shared with Python and
// TorchScript.

#include <qat/estimator.h>
#include <qat/fake_quantize.h>
#include <qat/lowering.h>
#include <qat/nn.h>
#include <qat/observers.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/enum.h>
#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/utils.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>

namespace qat {

namespace {

// The averaging constant the range operators take: set for a moving average, else none
// (MinMax).
c10::optional<double> averaging_constant(const QuantSpec& spec) {
  return spec.observer() == "moving_average" ? c10::optional<double>(spec.averaging_constant())
                                             : c10::nullopt;
}

constexpr double kInf = std::numeric_limits<double>::infinity();
// The signatures of the kernels registered in csrc/observers/, which typed()
// checks against the registration.
using FusedObserveFakeQuantizeFn = at::Tensor(
    const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t,
    c10::optional<int64_t>, c10::optional<double>, bool, bool, bool, c10::string_view,
    const c10::optional<at::Tensor>&, bool, bool);
using ObserveFakeQuantizeReluFn = at::Tensor(
    const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t,
    c10::optional<double>, bool, bool, bool, const c10::optional<at::Tensor>&, bool);
using FakeQuantizedLinearFn = at::Tensor(
    const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
    int64_t, int64_t, c10::optional<double>, bool, bool, bool, c10::string_view,
    const c10::optional<at::Tensor>&);
using FakeQuantizeFoldedFn = at::Tensor(
    const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
    int64_t, int64_t, c10::optional<double>, bool, bool, bool, c10::string_view,
    const c10::optional<at::Tensor>&, bool);

// The registered operator `name`, checked against the signature Fn.
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void check_observer_name(const char* module, const QuantSpec& spec) {
  const auto& runnable = QuantSpec::module_observers();
  if (std::find(runnable.begin(), runnable.end(), spec.observer()) == runnable.end()) {
    throw std::invalid_argument(fmt::format(
        "{}: the '{}' observer is not available in C++ yet; the C++ modules run {} (calibrate "
        "the histogram observers in Python)",
        module, spec.observer(), fmt::join(runnable, ", ")));
  }
}

// The state shape before the first batch: one element per tensor, or empty per channel
// (the channel count comes with the first batch).
std::vector<int64_t> initial_shape(const QuantSpec& spec) {
  return {spec.per_channel() ? 0 : 1};
}

// Sizes a per-channel state tensor on first use (set_data keeps the tensor object that
// optimizers and the registered buffer share); afterwards checks the channel count.
void size_channels(
    const char* module, const char* name, torch::Tensor& tensor, int64_t channels, double fill) {
  if (tensor.numel() == channels && tensor.dim() == 1) {
    return;
  }
  if (tensor.numel() != 0) {
    throw std::invalid_argument(fmt::format(
        "{}: the input has {} channels, but the observed state ('{}') has {}", module, channels,
        name, tensor.numel()));
  }
  torch::NoGradGuard no_grad;
  tensor.set_data(torch::full({channels}, fill, tensor.options()));
}

// Per-channel specs of a weight are forced to the output-channel axis (0; a transposed
// conv's 1): the integer kernels keep one scale per output channel, whatever axis a shared
// spec names.
QuantSpec weight_spec_for(QuantSpec spec, int64_t axis = 0) {
  if (spec.per_channel() && spec.axis() != axis) {
    spec.axis(axis);
  }
  return spec;
}

std::string format_values(const torch::Tensor& t) {
  const auto values = t.detach().reshape({-1}).to(torch::kCPU, torch::kDouble).contiguous();
  const double* data = values.data_ptr<double>();
  if (values.numel() == 1) {
    return fmt::format("{:.6g}", data[0]);
  }
  std::string shown;
  for (int64_t i = 0; i < std::min<int64_t>(values.numel(), 4); ++i) {
    shown += fmt::format("{}{:.6g}", i == 0 ? "" : ", ", data[i]);
  }
  return values.numel() > 4 ? fmt::format("[{}, ...] ({})", shown, values.numel())
                            : fmt::format("[{}]", shown);
}

// torch::nn::Linear's and Conv2d's initialization: kaiming-uniform weight, bias uniform
// in +-1/sqrt(fan_in).
void init_like_torch(torch::Tensor& weight, torch::Tensor& bias) {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = 1.0 / std::sqrt(static_cast<double>(std::get<0>(fans)));
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

template <typename Options>
void check_padding_mode(const std::string& module, const Options& options) {
  const auto mode = torch::enumtype::get_enum_name(options.padding_mode());
  if (mode != "kZeros") {
    throw std::invalid_argument(fmt::format(
        "{}: padding_mode {} is not supported (PyTorch's quantized conv pads with zeros)", module,
        mode));
  }
}

// A float conv keeps its options as the internal ConvNdOptions<D>; the QAT convs take the
// public ConvOptions<D> / ConvTransposeOptions<D> (whose padding holds sizes only: a
// transposed conv has no "same").
template <typename Options, size_t D>
Options public_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  Options options(o.in_channels(), o.out_channels(), o.kernel_size());
  options.stride(o.stride())
      .dilation(o.dilation())
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
  if constexpr (std::is_same_v<Options, torch::nn::ConvOptions<D>>) {
    options.padding(o.padding());
  } else {
    options.output_padding(o.output_padding());
    visit(
        [&](const auto& value) {
          if constexpr (std::is_same_v<std::decay_t<decltype(value)>, torch::ExpandingArray<D>>) {
            options.padding(value);
          }
        },
        o.padding());
  }
  return options;
}

template <size_t D>
torch::Tensor conv(
    const torch::nn::ConvOptions<D>& options, const torch::Tensor& input,
    const torch::Tensor& weight, const torch::Tensor& bias) {
  namespace F = torch::nn::functional;
  const auto func_options = F::ConvFuncOptions<D>()
                                .bias(bias)
                                .stride(options.stride())
                                .padding(options.padding())
                                .dilation(options.dilation())
                                .groups(options.groups());
  if constexpr (D == 1) {
    return F::conv1d(input, weight, func_options);
  } else if constexpr (D == 2) {
    return F::conv2d(input, weight, func_options);
  } else {
    return F::conv3d(input, weight, func_options);
  }
}

template <size_t D>
torch::Tensor conv(
    const torch::nn::ConvTransposeOptions<D>& options, const torch::Tensor& input,
    const torch::Tensor& weight, const torch::Tensor& bias) {
  namespace F = torch::nn::functional;
  const auto func_options = F::ConvTransposeFuncOptions<D>()
                                .bias(bias)
                                .stride(options.stride())
                                .padding(options.padding())
                                .output_padding(options.output_padding())
                                .groups(options.groups())
                                .dilation(options.dilation());
  if constexpr (D == 1) {
    return F::conv_transpose1d(input, weight, func_options);
  } else {
    return F::conv_transpose2d(input, weight, func_options);
  }
}

// The weight of a conv with `options`: out_channels x in_channels / groups x kernel (a
// transposed conv's: in_channels x out_channels / groups x kernel).
template <typename Options>
std::vector<int64_t> conv_weight_shape(const Options& options, bool transposed) {
  auto shape =
      transposed
          ? std::vector<int64_t>{options.in_channels(), options.out_channels() / options.groups()}
          : std::vector<int64_t>{options.out_channels(), options.in_channels() / options.groups()};
  for (const auto size : *options.kernel_size()) {
    shape.push_back(size);
  }
  return shape;
}

// "qat::Conv2d", "qat::ConvBn1d", ...: the module's class as users spell it.
template <size_t D>
std::string conv_name(const char* kind) {
  return fmt::format("qat::{}{}d", kind, D);
}

template <typename Options>
std::string conv_geometry(const Options& options) {
  return fmt::format(
      "{}, {}, kernel_size=[{}], stride=[{}], groups={}, bias={}", options.in_channels(),
      options.out_channels(), fmt::join(*options.kernel_size(), ", "),
      fmt::join(*options.stride(), ", "), options.groups(), options.bias());
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Observer

ObserverImpl::ObserverImpl(QuantSpec spec) : spec_(std::move(spec)) {
  check_observer_name("qat::Observer", spec_);
  reset();
}

void ObserverImpl::reset() {
  const auto shape = initial_shape(spec_);
  min_val = register_buffer("min_val", torch::full(shape, kInf));
  max_val = register_buffer("max_val", torch::full(shape, -kInf));
  nonfinite_count = register_buffer("nonfinite_count", torch::zeros({1}, torch::kLong));
}

void ObserverImpl::ensure_channels(int64_t channels) {
  size_channels("qat::Observer", "min_val", min_val, channels, kInf);
  size_channels("qat::Observer", "max_val", max_val, channels, -kInf);
}

torch::Tensor ObserverImpl::forward(const torch::Tensor& input) {
  if (input.numel() == 0) {
    return input;
  }
  c10::optional<int64_t> axis;
  if (spec_.per_channel()) {
    axis = spec_.axis() < 0 ? spec_.axis() + input.dim() : spec_.axis();
    TORCH_CHECK(
        input.dim() > 0 && *axis >= 0 && *axis < input.dim(), "qat::Observer: channel axis ",
        spec_.axis(), " is out of range for an input of shape ", input.sizes());
    ensure_channels(input.size(*axis));
  }
  torch::NoGradGuard no_grad;
  const auto batch = qat::aminmax(input.detach(), axis);
  nonfinite_count.add_(std::get<2>(batch).sum().reshape({1}).to(nonfinite_count.device()));
  qat::merge_range(
      min_val, max_val, std::get<0>(batch), std::get<1>(batch), averaging_constant(spec_));
  return input;
}

std::pair<torch::Tensor, torch::Tensor> ObserverImpl::calculate_qparams() const {
  const auto qparams = qat::choose_qparams(
      min_val, max_val, spec_.quant_min(), spec_.quant_max(), spec_.symmetric());
  return {std::get<0>(qparams), std::get<1>(qparams)};
}

void ObserverImpl::to(torch::Device device, torch::Dtype /*dtype*/, bool non_blocking) {
  to(device, non_blocking);
}

void ObserverImpl::to(torch::Dtype /*dtype*/, bool /*non_blocking*/) {
  // The range stays float32 and the count int64, whatever dtype the model moves to.
}

void ObserverImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
}

void ObserverImpl::pretty_print(std::ostream& stream) const {
  const auto qparams = calculate_qparams();
  stream << fmt::format(
      "qat::Observer({}, min={}, max={}, scale={}, zero_point={}, nonfinite_count={})",
      spec_.to_string(), format_values(min_val), format_values(max_val),
      format_values(qparams.first), format_values(qparams.second),
      nonfinite_count.sum().item<int64_t>());
}

// ---------------------------------------------------------------------------------------
// FakeQuantize

FakeQuantizeImpl::FakeQuantizeImpl(QuantSpec spec)
    : spec_(std::move(spec)),
      quant_min_(spec_.quant_min()),
      quant_max_(spec_.quant_max()),
      learns_scale_(EstimatorRegistry::global().info(spec_.estimator()).learns_scale),
      learns_zero_point_(EstimatorRegistry::global().info(spec_.estimator()).learns_zero_point) {
  check_observer_name("qat::FakeQuantize", spec_);
  reset();
}

FakeQuantizeImpl::FakeQuantizeImpl(QuantSpec spec, double lo, double hi, bool inclusive)
    : FakeQuantizeImpl(std::move(spec)) {
  if (learns_scale_ || learns_zero_point_ || spec_.per_channel()) {
    throw std::invalid_argument(fmt::format(
        "qat::FakeQuantize: fixed qparams need a per-tensor spec with an estimator that learns "
        "nothing, got per_channel={}, estimator='{}'",
        spec_.per_channel(), spec_.estimator()));
  }
  try {
    const auto qparams = qat::fixed_qparams(lo, hi, quant_min_, quant_max_, inclusive);
    fixed_range_ = std::make_pair(std::get<0>(qparams), std::get<1>(qparams));
  } catch (const c10::Error& error) {
    throw std::invalid_argument(error.what_without_backtrace());
  }
  // The delegated constructor's reset() ran before the range was known.
  fix_qparams();
}

void FakeQuantizeImpl::fix_qparams() {
  scale.fill_(fixed_range_->first);
  zero_point.fill_(fixed_range_->second);
  observer_enabled.fill_(0);
}

void FakeQuantizeImpl::reset() {
  const auto shape = initial_shape(spec_);
  scale = learns_scale_ ? register_parameter("scale", torch::ones(shape))
                        : register_buffer("scale", torch::ones(shape));
  zero_point = learns_zero_point_ ? register_parameter("zero_point", torch::zeros(shape))
                                  : register_buffer("zero_point", torch::zeros(shape, torch::kInt));
  observer_enabled = register_buffer("observer_enabled", torch::ones({1}, torch::kUInt8));
  fake_quant_enabled = register_buffer("fake_quant_enabled", torch::ones({1}, torch::kUInt8));
  observer = register_module("observer", Observer(spec_));
  if (fixed_range_) {
    fix_qparams();
  }
}

void FakeQuantizeImpl::enable_observer(bool enabled) {
  observer_enabled.fill_(enabled && !fixed_range_ ? 1 : 0);
}

void FakeQuantizeImpl::enable_fake_quant(bool enabled) {
  fake_quant_enabled.fill_(enabled ? 1 : 0);
}

bool FakeQuantizeImpl::is_observer_enabled() const {
  return observer_enabled.item<uint8_t>() != 0;
}

bool FakeQuantizeImpl::is_fake_quant_enabled() const {
  return fake_quant_enabled.item<uint8_t>() != 0;
}

c10::optional<int64_t> FakeQuantizeImpl::channel_axis(const torch::Tensor& input) const {
  if (!spec_.per_channel()) {
    return c10::nullopt;
  }
  const int64_t dim = input.dim();
  if (dim == 0 || spec_.axis() < -dim || spec_.axis() >= dim) {
    throw std::invalid_argument(fmt::format(
        "qat::FakeQuantize: channel axis {} is out of range for an input with {} dimensions",
        spec_.axis(), dim));
  }
  return spec_.axis() < 0 ? spec_.axis() + dim : spec_.axis();
}

void FakeQuantizeImpl::ensure_channels(int64_t channels) {
  observer->ensure_channels(channels);
  size_channels("qat::FakeQuantize", "scale", scale, channels, 1.0);
  size_channels("qat::FakeQuantize", "zero_point", zero_point, channels, 0.0);
}

void FakeQuantizeImpl::update_qparams() {
  if (fixed_range_) {
    return;
  }
  const auto qparams = observer->calculate_qparams();
  torch::NoGradGuard no_grad;
  scale.copy_(qparams.first);
  zero_point.copy_(qparams.second);
}

bool FakeQuantizeImpl::can_take_relu() const {
  return !fixed_range_ && takes_relu(spec_);
}

torch::Tensor FakeQuantizeImpl::forward(const torch::Tensor& given) {
  bool observe = is_observer_enabled();
  const bool quantize = is_fake_quant_enabled();
  if (relu_input && can_take_relu()) {
    static auto op = typed_op<ObserveFakeQuantizeReluFn>("qat::observe_fake_quantize_relu");
    return op.call(
        given, observer->min_val, observer->max_val, scale, zero_point, quant_min_, quant_max_,
        averaging_constant(spec_), spec_.symmetric(), observe, quantize, observer->nonfinite_count,
        true);
  }
  const auto input = relu_input ? torch::relu(given) : given;
  if (!observe && !quantize) {
    return input;
  }
  const auto axis = channel_axis(input);
  if (observe) {
    if (axis.has_value()) {
      ensure_channels(input.size(*axis));
    }
    if (learns_scale_ || learns_zero_point_) {
      // Learned qparams are parameters, which the fused operator must not overwrite: the
      // observer runs on its own and initializes them, then hands over to the optimizer.
      observer->forward(input);
      update_qparams();
      if (quantize && input.numel() > 0) {
        disable_observer();
      }
      observe = false;
    }
  }
  // The rest of the state machine (observe, clamp a learned scale, refuse a scale never
  // observed, fake-quantize) is the operator's, which Python's FakeQuantize calls too.
  static auto op = typed_op<FusedObserveFakeQuantizeFn>("qat::fused_observe_fake_quantize");
  return op.call(
      input, observer->min_val, observer->max_val, scale, zero_point, quant_min_, quant_max_, axis,
      averaging_constant(spec_), spec_.symmetric(), observe, quantize, spec_.estimator(),
      observer->nonfinite_count, learns_scale_, !fixed_range_);
}

torch::Tensor FakeQuantizeImpl::forward_folded(
    const torch::Tensor& weight, const torch::Tensor& factor) {
  const bool observe = is_observer_enabled();
  const bool quantize = is_fake_quant_enabled();
  const bool learns = learns_scale_ || learns_zero_point_;
  // The operator quantizes weight * f without building it, per output channel; other
  // specs (and a learned qparam still being initialized) take the plain route.
  const bool folds = spec_.per_channel() && spec_.axis() == 0 && (!learns || !observe);
  if (!folds) {
    std::vector<int64_t> shape(weight.dim(), 1);
    shape[0] = -1;
    const auto f = factor.reshape(shape);
    return forward(weight * f) / f;
  }
  if (observe) {
    ensure_channels(weight.size(0));
  }
  static auto op = typed_op<FakeQuantizeFoldedFn>("qat::fake_quantize_folded");
  return op.call(
      weight, factor, observer->min_val, observer->max_val, scale, zero_point, quant_min_,
      quant_max_, averaging_constant(spec_), spec_.symmetric(), observe, quantize,
      spec_.estimator(), observer->nonfinite_count, learns_scale_);
}

torch::Tensor FakeQuantizeImpl::linear(const torch::Tensor& input, const torch::Tensor& weight) {
  const bool blocks = spec_.per_channel() && spec_.axis() == 0 && !fixed_range_ && !learns_scale_ &&
                      !learns_zero_point_;
  if (!blocks) {
    return torch::nn::functional::linear(input, forward(weight));
  }
  const bool observe = is_observer_enabled();
  if (observe) {
    ensure_channels(weight.size(0));
  }
  static auto op = typed_op<FakeQuantizedLinearFn>("qat::fake_quantized_linear");
  return op.call(
      input, weight, observer->min_val, observer->max_val, scale, zero_point, quant_min_,
      quant_max_, averaging_constant(spec_), spec_.symmetric(), observe, is_fake_quant_enabled(),
      spec_.estimator(), observer->nonfinite_count);
}

void FakeQuantizeImpl::to(torch::Device device, torch::Dtype /*dtype*/, bool non_blocking) {
  to(device, non_blocking);
}

void FakeQuantizeImpl::to(torch::Dtype /*dtype*/, bool /*non_blocking*/) {
  // The operators want float32 scales and int32 zero points, whatever the model's dtype.
}

void FakeQuantizeImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
}

void FakeQuantizeImpl::pretty_print(std::ostream& stream) const {
  stream << fmt::format(
      "qat::FakeQuantize({}, scale={}, zero_point={}, observer_enabled={}, "
      "fake_quant_enabled={})",
      spec_.to_string(), format_values(scale), format_values(zero_point),
      is_observer_enabled() ? 1 : 0, is_fake_quant_enabled() ? 1 : 0);
}

// ---------------------------------------------------------------------------------------
// InputQuantized

void InputQuantized::set_input_quantizer(FakeQuantize input) {
  if (input && !has_integer_kernel()) {
    throw std::invalid_argument(
        "set_input_quantizer: this layer has no integer kernel (a grouped transposed conv: float "
        "in the integer model), so its bias is not rounded to an input scale's grid");
  }
  input_quantizer_ = std::move(input);
}

void InputQuantized::set_output_quantizer(FakeQuantize output) {
  output_quantizer_ = std::move(output);
}

void InputQuantized::hand_relu_to(FakeQuantize output) {
  if (!output || !output->can_take_relu()) {
    throw std::invalid_argument(
        "qat: hand_relu_to(output): output must be a per-tensor FakeQuantize of the 'ste' "
        "estimator whose observer chooses its qparams");
  }
  output->relu_input = true;
  relu_handed_over_ = true;
}

bool InputQuantized::computes_as_kernel(bool training, FakeQuantizeImpl& weight_fq) const {
  return !training && input_quantizer_ && output_quantizer_ && weight_fq.is_fake_quant_enabled() &&
         input_quantizer_->is_fake_quant_enabled() && output_quantizer_->is_fake_quant_enabled() &&
         !output_quantizer_->is_observer_enabled();
}

std::tuple<torch::Tensor, torch::Tensor> InputQuantized::integer_operands(
    const torch::Tensor& input, const torch::Tensor& weight, FakeQuantizeImpl& weight_fq,
    int64_t axis, const torch::Tensor& factor) const {
  return qat::integer_operands(
      input, input_quantizer_->scale, weight, weight_fq.scale, axis,
      factor.defined() ? c10::optional<torch::Tensor>(factor) : c10::nullopt);
}

torch::Tensor InputQuantized::kernel_output(
    const torch::Tensor& acc, const torch::Tensor& bias, FakeQuantizeImpl& weight_fq,
    int64_t axis) const {
  return qat::requantize(
      acc, bias.defined() ? c10::optional<torch::Tensor>(bias) : c10::nullopt,
      input_quantizer_->scale, weight_fq.scale, output_quantizer_->scale, axis);
}

torch::Tensor InputQuantized::kernel_bias(
    const torch::Tensor& bias, FakeQuantizeImpl& weight_fq) const {
  if (!bias.defined() || !input_quantizer_ || !weight_fq.is_fake_quant_enabled()) {
    return bias;
  }
  return qat::round_bias(bias, input_quantizer_->scale, weight_fq.scale);
}

// ---------------------------------------------------------------------------------------
// Linear

LinearImpl::LinearImpl(
    torch::nn::LinearOptions linear_options, QuantSpec weight_spec, bool fuse_relu)
    : options(std::move(linear_options)),
      relu(fuse_relu),
      weight_spec_(weight_spec_for(std::move(weight_spec))) {
  reset();
}

LinearImpl::LinearImpl(
    const std::shared_ptr<torch::nn::LinearImpl>& linear, QuantSpec weight_spec, bool fuse_relu)
    : LinearImpl(linear->options, std::move(weight_spec), fuse_relu) {
  // Share the float module's parameters (the fresh ones reset() made are dropped).
  weight = parameters_["weight"] = linear->weight;
  if (bias.defined()) {
    bias = parameters_["bias"] = linear->bias;
  }
}

void LinearImpl::reset() {
  weight =
      register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  bias = options.bias() ? register_parameter("bias", torch::empty({options.out_features()}))
                        : register_parameter("bias", {}, /*requires_grad=*/false);
  init_like_torch(weight, bias);
  weight_fake_quant = register_module("weight_fake_quant", FakeQuantize(weight_spec_));
}

torch::Tensor LinearImpl::forward(const torch::Tensor& input) {
  if (computes_as_kernel(is_training(), *weight_fake_quant)) {
    const auto [x, w] = integer_operands(input, weight_fake_quant(weight), *weight_fake_quant);
    const auto output = kernel_output(torch::linear(x, w), bias, *weight_fake_quant, -1);
    return applies_relu(relu) ? torch::relu(output) : output;
  }
  // The weight first: its per-channel scale, which the bias grid needs, is sized by it.
  auto output = weight_fake_quant->linear(input, weight);
  const auto added = kernel_bias(bias, *weight_fake_quant);
  if (added.defined()) {
    output = output + added;
  }
  return applies_relu(relu) ? torch::relu(output) : output;
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << fmt::format(
      "qat::Linear(in_features={}, out_features={}, bias={}, relu={})", options.in_features(),
      options.out_features(), options.bias(), relu);
}

// ---------------------------------------------------------------------------------------
// Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d

template <size_t D, bool Transposed, typename Derived>
ConvImpl<D, Transposed, Derived>::ConvImpl(
    Options conv_options, QuantSpec weight_spec, bool fuse_relu)
    : options(std::move(conv_options)),
      relu(fuse_relu),
      weight_spec_(weight_spec_for(std::move(weight_spec), Transposed ? 1 : 0)) {
  const auto name = conv_name<D>(Transposed ? "ConvTranspose" : "Conv");
  check_padding_mode(name, options);
  reset();
}

template <size_t D, bool Transposed, typename Derived>
ConvImpl<D, Transposed, Derived>::ConvImpl(
    const std::shared_ptr<FloatConv>& conv, QuantSpec weight_spec, bool fuse_relu)
    : ConvImpl(public_options<Options>(conv->options), std::move(weight_spec), fuse_relu) {
  weight = this->parameters_["weight"] = conv->weight;
  if (bias.defined()) {
    bias = this->parameters_["bias"] = conv->bias;
  }
}

template <size_t D, bool Transposed, typename Derived>
void ConvImpl<D, Transposed, Derived>::reset() {
  weight = this->register_parameter("weight", torch::empty(conv_weight_shape(options, Transposed)));
  bias = options.bias() ? this->register_parameter("bias", torch::empty({options.out_channels()}))
                        : this->register_parameter("bias", {}, /*requires_grad=*/false);
  init_like_torch(weight, bias);
  weight_fake_quant = this->register_module("weight_fake_quant", FakeQuantize(weight_spec_));
}

template <size_t D, bool Transposed, typename Derived>
torch::Tensor ConvImpl<D, Transposed, Derived>::forward(const torch::Tensor& input) {
  const auto quantized_weight = weight_fake_quant(weight);  // sizes the scale, as in Linear
  torch::Tensor output;
  if (computes_as_kernel(this->is_training(), *weight_fake_quant)) {
    const auto [x, w] =
        integer_operands(input, quantized_weight, *weight_fake_quant, Transposed ? 1 : 0);
    output = kernel_output(conv(options, x, w, torch::Tensor()), bias, *weight_fake_quant, 1);
  } else {
    output = conv(options, input, quantized_weight, kernel_bias(bias, *weight_fake_quant));
  }
  return applies_relu(relu) ? torch::relu(output) : output;
}

template <size_t D, bool Transposed, typename Derived>
void ConvImpl<D, Transposed, Derived>::pretty_print(std::ostream& stream) const {
  std::string output_padding;
  if constexpr (Transposed) {
    output_padding =
        fmt::format(", output_padding=[{}]", fmt::join(*options.output_padding(), ", "));
  }
  stream << fmt::format(
      "{}({}{}, relu={})", conv_name<D>(Transposed ? "ConvTranspose" : "Conv"),
      conv_geometry(options), output_padding, relu);
}

template class ConvImpl<1, false, Conv1dImpl>;
template class ConvImpl<2, false, Conv2dImpl>;
template class ConvImpl<3, false, Conv3dImpl>;
template class ConvImpl<1, true, ConvTranspose1dImpl>;
template class ConvImpl<2, true, ConvTranspose2dImpl>;

// ---------------------------------------------------------------------------------------
// ConvBn1d, ConvBn2d, ConvBn3d

template <size_t D, typename Derived>
ConvBnImpl<D, Derived>::ConvBnImpl(
    torch::nn::ConvOptions<D> conv_options, torch::nn::BatchNormOptions bn_options,
    QuantSpec weight_spec, bool fuse_relu)
    : options(std::move(conv_options)),
      relu(fuse_relu),
      bn_options_(std::move(bn_options)),
      weight_spec_(weight_spec_for(std::move(weight_spec))) {
  const auto name = conv_name<D>("ConvBn");
  check_padding_mode(name, options);
  if (bn_options_.num_features() != options.out_channels()) {
    throw std::invalid_argument(fmt::format(
        "{}: the batch norm has {} features but the conv {} output channels", name,
        bn_options_.num_features(), options.out_channels()));
  }
  if (!bn_options_.affine() || !bn_options_.track_running_stats()) {
    throw std::invalid_argument(fmt::format(
        "{}: the batch norm must be affine and track running statistics to be folded into the "
        "conv",
        name));
  }
  reset();
}

template <size_t D, typename Derived>
ConvBnImpl<D, Derived>::ConvBnImpl(
    const std::shared_ptr<FloatConv>& conv, const std::shared_ptr<FloatBatchNorm>& float_bn,
    QuantSpec weight_spec, bool fuse_relu)
    : ConvBnImpl(
          public_options<torch::nn::ConvOptions<D>>(conv->options), float_bn->options,
          std::move(weight_spec), fuse_relu) {
  weight = this->parameters_["weight"] = conv->weight;
  if (bias.defined()) {
    bias = this->parameters_["bias"] = conv->bias;
  }
  bn = this->replace_module("bn", typename detail::ConvTypes<D>::BatchNormHolder(float_bn));
  train(conv->is_training());
}

template <size_t D, typename Derived>
void ConvBnImpl<D, Derived>::reset() {
  weight = this->register_parameter("weight", torch::empty(conv_weight_shape(options, false)));
  bias = options.bias() ? this->register_parameter("bias", torch::empty({options.out_channels()}))
                        : this->register_parameter("bias", {}, /*requires_grad=*/false);
  init_like_torch(weight, bias);
  bn = this->register_module("bn", typename detail::ConvTypes<D>::BatchNormHolder(bn_options_));
  weight_fake_quant = this->register_module("weight_fake_quant", FakeQuantize(weight_spec_));
}

template <size_t D, typename Derived>
torch::Tensor ConvBnImpl<D, Derived>::forward(const torch::Tensor& input) {
  const auto factor = qat::batch_norm_factor(bn->weight, bn->running_var, bn->options.eps());
  // conv(x, fq(w * f)) / f per channel, as conv(x, fq(w * f) / f): the division lands on
  // the weight, not on the (usually larger) output. The conv bias is added after it: it
  // is not part of the folded weight's product.
  const auto folded = weight_fake_quant->forward_folded(weight, factor);
  torch::Tensor output;
  if (input_quantizer() && !bn->is_training() && weight_fake_quant->is_fake_quant_enabled()) {
    // With the running statistics the whole is the folded conv the integer model runs,
    // conv(x, fq(w * f)) + beta + f * (b - mean), whose bias the kernel rounds to its int32
    // grid: so is it here.
    const auto fused_bias = qat::fold_bias(bias, bn->bias, bn->running_mean, factor);
    std::vector<int64_t> shape(D + 2, 1);
    shape[1] = -1;
    if (computes_as_kernel(this->is_training(), *weight_fake_quant)) {
      // The kernel's weight is fq(w * f) (qat::convert), the folded weight times f.
      const auto [x, w] = integer_operands(input, folded, *weight_fake_quant, 0, factor);
      output =
          kernel_output(conv(options, x, w, torch::Tensor()), fused_bias, *weight_fake_quant, 1);
    } else {
      output = conv(options, input, folded, torch::Tensor()) * factor.reshape(shape) +
               kernel_bias(fused_bias, *weight_fake_quant).reshape(shape);
    }
  } else {
    output = bn(conv(options, input, folded, bias));
  }
  return applies_relu(relu) ? torch::relu(output) : output;
}

template <size_t D, typename Derived>
void ConvBnImpl<D, Derived>::train(bool on) {
  torch::nn::Module::train(on);
  bn->train(on && !freeze_bn_);
}

template <size_t D, typename Derived>
void ConvBnImpl<D, Derived>::freeze_bn_stats() {
  freeze_bn_ = true;
  bn->train(false);
}

template <size_t D, typename Derived>
void ConvBnImpl<D, Derived>::unfreeze_bn_stats() {
  freeze_bn_ = false;
  bn->train(this->is_training());
}

template <size_t D, typename Derived>
void ConvBnImpl<D, Derived>::pretty_print(std::ostream& stream) const {
  stream << fmt::format(
      "{}({}, relu={}, freeze_bn={})", conv_name<D>("ConvBn"), conv_geometry(options), relu,
      freeze_bn_);
}

template class ConvBnImpl<1, ConvBn1dImpl>;
template class ConvBnImpl<2, ConvBn2dImpl>;
template class ConvBnImpl<3, ConvBn3dImpl>;

// ---------------------------------------------------------------------------------------
// Embedding, EmbeddingBag

template <typename Options, typename Derived>
EmbeddingTableImpl<Options, Derived>::EmbeddingTableImpl(
    Options table_options, QuantSpec weight_spec)
    : options(std::move(table_options)), weight_spec_(weight_spec_for(std::move(weight_spec))) {
  const auto name = display_name();
  if (options.sparse()) {
    throw std::invalid_argument(fmt::format(
        "{}: sparse=true is not supported: a sparse gradient cannot flow back through the "
        "fake-quantized (dense) table; build the table with sparse(false)",
        name));
  }
  reset();
}

// With max_norm, torch::nn::functional renormalizes the looked-up rows in place in the table
// it is given, here the fake-quantized copy, where the change would be lost. So the float
// table's rows are renormalized first (without gradient, as torch::nn::Embedding does), then
// fake-quantized, as Python's qat.Embedding does. Returns the indices the lookup takes.
template <typename Options, typename Derived>
torch::Tensor EmbeddingTableImpl<Options, Derived>::renormalize(const torch::Tensor& input) {
  if (!options.max_norm()) {
    return input;
  }
  auto indices = input.contiguous();
  torch::NoGradGuard no_grad;
  torch::embedding_renorm_(weight, indices, *options.max_norm(), options.norm_type());
  return indices;
}

template <typename Options, typename Derived>
void EmbeddingTableImpl<Options, Derived>::reset() {
  weight = this->register_parameter(
      "weight", torch::empty({options.num_embeddings(), options.embedding_dim()}));
  {
    // torch::nn::Embedding's initialization: normal, the padding row zero.
    torch::NoGradGuard no_grad;
    torch::nn::init::normal_(weight);
    if (options.padding_idx()) {
      weight[*options.padding_idx()].fill_(0);
    }
  }
  weight_fake_quant = this->register_module("weight_fake_quant", FakeQuantize(weight_spec_));
}

template <typename Options, typename Derived>
void EmbeddingTableImpl<Options, Derived>::pretty_print(std::ostream& stream) const {
  stream << fmt::format(
      "{}(num_embeddings={}, embedding_dim={})", display_name(), options.num_embeddings(),
      options.embedding_dim());
}

template class EmbeddingTableImpl<torch::nn::EmbeddingOptions, EmbeddingImpl>;
template class EmbeddingTableImpl<torch::nn::EmbeddingBagOptions, EmbeddingBagImpl>;

EmbeddingImpl::EmbeddingImpl(
    const std::shared_ptr<torch::nn::EmbeddingImpl>& embedding, QuantSpec weight_spec)
    : EmbeddingTableImpl(embedding->options, std::move(weight_spec)) {
  weight = parameters_["weight"] = embedding->weight;
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& input) {
  namespace F = torch::nn::functional;
  auto lookup = F::EmbeddingFuncOptions().scale_grad_by_freq(options.scale_grad_by_freq());
  if (options.padding_idx()) {
    lookup.padding_idx(*options.padding_idx());
  }
  const auto indices = renormalize(input);
  return F::embedding(indices, weight_fake_quant(weight), lookup);
}

EmbeddingBagImpl::EmbeddingBagImpl(
    const std::shared_ptr<torch::nn::EmbeddingBagImpl>& bag, QuantSpec weight_spec)
    : EmbeddingTableImpl(bag->options, std::move(weight_spec)) {
  weight = parameters_["weight"] = bag->weight;
}

torch::Tensor EmbeddingBagImpl::forward(
    const torch::Tensor& input, const torch::Tensor& offsets,
    const torch::Tensor& per_sample_weights) {
  namespace F = torch::nn::functional;
  auto bags = F::EmbeddingBagFuncOptions()
                  .scale_grad_by_freq(options.scale_grad_by_freq())
                  .mode(options.mode())
                  .include_last_offset(options.include_last_offset())
                  .offsets(offsets)
                  .per_sample_weights(per_sample_weights);
  if (options.padding_idx()) {
    bags.padding_idx(*options.padding_idx());
  }
  const auto indices = renormalize(input);
  return F::embedding_bag(indices, weight_fake_quant(weight), bags);
}

}  // namespace qat
