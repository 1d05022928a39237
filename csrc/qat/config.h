#pragma once

// How one tensor is quantized (qat::QuantSpec) and how a model is (qat::Config), the C++
// mirrors of qat.QuantSpec and qat.Config. Both validate every field when it is set, so an
// object that exists is valid.

#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qat {

/// The most histogram bins a QuantSpec accepts (as Python's qat.config.MAX_BINS): a
/// histogram observer keeps this many counts per channel.
constexpr int64_t kMaxBins = 65536;

/// Quantization of one tensor (a weight or an activation).
///
/// Built with chained setters, each of which checks its field and throws
/// std::invalid_argument naming it:
/// @code
///   auto spec = qat::QuantSpec().bits(4).symmetric(true).per_channel(true).observer("minmax");
/// @endcode
/// The defaults are those of the Python qat.QuantSpec: 8 bits, affine, unsigned, per tensor,
/// the "moving_average" observer and the "ste" estimator.
class QuantSpec {
 public:
  /// Observer names a spec accepts, as in Python (qat.config.OBSERVERS).
  static const std::vector<std::string>& observers();
  /// The observers qat::Observer and qat::FakeQuantize run, a subset of observers(): the
  /// histogram ones are Python-only for now, so qat::prepare refuses a Config using them.
  static const std::vector<std::string>& module_observers();

  QuantSpec() = default;

  /// @param bits integer width, 2 to 16.
  QuantSpec& bits(int64_t bits);
  int64_t bits() const { return bits_; }

  /// @param symmetric symmetric range around 0 (zero point 0 when signed) instead of affine.
  QuantSpec& symmetric(bool symmetric);
  bool symmetric() const { return symmetric_; }

  /// @param is_signed signed integer range; nullopt means signed iff symmetric.
  QuantSpec& signed_range(c10::optional<bool> is_signed);
  c10::optional<bool> signed_range() const { return signed_; }
  /// Whether the integer range is signed (signed_range(), or symmetric() when unset).
  bool is_signed() const { return signed_.has_value() ? *signed_ : symmetric_; }

  /// @param per_channel one scale / zero point per channel of axis() instead of one in all.
  QuantSpec& per_channel(bool per_channel);
  bool per_channel() const { return per_channel_; }

  /// @param axis channel axis when per_channel() (negative counts from the end).
  QuantSpec& axis(int64_t axis);
  int64_t axis() const { return axis_; }

  /// @param narrow drop the most negative level ([-127, 127] at 8 bits) or, unsigned, the
  ///        top one.
  QuantSpec& narrow_range(bool narrow);
  bool narrow_range() const { return narrow_range_; }

  /// @param observer how the range is estimated: "minmax", "moving_average", or from a
  ///        histogram: "percentile", "mse", "entropy" (the histogram ones are Python-only
  ///        for now, see module_observers(); qat::FakeQuantize refuses them).
  QuantSpec& observer(std::string observer);
  const std::string& observer() const { return observer_; }

  /// @param estimator a registered straight-through estimator
  ///        (qat::EstimatorRegistry::global().names()).
  QuantSpec& estimator(std::string estimator);
  const std::string& estimator() const { return estimator_; }

  /// @param constant EMA weight of a new batch for "moving_average", in (0, 1].
  QuantSpec& averaging_constant(double constant);
  double averaging_constant() const { return averaging_constant_; }

  /// @param percentile the "percentile" observer's clipping percentile, in (0, 100].
  QuantSpec& percentile(double percentile);
  double percentile() const { return percentile_; }

  /// @param bins histogram bins of the histogram observers, 1 to kMaxBins (65536).
  QuantSpec& bins(int64_t bins);
  int64_t bins() const { return bins_; }

  /// Smallest integer level, e.g. 0 (uint8) or -128 (int8).
  int64_t quant_min() const;
  /// Largest integer level, e.g. 255 (uint8) or 127 (int8).
  int64_t quant_max() const;

  /// A one-line description, e.g. "bits=8, signed, symmetric, per_channel(axis=0), ...".
  std::string to_string() const;

  bool operator==(const QuantSpec& other) const;
  bool operator!=(const QuantSpec& other) const { return !(*this == other); }

 private:
  int64_t bits_ = 8;
  bool symmetric_ = false;
  c10::optional<bool> signed_;
  bool per_channel_ = false;
  int64_t axis_ = 0;
  bool narrow_range_ = false;
  std::string observer_ = "moving_average";
  std::string estimator_ = "ste";
  double averaging_constant_ = 0.01;
  double percentile_ = 99.99;
  int64_t bins_ = 2048;
};

/// The spec of the quantizer after an op whose output range fixes its qparams (a sigmoid, a
/// tanh, a fused ReLU6) when the activations use `activation`: per tensor, with the
/// straight-through estimator where `activation`'s learns the qparams (LSQ, LSQ+, PACT;
/// EstimatorRegistry::fixed_qparams_estimator). The rule of both front ends' prepare
/// (Python's qat.prepare.fixed_qparams_spec calls it).
QuantSpec fixed_qparams_spec(QuantSpec activation);

/// Whether a quantizer of `activation` whose qparams its observer chooses can take the ReLU
/// before it (`qat::observe_fake_quantize_relu`): per tensor, the "ste" estimator, a minmax
/// or moving_average observer. The rule of both front ends' FakeQuantize (can_take_relu).
bool takes_relu(const QuantSpec& activation);

/// The weight and activation specs one layer is quantized with.
struct LayerSpecs {
  QuantSpec weight;
  QuantSpec activation;
};

/// A per-layer override: a missing spec keeps the Config's default.
struct LayerOverride {
  c10::optional<QuantSpec> weight;
  c10::optional<QuantSpec> activation;
};

/// How a model is quantized: the default weight and activation specs, per-layer overrides,
/// the layers left in float and the target backend (the C++ mirror of qat.Config).
///
/// Layers are named by their path in the module tree as `named_modules()` gives it
/// ("features.0", "head"); overrides and skips take an exact name or an fnmatch-style
/// pattern ("features.*"). An exact name wins over a pattern; among patterns the first
/// given wins. Skip wins over overrides.
/// @code
///   auto cfg = qat::Config()
///                  .weight(qat::QuantSpec().bits(4).symmetric(true).per_channel(true)
///                              .observer("minmax"))
///                  .override_layer("head", qat::QuantSpec().bits(8).symmetric(true)
///                                              .per_channel(true).observer("minmax"),
///                                  c10::nullopt)
///                  .skip("embedding");
/// @endcode
class Config {
 public:
  /// Target backends: the integer kernels the converted model will run on.
  static const std::vector<std::string>& backends();

  /// int8 symmetric per-channel weights ("minmax" observer) and uint8 affine per-tensor
  /// activations ("moving_average"), for the "qnnpack" backend.
  Config();

  /// @param spec the default weight spec.
  Config& weight(QuantSpec spec);
  const QuantSpec& weight() const { return weight_; }

  /// @param spec the default activation spec.
  Config& activation(QuantSpec spec);
  const QuantSpec& activation() const { return activation_; }

  /// Overrides the specs of the layers called (or matching) `name`; a later call for the
  /// same key replaces the earlier one.
  /// @param name module path or fnmatch-style pattern, not empty.
  /// @param weight weight spec, or nullopt to keep the default.
  /// @param activation activation spec, or nullopt to keep the default.
  Config& override_layer(
      const std::string& name, c10::optional<QuantSpec> weight,
      c10::optional<QuantSpec> activation);
  const std::vector<std::pair<std::string, LayerOverride>>& overrides() const { return overrides_; }

  /// Leaves the layers called (or matching) `name` in float, their children included.
  /// @param name module path or fnmatch-style pattern, not empty.
  Config& skip(const std::string& name);
  const std::vector<std::string>& skipped() const { return skip_; }

  /// @param backend "qnnpack" (mobile, the default) or "fbgemm" (x86 servers).
  Config& backend(std::string backend);
  const std::string& backend() const { return backend_; }

  /// @param dynamic activations are quantized at run time, so prepare inserts no
  ///        activation FakeQuantize.
  Config& dynamic(bool dynamic);
  bool dynamic() const { return dynamic_; }

  /// Whether the layer at `name` stays in float.
  bool is_skipped(const std::string& name) const;
  /// The specs of the layer at `name`, or nullopt when it is skipped.
  c10::optional<LayerSpecs> spec_for(const std::string& name) const;

 private:
  QuantSpec weight_;
  QuantSpec activation_;
  std::vector<std::pair<std::string, LayerOverride>> overrides_;
  std::vector<std::string> skip_;
  std::string backend_ = "qnnpack";
  bool dynamic_ = false;
};

/// Ready-made configs, as Python's qat.presets.
namespace presets {

/// The default: int8 symmetric per-channel weights, uint8 affine per-tensor activations.
Config int8(const std::string& backend = "qnnpack");
/// 4-bit symmetric per-channel weights, 8-bit activations.
Config w4a8(const std::string& backend = "qnnpack");
/// 4-bit weights and activations with learned step sizes (the "lsq" estimator).
Config w4a4(const std::string& backend = "qnnpack");

}  // namespace presets

}  // namespace qat
