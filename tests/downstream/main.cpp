// Uses qat through its installed headers and library only: prints the version, whether
// the operators are registered with the dispatcher, and a fake-quantized tensor and its
// straight-through gradient, whose values are exact (the scale is a power of two).

#include <torch/torch.h>

#include <qat/qat.h>

#include <iostream>
#include <string>

namespace {

void print(const std::string& name, const torch::Tensor& t) {
  std::cout << name;
  const auto values = t.contiguous();
  for (int64_t i = 0; i < values.numel(); ++i) {
    std::cout << " " << values.data_ptr<float>()[i];
  }
  std::cout << "\n";
}

}  // namespace

int main() {
  std::cout << "version " << qat::version() << "\n";
  const bool registered =
      c10::Dispatcher::singleton().findSchema({"qat::fake_quantize", ""}).has_value();
  std::cout << "registered " << (registered ? "yes" : "no") << "\n";

  // Levels 2.5 (ties to 2), -12 (clamped to -8), 3.5 (ties to 4) and 7.6 (clamped to 7).
  const auto x = torch::tensor({0.625f, -3.0f, 0.875f, 1.9f}, torch::requires_grad());
  const auto y =
      qat::fake_quantize(x, torch::tensor({0.25f}), torch::tensor({0}, torch::kInt), -8, 7);
  y.sum().backward();
  print("values", y.detach());
  print("grad", x.grad());
  return 0;
}
