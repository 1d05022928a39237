#pragma once

#include <stdexcept>
#include <string>

namespace qat_test {

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

}  // namespace qat_test
