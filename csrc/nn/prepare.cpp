// qat::prepare and its module registry, calibration and the observer / fake-quant switches.

#include <qat/prepare.h>

#include <qat/op_roles.h>

#include "config_keys.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/modules/rnn.h>
#include <torch/utils.h>

#include <c10/util/Type.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>

namespace qat {

namespace {

std::string type_name(std::type_index type) {
  return c10::demangle(type.name());
}

std::string path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

template <typename Impl>
bool is_exactly(const torch::nn::Module& module) {
  return typeid(module) == typeid(Impl);
}

// A module's role in the op-role table (csrc/qat/op_roles.h), which Python's prepare reads too.
bool has_role(const torch::nn::Module& module, OpRole role) {
  const auto* info = find_op_role(module);
  return info != nullptr && info->role == role;
}

// Attention and recurrent layers compute with their weights inside their own forward
// (MultiheadAttention reads its out_proj's weight, never calling it): a swapped child would
// never run, and without a graph there is nowhere to put their fake quantizers.
template <typename... Types>
bool is_any_of(const torch::nn::Module& module) {
  return ((dynamic_cast<const Types*>(&module) != nullptr) || ...);
}

void refuse_computing_inside(const torch::nn::Module& module, const std::string& name) {
  using namespace torch::nn;
  if (!is_any_of<
          MultiheadAttentionImpl, RNNImpl, LSTMImpl, GRUImpl, RNNCellImpl, LSTMCellImpl,
          GRUCellImpl>(module)) {
    return;
  }
  throw std::invalid_argument(fmt::format(
      "qat::prepare: {} ({}) computes with its weights inside its own forward, where the C++ "
      "front end has no graph to place fake quantizers; prepare the model in Python "
      "(qat.prepare quantizes attention projections, qat.presets.w8a8_dynamic() recurrent "
      "layers) and train the scripted model from C++ (examples/cpp/train_scripted.cpp){}",
      name.empty() ? "the model" : fmt::format("'{}'", name), module.name(),
      name.empty() ? "" : fmt::format(", or keep it in float with Config::skip(\"{}\")", name)));
}

// Every QAT layer quantizes its input (InputQuantized) but the tables (WeightOnly).
bool is_prepared_layer(const torch::nn::Module& module) {
  return dynamic_cast<const InputQuantized*>(&module) != nullptr ||
         dynamic_cast<const WeightOnly*>(&module) != nullptr;
}

void check_not_prepared(torch::nn::Module& root) {
  if (is_prepared_layer(root)) {
    throw std::invalid_argument(
        fmt::format("qat::prepare: the model is prepared already (it is a {})", root.name()));
  }
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (is_prepared_layer(*item.value())) {
      throw std::invalid_argument(fmt::format(
          "qat::prepare: the model is prepared already ('{}' is a {}); prepare the float "
          "model instead",
          item.key(), item.value()->name()));
    }
  }
}

// A layer key in the config that matches no module is a typo that would otherwise silently
// leave the layer with the defaults; a pattern is as easily mistyped as a name.
void check_config_names(torch::nn::Module& root, const Config& config) {
  const auto named = root.named_modules("", /*include_self=*/false);
  auto check = [&](const char* field, const std::string& key) {
    const bool found = std::any_of(named.begin(), named.end(), [&](const auto& item) {
      return detail::key_matches(key, item.key());
    });
    if (found) {
      return;
    }
    if (detail::is_pattern(key)) {
      throw std::invalid_argument(fmt::format(
          "qat::prepare: Config.{} pattern '{}' matches no module of the model", field, key));
    }
    throw std::invalid_argument(fmt::format(
        "qat::prepare: Config.{} names '{}', which is not a module of the model", field, key));
  };
  for (const auto& item : config.overrides()) {
    check("overrides", item.first);
  }
  for (const auto& key : config.skipped()) {
    check("skip", key);
  }
}

// A Config may be written for Python, whose histogram observers the C++ modules cannot run;
// a FakeQuantize refusing one cannot tell which config entry asked for it, so the specs are
// checked here first. The walk follows Preparer's: skipped layers and a swapped layer's
// children get no spec, and a dynamic config builds no activation FakeQuantize.
void check_observers(
    torch::nn::Module& root, const Config& config, const ModuleRegistry& registry) {
  const auto& runnable = QuantSpec::module_observers();
  auto check = [&](const std::string& name, const torch::nn::Module& layer, const char* kind,
                   const QuantSpec& spec, c10::optional<QuantSpec> LayerOverride::*field) {
    if (std::find(runnable.begin(), runnable.end(), spec.observer()) != runnable.end()) {
      return;
    }
    const auto* entry = detail::find_override(config, name);
    const auto source = entry != nullptr && (entry->second.*field).has_value()
                            ? fmt::format("Config.overrides['{}'].{}", entry->first, kind)
                            : fmt::format("Config.{}", kind);
    throw std::invalid_argument(fmt::format(
        "qat::prepare: '{}' ({}) cannot be prepared, so the model is left as it was: {}: the "
        "'{}' observer is not available in C++ yet; the C++ modules run {} (calibrate the "
        "histogram observers in Python)",
        name, layer.name(), source, spec.observer(), fmt::join(runnable, ", ")));
  };
  std::function<void(torch::nn::Module&, const std::string&)> walk =
      [&](torch::nn::Module& module, const std::string& prefix) {
        const bool sequential = dynamic_cast<torch::nn::SequentialImpl*>(&module) != nullptr;
        for (const auto& item : module.named_children()) {
          const auto name = path(prefix, item.key());
          auto& child = *item.value();
          if (config.is_skipped(name)) {
            continue;
          }
          const bool swapped = registry.contains(std::type_index(typeid(child)));
          const auto specs = *config.spec_for(name);
          if (swapped) {
            check(name, child, "weight", specs.weight, &LayerOverride::weight);
          }
          const bool weight_only = registry.weight_only(std::type_index(typeid(child)));
          if (((swapped && !weight_only) ||
               (sequential &&
                (has_role(child, OpRole::kRequantizes) || has_role(child, OpRole::kFixedRange)))) &&
              !config.dynamic()) {
            check(name, child, "activation", specs.activation, &LayerOverride::activation);
          }
          if (!swapped) {
            walk(child, name);
          }
        }
      };
  walk(root, "");
}

// Walks the module tree and swaps, folds and inserts as qat::prepare documents. The walk
// only builds the new modules and records the edits; they are applied once all of them
// were built, so that a layer that cannot be prepared (its QAT module or factory refusing
// it) leaves the model as it was.
class Preparer {
 public:
  Preparer(const Config& config, const ModuleRegistry& registry)
      : config_(config), registry_(registry) {}

  void run(torch::nn::Module& root) {
    module(root, "");
    for (const auto& edit : edits_) {
      edit();
    }
  }

 private:
  void module(torch::nn::Module& module, const std::string& prefix) {
    refuse_computing_inside(module, prefix);
    if (auto* sequential = dynamic_cast<torch::nn::SequentialImpl*>(&module)) {
      this->sequential(*sequential, prefix);
      return;
    }
    for (const auto& item : module.named_children()) {
      const auto name = path(prefix, item.key());
      const auto& child = item.value();
      if (config_.is_skipped(name)) {
        continue;
      }
      if (registry_.contains(std::type_index(typeid(*child)))) {
        auto swapped = swap(child, name, false).ptr();
        edits_.emplace_back([&module, key = item.key(), swapped = std::move(swapped)] {
          module.replace_module(key, swapped);
        });
      } else {
        this->module(*child, name);
      }
    }
  }

  // Runs `build` (which makes a QAT module or FakeQuantize for the layer at `name`), naming
  // the layer in what it throws: the QAT modules' own messages do not know where they are.
  template <typename Build>
  static auto for_layer(const std::string& name, const torch::nn::Module& layer, Build build) {
    try {
      return build();
    } catch (const std::invalid_argument& error) {
      throw std::invalid_argument(fmt::format(
          "qat::prepare: '{}' ({}) cannot be prepared, so the model is left as it was: {}", name,
          layer.name(), error.what()));
    }
  }

  torch::nn::AnyModule swap(
      const std::shared_ptr<torch::nn::Module>& module, const std::string& name, bool relu) {
    const auto specs = *config_.spec_for(name);
    return for_layer(name, *module, [&] {
      return registry_.swap(module, SwapOptions{specs.weight, specs.activation, relu, name});
    });
  }

  // The dimensions (1, 2 or 3) of a conv + batch norm pair that folds into one QAT layer; 0
  // for any other pair.
  static size_t fold_dims(const torch::nn::Module& conv, const torch::nn::Module& bn) {
    return folds<1>(conv, bn) ? 1 : folds<2>(conv, bn) ? 2 : folds<3>(conv, bn) ? 3 : 0;
  }

  template <size_t D>
  static bool folds(const torch::nn::Module& conv, const torch::nn::Module& bn) {
    return is_exactly<typename detail::ConvTypes<D>::Conv>(conv) &&
           is_exactly<typename detail::ConvTypes<D>::BatchNorm>(bn);
  }

  // SequentialImpl keeps its modules in a private vector with no insert or erase, so the
  // chain is rebuilt and assigned over the original object: every holder pointing at it
  // (a custom module's member, a parent Sequential) sees the prepared chain.
  void sequential(torch::nn::SequentialImpl& sequential, const std::string& prefix) {
    std::vector<std::string> names;
    std::vector<std::shared_ptr<torch::nn::Module>> modules;
    std::vector<torch::nn::AnyModule> originals;
    for (const auto& item : sequential.named_children()) {
      names.push_back(item.key());
    }
    for (auto& any : sequential) {
      originals.push_back(any);
      modules.push_back(any.ptr());
    }
    const size_t n = modules.size();
    auto skipped = [&](size_t i) { return config_.is_skipped(path(prefix, names[i])); };
    auto relu_at = [&](size_t i) {
      return i < n && is_exactly<torch::nn::ReLUImpl>(*modules[i]) && !skipped(i);
    };
    auto relu6_at = [&](size_t i) {
      return i < n && is_exactly<torch::nn::ReLU6Impl>(*modules[i]) && !skipped(i);
    };

    std::vector<std::pair<std::string, torch::nn::AnyModule>> chain;
    // The FakeQuantize of the tensor at this point of the chain, when it is fake-quantized
    // (with a dynamic config: none, but `quantized` still tells).
    FakeQuantize input{nullptr};
    bool quantized = false;
    // Whether only modules that pass their input's qparams (Flatten, MaxPool2d...) came
    // before: the first layer's input quantizer then goes on the chain's input, as Python's
    // prepare quantizes a model's input where it enters, so that those modules work on
    // quantized values; elsewhere it goes right before the layer, as Python's does.
    bool at_input = true;
    // `layer` is the index of the module whose activation spec `spec` is; `fixed`: the
    // op's known output range (a ReLU6 fused into the layer before it: [0, 6], 6 included;
    // a sigmoid: [0, 1)), whose qparams the FakeQuantize keeps; `at`: where in the chain.
    struct Range {
      double lo, hi;
      bool inclusive;
    };
    auto fake_quant = [&](const std::string& name, const QuantSpec& spec, size_t layer,
                          c10::optional<Range> fixed = c10::nullopt, size_t at = SIZE_MAX) {
      input = nullptr;
      if (!config_.dynamic()) {
        input = for_layer(path(prefix, names[layer]), *modules[layer], [&] {
          if (!fixed) {
            return FakeQuantize(spec);
          }
          return FakeQuantize(fixed_qparams_spec(spec), fixed->lo, fixed->hi, fixed->inclusive);
        });
        chain.emplace(
            at < chain.size() ? chain.begin() + static_cast<std::ptrdiff_t>(at) : chain.end(), name,
            torch::nn::AnyModule(input));
      }
      quantized = true;
    };
    for (size_t i = 0; i < n;) {
      const auto name = path(prefix, names[i]);
      if (!skipped(i) && registry_.weight_only(std::type_index(typeid(*modules[i])))) {
        // Indices in, float rows out: no activation FakeQuantize around it.
        chain.emplace_back(names[i], swap(modules[i], name, false));
        quantized = false;
        input = nullptr;
        at_input = false;
        ++i;
        continue;
      }
      const bool fold = !skipped(i) && i + 1 < n && fold_dims(*modules[i], *modules[i + 1]) != 0 &&
                        !skipped(i + 1);
      if (!skipped(i) && (fold || registry_.contains(std::type_index(typeid(*modules[i]))))) {
        const auto activation = config_.spec_for(name)->activation;
        if (!quantized) {
          fake_quant(
              at_input ? "input_fake_quant" : names[i] + "_input_fake_quant", activation, i,
              c10::nullopt, at_input ? 0 : chain.size());
        }
        const size_t after = fold ? i + 2 : i + 1;
        const bool fuses = fold || registry_.fuses_relu(std::type_index(typeid(*modules[i])));
        const bool relu = fuses && relu_at(after);
        // The integer kernel's ReLU with the output scale 6/255 saturates at the 6: the
        // ReLU6 stays in the chain, quantized after it with those fixed qparams.
        const bool relu6 = fuses && relu6_at(after);
        auto layer = fold ? fold_conv_bn(modules[i], modules[i + 1], name, relu)
                          : swap(modules[i], name, relu);
        auto* linked = dynamic_cast<InputQuantized*>(layer.ptr().get());
        if (linked != nullptr && linked->has_integer_kernel()) {
          linked->set_input_quantizer(input);
        }
        chain.emplace_back(names[i], std::move(layer));
        if (relu6) {
          chain.emplace_back(names[after], originals[after]);
        }
        fake_quant(
            names[relu6 ? after : i] + "_fake_quant", activation, i,
            relu6 ? c10::optional<Range>(Range{0.0, 6.0, true}) : c10::nullopt);
        if (linked != nullptr && linked->has_integer_kernel() && config_.backend() == "qnnpack") {
          linked->set_output_quantizer(input);
        }
        if (relu && linked != nullptr && input && input->can_take_relu()) {
          // One pass over the activation for the ReLU and its quantizer, forward and back.
          linked->hand_relu_to(input);
        }
        i = after + (relu || relu6 ? 1 : 0);
        at_input = false;
        continue;
      }
      if (!skipped(i)) {
        this->module(*modules[i], name);
      }
      const auto* role = skipped(i) ? nullptr : find_op_role(*modules[i]);
      const bool requantizing = role != nullptr && (role->role == OpRole::kRequantizes ||
                                                    role->role == OpRole::kFixedRange);
      if (requantizing && at_input && !quantized) {
        // As Python's prepare quantizes a model's input where it enters.
        fake_quant("input_fake_quant", config_.spec_for(name)->activation, i, c10::nullopt, 0);
      }
      chain.emplace_back(names[i], originals[i]);
      if (role == nullptr || role->role == OpRole::kLayer || role->role == OpRole::kMovesData) {
        quantized = false;
        input = nullptr;
      } else if (role->role == OpRole::kRequantizes) {
        // Quantized after, whatever its input, as in Python: the integer model runs it in
        // float between a dequantize and this quantize, or on its kernel.
        fake_quant(names[i] + "_fake_quant", config_.spec_for(name)->activation, i);
      } else if (role->role == OpRole::kFixedRange && quantized) {
        fake_quant(
            names[i] + "_fake_quant", config_.spec_for(name)->activation, i,
            Range{role->lo, role->hi, false});
      }
      at_input = at_input && !skipped(i) && has_role(*modules[i], OpRole::kPassesQParams);
      ++i;
    }

    // Built now (push_back refuses a name twice), assigned with the other edits.
    auto rebuilt = std::make_shared<torch::nn::SequentialImpl>();
    for (auto& item : chain) {
      rebuilt->push_back(item.first, std::move(item.second));
    }
    edits_.emplace_back([&sequential, rebuilt] { sequential = *rebuilt; });
  }

  torch::nn::AnyModule fold_conv_bn(
      const std::shared_ptr<torch::nn::Module>& conv, const std::shared_ptr<torch::nn::Module>& bn,
      const std::string& name, bool relu) {
    const auto specs = *config_.spec_for(name);
    return for_layer(name, *conv, [&] {
      const auto dims = fold_dims(*conv, *bn);
      return dims == 1   ? fold<1>(conv, bn, specs.weight, relu)
             : dims == 2 ? fold<2>(conv, bn, specs.weight, relu)
                         : fold<3>(conv, bn, specs.weight, relu);
    });
  }

  template <size_t D>
  static torch::nn::AnyModule fold(
      const std::shared_ptr<torch::nn::Module>& conv, const std::shared_ptr<torch::nn::Module>& bn,
      const QuantSpec& weight, bool relu) {
    using Types = detail::ConvTypes<D>;
    return torch::nn::AnyModule(std::make_shared<typename Types::QatConvBn>(
        std::dynamic_pointer_cast<typename Types::Conv>(conv),
        std::dynamic_pointer_cast<typename Types::BatchNorm>(bn), weight, relu));
  }

  const Config& config_;
  const ModuleRegistry& registry_;
  std::vector<std::function<void()>> edits_;
};

// A built-in registration: a `Float` module becomes a `Qat` one sharing its parameters.
// A layer fuses a following ReLU; a table (qat::WeightOnly: its rows are not quantized)
// has none to fuse and no activation FakeQuantize.
template <typename Float, typename Qat>
void add_builtin(ModuleRegistry& registry) {
  constexpr bool table = std::is_base_of_v<WeightOnly, Qat>;
  registry.add(
      std::type_index(typeid(Float)),
      [](const std::shared_ptr<torch::nn::Module>& module, const SwapOptions& options) {
        auto float_module = std::dynamic_pointer_cast<Float>(module);
        if constexpr (table) {
          return torch::nn::AnyModule(std::make_shared<Qat>(float_module, options.weight));
        } else {
          return torch::nn::AnyModule(
              std::make_shared<Qat>(float_module, options.weight, options.relu));
        }
      },
      /*fuses_relu=*/!table, /*replace=*/false, /*weight_only=*/table);
}

void set_all(torch::nn::Module& root, void (FakeQuantizeImpl::*set)(bool), bool enabled) {
  for (const auto& fake_quant : fake_quantizers(root)) {
    ((*fake_quant).*set)(enabled);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Registry

struct ModuleRegistry::State {
  struct Entry {
    ModuleFactory factory;
    bool fuses_relu;
    bool weight_only;
  };
  mutable std::mutex mutex;
  std::map<std::type_index, Entry> entries;
};

ModuleRegistry& ModuleRegistry::global() {
  static ModuleRegistry registry;
  return registry;
}

ModuleRegistry::ModuleRegistry() : state_(std::make_shared<State>()) {
  add_builtin<torch::nn::LinearImpl, LinearImpl>(*this);
  add_builtin<torch::nn::Conv1dImpl, Conv1dImpl>(*this);
  add_builtin<torch::nn::Conv2dImpl, Conv2dImpl>(*this);
  add_builtin<torch::nn::Conv3dImpl, Conv3dImpl>(*this);
  add_builtin<torch::nn::ConvTranspose1dImpl, ConvTranspose1dImpl>(*this);
  add_builtin<torch::nn::ConvTranspose2dImpl, ConvTranspose2dImpl>(*this);
  add_builtin<torch::nn::EmbeddingImpl, EmbeddingImpl>(*this);
  add_builtin<torch::nn::EmbeddingBagImpl, EmbeddingBagImpl>(*this);
}

void ModuleRegistry::add(
    std::type_index type, ModuleFactory factory, bool fuses_relu, bool replace, bool weight_only) {
  if (!factory) {
    throw std::invalid_argument(
        fmt::format("qat::register_module: the factory for {} is empty", type_name(type)));
  }
  if (fuses_relu && weight_only) {
    throw std::invalid_argument(fmt::format(
        "qat::register_module: {} cannot both fuse a ReLU and be weight-only (its output is "
        "not quantized)",
        type_name(type)));
  }
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (!replace && state_->entries.count(type) != 0) {
    throw std::invalid_argument(fmt::format(
        "qat::register_module: {} is registered already; pass replace=true to replace it",
        type_name(type)));
  }
  state_->entries[type] = State::Entry{std::move(factory), fuses_relu, weight_only};
}

bool ModuleRegistry::remove(std::type_index type) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->entries.erase(type) != 0;
}

bool ModuleRegistry::contains(std::type_index type) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->entries.count(type) != 0;
}

bool ModuleRegistry::fuses_relu(std::type_index type) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  const auto found = state_->entries.find(type);
  return found != state_->entries.end() && found->second.fuses_relu;
}

bool ModuleRegistry::weight_only(std::type_index type) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  const auto found = state_->entries.find(type);
  return found != state_->entries.end() && found->second.weight_only;
}

std::vector<std::string> ModuleRegistry::names() const {
  std::vector<std::string> names;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    for (const auto& item : state_->entries) {
      names.push_back(type_name(item.first));
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

torch::nn::AnyModule ModuleRegistry::swap(
    const std::shared_ptr<torch::nn::Module>& float_module, const SwapOptions& options) const {
  const std::type_index type(typeid(*float_module));
  ModuleFactory factory;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const auto found = state_->entries.find(type);
    if (found != state_->entries.end()) {
      factory = found->second.factory;
    }
  }
  // The factory runs unlocked: it may consult the registry itself.
  if (!factory) {
    throw std::invalid_argument(fmt::format(
        "qat::ModuleRegistry: no QAT module is registered for {} ('{}'); registered: {}; add "
        "one with qat::register_module<{}>(factory)",
        type_name(type), options.name, fmt::join(names(), ", "), type_name(type)));
  }
  auto module = factory(float_module, options);
  if (module.is_empty()) {
    throw std::invalid_argument(fmt::format(
        "qat::ModuleRegistry: the factory for {} ('{}') returned no module", type_name(type),
        options.name));
  }
  return module;
}

// ---------------------------------------------------------------------------------------
// prepare, calibrate, switches

void prepare(torch::nn::Module& root, const Config& config) {
  auto& registry = ModuleRegistry::global();
  if (registry.contains(std::type_index(typeid(root)))) {
    throw std::invalid_argument(fmt::format(
        "qat::prepare: the root module itself ({}) cannot be replaced in place; wrap it in a "
        "torch::nn::Sequential",
        root.name()));
  }
  check_not_prepared(root);
  check_config_names(root, config);
  check_observers(root, config, registry);
  Preparer(config, registry).run(root);
  root.train(true);
}

std::vector<std::shared_ptr<FakeQuantizeImpl>> fake_quantizers(torch::nn::Module& root) {
  std::vector<std::shared_ptr<FakeQuantizeImpl>> found;
  if (dynamic_cast<FakeQuantizeImpl*>(&root) != nullptr) {
    found.push_back(std::dynamic_pointer_cast<FakeQuantizeImpl>(root.shared_from_this()));
  }
  for (const auto& module : root.modules(/*include_self=*/false)) {
    if (auto fake_quant = std::dynamic_pointer_cast<FakeQuantizeImpl>(module)) {
      found.push_back(std::move(fake_quant));
    }
  }
  return found;
}

void calibrate_with(torch::nn::Module& root, const std::function<void()>& run) {
  const auto fake_quants = fake_quantizers(root);
  std::vector<bool> quantizing;
  for (const auto& fake_quant : fake_quants) {
    quantizing.push_back(fake_quant->is_fake_quant_enabled());
    fake_quant->enable_observer();
    fake_quant->disable_fake_quant();
  }
  // Module::train recurses, so restoring in tree order (parents first) gives every module
  // its own flag back.
  const bool root_training = root.is_training();
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> training;
  for (const auto& module : root.modules(/*include_self=*/false)) {
    training.emplace_back(module, module->is_training());
  }
  auto restore = [&]() {
    for (size_t i = 0; i < fake_quants.size(); ++i) {
      fake_quants[i]->update_qparams();
      fake_quants[i]->enable_fake_quant(quantizing[i]);
    }
    root.train(root_training);
    for (const auto& item : training) {
      item.first->train(item.second);
    }
  };
  root.eval();
  try {
    torch::NoGradGuard no_grad;
    run();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

void enable_observer(torch::nn::Module& root) {
  set_all(root, &FakeQuantizeImpl::enable_observer, true);
}

void disable_observer(torch::nn::Module& root) {
  set_all(root, &FakeQuantizeImpl::enable_observer, false);
}

void enable_fake_quant(torch::nn::Module& root) {
  set_all(root, &FakeQuantizeImpl::enable_fake_quant, true);
}

void disable_fake_quant(torch::nn::Module& root) {
  set_all(root, &FakeQuantizeImpl::enable_fake_quant, false);
}

}  // namespace qat
