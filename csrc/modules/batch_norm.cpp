// qat::unscaled_batch_norm: the batch norm after a conv with a folded, fake-quantized weight.

#include <qat/batch_norm.h>

#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace qat {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [1, C, 1, ...] for per-channel values against an [N, C, ...] tensor.
std::vector<int64_t> channel_shape(const at::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = -1;
  return shape;
}

std::vector<int64_t> all_but_channels(const at::Tensor& like) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < like.dim(); ++d) {
    if (d != 1) {
      dims.push_back(d);
    }
  }
  return dims;
}

class UnscaledBatchNorm : public torch::autograd::Function<UnscaledBatchNorm> {
 public:
  // Every tensor argument is defined (autograd::Function cannot take undefined ones): the
  // caller passes zeros for a missing b and bias and ones for a missing weight, which do
  // not require grad; has_b says whether b is to be added.
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& z, const at::Tensor& s, const at::Tensor& b,
      bool has_b, const at::Tensor& weight, const at::Tensor& bias,
      const c10::optional<at::Tensor>& running_mean,
      const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
    const auto shape = channel_shape(z);
    // The same division as the plain composition, so both give the same forward.
    auto u = z / s.reshape(shape);
    if (has_b) {
      u = u + b.reshape(shape);
    }
    auto result = at::native_batch_norm(
        u, weight, bias, running_mean, running_var, /*training=*/true, momentum, eps);
    ctx->save_for_backward({u, s, weight, std::get<1>(result), std::get<2>(result)});
    ctx->saved_data["eps"] = eps;
    return std::get<0>(result);
  }

  // needs_input_grad counts the tensor arguments only: z 0, s 1, b 2, weight 3, bias 4.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& u = saved[0];
    const auto& s = saved[1];
    const auto& weight = saved[2];
    const auto& mean = saved[3];
    const auto& invstd = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto grads = at::native_batch_norm_backward(
        grad_outputs[0], u, weight, {}, {}, mean, invstd, /*train=*/true, eps,
        {true, true, ctx->needs_input_grad(4)});
    const auto& grad_u = std::get<0>(grads);
    const auto& grad_gamma = std::get<1>(grads);
    // sum(grad_u * u) over a channel = gamma * grad_gamma * eps * invstd^2 with batch
    // statistics (the normalization cancels the scale of u except through eps), and
    // sum(grad_u) = 0, whence d/ds of (z / s + b) below.
    const auto grad_s = -weight * grad_gamma * (eps * invstd.square()) / s;
    at::Tensor grad_b;
    if (ctx->needs_input_grad(2)) {
      grad_b = grad_u.sum(all_but_channels(u));
    }
    return {grad_u / s.reshape(channel_shape(u)),
            grad_s,
            grad_b,
            at::Tensor(),
            ctx->needs_input_grad(3) ? grad_gamma : at::Tensor(),
            std::get<2>(grads),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor unscaled_batch_norm_op(
    const at::Tensor& z, const at::Tensor& s, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps) {
  constexpr const char* op = "qat::unscaled_batch_norm";
  TORCH_CHECK(
      z.dim() >= 2, op, ": z must be [N, C, ...], got ", z.dim(), " dimensions");
  TORCH_CHECK(
      s.dim() == 1 && s.size(0) == z.size(1), op, ": s must hold one value per channel (",
      z.size(1), "), got shape ", s.sizes());
  TORCH_CHECK(
      !b.has_value() || !b->defined() || b->sizes() == s.sizes(), op,
      ": b must be shaped like s, got ", b->sizes());
  TORCH_CHECK(eps > 0.0, op, ": eps must be positive, got ", eps);
  const auto given = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined();
  };
  return UnscaledBatchNorm::apply(
      z, s, given(b) ? *b : at::zeros_like(s), given(b),
      given(weight) ? *weight : at::ones_like(s), given(bias) ? *bias : at::zeros_like(s),
      running_mean, running_var, momentum, eps);
}

}  // namespace

at::Tensor unscaled_batch_norm(
    const at::Tensor& z, const at::Tensor& s, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps) {
  return unscaled_batch_norm_op(z, s, b, weight, bias, running_mean, running_var, momentum, eps);
}

}  // namespace qat

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "unscaled_batch_norm(Tensor z, Tensor s, Tensor? b, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) -> Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::unscaled_batch_norm_op)));
}
