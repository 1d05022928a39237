// Range statistics, qparam math and the fused observe + fake-quantize operator.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <qat/estimator.h>
#include <qat/fake_quantize.h>
#include <qat/observers.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "../estimators/rule_estimator.h"
#include "../ops/cpu/buffer_pool.h"
#include "../ops/cpu/fake_quantize_loops.h"
#include "../ops/fake_quantize_common.h"
#include "observe_blocks.h"
#include "qparams_math.h"

namespace qat {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The reductions of aminmax for a device without qat's CPU loops, in ATen ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aminmax_with_aten(
    const at::Tensor& x, c10::optional<int64_t> axis) {
  const auto finite = at::isfinite(x);
  const auto lo = at::where(finite, x, at::full({}, kInf, x.options()));
  const auto hi = at::where(finite, x, at::full({}, -kInf, x.options()));
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (!axis.has_value() || d != *axis) {
      dims.push_back(d);
    }
  }
  const int64_t size = axis.has_value() ? x.size(*axis) : 1;
  if (x.numel() == 0) {
    return {
        at::full({size}, kInf, x.options()), at::full({size}, -kInf, x.options()),
        at::zeros({size}, x.options().dtype(at::kLong))};
  }
  return {
      lo.amin(dims).reshape({size}), hi.amax(dims).reshape({size}),
      finite.logical_not().sum(dims).reshape({size})};
}

// One channel's qparams; a channel with nothing observed (min > max) gets scale 1 and
// the zero point a range of zeros would get.
std::pair<float, float> qparams_of(
    const char* op, int64_t channel, float lo, float hi, int64_t quant_min, int64_t quant_max,
    bool symmetric) {
  if (!(lo <= hi)) {
    return {
        1.0f, static_cast<float>(
                  symmetric ? detail::symmetric_zero_point(quant_min, quant_max)
                            : std::min<int64_t>(std::max<int64_t>(0, quant_min), quant_max))};
  }
  const auto q = detail::qparams_for_range<float>(lo, hi, quant_min, quant_max, symmetric);
  // A finite range can still be too wide: (hi - lo) overflows float32 past ~3.4e38, and the
  // scale then is inf, which every fake-quantize refuses with a message about the scale
  // rather than about the data that caused it.
  TORCH_CHECK(
      std::isfinite(q.first), op, ": the observed range [", lo, ", ", hi, "] of channel ", channel,
      " is too wide for float32 (its scale overflows to inf): the data holds values near the "
      "float32 limit");
  return q;
}

std::tuple<int64_t, int64_t> quant_range_op(int64_t bits, bool is_signed, bool narrow) {
  const auto range = quant_range(bits, is_signed, narrow);
  return {range.first, range.second};
}

struct ObserverState {
  at::Tensor& running_min;
  at::Tensor& running_max;
  at::Tensor& scale;
  at::Tensor& zero_point;
  int64_t quant_min;
  int64_t quant_max;
  c10::optional<double> averaging_constant;
  bool symmetric;
};

// Whether the running range has seen a finite value: asked on every call of an activation
// FakeQuantize whose observer is off (observers are often frozen for the last part of QAT),
// where isfinite().any().item() would cost three small tensor operations (~10 us).
bool observed_any(const at::Tensor& running_min) {
  if (running_min.is_cpu() && running_min.scalar_type() == at::kFloat &&
      running_min.is_contiguous()) {
    const float* values = running_min.data_ptr<float>();
    return std::any_of(
        values, values + running_min.numel(), [](float v) { return std::isfinite(v); });
  }
  return at::isfinite(running_min).any().item<bool>();
}

// The callers have checked the quant range already (observing or not).
void check_observer_state(const char* op, const ObserverState& state) {
  const auto& average = state.averaging_constant;
  TORCH_CHECK(
      !average.has_value() || (*average > 0.0 && *average <= 1.0), op,
      ": averaging_constant must be in (0, 1], got ", *average);
  TORCH_CHECK(
      !state.scale.requires_grad() && !state.zero_point.requires_grad(), op,
      ": scale and zero_point are overwritten when observe=True, so they must not require "
      "grad (estimators that learn them are initialized by an observer, then observe=False)");
  for (const auto* buffer : {&state.running_min, &state.running_max}) {
    TORCH_CHECK(
        buffer->scalar_type() == at::kFloat, op,
        ": running_min and running_max must be float32 tensors, got ", buffer->scalar_type());
  }
}

// Adds NaN/inf counts to the optional nonfinite_count buffer (one entry, or one per
// channel).
void count_nonfinite(
    const char* op, const c10::optional<at::Tensor>& nonfinite_count, const at::Tensor& counts) {
  if (!nonfinite_count.has_value() || !nonfinite_count->defined()) {
    return;
  }
  auto count = *nonfinite_count;
  if (count.numel() == 1 && count.is_cpu() && count.scalar_type() == at::kLong && counts.is_cpu() &&
      counts.scalar_type() == at::kLong && counts.is_contiguous()) {
    // Every batch of a per-tensor buffer (one count per channel summed into it for a
    // per-channel weight): plain additions, not three small tensor ops.
    const int64_t* batch = counts.data_ptr<int64_t>();
    count.data_ptr<int64_t>()[0] += std::accumulate(batch, batch + counts.numel(), int64_t{0});
    torch::autograd::impl::bump_version(count);
  } else if (count.numel() == 1) {
    count.add_(counts.sum().to(count.device()));
  } else {
    TORCH_CHECK(
        count.numel() == counts.numel(), op, ": nonfinite_count has ", count.numel(),
        " entries; expected 1 or one per channel (", counts.numel(), ")");
    count.add_(counts.to(count.device()).reshape(count.sizes()));
  }
}

// The observers' state machine, the one place it is written: folds one batch's range into
// the running range, per channel. MinMax (no averaging constant) takes the union; a moving
// average starts at the first batch's range and then moves by `average` of the difference,
// in float32. A channel with no finite value in the batch (min > max) keeps its range.
void merge_range_into(
    float* lo, float* hi, const float* blo, const float* bhi, int64_t channels,
    c10::optional<double> average) {
  for (int64_t c = 0; c < channels; ++c) {
    if (!(blo[c] <= bhi[c])) {
      continue;
    }
    if (!average.has_value() || !(lo[c] <= hi[c])) {
      lo[c] = average.has_value() ? blo[c] : std::min(lo[c], blo[c]);
      hi[c] = average.has_value() ? bhi[c] : std::max(hi[c], bhi[c]);
    } else {
      const float k = static_cast<float>(*average);
      lo[c] = lo[c] + k * (blo[c] - lo[c]);
      hi[c] = hi[c] + k * (bhi[c] - hi[c]);
    }
  }
}

// Whether the state's buffers are CPU tensors, contiguous, in the dtypes FakeQuantize keeps
// (running range float32 as checked, scale float32, zero point int32), so that their data
// can be updated where it lies.
bool updatable_in_place(const ObserverState& state) {
  const std::initializer_list<const at::Tensor*> buffers{
      &state.running_min, &state.running_max, &state.scale, &state.zero_point};
  return std::all_of(
             buffers.begin(), buffers.end(),
             [](const at::Tensor* t) { return t->is_cpu() && t->is_contiguous(); }) &&
         state.scale.scalar_type() == at::kFloat && state.zero_point.scalar_type() == at::kInt;
}

// Folds one batch's per-channel range (CPU float32; min > max where the batch had no
// finite value) into the running range, and sets scale and zero point from it.
void update_observer_state(
    const char* op, ObserverState& state, const at::Tensor& batch_min,
    const at::Tensor& batch_max) {
  const int64_t channels = batch_min.numel();
  // Per-channel state learns its size from the first batch. The tensor object stays (modules,
  // DDP and optimizers hold it) and takes fresh storage: a buffer loaded from a checkpoint
  // lives in the file's storage, which cannot be resized.
  for (auto* buffer : {&state.running_min, &state.running_max}) {
    if (buffer->numel() == 0) {
      buffer->set_(at::empty({channels}, buffer->options()));
      buffer->fill_(buffer == &state.running_min ? kInf : -kInf);
    }
    TORCH_CHECK(
        buffer->numel() == channels, op, ": the running range has ", buffer->numel(),
        " entries but the input has ", channels, " channels");
  }
  for (auto* target : {&state.scale, &state.zero_point}) {
    if (target->numel() != channels) {
      target->set_(at::empty({channels}, target->options()));
    }
  }
  // On the CPU, with the buffers in the dtypes FakeQuantize keeps, the state is updated
  // where it lies: a per-batch call on a small tensor is otherwise mostly copies.
  const bool in_place = updatable_in_place(state);
  auto run_min =
      in_place ? state.running_min : state.running_min.detach().to(at::kCPU).contiguous();
  auto run_max =
      in_place ? state.running_max : state.running_max.detach().to(at::kCPU).contiguous();
  float* lo = run_min.data_ptr<float>();
  float* hi = run_max.data_ptr<float>();
  const float* blo = batch_min.data_ptr<float>();
  const float* bhi = batch_max.data_ptr<float>();
  merge_range_into(lo, hi, blo, bhi, channels, state.averaging_constant);
  if (in_place) {
    float* sp = state.scale.data_ptr<float>();
    int32_t* zp = state.zero_point.data_ptr<int32_t>();
    for (int64_t c = 0; c < channels; ++c) {
      const auto q =
          qparams_of(op, c, lo[c], hi[c], state.quant_min, state.quant_max, state.symmetric);
      sp[c] = q.first;
      zp[c] = static_cast<int32_t>(q.second);
    }
    // Writes through data_ptr bypass autograd's version counters: bump them as copy_
    // would, so that a backward still holding the old values notices.
    for (auto* t : {&state.running_min, &state.running_max, &state.scale, &state.zero_point}) {
      torch::autograd::impl::bump_version(*t);
    }
  } else {
    state.running_min.copy_(run_min);
    state.running_max.copy_(run_max);
    const auto qparams =
        qat::choose_qparams(run_min, run_max, state.quant_min, state.quant_max, state.symmetric);
    state.scale.copy_(std::get<0>(qparams));
    state.zero_point.copy_(std::get<1>(qparams));
  }
}

// As torch.ao's learnable fake quantize: an optimizer step may push a learned scale to or
// below zero, where fake_quantize rightly refuses it. Through .data(), so that the version
// counter stays: the scale an earlier forward saved (two forwards, one backward) must not
// look modified in place.
void clamp_learned_scale(const at::Tensor& scale) {
  scale.data().clamp_min_(std::numeric_limits<float>::epsilon());
}

// The smallest fold factor magnitude a folded scale divides by.
constexpr float kMinMagnitude = std::numeric_limits<float>::epsilon();

// Quantizing w * f with (scale, zero_point) is f times quantizing w with
// (scale / |f|, zero_point), or with zero point quant_min + quant_max - zero_point where
// f < 0 (the integer range flips).
std::pair<float, int32_t> folded_qparams(
    float scale, int32_t zero_point, float f, int64_t quant_min, int64_t quant_max) {
  return {
      scale / std::max(std::abs(f), kMinMagnitude),
      f < 0 ? static_cast<int32_t>(quant_min + quant_max) - zero_point : zero_point};
}

// The range of w * f from w's range [lo, hi]: f times it, its ends swapped where f < 0.
// An unobserved range (lo > hi: nothing finite) stays unobserved.
void fold_range(float& lo, float& hi, float f) {
  if (!(lo <= hi)) {
    return;
  }
  const float a = lo * f;
  const float b = hi * f;
  lo = std::min(a, b);
  hi = std::max(a, b);
}

// What the one-pass loop needs to update a channel's state: the buffers' data, and for a
// batch-norm-folded weight its factors and the folded qparams it quantizes with.
struct ChannelStateUpdate {
  const char* op;
  float* running_min;
  float* running_max;
  float* scale;
  int32_t* zero_point;
  int64_t quant_min;
  int64_t quant_max;
  c10::optional<double> averaging_constant;
  bool symmetric;
  const float* factor = nullptr;
  float* folded_scale = nullptr;
  int32_t* folded_zero_point = nullptr;
};

cpu::ChannelQParams update_channel(void* context, int64_t c, float lo, float hi) {
  const auto& u = *static_cast<const ChannelStateUpdate*>(context);
  if (u.factor != nullptr) {
    fold_range(lo, hi, u.factor[c]);
  }
  merge_range_into(u.running_min + c, u.running_max + c, &lo, &hi, 1, u.averaging_constant);
  const auto q = qparams_of(
      u.op, c, u.running_min[c], u.running_max[c], u.quant_min, u.quant_max, u.symmetric);
  u.scale[c] = q.first;
  u.zero_point[c] = static_cast<int32_t>(q.second);
  if (u.factor == nullptr) {
    return {q.first, q.second};
  }
  const auto folded =
      folded_qparams(q.first, u.zero_point[c], u.factor[c], u.quant_min, u.quant_max);
  u.folded_scale[c] = folded.first;
  u.folded_zero_point[c] = folded.second;
  return {folded.first, static_cast<float>(folded.second)};
}

// The fused operators' usual call on a weight (per channel along axis 0, contiguous
// float32 on the CPU, each channel a run of at least cpu::kMinObserveForwardRun values,
// the state already sized, an estimator whose backward needs only the codes): observed and
// fake-quantized channel by channel in one pass over the weight instead of two (a
// 1024x3072 weight: the range reduction was 0.4 of its 1.1 ms). With `factor` (one per
// channel, CPU float32) the weight is batch-norm folded as in fake_quantize_folded. The
// same state, output and gradient as the two-pass path, which every other call takes
// (nullopt here).
c10::optional<at::Tensor> observe_fake_quantize_channel_runs(
    const char* op, const at::Tensor& input, ObserverState& state, c10::optional<int64_t> axis,
    const std::string& estimator, const c10::optional<at::Tensor>& nonfinite_count,
    const float* factor, const detail::WrittenBlocks* written = nullptr) {
  if (!axis.has_value() || *axis != 0 || !input.is_cpu() || input.scalar_type() != at::kFloat ||
      !input.is_contiguous() || input.dim() < 2 || input.size(0) == 0) {
    return c10::nullopt;
  }
  const int64_t channels = input.size(0);
  const int64_t inner = input.numel() / channels;
  // A first batch sizes the state on the two-pass path; check_observer_state (below)
  // refuses a running range that is not float32.
  if (inner < cpu::kMinObserveForwardRun || !updatable_in_place(state)) {
    return c10::nullopt;
  }
  for (const auto* t : {&state.running_min, &state.running_max, &state.scale, &state.zero_point}) {
    if (t->numel() != channels) {
      return c10::nullopt;
    }
  }
  const auto chosen = EstimatorRegistry::global().get(estimator);
  const auto* rule = dynamic_cast<const RuleEstimator*>(chosen.get());
  if (rule == nullptr || !rule->needs_only_codes()) {
    return c10::nullopt;
  }
  check_observer_state(op, state);
  const bool records = at::GradMode::is_enabled() && input.requires_grad();
  auto output = cpu::pooled_empty_like(input, at::kFloat);
  cpu::ClampedRecord clamped;
  auto counts = at::empty({channels}, at::kLong);
  // The qparams the weight is quantized with: the state's, or the folded ones.
  auto scale = factor != nullptr ? at::empty_like(state.scale) : state.scale;
  auto zero_point = factor != nullptr ? at::empty_like(state.zero_point) : state.zero_point;
  ChannelStateUpdate update{
      op,
      state.running_min.data_ptr<float>(),
      state.running_max.data_ptr<float>(),
      state.scale.data_ptr<float>(),
      state.zero_point.data_ptr<int32_t>(),
      state.quant_min,
      state.quant_max,
      state.averaging_constant,
      state.symmetric,
      factor,
      factor != nullptr ? scale.data_ptr<float>() : nullptr,
      factor != nullptr ? zero_point.data_ptr<int32_t>() : nullptr};
  cpu::ObserveForwardLoopArgs args;
  args.input = input.data_ptr<float>();
  args.output = output.data_ptr<float>();
  args.clamped = records ? &clamped : nullptr;
  args.layout = detail::channel_layout(input, 0);
  args.quant_min = state.quant_min;
  args.quant_max = state.quant_max;
  args.choose = &update_channel;
  args.context = &update;
  args.nonfinite = counts.data_ptr<int64_t>();
  // The loop hands each written block to the consumer with the output it lies in.
  std::pair<const detail::WrittenBlocks*, const at::Tensor*> consumer{written, &output};
  if (written != nullptr) {
    args.written = [](void* context, int64_t first, int64_t last) {
      const auto& c = *static_cast<decltype(consumer)*>(context);
      c.first->consume(*c.second, first, last);
    };
    args.written_context = &consumer;
    args.block_channels = written->block_channels;
  }
  cpu::run_observe_forward_loop(args);
  // Written through data_ptr: bump the version counters as copy_ would.
  for (auto* t : {&state.running_min, &state.running_max, &state.scale, &state.zero_point}) {
    torch::autograd::impl::bump_version(*t);
  }
  count_nonfinite(op, nonfinite_count, counts);
  EstimatorArgs estimator_args;
  estimator_args.quant_min = state.quant_min;
  estimator_args.quant_max = state.quant_max;
  estimator_args.axis = 0;
  return rule->apply_computed(
      input, scale, zero_point, estimator_args, output,
      records ? cpu::positions_of(clamped) : c10::nullopt);
}

// A quantizer whose qparams come from its observer must have observed before it quantizes
// with the observer off.
void check_range_known(
    const char* op, c10::optional<int64_t> axis, const at::Tensor& scale,
    const at::Tensor& running_min) {
  TORCH_CHECK(
      !axis.has_value() || scale.numel() > 0, op,
      ": the per-channel scale is not known yet: the observer was disabled before it saw a "
      "batch");
  // Per tensor the initial scale 1.0 looks like a real one and would quantize most
  // activations to zero.
  TORCH_CHECK(
      axis.has_value() || observed_any(running_min), op,
      ": the scale is not known yet: the observer was disabled before it saw a batch (enable "
      "it, calibrate, or load a trained state_dict)");
}

at::Tensor fused_observe_fake_quantize(
    const at::Tensor& input, at::Tensor& running_min, at::Tensor& running_max, at::Tensor& scale,
    at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, c10::optional<int64_t> axis,
    c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, c10::string_view estimator,
    const c10::optional<at::Tensor>& nonfinite_count, bool learned_scale, bool require_range) {
  constexpr const char* op = "qat::fused_observe_fake_quantize";
  ObserverState state{running_min, running_max,        scale,    zero_point, quant_min,
                      quant_max,   averaging_constant, symmetric};
  detail::check_quant_range(op, quant_min, quant_max);
  if (observe && fake_quantize_enabled) {
    auto result = observe_fake_quantize_channel_runs(
        op, input, state, axis, std::string(estimator.data(), estimator.size()), nonfinite_count,
        nullptr);
    if (result.has_value()) {
      return *result;
    }
  }
  if (observe) {
    check_observer_state(op, state);
    const auto batch = qat::aminmax(input.detach(), axis);
    count_nonfinite(op, nonfinite_count, std::get<2>(batch));
    update_observer_state(op, state, std::get<0>(batch).cpu(), std::get<1>(batch).cpu());
  }
  if (!fake_quantize_enabled) {
    return input.clone();
  }
  if (learned_scale) {
    clamp_learned_scale(scale);
  }
  if (require_range && !observe) {
    check_range_known(op, axis, scale, running_min);
  }
  return qat::fake_quantize(
      input, scale, zero_point, quant_min, quant_max, axis,
      std::string(estimator.data(), estimator.size()));
}

// fused_observe_fake_quantize(relu(input)) per tensor with the "ste" estimator and
// qparams that are not learned: the quantizer after a conv + batch norm + ReLU takes its
// ReLU. The ReLU's own forward and backward each read and write the activation once more
// (at batch 128 on 28x28 maps, 0.7 of the pair's 1.7 ms); here the range of relu(x) is
// x's range with its ends raised to 0, and fake_quantize_clamped(x, 0, FLT_MAX) quantizes
// relu(x) with relu's gradient (0 where x <= 0) times the straight-through mask. Whatever
// that shortcut would not reproduce exactly (another device or dtype, a non-finite value
// observed: relu(-inf) is a finite 0) takes the two operators themselves.
at::Tensor observe_fake_quantize_relu(
    const at::Tensor& input, at::Tensor& running_min, at::Tensor& running_max, at::Tensor& scale,
    at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, const c10::optional<at::Tensor>& nonfinite_count,
    bool require_range) {
  constexpr const char* op = "qat::observe_fake_quantize_relu";
  detail::check_quant_range(op, quant_min, quant_max);
  const auto unfused = [&] {
    return fused_observe_fake_quantize(
        at::relu(input), running_min, running_max, scale, zero_point, quant_min, quant_max,
        c10::nullopt, averaging_constant, symmetric, observe, fake_quantize_enabled, "ste",
        nonfinite_count, false, require_range);
  };
  if (!fake_quantize_enabled || !input.is_cpu() || input.scalar_type() != at::kFloat ||
      scale.requires_grad() || zero_point.requires_grad()) {
    return unfused();
  }
  if (observe) {
    ObserverState state{running_min, running_max,        scale,    zero_point, quant_min,
                        quant_max,   averaging_constant, symmetric};
    check_observer_state(op, state);
    const auto batch = qat::aminmax(input.detach(), c10::nullopt);
    if (std::get<2>(batch).item<int64_t>() != 0) {
      return unfused();
    }
    auto lo = std::get<0>(batch).cpu().contiguous();
    auto hi = std::get<1>(batch).cpu().contiguous();
    float* lp = lo.data_ptr<float>();
    float* hp = hi.data_ptr<float>();
    if (lp[0] <= hp[0]) {
      lp[0] = std::max(lp[0], 0.0f);
      hp[0] = std::max(hp[0], 0.0f);
    }
    update_observer_state(op, state, lo, hi);
  } else if (require_range) {
    check_range_known(op, c10::nullopt, scale, running_min);
  }
  return qat::fake_quantize_clamped(
      input, scale, zero_point, quant_min, quant_max, 0.0,
      static_cast<double>(std::numeric_limits<float>::max()));
}

at::Tensor fake_quantize_folded(
    const at::Tensor& weight, const at::Tensor& factor, at::Tensor& running_min,
    at::Tensor& running_max, at::Tensor& scale, at::Tensor& zero_point, int64_t quant_min,
    int64_t quant_max, c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, c10::string_view estimator,
    const c10::optional<at::Tensor>& nonfinite_count, bool learned_scale) {
  constexpr const char* op = "qat::fake_quantize_folded";
  ObserverState state{running_min, running_max,        scale,    zero_point, quant_min,
                      quant_max,   averaging_constant, symmetric};
  detail::check_quant_range(op, quant_min, quant_max);
  TORCH_CHECK(
      weight.dim() >= 1 && factor.dim() == 1 && factor.numel() == weight.size(0), op,
      ": factor must hold one value per output channel (axis 0) of the weight, got shape ",
      factor.sizes(), " for a weight of shape ", weight.sizes());
  const auto f = factor.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* fp = f.data_ptr<float>();
  for (int64_t c = 0; c < f.numel(); ++c) {
    // A batch norm's gamma / sqrt(running_var + eps) is NaN for a negative variance or a
    // NaN gamma (a training step that diverged and an optimizer that wrote its NaN
    // gradient), inf for a zero variance with eps 0; the qparams made from it would be, too.
    TORCH_CHECK(
        std::isfinite(fp[c]), op, ": the fold factor of output channel ", c, " is ", fp[c],
        " (a batch norm's weight / sqrt(running_var + eps): is the weight not finite, a "
        "running_var negative, or zero with eps 0?)");
  }
  if (observe && fake_quantize_enabled) {
    auto result = observe_fake_quantize_channel_runs(
        op, weight, state, 0, std::string(estimator.data(), estimator.size()), nonfinite_count, fp);
    if (result.has_value()) {
      return *result;
    }
  }
  if (observe) {
    check_observer_state(op, state);
    // The range of weight * f per channel is f times the weight's, its ends swapped where
    // f < 0: the scaled weight is never built.
    const auto batch = qat::aminmax(weight.detach(), 0);
    count_nonfinite(op, nonfinite_count, std::get<2>(batch));
    auto lo = std::get<0>(batch).cpu().contiguous();
    auto hi = std::get<1>(batch).cpu().contiguous();
    float* lp = lo.data_ptr<float>();
    float* hp = hi.data_ptr<float>();
    for (int64_t c = 0; c < lo.numel(); ++c) {
      fold_range(lp[c], hp[c], fp[c]);
    }
    update_observer_state(op, state, lo, hi);
  }
  if (!fake_quantize_enabled) {
    return weight.clone();
  }
  if (learned_scale) {
    clamp_learned_scale(scale);
  }
  // The qparams of w * f folded onto w (folded_qparams).
  const std::string estimator_name(estimator.data(), estimator.size());
  const auto device = weight.device();
  const bool plain = !scale.requires_grad() && !zero_point.requires_grad() && scale.is_cpu() &&
                     zero_point.is_cpu() && scale.is_contiguous() && zero_point.is_contiguous() &&
                     scale.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kInt &&
                     scale.numel() == factor.numel();
  if (plain) {
    // Fixed qparams (every training step of an observed weight): the folded ones in one
    // loop instead of half a dozen small tensor operations.
    auto folded_scale = at::empty_like(scale);
    auto folded_zero_point = at::empty_like(zero_point);
    const float* sp = scale.data_ptr<float>();
    const int32_t* zp = zero_point.data_ptr<int32_t>();
    float* fs = folded_scale.data_ptr<float>();
    int32_t* fz = folded_zero_point.data_ptr<int32_t>();
    for (int64_t c = 0; c < f.numel(); ++c) {
      std::tie(fs[c], fz[c]) = folded_qparams(sp[c], zp[c], fp[c], quant_min, quant_max);
    }
    return qat::fake_quantize(
        weight, folded_scale.to(device), folded_zero_point.to(device), quant_min, quant_max, 0,
        estimator_name);
  }
  // Learned qparams: the same with tensor operations, so that autograd reaches them (and,
  // through |f|, the factor).
  auto magnitude = factor.abs().clamp_min(kMinMagnitude);
  if (!scale.requires_grad()) {
    magnitude = magnitude.detach();
  }
  const auto folded_zero_point = at::where(
      factor.detach().lt(0).to(zero_point.device()), zero_point.neg().add(quant_min + quant_max),
      zero_point);
  return qat::fake_quantize(
      weight, (scale / magnitude.to(scale.device())).to(device), folded_zero_point.to(device),
      quant_min, quant_max, 0, estimator_name);
}

}  // namespace

namespace detail {

c10::optional<at::Tensor> observe_fake_quantize_weight_blocks(
    const char* op, const at::Tensor& weight, at::Tensor& running_min, at::Tensor& running_max,
    at::Tensor& scale, at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<double> averaging_constant, bool symmetric, const std::string& estimator,
    const c10::optional<at::Tensor>& nonfinite_count, const WrittenBlocks& written) {
  ObserverState state{running_min, running_max,        scale,    zero_point, quant_min,
                      quant_max,   averaging_constant, symmetric};
  detail::check_quant_range(op, quant_min, quant_max);
  return observe_fake_quantize_channel_runs(
      op, weight, state, 0, estimator, nonfinite_count, nullptr, &written);
}

at::Tensor observe_fake_quantize_weight(
    const at::Tensor& weight, at::Tensor& running_min, at::Tensor& running_max, at::Tensor& scale,
    at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, c10::string_view estimator,
    const c10::optional<at::Tensor>& nonfinite_count) {
  return fused_observe_fake_quantize(
      weight, running_min, running_max, scale, zero_point, quant_min, quant_max, 0,
      averaging_constant, symmetric, observe, fake_quantize_enabled, estimator, nonfinite_count,
      false, true);
}

}  // namespace detail

void merge_range(
    at::Tensor& running_min, at::Tensor& running_max, const at::Tensor& batch_min,
    const at::Tensor& batch_max, c10::optional<double> averaging_constant) {
  constexpr const char* op = "qat::merge_range";
  TORCH_CHECK(
      !averaging_constant.has_value() || (*averaging_constant > 0.0 && *averaging_constant <= 1.0),
      op, ": averaging_constant must be in (0, 1], got ", *averaging_constant);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &running_min, &running_max, &batch_min, &batch_max}) {
    TORCH_CHECK(
        t->scalar_type() == at::kFloat, op, ": the ranges must be float32 tensors, got ",
        t->scalar_type());
  }
  const int64_t channels = batch_min.numel();
  TORCH_CHECK(
      batch_max.numel() == channels && running_min.numel() == channels &&
          running_max.numel() == channels,
      op, ": the running range has ", running_min.numel(), " entries and the batch's ", channels,
      "; expected one each, or one per channel");
  auto lo = running_min.detach().to(at::kCPU).contiguous();
  auto hi = running_max.detach().to(at::kCPU).contiguous();
  const auto blo = batch_min.detach().to(at::kCPU).contiguous();
  const auto bhi = batch_max.detach().to(at::kCPU).contiguous();
  merge_range_into(
      lo.data_ptr<float>(), hi.data_ptr<float>(), blo.data_ptr<float>(), bhi.data_ptr<float>(),
      channels, averaging_constant);
  for (const auto& pair : {std::make_pair(&running_min, &lo), std::make_pair(&running_max, &hi)}) {
    if (pair.first->data_ptr() == pair.second->data_ptr()) {
      // Written through data_ptr: bump the version counter as copy_ would.
      torch::autograd::impl::bump_version(*pair.first);
    } else {
      pair.first->copy_(pair.second->view(pair.first->sizes()));
    }
  }
}

std::pair<int64_t, int64_t> quant_range(int64_t bits, bool is_signed, bool narrow) {
  TORCH_CHECK(bits >= 2 && bits <= 16, "qat::quant_range: bits must be in [2, 16], got ", bits);
  if (is_signed) {
    const int64_t half = int64_t{1} << (bits - 1);
    return {narrow ? -half + 1 : -half, half - 1};
  }
  const int64_t top = (int64_t{1} << bits) - 1;
  return {0, narrow ? top - 1 : top};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aminmax(
    const at::Tensor& input, c10::optional<int64_t> axis_arg) {
  constexpr const char* op = "qat::aminmax";
  TORCH_CHECK(
      input.defined() && at::isFloatingType(input.scalar_type()), op,
      ": input must be a floating-point tensor");
  // A meta tensor has no values to observe (and fails deep inside a copy otherwise).
  TORCH_CHECK(
      !input.is_meta(), op, ": meta tensors are not supported; input is on the meta device");
  c10::optional<int64_t> axis;
  if (axis_arg.has_value()) {
    const int64_t dim = input.dim();
    TORCH_CHECK(dim > 0, op, ": per-channel statistics need an input with at least one dimension");
    TORCH_CHECK(
        *axis_arg >= -dim && *axis_arg < dim, op, ": axis ", *axis_arg,
        " is out of range for an input with ", dim, " dimensions");
    axis = *axis_arg < 0 ? *axis_arg + dim : *axis_arg;
  }
  if (!input.device().is_cpu()) {
    return aminmax_with_aten(input.to(at::kFloat), axis);
  }
  const auto x = detail::dense(input.to(at::kFloat));
  const int64_t channels = axis.has_value() ? x.size(*axis) : 1;
  // The loop writes every channel's entry; only an empty input leaves them to fill here.
  auto lo = at::empty({channels}, x.options());
  auto hi = at::empty({channels}, x.options());
  auto count = at::empty({channels}, x.options().dtype(at::kLong));
  if (x.numel() == 0) {
    std::fill_n(lo.data_ptr<float>(), channels, kInf);
    std::fill_n(hi.data_ptr<float>(), channels, -kInf);
    std::fill_n(count.data_ptr<int64_t>(), channels, int64_t{0});
  } else {
    cpu::AminmaxLoopArgs args;
    args.input = x.data_ptr<float>();
    args.layout = detail::channel_layout(x, axis);
    args.min = lo.data_ptr<float>();
    args.max = hi.data_ptr<float>();
    args.nonfinite = count.data_ptr<int64_t>();
    cpu::run_aminmax_loop(args);
  }
  return {lo, hi, count};
}

std::tuple<at::Tensor, at::Tensor> choose_qparams(
    const at::Tensor& min, const at::Tensor& max, int64_t quant_min, int64_t quant_max,
    bool symmetric) {
  constexpr const char* op = "qat::choose_qparams";
  detail::check_quant_range(op, quant_min, quant_max);
  TORCH_CHECK(
      min.sizes() == max.sizes(), op, ": min and max must have one shape, got ", min.sizes(),
      " and ", max.sizes());
  const auto lo = min.detach().to(at::kCPU, at::kFloat).contiguous();
  const auto hi = max.detach().to(at::kCPU, at::kFloat).contiguous();
  auto scale = at::empty(lo.sizes(), lo.options());
  auto zero_point = at::empty(lo.sizes(), lo.options().dtype(at::kInt));
  const float* lp = lo.data_ptr<float>();
  const float* hp = hi.data_ptr<float>();
  for (int64_t i = 0; i < lo.numel(); ++i) {
    // +inf / -inf is the running range of a channel that has seen nothing (scale 1); any
    // other non-finite end would give an infinite or NaN scale.
    const bool empty = lp[i] == kInf && hp[i] == -kInf;
    TORCH_CHECK(
        empty || (std::isfinite(lp[i]) && std::isfinite(hp[i])), op,
        ": min and max must be finite (or +inf and -inf: nothing observed yet), got min[", i,
        "] = ", lp[i], " and max[", i, "] = ", hp[i]);
    const auto q = qparams_of(op, i, lp[i], hp[i], quant_min, quant_max, symmetric);
    scale.data_ptr<float>()[i] = q.first;
    zero_point.data_ptr<int32_t>()[i] = static_cast<int32_t>(q.second);
  }
  return {scale.to(min.device()), zero_point.to(min.device())};
}

}  // namespace qat

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "quant_range(int bits, bool is_signed, bool narrow=False) -> (int, int)",
      TORCH_FN(qat::quant_range_op));
  m.def(
      "aminmax(Tensor input, int? axis=None) -> (Tensor, Tensor, Tensor)", TORCH_FN(qat::aminmax));
  m.def(
      "merge_range(Tensor(a!) running_min, Tensor(b!) running_max, Tensor batch_min, "
      "Tensor batch_max, float? averaging_constant=None) -> ()",
      TORCH_FN(qat::merge_range));
  m.def(
      "choose_qparams(Tensor min, Tensor max, int quant_min, int quant_max, bool symmetric) -> "
      "(Tensor, Tensor)",
      TORCH_FN(qat::choose_qparams));
  m.def(
      "fused_observe_fake_quantize(Tensor input, Tensor(a!) running_min, Tensor(b!) running_max, "
      "Tensor(c!) scale, Tensor(d!) zero_point, int quant_min, int quant_max, int? axis=None, "
      "float? averaging_constant=None, bool symmetric=False, bool observe=True, "
      "bool fake_quantize=True, str estimator=\"ste\", Tensor(e!)? nonfinite_count=None, "
      "bool learned_scale=False, bool require_range=False) -> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::fused_observe_fake_quantize)));
  m.def(
      "observe_fake_quantize_relu(Tensor input, Tensor(a!) running_min, Tensor(b!) running_max, "
      "Tensor(c!) scale, Tensor(d!) zero_point, int quant_min, int quant_max, "
      "float? averaging_constant=None, bool symmetric=False, bool observe=True, "
      "bool fake_quantize=True, Tensor(e!)? nonfinite_count=None, bool require_range=False) "
      "-> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::observe_fake_quantize_relu)));
  m.def(
      "fake_quantize_folded(Tensor weight, Tensor factor, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) scale, Tensor(d!) zero_point, int quant_min, "
      "int quant_max, float? averaging_constant=None, bool symmetric=False, bool observe=True, "
      "bool fake_quantize=True, str estimator=\"ste\", Tensor(e!)? nonfinite_count=None, "
      "bool learned_scale=False) -> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::fake_quantize_folded)));
}
