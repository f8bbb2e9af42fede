#pragma once
/// \file tensor.hpp
/// \brief Non-owning, row-major tensor views with shapes, and the shape checks that name the
/// argument in their error.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>

#include "error.hpp"

namespace shadowkv {

using index_t = std::int64_t;

/// A view of `Rank` dimensions over memory someone else owns. Row-major with an explicit
/// stride per dimension (in elements), so a view can be a slice of a larger buffer.
template <class T, int Rank>
struct TensorView {
  static_assert(Rank >= 1 && Rank <= 4, "TensorView supports 1 to 4 dimensions");
  using element_type = T;

  T* data = nullptr;
  std::array<index_t, Rank> shape{};
  std::array<index_t, Rank> stride{};

  TensorView() = default;

  /// A contiguous row-major view.
  TensorView(T* ptr, std::array<index_t, Rank> dims) : data(ptr), shape(dims) {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      stride[i] = s;
      s *= shape[i];
    }
  }

  TensorView(T* ptr, std::array<index_t, Rank> dims, std::array<index_t, Rank> strides)
      : data(ptr), shape(dims), stride(strides) {}

  /// A view of const elements from a view of mutable ones.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  TensorView(const TensorView<U, Rank>& other)
      : data(other.data), shape(other.shape), stride(other.stride) {}

  bool empty() const { return data == nullptr || numel() == 0; }

  index_t numel() const {
    index_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }

  bool is_contiguous() const {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      if (shape[i] != 1 && stride[i] != s) return false;
      s *= shape[i];
    }
    return true;
  }

  index_t size(int dim) const { return shape[dim]; }

  template <class... I>
    requires(sizeof...(I) == Rank)
  T& operator()(I... idx) const {
    const std::array<index_t, Rank> ii{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int d = 0; d < Rank; ++d) off += ii[d] * stride[d];
    return data[off];
  }

  /// Pointer to the first element of row `i` of dimension 0.
  T* row(index_t i) const { return data + i * stride[0]; }
};

namespace detail {

/// A sum of products in std::size_t that remembers an overflow instead of wrapping around: how
/// sizes computed from user arguments are checked before anything is allocated with them.
class CheckedSize {
 public:
  /// Adds the product of `factors`.
  CheckedSize& add(std::initializer_list<std::size_t> factors) {
    std::size_t p = 1;
    for (std::size_t f : factors) {
      if (f != 0 && p > std::numeric_limits<std::size_t>::max() / f) overflow_ = true;
      p *= f;
    }
    if (p > std::numeric_limits<std::size_t>::max() - value_) overflow_ = true;
    value_ += p;
    return *this;
  }
  bool overflow() const { return overflow_; }
  std::size_t value() const { return value_; }

 private:
  std::size_t value_ = 0;
  bool overflow_ = false;
};

}  // namespace detail

template <class T, int Rank>
std::string shape_string(const TensorView<T, Rank>& v) {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < Rank; ++i) os << (i ? ", " : "") << v.shape[i];
  os << ']';
  return os.str();
}

/// One expected extent: its symbolic name (for the message) and value; a negative value
/// means "any".
struct Extent {
  const char* name;
  index_t value;
};

/// Throws `shadowkv::Error` naming `arg` unless `v` is non-null, contiguous and of shape
/// `dims`: "q has shape [3, 32, 128], expected [batch=4, num_q_heads=32, head_dim=128]".
template <class T, int Rank, std::size_t N>
void check_view(const TensorView<T, Rank>& v, const char* arg, const Extent (&dims)[N]) {
  static_assert(N == Rank, "one Extent per dimension");
  auto expected = [&] {
    std::ostringstream os;
    os << '[';
    for (int i = 0; i < Rank; ++i) {
      os << (i ? ", " : "") << dims[i].name;
      if (dims[i].value >= 0) os << '=' << dims[i].value;
    }
    os << ']';
    return os.str();
  };
  bool ok = true;
  for (int i = 0; i < Rank; ++i)
    if (dims[i].value >= 0 && v.shape[i] != dims[i].value) ok = false;
  if (!ok) SHADOWKV_FAIL(arg, " has shape ", shape_string(v), ", expected ", expected());
  for (int i = 0; i < Rank; ++i)
    SHADOWKV_CHECK(v.shape[i] >= 0, arg, " has a negative extent in shape ", shape_string(v));
  SHADOWKV_CHECK(v.numel() == 0 || v.data != nullptr, arg, " is null but has shape ",
                 shape_string(v));
  SHADOWKV_CHECK(v.is_contiguous(), arg, " must be contiguous row-major (shape ", shape_string(v),
                 ")");
}

template <class T, int Rank, std::size_t N>
void check_view(const TensorView<T, Rank>& v, const char* arg, const std::array<Extent, N>& dims) {
  Extent plain[N];
  for (std::size_t i = 0; i < N; ++i) plain[i] = dims[i];
  check_view(v, arg, plain);
}

}  // namespace shadowkv
