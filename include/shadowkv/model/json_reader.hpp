#pragma once
/// \file model/json_reader.hpp
/// \brief Reading the JSON files of a model folder (config.json, tokenizer.json, the index of
/// a sharded checkpoint) with errors that name the file and the field: every accessor knows
/// the file it reads and the path of the object it looks into ("rope_scaling.factor").

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"

namespace shadowkv::model {

namespace detail {

/// The whole content of a file, or an Error naming the file.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  SHADOWKV_CHECK(in.good(), path.string(), ": cannot open the file");
  std::ostringstream os;
  os << in.rdbuf();
  SHADOWKV_CHECK(!in.bad(), path.string(), ": reading the file failed");
  return os.str();
}

/// Parses `text` as JSON; a syntax error names `source` and nlohmann's position. (nlohmann's
/// parser also throws out_of_range, for a number past double such as 1e309: caught alike.)
inline nlohmann::json parse_json(std::string_view text, const std::string& source) {
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    SHADOWKV_FAIL(source, ": invalid JSON (", e.what(), ")");
  }
}

inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  return parse_json(read_text_file(path), path.string());
}

/// "a string", "an array", ... for messages.
inline std::string json_kind(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::object: return "an object";
    case nlohmann::json::value_t::array: return "an array";
    case nlohmann::json::value_t::string: return "a string";
    case nlohmann::json::value_t::boolean: return "a boolean";
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned: return "an integer";
    case nlohmann::json::value_t::number_float: return "a floating-point number";
    default: return "an unsupported JSON value";
  }
}

/// Whether `j` is a number with an integral value (4096 or 4096.0).
inline bool json_is_integral(const nlohmann::json& j) {
  if (j.is_number_integer()) return true;
  if (!j.is_number_float()) return false;
  const double v = j.get<double>();
  return std::isfinite(v) && v == std::floor(v) && std::abs(v) < 9.0e15;
}

inline std::int64_t json_to_int64(const nlohmann::json& j) {
  if (j.is_number_unsigned()) {
    const auto u = j.get<std::uint64_t>();
    return u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())
               ? std::numeric_limits<std::int64_t>::max()
               : static_cast<std::int64_t>(u);
  }
  if (j.is_number_integer()) return j.get<std::int64_t>();
  return static_cast<std::int64_t>(j.get<double>());
}

}  // namespace detail

/// A JSON object of a file being read: the file name and the object's path travel with it,
/// so that `JsonObject(cfg, "config.json").object("rope_scaling").number("factor")` fails
/// with "config.json: field 'rope_scaling.factor' is missing". A field whose value is null
/// counts as absent (Hugging Face writes `"rope_scaling": null`).
class JsonObject {
 public:
  /// Throws naming `file` (and `path`, when not empty) unless `json` is an object.
  JsonObject(const nlohmann::json& json, std::string file, std::string path = {})
      : json_(&json), file_(std::move(file)), path_(std::move(path)) {
    SHADOWKV_CHECK(json.is_object(), file_, ": ", path_.empty() ? "the top level" : "field '" + path_ + "'",
                   " is ", detail::json_kind(json), ", expected an object");
  }

  const std::string& file() const { return file_; }
  const std::string& path() const { return path_; }
  const nlohmann::json& json() const { return *json_; }

  /// "rope_scaling.factor" for key "factor" of the object at "rope_scaling".
  std::string field(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }

  /// The value of `key`, or null when absent or null.
  const nlohmann::json* find(std::string_view key) const {
    const auto it = json_->find(key);
    if (it == json_->end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool has(std::string_view key) const { return find(key) != nullptr; }

  /// Throws "<file>: field '<path.key>' <message...>" (no space before a message that starts
  /// with '=': "field 'hidden_size'=0 is out of range").
  template <class... Args>
  [[noreturn]] void fail(std::string_view key, const Args&... message) const {
    const std::string text = shadowkv::detail::concat(message...);
    SHADOWKV_FAIL(file_, ": field '", field(key), "'", text.starts_with('=') ? "" : " ", text);
  }

  const nlohmann::json& required(std::string_view key) const {
    const nlohmann::json* v = find(key);
    if (!v) fail(key, "is missing");
    return *v;
  }

  /// A required integer in [lo, hi].
  std::int64_t integer(std::string_view key, std::int64_t lo = std::numeric_limits<std::int64_t>::min(),
                       std::int64_t hi = std::numeric_limits<std::int64_t>::max()) const {
    return checked_integer(key, required(key), lo, hi);
  }
  std::optional<std::int64_t> optional_integer(
      std::string_view key, std::int64_t lo = std::numeric_limits<std::int64_t>::min(),
      std::int64_t hi = std::numeric_limits<std::int64_t>::max()) const {
    const nlohmann::json* v = find(key);
    if (!v) return std::nullopt;
    return checked_integer(key, *v, lo, hi);
  }

  /// A required finite number.
  double number(std::string_view key) const { return checked_number(key, required(key)); }
  std::optional<double> optional_number(std::string_view key) const {
    const nlohmann::json* v = find(key);
    if (!v) return std::nullopt;
    return checked_number(key, *v);
  }

  bool boolean(std::string_view key, bool fallback) const {
    const nlohmann::json* v = find(key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(key, "is ", detail::json_kind(*v), ", expected a boolean");
    return v->get<bool>();
  }

  std::string string(std::string_view key) const { return checked_string(key, required(key)); }
  std::optional<std::string> optional_string(std::string_view key) const {
    const nlohmann::json* v = find(key);
    if (!v) return std::nullopt;
    return checked_string(key, *v);
  }

  JsonObject object(std::string_view key) const {
    const nlohmann::json& v = required(key);
    if (!v.is_object()) fail(key, "is ", detail::json_kind(v), ", expected an object");
    return JsonObject(v, file_, field(key));
  }
  std::optional<JsonObject> optional_object(std::string_view key) const {
    const nlohmann::json* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_object()) fail(key, "is ", detail::json_kind(*v), ", expected an object");
    return JsonObject(*v, file_, field(key));
  }

  const nlohmann::json& array(std::string_view key) const {
    const nlohmann::json& v = required(key);
    if (!v.is_array()) fail(key, "is ", detail::json_kind(v), ", expected an array");
    return v;
  }

 private:
  std::int64_t checked_integer(std::string_view key, const nlohmann::json& v, std::int64_t lo,
                               std::int64_t hi) const {
    if (!detail::json_is_integral(v)) fail(key, "is ", detail::json_kind(v), ", expected an integer");
    const std::int64_t x = detail::json_to_int64(v);
    if (x < lo || x > hi) fail(key, "=", x, " is out of range [", lo, ", ", hi, "]");
    return x;
  }
  double checked_number(std::string_view key, const nlohmann::json& v) const {
    if (!v.is_number()) fail(key, "is ", detail::json_kind(v), ", expected a number");
    const double x = v.get<double>();
    if (!std::isfinite(x)) fail(key, "=", x, " is not finite");
    return x;
  }
  std::string checked_string(std::string_view key, const nlohmann::json& v) const {
    if (!v.is_string()) fail(key, "is ", detail::json_kind(v), ", expected a string");
    return v.get<std::string>();
  }

  const nlohmann::json* json_;
  std::string file_;
  std::string path_;
};

}  // namespace shadowkv::model
