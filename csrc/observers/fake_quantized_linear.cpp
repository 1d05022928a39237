// qat::fake_quantized_linear: F.linear(input, weight fake-quantized per output channel by
// the fused observer), with the matmul run block by block while the weight is quantized.
//
// A QAT Linear step otherwise fake-quantizes the whole weight, then multiplies: for a
// training batch of a few rows the matmul streams the weight once, and by then the quantized
// weight (12 MiB for a 3072x1024 layer) has left the cores' caches. Here each block of
// output channels, as soon as the observe + fake-quantize loop has written it, is multiplied
// with the input by the thread that wrote it, from its cache. The whole quantized weight is
// still written: the input gradient is computed from it.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "observe_blocks.h"

namespace qat {
namespace {

// An input is multiplied block by block only while it stays in cache next to each block
// (every block's matmul reads all of it): training batches of a few dozen rows.
constexpr int64_t kMaxBlockedInputBytes = 512 * 1024;

// Bytes of fake-quantized weight per block: about one core's L2 cache (1 MiB on AMD Zen 4,
// 2 MiB on Intel's current servers). Measured on a 1024x3072 weight with 8 input rows (Zen
// 4, 2 threads): 256 KiB blocks 1.71 ms, 1 to 4 MiB 1.29-1.31 ms, one block per thread
// 2.10 ms, quantizing first then one matmul 1.63 ms.
constexpr int64_t kBlockBytes = 1024 * 1024;

// out[:, first:last] = input @ weight[first:last].T for each block the loop writes.
class BlockMatmul final : public detail::WrittenBlocks {
 public:
  BlockMatmul(int64_t block_channels, at::Tensor input, at::Tensor output)
      : WrittenBlocks(block_channels), input_(std::move(input)), output_(std::move(output)) {}

  void consume(const at::Tensor& weight, int64_t first, int64_t last) const override {
    // On the loop's threads, which do not inherit the caller's grad mode.
    const at::NoGradGuard no_grad;
    auto out = output_.narrow(1, first, last - first);
    at::mm_out(out, input_, weight.narrow(0, first, last - first).t());
  }

 private:
  at::Tensor input_;
  at::Tensor output_;
};

// The autograd record of a linear whose output was computed already: the gradients of
// F.linear(input, weight) without bias.
struct ComputedLinear : public torch::autograd::Function<ComputedLinear> {
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
      const at::Tensor* output) {
    ctx->save_for_backward({input, weight});
    return *output;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const auto grad = grads[0].reshape({-1, weight.size(0)});
    at::Tensor grad_input;
    at::Tensor grad_weight;
    if (ctx->needs_input_grad(0)) {
      grad_input = grad.mm(weight).view(input.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = grad.t().mm(input.reshape({-1, weight.size(1)}));
    }
    return {grad_input, grad_weight, at::Tensor()};
  }
};

at::Tensor fake_quantized_linear(
    const at::Tensor& input, const at::Tensor& weight, at::Tensor& running_min,
    at::Tensor& running_max, at::Tensor& scale, at::Tensor& zero_point, int64_t quant_min,
    int64_t quant_max, c10::optional<double> averaging_constant, bool symmetric, bool observe,
    bool fake_quantize_enabled, c10::string_view estimator,
    const c10::optional<at::Tensor>& nonfinite_count) {
  constexpr const char* op = "qat::fake_quantized_linear";
  TORCH_CHECK(
      weight.defined() && weight.dim() == 2, op,
      ": weight must be 2-D (out_features, in_features), got ",
      weight.defined() ? std::to_string(weight.dim()) + " dimensions" : "an undefined tensor");
  TORCH_CHECK(input.defined() && input.dim() >= 1, op, ": input must have at least 1 dimension");
  TORCH_CHECK(
      input.size(-1) == weight.size(1), op,
      ": input and weight shapes cannot be multiplied: input ", input.sizes(), " ends in ",
      input.size(-1), " values, weight ", weight.sizes(), " takes in_features = ", weight.size(1));
  const int64_t out_features = weight.size(0);
  const int64_t in_features = weight.size(1);
  const bool blockable = observe && fake_quantize_enabled && input.is_cpu() &&
                         input.scalar_type() == at::kFloat && input.numel() > 0 &&
                         input.numel() * 4 <= kMaxBlockedInputBytes;
  if (blockable) {
    const auto rows = input.detach().reshape({-1, in_features}).contiguous();
    auto shape = input.sizes().vec();
    shape.back() = out_features;
    auto output = at::empty(shape, rows.options());
    const BlockMatmul matmul(
        std::max<int64_t>(1, kBlockBytes / (in_features * 4)), rows,
        output.view({rows.size(0), out_features}));
    auto quantized = detail::observe_fake_quantize_weight_blocks(
        op, weight, running_min, running_max, scale, zero_point, quant_min, quant_max,
        averaging_constant, symmetric, std::string(estimator.data(), estimator.size()),
        nonfinite_count, matmul);
    if (quantized.has_value()) {
      return ComputedLinear::apply(input, *quantized, &output);
    }
  }
  return at::linear(
      input, detail::observe_fake_quantize_weight(
                 weight, running_min, running_max, scale, zero_point, quant_min, quant_max,
                 averaging_constant, symmetric, observe, fake_quantize_enabled, estimator,
                 nonfinite_count));
}

}  // namespace
}  // namespace qat

TORCH_LIBRARY_FRAGMENT(qat, m) {
  m.def(
      "fake_quantized_linear(Tensor input, Tensor weight, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) scale, Tensor(d!) zero_point, int quant_min, "
      "int quant_max, float? averaging_constant=None, bool symmetric=False, bool observe=True, "
      "bool fake_quantize=True, str estimator=\"ste\", Tensor(e!)? nonfinite_count=None) -> "
      "Tensor",
      torch::dispatch(
          c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(qat::fake_quantized_linear)));
}
