#pragma once

// QAT modules for torch::nn: the observer, qat::FakeQuantize, and the QAT versions of
// Linear, Conv1d / 2d / 3d, Conv + BatchNorm, ConvTranspose1d / 2d, Embedding and
// EmbeddingBag. State (buffers,
// parameters) carries the names of the Python modules (qat.FakeQuantize, qat.modules.Linear, ...),
// so that named_parameters() / named_buffers() read the same in both languages.

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <qat/config.h>

#include <memory>
#include <ostream>
#include <type_traits>
#include <utility>

namespace qat {

/// Tracks the range of the tensors it sees: the running minimum and maximum ("minmax") or
/// their exponential moving average ("moving_average"), skipping NaN and +/-inf.
///
/// Buffers (as Python's qat.observers): `min_val` / `max_val` (float32; one element, or one
/// per channel once the first batch has sized them; +inf / -inf before any value),
/// `nonfinite_count` (int64 [1]). The buffers keep their dtype when the module is moved
/// to another dtype: the operators want float32 ranges.
class ObserverImpl : public torch::nn::Cloneable<ObserverImpl> {
 public:
  /// @param spec the quantization spec; its observer must be "minmax" or "moving_average"
  ///        (the histogram observers are Python-only for now).
  explicit ObserverImpl(QuantSpec spec = QuantSpec());

  void reset() override;

  /// Observes `input` and returns it unchanged.
  torch::Tensor forward(const torch::Tensor& input);

  /// (scale float32, zero_point int32) for the range seen so far, one element or one per
  /// channel; scale 1 and the default zero point where nothing was seen yet.
  std::pair<torch::Tensor, torch::Tensor> calculate_qparams() const;

  /// Sizes per-channel state for `channels` on the first batch; later checks the count.
  void ensure_channels(int64_t channels);

  const QuantSpec& spec() const { return spec_; }

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor min_val;
  torch::Tensor max_val;
  torch::Tensor nonfinite_count;

 private:
  QuantSpec spec_;
};
TORCH_MODULE(Observer);

/// Observes its input, chooses a scale and zero point from what it saw, and
/// fake-quantizes the input with them (gradients as the spec's estimator defines); the
/// C++ twin of Python's qat.FakeQuantize.
///
/// Forward is one operator, `qat::fused_observe_fake_quantize`
/// (torch.ops.qat.fused_observe_fake_quantize), the state machine Python's FakeQuantize runs
/// too: it updates the range and the qparams while observing, keeps a learned scale above
/// float32 eps, refuses to quantize with a scale that was never observed, and
/// fake-quantizes. Estimators that learn their qparams
/// ("lsq", "pact": the scale; "lsq_plus": scale and a float zero point) hold them as
/// parameters, initialized by the observer on the first batch it observes with fake
/// quantization on (after which the observer switches itself off and the parameters are
/// trained), or on every batch observed with fake quantization off (qat::calibrate).
///
/// State, named as in Python: `scale` (float32) and `zero_point` (int32), buffers or
/// parameters, one element or one per channel (per-channel ones are empty until the first
/// batch sizes them); `observer_enabled` and `fake_quant_enabled` (uint8 [1] switches,
/// saved with the model); the child `observer` (min_val, max_val, nonfinite_count).
///
/// @code
///   qat::FakeQuantize fq(qat::QuantSpec().bits(8));
///   auto y = fq(x);                 // observes x and fake-quantizes it
///   fq->disable_observer();         // freeze the qparams
/// @endcode
class FakeQuantizeImpl : public torch::nn::Cloneable<FakeQuantizeImpl> {
 public:
  /// @param spec how the input is quantized (observer "minmax" or "moving_average").
  explicit FakeQuantizeImpl(QuantSpec spec = QuantSpec());
  /// A FakeQuantize whose qparams are fixed by the op before it, whose output range is
  /// known (Python's qat.FixedQParamsFakeQuantize): a ReLU6 after a conv or linear runs in
  /// the integer model as the fused ReLU kernel with output scale 6/255 (range [0, 6],
  /// `inclusive`: 6 is the top level). The qparams are qat::fixed_qparams'; the observer
  /// stays off (enable_observer and update_qparams leave them).
  /// @throws std::invalid_argument for a per-channel spec, one that learns its qparams, or
  ///         a range that is not finite or does not hold zero.
  FakeQuantizeImpl(QuantSpec spec, double lo, double hi, bool inclusive);

  void reset() override;

  /// Observes `input` (if enabled) and returns it fake-quantized (if enabled).
  torch::Tensor forward(const torch::Tensor& input);

  /// `forward(weight * f) / f` with one factor `f` per output channel (axis 0), computed
  /// without building `weight * f` where the spec allows (the
  /// `qat::fake_quantize_folded` operator): the fake-quantized, batch-norm-folded weight
  /// of a conv, folded back. The qparams are those of `weight * f`.
  /// @param weight the conv weight, output channels along axis 0.
  /// @param factor one folding factor per output channel (gamma / sqrt(var + eps)).
  torch::Tensor forward_folded(const torch::Tensor& weight, const torch::Tensor& factor);

  /// `torch::nn::functional::linear(input, forward(weight))` (no bias) for a Linear's
  /// weight, output features along axis 0: per channel along axis 0 with qparams that are
  /// not learned, one operator (`qat::fake_quantized_linear`) multiplies the input with
  /// each block of output channels as soon as it is fake-quantized, while it is in cache.
  torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight);

  /// Sets scale and zero point (learned ones too) from the observer's range.
  void update_qparams();

  void enable_observer(bool enabled = true);
  void disable_observer() { enable_observer(false); }
  void enable_fake_quant(bool enabled = true);
  void disable_fake_quant() { enable_fake_quant(false); }
  bool is_observer_enabled() const;
  bool is_fake_quant_enabled() const;

  const QuantSpec& spec() const { return spec_; }
  int64_t quant_min() const { return quant_min_; }
  int64_t quant_max() const { return quant_max_; }
  /// Whether the qparams are fixed (the range constructor).
  bool has_fixed_qparams() const { return fixed_range_.has_value(); }
  /// Whether the estimator trains the scale / zero point (they are parameters).
  bool learns_scale() const { return learns_scale_; }
  bool learns_zero_point() const { return learns_zero_point_; }
  /// Whether `relu_input` makes one operator of a ReLU and this quantizer
  /// (`qat::observe_fake_quantize_relu`): per tensor, the "ste" estimator, qparams its
  /// observer chooses (Python's FakeQuantize.can_take_relu).
  bool can_take_relu() const;

  /// Whether the input is first put through a ReLU: set by qat::prepare on the output
  /// quantizer of a layer with a fused ReLU, which then leaves the ReLU to it
  /// (InputQuantized::hand_relu_to). One pass over the activation forward and one backward
  /// instead of two each, the same values and gradients.
  bool relu_input = false;

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor scale;
  torch::Tensor zero_point;
  torch::Tensor observer_enabled;
  torch::Tensor fake_quant_enabled;
  Observer observer{nullptr};

 private:
  c10::optional<int64_t> channel_axis(const torch::Tensor& input) const;
  void ensure_channels(int64_t channels);
  void fix_qparams();

  QuantSpec spec_;
  int64_t quant_min_;
  int64_t quant_max_;
  bool learns_scale_;
  bool learns_zero_point_;
  // (scale, zero_point) of the range constructor.
  c10::optional<std::pair<double, int64_t>> fixed_range_;
};
TORCH_MODULE(FakeQuantize);

/// What the QAT layers whose integer kernels add an int32 bias share: the link to the
/// FakeQuantize of their input, whose scale sets that bias grid.
class InputQuantized {
 public:
  /// The FakeQuantize of the layer's input (qat::prepare sets it). With it, and the weight
  /// fake-quantized, the layer rounds its bias to the integer kernels' int32 grid,
  /// input scale x weight scale (qat::round_bias), as Python's layers do with the
  /// `input_scale` qat.prepare passes them, so that the simulation adds exactly the bias
  /// the kernel adds. It is not a child (it belongs to the chain before the layer); a
  /// clone() links to the original's.
  /// @throws std::invalid_argument when the layer has no integer kernel (its bias stays float).
  void set_input_quantizer(FakeQuantize input);
  const FakeQuantize& input_quantizer() const { return input_quantizer_; }
  /// The FakeQuantize of the layer's output (qat::prepare sets it for the qnnpack backend,
  /// whose arithmetic qat::requantize reproduces). With it and the input quantizer, a conv
  /// (batch norm folded or not, transposed or not) or linear computes its output in eval as its
  /// integer kernel does, from the integers (computes_as_kernel), as Python's layers do with the
  /// `kernel_qparams` qat.prepare passes them: the file writes what the simulation wrote.
  /// Not a child either.
  void set_output_quantizer(FakeQuantize output);
  const FakeQuantize& output_quantizer() const { return output_quantizer_; }
  /// Whether qat::convert runs the layer on an integer kernel with an int32 bias (what
  /// qat::prepare links an input quantizer to; Python's qat.prepare.has_integer_kernel).
  virtual bool has_integer_kernel() const { return true; }
  /// Leaves the layer's fused ReLU to `output`, the FakeQuantize after it (qat::prepare,
  /// where output->can_take_relu(), as Python's prepare does for a conv + batch norm +
  /// ReLU): the layer returns its output before the ReLU and `output` applies it
  /// (FakeQuantizeImpl::relu_input). qat::convert still fuses the ReLU into the kernel.
  /// @throws std::invalid_argument when `output` cannot take it (null, or not can_take_relu).
  void hand_relu_to(FakeQuantize output);
  /// Whether the layer applies its fused ReLU itself (it has one and kept it).
  bool applies_relu(bool relu) const { return relu && !relu_handed_over_; }
  virtual ~InputQuantized() = default;
  /// `bias` as the layer adds it: rounded to the kernels' grid when the input quantizer is
  /// set and `weight_fq` fake-quantizes, else as it is. qat::convert stores this bias: a
  /// kernel that adds a float bias as it is (FBGEMM) adds what the simulation added.
  torch::Tensor kernel_bias(const torch::Tensor& bias, FakeQuantizeImpl& weight_fq) const;

 protected:
  /// Whether the layer computes its output as its kernel does: in eval (`training` false),
  /// both quantizers set, the weight, input and output fake-quantized and the output's
  /// observer off (calibration observes the float output). Python's
  /// qat.modules._common.computes_as_kernel.
  bool computes_as_kernel(bool training, FakeQuantizeImpl& weight_fq) const;
  /// qat::integer_operands of `input` and the fake-quantized `weight` (per channel along
  /// `axis`: 1 for a transposed conv; times `factor` first when defined).
  std::tuple<torch::Tensor, torch::Tensor> integer_operands(
      const torch::Tensor& input, const torch::Tensor& weight, FakeQuantizeImpl& weight_fq,
      int64_t axis = 0, const torch::Tensor& factor = {}) const;
  /// qat::requantize of the accumulator `acc` (output channels along `axis`) with `bias`.
  torch::Tensor kernel_output(
      const torch::Tensor& acc, const torch::Tensor& bias, FakeQuantizeImpl& weight_fq,
      int64_t axis) const;

 private:
  FakeQuantize input_quantizer_{nullptr};
  FakeQuantize output_quantizer_{nullptr};
  bool relu_handed_over_ = false;
};

/// What the QAT modules that quantize only their weight share (the embedding tables: indices
/// in, float rows out), registered `weight_only` (qat::ModuleRegistry::add): qat::prepare
/// places no activation FakeQuantize around them, and refuses a model holding one as
/// prepared already.
class WeightOnly {
 public:
  virtual ~WeightOnly() = default;
};

/// QAT torch::nn::Linear: the weight goes through `weight_fake_quant` (per channel along
/// the output features when the spec is per channel) before the matmul; the bias is
/// rounded to the integer kernels' int32 grid once the input quantizer is set (see
/// InputQuantized).
/// Parameters `weight`, `bias`; child `weight_fake_quant`.
class LinearImpl : public torch::nn::Cloneable<LinearImpl>, public InputQuantized {
 public:
  /// A fresh layer, initialized as torch::nn::Linear.
  /// @param options as torch::nn::Linear's.
  /// @param weight_spec the weight's spec; a per-channel one is forced to axis 0.
  /// @param relu apply a ReLU to the output (a fused Linear + ReLU).
  explicit LinearImpl(
      torch::nn::LinearOptions options, QuantSpec weight_spec = Config().weight(),
      bool relu = false);
  /// The QAT version of `linear`, sharing its weight and bias (an optimizer built on the
  /// float model keeps training them).
  explicit LinearImpl(
      const std::shared_ptr<torch::nn::LinearImpl>& linear,
      QuantSpec weight_spec = Config().weight(), bool relu = false);

  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  torch::nn::LinearOptions options;
  bool relu;
  torch::Tensor weight;
  torch::Tensor bias;
  FakeQuantize weight_fake_quant{nullptr};

 private:
  QuantSpec weight_spec_;
};
TORCH_MODULE(Linear);

class Conv1dImpl;
class Conv2dImpl;
class Conv3dImpl;
class ConvBn1dImpl;
class ConvBn2dImpl;
class ConvBn3dImpl;
class ConvTranspose1dImpl;
class ConvTranspose2dImpl;

namespace detail {
// The float modules a QAT conv of D spatial dimensions (1, 2 or 3) replaces and folds, and
// the QAT ones. Neither front end has a QAT transposed 3-D conv: QatConvTranspose is void
// for D = 3.
template <size_t D>
struct ConvTypes {
  static_assert(D >= 1 && D <= 3, "the C++ front end has 1-D, 2-D and 3-D convs");
  template <typename OneD, typename TwoD, typename ThreeD>
  using Pick = std::conditional_t<D == 1, OneD, std::conditional_t<D == 2, TwoD, ThreeD>>;
  using Conv = Pick<torch::nn::Conv1dImpl, torch::nn::Conv2dImpl, torch::nn::Conv3dImpl>;
  using BatchNorm =
      Pick<torch::nn::BatchNorm1dImpl, torch::nn::BatchNorm2dImpl, torch::nn::BatchNorm3dImpl>;
  using BatchNormHolder =
      Pick<torch::nn::BatchNorm1d, torch::nn::BatchNorm2d, torch::nn::BatchNorm3d>;
  using ConvTranspose = Pick<
      torch::nn::ConvTranspose1dImpl, torch::nn::ConvTranspose2dImpl,
      torch::nn::ConvTranspose3dImpl>;
  using QatConv = Pick<qat::Conv1dImpl, qat::Conv2dImpl, qat::Conv3dImpl>;
  using QatConvBn = Pick<qat::ConvBn1dImpl, qat::ConvBn2dImpl, qat::ConvBn3dImpl>;
  using QatConvTranspose = Pick<qat::ConvTranspose1dImpl, qat::ConvTranspose2dImpl, void>;
};
}  // namespace detail

/// QAT torch::nn::Conv1d / 2d / 3d (qat::Conv1d, qat::Conv2d, qat::Conv3d) and, `Transposed`,
/// ConvTranspose1d / 2d (qat::ConvTranspose1d, 2d): the weight goes through
/// `weight_fake_quant` before the convolution, per output channel when the spec is per
/// channel (axis 0; axis 1 of a transposed conv's in x out x kernel weight). Zero padding
/// only, as PyTorch's quantized convs pad; a transposed conv takes the output padding of its
/// options (a call cannot ask for an output size). A grouped transposed conv has one weight
/// scale per output channel of a group (shared by the groups), which no integer kernel keeps:
/// qat::convert runs it in float on its fake-quantized weight, as Python's convert does.
/// Parameters `weight`, `bias`; child `weight_fake_quant`. `Derived` is the final class, as
/// in torch::nn's own ConvNdImpl; each declares forward itself, since torch::nn::AnyModule
/// (Sequential::ptr<T>) takes a module's type from it.
template <size_t D, bool Transposed, typename Derived>
class ConvImpl : public torch::nn::Cloneable<Derived>, public InputQuantized {
 public:
  using FloatConv = std::conditional_t<
      Transposed, typename detail::ConvTypes<D>::ConvTranspose,
      typename detail::ConvTypes<D>::Conv>;
  using Options =
      std::conditional_t<Transposed, torch::nn::ConvTransposeOptions<D>, torch::nn::ConvOptions<D>>;
  /// A fresh layer, initialized as the float conv.
  /// @param options as the float conv's (torch::nn::Conv2dOptions, ...).
  /// @param weight_spec the weight's spec; a per-channel one is forced to the output
  ///        channels' axis.
  /// @param relu apply a ReLU to the output (a fused conv + ReLU; the integer model of a
  ///        transposed conv applies it to its quantized output, exact as the grid holds 0).
  explicit ConvImpl(Options options, QuantSpec weight_spec = Config().weight(), bool relu = false);
  /// The QAT version of `conv`, sharing its weight and bias.
  explicit ConvImpl(
      const std::shared_ptr<FloatConv>& conv, QuantSpec weight_spec = Config().weight(),
      bool relu = false);

  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;
  /// False for a grouped transposed conv (float in the integer model).
  bool has_integer_kernel() const override { return !Transposed || options.groups() == 1; }

  Options options;
  bool relu;
  torch::Tensor weight;
  torch::Tensor bias;
  FakeQuantize weight_fake_quant{nullptr};

 private:
  QuantSpec weight_spec_;
};
class Conv1dImpl : public ConvImpl<1, false, Conv1dImpl> {
 public:
  using ConvImpl::ConvImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvImpl::forward(input); }
};
class Conv2dImpl : public ConvImpl<2, false, Conv2dImpl> {
 public:
  using ConvImpl::ConvImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvImpl::forward(input); }
};
class Conv3dImpl : public ConvImpl<3, false, Conv3dImpl> {
 public:
  using ConvImpl::ConvImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvImpl::forward(input); }
};
class ConvTranspose1dImpl : public ConvImpl<1, true, ConvTranspose1dImpl> {
 public:
  using ConvImpl::ConvImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvImpl::forward(input); }
};
class ConvTranspose2dImpl : public ConvImpl<2, true, ConvTranspose2dImpl> {
 public:
  using ConvImpl::ConvImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvImpl::forward(input); }
};
TORCH_MODULE(Conv1d);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Conv3d);
TORCH_MODULE(ConvTranspose1d);
TORCH_MODULE(ConvTranspose2d);

/// Conv + BatchNorm (+ ReLU) of D spatial dimensions (qat::ConvBn1d, 2d, 3d) trained
/// as the folded conv the integer model runs (the formula of Python's qat.modules.ConvBn2d
/// and PyTorch's ConvBn2d): the weight is scaled by gamma / sqrt(running_var + eps) and
/// fake-quantized, so the quantization error is that of the folded weight; the conv output
/// is divided by the same factor and goes through `bn`, which in training normalizes with
/// the batch statistics (and updates the running ones) and in eval with the running ones,
/// where the whole equals the folded conv.
/// Parameters `weight`, `bias` (the conv's); children `bn`, `weight_fake_quant`. `Derived`
/// as in ConvImpl.
template <size_t D, typename Derived>
class ConvBnImpl : public torch::nn::Cloneable<Derived>, public InputQuantized {
 public:
  using FloatConv = typename detail::ConvTypes<D>::Conv;
  using FloatBatchNorm = typename detail::ConvTypes<D>::BatchNorm;
  /// A fresh layer.
  /// @param conv_options as the float conv's (usually without bias).
  /// @param bn_options as the batch norm's; num_features must equal out_channels, affine
  ///        and track_running_stats must be on.
  /// @param weight_spec the weight's spec; a per-channel one is forced to axis 0.
  /// @param relu apply a ReLU after the batch norm.
  ConvBnImpl(
      torch::nn::ConvOptions<D> conv_options, torch::nn::BatchNormOptions bn_options,
      QuantSpec weight_spec = Config().weight(), bool relu = false);
  /// The QAT fold of `conv` followed by `bn`, sharing the conv's parameters and the batch
  /// norm module itself (parameters and running statistics).
  ConvBnImpl(
      const std::shared_ptr<FloatConv>& conv, const std::shared_ptr<FloatBatchNorm>& bn,
      QuantSpec weight_spec = Config().weight(), bool relu = false);

  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  /// Keeps `bn` in eval mode while the statistics are frozen.
  void train(bool on = true) override;
  /// Normalize with the running statistics and stop updating them, in training too (as is
  /// done late in training).
  void freeze_bn_stats();
  /// Back to batch statistics (and running-statistic updates) in training.
  void unfreeze_bn_stats();
  bool bn_frozen() const { return freeze_bn_; }
  void pretty_print(std::ostream& stream) const override;

  torch::nn::ConvOptions<D> options;
  bool relu;
  torch::Tensor weight;
  torch::Tensor bias;
  typename detail::ConvTypes<D>::BatchNormHolder bn{nullptr};
  FakeQuantize weight_fake_quant{nullptr};

 private:
  torch::nn::BatchNormOptions bn_options_;
  QuantSpec weight_spec_;
  bool freeze_bn_ = false;
};
class ConvBn1dImpl : public ConvBnImpl<1, ConvBn1dImpl> {
 public:
  using ConvBnImpl::ConvBnImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvBnImpl::forward(input); }
};
class ConvBn2dImpl : public ConvBnImpl<2, ConvBn2dImpl> {
 public:
  using ConvBnImpl::ConvBnImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvBnImpl::forward(input); }
};
class ConvBn3dImpl : public ConvBnImpl<3, ConvBn3dImpl> {
 public:
  using ConvBnImpl::ConvBnImpl;
  torch::Tensor forward(const torch::Tensor& input) { return ConvBnImpl::forward(input); }
};
TORCH_MODULE(ConvBn1d);
TORCH_MODULE(ConvBn2d);
TORCH_MODULE(ConvBn3d);

/// What qat::Embedding and qat::EmbeddingBag share: the table goes through
/// `weight_fake_quant` (one scale per row, axis 0, when the spec is per channel) before the
/// lookup; the integer model reads rows with quantized::embedding_byte /
/// embedding_bag_byte (per-row specs only). Weight-only: its input is indices and its rows
/// stay float, so prepare puts no activation FakeQuantize before or after it. Dense tables
/// only: a sparse gradient cannot flow back through the fake-quantized (dense) table. With
/// max_norm, the float table's looked-up rows are renormalized in place before the table is
/// fake-quantized (as Python's qat.Embedding: a row's norm may exceed max_norm by its
/// quantization error); qat::convert renormalizes every row as a lookup would, then
/// quantizes the table, read as it is. Parameter `weight`; child `weight_fake_quant`.
/// `Options` is torch::nn::EmbeddingOptions or EmbeddingBagOptions, `Derived` the final
/// class.
class EmbeddingImpl;

template <typename Options, typename Derived>
class EmbeddingTableImpl : public torch::nn::Cloneable<Derived>, public WeightOnly {
 public:
  /// "qat::Embedding" or "qat::EmbeddingBag": how errors and printing name the module.
  static const char* display_name() {
    return std::is_same_v<Derived, EmbeddingImpl> ? "qat::Embedding" : "qat::EmbeddingBag";
  }

  /// A fresh table, initialized as torch::nn::Embedding / EmbeddingBag.
  /// @param options as the float module's.
  /// @param weight_spec the table's spec; a per-channel one is forced to axis 0 (rows).
  /// @throws std::invalid_argument for a sparse table.
  explicit EmbeddingTableImpl(Options options, QuantSpec weight_spec = Config().weight());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  Options options;
  torch::Tensor weight;
  FakeQuantize weight_fake_quant{nullptr};

 protected:
  torch::Tensor renormalize(const torch::Tensor& input);

 private:
  QuantSpec weight_spec_;
};

/// QAT torch::nn::Embedding (qat::Embedding), as EmbeddingTableImpl.
class EmbeddingImpl : public EmbeddingTableImpl<torch::nn::EmbeddingOptions, EmbeddingImpl> {
 public:
  using EmbeddingTableImpl::EmbeddingTableImpl;
  /// The QAT version of `embedding`, sharing its table.
  explicit EmbeddingImpl(
      const std::shared_ptr<torch::nn::EmbeddingImpl>& embedding,
      QuantSpec weight_spec = Config().weight());
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(Embedding);

/// QAT torch::nn::EmbeddingBag (qat::EmbeddingBag), as EmbeddingTableImpl: the bags of the
/// fake-quantized table, summed (times `per_sample_weights` when given), averaged or
/// maxed as the options say. qat::convert lowers mode sum and mean without a padding index
/// (the kernel sums every entry) on 2-D input (a bag per row, as a Sequential passes it);
/// a bag of mode max or with a padding index stays float, its table fake-quantized.
class EmbeddingBagImpl
    : public EmbeddingTableImpl<torch::nn::EmbeddingBagOptions, EmbeddingBagImpl> {
 public:
  using EmbeddingTableImpl::EmbeddingTableImpl;
  /// The QAT version of `bag`, sharing its table.
  explicit EmbeddingBagImpl(
      const std::shared_ptr<torch::nn::EmbeddingBagImpl>& bag,
      QuantSpec weight_spec = Config().weight());
  /// As torch::nn::EmbeddingBag's forward.
  torch::Tensor forward(
      const torch::Tensor& input, const torch::Tensor& offsets = {},
      const torch::Tensor& per_sample_weights = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS(
      {1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(EmbeddingBag);

}  // namespace qat
