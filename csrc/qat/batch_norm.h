#pragma once

/// The batch norm of a conv whose weight was scaled to fold a batch norm into it
/// (simulated batch-norm folding for QAT, Jacob et al. 2018).

#include <ATen/ATen.h>

#include <c10/util/Optional.h>

namespace qat {

/// `batch_norm(z / s + b)` with batch statistics, where `z` is the output of a conv whose
/// weight was multiplied by the per-channel fold factor `s` (channels on axis 1) and `b`
/// the conv's own bias; the running statistics are updated with `momentum` as
/// `at::batch_norm` does in training.
///
/// The backward costs one pass over `z` less than autograd's composition: with batch
/// statistics, the gradient of `s` has the closed form
/// `-weight * grad_weight * eps * invstd^2 / s` per channel, from what the batch-norm
/// backward already returns. `weight` and `bias` are the batch norm's affine parameters
/// (either may be undefined, as in `at::batch_norm`).
at::Tensor unscaled_batch_norm(
    const at::Tensor& z, const at::Tensor& s, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    double momentum, double eps);

}  // namespace qat
