#pragma once
// The fuzz targets of the model loaders, shared by the libFuzzer executables (fuzz_*.cpp,
// built with -DSHADOWKV_FUZZ=ON and clang) and by the reliability suite, which replays every
// input of tests/fuzz/corpus/ and tests/fuzz/regressions/ through them with the ordinary
// compiler.
//
// An input may be rejected with a shadowkv::Error: that is the promised behaviour for a
// malformed file (each target returns whether it accepted the input). Anything else escaping (another exception type, a
// crash, a sanitizer report) is a finding, and so is an accepted input that breaks a property the loader documents;
// those throw `Finding`.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <shadowkv/model/model.hpp>

namespace skv_fuzz {

/// An accepted input broke a documented property.
struct Finding : std::logic_error {
  using std::logic_error::logic_error;
};

inline void expect(bool ok, const std::string& property) {
  if (!ok) throw Finding("fuzz finding: " + property);
}

/// The bytes as a file that only lives in memory (memfd), opened through /proc/self/fd so the
/// reader runs exactly as on a checkpoint: open, fstat, mmap.
class MemoryFile {
 public:
  MemoryFile(const std::uint8_t* data, std::size_t size) : fd_(::memfd_create("shadowkv-fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) throw std::runtime_error("memfd_create failed");
    for (std::size_t done = 0; done < size;) {
      const ssize_t n = ::write(fd_, data + done, size - done);
      if (n <= 0) throw std::runtime_error("write to the memfd failed");
      done += static_cast<std::size_t>(n);
    }
  }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;
  ~MemoryFile() { ::close(fd_); }
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_;
};

/// A whole .safetensors file: opened and validated; then every tensor's bytes lie inside the
/// data section, and the convertible ones load (all of it, and their first row).
inline bool safetensors(const std::uint8_t* data, std::size_t size) {
  using namespace shadowkv;
  using namespace shadowkv::model;
  const MemoryFile file(data, size);
  try {
    const SafetensorsFile f(file.path());
    expect(f.data_offset() <= f.file_size(), "the data section starts inside the file");
    for (const std::string& name : f.names()) {
      const TensorInfo& t = f.info(name);
      const auto bytes = f.bytes(name);
      expect(t.data_begin <= t.data_end && t.data_end <= f.file_size() - f.data_offset(),
             "tensor '" + name + "' lies inside the data section");
      expect(bytes.size() == t.nbytes(), "bytes(" + name + ") spans data_offsets");
      if (!to_storage_dtype(t.dtype)) continue;
      const std::vector<float> all = f.load<float>(name);
      expect(static_cast<index_t>(all.size()) == t.numel(), "load(" + name + ") gives numel elements");
      if (!t.shape.empty() && t.shape[0] > 0) {
        std::vector<bf16> row(static_cast<std::size_t>(t.numel() / t.shape[0]));
        f.read_rows<bf16>(name, 0, 1, row);
      }
    }
  } catch (const shadowkv::Error&) {
    return false;
  }
  return true;
}

/// config.json text: parsed, validated, and on success the weight names of the first layer.
inline bool config_json(const std::uint8_t* data, std::size_t size) {
  using namespace shadowkv::model;
  try {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const ModelConfig cfg = parse_model_config(detail::parse_json(text, "config.json"), "config.json");
    expect(cfg.num_q_heads % cfg.num_kv_heads == 0, "accepted head counts divide");
    (void)layer_weights(cfg, 0);
    (void)model_weights(cfg);
    shadowkv::Config attn = cfg.attention_config();
    attn.rank = std::min(attn.rank, attn.kv_dim());
    attn.validate();
  } catch (const shadowkv::Error&) {
    return false;
  }
  return true;
}

/// tokenizer.json text, then (after a NUL byte, if any) a text to encode. On success the
/// encoding decodes back to the text, as documented, unless an added token strips
/// whitespace or the pre-tokenizer adds a prefix space.
inline bool tokenizer_json(const std::uint8_t* data, std::size_t size) {
  using namespace shadowkv::model;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string_view json = input.substr(0, nul);
  const std::string_view text = nul == std::string_view::npos
                                    ? std::string_view("Hello, world! 12345 <|end|> ¿qué? 中文 😀")
                                    : input.substr(nul + 1);
  try {
    const BpeTokenizer t = BpeTokenizer::from_json(detail::parse_json(json, "tokenizer.json"), "tokenizer.json");
    const std::vector<token_id> ids = t.encode(text);
    const std::string back = t.decode(ids);
    bool strips = t.add_prefix_space();
    for (const auto& a : t.added_tokens()) strips = strips || a.lstrip || a.rstrip;
    expect(strips || back == text, "decode(encode(text)) == text");
  } catch (const shadowkv::Error&) {
    return false;
  }
  return true;
}

/// Every target by name (the name of its executable, fuzz_<name>, and of its corpus folder).
struct Target {
  const char* name;
  bool (*run)(const std::uint8_t*, std::size_t);
};

inline constexpr Target kTargets[] = {
    {"safetensors", safetensors},
    {"config_json", config_json},
    {"tokenizer_json", tokenizer_json},
};

}  // namespace skv_fuzz
