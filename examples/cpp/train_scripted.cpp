// Keeps training, from C++, a QAT model that Python prepared and scripted:
//
//   model = torch.jit.script(qat.prepare(net)); model.save("qat_model.pt")
//   torch.save({"inputs": x, "targets": y}, "batch.pt")   # y: class indices (int64)
//
//   build/train_scripted qat_model.pt batch.pt trained.pt [--steps N] [--lr LR]
//
// It runs N steps of plain SGD with cross-entropy on the batch, prints each step's loss
// (before the step's update) and saves the trained module, which torch.jit.load reads
// back in Python (after `import qat`).

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <qat/qat.h>

#include <cstddef>
#include <exception>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string model_path;
  std::string data_path;
  std::string output_path;
  int64_t steps = 5;
  double lr = 0.01;
};

constexpr const char* kUsage =
    "usage: train_scripted MODEL.pt DATA.pt OUTPUT.pt [--steps N] [--lr LR]";

// std::stoll / std::stod accept a numeric prefix ("3x"); a flag's value must be a number.
template <typename T, typename Parse>
T parse_number(const std::string& flag, const std::string& text, Parse parse) {
  std::size_t used = 0;
  T value{};
  try {
    value = parse(text, &used);
  } catch (const std::logic_error&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw std::invalid_argument(fmt::format("{} expects a number, got '{}'", flag, text));
  }
  return value;
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--steps" || arg == "--lr") && i + 1 < argc) {
      const std::string value = argv[++i];
      if (arg == "--steps") {
        options.steps = parse_number<int64_t>(
            arg, value, [](const std::string& s, std::size_t* n) { return std::stoll(s, n); });
      } else {
        options.lr = parse_number<double>(
            arg, value, [](const std::string& s, std::size_t* n) { return std::stod(s, n); });
      }
    } else if (arg.rfind("--", 0) == 0) {
      throw std::invalid_argument(fmt::format("unknown option '{}'; {}", arg, kUsage));
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) {
    throw std::invalid_argument(kUsage);
  }
  if (options.steps < 1) {
    throw std::invalid_argument(fmt::format("--steps must be at least 1, got {}", options.steps));
  }
  if (!(options.lr > 0.0)) {
    throw std::invalid_argument(fmt::format("--lr must be positive, got {}", options.lr));
  }
  options.model_path = positional[0];
  options.data_path = positional[1];
  options.output_path = positional[2];
  return options;
}

struct Batch {
  torch::Tensor inputs;
  torch::Tensor targets;
};

// A dict saved by Python's torch.save, which torch::pickle_load reads.
Batch load_batch(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error(fmt::format("cannot open the data file '{}'", path));
  }
  const std::vector<char> bytes(
      (std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const auto value = torch::pickle_load(bytes);
  if (!value.isGenericDict()) {
    throw std::runtime_error(fmt::format(
        "'{}' holds a {}, expected the dict torch.save({{\"inputs\": x, \"targets\": y}})", path,
        value.tagKind()));
  }
  const auto dict = value.toGenericDict();
  const auto tensor = [&](const char* key) {
    if (!dict.contains(key) || !dict.at(key).isTensor()) {
      throw std::runtime_error(fmt::format("'{}' has no tensor under the key \"{}\"", path, key));
    }
    return dict.at(key).toTensor();
  };
  Batch batch{tensor("inputs"), tensor("targets")};
  if (batch.targets.scalar_type() != torch::kLong || batch.targets.dim() != 1 ||
      batch.targets.size(0) != batch.inputs.size(0)) {
    throw std::runtime_error(fmt::format(
        "'{}': targets must be int64 class indices, one per input ({}), got {} of shape {}", path,
        batch.inputs.size(0), c10::toString(batch.targets.scalar_type()),
        batch.targets.sizes().vec()));
  }
  return batch;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options options = parse_options(argc, argv);
  // The scripted model calls qat's operators (torch.ops.qat.*), which libqat registers
  // when it is loaded. Nothing else here needs a qat symbol, and a link with --as-needed
  // (Ubuntu's default; LibTorch's CMake targets also switch it on after their own
  // libraries) would drop libqat, so that torch::jit::load failed on unknown operators:
  // this call keeps libqat a dependency of the executable.
  fmt::print(
      "qat {}: training {} for {} steps\n", qat::version(), options.model_path, options.steps);

  std::ifstream model_file(options.model_path, std::ios::binary);
  if (!model_file) {
    throw std::runtime_error(fmt::format("cannot open the model file '{}'", options.model_path));
  }
  torch::jit::Module model = torch::jit::load(model_file);
  model.train();
  const Batch batch = load_batch(options.data_path);
  // Opened before training, so that an unwritable path fails at once, not after it.
  std::ofstream output_file(options.output_path, std::ios::binary);
  if (!output_file) {
    throw std::runtime_error(fmt::format("cannot write the output file '{}'", options.output_path));
  }

  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model.parameters()) {
    parameters.push_back(parameter);
  }
  torch::optim::SGD optimizer(parameters, torch::optim::SGDOptions(options.lr));
  for (int64_t step = 0; step < options.steps; ++step) {
    const auto logits = model.forward({batch.inputs}).toTensor();
    const auto loss = torch::nn::functional::cross_entropy(logits, batch.targets);
    // 9 significant digits print a float32 exactly.
    fmt::print("step {} loss {:.9g}\n", step, loss.item<double>());
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }

  model.save(output_file);
  if (!output_file.flush()) {
    throw std::runtime_error(fmt::format("writing '{}' failed", options.output_path));
  }
  fmt::print("saved {}\n", options.output_path);
  return 0;
} catch (const c10::Error& e) {
  // LibTorch's own errors carry a C++ backtrace; the message alone says what went wrong.
  fmt::print(stderr, "train_scripted: {}\n", e.what_without_backtrace());
  return 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "train_scripted: {}\n", e.what());
  return 1;
}
