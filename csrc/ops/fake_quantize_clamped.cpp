// qat::fake_quantize_clamped: fake_quantize(hardtanh(input, lo, hi)) with the gradient of the
// two, for the FakeQuantize that takes the place of a ReLU6 (hardtanh(0, 6)) before it.
//
// A ReLU6 after a conv or linear is followed by a FakeQuantize with the fixed qparams of
// [0, 6]; together they read and write the activation twice in the forward and twice in the
// backward. This operator does both in one pass each, with a one-byte code per element for
// the backward: the same values and gradients as the two operators (hardtanh's gradient,
// exactly 0 outside (lo, hi), times the straight-through estimator's mask inside).
// CompositeImplicitAutograd: the CPU float32 case runs the fused loops, every other
// (another dtype or device) the two operators themselves.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>

#include <qat/fake_quantize.h>

#include "cpu/buffer_pool.h"
#include "cpu/fake_quantize_loops.h"
#include "fake_quantize_common.h"

namespace qat {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "qat::fake_quantize_clamped";

// The fused forward; the codes are written only when `code` is wanted (a backward will run).
at::Tensor clamped_forward(
    const at::Tensor& input, float scale, float zero_point, int64_t quant_min, int64_t quant_max,
    double lo, double hi, at::Tensor* code) {
  const at::Tensor x = detail::dense(input);
  auto output = cpu::pooled_empty_like(x, at::kFloat);
  cpu::ClampedForwardLoopArgs args;
  if (code != nullptr) {
    *code = cpu::pooled_empty_like(x, at::kByte);
    args.code = code->data_ptr<uint8_t>();
  }
  args.input = x.data_ptr<float>();
  args.output = output.data_ptr<float>();
  args.numel = x.numel();
  args.scale = scale;
  args.zero_point = zero_point;
  args.quant_min = quant_min;
  args.quant_max = quant_max;
  args.lo = static_cast<float>(lo);
  args.hi = static_cast<float>(hi);
  cpu::run_clamped_forward_loop(args);
  return output;
}

class ClampedFakeQuantize : public torch::autograd::Function<ClampedFakeQuantize> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& input, float scale, float zero_point,
      int64_t quant_min, int64_t quant_max, double lo, double hi) {
    at::Tensor code;
    auto output = clamped_forward(input, scale, zero_point, quant_min, quant_max, lo, hi, &code);
    ctx->save_for_backward({code});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(
        !at::GradMode::is_enabled(), kOp, ": double backward (create_graph=True) is not supported");
    const auto code = ctx->get_saved_variables()[0];
    const auto grad = detail::match_layout(grad_outputs[0].to(at::kFloat), code);
    auto grad_input = cpu::pooled_empty_like(code, at::kFloat);
    cpu::ClampedBackwardLoopArgs args;
    args.grad = grad.data_ptr<float>();
    args.code = code.data_ptr<uint8_t>();
    args.grad_input = grad_input.data_ptr<float>();
    args.numel = code.numel();
    cpu::run_clamped_backward_loop(args);
    return {grad_input,   at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor fake_quantize_clamped(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, double lo, double hi) {
  detail::check_arguments(kOp, input, scale, zero_point, quant_min, quant_max, c10::nullopt);
  TORCH_CHECK_VALUE(
      std::isfinite(lo) && std::isfinite(hi) && lo < hi, kOp,
      ": lo and hi must be finite with lo < hi, got (", lo, ", ", hi, ")");
  const bool fused = input.is_cpu() && input.scalar_type() == at::kFloat &&
                     !scale.requires_grad() && !zero_point.requires_grad();
  if (!fused) {
    return qat::fake_quantize(
        at::hardtanh(input, lo, hi), scale, zero_point, quant_min, quant_max, c10::nullopt, "ste");
  }
  const auto qparams = detail::read_qparams(kOp, scale, zero_point, quant_min, quant_max);
  if (!(input.requires_grad() && at::GradMode::is_enabled())) {
    // Evaluation or calibration: no backward, so no codes and no autograd node.
    return clamped_forward(
        input, qparams.scale[0], qparams.zero_point[0], quant_min, quant_max, lo, hi, nullptr);
  }
  return ClampedFakeQuantize::apply(
      input, qparams.scale[0], qparams.zero_point[0], quant_min, quant_max, lo, hi);
}

}  // namespace qat

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "fake_quantize_clamped(Tensor input, Tensor scale, Tensor zero_point, int quant_min, "
      "int quant_max, float lo, float hi) -> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::fake_quantize_clamped)));
}
