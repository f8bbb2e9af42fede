#pragma once
/// \file cuda/types.cuh
/// \brief Storage types as kernels see them: `bf16` (Eigen) is `__nv_bfloat16` on the device,
/// `fp16` is `__half` (same bit layouts), and the conversions to and from float.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/dtype.hpp"

namespace shadowkv::cuda {

template <class T>
struct device_type;
template <>
struct device_type<float> {
  using type = float;
};
template <>
struct device_type<bf16> {
  using type = __nv_bfloat16;
};
template <>
struct device_type<fp16> {
  using type = __half;
};
/// The kernel-side type of storage type `T`.
template <class T>
using device_t = typename device_type<T>::type;

/// Reinterprets a host-side storage pointer as its kernel-side type (same bits).
template <class T>
device_t<T>* as_device(T* p) {
  return reinterpret_cast<device_t<T>*>(p);
}
template <class T>
const device_t<T>* as_device(const T* p) {
  return reinterpret_cast<const device_t<T>*>(p);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class D>
__device__ __forceinline__ D from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

}  // namespace shadowkv::cuda
