// Rules the C++ front end shares with the Python one: a config key must match a module,
// patterns included, and a config whose observers the C++ modules cannot run is refused
// by qat::prepare before anything is built, naming the layer and the config entry.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <algorithm>
#include <string>
#include <vector>

#include "helpers.h"

namespace {

using qat_test::invalid_argument_message;

std::vector<std::string> module_names(torch::nn::Module& root) {
  std::vector<std::string> names;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    names.push_back(item.key());
  }
  return names;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Children "stem.0", "stem.1" (a Linear and a ReLU) and "head".
struct TwoPartImpl : torch::nn::Module {
  TwoPartImpl() {
    stem =
        register_module("stem", torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU()));
    head = register_module("head", torch::nn::Sequential(torch::nn::Linear(8, 2)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(stem->forward(x)); }
  torch::nn::Sequential stem{nullptr};
  torch::nn::Sequential head{nullptr};
};
TORCH_MODULE(TwoPart);

qat::QuantSpec weight_spec(const std::string& observer) {
  return qat::QuantSpec().bits(8).symmetric(true).per_channel(true).observer(observer);
}

// prepare's message on refusing `config` for a TwoPart model, which it must leave as it was.
std::string refused(const qat::Config& config) {
  TwoPart model;
  const auto before = module_names(*model);
  const auto message = invalid_argument_message([&] { qat::prepare(*model, config); });
  CATCH_CHECK(module_names(*model) == before);
  return message;
}

}  // namespace

CATCH_TEST_CASE(
    "prepare refuses a config pattern that matches no module", "[front_end_rules][prepare]") {
  CATCH_CHECK(
      refused(qat::Config().override_layer("body.*", weight_spec("minmax"), c10::nullopt)) ==
      "qat::prepare: Config.overrides pattern 'body.*' matches no module of the model");
  CATCH_CHECK(
      refused(qat::Config().skip("stem.?0")) ==
      "qat::prepare: Config.skip pattern 'stem.?0' matches no module of the model");
  CATCH_CHECK(
      refused(qat::Config().skip("stem.[!01]")) ==
      "qat::prepare: Config.skip pattern 'stem.[!01]' matches no module of the model");
  // Case matters, as in Python's fnmatch.fnmatchcase.
  CATCH_CHECK(
      refused(qat::Config().skip("HEAD*")) ==
      "qat::prepare: Config.skip pattern 'HEAD*' matches no module of the model");
  // One key matching nothing is refused even when the others match.
  CATCH_CHECK(
      refused(qat::Config().skip("head").skip("tail*")) ==
      "qat::prepare: Config.skip pattern 'tail*' matches no module of the model");

  CATCH_SECTION("patterns that match are taken, with fnmatch's *, ?, [seq] and [!seq]") {
    for (const std::string key : {"stem.*", "stem.?", "stem.[01]", "stem.[!1]", "*"}) {
      CATCH_INFO(key);
      TwoPart model;
      qat::prepare(*model, qat::Config().override_layer(key, weight_spec("minmax"), c10::nullopt));
      CATCH_CHECK(std::dynamic_pointer_cast<qat::LinearImpl>(model->stem->ptr(1)) != nullptr);
    }
    TwoPart model;
    qat::prepare(*model, qat::Config().skip("he?d"));
    CATCH_CHECK(std::dynamic_pointer_cast<torch::nn::LinearImpl>(model->head->ptr(0)) != nullptr);
  }
}

CATCH_TEST_CASE(
    "the observers the C++ modules run are one list within QuantSpec's",
    "[front_end_rules][config]") {
  const auto& run = qat::QuantSpec::module_observers();
  CATCH_CHECK(run == std::vector<std::string>{"minmax", "moving_average"});
  for (const auto& name : run) {
    CATCH_CHECK(
        std::count(qat::QuantSpec::observers().begin(), qat::QuantSpec::observers().end(), name) ==
        1);
  }
  // A histogram observer stays a valid QuantSpec: a config written for Python is read as is.
  CATCH_CHECK(qat::QuantSpec().observer("entropy").observer() == "entropy");
}

CATCH_TEST_CASE(
    "prepare refuses an observer the C++ modules cannot run, naming the layer and the entry",
    "[front_end_rules][prepare]") {
  CATCH_SECTION("the default weight spec") {
    const auto message = refused(qat::Config().weight(weight_spec("mse")));
    CATCH_CHECK(
        message ==
        "qat::prepare: 'stem.0' (torch::nn::LinearImpl) cannot be prepared, so the model is "
        "left as it was: Config.weight: the 'mse' observer is not available in C++ yet; the "
        "C++ modules run minmax, moving_average (calibrate the histogram observers in Python)");
  }

  CATCH_SECTION("the default activation spec") {
    const auto message = refused(qat::Config().activation(qat::QuantSpec().observer("percentile")));
    CATCH_CHECK(contains(message, "qat::prepare: 'stem.0' (torch::nn::LinearImpl)"));
    CATCH_CHECK(contains(message, "Config.activation: the 'percentile' observer"));
  }

  CATCH_SECTION("an override, named by its key") {
    const auto message = refused(
        qat::Config().override_layer("h*", c10::nullopt, qat::QuantSpec().observer("entropy")));
    CATCH_CHECK(contains(message, "qat::prepare: 'head.0' (torch::nn::LinearImpl)"));
    CATCH_CHECK(contains(message, "Config.overrides['h*'].activation: the 'entropy' observer"));
  }

  CATCH_SECTION("an exact key wins over a pattern, as in Config::spec_for") {
    const auto message = refused(qat::Config()
                                     .override_layer("stem.*", weight_spec("minmax"), c10::nullopt)
                                     .override_layer("stem.0", weight_spec("mse"), c10::nullopt));
    CATCH_CHECK(contains(message, "Config.overrides['stem.0'].weight: the 'mse' observer"));
  }

  CATCH_SECTION("an override without that spec falls back to the default") {
    const auto message =
        refused(qat::Config()
                    .weight(weight_spec("percentile"))
                    .override_layer("head.0", c10::nullopt, qat::QuantSpec().observer("minmax")));
    CATCH_CHECK(contains(message, "'stem.0' (torch::nn::LinearImpl)"));
    CATCH_CHECK(contains(message, "Config.weight: the 'percentile' observer"));
  }

  CATCH_SECTION("specs no prepared layer uses are not refused") {
    // Skipped layers stay float; dynamic configs build no activation FakeQuantize.
    TwoPart skipped;
    qat::prepare(
        *skipped,
        qat::Config().override_layer("head.0", weight_spec("mse"), c10::nullopt).skip("head"));
    CATCH_CHECK(std::dynamic_pointer_cast<qat::LinearImpl>(skipped->stem->ptr(1)) != nullptr);
    TwoPart dynamic;
    qat::prepare(
        *dynamic, qat::Config().activation(qat::QuantSpec().observer("entropy")).dynamic(true));
    CATCH_CHECK(std::dynamic_pointer_cast<qat::LinearImpl>(dynamic->head->ptr(0)) != nullptr);
  }
}

// FakeQuantize's forward is one C++ state machine (qat::fused_observe_fake_quantize) for
// both front ends: Python's refusal of a scale that was never observed holds in C++ too,
// where the initial scale 1.0 used to quantize the input as if it were a real one.
CATCH_TEST_CASE(
    "a FakeQuantize whose observer never saw data refuses to quantize, as in Python",
    "[front_end_rules][fake_quantize]") {
  const auto refusal = [](const qat::QuantSpec& spec) {
    qat::FakeQuantize fq(spec);
    fq->disable_observer();
    try {
      fq->forward(torch::randn({4, 3}));
    } catch (const c10::Error& error) {
      return std::string(error.what_without_backtrace());
    }
    return std::string("no error");
  };
  CATCH_CHECK(contains(
      refusal(qat::QuantSpec()),
      "the scale is not known yet: the observer was disabled before it saw a batch"));
  CATCH_CHECK(contains(
      refusal(qat::QuantSpec().per_channel(true).symmetric(true).axis(1)),
      "the per-channel scale is not known yet"));
  // A fixed output range needs no observation, and a range once observed stays usable.
  qat::FakeQuantize fixed(qat::QuantSpec(), 0.0, 1.0, false);
  const auto x = torch::rand({4, 3});
  CATCH_CHECK(torch::equal(
      fixed->forward(x), torch::fake_quantize_per_tensor_affine(x, 1.0 / 256, 0, 0, 255)));
  qat::FakeQuantize observed{qat::QuantSpec()};
  observed->forward(torch::randn({4, 3}));
  observed->disable_observer();
  CATCH_CHECK(observed->forward(x).sizes() == x.sizes());
}

// The spec of a quantizer with fixed qparams, which Python's prepare takes from the same
// function: per tensor, learned by no estimator, the rest as the activations'.
CATCH_TEST_CASE(
    "the fixed-qparams spec is per tensor and learns nothing, keeping the rest",
    "[front_end_rules][prepare]") {
  const auto activation = qat::QuantSpec()
                              .bits(6)
                              .symmetric(true)
                              .per_channel(true)
                              .axis(1)
                              .observer("minmax")
                              .averaging_constant(0.5);
  for (const auto& name : qat::EstimatorRegistry::global().names()) {
    auto spec = activation;
    spec.estimator(name);
    const auto fixed = qat::fixed_qparams_spec(spec);
    const auto info = qat::EstimatorRegistry::global().info(name);
    CATCH_CHECK(fixed.estimator() == (info.learns_scale || info.learns_zero_point ? "ste" : name));
    CATCH_CHECK_FALSE(fixed.per_channel());
    auto back = fixed;
    back.per_channel(true).estimator(name);
    CATCH_CHECK(back == spec);
  }
}
