#pragma once
// Test helpers for the model loaders: a temporary folder, a safetensors writer written from the
// format description (independent of the reader: the header JSON is assembled by hand), and
// small files written as text.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <shadowkv/core/dtype.hpp>

namespace skv_test {

/// A fresh folder under the system's temporary directory, removed with everything in it when
/// the object goes.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    for (int attempt = 0; attempt < 100; ++attempt) {
      path_ = std::filesystem::temp_directory_path() / ("shadowkv-test-" + std::to_string(rd()));
      if (std::filesystem::create_directory(path_)) return;
    }
    FAIL("could not create a temporary folder");
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(std::string_view name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& path, std::string_view content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(content.data(), static_cast<std::streamsize>(content.size()));
  REQUIRE(out.good());
}

/// The bytes of `values` as stored in memory (little-endian on every machine the tests run on).
template <class T>
std::string raw_bytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

template <class T>
constexpr const char* safetensors_dtype() {
  if constexpr (std::is_same_v<T, float>) return "F32";
  else if constexpr (std::is_same_v<T, shadowkv::bf16>) return "BF16";
  else if constexpr (std::is_same_v<T, shadowkv::fp16>) return "F16";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "I64";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "I32";
  else static_assert(sizeof(T) == 0, "no safetensors dtype for this type");
}

/// Collects tensors and writes them as one `.safetensors` file: 8-byte little-endian header
/// length, the JSON header (with a `__metadata__` entry, padded with spaces to a multiple of 8
/// as the reference writer does), then the tensors back to back in the order they were added.
class SafetensorsWriter {
 public:
  struct Entry {
    std::string name, dtype;
    std::vector<std::int64_t> shape;
    std::string bytes;
  };

  void add_raw(std::string name, std::string dtype, std::vector<std::int64_t> shape, std::string bytes) {
    entries_.push_back({std::move(name), std::move(dtype), std::move(shape), std::move(bytes)});
  }

  template <class T>
  void add(std::string name, std::vector<std::int64_t> shape, const std::vector<T>& values) {
    add_raw(std::move(name), safetensors_dtype<T>(), std::move(shape), raw_bytes(values));
  }

  const std::vector<Entry>& entries() const { return entries_; }

  std::string header_json() const {
    std::string h = R"({"__metadata__":{"format":"pt"})";
    std::uint64_t offset = 0;
    for (const Entry& e : entries_) {
      // Appended piece by piece (GCC 12 warns falsely about `"literal" + std::string`).
      h += ",\"";
      h += escape(e.name);
      h += "\":{\"dtype\":\"";
      h += e.dtype;
      h += "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) {
        if (i) h += ',';
        h += std::to_string(e.shape[i]);
      }
      h += "],\"data_offsets\":[";
      h += std::to_string(offset);
      h += ',';
      h += std::to_string(offset + e.bytes.size());
      h += "]}";
      offset += e.bytes.size();
    }
    h += "}";
    while (h.size() % 8 != 0) h += ' ';
    return h;
  }

  std::string data() const {
    std::string d;
    for (const Entry& e : entries_) d += e.bytes;
    return d;
  }

  void write(const std::filesystem::path& path) const { write_file(path, file_bytes(header_json(), data())); }

  /// A file from a header and data given as they are (for malformed files).
  static std::string file_bytes(std::string_view header, std::string_view data) {
    std::string out(8, '\0');
    std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    out += header;
    out += data;
    return out;
  }

 private:
  static std::string escape(std::string_view s) {
    std::string out;
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out;
  }

  std::vector<Entry> entries_;
};

}  // namespace skv_test
