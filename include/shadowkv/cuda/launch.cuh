#pragma once
/// \file cuda/launch.cuh
/// \brief `launch_kernel`: one checked launch through cudaLaunchKernelEx, optionally in thread
/// block clusters, overlapping the kernel before it on the stream where the device allows
/// (programmatic dependent launch, kernels/grid_dependency.cuh).

#include <cuda_runtime.h>

#include <cstddef>

#include "../core/error.hpp"
#include "error.cuh"

namespace shadowkv::cuda {

/// Whether `Kernel` can be launched with a programmatic dependency on this device: the device
/// is sm_90 or newer and the kernel's code was compiled for it (PTX 9.0 and up), so that its
/// `wait_for_previous_grids` is the real instruction, not the no-op of an older build that the
/// driver JIT-compiled here. Read once per device and kernel.
template <auto Kernel>
bool programmatic_launch_supported() {
  return kernel_setting_per_device<Kernel>([](int device) {
           int major = 0;
           SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
           cudaFuncAttributes attr{};
           SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
           return major >= 9 && attr.ptxVersion >= 90 ? 1 : 0;
         }) != 0;
}

/// How many clusters of `cluster_x` CTAs of `Kernel` (`threads` per CTA, `smem` bytes of
/// dynamic shared memory) can be resident at once (`cudaOccupancyMaxActiveClusters`); 0 where
/// the device or the kernel's build has no clusters of that size. The caller checks sm_90 and
/// PTX 9.0 first (a kernel JIT-compiled from older PTX has no cluster code).
template <auto Kernel>
int max_active_clusters(unsigned cluster_x, unsigned threads, std::size_t smem) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(cluster_x);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = cluster_x;
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, Kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // no clusters of this size
    return 0;
  }
  return active;
}

/// `Kernel<<<grid, block, smem, stream>>>(args...)` in clusters of `cluster_x` CTAs along x (1:
/// no cluster attribute), allowed to start before the previous kernel on `stream` ends where
/// `programmatic_launch_supported<Kernel>()`: `Kernel` must call `wait_for_previous_grids`
/// before its first access to memory an earlier launch may touch. Checks the launch.
template <auto Kernel, class... Args>
void launch_kernel(dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, unsigned cluster_x,
                   const Args&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attrs[2]{};
  unsigned n = 0;
  if (cluster_x > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = cluster_x;
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (programmatic_launch_supported<Kernel>()) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  config.attrs = n > 0 ? attrs : nullptr;
  config.numAttrs = n;
  SHADOWKV_CUDA_CHECK(cudaLaunchKernelEx(&config, Kernel, args...));
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

}  // namespace shadowkv::cuda
