#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace qat {

/// Arguments of one fake-quantize call, already validated, as an estimator sees them.
struct EstimatorArgs {
  int64_t quant_min = 0;
  int64_t quant_max = 255;
  /// Channel axis, normalized to [0, input.dim()), or nullopt for per-tensor.
  c10::optional<int64_t> axis;
  /// User override of the scale / zero-point gradient factor.
  c10::optional<double> grad_scale;
  double ewgs_delta = 1e-3;
};

/// A straight-through estimator: the forward simulation and its backward rule.
///
/// `apply` returns the fake-quantized tensor and records, through autograd, how
/// gradients reach the input and (where the estimator learns them) the scale and
/// zero point. Implementations must be thread-safe: one instance serves every call.
class Estimator {
 public:
  virtual ~Estimator() = default;
  virtual at::Tensor apply(
      const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
      const EstimatorArgs& args) const = 0;
};

/// What the registry tells about an estimator.
struct EstimatorInfo {
  std::string name;
  std::string description;
  bool learns_scale = false;
  bool learns_zero_point = false;
};

/// String-keyed registry of estimators. Unknown names fail with the list of known ones.
class EstimatorRegistry {
 public:
  /// The process-wide registry that `qat::fake_quantize` consults.
  static EstimatorRegistry& global();

  /// Adds `estimator` under `info.name`; fails if the name is taken and `replace` is false.
  void add(EstimatorInfo info, std::shared_ptr<const Estimator> estimator, bool replace = false);
  /// Removes `name`; returns whether it was present.
  bool remove(const std::string& name);
  bool contains(const std::string& name) const;
  /// The estimator registered as `name`; throws c10::Error naming the known ones.
  std::shared_ptr<const Estimator> get(const std::string& name) const;
  EstimatorInfo info(const std::string& name) const;
  /// Registered names, sorted.
  std::vector<std::string> names() const;
  /// The estimator of a quantizer whose qparams are fixed by the op before it (a sigmoid, a
  /// tanh, a ReLU6 fused into its layer) when the activations are quantized with `name`:
  /// `name`, or the straight-through "ste" where `name` learns a scale or zero point (LSQ,
  /// LSQ+, PACT), since fixed qparams cannot be learned. Both front ends' prepare use it.
  std::string fixed_qparams_estimator(const std::string& name) const;

 private:
  struct Entry {
    EstimatorInfo info;
    std::shared_ptr<const Estimator> estimator;
  };
  const Entry& find(const std::string& name) const;

  mutable std::mutex mutex_;
  std::map<std::string, Entry> entries_;
};

/// Registers an estimator when the library loads; used by QAT_REGISTER_ESTIMATOR.
struct EstimatorRegistration {
  EstimatorRegistration(EstimatorInfo info, std::shared_ptr<const Estimator> estimator) {
    EstimatorRegistry::global().add(std::move(info), std::move(estimator));
  }
};

}  // namespace qat

#define QAT_CONCAT_INNER(a, b) a##b
#define QAT_CONCAT(a, b) QAT_CONCAT_INNER(a, b)

/// Registers `INSTANCE` (a std::shared_ptr<const qat::Estimator>) under `INFO`
/// (a qat::EstimatorInfo) at load time, from any translation unit:
///   QAT_REGISTER_ESTIMATOR(qat::EstimatorInfo{"mine", "what it does", true, false},
///                          std::make_shared<MyEstimator>());
#define QAT_REGISTER_ESTIMATOR(INFO, INSTANCE)                                                    \
  static const ::qat::EstimatorRegistration QAT_CONCAT(qat_estimator_registration_, __COUNTER__)( \
      INFO, INSTANCE)
