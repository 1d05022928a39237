// A complete LibTorch trainer with quantization-aware training, on Fashion-MNIST as
// Debian's dataset-fashion-mnist package installs it (gzip IDX files):
//
//   build/fashion_mnist [--data DIR] [--train N] [--test N] [--float-epochs E]
//                       [--qat-epochs E] [--batch B] [--out PATH] [--mobile|--no-mobile]
//
// It trains a small CNN in float, prepares it for QAT with qat::prepare, fine-tunes it with
// fake quantization, exports the integer model with qat::export_model, loads the exported
// file back (with the lite interpreter when --mobile) and evaluates it. Results are printed
// as "name value" lines: float_accuracy, qat_accuracy, exported_bytes, integer_accuracy.
// Images are scaled to [0, 1] exactly as Python's qat.datasets.load_fashion_mnist does, so
// that the exported file gives the same accuracy when evaluated from Python.
//
// Defaults: all 60,000 training and 10,000 test images, 2 float epochs, 1 QAT epoch, batch
// 64, fashion_mnist.ptl (fashion_mnist.pt with --no-mobile); about two minutes on 2 cores.

#include <fmt/format.h>
#include <torch/csrc/jit/mobile/import.h>
#include <torch/csrc/jit/mobile/module.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <zlib.h>

#include <qat/qat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: fashion_mnist [--data DIR] [--train N] [--test N] [--float-epochs E] "
    "[--qat-epochs E] [--batch B] [--out PATH] [--mobile|--no-mobile]";

struct Options {
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  int64_t train = 60000;
  int64_t test = 10000;
  int64_t float_epochs = 2;
  int64_t qat_epochs = 1;
  int64_t batch = 64;
  // Empty: fashion_mnist.ptl with --mobile, fashion_mnist.pt without.
  std::string out;
  bool mobile = true;
};

// std::stoll accepts a numeric prefix ("3x"); a flag's value must be a whole number.
int64_t parse_count(const std::string& flag, const std::string& text, int64_t minimum) {
  std::size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::logic_error&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw std::invalid_argument(fmt::format("{} expects a whole number, got '{}'", flag, text));
  }
  if (value < minimum) {
    throw std::invalid_argument(
        fmt::format("{} must be at least {}, got {}", flag, minimum, value));
  }
  return value;
}

Options parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mobile" || arg == "--no-mobile") {
      options.mobile = arg == "--mobile";
      continue;
    }
    const bool takes_value = arg == "--data" || arg == "--train" || arg == "--test" ||
                             arg == "--float-epochs" || arg == "--qat-epochs" || arg == "--batch" ||
                             arg == "--out";
    if (!takes_value) {
      throw std::invalid_argument(fmt::format("unknown argument '{}'; {}", arg, kUsage));
    }
    if (i + 1 == argc) {
      throw std::invalid_argument(fmt::format("{} expects a value; {}", arg, kUsage));
    }
    const std::string value = argv[++i];
    if (arg == "--data") {
      options.data_dir = value;
    } else if (arg == "--out") {
      options.out = value;
    } else if (arg == "--train") {
      options.train = parse_count(arg, value, 1);
    } else if (arg == "--test") {
      options.test = parse_count(arg, value, 1);
    } else if (arg == "--float-epochs") {
      options.float_epochs = parse_count(arg, value, 0);
    } else if (arg == "--qat-epochs") {
      options.qat_epochs = parse_count(arg, value, 0);
    } else {
      options.batch = parse_count(arg, value, 1);
    }
  }
  if (options.out.empty()) {
    options.out = options.mobile ? "fashion_mnist.ptl" : "fashion_mnist.pt";
  }
  return options;
}

// Fails now, not after minutes of training, when `path` cannot be written; leaves no file
// behind that was not there.
void check_writable(const std::string& path) {
  const bool existed = std::filesystem::exists(path);
  {
    std::ofstream probe(path, std::ios::binary | std::ios::app);
    if (!probe) {
      throw std::runtime_error(
          fmt::format("cannot write the output file '{}': {}", path, std::strerror(errno)));
    }
  }
  if (!existed) {
    std::filesystem::remove(path);
  }
}

// The decompressed content of a gzip file.
std::vector<uint8_t> read_gzip(const std::string& path) {
  gzFile raw = gzopen(path.c_str(), "rb");
  if (raw == nullptr) {
    throw std::runtime_error(fmt::format(
        "cannot open '{}': {}; install Debian's dataset-fashion-mnist package or pass --data DIR",
        path, std::strerror(errno)));
  }
  const std::unique_ptr<gzFile_s, int (*)(gzFile)> file(raw, &gzclose);
  std::vector<uint8_t> bytes;
  std::array<uint8_t, 1 << 16> chunk{};
  for (;;) {
    const int count = gzread(file.get(), chunk.data(), static_cast<unsigned>(chunk.size()));
    // A truncated stream ends like a complete one, with the error set (Z_BUF_ERROR).
    int code = Z_OK;
    std::string message = gzerror(file.get(), &code);
    if (count < 0 || code != Z_OK) {
      // zlib prefixes its messages with the path, which ours names already.
      if (message.rfind(path + ": ", 0) == 0) {
        message.erase(0, path.size() + 2);
      }
      throw std::runtime_error(fmt::format(
          "cannot read '{}': {}", path, code == Z_ERRNO ? std::strerror(errno) : message));
    }
    if (count == 0) {
      return bytes;
    }
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + count);
  }
}

// An IDX file of unsigned bytes: its shape and its data, checked against each other.
struct Idx {
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
  std::size_t data_offset = 0;
};

Idx read_idx(const std::string& path, std::size_t dims) {
  Idx idx;
  idx.bytes = read_gzip(path);
  const auto big_endian = [&](std::size_t offset) {
    const uint8_t* p = idx.bytes.data() + offset;
    return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
  };
  idx.data_offset = 4 * (dims + 1);
  if (idx.bytes.size() < idx.data_offset) {
    throw std::runtime_error(fmt::format(
        "'{}' is not an IDX file: {} bytes, shorter than its header", path, idx.bytes.size()));
  }
  // 0x08: unsigned bytes, then the number of dimensions.
  const uint32_t expected_magic = 0x0800 + static_cast<uint32_t>(dims);
  if (big_endian(0) != expected_magic) {
    throw std::runtime_error(fmt::format(
        "'{}' is not an IDX file of unsigned bytes in {} dimensions (magic {:#010x}, expected "
        "{:#010x})",
        path, dims, big_endian(0), expected_magic));
  }
  std::size_t elements = 1;
  for (std::size_t d = 0; d < dims; ++d) {
    idx.shape.push_back(big_endian(4 * (d + 1)));
    elements *= static_cast<std::size_t>(idx.shape.back());
  }
  if (idx.bytes.size() - idx.data_offset != elements) {
    throw std::runtime_error(fmt::format(
        "'{}' holds {} bytes of data, its header announces {}", path,
        idx.bytes.size() - idx.data_offset, elements));
  }
  return idx;
}

// The first `limit` samples of a split: float32 images [N, 1, 28, 28] in [0, 1] (x / 255,
// as qat.datasets.load_fashion_mnist) and int64 labels [N].
struct Dataset {
  torch::Tensor images;
  torch::Tensor labels;
  int64_t size() const { return images.size(0); }
};

Dataset load_split(
    const std::string& dir, const std::string& prefix, int64_t limit, const std::string& flag) {
  const std::string images_path = dir + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = dir + "/" + prefix + "-labels-idx1-ubyte.gz";
  Idx images = read_idx(images_path, 3);
  Idx labels = read_idx(labels_path, 1);
  if (images.shape[1] != 28 || images.shape[2] != 28) {
    throw std::runtime_error(fmt::format(
        "'{}' holds {}x{} images, expected 28x28", images_path, images.shape[1], images.shape[2]));
  }
  const int64_t count = images.shape[0];
  if (labels.shape[0] != count) {
    throw std::runtime_error(fmt::format(
        "'{}' holds {} labels for the {} images of '{}'", labels_path, labels.shape[0], count,
        images_path));
  }
  if (limit > count) {
    throw std::invalid_argument(
        fmt::format("{} {} exceeds the {} samples of '{}'", flag, limit, count, images_path));
  }
  const auto label_begin = labels.bytes.begin() + static_cast<std::ptrdiff_t>(labels.data_offset);
  const auto bad_label =
      std::find_if(label_begin, label_begin + limit, [](uint8_t label) { return label > 9; });
  if (bad_label != label_begin + limit) {
    throw std::runtime_error(fmt::format(
        "'{}': label {} at index {} is not a class of 0..9", labels_path, *bad_label,
        bad_label - label_begin));
  }
  // from_blob borrows the bytes; the conversions copy them out before `images` and `labels`
  // are freed.
  Dataset data;
  data.images =
      torch::from_blob(images.bytes.data() + images.data_offset, {count, 1, 28, 28}, torch::kUInt8)
          .narrow(0, 0, limit)
          .to(torch::kFloat)
          .div_(255);
  data.labels = torch::from_blob(labels.bytes.data() + labels.data_offset, {count}, torch::kUInt8)
                    .narrow(0, 0, limit)
                    .to(torch::kLong);
  return data;
}

torch::nn::Sequential make_net() {
  namespace nn = torch::nn;
  // The convolutions have no bias: the batch norm after each supplies it (and QAT folds it).
  return nn::Sequential(
      nn::Conv2d(nn::Conv2dOptions(1, 16, 3).padding(1).bias(false)), nn::BatchNorm2d(16),
      nn::ReLU(), nn::MaxPool2d(2), nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1).bias(false)),
      nn::BatchNorm2d(32), nn::ReLU(), nn::MaxPool2d(2), nn::Flatten(), nn::Linear(32 * 7 * 7, 64),
      nn::ReLU(), nn::Linear(64, 10));
}

// One epoch over `data` in a fresh random order; returns the mean loss.
double train_epoch(
    torch::nn::Sequential& net, torch::optim::Optimizer& optimizer, const Dataset& data,
    int64_t batch) {
  net->train();
  const auto order = torch::randperm(data.size(), torch::kLong);
  double loss_sum = 0.0;
  for (int64_t start = 0; start < data.size(); start += batch) {
    const auto indices = order.slice(0, start, std::min(start + batch, data.size()));
    const auto loss = torch::nn::functional::cross_entropy(
        net->forward(data.images.index_select(0, indices)), data.labels.index_select(0, indices));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    loss_sum += loss.item<double>() * static_cast<double>(indices.size(0));
  }
  return loss_sum / static_cast<double>(data.size());
}

// The fraction of `data` that `forward` (images -> logits) classifies right, in batches of
// `batch` in order.
template <typename Forward>
double accuracy(const Dataset& data, int64_t batch, Forward forward) {
  torch::NoGradGuard no_grad;
  int64_t correct = 0;
  for (int64_t start = 0; start < data.size(); start += batch) {
    const int64_t length = std::min(batch, data.size() - start);
    const torch::Tensor logits = forward(data.images.narrow(0, start, length));
    correct +=
        logits.argmax(1).eq(data.labels.narrow(0, start, length)).sum().template item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(data.size());
}

// LibTorch's messages may span lines (TorchScript source excerpts); errors here are one
// line on stderr.
std::string one_line(std::string message) {
  std::replace(message.begin(), message.end(), '\n', ' ');
  const auto begin = message.find_first_not_of(' ');
  return begin == std::string::npos
             ? ""
             : message.substr(begin, message.find_last_not_of(' ') - begin + 1);
}

}  // namespace

int main(int argc, char** argv) try {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      fmt::print("{}\n", kUsage);
      return 0;
    }
  }
  const Options options = parse_options(argc, argv);
  check_writable(options.out);
  const Dataset train = load_split(options.data_dir, "train", options.train, "--train");
  const Dataset test = load_split(options.data_dir, "t10k", options.test, "--test");
  fmt::print(
      "qat {}: Fashion-MNIST, {} training and {} test samples, batch {}\n", qat::version(),
      train.size(), test.size(), options.batch);
  // Initial weights and batch order, so that runs can be compared.
  torch::manual_seed(0);

  auto net = make_net();
  const auto evaluate = [&](const torch::Tensor& images) { return net->forward(images); };
  torch::optim::Adam float_optimizer(net->parameters(), torch::optim::AdamOptions(1e-3));
  for (int64_t epoch = 1; epoch <= options.float_epochs; ++epoch) {
    const double loss = train_epoch(net, float_optimizer, train, options.batch);
    fmt::print("float epoch {} loss {:.4f}\n", epoch, loss);
  }
  net->eval();
  fmt::print("float_accuracy {}\n", accuracy(test, options.batch, evaluate));

  const qat::Config config = qat::presets::int8();
  qat::prepare(*net, config);
  // Activation ranges from a few float batches, so that fine-tuning starts from a sensible
  // quantization instead of the first batch's range.
  qat::calibrate(net, train.images.split(options.batch), 16);
  // A new optimizer for the prepared model: learned qparams (lsq presets) are new parameters.
  torch::optim::Adam qat_optimizer(net->parameters(), torch::optim::AdamOptions(1e-4));
  for (int64_t epoch = 1; epoch <= options.qat_epochs; ++epoch) {
    const double loss = train_epoch(net, qat_optimizer, train, options.batch);
    fmt::print("qat epoch {} loss {:.4f}\n", epoch, loss);
  }
  // Observers observe in eval mode too: frozen, the test set cannot move the qparams, and
  // the export uses the ones the QAT accuracy was measured with.
  qat::disable_observer(*net);
  net->eval();
  fmt::print("qat_accuracy {}\n", accuracy(test, options.batch, evaluate));

  qat::ExportOptions export_options;
  export_options.backend = config.backend();
  export_options.mobile = options.mobile;
  // export_model also switches the process to the backend's quantized engine, for which
  // the file loaded below is repacked.
  qat::export_model(*net, test.images.narrow(0, 0, 1), options.out, export_options);
  fmt::print("exported {}\n", options.out);
  fmt::print("exported_bytes {}\n", std::filesystem::file_size(options.out));

  double integer_accuracy = 0.0;
  if (options.mobile) {
    auto exported = torch::jit::_load_for_mobile(options.out);
    integer_accuracy = accuracy(test, options.batch, [&](const torch::Tensor& images) {
      return exported.forward({images}).toTensor();
    });
  } else {
    auto exported = torch::jit::load(options.out);
    exported.eval();
    integer_accuracy = accuracy(test, options.batch, [&](const torch::Tensor& images) {
      return exported.forward({images}).toTensor();
    });
  }
  fmt::print("integer_accuracy {}\n", integer_accuracy);
  return 0;
} catch (const c10::Error& e) {
  // LibTorch's own errors carry a C++ backtrace; the message alone says what went wrong.
  fmt::print(stderr, "fashion_mnist: {}\n", one_line(e.what_without_backtrace()));
  return 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "fashion_mnist: {}\n", one_line(e.what()));
  return 1;
}
