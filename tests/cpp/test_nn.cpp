// The C++ front end's config and modules: validation messages, qat::FakeQuantize against
// a scalar reference, the QAT layers, and batch-norm folding against float conv + bn.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <set>
#include <stdexcept>
#include <string>

#include "helpers.h"

namespace {

using qat_test::invalid_argument_message;

// (clamp(round(x / s) + z, qmin, qmax) - z) * s per element, channel by channel along
// `axis` (or per tensor), in float32. x / s is taken as x * (1 / s) in float, as the
// kernels and PyTorch's quantize_per_tensor compute it.
torch::Tensor reference_fake_quantize(
    const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& zero_point,
    int64_t qmin, int64_t qmax, c10::optional<int64_t> axis) {
  const auto moved = axis.has_value() ? x.movedim(*axis, 0) : x.reshape({1, -1});
  const auto rows = moved.reshape({moved.size(0), -1}).to(torch::kFloat).contiguous();
  auto out = torch::empty_like(rows);
  const auto s = scale.to(torch::kFloat).contiguous();
  const auto z = zero_point.to(torch::kLong).contiguous();
  for (int64_t c = 0; c < rows.size(0); ++c) {
    const float sc = s.data_ptr<float>()[c];
    const float inv = 1.0f / sc;
    const auto zc = static_cast<float>(z.data_ptr<int64_t>()[c]);
    for (int64_t i = 0; i < rows.size(1); ++i) {
      const float v = rows.data_ptr<float>()[c * rows.size(1) + i];
      const float q = std::min<float>(
          static_cast<float>(qmax),
          std::max<float>(static_cast<float>(qmin), std::nearbyint(v * inv) + zc));
      out.data_ptr<float>()[c * rows.size(1) + i] = (q - zc) * sc;
    }
  }
  const auto shaped = out.reshape(moved.sizes());
  return axis.has_value() ? shaped.movedim(0, *axis) : shaped.reshape(x.sizes());
}

std::set<std::string> keys(const torch::OrderedDict<std::string, torch::Tensor>& dict) {
  std::set<std::string> out;
  for (const auto& item : dict) {
    out.insert(item.key());
  }
  return out;
}

// A float conv and batch norm in double (the norm's affine parameters and running
// statistics not the identity's), their clones, and qat's fold of the originals with fake
// quantization off: (float conv, float batch norm, fold), whose outputs must agree.
template <typename Fused, typename Conv, typename BatchNorm>
auto float_pair_and_fold(Conv conv, BatchNorm bn) {
  conv->to(torch::kDouble);
  bn->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.uniform_(-0.5, 0.5);
    bn->running_mean.uniform_(-0.5, 0.5);
    bn->running_var.uniform_(0.5, 2.0);
  }
  // The float twins: deep copies, run side by side.
  auto float_conv = std::dynamic_pointer_cast<typename Conv::ContainedType>(conv->clone());
  auto float_bn = std::dynamic_pointer_cast<typename BatchNorm::ContainedType>(bn->clone());
  Fused fused(conv.ptr(), bn.ptr(), qat::Config().weight());
  fused->to(torch::kDouble);
  qat::disable_fake_quant(*fused);
  return std::make_tuple(float_conv, float_bn, fused);
}

// The largest difference between the fold and the float pair on `batch`, all three in
// training or all in eval.
template <typename FloatConv, typename FloatBatchNorm, typename Fused>
double fold_gap(
    FloatConv& float_conv, FloatBatchNorm& float_bn, Fused& fused, const torch::Tensor& batch,
    bool training) {
  fused->train(training);
  float_conv->train(training);
  float_bn->train(training);
  const torch::Tensor gap = fused(batch) - float_bn->forward(float_conv->forward(batch));
  return gap.abs().max().item<double>();
}

}  // namespace

CATCH_TEST_CASE("QuantSpec and Config name the invalid field", "[nn][config]") {
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().bits(1);
              }) == "qat::QuantSpec: bits must be in [2, 16], got 1");
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().bits(17);
              }) == "qat::QuantSpec: bits must be in [2, 16], got 17");
  CATCH_CHECK(
      invalid_argument_message([] { qat::QuantSpec().observer("median"); }) ==
      "qat::QuantSpec: observer must be one of minmax, moving_average, percentile, mse, "
      "entropy; got 'median'");
  const auto estimator = invalid_argument_message([] { qat::QuantSpec().estimator("magic"); });
  CATCH_CHECK(estimator.find("qat::QuantSpec: estimator must be one of") == 0);
  CATCH_CHECK(estimator.find("lsq") != std::string::npos);
  CATCH_CHECK(estimator.find("got 'magic'") != std::string::npos);
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().averaging_constant(0.0);
              }) == "qat::QuantSpec: averaging_constant must be in (0, 1], got 0");
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().averaging_constant(std::nan(""));
              }).find("averaging_constant must be in (0, 1], got nan") != std::string::npos);
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().percentile(100.5);
              }) == "qat::QuantSpec: percentile must be in (0, 100], got 100.5");
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().bins(0);
              }) == "qat::QuantSpec: bins must be in 1..65536, got 0");
  CATCH_CHECK(invalid_argument_message([] {
                qat::QuantSpec().bins(int64_t{1} << 40);
              }) == "qat::QuantSpec: bins must be in 1..65536, got 1099511627776");
  CATCH_CHECK(invalid_argument_message([] {
                qat::Config().backend("tensorrt");
              }) == "qat::Config: backend must be one of qnnpack, fbgemm; got 'tensorrt'");
  CATCH_CHECK(invalid_argument_message([] {
                qat::Config().skip("");
              }) == "qat::Config::skip: a module name or pattern must not be empty");
  CATCH_CHECK(
      invalid_argument_message(
          [] { qat::Config().override_layer("fc", c10::nullopt, c10::nullopt); }) ==
      "qat::Config::override_layer: the override of 'fc' must set a weight or an activation "
      "spec, got neither");
  for (const auto& message :
       {invalid_argument_message([] { qat::QuantSpec().bits(1); }),
        invalid_argument_message([] { qat::Config().backend("x"); })}) {
    CATCH_CHECK(message.find('\n') == std::string::npos);
  }
}

CATCH_TEST_CASE("QuantSpec defaults, ranges and presets mirror Python", "[nn][config]") {
  const qat::QuantSpec spec;
  CATCH_CHECK(spec.bits() == 8);
  CATCH_CHECK_FALSE(spec.symmetric());
  CATCH_CHECK_FALSE(spec.is_signed());
  CATCH_CHECK(spec.observer() == "moving_average");
  CATCH_CHECK(spec.estimator() == "ste");
  CATCH_CHECK(spec.quant_min() == 0);
  CATCH_CHECK(spec.quant_max() == 255);
  const auto narrow = qat::QuantSpec().bits(8).symmetric(true).narrow_range(true);
  CATCH_CHECK(narrow.quant_min() == -127);
  CATCH_CHECK(narrow.quant_max() == 127);
  CATCH_CHECK(qat::QuantSpec().symmetric(true).signed_range(false).quant_min() == 0);

  const auto int8 = qat::presets::int8();
  CATCH_CHECK(int8.weight().per_channel());
  CATCH_CHECK(int8.weight().symmetric());
  CATCH_CHECK(int8.weight().observer() == "minmax");
  CATCH_CHECK(int8.activation().quant_max() == 255);
  CATCH_CHECK(int8.backend() == "qnnpack");
  const auto w4a8 = qat::presets::w4a8("fbgemm");
  CATCH_CHECK(w4a8.weight().bits() == 4);
  CATCH_CHECK(w4a8.weight().quant_min() == -8);
  CATCH_CHECK(w4a8.activation().bits() == 8);
  CATCH_CHECK(w4a8.backend() == "fbgemm");
  CATCH_CHECK(qat::presets::w4a4().activation().estimator() == "lsq");
}

CATCH_TEST_CASE("Config overrides: exact name over pattern, skip over overrides", "[nn][config]") {
  const auto four = qat::QuantSpec().bits(4).symmetric(true);
  const auto six = qat::QuantSpec().bits(6);
  const auto cfg = qat::Config()
                       .override_layer("features.*", four, c10::nullopt)
                       .override_layer("features.2", c10::nullopt, six)
                       .skip("head");
  CATCH_CHECK(cfg.spec_for("features.0")->weight == four);
  CATCH_CHECK(cfg.spec_for("features.0")->activation == cfg.activation());
  CATCH_CHECK(cfg.spec_for("features.2")->weight == cfg.weight());
  CATCH_CHECK(cfg.spec_for("features.2")->activation == six);
  CATCH_CHECK(cfg.spec_for("classifier")->weight == cfg.weight());
  CATCH_CHECK_FALSE(cfg.spec_for("head").has_value());
  CATCH_CHECK(cfg.is_skipped("head"));
}

CATCH_TEST_CASE(
    "qat::Linear's blocked matmul equals linear of the module's fake-quantized weight",
    "[nn][modules]") {
  // 600 x 1100: blocks of 238 output channels, so each thread hands over several; 8 input
  // rows take the blocked path of qat::fake_quantized_linear.
  torch::manual_seed(4);
  torch::nn::Linear linear(torch::nn::LinearOptions(1100, 600).bias(false));
  qat::Linear qlinear(linear.ptr(), qat::Config().weight());
  qat::FakeQuantize plain(qat::QuantSpec(qat::Config().weight()).axis(0));
  const auto weight = linear->weight.detach().clone().requires_grad_();
  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn({8, 1100}, torch::requires_grad());
    const auto x_ref = x.detach().clone().requires_grad_();
    const auto y = qlinear(x);
    CATCH_CHECK(y.grad_fn()->name().find("ComputedLinear") != std::string::npos);
    const auto expected = torch::nn::functional::linear(x_ref, plain(weight));
    CATCH_CHECK(torch::allclose(y, expected, 1e-5, 1e-5));
    const auto grad = torch::randn({8, 600});
    y.backward(grad);
    expected.backward(grad);
    CATCH_CHECK(torch::allclose(linear->weight.grad(), weight.grad(), 1e-5, 1e-5));
    CATCH_CHECK(torch::allclose(x.grad(), x_ref.grad(), 1e-5, 1e-5));
    CATCH_CHECK(torch::equal(qlinear->weight_fake_quant->scale, plain->scale));
    CATCH_CHECK(
        torch::equal(qlinear->weight_fake_quant->observer->max_val, plain->observer->max_val));
    torch::NoGradGuard no_grad;
    linear->weight.grad().zero_();
    weight.grad().zero_();
    // A training step moves the weight, and the observers' running range with it.
    linear->weight.mul_(1.1);
    weight.mul_(1.1);
  }
}

CATCH_TEST_CASE("FakeQuantize forward equals the reference formula", "[nn][fake_quantize]") {
  torch::manual_seed(0);
  CATCH_SECTION("per tensor, affine, minmax") {
    qat::FakeQuantize fq(qat::QuantSpec().observer("minmax"));
    const auto x = torch::randn({4, 3, 5}) * 2 + 0.5;
    const auto y = fq(x);
    // The qparams of [min(x, 0), max(x, 0)] on [0, 255], written out here.
    const double lo = std::min(0.0, x.min().item<double>());
    const double hi = std::max(0.0, x.max().item<double>());
    const double scale = static_cast<float>((hi - lo) / 255.0);
    CATCH_CHECK(fq->scale.item<float>() == Approx(scale).epsilon(1e-6));
    const auto zero_point = std::clamp<double>(-std::nearbyint(lo / scale), 0, 255);
    CATCH_CHECK(fq->zero_point.item<int>() == zero_point);
    CATCH_CHECK(torch::equal(y, reference_fake_quantize(x, fq->scale, fq->zero_point, 0, 255, {})));
    // Frozen qparams apply to the next input unchanged.
    fq->disable_observer();
    const auto x2 = torch::randn({7}) * 3;
    CATCH_CHECK(
        torch::equal(fq(x2), reference_fake_quantize(x2, fq->scale, fq->zero_point, 0, 255, {})));
  }
  CATCH_SECTION("per channel, symmetric signed, on axis 1") {
    qat::FakeQuantize fq(
        qat::QuantSpec().bits(4).symmetric(true).per_channel(true).axis(1).observer("minmax"));
    CATCH_CHECK(fq->scale.numel() == 0);
    const auto x = torch::randn({2, 6, 3});
    const auto y = fq(x);
    CATCH_REQUIRE(fq->scale.numel() == 6);
    const auto absmax = x.abs().amax({0, 2});
    for (int64_t c = 0; c < 6; ++c) {
      const double expected = static_cast<float>(absmax[c].item<double>() / 7.5);
      CATCH_CHECK(fq->scale[c].item<float>() == Approx(expected).epsilon(1e-6));
      CATCH_CHECK(fq->zero_point[c].item<int>() == 0);
    }
    CATCH_CHECK(torch::equal(y, reference_fake_quantize(x, fq->scale, fq->zero_point, -8, 7, 1)));
  }
  CATCH_SECTION("moving average of the batch ranges") {
    qat::FakeQuantize fq(qat::QuantSpec().averaging_constant(0.25));
    fq(torch::tensor({-1.0f, 3.0f}));
    fq(torch::tensor({-3.0f, 7.0f}));
    CATCH_CHECK(fq->observer->min_val.item<float>() == Approx(-1.5));
    CATCH_CHECK(fq->observer->max_val.item<float>() == Approx(4.0));
    CATCH_CHECK(fq->scale.item<float>() == Approx(5.5 / 255).epsilon(1e-6));
  }
  CATCH_SECTION("switches") {
    qat::FakeQuantize fq;
    const auto x = torch::randn({10});
    fq->disable_fake_quant();
    CATCH_CHECK(torch::equal(fq(x), x));
    CATCH_CHECK(fq->observer->max_val.item<float>() == x.max().item<float>());
    fq->disable_observer();
    const auto before = fq->observer->max_val.clone();
    CATCH_CHECK(torch::equal(fq(x * 10), x * 10));
    CATCH_CHECK(torch::equal(fq->observer->max_val, before));
  }
}

CATCH_TEST_CASE("FakeQuantize keeps the Python state names and dtypes", "[nn][fake_quantize]") {
  qat::FakeQuantize fq;
  CATCH_CHECK(
      keys(fq->named_buffers()) == std::set<std::string>{
                                       "scale", "zero_point", "observer_enabled",
                                       "fake_quant_enabled", "observer.min_val", "observer.max_val",
                                       "observer.nonfinite_count"});
  CATCH_CHECK(fq->named_parameters().is_empty());
  fq->to(torch::kDouble);
  CATCH_CHECK(fq->scale.scalar_type() == torch::kFloat);
  CATCH_CHECK(fq->zero_point.scalar_type() == torch::kInt);
  CATCH_CHECK(fq->observer->min_val.scalar_type() == torch::kFloat);
  // A float64 input is fake-quantized with the float32 qparams, in its own dtype.
  const auto y = fq(torch::randn({5}, torch::kDouble));
  CATCH_CHECK(y.scalar_type() == torch::kDouble);
  const auto x = torch::tensor({std::nan(""), 1.0, std::numeric_limits<double>::infinity()});
  fq(x.to(torch::kFloat));
  CATCH_CHECK(fq->observer->nonfinite_count.item<int64_t>() == 2);
  std::ostringstream printed;
  printed << *fq;
  CATCH_CHECK(printed.str().find("qat::FakeQuantize(bits=8, unsigned, affine") == 0);
}

CATCH_TEST_CASE(
    "learned step sizes start from the observer and are trained", "[nn][fake_quantize]") {
  qat::FakeQuantize fq(
      qat::QuantSpec().bits(4).symmetric(true).per_channel(true).observer("minmax").estimator(
          "lsq"));
  CATCH_CHECK(fq->learns_scale());
  const auto x = torch::randn({3, 8}).requires_grad_();
  const auto y = fq(x);
  CATCH_CHECK(keys(fq->named_parameters()) == std::set<std::string>{"scale"});
  CATCH_REQUIRE(fq->scale.numel() == 3);
  CATCH_CHECK_FALSE(fq->is_observer_enabled());
  const auto absmax = x.detach().abs().amax({1});
  for (int64_t c = 0; c < 3; ++c) {
    CATCH_CHECK(fq->scale[c].item<float>() == Approx(absmax[c].item<double>() / 7.5).epsilon(1e-6));
  }
  y.pow(2).sum().backward();
  CATCH_REQUIRE(fq->scale.grad().defined());
  CATCH_CHECK(fq->scale.grad().abs().sum().item<double>() > 0);
  // Two forwards, one backward (gradient accumulation): the clamp each forward applies to
  // the learned scale must not invalidate what the first forward saved.
  fq->scale.mutable_grad() = torch::Tensor();
  const auto twice = fq(x.detach()).sum() + fq(2 * x.detach()).sum();
  twice.backward();
  CATCH_CHECK(fq->scale.grad().defined());
}

CATCH_TEST_CASE("histogram observers are refused in C++ with the way out", "[nn][fake_quantize]") {
  const auto message =
      invalid_argument_message([] { qat::FakeQuantize(qat::QuantSpec().observer("mse")); });
  CATCH_CHECK(
      message ==
      "qat::FakeQuantize: the 'mse' observer is not available in C++ yet; the C++ modules run "
      "minmax, moving_average (calibrate the histogram observers in Python)");
}

CATCH_TEST_CASE("qat::Linear and Conv2d share the float parameters", "[nn][modules]") {
  torch::manual_seed(1);
  torch::nn::Linear linear(5, 3);
  qat::Linear qlinear(linear.ptr(), qat::Config().weight());
  CATCH_CHECK(qlinear->weight.is_same(linear->weight));
  CATCH_CHECK(qlinear->bias.is_same(linear->bias));
  CATCH_CHECK(keys(qlinear->named_parameters()) == std::set<std::string>{"weight", "bias"});
  const auto x = torch::randn({4, 5});
  qlinear->weight_fake_quant->disable_fake_quant();
  CATCH_CHECK(torch::allclose(qlinear(x), linear(x)));
  qlinear->weight_fake_quant->enable_fake_quant();
  const auto y = qlinear(x);
  CATCH_CHECK(qlinear->weight_fake_quant->scale.numel() == 3);  // per output feature
  const auto& wfq = qlinear->weight_fake_quant;
  const auto w = reference_fake_quantize(linear->weight, wfq->scale, wfq->zero_point, -128, 127, 0);
  CATCH_CHECK(torch::allclose(y, torch::nn::functional::linear(x, w, linear->bias)));

  // A per-channel spec on another axis is moved to the output channels.
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 4, 3).padding(1));
  qat::Conv2d qconv(conv.ptr(), qat::QuantSpec(qat::Config().weight()).axis(1), /*fuse_relu=*/true);
  CATCH_CHECK(qconv->weight_fake_quant->spec().axis() == 0);
  const auto image = torch::randn({1, 2, 5, 5});
  qconv->weight_fake_quant->disable_fake_quant();
  CATCH_CHECK(torch::allclose(qconv(image), torch::relu(conv(image))));

  CATCH_CHECK(
      invalid_argument_message(
          [] { qat::Conv2d(torch::nn::Conv2dOptions(1, 1, 3).padding_mode(torch::kReflect)); }) ==
      "qat::Conv2d: padding_mode kReflect is not supported (PyTorch's quantized conv pads with "
      "zeros)");
}

CATCH_TEST_CASE("ConvBn2d with fake quant off equals float conv + bn", "[nn][modules][bn]") {
  torch::manual_seed(2);
  for (const bool with_bias : {false, true}) {
    CATCH_INFO("conv bias " << with_bias);
    auto options = torch::nn::Conv2dOptions(3, 4, 3).stride(2).padding(1).bias(with_bias);
    torch::nn::Conv2d conv(options);
    torch::nn::BatchNorm2d bn(4);
    auto [float_conv, float_bn, fused] = float_pair_and_fold<qat::ConvBn2d>(conv, bn);
    const auto x = torch::randn({2, 3, 9, 9}, torch::kDouble);
    CATCH_CHECK(fold_gap(float_conv, float_bn, fused, x, /*training=*/false) < 1e-10);
    for (int step = 0; step < 3; ++step) {
      const auto batch = torch::randn({4, 3, 9, 9}, torch::kDouble);
      CATCH_CHECK(fold_gap(float_conv, float_bn, fused, batch, /*training=*/true) < 1e-5);
    }
    // Training updated the shared batch norm's running statistics as the float one's.
    CATCH_CHECK(torch::allclose(fused->bn->running_mean, float_bn->running_mean, 0, 1e-10));
    CATCH_CHECK(torch::allclose(fused->bn->running_var, float_bn->running_var, 0, 1e-10));
    CATCH_CHECK(fused->bn.ptr() == bn.ptr());

    fused->freeze_bn_stats();
    fused->train();
    CATCH_CHECK_FALSE(fused->bn->is_training());
    const auto frozen = fused->bn->running_mean.clone();
    fused(torch::randn({2, 3, 9, 9}, torch::kDouble));
    CATCH_CHECK(torch::equal(fused->bn->running_mean, frozen));
  }
}

CATCH_TEST_CASE("qat::Conv1d and ConvBn1d compute the float 1-D layers", "[nn][modules][bn]") {
  torch::manual_seed(4);
  torch::nn::Conv1d conv(torch::nn::Conv1dOptions(3, 4, 3).stride(2).padding(1));
  qat::Conv1d qconv(conv.ptr(), qat::Config().weight(), /*fuse_relu=*/true);
  CATCH_CHECK(qconv->weight.is_same(conv->weight));
  CATCH_CHECK(qconv->name() == "qat::Conv1dImpl");
  std::ostringstream printed;
  qconv->pretty_print(printed);
  CATCH_CHECK(
      printed.str() ==
      "qat::Conv1d(3, 4, kernel_size=[3], stride=[2], groups=1, bias=true, relu=true)");
  const auto x = torch::randn({2, 3, 11});
  const auto y = qconv(x);
  const auto& wfq = qconv->weight_fake_quant;
  CATCH_CHECK(wfq->scale.numel() == 4);  // per output channel
  const auto w = reference_fake_quantize(conv->weight, wfq->scale, wfq->zero_point, -128, 127, 0);
  CATCH_CHECK(torch::allclose(
      y, torch::relu(torch::conv1d(x, w, conv->bias, /*stride=*/2, /*padding=*/1)), 1e-5, 1e-6));
  CATCH_CHECK(
      invalid_argument_message(
          [] { qat::Conv1d(torch::nn::Conv1dOptions(1, 1, 3).padding_mode(torch::kCircular)); }) ==
      "qat::Conv1d: padding_mode kCircular is not supported (PyTorch's quantized conv pads with "
      "zeros)");

  // Conv1d + BatchNorm1d with fake quantization off: the float pair, in eval and training.
  auto [float_conv, float_bn, fused] = float_pair_and_fold<qat::ConvBn1d>(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(3, 4, 3).padding(1).bias(false)),
      torch::nn::BatchNorm1d(4));
  CATCH_CHECK(fused->name() == "qat::ConvBn1dImpl");
  const auto batch = torch::randn({2, 3, 9}, torch::kDouble);
  CATCH_CHECK(fold_gap(float_conv, float_bn, fused, batch, /*training=*/false) < 1e-10);
  CATCH_CHECK(fold_gap(float_conv, float_bn, fused, batch, /*training=*/true) < 1e-5);
  CATCH_CHECK(torch::allclose(fused->bn->running_mean, float_bn->running_mean, 0, 1e-10));
  CATCH_CHECK(
      invalid_argument_message([] {
        qat::ConvBn1d(
            torch::nn::Conv1dOptions(1, 2, 3), torch::nn::BatchNorm1dOptions(2).affine(false));
      }) ==
      "qat::ConvBn1d: the batch norm must be affine and track running statistics to be "
      "folded into the conv");
}

CATCH_TEST_CASE("qat::Conv3d and ConvBn3d compute the float 3-D layers", "[nn][modules][bn]") {
  torch::manual_seed(6);
  torch::nn::Conv3d conv(torch::nn::Conv3dOptions(2, 4, 3).stride(2).padding(1));
  qat::Conv3d qconv(conv.ptr(), qat::Config().weight(), /*fuse_relu=*/true);
  CATCH_CHECK(qconv->weight.is_same(conv->weight));
  CATCH_CHECK(qconv->name() == "qat::Conv3dImpl");
  const auto x = torch::randn({2, 2, 5, 6, 7});
  const auto y = qconv(x);
  const auto& wfq = qconv->weight_fake_quant;
  CATCH_CHECK(wfq->scale.numel() == 4);  // per output channel
  const auto w = reference_fake_quantize(conv->weight, wfq->scale, wfq->zero_point, -128, 127, 0);
  CATCH_CHECK(torch::allclose(
      y, torch::relu(torch::conv3d(x, w, conv->bias, /*stride=*/2, /*padding=*/1)), 1e-5, 1e-6));

  // Conv3d + BatchNorm3d with fake quantization off: the float pair in eval.
  auto [float_conv, float_bn, fused] = float_pair_and_fold<qat::ConvBn3d>(
      torch::nn::Conv3d(torch::nn::Conv3dOptions(2, 4, 3).padding(1).bias(false)),
      torch::nn::BatchNorm3d(4));
  CATCH_CHECK(fused->name() == "qat::ConvBn3dImpl");
  const auto batch = torch::randn({2, 2, 4, 5, 6}, torch::kDouble);
  CATCH_CHECK(fold_gap(float_conv, float_bn, fused, batch, /*training=*/false) < 1e-10);
}

CATCH_TEST_CASE("qat::ConvTranspose2d quantizes its weight per output channel", "[nn][modules]") {
  torch::manual_seed(5);
  torch::nn::ConvTranspose2d conv(
      torch::nn::ConvTranspose2dOptions(3, 5, 3).stride(2).padding(1).output_padding(1));
  qat::ConvTranspose2d qconv(conv.ptr(), qat::Config().weight(), /*fuse_relu=*/true);
  CATCH_CHECK(qconv->weight.is_same(conv->weight));
  CATCH_CHECK(qconv->name() == "qat::ConvTranspose2dImpl");
  const auto x = torch::randn({2, 3, 4, 4});
  const auto y = qconv(x);
  CATCH_CHECK(y.sizes() == torch::IntArrayRef{2, 5, 8, 8});
  // One scale per output channel: axis 1 of the [in, out, kh, kw] weight.
  const auto& wfq = qconv->weight_fake_quant;
  CATCH_CHECK(wfq->spec().axis() == 1);
  CATCH_CHECK(wfq->scale.numel() == 5);
  const auto w = reference_fake_quantize(conv->weight, wfq->scale, wfq->zero_point, -128, 127, 1);
  const auto expected = torch::relu(torch::conv_transpose2d(
      x, w, conv->bias, /*stride=*/2, /*padding=*/1,
      /*output_padding=*/1));
  CATCH_CHECK(torch::allclose(y, expected, 1e-5, 1e-6));
  qconv->weight_fake_quant->disable_fake_quant();
  CATCH_CHECK(torch::allclose(qconv(x), torch::relu(conv(x))));
  // Grouped: one scale per output channel of a group (axis 1 of the [in, out / groups, k]
  // weight), shared by the groups.
  qat::ConvTranspose1d grouped(torch::nn::ConvTranspose1dOptions(4, 6, 3).groups(2));
  const auto x1 = torch::randn({2, 4, 5});
  const auto y1 = grouped(x1);
  const auto& gfq = grouped->weight_fake_quant;
  CATCH_CHECK(gfq->scale.numel() == 3);
  const auto gw =
      reference_fake_quantize(grouped->weight, gfq->scale, gfq->zero_point, -128, 127, 1);
  CATCH_CHECK(torch::allclose(
      y1,
      torch::conv_transpose1d(
          x1, gw, grouped->bias, /*stride=*/1, /*padding=*/0, /*output_padding=*/0, /*groups=*/2),
      1e-5, 1e-6));
}

CATCH_TEST_CASE("qat::Embedding looks rows up in its fake-quantized table", "[nn][modules]") {
  torch::manual_seed(6);
  torch::nn::Embedding table(torch::nn::EmbeddingOptions(10, 4).padding_idx(0));
  qat::Embedding qtable(table.ptr());
  CATCH_CHECK(qtable->weight.is_same(table->weight));
  const auto indices = torch::tensor({{0, 3, 9}, {3, 3, 1}}, torch::kLong);
  const auto rows = qtable(indices);
  const auto& wfq = qtable->weight_fake_quant;
  CATCH_CHECK(wfq->scale.numel() == 10);  // one scale per row
  const auto w = reference_fake_quantize(table->weight, wfq->scale, wfq->zero_point, -128, 127, 0);
  CATCH_CHECK(torch::equal(rows, w.index({indices})));
  // The padding row gets no gradient, as in torch::nn::Embedding.
  rows.sum().backward();
  CATCH_CHECK(table->weight.grad()[0].abs().sum().item<float>() == 0);
  CATCH_CHECK(table->weight.grad()[3].abs().sum().item<float>() > 0);
  CATCH_CHECK(invalid_argument_message([] {
                qat::Embedding(torch::nn::EmbeddingOptions(4, 2).sparse(true));
              }).find("qat::Embedding: sparse=true is not supported") == 0);
}

CATCH_TEST_CASE(
    "qat::Embedding with max_norm renormalizes the float rows it reads, then fake-quantizes",
    "[nn][modules]") {
  torch::manual_seed(7);
  for (const bool bag : {false, true}) {
    CATCH_INFO("bag " << bag);
    const auto table = torch::randn({10, 4}) * 2;
    // torch::nn's own renormalization of the float table is the reference.
    auto reference = table.clone();
    const auto indices = torch::tensor({{0, 3, 9}, {3, 3, 1}}, torch::kLong);
    namespace F = torch::nn::functional;
    F::embedding(indices, reference, F::EmbeddingFuncOptions().max_norm(1.5).norm_type(1.0));
    torch::Tensor rows;
    qat::FakeQuantize fq{nullptr};
    torch::Tensor weight;
    const auto look_up = [&](auto qtable) {
      {
        torch::NoGradGuard no_grad;
        qtable->weight.copy_(table);
      }
      rows = qtable(indices);
      fq = qtable->weight_fake_quant;
      weight = qtable->weight;
    };
    if (bag) {
      look_up(
          qat::EmbeddingBag(torch::nn::EmbeddingBagOptions(10, 4).max_norm(1.5).norm_type(1.0)));
    } else {
      look_up(qat::Embedding(torch::nn::EmbeddingOptions(10, 4).max_norm(1.5).norm_type(1.0)));
    }
    // The rows' gradient still reaches the float table.
    rows.sum().backward();
    CATCH_CHECK(weight.grad()[3].abs().sum().item<float>() > 0);
    // The rows read were renormalized in place (others, like row 2, untouched)...
    CATCH_CHECK(torch::equal(weight.detach(), reference));
    CATCH_CHECK(!torch::equal(reference[3], table[3]));
    CATCH_CHECK(torch::equal(reference[2], table[2]));
    // ... and then fake-quantized and looked up.
    const auto w = reference_fake_quantize(
        reference, fq->scale, fq->zero_point, fq->quant_min(), fq->quant_max(), 0);
    const auto expected = bag ? w.index({indices}).mean(1) : w.index({indices});
    CATCH_CHECK(torch::allclose(rows.detach(), expected, 0, 1e-6));
  }
}

CATCH_TEST_CASE("ConvBn2d quantizes the folded weight", "[nn][modules][bn]") {
  torch::manual_seed(3);
  torch::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 3, 3).bias(false));
  torch::nn::BatchNorm2d bn(3);
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(-1.5, 1.5);  // negative factors flip the folded range
    bn->running_var.uniform_(0.5, 2.0);
  }
  qat::ConvBn2d fused(conv.ptr(), bn.ptr(), qat::Config().weight(), /*fuse_relu=*/true);
  fused->eval();
  const auto x = torch::randn({1, 2, 6, 6});
  const auto y = fused(x);
  const auto factor = bn->weight / torch::sqrt(bn->running_var + bn->options.eps());
  const auto f = factor.reshape({-1, 1, 1, 1});
  auto wfq = fused->weight_fake_quant;
  wfq->disable_observer();
  // The qparams are those of the folded weight w * f; the reference quantizes it directly.
  const auto expected_weight =
      reference_fake_quantize(conv->weight * f, wfq->scale, wfq->zero_point, -128, 127, 0);
  const auto folded_weight = (wfq->forward_folded(conv->weight, factor) * f).detach();
  // The operator quantizes w with scale S / |f| instead of w * f with S: the float
  // roundings differ, so an element on a rounding tie (the channel's extreme, at 127.5
  // steps) may land one quantization step away.
  const auto step = wfq->scale.reshape({-1, 1, 1, 1});
  const auto weight_error = (folded_weight - expected_weight).abs();
  CATCH_CHECK((weight_error <= step * 1.001 + 1e-7).all().item<bool>());
  CATCH_CHECK((weight_error > step * 1e-3).sum().item<int64_t>() <= 3);
  const auto shift = bn->bias - bn->running_mean * factor;
  const auto expected = torch::relu(torch::conv2d(x, folded_weight) + shift.reshape({1, -1, 1, 1}));
  CATCH_CHECK(torch::allclose(y, expected, 1e-4, 1e-5));
}
