// What the C++ API refuses (issue 13): non-finite parameters and statistics in convert and
// export_model, inputs of the wrong width in the integer Linear (in memory and in the written
// files), exports that fail after writing (the previous file stays), and a prepare that
// fails midway (the model stays as it was).

#include <catch2/catch.hpp>
#include <torch/csrc/jit/mobile/import.h>
#include <torch/csrc/jit/mobile/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include <qat/qat.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "helpers.h"

namespace {

using qat_test::invalid_argument_message;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string bytes_of(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// Conv + BN + ReLU, max pooling, flatten, Linear + ReLU, Linear; prepared it is
// input_fake_quant, 0 (ConvBn2d), 0_fake_quant, 3 (MaxPool2d), 4 (Flatten), 5 (Linear),
// 5_fake_quant, 7 (Linear), 7_fake_quant.
torch::nn::Sequential cnn(const qat::Config& config = qat::presets::int8()) {
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).bias(false)), torch::nn::BatchNorm2d(4),
      torch::nn::ReLU(), torch::nn::MaxPool2d(2), torch::nn::Flatten(),
      torch::nn::Linear(4 * 3 * 3, 8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  qat::prepare(*net, config);
  return net;
}

// A couple of QAT steps, so that the batch norm statistics, weights and qparams are real.
void train(torch::nn::Sequential& net, const torch::Tensor& x) {
  torch::optim::SGD optimizer(net->parameters(), 0.01);
  net->train();
  for (int step = 0; step < 3; ++step) {
    optimizer.zero_grad();
    net->forward(x).pow(2).mean().backward();
    optimizer.step();
  }
}

void set(const torch::Tensor& tensor, int64_t index, double value) {
  torch::NoGradGuard no_grad;
  tensor.view({-1})[index].fill_(value);
}

// What identifies a module tree: every module's path, type and object, every parameter's
// and buffer's name and tensor.
struct Snapshot {
  explicit Snapshot(torch::nn::Module& root) {
    for (const auto& item : root.named_modules()) {
      modules.emplace_back(item.key() + " " + item.value()->name(), item.value().get());
    }
    for (const auto& item : root.named_parameters()) {
      tensors.emplace_back(item.key(), item.value().unsafeGetTensorImpl());
    }
    for (const auto& item : root.named_buffers()) {
      tensors.emplace_back(item.key(), item.value().unsafeGetTensorImpl());
    }
  }
  bool operator==(const Snapshot& other) const {
    return modules == other.modules && tensors == other.tensors;
  }
  std::vector<std::pair<std::string, const void*>> modules;
  std::vector<std::pair<std::string, const void*>> tensors;
};

// Two Sequentials in a custom module (LibTorch's Sequential cannot hold one directly).
struct PairImpl : torch::nn::Module {
  PairImpl(torch::nn::Sequential first_layers, torch::nn::Sequential second_layers) {
    first = register_module("first", std::move(first_layers));
    second = register_module("second", std::move(second_layers));
  }
  torch::nn::Sequential first{nullptr};
  torch::nn::Sequential second{nullptr};
};
TORCH_MODULE(Pair);

// A custom root whose children prepare changes in every way it can, in this order: a
// Sequential rewritten in place, a direct child replaced, a nested Sequential rewritten,
// and last `late.second`, which holds `late_layers`.
struct TreeImpl : torch::nn::Module {
  explicit TreeImpl(torch::nn::Sequential late_layers) {
    stem =
        register_module("stem", torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU()));
    aux = register_module("aux", torch::nn::Linear(8, 8));
    late = register_module(
        "late", Pair(torch::nn::Sequential(torch::nn::Linear(8, 8)), std::move(late_layers)));
  }
  torch::nn::Sequential stem{nullptr};
  torch::nn::Linear aux{nullptr};
  Pair late{nullptr};
};
TORCH_MODULE(Tree);

}  // namespace

CATCH_TEST_CASE(
    "convert and export_model refuse non-finite weights, statistics and qparams",
    "[bad_inputs][nonfinite]") {
  torch::manual_seed(0);
  const auto x = torch::randn({8, 1, 8, 8});
  const qat_test::TempDir folder("qat_bad_inputs");
  const auto target = folder.file("model.pt");

  // Each case spoils one tensor of a trained model; convert and export_model name it.
  struct Case {
    const char* tensor;
    double value;
    const char* expected;
  };
  const std::vector<Case> cases{
      {"5.weight", kNaN, "non-finite values in 5.weight (NaN)"},
      {"7.bias", -kInf, "non-finite values in 7.bias (inf)"},
      {"0.weight", kInf, "non-finite values in 0.weight (inf)"},
      {"0.bn.weight", kNaN, "non-finite values in 0.bn.weight (NaN)"},
      {"0.bn.bias", kNaN, "non-finite values in 0.bn.bias (NaN)"},
      {"0.bn.running_mean", kNaN, "non-finite values in 0.bn.running_mean (NaN)"},
      {"0.bn.running_var", kInf, "non-finite values in 0.bn.running_var (inf)"},
      {"5_fake_quant.scale", kNaN, "non-finite values in 5_fake_quant.scale (NaN)"},
      {"5.weight_fake_quant.scale", kInf, "non-finite values in 5.weight_fake_quant.scale (inf)"},
  };
  for (const auto& spoiled : cases) {
    CATCH_INFO(spoiled.tensor);
    auto net = cnn();
    train(net, x);
    auto state = net->named_parameters();
    for (const auto& buffer : net->named_buffers()) {
      state.insert(buffer.key(), buffer.value());
    }
    CATCH_REQUIRE(state.contains(spoiled.tensor));
    set(state[spoiled.tensor], 0, spoiled.value);

    const auto converting = invalid_argument_message([&] { qat::convert(*net, x); });
    CATCH_CHECK(contains(converting, std::string("qat::convert: ") + spoiled.expected));
    const auto exporting = invalid_argument_message([&] {
      qat::export_model(*net, x, target, {"qnnpack", false});
    });
    CATCH_CHECK(contains(exporting, spoiled.expected));
    CATCH_CHECK_FALSE(std::filesystem::exists(target));
  }

  CATCH_SECTION("a learned zero point (lsq_plus) and several tensors at once") {
    auto config = qat::presets::int8();
    config.activation(qat::QuantSpec(config.activation()).estimator("lsq_plus"));
    auto net = cnn(config);
    train(net, x);
    set(net->named_parameters()["7_fake_quant.zero_point"], 0, kNaN);
    set(net->named_parameters()["5.weight"], 1, kNaN);
    set(net->named_parameters()["5.weight"], 2, kInf);
    const auto message = invalid_argument_message([&] { qat::convert(*net, x); });
    CATCH_CHECK(contains(
        message,
        "qat::convert: non-finite values in 5.weight (NaN and inf), 7_fake_quant.zero_point "
        "(NaN)"));
    CATCH_CHECK_FALSE(contains(message, "\n"));
  }
}

CATCH_TEST_CASE(
    "convert refuses a batch norm with a negative running_var or a non-finite fold factor",
    "[bad_inputs][nonfinite][bn]") {
  torch::manual_seed(1);
  const auto x = torch::randn({8, 1, 8, 8});
  auto net = cnn();
  train(net, x);
  const auto bn = net->ptr<qat::ConvBn2dImpl>(1)->bn;

  CATCH_SECTION("a negative running_var, folded into the conv") {
    set(bn->running_var, 2, -0.5);
    const auto message = invalid_argument_message([&] { qat::convert(*net, x); });
    CATCH_CHECK(contains(
        message,
        "qat::convert: the batch norm '0.bn' has a negative running_var at 1 of 4 channels "
        "(min -0.5)"));
    CATCH_CHECK_FALSE(contains(message, "scale"));
  }

  CATCH_SECTION("a fold factor weight / sqrt(running_var + eps) that overflows") {
    set(bn->running_var, 1, 0.0);
    set(bn->weight, 1, 3e38);
    const auto message = invalid_argument_message([&] { qat::convert(*net, x); });
    CATCH_CHECK(contains(
        message,
        "qat::convert: the batch norm '0.bn' has a non-finite factor weight / "
        "sqrt(running_var + eps) at 1 of 4 channels"));
  }

  CATCH_SECTION("a negative running_var in a batch norm left in float") {
    torch::nn::Sequential mixed(
        torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)), torch::nn::BatchNorm2d(4),
        torch::nn::ReLU());
    qat::prepare(*mixed, qat::presets::int8().skip("1"));
    mixed->forward(x);
    set(std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(mixed->ptr(3))->running_var, 0, -1.0);
    const auto message = invalid_argument_message([&] { qat::convert(*mixed, x); });
    CATCH_CHECK(contains(
        message, "qat::convert: the batch norm '1' has a negative running_var at 1 of 4 channels"));
  }

  CATCH_SECTION("a batch norm left in float without affine parameters is fine") {
    torch::nn::Sequential mixed(
        torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)),
        torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(4).affine(false)));
    qat::prepare(*mixed, qat::presets::int8().skip("1"));
    mixed->forward(x);
    CATCH_CHECK_NOTHROW(qat::convert(*mixed, x));
  }
}

CATCH_TEST_CASE(
    "export_model: outputs that are not finite fail the check and keep the previous file",
    "[bad_inputs][nonfinite][atomic]") {
  torch::manual_seed(2);
  // Two float layers after the integer one overflow: 10 * 3e38 is inf in float32, and the
  // last layer computes inf - inf, NaN, from finite parameters.
  torch::nn::Sequential net(
      torch::nn::Linear(4, 3), torch::nn::Linear(3, 2), torch::nn::Linear(2, 1));
  qat::prepare(*net, qat::presets::int8().skip("1").skip("2"));
  const auto x = torch::randn({6, 4});
  qat::calibrate(net, std::vector<torch::Tensor>{x});
  const qat_test::TempDir folder("qat_bad_inputs");
  const auto target = folder.file("model.pt");
  qat::export_model(*net, x, target, {"qnnpack", false});
  const auto before = bytes_of(target);
  const auto files = folder.files();

  {
    torch::NoGradGuard no_grad;
    auto overflow = net->ptr<torch::nn::LinearImpl>(3);
    overflow->weight.zero_();
    overflow->bias.fill_(3e38);
    auto last = net->ptr<torch::nn::LinearImpl>(4);
    last->weight.copy_(torch::tensor({{10.0f, -10.0f}}));
  }
  CATCH_CHECK_THROWS_AS(qat::export_model(*net, x, target, {"qnnpack", false}), std::runtime_error);
  CATCH_CHECK_THROWS_WITH(
      qat::export_model(*net, x, target, {"qnnpack", false}),
      Catch::Contains("qat::export_model: the outputs on example_input are not finite") &&
          Catch::Contains("the in-memory integer model") && Catch::Contains("the exported file"));
  CATCH_CHECK(bytes_of(target) == before);
  CATCH_CHECK(folder.files() == files);
}

CATCH_TEST_CASE(
    "the integer Linear checks the input width, in memory and in the written files",
    "[bad_inputs][linear]") {
  torch::manual_seed(3);
  torch::nn::Sequential net(torch::nn::Linear(4, 3));
  qat::prepare(*net);
  const auto x = torch::randn({2, 4});
  qat::calibrate(net, std::vector<torch::Tensor>{x});
  const auto wide = torch::randn({2, 5});
  // torch::nn::Linear's error and message.
  const auto expected_message =
      Catch::Contains("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)");

  auto integer = qat::convert(*net, x);
  CATCH_CHECK(integer.forward({x}).toTensor().sizes() == torch::IntArrayRef{2, 3});
  CATCH_CHECK_THROWS_AS(integer.forward({wide}), std::exception);
  CATCH_CHECK_THROWS_WITH(integer.forward({wide}), expected_message);

  const qat_test::TempDir folder("qat_bad_inputs");
  const auto pt = folder.file("model.pt");
  qat::export_model(*net, x, pt, {"qnnpack", false});
  auto loaded = torch::jit::load(pt);
  CATCH_CHECK(torch::equal(loaded.forward({x}).toTensor(), integer.forward({x}).toTensor()));
  CATCH_CHECK_THROWS_AS(loaded.forward({wide}), std::exception);
  CATCH_CHECK_THROWS_WITH(loaded.forward({wide}), expected_message);

  const auto ptl = folder.file("model.ptl");
  qat::export_model(*net, x, ptl);
  auto mobile = torch::jit::_load_for_mobile(ptl);
  CATCH_CHECK_THROWS_AS(mobile.forward({wide}), std::exception);
  CATCH_CHECK_THROWS_WITH(mobile.forward({wide}), expected_message);
}

CATCH_TEST_CASE(
    "export_model writes atomically: a failed export keeps the previous file",
    "[bad_inputs][atomic]") {
  torch::manual_seed(4);
  const qat_test::TempDir folder("qat_bad_inputs");

  CATCH_SECTION("an example input that does not fit a Linear") {
    torch::nn::Sequential net(torch::nn::Linear(4, 3));
    qat::prepare(*net);
    const auto x = torch::randn({2, 4});
    qat::calibrate(net, std::vector<torch::Tensor>{x});
    for (const bool mobile : {false, true}) {
      CATCH_INFO("mobile " << mobile);
      const auto target = folder.file(mobile ? "model.ptl" : "model.pt");
      qat::export_model(*net, x, target, {"qnnpack", mobile});
      const auto before = bytes_of(target);
      const auto files = folder.files();
      const auto message = invalid_argument_message([&] {
        qat::export_model(*net, torch::randn({2, 5}), target, {"qnnpack", mobile});
      });
      CATCH_INFO("message: " << message);
      // PyTorch 2.x puts the op's name first ("addmm: mat1 and mat2 ...").
      CATCH_CHECK(
          contains(message, "qat::export_model: the example input does not fit the model: "));
      CATCH_CHECK(contains(message, "mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"));
      CATCH_CHECK_FALSE(contains(message, "\n"));
      CATCH_CHECK(bytes_of(target) == before);
      CATCH_CHECK(folder.files() == files);
    }
  }

  CATCH_SECTION("an empty example input, which would check nothing") {
    torch::nn::Sequential net(torch::nn::Linear(4, 3));
    qat::prepare(*net);
    qat::calibrate(net, std::vector<torch::Tensor>{torch::randn({2, 4})});
    for (const bool mobile : {false, true}) {
      CATCH_INFO("mobile " << mobile);
      const auto target = folder.file(mobile ? "empty.ptl" : "empty.pt");
      const auto message = invalid_argument_message([&] {
        qat::export_model(*net, torch::randn({0, 4}), target, {"qnnpack", mobile});
      });
      CATCH_CHECK(contains(message, "qat::export_model: example_input is empty (shape [0, 4])"));
      CATCH_CHECK(folder.files().empty());
    }
  }

  CATCH_SECTION("an undefined example input (a default-constructed tensor)") {
    torch::nn::Sequential net(torch::nn::Linear(4, 3));
    qat::prepare(*net);
    qat::calibrate(net, std::vector<torch::Tensor>{torch::randn({2, 4})});
    const auto target = folder.file("undefined.pt");
    const auto exported = invalid_argument_message([&] {
      qat::export_model(*net, torch::Tensor(), target, {"qnnpack", false});
    });
    CATCH_CHECK(contains(exported, "qat::export_model: example_input is undefined"));
    CATCH_CHECK(folder.files().empty());
    const auto converted = invalid_argument_message([&] { qat::convert(*net, torch::Tensor()); });
    CATCH_CHECK(contains(converted, "qat::convert: example_input is undefined"));
  }

  CATCH_SECTION("an example input with the wrong channel count for a conv") {
    auto net = cnn();
    const auto x = torch::randn({4, 1, 8, 8});
    train(net, x);
    const auto target = folder.file("cnn.pt");
    qat::export_model(*net, x, target, {"qnnpack", false});
    const auto before = bytes_of(target);
    const auto message = invalid_argument_message([&] {
      qat::export_model(*net, torch::randn({4, 3, 8, 8}), target, {"qnnpack", false});
    });
    CATCH_CHECK(contains(message, "qat::export_model: the example input does not fit the model: "));
    CATCH_CHECK_FALSE(contains(message, "\n"));
    CATCH_CHECK_FALSE(contains(message, "TorchScript"));
    CATCH_CHECK(bytes_of(target) == before);
    CATCH_CHECK(folder.files() == std::set<std::string>{"cnn.pt"});
    // convert runs the example input too, and says the same.
    CATCH_CHECK(contains(
        invalid_argument_message([&] {
          qat::convert(*net, torch::randn({4, 3, 8, 8}));
        }),
        "qat::convert: the example input does not fit the model: "));
  }
}

CATCH_TEST_CASE("a prepare that fails midway leaves the model as it was", "[bad_inputs][prepare]") {
  // Each model has, before the layer that fails, a Sequential that prepare rewrites and a
  // direct child that it replaces.
  CATCH_SECTION("a Conv2d with a padding mode the integer conv has not") {
    Tree tree(torch::nn::Sequential(
        torch::nn::Linear(8, 8),
        torch::nn::Conv2d(
            torch::nn::Conv2dOptions(1, 1, 3).padding(1).padding_mode(torch::kReflect))));
    const Snapshot before(*tree);
    const auto message = invalid_argument_message([&] { qat::prepare(*tree); });
    CATCH_CHECK(contains(
        message,
        "qat::prepare: 'late.second.1' (torch::nn::Conv2dImpl) cannot be prepared, so the "
        "model is left as it was: qat::Conv2d: padding_mode kReflect is not supported"));
    CATCH_CHECK(Snapshot(*tree) == before);
  }

  CATCH_SECTION("a Conv2d + BatchNorm2d that cannot be folded") {
    Tree tree(torch::nn::Sequential(
        torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 2, 3)),
        torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(2).affine(false))));
    const Snapshot before(*tree);
    const auto message = invalid_argument_message([&] { qat::prepare(*tree); });
    CATCH_CHECK(contains(message, "qat::prepare: 'late.second.0' (torch::nn::Conv2dImpl)"));
    CATCH_CHECK(contains(message, "the batch norm must be affine"));
    CATCH_CHECK(Snapshot(*tree) == before);
  }

  CATCH_SECTION("an override whose observer C++ does not have") {
    Tree tree(torch::nn::Sequential(torch::nn::Linear(8, 8)));
    const Snapshot before(*tree);
    const auto config = qat::Config().override_layer(
        "late.second.0", c10::nullopt, qat::QuantSpec().observer("percentile"));
    const auto message = invalid_argument_message([&] { qat::prepare(*tree, config); });
    CATCH_CHECK(contains(message, "qat::prepare: 'late.second.0' (torch::nn::LinearImpl)"));
    CATCH_CHECK(contains(message, "the 'percentile' observer is not available in C++"));
    CATCH_CHECK(Snapshot(*tree) == before);
    // The model prepares once the cause is gone.
    qat::prepare(*tree);
    CATCH_CHECK_FALSE(Snapshot(*tree) == before);
  }
}
