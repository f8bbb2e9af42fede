#pragma once
/// \file dtype.hpp
/// \brief Storage element types: fp32, bf16, fp16. Arithmetic is always float.
///
/// `bf16` and `fp16` are Eigen's 16-bit types; their bit layout is the one of CUDA's
/// `__nv_bfloat16` / `__half`, so the CUDA backend reinterprets the same buffers.

#include <Eigen/Core>
#include <concepts>
#include <cstddef>
#include <string_view>

namespace shadowkv {

using bf16 = Eigen::bfloat16;
using fp16 = Eigen::half;

/// The element types a component may store keys, values and landmarks in.
template <class T>
concept StorageType = std::same_as<T, float> || std::same_as<T, bf16> || std::same_as<T, fp16>;

template <StorageType T>
constexpr std::string_view dtype_name() {
  if constexpr (std::same_as<T, float>) return "fp32";
  else if constexpr (std::same_as<T, bf16>) return "bf16";
  else return "fp16";
}

/// Runtime tag for the memory planner and for dispatch from a string.
enum class DType { fp32, bf16, fp16 };

constexpr std::size_t dtype_size(DType t) { return t == DType::fp32 ? 4 : 2; }

constexpr std::string_view to_string(DType t) {
  switch (t) {
    case DType::fp32: return "fp32";
    case DType::bf16: return "bf16";
    case DType::fp16: return "fp16";
  }
  return "unknown";
}

template <StorageType T>
constexpr DType dtype_of() {
  if constexpr (std::same_as<T, float>) return DType::fp32;
  else if constexpr (std::same_as<T, bf16>) return DType::bf16;
  else return DType::fp16;
}

template <StorageType T>
inline float to_float(T x) { return static_cast<float>(x); }

template <StorageType T>
inline T from_float(float x) { return static_cast<T>(x); }

}  // namespace shadowkv
