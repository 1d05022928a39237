#pragma once

#include <torch/nn/module.h>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace qat_test {

// A temporary folder, removed with what it holds when the test ends.
struct TempDir {
  explicit TempDir(const std::string& prefix = "qat_test")
      : path(std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string file(const std::string& name) const { return (path / name).string(); }
  // The names of the files in the folder.
  std::set<std::string> files() const {
    std::set<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path)) {
      names.insert(entry.path().filename().string());
    }
    return names;
  }

  std::filesystem::path path;
};

// Runs `fn` and returns the message of the std::invalid_argument it throws ("" if none).
template <typename Fn>
std::string invalid_argument_message(Fn fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

// The names of `module`'s children, in order.
inline std::vector<std::string> child_names(const torch::nn::Module& module) {
  std::vector<std::string> names;
  for (const auto& item : module.named_children()) {
    names.push_back(item.key());
  }
  return names;
}

}  // namespace qat_test
