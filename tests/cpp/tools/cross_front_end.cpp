// The C++ half of tests/python/test_cross_front_end.py: builds a torch::nn::Sequential from a
// layer list, loads the float weights Python saved, prepares it with a preset, calibrates
// it on Python's batches and exports it, so that the test compares every step with
// qat.prepare / qat.calibrate / qat.export on the same model.
//
//   qat_cross_front_end LAYERS.txt STATE.pt DATA.pt PRESET OUT_DIR
//
// LAYERS.txt holds one layer per line, as the test writes it:
//   conv1d|conv2d|conv3d IN OUT KERNEL STRIDE PADDING BIAS |
//   convtranspose1d|convtranspose2d IN OUT KERNEL STRIDE PADDING OUTPUT_PADDING BIAS GROUPS |
//   batchnorm1d|batchnorm2d|batchnorm3d N | embedding NUM DIM PADDING_IDX MAX_NORM |
//   embeddingbag NUM DIM sum|mean|max PADDING_IDX | (a padding index or max norm of -1: none)
//   linear IN OUT BIAS | relu | relu6 | sigmoid | tanh | maxpool1d|maxpool2d|maxpool3d KERNEL |
//   avgpool2d|avgpool3d KERNEL | adaptiveavgpool2d SIZE | flatten START END |
//   layernorm N | groupnorm GROUPS CHANNELS | elu ALPHA | leakyrelu SLOPE
// STATE.pt is Python's state_dict of the same nn.Sequential (torch.save), DATA.pt
// {"calibration": [batches], "example": x, "test": y}. PRESET is int8 or w4a8.
// It writes OUT_DIR/report.pt (torch.load reads it): the prepared chain's child names in order
// ("children"), which of them are FakeQuantize modules ("fake_quant": name -> [scale,
// zero_point, fixed]), weight quantizers included under their paths, and the simulation's
// output on y in eval mode ("simulation"); and OUT_DIR/model.pt,
// the integer model from qat::export_model (full TorchScript, qnnpack).

#include <fmt/format.h>
#include <torch/torch.h>

#include <qat/qat.h>

#include <exception>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

c10::IValue load(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error(fmt::format("cannot open '{}'", path));
  }
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), {}};
  return torch::pickle_load(bytes);
}

torch::nn::Sequential build(const std::string& path) {
  std::ifstream file(path);
  if (!file) {
    throw std::runtime_error(fmt::format("cannot open '{}'", path));
  }
  torch::nn::Sequential net;
  std::string line;
  while (std::getline(file, line)) {
    std::istringstream fields(line);
    std::string kind;
    if (!(fields >> kind)) {
      continue;
    }
    int64_t a = 0, b = 0, c = 0, d = 0, e = 0, f = 0, g = 0, h = 0;
    double real = 0;
    std::string word;
    if (kind == "convtranspose1d" && fields >> a >> b >> c >> d >> e >> f >> g >> h) {
      net->push_back(torch::nn::ConvTranspose1d(torch::nn::ConvTranspose1dOptions(a, b, c)
                                                    .stride(d)
                                                    .padding(e)
                                                    .output_padding(f)
                                                    .bias(g != 0)
                                                    .groups(h)));
    } else if (kind == "convtranspose2d" && fields >> a >> b >> c >> d >> e >> f >> g >> h) {
      net->push_back(torch::nn::ConvTranspose2d(torch::nn::ConvTranspose2dOptions(a, b, c)
                                                    .stride(d)
                                                    .padding(e)
                                                    .output_padding(f)
                                                    .bias(g != 0)
                                                    .groups(h)));
    } else if (kind == "conv1d" && fields >> a >> b >> c >> d >> e >> f) {
      net->push_back(
          torch::nn::Conv1d(torch::nn::Conv1dOptions(a, b, c).stride(d).padding(e).bias(f != 0)));
    } else if (kind == "conv2d" && fields >> a >> b >> c >> d >> e >> f) {
      net->push_back(
          torch::nn::Conv2d(torch::nn::Conv2dOptions(a, b, c).stride(d).padding(e).bias(f != 0)));
    } else if (kind == "conv3d" && fields >> a >> b >> c >> d >> e >> f) {
      net->push_back(
          torch::nn::Conv3d(torch::nn::Conv3dOptions(a, b, c).stride(d).padding(e).bias(f != 0)));
    } else if (kind == "embedding" && fields >> a >> b >> c >> real) {
      auto options = torch::nn::EmbeddingOptions(a, b);
      if (c >= 0) {
        options.padding_idx(c);
      }
      if (real >= 0) {
        options.max_norm(real);
      }
      net->push_back(torch::nn::Embedding(options));
    } else if (kind == "embeddingbag" && fields >> a >> b >> word >> c) {
      auto options = torch::nn::EmbeddingBagOptions(a, b);
      if (word == "sum") {
        options.mode(torch::kSum);
      } else if (word == "max") {
        options.mode(torch::kMax);
      }
      if (c >= 0) {
        options.padding_idx(c);
      }
      net->push_back(torch::nn::EmbeddingBag(options));
    } else if (kind == "batchnorm1d" && fields >> a) {
      net->push_back(torch::nn::BatchNorm1d(a));
    } else if (kind == "batchnorm2d" && fields >> a) {
      net->push_back(torch::nn::BatchNorm2d(a));
    } else if (kind == "batchnorm3d" && fields >> a) {
      net->push_back(torch::nn::BatchNorm3d(a));
    } else if (kind == "linear" && fields >> a >> b >> c) {
      net->push_back(torch::nn::Linear(torch::nn::LinearOptions(a, b).bias(c != 0)));
    } else if (kind == "relu") {
      net->push_back(torch::nn::ReLU());
    } else if (kind == "relu6") {
      net->push_back(torch::nn::ReLU6());
    } else if (kind == "maxpool1d" && fields >> a) {
      net->push_back(torch::nn::MaxPool1d(a));
    } else if (kind == "maxpool2d" && fields >> a) {
      net->push_back(torch::nn::MaxPool2d(a));
    } else if (kind == "maxpool3d" && fields >> a) {
      net->push_back(torch::nn::MaxPool3d(a));
    } else if (kind == "avgpool2d" && fields >> a) {
      net->push_back(torch::nn::AvgPool2d(a));
    } else if (kind == "avgpool3d" && fields >> a) {
      net->push_back(torch::nn::AvgPool3d(a));
    } else if (kind == "adaptiveavgpool2d" && fields >> a) {
      net->push_back(torch::nn::AdaptiveAvgPool2d(a));
    } else if (kind == "layernorm" && fields >> a) {
      net->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({a})));
    } else if (kind == "groupnorm" && fields >> a >> b) {
      net->push_back(torch::nn::GroupNorm(a, b));
    } else if (kind == "elu" && fields >> real) {
      net->push_back(torch::nn::ELU(torch::nn::ELUOptions().alpha(real)));
    } else if (kind == "leakyrelu" && fields >> real) {
      net->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(real)));
    } else if (kind == "sigmoid") {
      net->push_back(torch::nn::Sigmoid());
    } else if (kind == "tanh") {
      net->push_back(torch::nn::Tanh());
    } else if (kind == "flatten" && fields >> a >> b) {
      net->push_back(torch::nn::Flatten(torch::nn::FlattenOptions().start_dim(a).end_dim(b)));
    } else {
      throw std::invalid_argument(fmt::format("'{}': cannot read the layer '{}'", path, line));
    }
  }
  return net;
}

// Python's state_dict names are the C++ Sequential's: "0.weight", "1.running_mean"...
void load_state(torch::nn::Module& net, const c10::impl::GenericDict& state) {
  torch::NoGradGuard no_grad;
  size_t loaded = 0;
  const auto assign = [&](const std::string& name, torch::Tensor& tensor) {
    if (!state.contains(name)) {
      throw std::invalid_argument(fmt::format("the state dict has no '{}'", name));
    }
    tensor.copy_(state.at(name).toTensor());
    ++loaded;
  };
  for (auto& item : net.named_parameters()) {
    assign(item.key(), item.value());
  }
  for (auto& item : net.named_buffers()) {
    assign(item.key(), item.value());
  }
  if (loaded != state.size()) {
    throw std::invalid_argument(
        fmt::format("the state dict has {} tensors, the model {}", state.size(), loaded));
  }
}

void run(char** argv) {
  auto net = build(argv[1]);
  load_state(*net, load(argv[2]).toGenericDict());
  const auto data = load(argv[3]).toGenericDict();
  const std::string preset = argv[4];
  const std::string out = argv[5];
  if (preset != "int8" && preset != "w4a8") {
    throw std::invalid_argument(fmt::format("PRESET is int8 or w4a8, got '{}'", preset));
  }
  qat::prepare(*net, preset == "int8" ? qat::presets::int8() : qat::presets::w4a8());
  std::vector<torch::Tensor> batches;
  for (const auto& batch : data.at("calibration").toList()) {
    batches.push_back(c10::IValue(batch).toTensor());
  }
  qat::calibrate(net, batches);

  c10::List<std::string> children;
  for (const auto& item : net->named_children()) {
    children.push_back(item.key());
  }
  c10::Dict<std::string, c10::List<double>> fake_quants;
  for (const auto& item : net->named_modules()) {
    if (const auto* fake_quant = item.value()->as<qat::FakeQuantizeImpl>()) {
      // Scales and zero points exactly (float32 and int32 fit a double), flattened per channel.
      c10::List<double> values;
      const auto scale = fake_quant->scale.to(torch::kDouble).flatten();
      const auto zero_point = fake_quant->zero_point.to(torch::kDouble).flatten();
      values.push_back(fake_quant->has_fixed_qparams() ? 1.0 : 0.0);
      for (int64_t i = 0; i < scale.numel(); ++i) {
        values.push_back(scale[i].item<double>());
      }
      for (int64_t i = 0; i < zero_point.numel(); ++i) {
        values.push_back(zero_point[i].item<double>());
      }
      fake_quants.insert(item.key(), values);
    }
  }
  qat::export_model(*net, data.at("example").toTensor(), out + "/model.pt", {"qnnpack", false});
  // The simulation as it was exported: observing the test batch would move the qparams.
  qat::disable_observer(*net);
  net->eval();
  torch::Tensor simulation;
  {
    torch::NoGradGuard no_grad;
    simulation = net->forward(data.at("test").toTensor());
  }
  c10::impl::GenericDict report(c10::StringType::get(), c10::AnyType::get());
  report.insert("children", children);
  report.insert("fake_quant", fake_quants);
  report.insert("simulation", simulation);
  const auto bytes = torch::pickle_save(report);
  std::ofstream(out + "/report.pt", std::ios::binary).write(bytes.data(), bytes.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    fmt::print(stderr, "usage: qat_cross_front_end LAYERS.txt STATE.pt DATA.pt PRESET OUT_DIR\n");
    return 2;
  }
  try {
    run(argv);
  } catch (const std::exception& error) {
    fmt::print(stderr, "qat_cross_front_end: {}\n", error.what());
    return 1;
  }
  return 0;
}
