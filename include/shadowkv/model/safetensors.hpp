#pragma once
/// \file model/safetensors.hpp
/// \brief Reading `.safetensors` checkpoints: one file (`SafetensorsFile`, memory-mapped) and a
/// Hugging Face model folder, single-file or sharded (`WeightStore`).
///
/// The format: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each tensor
/// name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
/// that follows the header; an optional `"__metadata__"` object of strings is ignored here),
/// then the data, row-major and little-endian. The whole header is validated when a file is
/// opened, so a file that opens can be read: every malformed case is a `shadowkv::Error` that
/// names the file and the tensor or field.
///
/// Tensors of any dtype of the format (BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F8_E4M3,
/// F8_E5M2, F16, BF16, F32, F64) give their raw bytes; the ones the library computes with
/// (BF16, F16, F32) also convert into a caller's float / bf16 / fp16 buffer. A dtype string
/// outside that list fails when the file is opened.
///
/// POSIX only (open/mmap). The mapping is read-only and private; a file truncated by someone
/// else while it is mapped makes later reads fault (SIGBUS), as with any mmap reader.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "json_reader.hpp"

namespace shadowkv::model {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this reader copies it as is");

/// Element types of the safetensors format (the spelling of the header is `to_string`).
enum class TensorDType : std::uint8_t {
  boolean, u8, i8, i16, u16, i32, u32, i64, u64, f8_e4m3, f8_e5m2, f16, bf16, f32, f64,
};

inline constexpr std::string_view to_string(TensorDType t) {
  switch (t) {
    case TensorDType::boolean: return "BOOL";
    case TensorDType::u8: return "U8";
    case TensorDType::i8: return "I8";
    case TensorDType::i16: return "I16";
    case TensorDType::u16: return "U16";
    case TensorDType::i32: return "I32";
    case TensorDType::u32: return "U32";
    case TensorDType::i64: return "I64";
    case TensorDType::u64: return "U64";
    case TensorDType::f8_e4m3: return "F8_E4M3";
    case TensorDType::f8_e5m2: return "F8_E5M2";
    case TensorDType::f16: return "F16";
    case TensorDType::bf16: return "BF16";
    case TensorDType::f32: return "F32";
    case TensorDType::f64: return "F64";
  }
  return "unknown";
}

inline constexpr std::size_t element_size(TensorDType t) {
  switch (t) {
    case TensorDType::boolean:
    case TensorDType::u8:
    case TensorDType::i8:
    case TensorDType::f8_e4m3:
    case TensorDType::f8_e5m2: return 1;
    case TensorDType::i16:
    case TensorDType::u16:
    case TensorDType::f16:
    case TensorDType::bf16: return 2;
    case TensorDType::i32:
    case TensorDType::u32:
    case TensorDType::f32: return 4;
    case TensorDType::i64:
    case TensorDType::u64:
    case TensorDType::f64: return 8;
  }
  return 0;
}

/// The dtype a header string names, or nullopt for a string outside the format.
inline std::optional<TensorDType> parse_tensor_dtype(std::string_view name) {
  constexpr TensorDType all[] = {
      TensorDType::boolean, TensorDType::u8,      TensorDType::i8,      TensorDType::i16,
      TensorDType::u16,     TensorDType::i32,     TensorDType::u32,     TensorDType::i64,
      TensorDType::u64,     TensorDType::f8_e4m3, TensorDType::f8_e5m2, TensorDType::f16,
      TensorDType::bf16,    TensorDType::f32,     TensorDType::f64};
  for (TensorDType t : all)
    if (to_string(t) == name) return t;
  return std::nullopt;
}

/// The storage dtype a safetensors dtype converts from, for the three the library computes with.
inline constexpr std::optional<DType> to_storage_dtype(TensorDType t) {
  switch (t) {
    case TensorDType::f32: return DType::fp32;
    case TensorDType::bf16: return DType::bf16;
    case TensorDType::f16: return DType::fp16;
    default: return std::nullopt;
  }
}

/// One entry of a safetensors header, validated.
struct TensorInfo {
  std::string name;
  TensorDType dtype = TensorDType::f32;
  std::vector<index_t> shape;  ///< empty for a scalar
  std::uint64_t data_begin = 0;  ///< byte offsets into the data section, [begin, end)
  std::uint64_t data_end = 0;

  index_t numel() const {
    index_t n = 1;
    for (index_t s : shape) n *= s;
    return n;
  }
  std::uint64_t nbytes() const { return data_end - data_begin; }
};

/// "[4096, 128]".
inline std::string shape_string(std::span<const index_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {

/// Converts `count` elements of dtype `src` (BF16 / F16 / F32) at `in` into `out`. Same dtype:
/// a byte copy. Otherwise through float: BF16 and F16 widen exactly, narrowing rounds to
/// nearest even (Eigen's conversions).
template <StorageType T>
void convert_elements(TensorDType src, const std::byte* in, std::size_t count, T* out) {
  if (to_storage_dtype(src) == dtype_of<T>()) {
    if (count) std::memcpy(out, in, count * sizeof(T));
    return;
  }
  auto widen = [&](std::size_t i) -> float {
    switch (src) {
      case TensorDType::f32: {
        float x;
        std::memcpy(&x, in + 4 * i, 4);
        return x;
      }
      case TensorDType::bf16: {
        bf16 x;
        static_assert(sizeof(bf16) == 2);
        std::memcpy(&x, in + 2 * i, 2);
        return static_cast<float>(x);
      }
      case TensorDType::f16: {
        fp16 x;
        static_assert(sizeof(fp16) == 2);
        std::memcpy(&x, in + 2 * i, 2);
        return static_cast<float>(x);
      }
      default: return 0.0f;  // unreachable: callers check the dtype first
    }
  };
  for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<T>(widen(i));
}

/// RAII read-only mapping of a whole file. A zero-length file maps nothing (`data()` null).
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    SHADOWKV_CHECK(fd >= 0, path.string(), ": cannot open (", std::strerror(errno), ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      SHADOWKV_FAIL(path.string(), ": cannot stat (", std::strerror(err), ")");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      SHADOWKV_FAIL(path.string(), ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        SHADOWKV_FAIL(path.string(), ": mmap of ", size_, " bytes failed (", std::strerror(err), ")");
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);  // the mapping keeps the file alive
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  const std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

/// One `.safetensors` file, memory-mapped for its lifetime. Construction validates the whole
/// header; const member functions are safe to call from several threads.
class SafetensorsFile {
 public:
  /// Opens, maps and validates `path`. Throws `shadowkv::Error` naming the file and the tensor
  /// or field for: a file shorter than 8 bytes, a header length past the end of the file,
  /// a header that is not a JSON object, an entry without `dtype`/`shape`/`data_offsets` or
  /// with a wrong JSON type, an unknown dtype, negative or non-integer extents, offsets past
  /// the data or whose span is not `numel * element size`, two tensors whose bytes overlap.
  explicit SafetensorsFile(std::filesystem::path path)
      : path_(std::move(path)), map_(path_) {
    const std::string file = path_.string();
    SHADOWKV_CHECK(map_.size() >= 8, file, ": file is ", map_.size(),
                   " bytes, shorter than the 8-byte header length of a safetensors file");
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, map_.data(), 8);
    SHADOWKV_CHECK(header_len <= map_.size() - 8, file, ": header length ", header_len,
                   " runs past the end of the file (", map_.size() - 8, " bytes after the length)");
    data_offset_ = 8 + header_len;
    const std::string_view header(reinterpret_cast<const char*>(map_.data()) + 8, header_len);
    nlohmann::json json;
    try {
      json = nlohmann::json::parse(header.begin(), header.end());
    } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e309
      SHADOWKV_FAIL(file, ": header is not valid JSON (", e.what(), ")");
    }
    SHADOWKV_CHECK(json.is_object(), file, ": header is ", detail::json_kind(json),
                   ", expected a JSON object of tensors");
    parse_header(json);
  }

  const std::filesystem::path& path() const { return path_; }
  /// Bytes of the whole file; the data section starts at `data_offset()`.
  std::size_t file_size() const { return map_.size(); }
  std::size_t data_offset() const { return data_offset_; }
  std::size_t num_tensors() const { return tensors_.size(); }

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }

  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }

  /// The header entry of `name`; throws naming the tensor and the file when it is absent.
  const TensorInfo& info(std::string_view name) const {
    const auto it = tensors_.find(name);
    SHADOWKV_CHECK(it != tensors_.end(), path_.string(), ": tensor '", name, "' is not in this file");
    return it->second;
  }

  /// The bytes of tensor `name` as stored (row-major, little-endian), valid while `*this` lives.
  std::span<const std::byte> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    return {map_.data() + data_offset_ + t.data_begin, static_cast<std::size_t>(t.nbytes())};
  }

  /// Converts tensor `name` (BF16, F16 or F32) into `out`, which must hold exactly `numel`
  /// elements (row-major, the tensor's shape).
  template <StorageType T>
  void read(std::string_view name, std::span<T> out) const {
    const TensorInfo& t = convertible_info(name);
    SHADOWKV_CHECK(static_cast<index_t>(out.size()) == t.numel(), path_.string(), ": tensor '", name,
                   "' has ", t.numel(), " elements (shape ", shape_string(t.shape),
                   "), the output buffer holds ", out.size());
    detail::convert_elements(t.dtype, map_.data() + data_offset_ + t.data_begin, out.size(), out.data());
  }

  /// Converts rows `[row_begin, row_begin + num_rows)` of dimension 0 of tensor `name` into
  /// `out` (`num_rows * prod(shape[1:])` elements): how fused tensors (a `query_key_value`
  /// weight `[(H_q + 2 H_kv) d, hidden]`) are split without a copy of the whole tensor.
  template <StorageType T>
  void read_rows(std::string_view name, index_t row_begin, index_t num_rows, std::span<T> out) const {
    const TensorInfo& t = convertible_info(name);
    SHADOWKV_CHECK(!t.shape.empty(), path_.string(), ": tensor '", name, "' is a scalar; it has no rows");
    SHADOWKV_CHECK(row_begin >= 0 && num_rows >= 0 && row_begin + num_rows <= t.shape[0], path_.string(),
                   ": tensor '", name, "' of shape ", shape_string(t.shape), " has no rows [", row_begin, ", ",
                   row_begin + num_rows, ")");
    const index_t row_elems = t.shape[0] == 0 ? 0 : t.numel() / t.shape[0];
    SHADOWKV_CHECK(static_cast<index_t>(out.size()) == num_rows * row_elems, path_.string(), ": rows [",
                   row_begin, ", ", row_begin + num_rows, ") of tensor '", name, "' hold ", num_rows * row_elems,
                   " elements, the output buffer holds ", out.size());
    const std::size_t esize = element_size(t.dtype);
    detail::convert_elements(t.dtype,
                             map_.data() + data_offset_ + t.data_begin +
                                 static_cast<std::size_t>(row_begin * row_elems) * esize,
                             out.size(), out.data());
  }

  /// Tensor `name` converted to `T`, in a new vector.
  template <StorageType T>
  std::vector<T> load(std::string_view name) const {
    std::vector<T> out(static_cast<std::size_t>(convertible_info(name).numel()));
    read<T>(name, out);
    return out;
  }

 private:
  const TensorInfo& convertible_info(std::string_view name) const {
    const TensorInfo& t = info(name);
    SHADOWKV_CHECK(to_storage_dtype(t.dtype).has_value(), path_.string(), ": tensor '", name, "' has dtype ",
                   to_string(t.dtype), ", which does not convert to float/bf16/fp16 (BF16, F16 and F32 do)");
    return t;
  }

  void parse_header(const nlohmann::json& header) {
    const std::string file = path_.string();
    const std::uint64_t data_size = map_.size() - data_offset_;
    for (const auto& item : header.items()) {
      // Named references, not a structured binding: clang before 16 cannot capture one in `fail`.
      const std::string& name = item.key();
      const nlohmann::json& entry = item.value();
      if (name == "__metadata__") continue;
      auto fail = [&](const auto&... message) { SHADOWKV_FAIL(file, ": tensor '", name, "': ", message...); };
      if (!entry.is_object()) fail("header entry is ", detail::json_kind(entry), ", expected an object");
      TensorInfo t;
      t.name = name;

      const auto dtype_it = entry.find("dtype");
      if (dtype_it == entry.end()) fail("field 'dtype' is missing");
      if (!dtype_it->is_string()) fail("field 'dtype' is ", detail::json_kind(*dtype_it), ", expected a string");
      const std::string dtype_name = dtype_it->get<std::string>();
      const auto dtype = parse_tensor_dtype(dtype_name);
      if (!dtype)
        fail("unknown dtype '", dtype_name,
             "' (known: BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F8_E4M3, F8_E5M2, F16, BF16, F32, F64)");
      t.dtype = *dtype;

      const auto shape_it = entry.find("shape");
      if (shape_it == entry.end()) fail("field 'shape' is missing");
      if (!shape_it->is_array()) fail("field 'shape' is ", detail::json_kind(*shape_it), ", expected an array");
      std::vector<std::uint64_t> extents;
      for (const auto& extent : *shape_it) {
        if (!extent.is_number_unsigned())
          fail("field 'shape' holds ", extent.dump(), ", expected non-negative integers");
        extents.push_back(extent.get<std::uint64_t>());
      }
      // A tensor with data has at most data_size elements, so bounding each partial product by
      // it keeps the product from overflowing.
      std::uint64_t numel = 1;
      if (std::find(extents.begin(), extents.end(), 0) != extents.end()) {
        numel = 0;
      } else {
        for (std::uint64_t e : extents) {
          if (numel > data_size / e)
            fail("shape ", shape_it->dump(), " has more elements than the data section has bytes (", data_size,
                 ")");
          numel *= e;
        }
      }
      for (std::uint64_t e : extents)
        t.shape.push_back(static_cast<index_t>(std::min<std::uint64_t>(e, INT64_MAX)));

      const auto off_it = entry.find("data_offsets");
      if (off_it == entry.end()) fail("field 'data_offsets' is missing");
      if (!off_it->is_array() || off_it->size() != 2 || !(*off_it)[0].is_number_unsigned() ||
          !(*off_it)[1].is_number_unsigned())
        fail("field 'data_offsets' is ", off_it->dump(), ", expected [begin, end] (non-negative integers)");
      t.data_begin = (*off_it)[0].get<std::uint64_t>();
      t.data_end = (*off_it)[1].get<std::uint64_t>();
      if (t.data_begin > t.data_end)
        fail("data_offsets [", t.data_begin, ", ", t.data_end, "] have begin after end");
      if (t.data_end > data_size)
        fail("data_offsets [", t.data_begin, ", ", t.data_end, "] run past the data section (", data_size,
             " bytes)");
      const std::uint64_t expected = numel * element_size(t.dtype);
      if (t.nbytes() != expected)
        fail("data_offsets [", t.data_begin, ", ", t.data_end, "] span ", t.nbytes(), " bytes, but shape ",
             shape_string(t.shape), " of ", dtype_name, " needs ", expected);
      tensors_.emplace(name, std::move(t));
    }

    // No two tensors may share a byte (empty tensors own none). Gaps between tensors are
    // tolerated: they cannot make a read wrong.
    std::vector<const TensorInfo*> by_offset;
    for (const auto& [name, t] : tensors_)
      if (t.nbytes() > 0) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->data_begin != b->data_begin ? a->data_begin < b->data_begin : a->name < b->name;
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo& a = *by_offset[i - 1];
      const TensorInfo& b = *by_offset[i];
      SHADOWKV_CHECK(b.data_begin >= a.data_end, file, ": tensors '", a.name, "' (data_offsets [", a.data_begin,
                     ", ", a.data_end, "]) and '", b.name, "' (data_offsets [", b.data_begin, ", ", b.data_end,
                     "]) overlap");
    }
  }

  std::filesystem::path path_;
  detail::MappedFile map_;
  std::size_t data_offset_ = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
};

/// The weights of a Hugging Face model folder: `model.safetensors.index.json` (its
/// `weight_map` names the shard of every tensor) when present, else one `model.safetensors`.
/// Every shard is opened (and validated) up front; each stays mapped while the store lives.
class WeightStore {
 public:
  static constexpr const char* kIndexFile = "model.safetensors.index.json";
  static constexpr const char* kSingleFile = "model.safetensors";

  /// Throws naming the folder when it holds neither file; naming the index and the field for a
  /// malformed index (not an object, no `weight_map`, a shard that is not a string, a shard
  /// path leaving the folder); naming the index, the shard and a tensor that maps to it when
  /// the shard does not exist; naming the shard and the tensor when the index maps a tensor
  /// to a shard that does not hold it; and whatever `SafetensorsFile` throws for a shard.
  explicit WeightStore(std::filesystem::path folder) : folder_(std::move(folder)) {
    namespace fs = std::filesystem;
    const fs::path index = folder_ / kIndexFile;
    const fs::path single = folder_ / kSingleFile;
    SHADOWKV_CHECK(fs::is_directory(folder_), "model folder '", folder_.string(), "' is not a directory");
    if (fs::exists(index)) {
      index_path_ = index;
      open_index(index);
    } else {
      SHADOWKV_CHECK(fs::exists(single), "model folder '", folder_.string(), "' holds neither ", kIndexFile,
                     " nor ", kSingleFile);
      files_.push_back(std::make_unique<SafetensorsFile>(single));
      for (const std::string& name : files_.back()->names()) file_of_.emplace(name, 0);
    }
  }

  const std::filesystem::path& folder() const { return folder_; }
  /// The index file, or empty for a single-file checkpoint.
  const std::filesystem::path& index_path() const { return index_path_; }
  std::size_t num_files() const { return files_.size(); }
  const SafetensorsFile& file(std::size_t i) const { return *files_.at(i); }
  std::size_t num_tensors() const { return file_of_.size(); }

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(file_of_.size());
    for (const auto& [name, i] : file_of_) out.push_back(name);
    return out;
  }

  bool contains(std::string_view name) const { return file_of_.find(name) != file_of_.end(); }

  /// The shard holding `name`; throws naming the tensor and the folder when no shard does.
  const SafetensorsFile& file_of(std::string_view name) const {
    const auto it = file_of_.find(name);
    if (it == file_of_.end())
      SHADOWKV_FAIL("tensor '", name, "' not found in model folder '", folder_.string(), "' (",
                    index_path_.empty() ? std::string(kSingleFile)
                                        : std::string(kIndexFile) + ", " + std::to_string(files_.size()) + " shards",
                    ")");
    return *files_[it->second];
  }

  const TensorInfo& info(std::string_view name) const { return file_of(name).info(name); }
  std::span<const std::byte> bytes(std::string_view name) const { return file_of(name).bytes(name); }

  template <StorageType T>
  void read(std::string_view name, std::span<T> out) const {
    file_of(name).read(name, out);
  }
  template <StorageType T>
  void read_rows(std::string_view name, index_t row_begin, index_t num_rows, std::span<T> out) const {
    file_of(name).read_rows(name, row_begin, num_rows, out);
  }
  template <StorageType T>
  std::vector<T> load(std::string_view name) const {
    return file_of(name).template load<T>(name);
  }

 private:
  void open_index(const std::filesystem::path& index) {
    namespace fs = std::filesystem;
    const nlohmann::json json = detail::read_json_file(index);
    const JsonObject top(json, index.string());
    const JsonObject weight_map = top.object("weight_map");
    std::map<std::string, std::size_t, std::less<>> shard_ids;
    for (const auto& [name, shard_json] : weight_map.json().items()) {
      if (!shard_json.is_string())
        weight_map.fail(name, "is ", detail::json_kind(shard_json), ", expected the file name of a shard");
      const std::string shard = shard_json.get<std::string>();
      const fs::path rel(shard);
      const bool inside = !shard.empty() && rel.is_relative() &&
                          std::none_of(rel.begin(), rel.end(), [](const fs::path& p) { return p == ".."; });
      if (!inside) weight_map.fail(name, "names shard '", shard, "', which is not a file inside the folder");
      auto it = shard_ids.find(shard);
      if (it == shard_ids.end()) {
        const fs::path shard_path = folder_ / rel;
        SHADOWKV_CHECK(fs::is_regular_file(shard_path), index.string(), ": shard '", shard,
                       "' (of tensor '", name, "') does not exist in '", folder_.string(), "'");
        files_.push_back(std::make_unique<SafetensorsFile>(shard_path));
        it = shard_ids.emplace(shard, files_.size() - 1).first;
      }
      const SafetensorsFile& f = *files_[it->second];
      SHADOWKV_CHECK(f.contains(name), index.string(), ": tensor '", name, "' is mapped to shard '", shard,
                     "', but ", f.path().string(), " does not hold it");
      file_of_.emplace(name, it->second);
    }
  }

  std::filesystem::path folder_;
  std::filesystem::path index_path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::size_t, std::less<>> file_of_;
};

}  // namespace shadowkv::model
