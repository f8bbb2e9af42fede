#pragma once
/// \file cuda/dispatch.cuh
/// \brief The one switch that turns runtime sizes kernels need at compile time into template
/// arguments, throwing `shadowkv::Error` naming the argument, its value and the supported set.

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace shadowkv::cuda {

/// Throws `shadowkv::Error` naming `head_dim` unless the CUDA kernels are built for it (the
/// set of `kSupportedHeadDims`); for validation before any launch.
inline void check_kernel_head_dim(int head_dim) {
  SHADOWKV_CHECK(is_supported_head_dim(head_dim), "head_dim=", head_dim,
                 " is not supported by the CUDA kernels (supported: 64, 96, 128, 256)");
}

}  // namespace shadowkv::cuda

/// `SHADOWKV_DISPATCH_HEAD_DIM(d, HEAD_DIM, [&] { launch<HEAD_DIM>(...); });`
#define SHADOWKV_DISPATCH_HEAD_DIM(head_dim, HEAD_DIM, ...)                                   \
  [&] {                                                                                     \
    switch (head_dim) {                                                                     \
      case 64: { constexpr int HEAD_DIM = 64; return __VA_ARGS__(); }                        \
      case 96: { constexpr int HEAD_DIM = 96; return __VA_ARGS__(); }                        \
      case 128: { constexpr int HEAD_DIM = 128; return __VA_ARGS__(); }                      \
      case 256: { constexpr int HEAD_DIM = 256; return __VA_ARGS__(); }                      \
      default:                                                                              \
        SHADOWKV_FAIL("head_dim=", (head_dim),                                              \
                      " is not supported by the CUDA kernels (supported: 64, 96, 128, 256)"); \
    }                                                                                       \
  }()
