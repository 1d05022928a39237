#pragma once

// Preparing a LibTorch model for quantization-aware training: the registry of QAT modules,
// qat::prepare, calibration and the observer / fake-quant switches.
//
// A typical C++ trainer:
// @code
//   torch::nn::Sequential net(
//       torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).bias(false)),
//       torch::nn::BatchNorm2d(8), torch::nn::ReLU(), torch::nn::Flatten(),
//       torch::nn::Linear(8 * 26 * 26, 10));
//   // ... float training ...
//   qat::prepare(*net, qat::presets::int8());   // net is rewritten in place
//   qat::calibrate(net, calibration_batches);   // optional: ranges from float activations
//   torch::optim::SGD opt(net->parameters(), 0.01);  // build the optimizer after prepare
//   // ... train as usual; torch::save(net, "qat.pt") keeps the qparams ...
// @endcode

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include <qat/config.h>
#include <qat/nn.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

namespace qat {

/// What a module factory is told about the layer it replaces.
struct SwapOptions {
  /// The layer's weight spec (the Config's default, or its override).
  QuantSpec weight;
  /// The layer's activation spec; prepare places the activation FakeQuantize itself.
  QuantSpec activation;
  /// A torch::nn::ReLU follows the layer in a Sequential and is fused into it (only for
  /// types registered with `fuses_relu`); the QAT module applies it.
  bool relu = false;
  /// The layer's path in the module tree, e.g. "features.0".
  std::string name;
};

/// Builds the QAT version of a float module. The result is an AnyModule so that it can
/// take the float module's place in a torch::nn::Sequential as well as anywhere else.
using ModuleFactory = std::function<torch::nn::AnyModule(
    const std::shared_ptr<torch::nn::Module>& float_module, const SwapOptions& options)>;

/// Which QAT module replaces which float module type, keyed by the exact dynamic type of
/// the float module (subclasses are not matched: their forward may differ).
///
/// Built in: torch::nn::Linear -> qat::Linear, Conv1d / 2d / 3d -> qat::Conv1d / 2d / 3d and
/// ConvTranspose1d / 2d -> qat::ConvTranspose1d / 2d (all fuse a following ReLU),
/// Embedding / EmbeddingBag -> qat::Embedding / EmbeddingBag (weight-only: no activation
/// FakeQuantize); prepare
/// folds Conv1d / 2d / 3d + BatchNorm1d / 2d / 3d into qat::ConvBn1d / 2d / 3d itself.
class ModuleRegistry {
 public:
  /// The process-wide registry that qat::prepare consults.
  static ModuleRegistry& global();

  /// Registers `factory` for float modules of type `type`.
  /// @param type the float module's Impl type, e.g. typeid(torch::nn::LinearImpl).
  /// @param factory builds the QAT module.
  /// @param fuses_relu whether the QAT module applies a ReLU that follows it in a
  ///        Sequential (SwapOptions::relu); otherwise the ReLU stays a module of its own.
  /// @param replace replace an earlier registration instead of failing.
  /// @param weight_only the QAT module takes no quantized activation and writes none (a
  ///        table: indices in, float rows out; qat::WeightOnly): prepare places no
  ///        activation FakeQuantize around it.
  /// @throws std::invalid_argument when `type` is registered and `replace` is false,
  ///         `factory` is empty, or both `fuses_relu` and `weight_only` are set.
  void add(
      std::type_index type, ModuleFactory factory, bool fuses_relu = false, bool replace = false,
      bool weight_only = false);
  /// Removes the registration of `type`; returns whether there was one.
  bool remove(std::type_index type);
  bool contains(std::type_index type) const;
  /// Whether the QAT module of `type` fuses a following ReLU (false if unregistered).
  bool fuses_relu(std::type_index type) const;
  /// Whether the QAT module of `type` is weight-only (false if unregistered).
  bool weight_only(std::type_index type) const;
  /// The registered float module types, demangled and sorted.
  std::vector<std::string> names() const;
  /// The QAT version of `float_module`.
  /// @throws std::invalid_argument naming the type and the registered ones when the type
  ///         is not registered.
  torch::nn::AnyModule swap(
      const std::shared_ptr<torch::nn::Module>& float_module, const SwapOptions& options) const;

 private:
  ModuleRegistry();
  struct State;
  std::shared_ptr<State> state_;
};

/// Registers the QAT module built by `factory` for float modules of type `FloatImpl`.
///
/// `factory(std::shared_ptr<FloatImpl>, const qat::SwapOptions&)` returns the QAT module:
/// a module holder, a std::shared_ptr to a module or a torch::nn::AnyModule; the module
/// must have a `forward(torch::Tensor)`. Usually it shares the float module's parameters.
/// @code
///   qat::register_module<MyLayerImpl>(
///       [](const std::shared_ptr<MyLayerImpl>& layer, const qat::SwapOptions& options) {
///         return QatMyLayer(layer, options.weight);
///       });
/// @endcode
/// @param fuses_relu the QAT module applies a following ReLU (see ModuleRegistry::add).
/// @param replace replace an earlier registration of `FloatImpl` instead of failing.
/// @param weight_only the QAT module takes and writes no quantized activation (see
///        ModuleRegistry::add).
/// @throws std::invalid_argument when `FloatImpl` is registered already and `replace` is
///         false, or both `fuses_relu` and `weight_only` are set.
template <typename FloatImpl, typename Factory>
void register_module(
    Factory factory, bool fuses_relu = false, bool replace = false, bool weight_only = false) {
  ModuleRegistry::global().add(
      std::type_index(typeid(FloatImpl)),
      [factory](const std::shared_ptr<torch::nn::Module>& module, const SwapOptions& options) {
        return torch::nn::AnyModule(factory(std::dynamic_pointer_cast<FloatImpl>(module), options));
      },
      fuses_relu, replace, weight_only);
}

/// Removes the registration of `FloatImpl`; returns whether there was one.
template <typename FloatImpl>
bool unregister_module() {
  return ModuleRegistry::global().remove(std::type_index(typeid(FloatImpl)));
}

/// Prepares `root` for quantization-aware training, in place:
/// - every registered module type (Linear, Conv1d / 2d / 3d, ConvTranspose1d / 2d, Embedding,
///   EmbeddingBag, user registrations) is replaced by its QAT version, which shares the
///   float parameters, using `replace_module`;
/// - inside a torch::nn::Sequential (rewritten in place, so that the holders pointing at it
///   see the change), a Conv1d / 2d / 3d followed by a BatchNorm1d / 2d / 3d is folded
///   into a qat::ConvBn1d / 2d / 3d, a ReLU right after a layer whose QAT version fuses it
///   is fused, and activation qat::FakeQuantize modules are inserted, where Python's
///   qat.prepare puts them: one on the Sequential's input (when a QAT layer or an op that
///   requantizes follows it through modules that pass qparams), one after each QAT layer
///   (after its ReLU) and after each op that requantizes (average pooling, a standalone
///   ReLU6, batch norm, LayerNorm, GroupNorm, ELU, LeakyReLU), and one right before a QAT
///   layer whose input is not fake-quantized (after a layer left in float, an embedding or
///   a custom module). Inserted modules are named "input_fake_quant", "<layer>_fake_quant"
///   and "<layer>_input_fake_quant"; QAT layers keep their float layer's name;
/// - layers named in `config.skip` stay in float, children included.
///
/// Attention and recurrent layers (torch::nn::MultiheadAttention, RNN, LSTM, GRU and their
/// cells) compute with their weights inside their own forward, where there is no graph to
/// place fake quantizers in: prepare refuses them, pointing to the Python route (qat.prepare
/// quantizes attention projections, the dynamic preset recurrent layers; the scripted model
/// trains on from C++, examples/cpp/train_scripted.cpp), unless `config.skip` keeps them float.
///
/// Custom modules: a module holder member of a custom module (`torch::nn::Linear fc{nullptr}`
/// used in forward as `fc(x)`) keeps pointing at the float layer after prepare replaces the
/// registered child, so its forward would silently bypass quantization. Hold layers in
/// torch::nn::Sequential members instead (even single ones): prepare rewrites those in
/// place. Arithmetic in a custom forward (residual adds, concatenations) is quantized by a
/// qat::FakeQuantize member that the module calls itself, built with the config's activation
/// spec (prepare leaves such modules as they are):
/// @code
///   struct BlockImpl : torch::nn::Module {
///     explicit BlockImpl(const qat::QuantSpec& activation_spec) {
///       body = register_module("body", torch::nn::Sequential(torch::nn::Linear(8, 8)));
///       add_fake_quant = register_module("add_fake_quant", qat::FakeQuantize(activation_spec));
///     }
///     torch::Tensor forward(torch::Tensor x) { return add_fake_quant(x + body->forward(x)); }
///     torch::nn::Sequential body{nullptr};
///     qat::FakeQuantize add_fake_quant{nullptr};
///   };
/// @endcode
/// Build the optimizer after prepare: learned qparams (lsq) are new parameters. The model
/// is left in training mode, as qat.prepare returns it.
///
/// prepare builds every QAT module and FakeQuantize before it changes the model, so that
/// when it throws, `root` is as it was (the same modules at the same paths, the same
/// parameters and buffers). A module factory (register_module) must not change the float
/// module it is given, for the same reason.
///
/// @param root the float model (e.g. `*net` for a holder `net`).
/// @param config the quantization config; each override and skip key (a name or a
///        pattern) must match a module, and each spec a layer gets must use an observer of
///        QuantSpec::module_observers().
/// @throws std::invalid_argument when `root` holds a QAT layer already (qat::Linear,
///         a qat conv: prepare the float model;
///         FakeQuantize members of custom modules are fine), a name or pattern in the config
///         matches no module, or a layer cannot be swapped (named with its path and type, followed
///         by the reason: an observer C++ does not have, with the config entry that asks for it, a
///         Conv2d padding mode other than zeros, a BatchNorm2d that cannot be folded, a factory
///         that throws std::invalid_argument), or it holds an attention or recurrent layer that
///         is not skipped.
void prepare(torch::nn::Module& root, const Config& config = Config());

/// Runs `run` (which feeds calibration batches through the model) with every
/// qat::FakeQuantize of `root` observing and not fake-quantizing, in eval mode and without
/// gradients; afterwards sets the qparams from the observers, turns fake quantization back
/// on where it was on, and restores each module's training flag. Observers stay on.
void calibrate_with(torch::nn::Module& root, const std::function<void()>& run);

/// Calibrates `model` (a module holder or std::shared_ptr with a `forward(torch::Tensor)`)
/// on `batches` (any range of tensors), as Python's qat.calibrate: see calibrate_with.
/// @param num_batches stop after this many batches (default: all of them).
/// @throws std::invalid_argument when `batches` is empty (and num_batches is not 0): nothing
/// would be observed.
template <typename Model, typename Batches>
void calibrate(
    Model& model, const Batches& batches, c10::optional<size_t> num_batches = c10::nullopt) {
  calibrate_with(*model, [&]() {
    size_t count = 0;
    for (const auto& batch : batches) {
      if (num_batches.has_value() && count >= *num_batches) {
        break;
      }
      model->forward(batch);
      ++count;
    }
    if (count == 0 && num_batches != size_t{0}) {
      throw std::invalid_argument("qat::calibrate: batches is empty, so nothing was observed");
    }
  });
}

/// The qat::FakeQuantize modules of `root` (itself included), in tree order.
std::vector<std::shared_ptr<FakeQuantizeImpl>> fake_quantizers(torch::nn::Module& root);

/// Turns observation on in every qat::FakeQuantize of `root` (learned qparams are then
/// re-initialized from the next batch).
void enable_observer(torch::nn::Module& root);
/// Freezes the ranges and qparams of every qat::FakeQuantize of `root`.
void disable_observer(torch::nn::Module& root);
/// Turns fake quantization on in every qat::FakeQuantize of `root`.
void enable_fake_quant(torch::nn::Module& root);
/// Lets every qat::FakeQuantize of `root` pass its input through.
void disable_fake_quant(torch::nn::Module& root);

}  // namespace qat
