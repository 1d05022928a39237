// qat::export_model: the integer model of qat::convert as a frozen TorchScript file with qat's
// metadata inside, checked against the in-memory model after it is written; the same kind of
// file as python/qat/export.py writes.

#include "integer_model.h"

#include <qat/lowered.h>

#include <ATen/Context.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/import.h>
// The lite interpreter is deprecated (PyTorch 2.10+); a LibTorch without it can still write
// full TorchScript.
#if __has_include(<torch/csrc/jit/mobile/import.h>)
#define QAT_HAVE_LITE_INTERPRETER 1
#include <torch/csrc/jit/mobile/import.h>
#include <torch/csrc/jit/mobile/module.h>
#include <torch/csrc/jit/passes/xnnpack_rewrite.h>
#endif
#include <torch/utils.h>
#include <torch/version.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <utility>
#include <vector>

namespace qat {
namespace {

// The extra file of the archive that holds qat's metadata (JSON), as Python's
// qat.export.METADATA_FILE.
constexpr const char* kMetadataFile = "qat/metadata.json";

// Fails before any work when `path` cannot be written.
void check_writable(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (path.empty()) {
    throw std::invalid_argument("qat::export_model: the path is empty");
  }
  if (fs::is_directory(path, error)) {
    throw std::invalid_argument(
        fmt::format("qat::export_model: '{}' is a directory, not a file", path));
  }
  const auto folder = fs::absolute(path, error).parent_path();
  if (!fs::is_directory(folder, error)) {
    throw std::invalid_argument(
        fmt::format("qat::export_model: the folder of '{}' does not exist", path));
  }
  if (::access(folder.c_str(), W_OK) != 0 ||
      (fs::exists(path, error) && ::access(path.c_str(), W_OK) != 0)) {
    throw std::invalid_argument(fmt::format("qat::export_model: '{}' is not writable", path));
  }
}

// A file of `target`'s name in a private folder next to it (in its folder, so that renaming
// it over `target` is atomic) that no other export uses; the folder is removed when this goes
// out of scope, with the file unless it was renamed away. The final name matters: a
// TorchScript archive names its records after its file, so the file is the one a direct
// save gives (not one whose every record header repeats a long temporary name).
class TemporaryFile {
 public:
  explicit TemporaryFile(const std::string& target) {
    static std::atomic<uint64_t> count{0};
    const std::filesystem::path file(target);
    folder_ = file.parent_path() /
              fmt::format(".{}.{}-{}", file.filename().string(), ::getpid(), count.fetch_add(1));
    std::filesystem::create_directory(folder_);
    path_ = (folder_ / file.filename()).string();
  }
  ~TemporaryFile() {
    std::error_code ignored;
    std::filesystem::remove_all(folder_, ignored);
  }
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::filesystem::path folder_;
  std::string path_;
};

// Gives the new file the permissions of the file it replaces (or those a new file gets under
// the process's umask): the temporary file is written as any new file is, and a replaced
// file's mode is the user's choice.
void keep_mode(const std::string& temporary, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const auto status = fs::status(path, error);
  if (!error && fs::exists(status)) {
    fs::permissions(temporary, status.permissions(), fs::perm_options::replace, error);
  }
}

torch::Tensor as_float(const c10::IValue& output) {
  if (!output.isTensor()) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: the exported model returns a {}, not a tensor", output.tagKind()));
  }
  const auto tensor = output.toTensor();
  return tensor.is_quantized() ? tensor.dequantize() : tensor;
}

// NaN equals nothing, itself included, and gives a NaN SQNR: outputs that are not finite are
// refused by name before any comparison.
void check_finite(
    const std::vector<std::pair<const char*, torch::Tensor>>& outputs, const std::string& path) {
  std::vector<std::string> names;
  for (const auto& output : outputs) {
    if (!torch::isfinite(output.second).all().item<bool>()) {
      names.emplace_back(output.first);
    }
  }
  if (!names.empty()) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: the outputs on example_input are not finite (NaN or inf from {}): "
        "a float layer overflows, or the input holds NaN or inf; '{}' is left as it was",
        fmt::join(names, ", "), path));
  }
}

void check_outputs(
    const torch::Tensor& expected, const torch::Tensor& got, const std::string& path,
    const char* what, c10::optional<double> min_sqnr_db) {
  if (!got.sizes().equals(expected.sizes())) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: the exported file gives outputs of another shape than {}; '{}' is "
        "left as it was",
        what, path));
  }
  if (torch::equal(got, expected)) {
    return;
  }
  const auto difference = (got - expected).to(torch::kDouble);
  const double sqnr = 10 * std::log10(
                               expected.to(torch::kDouble).pow(2).sum().item<double>() /
                               difference.pow(2).sum().item<double>());
  if (!min_sqnr_db.has_value() || !(sqnr >= *min_sqnr_db)) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: the exported file computes other outputs than {} (max difference "
        "{:.3g}, SQNR {:.1f} dB); '{}' is left as it was",
        what, difference.abs().max().item<double>(), sqnr, path));
  }
}

// Refuses a module whose code calls qat's own operators: its file would load only where qat
// is installed, which a phone is not (and the check below, run in this process where qat's
// operators are registered, would pass). As Python's export.
void refuse_qat_ops(const torch::jit::Module& module, const std::string& path) {
  std::vector<std::string> ops;
  for (const auto& name : torch::jit::export_opnames(module)) {
    if (name.rfind("qat::", 0) == 0) {
      ops.push_back(name);
    }
  }
  if (!ops.empty()) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: the converted model still calls qat's own operators ({}), which a "
        "runtime without qat does not have, so '{}' was not written",
        fmt::join(ops, ", "), path));
  }
}

#ifdef QAT_HAVE_LITE_INTERPRETER
// optimizeForMobile's rewrites need XNNPACK, which official PyTorch builds have left out
// since 2.13 (it asserts there). The frozen module runs in the lite interpreter as it is:
// the rewrites would only speed up float ops, so the file is written without them.
torch::jit::Module optimize_for_mobile(const torch::jit::Module& frozen) {
  if (at::Context::isXNNPACKAvailable()) {
    return torch::jit::optimizeForMobile(frozen);
  }
  TORCH_WARN_ONCE(
      "qat::export_model: this LibTorch has no XNNPACK, so the .ptl file is written without "
      "optimize_for_mobile's rewrites (it runs as it is; they only speed up float ops)");
  return frozen;
}
#endif

}  // namespace

void export_model(
    torch::nn::Module& prepared, const torch::Tensor& example_input, const std::string& path,
    const ExportOptions& options) {
  check_writable(path);
#ifndef QAT_HAVE_LITE_INTERPRETER
  if (options.mobile) {
    throw std::invalid_argument(fmt::format(
        "qat::export_model: this LibTorch ({}) has no lite interpreter, so no .ptl file can be "
        "written; set ExportOptions::mobile = false for a full TorchScript .pt",
        TORCH_VERSION));
  }
#endif
  const auto input = detail::cpu_example(example_input, "qat::export_model");
  auto model = detail::build_integer_model(prepared, options.backend);
  torch::NoGradGuard no_grad;
  if (input.numel() == 0) {
    // Nothing would be checked.
    throw std::invalid_argument(fmt::format(
        "qat::export_model: example_input is empty (shape [{}]); give at least one sample to "
        "check the file on",
        fmt::join(input.sizes(), ", ")));
  }
  if (input.is_floating_point() && !torch::isfinite(input).all().item<bool>()) {
    throw std::invalid_argument(
        "qat::export_model: example_input holds NaN or inf; give finite inputs to check the "
        "file on");
  }
  const auto expected = as_float(detail::run_example(model.module, input, "qat::export_model"));
  auto frozen = torch::jit::freeze(model.module);
  const torch::jit::ExtraFilesMap extra{
      {kMetadataFile, metadata_json(
                          model.ops(), detail::config_json(model.layers, options.backend),
                          options.backend, TORCH_VERSION, {input})}};
  // The module saved is the frozen (and, for mobile, optimized) one, whose float ops may
  // run in another order of arithmetic (XNNPACK, folded float conv + batch norm).
#ifdef QAT_HAVE_LITE_INTERPRETER
  auto saved = options.mobile ? optimize_for_mobile(frozen) : frozen;
#else
  auto saved = frozen;
#endif
  refuse_qat_ops(saved, path);
  // Run on a copy: the first forward fills each layer's packed_params attribute, which the
  // file would otherwise carry as a second, unpacked copy of every weight.
  const auto written = as_float(saved.deepcopy().forward({input}));
  // The file is written next to `path` and renamed over it once it checks out: a failure
  // leaves the previous file as it was, and no reader sees a half-written one.
  const TemporaryFile temporary(path);
  c10::IValue got;
#ifdef QAT_HAVE_LITE_INTERPRETER
  if (options.mobile) {
    saved._save_for_mobile(temporary.path(), extra);
    detail::compact_archive(temporary.path());
    got = torch::jit::_load_for_mobile(temporary.path()).forward({input});
  }
#endif
  if (!options.mobile) {
    saved.save(temporary.path(), extra);
    detail::compact_archive(temporary.path());
    got = torch::jit::load(temporary.path()).forward({input});
  }
  const auto output = as_float(got);
  check_finite(
      {{"the in-memory integer model", expected},
       {"the module it was written from", written},
       {"the exported file", output}},
      path);
  // The file computes exactly what was saved, and what the in-memory model computes up to
  // a few one-step flips downstream of reordered float ops (40 dB), as Python's export.
  check_outputs(written, output, path, "the module it was written from", c10::nullopt);
  check_outputs(expected, output, path, "the in-memory integer model", 40.0);
  std::error_code error;
  keep_mode(temporary.path(), path);
  std::filesystem::rename(temporary.path(), path, error);
  if (error) {
    throw std::runtime_error(fmt::format(
        "qat::export_model: cannot move the checked file '{}' over '{}': {}", temporary.path(),
        path, error.message()));
  }
}

}  // namespace qat
