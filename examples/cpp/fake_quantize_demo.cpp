// Fake-quantizes a Gaussian tensor with qat's operators at several bit widths, per
// tensor and per channel, and prints the quantization error of each.
//
//   build/fake_quantize_demo [--elements N]

#include <fmt/format.h>
#include <torch/torch.h>

#include <qat/qat.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

struct Error {
  double max_abs;
  double sqnr_db;
};

Error error_of(const torch::Tensor& x, const torch::Tensor& y) {
  const auto noise = (x - y).pow(2).sum().item<double>();
  const auto signal = x.pow(2).sum().item<double>();
  return {(x - y).abs().max().item<double>(), 10.0 * std::log10(signal / noise)};
}

int64_t parse_elements(int argc, char** argv) {
  int64_t elements = 1 << 16;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--elements") == 0 && i + 1 < argc) {
      elements = std::atoll(argv[++i]);
      if (elements < 64) {
        throw std::invalid_argument(fmt::format("--elements must be at least 64, got {}", argv[i]));
      }
    } else {
      throw std::invalid_argument(
          fmt::format("unknown argument '{}'; usage: fake_quantize_demo [--elements N]", argv[i]));
    }
  }
  return elements;
}

}  // namespace

int main(int argc, char** argv) try {
  const int64_t elements = parse_elements(argc, argv);
  torch::manual_seed(0);
  const int64_t channels = 64;
  const auto x = torch::randn({channels, elements / channels}) *
                 torch::linspace(0.1, 4.0, channels).unsqueeze(1);

  fmt::print(
      "qat {}: fake-quantizing {} Gaussian values in {} channels of growing spread\n",
      qat::version(), x.numel(), channels);
  fmt::print("{:<10} {:<12} {:>12} {:>10}\n", "bits", "granularity", "max |error|", "SQNR dB");
  for (const int bits : {8, 4, 2}) {
    // Symmetric signed range with the scale chosen from the absolute maximum.
    const int64_t qmax = (1 << (bits - 1)) - 1;
    const int64_t qmin = -qmax - 1;
    const auto per_tensor_scale = (x.abs().max() / static_cast<double>(qmax)).reshape({1});
    const auto per_channel_scale = std::get<0>(x.abs().max(1)) / static_cast<double>(qmax);
    const auto y_tensor =
        qat::fake_quantize(x, per_tensor_scale, torch::zeros({1}, torch::kInt), qmin, qmax);
    const auto y_channel = qat::fake_quantize(
        x, per_channel_scale, torch::zeros({channels}, torch::kInt), qmin, qmax, 0);
    for (const auto& [name, y] :
         {std::pair<const char*, torch::Tensor>{"per-tensor", y_tensor},
          {"per-channel", y_channel}}) {
      const auto e = error_of(x, y);
      fmt::print(
          "{:<10} {:<12} {:>12.5f} {:>10.2f}\n", fmt::format("int{}", bits), name, e.max_abs,
          e.sqnr_db);
    }
  }

  fmt::print("\nestimators:");
  for (const auto& name : qat::EstimatorRegistry::global().names()) {
    fmt::print(" {}", name);
  }
  fmt::print("\n");
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "fake_quantize_demo: {}\n", e.what());
  return 1;
}
