// qat::prepare on Sequential chains and nested custom modules, calibration, state
// save / load, and the module registry.

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <qat/qat.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "helpers.h"

namespace {

using qat_test::child_names;
using qat_test::invalid_argument_message;

template <typename Impl>
bool is_a(const std::shared_ptr<torch::nn::Module>& module) {
  return std::dynamic_pointer_cast<Impl>(module) != nullptr;
}

// A file under the temporary directory, removed when the test ends.
struct TempFile {
  explicit TempFile(const std::string& stem)
      : path((std::filesystem::temp_directory_path() /
              (stem + "_" + std::to_string(::getpid()) + ".pt"))
                 .string()) {}
  ~TempFile() { std::filesystem::remove(path); }
  std::string path;
};

// A few SGD steps of mean-squared-error regression; returns the first and the last loss.
template <typename Model>
std::pair<double, double> train(
    Model& model, const torch::Tensor& x, const torch::Tensor& y, int steps, double lr) {
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(lr).momentum(0.9));
  double first = 0;
  double last = 0;
  for (int step = 0; step < steps; ++step) {
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    optimizer.step();
    (step == 0 ? first : last) = loss.template item<double>();
  }
  return {first, last};
}

torch::nn::Sequential conv_net() {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).bias(false)), torch::nn::BatchNorm2d(4),
      torch::nn::ReLU(), torch::nn::MaxPool2d(2),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3)), torch::nn::Flatten(),
      torch::nn::Linear(4 * 2 * 2, 3));
}

// A residual block whose layers live in a Sequential (rewritten in place by prepare) and
// whose add is fake-quantized by a FakeQuantize it calls itself.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const qat::QuantSpec& activation) {
    body =
        register_module("body", torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::ReLU()));
    add_fake_quant = register_module("add_fake_quant", qat::FakeQuantize(activation));
  }
  torch::Tensor forward(const torch::Tensor& x) { return add_fake_quant(x + body->forward(x)); }
  torch::nn::Sequential body{nullptr};
  qat::FakeQuantize add_fake_quant{nullptr};
};
TORCH_MODULE(Block);

struct NetImpl : torch::nn::Module {
  explicit NetImpl(const qat::QuantSpec& activation) {
    stem = register_module("stem", torch::nn::Sequential(torch::nn::Linear(4, 8)));
    block = register_module("block", Block(activation));
    head = register_module("head", torch::nn::Sequential(torch::nn::Linear(8, 2)));
    aux = register_module("aux", torch::nn::Linear(8, 1));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(block(stem->forward(x))); }
  torch::nn::Sequential stem{nullptr};
  Block block{nullptr};
  torch::nn::Sequential head{nullptr};
  // Held directly: prepare replaces the registered child, this holder keeps the float one.
  torch::nn::Linear aux{nullptr};
};
TORCH_MODULE(Net);

// A user layer and its QAT version, for the registry.
struct ScaleImpl : torch::nn::Module {
  ScaleImpl() { weight = register_parameter("weight", torch::full({1}, 2.0)); }
  torch::Tensor forward(const torch::Tensor& x) { return x * weight; }
  torch::Tensor weight;
};
TORCH_MODULE(Scale);

struct QatScaleImpl : torch::nn::Module {
  QatScaleImpl(const std::shared_ptr<ScaleImpl>& scale, const qat::QuantSpec& spec) {
    weight = register_parameter("weight", scale->weight);
    weight_fake_quant = register_module("weight_fake_quant", qat::FakeQuantize(spec));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x * weight_fake_quant(weight); }
  torch::Tensor weight;
  qat::FakeQuantize weight_fake_quant{nullptr};
};

}  // namespace

CATCH_TEST_CASE(
    "prepare swaps a Sequential's layers, places FakeQuantizes and trains", "[prepare]") {
  torch::manual_seed(0);
  torch::nn::Sequential net(
      torch::nn::Linear(4, 16), torch::nn::ReLU(), torch::nn::Linear(16, 16), torch::nn::ReLU(),
      torch::nn::Dropout(0.0), torch::nn::Linear(16, 1));
  const auto float_weight = net->ptr<torch::nn::LinearImpl>(0)->weight;
  // A fast-moving activation range: the output's FakeQuantize clamps the regression
  // output to the range seen so far, which the default EMA (0.01) widens only slowly.
  auto cfg = qat::presets::int8();
  cfg.activation(qat::QuantSpec(cfg.activation()).averaging_constant(0.2));
  qat::prepare(*net, cfg);

  CATCH_CHECK(
      child_names(*net) ==
      std::vector<std::string>{
          "input_fake_quant", "0", "0_fake_quant", "2", "2_fake_quant", "4", "5", "5_fake_quant"});
  CATCH_REQUIRE(net->size() == 8);
  CATCH_CHECK(is_a<qat::FakeQuantizeImpl>(net->ptr(0)));
  const auto first = net->ptr<qat::LinearImpl>(1);
  CATCH_REQUIRE(first != nullptr);
  CATCH_CHECK(first->relu);
  CATCH_CHECK(first->weight.is_same(float_weight));  // the float parameters, shared
  CATCH_CHECK(is_a<qat::FakeQuantizeImpl>(net->ptr(2)));
  CATCH_CHECK(net->ptr<qat::LinearImpl>(3)->relu);
  CATCH_CHECK(is_a<torch::nn::DropoutImpl>(net->ptr(5)));
  CATCH_CHECK_FALSE(net->ptr<qat::LinearImpl>(6)->relu);
  CATCH_CHECK(qat::fake_quantizers(*net).size() == 4 + 3);
  CATCH_CHECK(net->is_training());

  const auto x = torch::randn({64, 4});
  const auto y = x.matmul(torch::tensor({0.25f, -0.5f, 0.125f, 1.0f}).reshape({4, 1}));
  const auto losses = train(net, x, y, 60, 0.02);
  CATCH_INFO("loss " << losses.first << " -> " << losses.second);
  CATCH_CHECK(losses.second < 0.5 * losses.first);
  // The activation FakeQuantizes observed what flowed through them.
  const auto input_fq = net->ptr<qat::FakeQuantizeImpl>(0);
  CATCH_CHECK(input_fq->scale.item<float>() != 1.0f);
  CATCH_CHECK(first->weight_fake_quant->scale.numel() == 16);
}

CATCH_TEST_CASE("prepare folds Conv2d + BatchNorm2d + ReLU in a Sequential", "[prepare][bn]") {
  torch::manual_seed(1);
  auto net = conv_net();
  auto holder_copy = net;  // another holder of the same Sequential sees the rewrite
  qat::prepare(*net);
  CATCH_CHECK(
      child_names(*holder_copy) == std::vector<std::string>{
                                       "input_fake_quant", "0", "0_fake_quant", "3", "4",
                                       "4_fake_quant", "5", "6", "6_fake_quant"});
  const auto fused = net->ptr<qat::ConvBn2dImpl>(1);
  CATCH_REQUIRE(fused != nullptr);
  CATCH_CHECK(fused->relu);
  CATCH_CHECK(is_a<torch::nn::MaxPool2dImpl>(net->ptr(3)));
  CATCH_CHECK(net->ptr<qat::Conv2dImpl>(4) != nullptr);
  CATCH_CHECK(net->ptr<qat::LinearImpl>(7) != nullptr);
  const auto out = net->forward(torch::randn({2, 1, 10, 10}));
  CATCH_CHECK(out.sizes() == torch::IntArrayRef{2, 3});
  CATCH_CHECK(fused->weight_fake_quant->scale.numel() == 4);
}

CATCH_TEST_CASE("prepare hands a fused ReLU to the quantizer after the layer", "[prepare][bn]") {
  torch::manual_seed(3);
  torch::nn::Sequential net(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).bias(false)), torch::nn::BatchNorm2d(4),
      torch::nn::ReLU(), torch::nn::Flatten(), torch::nn::Linear(4 * 6 * 6, 3), torch::nn::ReLU());
  qat::prepare(*net);
  const auto fused = net->ptr<qat::ConvBn2dImpl>(1);
  const auto linear = net->ptr<qat::LinearImpl>(4);
  CATCH_REQUIRE((fused != nullptr && linear != nullptr));
  const auto fq = net->ptr<qat::FakeQuantizeImpl>(2);
  // The layers keep their ReLU for qat::convert's fused kernels but leave it to the
  // quantizers after them.
  CATCH_CHECK((fused->relu && linear->relu));
  CATCH_CHECK_FALSE(fused->applies_relu(fused->relu));
  CATCH_CHECK((fq->relu_input && net->ptr<qat::FakeQuantizeImpl>(5)->relu_input));
  const auto x = torch::randn({8, 1, 8, 8});
  CATCH_CHECK((net->forward(x) >= 0).all().item<bool>());
  // The quantizer alone on a pre-ReLU activation: ATen's fake-quantize of its ReLU, values
  // and gradients.
  fq->disable_observer();
  const auto pre = (fused->forward(x) * 3).detach();
  CATCH_REQUIRE((pre < 0).any().item<bool>());
  const auto taken = pre.clone().requires_grad_();
  const auto reference = pre.clone().requires_grad_();
  const auto out = fq->forward(taken);
  const auto expected = torch::fake_quantize_per_tensor_affine(
      torch::relu(reference), fq->scale.item<double>(), fq->zero_point.item<int64_t>(),
      fq->quant_min(), fq->quant_max());
  CATCH_CHECK(torch::equal(out, expected));
  const auto grad = torch::randn_like(pre);
  out.backward(grad);
  expected.backward(grad);
  CATCH_CHECK(torch::equal(taken.grad(), reference.grad()));
  fq->disable_fake_quant();
  CATCH_CHECK(torch::equal(fq->forward(pre), torch::relu(pre)));
  // A quantizer that learns its qparams cannot take it: the layer keeps its ReLU.
  torch::nn::Sequential learned(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).bias(false)), torch::nn::BatchNorm2d(4),
      torch::nn::ReLU());
  qat::prepare(*learned, qat::Config().activation(qat::QuantSpec().estimator("lsq")));
  const auto kept = learned->ptr<qat::ConvBn2dImpl>(1);
  CATCH_CHECK(kept->applies_relu(kept->relu));
  CATCH_CHECK_FALSE(learned->ptr<qat::FakeQuantizeImpl>(2)->relu_input);
  CATCH_CHECK_THROWS_AS(
      kept->hand_relu_to(learned->ptr<qat::FakeQuantizeImpl>(2)), std::invalid_argument);
}

CATCH_TEST_CASE("prepare folds Conv1d + BatchNorm1d + ReLU and swaps Conv1d", "[prepare][bn]") {
  torch::manual_seed(1);
  torch::nn::Sequential net(
      torch::nn::Conv1d(torch::nn::Conv1dOptions(2, 4, 3).bias(false)), torch::nn::BatchNorm1d(4),
      torch::nn::ReLU(), torch::nn::MaxPool1d(2), torch::nn::Conv1d(4, 4, 3), torch::nn::ReLU6(),
      torch::nn::Flatten(), torch::nn::Linear(4 * 2, 3));
  qat::prepare(*net);
  CATCH_CHECK(
      child_names(*net) == std::vector<std::string>{
                               "input_fake_quant", "0", "0_fake_quant", "3", "4", "5",
                               "5_fake_quant", "6", "7", "7_fake_quant"});
  const auto fused = net->ptr<qat::ConvBn1dImpl>(1);
  CATCH_REQUIRE(fused != nullptr);
  CATCH_CHECK(fused->relu);
  const auto conv = net->ptr<qat::Conv1dImpl>(4);
  CATCH_REQUIRE(conv != nullptr);
  CATCH_CHECK_FALSE(conv->relu);  // the ReLU6 stays, quantized with the fixed [0, 6] qparams
  CATCH_CHECK(net->ptr<qat::FakeQuantizeImpl>(6)->has_fixed_qparams());
  const auto out = net->forward(torch::randn({2, 2, 10}));
  CATCH_CHECK(out.sizes() == torch::IntArrayRef{2, 3});
  CATCH_CHECK(fused->weight_fake_quant->scale.numel() == 4);
}

CATCH_TEST_CASE(
    "learned activation qparams leave the fixed ones to the straight-through estimator",
    "[prepare]") {
  // A ReLU6 and a sigmoid fix their quantizers' qparams; the others learn with the
  // estimator asked for (prepare refused the model before), as in Python's prepare.
  for (const std::string estimator : {"lsq", "lsq_plus", "pact"}) {
    CATCH_INFO(estimator);
    torch::manual_seed(2);
    torch::nn::Sequential net(
        torch::nn::Conv1d(2, 4, 3), torch::nn::ReLU6(), torch::nn::Conv1d(4, 4, 3),
        torch::nn::Sigmoid(), torch::nn::Flatten(), torch::nn::Linear(4 * 6, 3));
    qat::prepare(*net, qat::Config().activation(qat::QuantSpec().estimator(estimator)));
    int fixed = 0;
    int learned = 0;
    for (const auto& fq : qat::fake_quantizers(*net)) {
      if (fq->has_fixed_qparams()) {
        ++fixed;
        CATCH_CHECK(fq->spec().estimator() == "ste");
      } else if (fq->spec().estimator() == estimator) {
        ++learned;
      }
    }
    CATCH_CHECK(fixed == 2);
    CATCH_CHECK(learned >= 3);
    const auto losses = train(net, torch::randn({16, 2, 10}), torch::randn({16, 3}), 3, 0.01);
    CATCH_CHECK(std::isfinite(losses.second));
  }
}

CATCH_TEST_CASE("prepare folds Conv3d + BatchNorm3d + ReLU and swaps Conv3d", "[prepare][bn]") {
  torch::manual_seed(1);
  torch::nn::Sequential net(
      torch::nn::Conv3d(torch::nn::Conv3dOptions(1, 4, 3).padding(1).bias(false)),
      torch::nn::BatchNorm3d(4), torch::nn::ReLU(), torch::nn::Conv3d(4, 2, 3),
      torch::nn::Flatten(), torch::nn::Linear(2 * 2 * 2 * 2, 3));
  qat::prepare(*net);
  CATCH_CHECK(
      child_names(*net) ==
      std::vector<std::string>{
          "input_fake_quant", "0", "0_fake_quant", "3", "3_fake_quant", "4", "5", "5_fake_quant"});
  const auto fused = net->ptr<qat::ConvBn3dImpl>(1);
  CATCH_REQUIRE(fused != nullptr);
  CATCH_CHECK(fused->relu);
  CATCH_CHECK(net->ptr<qat::Conv3dImpl>(3) != nullptr);
  const auto out = net->forward(torch::randn({2, 1, 4, 4, 4}));
  CATCH_CHECK(out.sizes() == torch::IntArrayRef{2, 3});
  CATCH_CHECK(fused->weight_fake_quant->scale.numel() == 4);
}

CATCH_TEST_CASE("prepare reaches into nested custom modules", "[prepare]") {
  torch::manual_seed(2);
  const auto cfg = qat::presets::int8();
  Net net(cfg.activation());
  const auto float_aux = net->aux.ptr();
  qat::prepare(*net, cfg);

  CATCH_CHECK(
      child_names(*net->stem) == std::vector<std::string>{"input_fake_quant", "0", "0_fake_quant"});
  CATCH_CHECK(
      child_names(*net->block->body) ==
      std::vector<std::string>{"input_fake_quant", "0", "0_fake_quant"});
  CATCH_CHECK(net->block->body->ptr<qat::LinearImpl>(1)->relu);
  CATCH_CHECK(net->head->ptr<qat::LinearImpl>(1) != nullptr);
  // The direct child is replaced in the module tree, but the struct's holder still points
  // at the float layer: what the docs tell users to avoid.
  CATCH_CHECK(is_a<qat::LinearImpl>(net->named_children()["aux"]));
  CATCH_CHECK(net->aux.ptr() == float_aux);
  CATCH_CHECK(qat::fake_quantizers(*net).size() == 3 + 3 + 1 + 3 + 1);

  const auto x = torch::randn({32, 4});
  const auto y = torch::stack({x.sum(1), x.select(1, 0) - x.select(1, 1)}, 1) * 0.3;
  const auto losses = train(net, x, y, 30, 0.02);
  CATCH_INFO("loss " << losses.first << " -> " << losses.second);
  CATCH_CHECK(losses.second < losses.first);
  CATCH_CHECK(net->block->add_fake_quant->observer->max_val.item<float>() > 0);
}

namespace {

// Every buffer and parameter of `loaded` equals `net`'s of the same name.
void check_same_state(torch::nn::Module& net, torch::nn::Module& loaded) {
  const auto saved = net.named_buffers();
  const auto restored = loaded.named_buffers();
  CATCH_REQUIRE(saved.size() == restored.size());
  for (const auto& item : saved) {
    CATCH_INFO(item.key());
    CATCH_CHECK(torch::equal(item.value(), restored[item.key()]));
  }
  for (const auto& item : net.named_parameters()) {
    CATCH_INFO(item.key());
    CATCH_CHECK(torch::equal(item.value(), loaded.named_parameters()[item.key()]));
  }
}

// `net` (prepared with `cfg`) saved with torch::save, then loaded with torch::load into a
// conv_net of other initial weights prepared the same way.
torch::nn::Sequential saved_and_loaded(const torch::nn::Sequential& net, const qat::Config& cfg) {
  TempFile file("qat_prepared");
  torch::save(net, file.path);
  torch::manual_seed(4);  // different initial weights
  auto loaded = conv_net();
  qat::prepare(*loaded, cfg);
  torch::load(loaded, file.path);
  return loaded;
}

}  // namespace

CATCH_TEST_CASE(
    "a prepared model round-trips through torch::save / torch::load", "[prepare][serialize]") {
  for (const auto& cfg : {qat::presets::int8(), qat::presets::w4a4()}) {
    CATCH_INFO("weight estimator " << cfg.weight().estimator());
    torch::manual_seed(3);
    auto net = conv_net();
    qat::prepare(*net, cfg);
    const auto x = torch::randn({8, 1, 10, 10});
    train(net, x, torch::randn({8, 3}), 3, 0.01);
    auto loaded = saved_and_loaded(net, cfg);

    for (auto* model : {&net, &loaded}) {
      qat::disable_observer(**model);
      (*model)->eval();
    }
    CATCH_CHECK(torch::equal(net->forward(x), loaded->forward(x)));
    check_same_state(*net, *loaded);
  }
}

CATCH_TEST_CASE(
    "a prepared model saved before its first batch loads and trains like the one saved",
    "[prepare][serialize]") {
  // The per-channel state is still empty when saved, and the first batch after loading sizes
  // it. torch::load's tensors can be resized (Python's torch.load's cannot: the state takes
  // fresh storage instead); this guards the C++ front end if that changes.
  for (const auto& cfg : {qat::presets::int8(), qat::presets::w4a4()}) {
    CATCH_INFO("weight estimator " << cfg.weight().estimator());
    torch::manual_seed(3);
    auto net = conv_net();
    qat::prepare(*net, cfg);
    auto loaded = saved_and_loaded(net, cfg);

    const auto x = torch::randn({8, 1, 10, 10});
    const auto y = torch::randn({8, 3});
    CATCH_CHECK(train(net, x, y, 3, 0.01) == train(loaded, x, y, 3, 0.01));
    check_same_state(*net, *loaded);
    for (const auto& item : loaded->named_buffers()) {
      CATCH_INFO(item.key());
      CATCH_CHECK(item.value().numel() > 0);  // sized by the first batch
    }
  }
}

CATCH_TEST_CASE(
    "calibrate observes float activations, then restores the switches", "[prepare][calibrate]") {
  torch::manual_seed(5);
  torch::nn::Sequential net(torch::nn::Linear(4, 3));
  const auto cfg = qat::Config().activation(qat::QuantSpec().observer("minmax"));
  qat::prepare(*net, cfg);
  const auto output_fq = net->ptr<qat::FakeQuantizeImpl>(2);
  output_fq->disable_fake_quant();  // stays off through calibration
  const std::vector<torch::Tensor> batches{
      torch::randn({5, 4}), torch::randn({5, 4}) * 3, torch::randn({5, 4}) * 100};
  qat::calibrate(net, batches, 2);

  const auto linear = net->ptr<qat::LinearImpl>(1);
  const auto input_fq = net->ptr<qat::FakeQuantizeImpl>(0);
  const auto seen = torch::cat({batches[0], batches[1]});
  CATCH_CHECK(input_fq->observer->max_val.item<float>() == seen.max().item<float>());
  const auto float_out = torch::nn::functional::linear(seen, linear->weight, linear->bias);
  CATCH_CHECK(output_fq->observer->max_val.item<float>() == Approx(float_out.max().item<float>()));
  CATCH_CHECK(input_fq->is_fake_quant_enabled());
  CATCH_CHECK(linear->weight_fake_quant->is_fake_quant_enabled());
  CATCH_CHECK_FALSE(output_fq->is_fake_quant_enabled());
  CATCH_CHECK(input_fq->is_observer_enabled());
  CATCH_CHECK(net->is_training());
  CATCH_CHECK(linear->is_training());
  // The qparams follow the observed range.
  CATCH_CHECK(
      input_fq->scale.item<float>() ==
      Approx((seen.max().item<float>() - std::min(0.0f, seen.min().item<float>())) / 255));

  qat::disable_fake_quant(*net);
  const auto x = torch::randn({2, 4});
  CATCH_CHECK(torch::allclose(
      net->forward(x), torch::nn::functional::linear(x, linear->weight, linear->bias)));

  // No batch: refused (nothing would be observed), the switches restored; none asked for: fine.
  qat::enable_fake_quant(*net);
  CATCH_CHECK_THROWS_WITH(
      qat::calibrate(net, std::vector<torch::Tensor>{}),
      Catch::Contains("qat::calibrate: batches is empty, so nothing was observed"));
  CATCH_CHECK(input_fq->is_fake_quant_enabled());
  CATCH_CHECK(net->is_training());
  qat::calibrate(net, std::vector<torch::Tensor>{}, 0);
}

struct AttentionNet : torch::nn::Module {
  AttentionNet()
      : proj(register_module("proj", torch::nn::Linear(8, 8))),
        attention(register_module("attention", torch::nn::MultiheadAttention(8, 2))) {}
  torch::nn::Linear proj;
  torch::nn::MultiheadAttention attention;
};

CATCH_TEST_CASE(
    "prepare refuses attention and recurrent layers, naming the Python route and the skip",
    "[prepare]") {
  const std::string route =
      " computes with its weights inside its own forward, where the C++ front end has no graph "
      "to place fake quantizers; prepare the model in Python (qat.prepare quantizes attention "
      "projections, qat.presets.w8a8_dynamic() recurrent layers) and train the scripted model "
      "from C++ (examples/cpp/train_scripted.cpp)";
  auto net = std::make_shared<AttentionNet>();
  CATCH_CHECK(
      invalid_argument_message([&] { qat::prepare(*net); }) ==
      "qat::prepare: 'attention' (" + net->attention->name() + ")" + route +
          ", or keep it in float with Config::skip(\"attention\")");
  // Refused before anything changed; the attention's out_proj (which its forward never
  // calls) is not swapped even when the attention is skipped.
  CATCH_CHECK(is_a<torch::nn::LinearImpl>(net->named_children()["proj"]));
  qat::prepare(*net, qat::Config().skip("attention"));
  CATCH_CHECK(is_a<qat::LinearImpl>(net->named_children()["proj"]));
  CATCH_CHECK(is_a<torch::nn::LinearImpl>(net->named_modules()["attention.out_proj"]));

  torch::nn::Sequential recurrent(torch::nn::Linear(4, 4), torch::nn::LSTM(4, 4));
  CATCH_CHECK(
      invalid_argument_message([&] { qat::prepare(*recurrent); }) ==
      "qat::prepare: '1' (" + recurrent->ptr(1)->name() + ")" + route +
          ", or keep it in float with Config::skip(\"1\")");
  torch::nn::GRU gru(4, 4);
  CATCH_CHECK(invalid_argument_message([&] {
                qat::prepare(*gru);
              }) == "qat::prepare: the model (" + gru->name() + ")" + route);
}

CATCH_TEST_CASE("prepare: skip, dynamic and bad input", "[prepare]") {
  torch::nn::Sequential net(
      torch::nn::Linear(4, 4), torch::nn::ReLU(), torch::nn::Linear(4, 4), torch::nn::Linear(4, 2));
  qat::prepare(*net, qat::Config().skip("2"));
  // After the float layer the next QAT layer gets its input fake-quantized again.
  CATCH_CHECK(
      child_names(*net) ==
      std::vector<std::string>{
          "input_fake_quant", "0", "0_fake_quant", "2", "3_input_fake_quant", "3", "3_fake_quant"});
  CATCH_CHECK(is_a<torch::nn::LinearImpl>(net->ptr(3)));

  torch::nn::Sequential dynamic(torch::nn::Linear(4, 4));
  qat::prepare(*dynamic, qat::Config().dynamic(true));
  CATCH_CHECK(child_names(*dynamic) == std::vector<std::string>{"0"});

  CATCH_CHECK(
      invalid_argument_message([&] { qat::prepare(*net); }) ==
      "qat::prepare: the model is prepared already ('0' is a qat::LinearImpl); prepare the float "
      "model instead");
  torch::nn::Sequential fresh(torch::nn::Linear(4, 4));
  CATCH_CHECK(
      invalid_argument_message([&] {
        qat::prepare(*fresh, qat::Config().override_layer("fc9", qat::QuantSpec(), c10::nullopt));
      }) == "qat::prepare: Config.overrides names 'fc9', which is not a module of the model");
  CATCH_CHECK(
      invalid_argument_message([&] { qat::prepare(*fresh, qat::Config().skip("0.weight")); }) ==
      "qat::prepare: Config.skip names '0.weight', which is not a module of the model");
  torch::nn::Linear bare(2, 2);
  CATCH_CHECK(
      invalid_argument_message([&] { qat::prepare(*bare); }) ==
      "qat::prepare: the root module itself (torch::nn::LinearImpl) cannot be replaced in place; "
      "wrap it in a torch::nn::Sequential");
}

CATCH_TEST_CASE(
    "the module registry swaps user types and names its errors", "[prepare][registry]") {
  const auto names = qat::ModuleRegistry::global().names();
  CATCH_CHECK(std::count(names.begin(), names.end(), "torch::nn::LinearImpl") == 1);
  CATCH_CHECK(std::count(names.begin(), names.end(), "torch::nn::Conv2dImpl") == 1);

  auto factory = [](const std::shared_ptr<ScaleImpl>& scale, const qat::SwapOptions& options) {
    return std::make_shared<QatScaleImpl>(scale, options.weight);
  };
  qat::register_module<ScaleImpl>(factory);
  const auto duplicate =
      invalid_argument_message([&] { qat::register_module<ScaleImpl>(factory); });
  CATCH_CHECK(duplicate.find("qat::register_module: ") == 0);
  CATCH_CHECK(
      duplicate.find("ScaleImpl is registered already; pass replace=true to replace it") !=
      std::string::npos);
  qat::register_module<ScaleImpl>(factory, /*fuses_relu=*/false, /*replace=*/true);

  torch::nn::Sequential net(torch::nn::Linear(3, 3), Scale());
  const auto float_scale = net->ptr<ScaleImpl>(1);
  qat::prepare(*net);
  CATCH_CHECK(
      child_names(*net) ==
      std::vector<std::string>{"input_fake_quant", "0", "0_fake_quant", "1", "1_fake_quant"});
  const auto swapped = net->ptr<QatScaleImpl>(3);
  CATCH_REQUIRE(swapped != nullptr);
  CATCH_CHECK(swapped->weight.is_same(float_scale->weight));
  CATCH_CHECK(net->forward(torch::randn({2, 3})).sizes() == torch::IntArrayRef{2, 3});

  // Registered weight-only, the same module gets no activation FakeQuantize after it, and
  // the Linear after it quantizes its own input.
  const auto both = invalid_argument_message([&] {
    qat::register_module<ScaleImpl>(
        factory, /*fuses_relu=*/true, /*replace=*/true, /*weight_only=*/true);
  });
  CATCH_CHECK(both.find("cannot both fuse a ReLU and be weight-only") != std::string::npos);
  CATCH_CHECK_FALSE(qat::ModuleRegistry::global().weight_only(typeid(ScaleImpl)));
  qat::register_module<ScaleImpl>(
      factory, /*fuses_relu=*/false, /*replace=*/true, /*weight_only=*/true);
  CATCH_CHECK(qat::ModuleRegistry::global().weight_only(typeid(ScaleImpl)));
  torch::nn::Sequential table_first(Scale(), torch::nn::Linear(3, 3));
  qat::prepare(*table_first);
  CATCH_CHECK(
      child_names(*table_first) ==
      std::vector<std::string>{"0", "1_input_fake_quant", "1", "1_fake_quant"});

  CATCH_CHECK(qat::unregister_module<ScaleImpl>());
  CATCH_CHECK_FALSE(qat::unregister_module<ScaleImpl>());
  const auto unknown = invalid_argument_message([] {
    qat::ModuleRegistry::global().swap(
        std::make_shared<ScaleImpl>(),
        qat::SwapOptions{qat::QuantSpec(), qat::QuantSpec(), false, "scale"});
  });
  CATCH_CHECK(unknown.find("qat::ModuleRegistry: no QAT module is registered for ") == 0);
  CATCH_CHECK(unknown.find("ScaleImpl ('scale'); registered: ") != std::string::npos);
  CATCH_CHECK(unknown.find("torch::nn::LinearImpl") != std::string::npos);
  CATCH_CHECK(unknown.find('\n') == std::string::npos);
}
