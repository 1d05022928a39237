// qat::convert and qat::export_model: parity of the integer model with the simulation it was
// trained as, the written files reloaded in C++ (full TorchScript and lite interpreter), and
// the refusals.

#include <catch2/catch.hpp>
#include <torch/csrc/jit/mobile/import.h>
#include <torch/csrc/jit/mobile/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include <qat/qat.h>

#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>

#include "helpers.h"

namespace {

template <typename Exception, typename Fn>
std::string message_of(Fn fn) {
  try {
    fn();
  } catch (const Exception& e) {
    return e.what();
  }
  return "";
}

// Conv + BN + ReLU, max pooling, flatten, Linear + ReLU, Linear: what a small CNN is.
torch::nn::Sequential cnn() {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).bias(false)), torch::nn::BatchNorm2d(8),
      torch::nn::ReLU(), torch::nn::MaxPool2d(2), torch::nn::Flatten(),
      torch::nn::Linear(8 * 5 * 5, 32), torch::nn::ReLU(), torch::nn::Linear(32, 10));
}

// A few steps of QAT (fake quantization and observers on, batch norm in training mode) on
// a fixed random classification task.
void train(torch::nn::Sequential& net, const torch::Tensor& x, const torch::Tensor& labels) {
  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  net->train();
  for (int step = 0; step < 20; ++step) {
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), labels).backward();
    optimizer.step();
  }
}

// The simulation in eval: fake quantization on, observers off.
torch::Tensor simulate(torch::nn::Sequential& net, const torch::Tensor& x) {
  net->eval();
  qat::disable_observer(*net);
  torch::NoGradGuard no_grad;
  return net->forward(x);
}

// The quantization step of the output: the scale of the chain's last FakeQuantize.
double output_step(torch::nn::Sequential& net) {
  return qat::fake_quantizers(*net).back()->scale.item<double>();
}

torch::Tensor run(torch::jit::Module& module, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return module.forward({x}).toTensor();
}

// The share of elements of `got` within one step (and a rounding slack) of `expected`.
double within_one_step(const torch::Tensor& got, const torch::Tensor& expected, double step) {
  const auto steps = (got - expected).abs() / step;
  return (steps <= 1 + 1e-3).to(torch::kDouble).mean().item<double>();
}

// Trains the prepared `net` on `x` (three random classes), converts it and checks that the
// integer model follows the simulation within one step on 99% of the outputs.
torch::jit::Module train_and_convert(
    torch::nn::Sequential& net, const torch::Tensor& x, const char* what) {
  train(net, x, torch::randint(0, 3, {x.size(0)}));
  auto integer = qat::convert(*net, x);
  const double share = within_one_step(run(integer, x), simulate(net, x), output_step(net));
  std::cout << "[export] " << what << ": " << share * 100 << "% within one step\n";
  CATCH_CHECK(share >= 0.99);
  return integer;
}

}  // namespace

CATCH_TEST_CASE("convert: the integer model follows the simulation within one step", "[export]") {
  torch::manual_seed(0);
  auto net = cnn();
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({64, 1, 12, 12});
  const auto labels = torch::randint(0, 10, {64});
  train(net, x, labels);

  const auto test = torch::randn({32, 1, 12, 12});
  auto integer = qat::convert(*net, test);
  const auto expected = simulate(net, test);
  const auto got = run(integer, test);
  const double step = output_step(net);
  const double share = within_one_step(got, expected, step);
  const double max_steps = ((got - expected).abs() / step).max().item<double>();
  std::cout << "[export] integer vs simulation: " << share * 100 << "% within one step, max "
            << max_steps << " steps, top-1 agreement "
            << (got.argmax(1) == expected.argmax(1)).to(torch::kDouble).mean().item<double>() * 100
            << "%\n";
  CATCH_CHECK(got.sizes() == expected.sizes());
  CATCH_CHECK(share >= 0.99);
  // The model runs PyTorch's quantized operators on packed weights.
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::conv2d_relu") != std::string::npos);
  CATCH_CHECK(code.find("quantized::linear_relu") != std::string::npos);
  CATCH_CHECK(code.find("quantized::linear(") != std::string::npos);
}

CATCH_TEST_CASE(
    "convert: 1-D convs and transposed convs run on their integer kernels", "[export]") {
  torch::manual_seed(2);
  torch::nn::Sequential net(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 8, 3).padding(1).bias(false)),
      torch::nn::BatchNorm1d(8), torch::nn::ReLU(), torch::nn::MaxPool1d(2),
      torch::nn::ConvTranspose1d(torch::nn::ConvTranspose1dOptions(8, 4, 2).stride(2)),
      torch::nn::ReLU(), torch::nn::Flatten(), torch::nn::Linear(4 * 12, 3));
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({64, 2, 12});
  auto integer = train_and_convert(net, x, "1-D convs");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::conv1d_relu") != std::string::npos);
  CATCH_CHECK(code.find("quantized::conv_transpose1d") != std::string::npos);
  CATCH_CHECK(code.find("aten::relu") != std::string::npos);  // the transposed conv's ReLU
  // No float conv is left.
  CATCH_CHECK(code.find("aten::conv") == std::string::npos);
}

CATCH_TEST_CASE(
    "convert: a padding 'same' that pads both sides alike runs on the integer kernel", "[export]") {
  // It was refused ("pads with padding 'same'") though the kernels take the sizes it means.
  torch::manual_seed(6);
  using torch::nn::Conv2dOptions;
  torch::nn::Sequential net(
      torch::nn::Conv2d(Conv2dOptions(1, 4, 3).padding(torch::kSame)),
      torch::nn::Conv2d(Conv2dOptions(4, 4, 5).padding(torch::kSame).dilation(2).bias(false)),
      torch::nn::BatchNorm2d(4), torch::nn::ReLU(),
      torch::nn::Conv2d(Conv2dOptions(4, 4, 3).padding(torch::kValid)), torch::nn::Flatten(),
      torch::nn::Linear(4 * 6 * 6, 3));
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({64, 1, 8, 8});
  auto integer = train_and_convert(net, x, "padding 'same'");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::conv2d_relu") != std::string::npos);
  CATCH_CHECK(code.find("aten::conv") == std::string::npos);

  // An even kernel pads the right one more: no integer conv pads so.
  torch::nn::Sequential even(torch::nn::Conv2d(Conv2dOptions(1, 4, 4).padding(torch::kSame)));
  qat::prepare(*even, qat::presets::int8());
  qat::calibrate(even, std::vector<torch::Tensor>{x});
  const auto message = message_of<std::invalid_argument>([&] { qat::convert(*even, x); });
  CATCH_CHECK_THAT(
      message, Catch::Contains("'0' pads with padding_mode kZeros or with a padding 'same' that "
                               "pads one side more than the other"));
}

CATCH_TEST_CASE("convert: 3-D convs run on their integer kernels", "[export]") {
  torch::manual_seed(4);
  torch::nn::Sequential net(
      torch::nn::Conv3d(torch::nn::Conv3dOptions(1, 4, 3).padding(1).bias(false)),
      torch::nn::BatchNorm3d(4), torch::nn::ReLU(), torch::nn::Conv3d(4, 4, 3),
      torch::nn::AdaptiveAvgPool3d(torch::nn::AdaptiveAvgPool3dOptions({1, 1, 1})),
      torch::nn::Flatten(), torch::nn::Linear(4, 3));
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({64, 1, 4, 5, 5});
  auto integer = train_and_convert(net, x, "3-D convs");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::conv3d_relu") != std::string::npos);
  CATCH_CHECK(code.find("quantized::conv3d(") != std::string::npos);
  CATCH_CHECK(code.find("aten::adaptive_avg_pool3d") != std::string::npos);
  CATCH_CHECK(code.find("aten::conv") == std::string::npos);
}

CATCH_TEST_CASE("convert: a standalone batch norm runs on quantized::batch_norm2d", "[export]") {
  torch::manual_seed(5);
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)), torch::nn::ReLU(),
      torch::nn::BatchNorm2d(4), torch::nn::Flatten(), torch::nn::Linear(4 * 6 * 6, 3));
  qat::prepare(*net, qat::presets::int8());
  // The batch norm requantizes: a FakeQuantize after it (none is needed before the Linear).
  CATCH_CHECK(
      qat_test::child_names(*net) ==
      std::vector<std::string>{
          "input_fake_quant", "0", "0_fake_quant", "2", "2_fake_quant", "3", "4", "4_fake_quant"});
  const auto x = torch::randn({64, 1, 6, 6});
  auto integer = train_and_convert(net, x, "standalone batch norm");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::batch_norm2d") != std::string::npos);
  CATCH_CHECK(code.find("aten::batch_norm") == std::string::npos);
  // Stored as its affine map (qat::batch_norm_affine), no running statistics, as Python's
  // qat.quantized.BatchNorm stores it.
  const auto* bn = net->named_children()["2"]->as<torch::nn::BatchNorm2d>();
  CATCH_REQUIRE(bn != nullptr);
  const auto affine = qat::batch_norm_affine(
      bn->weight, bn->bias, bn->running_mean, bn->running_var, bn->options.eps());
  int folded = 0;
  for (const auto& buffer : integer.named_buffers()) {
    CATCH_CHECK(buffer.name.find("running") == std::string::npos);
    folded += torch::equal(buffer.value, std::get<0>(affine)) ? 1 : 0;
    folded += torch::equal(buffer.value, std::get<1>(affine)) ? 1 : 0;
  }
  CATCH_CHECK(folded == 2);
}

CATCH_TEST_CASE(
    "convert: norms and ELU / leaky ReLU requantize on their quantized kernels", "[export]") {
  torch::manual_seed(6);
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)), torch::nn::GroupNorm(2, 4),
      torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)), torch::nn::Flatten(),
      torch::nn::Linear(4 * 6 * 6, 8), torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})),
      torch::nn::ELU(torch::nn::ELUOptions().alpha(0.5)), torch::nn::Linear(8, 3));
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({64, 1, 6, 6});
  auto integer = train_and_convert(net, x, "norms and activations");
  const auto code = integer.get_method("forward").graph()->toString();
  for (const char* kernel :
       {"quantized::group_norm", "quantized::leaky_relu", "quantized::layer_norm",
        "quantized::elu"}) {
    CATCH_CHECK(code.find(kernel) != std::string::npos);
  }
  CATCH_CHECK(code.find("aten::dequantize") == code.rfind("aten::dequantize"));  // the output's
}

CATCH_TEST_CASE("convert: an embedding table runs on quantized::embedding_byte", "[export]") {
  torch::manual_seed(3);
  torch::nn::Sequential net(
      torch::nn::Embedding(20, 6), torch::nn::Flatten(), torch::nn::Linear(5 * 6, 3));
  qat::prepare(*net, qat::presets::int8());
  // Weight-only: no FakeQuantize on the indices or the rows; the Linear's input gets one.
  CATCH_CHECK(
      qat_test::child_names(*net) ==
      std::vector<std::string>{"0", "1", "2_input_fake_quant", "2", "2_fake_quant"});
  const auto x = torch::randint(0, 20, {64, 5}, torch::kLong);
  auto integer = train_and_convert(net, x, "embedding");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::embedding_byte") != std::string::npos);
  CATCH_CHECK(code.find("aten::embedding") == std::string::npos);
  // The lite interpreter runs the table's kernel as the converted module does.
  const qat_test::TempDir dir("qat_export_embedding");
  const auto path = dir.file("embedding.ptl");
  qat::export_model(*net, x, path);
  CATCH_CHECK(
      torch::equal(torch::jit::_load_for_mobile(path).forward({x}).toTensor(), run(integer, x)));
}

CATCH_TEST_CASE("convert: an embedding bag runs on quantized::embedding_bag_byte", "[export]") {
  torch::manual_seed(4);
  for (const bool mean : {true, false}) {
    CATCH_INFO("mean " << mean);
    torch::nn::Sequential net(
        torch::nn::EmbeddingBag(torch::nn::EmbeddingBagOptions(20, 6).mode(
            mean ? torch::nn::EmbeddingBagMode(torch::kMean) : torch::kSum)),
        torch::nn::Linear(6, 3));
    qat::prepare(*net, qat::presets::int8());
    CATCH_CHECK(net->ptr<qat::EmbeddingBagImpl>(0) != nullptr);
    // Weight-only: the Linear quantizes its float input.
    CATCH_CHECK(
        qat_test::child_names(*net) ==
        std::vector<std::string>{"0", "1_input_fake_quant", "1", "1_fake_quant"});
    const auto x = torch::randint(0, 20, {64, 5}, torch::kLong);
    auto integer = train_and_convert(net, x, mean ? "embedding bag (mean)" : "embedding bag (sum)");
    const auto code = integer.get_method("forward").graph()->toString();
    CATCH_CHECK(code.find("quantized::embedding_bag_byte") != std::string::npos);
    CATCH_CHECK(code.find("aten::embedding_bag") == std::string::npos);
  }
}

CATCH_TEST_CASE(
    "convert: a table no kernel reads as the simulation does stays float, fake-quantized",
    "[export]") {
  torch::manual_seed(5);
  using Options = torch::nn::EmbeddingBagOptions;
  auto per_tensor_spec = qat::presets::int8().weight();
  const auto per_tensor = qat::presets::int8().weight(per_tensor_spec.per_channel(false));
  const std::vector<std::tuple<const char*, torch::nn::AnyModule, qat::Config>> tables{
      {"bag of mode max",
       torch::nn::AnyModule(torch::nn::EmbeddingBag(Options(20, 6).mode(torch::kMax))),
       qat::presets::int8()},
      {"bag with a padding index",
       torch::nn::AnyModule(
           torch::nn::EmbeddingBag(Options(20, 6).mode(torch::kSum).padding_idx(0))),
       qat::presets::int8()},
      {"table quantized per tensor", torch::nn::AnyModule(torch::nn::Embedding(20, 6)),
       per_tensor}};
  for (const auto& [what, table, config] : tables) {
    CATCH_INFO(what);
    torch::nn::Sequential net;
    net->push_back(table.clone());
    qat::prepare(*net, config);
    const auto x = torch::randint(0, 20, {16, 5}, torch::kLong);
    net->forward(x);  // observes the table
    const auto expected = simulate(net, x);
    auto integer = qat::convert(*net, x);
    const auto code = integer.get_method("forward").graph()->toString();
    CATCH_CHECK(code.find("quantized::") == std::string::npos);
    CATCH_CHECK(code.find("aten::embedding") != std::string::npos);
    // The same table, looked up by the same aten op.
    const auto got = run(integer, x);
    CATCH_CHECK(torch::equal(got, expected));
    // The lite interpreter runs the float lookup as the converted module does.
    const qat_test::TempDir dir("qat_export_float_table");
    const auto path = dir.file("table.ptl");
    qat::export_model(*net, x, path);
    CATCH_CHECK(torch::equal(torch::jit::_load_for_mobile(path).forward({x}).toTensor(), got));
  }
}

CATCH_TEST_CASE(
    "convert: a table with max_norm is stored with every row renormalized, in integers",
    "[export]") {
  torch::manual_seed(6);
  torch::nn::Sequential net(torch::nn::Embedding(torch::nn::EmbeddingOptions(20, 6).max_norm(1.0)));
  qat::prepare(*net, qat::presets::int8());
  {
    torch::NoGradGuard no_grad;
    net->ptr<qat::EmbeddingImpl>(0)->weight.mul_(3);  // every row's norm above max_norm
  }
  // Observes the table; renormalizes the rows 0-9 it reads, not 10-19.
  net->forward(torch::randint(0, 10, {16, 5}, torch::kLong));
  const auto every_row = torch::arange(20, torch::kLong).reshape({4, 5});
  auto integer = qat::convert(*net, every_row);
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("quantized::embedding_byte") != std::string::npos);
  CATCH_CHECK(code.find("aten::embedding_renorm_") == std::string::npos);
  // Converted before the simulation reads rows 10-19 (and renormalizes them as it does).
  const auto got = run(integer, every_row);
  const auto expected = simulate(net, every_row);
  CATCH_CHECK(torch::allclose(got, expected, 1e-6, 1e-6));
  CATCH_CHECK((expected.norm(2, -1) <= 1.0 + 0.1).all().item<bool>());
}

CATCH_TEST_CASE("convert: a skipped transposed conv or embedding runs in float", "[export]") {
  torch::manual_seed(4);
  // Six tokens of four values each, read by the transposed conv as six channels; the table
  // renormalizes the rows it reads.
  torch::nn::Sequential net(
      torch::nn::Embedding(torch::nn::EmbeddingOptions(20, 4).max_norm(1.5)),
      torch::nn::ConvTranspose1d(torch::nn::ConvTranspose1dOptions(6, 4, 2).stride(2).groups(2)),
      torch::nn::Flatten(), torch::nn::Linear(4 * 8, 3));
  qat::prepare(*net, qat::presets::int8().skip("0").skip("1"));
  const auto x = torch::randint(0, 20, {64, 6}, torch::kLong);
  auto integer = train_and_convert(net, x, "float embedding and transposed conv");
  const auto code = integer.get_method("forward").graph()->toString();
  CATCH_CHECK(code.find("aten::embedding") != std::string::npos);
  CATCH_CHECK(code.find("aten::conv_transpose1d") != std::string::npos);
  // Its rows are stored renormalized as a lookup leaves them: the file changes nothing.
  CATCH_CHECK(code.find("aten::embedding_renorm_") == std::string::npos);
  const auto every_row = torch::arange(24, torch::kLong).remainder(20).reshape({4, 6});
  CATCH_CHECK(
      within_one_step(run(integer, every_row), simulate(net, every_row), output_step(net)) == 1.0);
}

CATCH_TEST_CASE(
    "convert: a grouped transposed conv runs in float on its fake-quantized weight", "[export]") {
  torch::manual_seed(7);
  for (const bool relu : {false, true}) {
    CATCH_INFO("relu " << relu);
    torch::nn::Sequential net(
        torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 6, 3).padding(1)),
        torch::nn::ConvTranspose1d(torch::nn::ConvTranspose1dOptions(6, 4, 2).stride(2).groups(2)));
    if (relu) {
      net->push_back(torch::nn::ReLU());
    }
    net->push_back(torch::nn::Flatten());
    net->push_back(torch::nn::Linear(4 * 16, 3));
    qat::prepare(*net, qat::presets::int8());
    // Its weight has one scale per output channel of a group (4 / 2 groups).
    const auto grouped = net->ptr<qat::ConvTranspose1dImpl>(3);
    CATCH_CHECK(grouped->weight_fake_quant->spec().axis() == 1);
    // No integer kernel: prepare links no input quantizer (its bias is not rounded), and
    // linking one is refused, while the conv before it has one.
    CATCH_CHECK_FALSE(grouped->has_integer_kernel());
    CATCH_CHECK(grouped->input_quantizer().is_empty());
    CATCH_CHECK_FALSE(net->ptr<qat::Conv1dImpl>(1)->input_quantizer().is_empty());
    CATCH_CHECK_THROWS_WITH(
        grouped->set_input_quantizer(net->ptr<qat::FakeQuantizeImpl>(0)),
        Catch::Contains("no integer kernel"));
    const auto x = torch::randn({64, 2, 8});
    auto integer = train_and_convert(net, x, "grouped transposed conv");
    CATCH_CHECK(grouped->weight_fake_quant->scale.numel() == 2);
    const auto code = integer.get_method("forward").graph()->toString();
    CATCH_CHECK(code.find("aten::conv_transpose1d") != std::string::npos);
    CATCH_CHECK(code.find("quantized::conv_transpose") == std::string::npos);
    CATCH_CHECK(code.find("quantized::conv1d") != std::string::npos);
    CATCH_CHECK(code.find("quantized::linear") != std::string::npos);
  }
}

CATCH_TEST_CASE("convert: float layers run between a dequantize and a quantize", "[export]") {
  torch::manual_seed(1);
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)), torch::nn::ReLU(),
      torch::nn::AdaptiveAvgPool2d(2), torch::nn::Flatten(), torch::nn::Linear(16, 8),
      torch::nn::Sigmoid(), torch::nn::Linear(8, 4), torch::nn::Linear(4, 3));
  // A skipped layer stays a float torch::nn::Linear.
  qat::prepare(*net, qat::presets::int8().skip("7"));
  const auto x = torch::randn({64, 1, 8, 8});
  train(net, x, torch::randint(0, 3, {64}));

  auto integer = qat::convert(*net, x);
  const auto expected = simulate(net, x);
  const auto got = run(integer, x);
  // The output comes from the float layer: compare against the scale of its input.
  const double step = output_step(net);
  const double share = within_one_step(got, expected, step);
  std::cout << "[export] with float layers: " << share * 100
            << "% within one step of the last FakeQuantize\n";
  CATCH_CHECK(share >= 0.99);

  // The float layers run on XNNPACK in the .ptl, in another order of float arithmetic:
  // export checks the file against what it saved, and loosely against the model.
  const qat_test::TempDir dir("qat_export");
  const auto path = dir.file("float_layers.ptl");
  qat::export_model(*net, x, path);
  const auto reloaded = torch::jit::_load_for_mobile(path).forward({x}).toTensor();
  CATCH_CHECK(torch::allclose(reloaded, got, 1e-4, 1e-5));
}

CATCH_TEST_CASE(
    "export_model writes .pt and .ptl files that reload to the same outputs", "[export]") {
  torch::manual_seed(2);
  auto net = cnn();
  qat::prepare(*net, qat::presets::int8());
  const auto x = torch::randn({16, 1, 12, 12});
  train(net, x, torch::randint(0, 10, {16}));
  auto integer = qat::convert(*net, x);
  const auto expected = run(integer, x);

  const qat_test::TempDir dir("qat_export");
  const auto pt = dir.file("model.pt");
  qat::export_model(*net, x, pt, {"qnnpack", false});
  torch::jit::ExtraFilesMap extra{{"qat/metadata.json", ""}};
  auto loaded = torch::jit::load(pt, c10::nullopt, extra);
  CATCH_CHECK(torch::equal(run(loaded, x), expected));
  const auto& metadata = extra["qat/metadata.json"];
  CATCH_CHECK(metadata.find("\"qat_version\"") != std::string::npos);
  CATCH_CHECK(metadata.find("\"quantized_engine\": \"qnnpack\"") != std::string::npos);
  CATCH_CHECK(metadata.find("\"weight_bits\": 8") != std::string::npos);

  const auto ptl = dir.file("model.ptl");
  qat::export_model(*net, x, ptl);
  auto mobile = torch::jit::_load_for_mobile(ptl);
  torch::NoGradGuard no_grad;
  CATCH_CHECK(torch::equal(mobile.forward({x}).toTensor(), expected));
  std::cout << "[export] model.pt " << std::filesystem::file_size(pt) << " bytes, model.ptl "
            << std::filesystem::file_size(ptl) << " bytes\n";
}

CATCH_TEST_CASE("convert and export_model refuse bad input with one-line errors", "[export]") {
  torch::manual_seed(3);
  const auto x = torch::randn({4, 1, 12, 12});
  const qat_test::TempDir dir("qat_export");

  CATCH_SECTION("a model never calibrated or trained") {
    auto net = cnn();
    qat::prepare(*net, qat::presets::int8());
    const auto message = message_of<std::invalid_argument>([&] { qat::convert(*net, x); });
    CATCH_CHECK(message.find("never observed data") != std::string::npos);
    CATCH_CHECK(message.find("calibrate") != std::string::npos);
    CATCH_CHECK(message.find('\n') == std::string::npos);
  }

  CATCH_SECTION("activations narrower than the kernels' 8-bit range") {
    auto net = cnn();
    qat::prepare(*net, qat::presets::w4a4());
    qat::calibrate(net, std::vector<torch::Tensor>{x});
    const auto message = message_of<std::invalid_argument>([&] { qat::convert(*net, x); });
    CATCH_CHECK(message.find("to [0, 15], which have no integer kernel") != std::string::npos);
    CATCH_CHECK(message.find('\n') == std::string::npos);
  }

  CATCH_SECTION("an unwritable path, before any work") {
    // Uncalibrated too: the path is what is refused, so it is checked first.
    auto net = cnn();
    qat::prepare(*net, qat::presets::int8());
    const auto missing = dir.file("missing/model.ptl");
    auto message = message_of<std::invalid_argument>([&] { qat::export_model(*net, x, missing); });
    CATCH_CHECK(message.find("does not exist") != std::string::npos);
    message =
        message_of<std::invalid_argument>([&] { qat::export_model(*net, x, dir.path.string()); });
    CATCH_CHECK(message.find("is a directory") != std::string::npos);
    CATCH_CHECK(!std::filesystem::exists(missing));
  }

  CATCH_SECTION("a module without a conversion, named with its path and type") {
    torch::nn::Sequential net(torch::nn::Linear(4, 4), torch::nn::GELU(), torch::nn::Linear(4, 2));
    qat::prepare(*net, qat::presets::int8());
    const auto input = torch::randn({8, 4});
    net->forward(input);
    const auto message = message_of<std::invalid_argument>([&] { qat::convert(*net, input); });
    CATCH_CHECK(message.find("'1'") != std::string::npos);
    CATCH_CHECK(message.find("GELU") != std::string::npos);
    CATCH_CHECK(message.find('\n') == std::string::npos);
  }

  CATCH_SECTION("a model that is not a Sequential") {
    torch::nn::Linear linear(4, 2);
    const auto message = message_of<std::invalid_argument>([&] {
      qat::convert(*linear, torch::randn({1, 4}));
    });
    CATCH_CHECK(message.find("torch::nn::Sequential") != std::string::npos);
    CATCH_CHECK(message.find("examples/cpp/train_scripted.cpp") != std::string::npos);
  }

  CATCH_SECTION("a backend this LibTorch does not have") {
    auto net = cnn();
    qat::prepare(*net, qat::presets::int8());
    const auto message = message_of<std::invalid_argument>([&] {
      qat::convert(*net, x, {"no-such-engine", true});
    });
    CATCH_CHECK(message.find("no-such-engine") != std::string::npos);
  }
}
