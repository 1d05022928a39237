#include <qat/estimator.h>

#include <c10/util/Exception.h>

#include <sstream>

namespace qat {

EstimatorRegistry& EstimatorRegistry::global() {
  // Leaked on purpose: estimators registered from Python must not be destroyed after the
  // interpreter has shut down, so nothing here runs at static destruction time.
  static auto* registry = new EstimatorRegistry();
  return *registry;
}

void EstimatorRegistry::add(
    EstimatorInfo info, std::shared_ptr<const Estimator> estimator, bool replace) {
  TORCH_CHECK(!info.name.empty(), "qat estimator registry: the estimator name must not be empty");
  TORCH_CHECK(estimator != nullptr, "qat estimator registry: estimator '", info.name, "' is null");
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(
      replace || entries_.count(info.name) == 0, "qat estimator registry: '", info.name,
      "' is already registered (pass replace=True to override it)");
  std::string name = info.name;
  entries_[name] = Entry{std::move(info), std::move(estimator)};
}

bool EstimatorRegistry::remove(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.erase(name) > 0;
}

bool EstimatorRegistry::contains(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(name) > 0;
}

const EstimatorRegistry::Entry& EstimatorRegistry::find(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    std::ostringstream known;
    for (const auto& entry : entries_) {
      known << (known.tellp() > 0 ? ", " : "") << entry.first;
    }
    TORCH_CHECK(false, "qat: unknown estimator '", name, "'; known estimators: ", known.str());
  }
  return it->second;
}

std::shared_ptr<const Estimator> EstimatorRegistry::get(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return find(name).estimator;
}

EstimatorInfo EstimatorRegistry::info(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return find(name).info;
}

std::string EstimatorRegistry::fixed_qparams_estimator(const std::string& name) const {
  const auto learns = info(name);
  return learns.learns_scale || learns.learns_zero_point ? "ste" : name;
}

std::vector<std::string> EstimatorRegistry::names() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& entry : entries_) {
    out.push_back(entry.first);
  }
  return out;
}

}  // namespace qat
