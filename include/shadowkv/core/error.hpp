#pragma once
/// \file error.hpp
/// \brief `shadowkv::Error` and the check macros every entry point validates its arguments with.

#include <exception>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace shadowkv {

/// The one exception type of the library. `what()` reads
/// "shadowkv: <message> [in <function> at <file>:<line>]".
class Error : public std::runtime_error {
 public:
  Error(std::string message, const char* function, const char* file, int line)
      : std::runtime_error(format(message, function, file, line)),
        message_(std::move(message)),
        function_(function ? function : ""),
        file_(file ? file : ""),
        line_(line) {}

  /// The message alone, without the location.
  const std::string& message() const noexcept { return message_; }
  const std::string& function() const noexcept { return function_; }
  const std::string& file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  static std::string format(const std::string& message, const char* function, const char* file,
                            int line) {
    std::ostringstream os;
    os << "shadowkv: " << message;
    if (function && *function) os << " [in " << function << " at " << file << ":" << line << "]";
    return os.str();
  }

  std::string message_;
  std::string function_;
  std::string file_;
  int line_;
};

namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class... Args>
[[noreturn]] void throw_error(const char* function, const char* file, int line,
                              const Args&... args) {
  throw Error(concat(args...), function, file, line);
}

/// What `SHADOWKV_CATCH_ALLOCATION` throws for the allocation failure `cause`.
template <class... Args>
[[noreturn]] void throw_out_of_memory(const char* function, const char* file, int line,
                                      const std::exception& cause, const Args&... context) {
  throw Error(concat("out of memory ", context..., " (", cause.what(), ")"), function, file, line);
}

}  // namespace detail
}  // namespace shadowkv

/// Throws `shadowkv::Error` with the streamed message when `cond` is false:
/// `SHADOWKV_CHECK(rank <= n, "rank=", rank, " exceeds num_kv_heads*head_dim=", n)`.
#define SHADOWKV_CHECK(cond, ...)                                                     \
  do {                                                                                \
    if (!(cond)) [[unlikely]]                                                         \
      ::shadowkv::detail::throw_error(__func__, __FILE__, __LINE__, __VA_ARGS__);     \
  } while (0)

/// Throws `shadowkv::Error` unconditionally.
#define SHADOWKV_FAIL(...) ::shadowkv::detail::throw_error(__func__, __FILE__, __LINE__, __VA_ARGS__)

/// The handlers of a function-try-block that turn a failed allocation inside the function
/// (`std::bad_alloc`, or `std::length_error` for a size no container holds) into a
/// `shadowkv::Error` "out of memory <context> (<what>)". What the function promises on failure
/// (most: nothing changed) holds for these as for any other error.
///
///     void prefill(SeqId id, int layer, ...) try {
///       ...
///     } SHADOWKV_CATCH_ALLOCATION("in prefill of sequence id=", id, ", layer=", layer)
#define SHADOWKV_CATCH_ALLOCATION(...)                                                           \
  catch (const std::bad_alloc& shadowkv_alloc_error_) {                                          \
    ::shadowkv::detail::throw_out_of_memory(__func__, __FILE__, __LINE__, shadowkv_alloc_error_, \
                                            __VA_ARGS__);                                        \
  }                                                                                              \
  catch (const std::length_error& shadowkv_alloc_error_) {                                       \
    ::shadowkv::detail::throw_out_of_memory(__func__, __FILE__, __LINE__, shadowkv_alloc_error_, \
                                            __VA_ARGS__);                                        \
  }
