#pragma once

// How a qat::Config's override and skip keys select modules, in one place for the Config's
// lookups and qat::prepare's checks of a config against a model. Internal.

#include <qat/config.h>

#include <string>
#include <utility>

namespace qat {
namespace detail {

// Whether `key` is an fnmatch-style pattern rather than a module name.
bool is_pattern(const std::string& key);

// Whether `key` selects the module at `name`: the exact name, or an fnmatch-style pattern
// (`*`, `?`, `[seq]`, `[!seq]`, case-sensitive, as Python's fnmatch.fnmatchcase) that
// matches it.
bool key_matches(const std::string& key, const std::string& name);

// The override that decides the specs of the module at `name`: the one with that exact
// name, else the first whose pattern matches; nullptr when none does.
const std::pair<std::string, LayerOverride>* find_override(
    const Config& config, const std::string& name);

}  // namespace detail
}  // namespace qat
