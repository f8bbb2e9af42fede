#pragma once
/// \file eigen_util.hpp
/// \brief Eigen aliases and conversions the CPU backend shares.

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/tensor.hpp"

namespace shadowkv::cpu {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using RowMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
template <class T>
using ConstRowMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

/// Copies `n` elements to float.
template <StorageType T>
inline void to_float(const T* src, index_t n, float* dst) {
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

/// Copies `n` floats to storage type `T` (round to nearest even).
template <StorageType T>
inline void from_float(const float* src, index_t n, T* dst) {
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

/// Makes room for `size` elements in `v` (growing geometrically, as `push_back` would), so that
/// growing `v` up to `size` afterwards cannot fail: how a call allocates before it changes
/// anything.
template <class V>
inline void reserve_for(V& v, std::size_t size) {
  if (v.capacity() < size) v.reserve(std::max(size, 2 * v.capacity()));
}

/// Bytes held by a vector's elements (its size, not its capacity).
template <class V>
inline std::size_t bytes_of(const V& v) {
  return v.size() * sizeof(typename V::value_type);
}

}  // namespace shadowkv::cpu
