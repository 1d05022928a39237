// qat::detail::compact_archive: a written TorchScript archive (.pt / .ptl) rewritten with
// the records that are not tensor storages deflated and without the code's debug records.
// TorchScript stores its pickles (bytecode.pkl, data.pkl, constants.pkl) and extra files
// uncompressed; on a small integer model they are a tenth of the file, and a fifth of it at
// 4-bit weights, while their text deflates 4 to 6 times. PyTorch's readers (the lite
// interpreter's too) inflate any record they read whole; tensor storages stay stored and
// 64-byte aligned, as the runtimes that map them expect.

#include <qat/export.h>

#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace qat {
namespace detail {
namespace {

bool starts_with(const std::string& text, const char* prefix) {
  return text.rfind(prefix, 0) == 0;
}

// Storages of the tensors of data.pkl and constants.pkl.
bool is_storage(const std::string& name) {
  return starts_with(name, "data/") || starts_with(name, "constants/");
}

// Records the writer writes itself when it closes the archive (its file-format version,
// and in PyTorch 2 a fresh serialization id): copying them would write them twice.
bool written_by_writer(const std::string& name) {
  return name == "version" || name == ".data/version" || name == ".data/serialization_id";
}

// Source ranges of the TorchScript code (code/*.py.debug_pkl): only a full-JIT load reads
// them, for the context of its error messages, and it loads the code without them; the
// lite interpreter never reads the code. On a small model they are a tenth of the file.
bool is_debug_info(const std::string& name) {
  constexpr const char* kSuffix = ".debug_pkl";
  const size_t n = std::char_traits<char>::length(kSuffix);
  return name.size() >= n && name.compare(name.size() - n, n, kSuffix) == 0;
}

}  // namespace

void compact_archive(const std::string& path) {
  std::vector<std::pair<std::string, std::tuple<at::DataPtr, size_t>>> records;
  uint64_t version = 0;
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    version = static_cast<uint64_t>(reader.version());
    for (const auto& name : reader.getAllRecords()) {
      if (!written_by_writer(name) && !is_debug_info(name)) {
        records.emplace_back(name, reader.getRecord(name));
      }
    }
  } catch (const c10::Error& error) {
    throw std::runtime_error(fmt::format(
        "qat: '{}' is not a TorchScript archive: {}", path, error.what_without_backtrace()));
  }
  // Everything is in memory: the archive is rewritten in place under its own name (its
  // records are named after the file).
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.setMinVersion(version);
  for (const auto& record : records) {
    const auto& name = record.first;
    if (writer.getAllWrittenRecords().count(name) != 0) {
      continue;  // written when the writer opened the archive
    }
    const auto& data = std::get<0>(record.second);
    writer.writeRecord(name, data.get(), std::get<1>(record.second), !is_storage(name));
  }
  writer.writeEndOfFile();
}

}  // namespace detail
}  // namespace qat
