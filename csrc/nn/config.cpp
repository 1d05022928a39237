// qat::QuantSpec and qat::Config: every setter checks its field, with the messages of the
// Python qat.QuantSpec / qat.Config.

#include <qat/config.h>
#include <qat/estimator.h>
#include <qat/observers.h>

#include "config_keys.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <fnmatch.h>

#include <algorithm>
#include <stdexcept>

namespace qat {

namespace {

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw std::invalid_argument(fmt::format(format, std::forward<Args>(args)...));
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

void check_layer_key(const char* method, const std::string& name) {
  if (name.empty()) {
    fail("qat::Config::{}: a module name or pattern must not be empty", method);
  }
}

}  // namespace

namespace detail {

bool is_pattern(const std::string& key) {
  return key.find_first_of("*?[") != std::string::npos;
}

bool key_matches(const std::string& key, const std::string& name) {
  return key == name || (is_pattern(key) && fnmatch(key.c_str(), name.c_str(), 0) == 0);
}

const std::pair<std::string, LayerOverride>* find_override(
    const Config& config, const std::string& name) {
  const auto& overrides = config.overrides();
  for (const auto& item : overrides) {
    if (item.first == name) {
      return &item;
    }
  }
  for (const auto& item : overrides) {
    if (key_matches(item.first, name)) {
      return &item;
    }
  }
  return nullptr;
}

}  // namespace detail

const std::vector<std::string>& QuantSpec::observers() {
  static const std::vector<std::string> names{
      "minmax", "moving_average", "percentile", "mse", "entropy"};
  return names;
}

const std::vector<std::string>& QuantSpec::module_observers() {
  static const std::vector<std::string> names{"minmax", "moving_average"};
  return names;
}

QuantSpec& QuantSpec::bits(int64_t bits) {
  if (bits < 2 || bits > 16) {
    fail("qat::QuantSpec: bits must be in [2, 16], got {}", bits);
  }
  bits_ = bits;
  return *this;
}

QuantSpec& QuantSpec::symmetric(bool symmetric) {
  symmetric_ = symmetric;
  return *this;
}

QuantSpec& QuantSpec::signed_range(c10::optional<bool> is_signed) {
  signed_ = is_signed;
  return *this;
}

QuantSpec& QuantSpec::per_channel(bool per_channel) {
  per_channel_ = per_channel;
  return *this;
}

QuantSpec& QuantSpec::axis(int64_t axis) {
  axis_ = axis;
  return *this;
}

QuantSpec& QuantSpec::narrow_range(bool narrow) {
  narrow_range_ = narrow;
  return *this;
}

QuantSpec& QuantSpec::observer(std::string observer) {
  if (!contains(observers(), observer)) {
    fail(
        "qat::QuantSpec: observer must be one of {}; got '{}'", fmt::join(observers(), ", "),
        observer);
  }
  observer_ = std::move(observer);
  return *this;
}

QuantSpec& QuantSpec::estimator(std::string estimator) {
  const auto& registry = EstimatorRegistry::global();
  if (!registry.contains(estimator)) {
    fail(
        "qat::QuantSpec: estimator must be one of the registered estimators {}; got '{}'",
        fmt::join(registry.names(), ", "), estimator);
  }
  estimator_ = std::move(estimator);
  return *this;
}

QuantSpec& QuantSpec::averaging_constant(double constant) {
  if (!(constant > 0.0 && constant <= 1.0)) {
    fail("qat::QuantSpec: averaging_constant must be in (0, 1], got {}", constant);
  }
  averaging_constant_ = constant;
  return *this;
}

QuantSpec& QuantSpec::percentile(double percentile) {
  if (!(percentile > 0.0 && percentile <= 100.0)) {
    fail("qat::QuantSpec: percentile must be in (0, 100], got {}", percentile);
  }
  percentile_ = percentile;
  return *this;
}

QuantSpec& QuantSpec::bins(int64_t bins) {
  if (bins < 1 || bins > kMaxBins) {
    fail("qat::QuantSpec: bins must be in 1..{}, got {}", kMaxBins, bins);
  }
  bins_ = bins;
  return *this;
}

int64_t QuantSpec::quant_min() const {
  return quant_range(bits_, is_signed(), narrow_range_).first;
}

int64_t QuantSpec::quant_max() const {
  return quant_range(bits_, is_signed(), narrow_range_).second;
}

QuantSpec fixed_qparams_spec(QuantSpec activation) {
  const auto estimator =
      EstimatorRegistry::global().fixed_qparams_estimator(activation.estimator());
  activation.per_channel(false).estimator(estimator);
  return activation;
}

bool takes_relu(const QuantSpec& activation) {
  return !activation.per_channel() && activation.estimator() == "ste" &&
         (activation.observer() == "minmax" || activation.observer() == "moving_average");
}

std::string QuantSpec::to_string() const {
  return fmt::format(
      "bits={}, {}, {}, {}{}, observer={}, estimator={}", bits_,
      is_signed() ? "signed" : "unsigned", symmetric_ ? "symmetric" : "affine",
      per_channel_ ? fmt::format("per_channel(axis={})", axis_) : "per_tensor",
      narrow_range_ ? ", narrow_range" : "", observer_, estimator_);
}

bool QuantSpec::operator==(const QuantSpec& other) const {
  return bits_ == other.bits_ && symmetric_ == other.symmetric_ && signed_ == other.signed_ &&
         per_channel_ == other.per_channel_ && axis_ == other.axis_ &&
         narrow_range_ == other.narrow_range_ && observer_ == other.observer_ &&
         estimator_ == other.estimator_ && averaging_constant_ == other.averaging_constant_ &&
         percentile_ == other.percentile_ && bins_ == other.bins_;
}

const std::vector<std::string>& Config::backends() {
  static const std::vector<std::string> names{"qnnpack", "fbgemm"};
  return names;
}

Config::Config()
    : weight_(QuantSpec().bits(8).symmetric(true).per_channel(true).axis(0).observer("minmax")),
      // qnnpack's quantized kernels take uint8 activations with one scale per tensor.
      activation_(QuantSpec().bits(8).symmetric(false).observer("moving_average")) {}

Config& Config::weight(QuantSpec spec) {
  weight_ = std::move(spec);
  return *this;
}

Config& Config::activation(QuantSpec spec) {
  activation_ = std::move(spec);
  return *this;
}

Config& Config::override_layer(
    const std::string& name, c10::optional<QuantSpec> weight, c10::optional<QuantSpec> activation) {
  check_layer_key("override_layer", name);
  if (!weight.has_value() && !activation.has_value()) {
    fail(
        "qat::Config::override_layer: the override of '{}' must set a weight or an "
        "activation spec, got neither",
        name);
  }
  LayerOverride entry{std::move(weight), std::move(activation)};
  for (auto& item : overrides_) {
    if (item.first == name) {
      item.second = std::move(entry);
      return *this;
    }
  }
  overrides_.emplace_back(name, std::move(entry));
  return *this;
}

Config& Config::skip(const std::string& name) {
  check_layer_key("skip", name);
  if (!contains(skip_, name)) {
    skip_.push_back(name);
  }
  return *this;
}

Config& Config::backend(std::string backend) {
  if (!contains(backends(), backend)) {
    fail("qat::Config: backend must be one of {}; got '{}'", fmt::join(backends(), ", "), backend);
  }
  backend_ = std::move(backend);
  return *this;
}

Config& Config::dynamic(bool dynamic) {
  dynamic_ = dynamic;
  return *this;
}

bool Config::is_skipped(const std::string& name) const {
  return std::any_of(skip_.begin(), skip_.end(), [&](const std::string& key) {
    return detail::key_matches(key, name);
  });
}

c10::optional<LayerSpecs> Config::spec_for(const std::string& name) const {
  if (is_skipped(name)) {
    return c10::nullopt;
  }
  const auto* found = detail::find_override(*this, name);
  if (found == nullptr) {
    return LayerSpecs{weight_, activation_};
  }
  const LayerOverride& entry = found->second;
  return LayerSpecs{entry.weight.value_or(weight_), entry.activation.value_or(activation_)};
}

namespace presets {

namespace {

QuantSpec weight_spec(int64_t bits, const std::string& estimator = "ste") {
  return QuantSpec()
      .bits(bits)
      .symmetric(true)
      .per_channel(true)
      .axis(0)
      .observer("minmax")
      .estimator(estimator);
}

QuantSpec activation_spec(int64_t bits, const std::string& estimator = "ste") {
  return QuantSpec().bits(bits).symmetric(false).observer("moving_average").estimator(estimator);
}

}  // namespace

Config int8(const std::string& backend) {
  return Config().backend(backend);
}

Config w4a8(const std::string& backend) {
  return Config().weight(weight_spec(4)).activation(activation_spec(8)).backend(backend);
}

Config w4a4(const std::string& backend) {
  // At 4 bits a range chosen by an observer alone loses too much accuracy.
  return Config()
      .weight(weight_spec(4, "lsq"))
      .activation(activation_spec(4, "lsq"))
      .backend(backend);
}

}  // namespace presets

}  // namespace qat
