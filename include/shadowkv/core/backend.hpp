#pragma once
/// \file backend.hpp
/// \brief Backend tags and the primary templates of the four components.
///
/// Every component is a class template over a backend tag and a storage type. The primary
/// templates are only declared here; `cpu/` specialises them for `CpuBackend` and `cuda/`
/// for `CudaBackend`, both with the same member functions, so engine code written against
/// one compiles against the other by changing the tag.

#include "dtype.hpp"
#include "policy.hpp"

namespace shadowkv {

/// Eigen on the host. Every buffer lives in ordinary host memory; "device" figures of the
/// CPU backend are the bytes that would live on the GPU with the CUDA backend.
struct CpuBackend {
  static constexpr const char* name = "cpu";
};

/// CUDA kernels, CUB/Thrust, cuBLAS/cuSOLVER (in `shadowkv/cuda/`).
struct CudaBackend {
  static constexpr const char* name = "cuda";
};

template <class B>
concept Backend = std::same_as<B, CpuBackend> || std::same_as<B, CudaBackend>;

template <Backend B, StorageType T>
class LowRankKeyStore;

template <Backend B, StorageType T>
class LandmarkIndex;

template <Backend B, StorageType T>
class OffloadedValuePool;

/// The composition: `SparseAttention<ShadowKVPolicy>` (CPU, fp32) or e.g.
/// `SparseAttention<DensePolicy, CudaBackend, bf16>`.
template <AttentionPolicy Policy, Backend B = CpuBackend, StorageType T = float>
class SparseAttention;

}  // namespace shadowkv
