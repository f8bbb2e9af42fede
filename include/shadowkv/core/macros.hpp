#pragma once
/// \file macros.hpp
/// \brief `SHADOWKV_HOST_DEVICE`: one definition of shared math for host and device code.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SHADOWKV_HOST_DEVICE __host__ __device__ __forceinline__
#define SHADOWKV_DEVICE_COMPILE 1
#else
#define SHADOWKV_HOST_DEVICE inline
#define SHADOWKV_DEVICE_COMPILE 0
#endif
