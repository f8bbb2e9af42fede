#pragma once
/// \file cuda/error.cuh
/// \brief `SHADOWKV_CUDA_CHECK(call)`: every CUDA runtime call of the library and its tests goes
/// through it, so a failure surfaces as a `shadowkv::Error` naming the call, the place and the
/// CUDA error, instead of a status code nobody read.
///
/// After a failed call the runtime's last-error slot still holds the error, and a later
/// `cudaGetLastError()` (e.g. the launch check of an unrelated kernel) would report it again;
/// the check clears it before throwing (as Thrust's `throw_on_error` does). Errors that corrupt
/// the context (an illegal address in a kernel) stay sticky whatever is cleared: every later
/// call of the process fails with them.

#include <cuda_runtime_api.h>

#include <atomic>
#include <string>

#include "../core/error.hpp"

namespace shadowkv::detail {

/// Throws `shadowkv::Error` "<call> failed: <cudaErrorName>: <cudaGetErrorString>" at
/// function/file/line when `status` is not `cudaSuccess`.
inline void cuda_check(cudaError_t status, const char* call, const char* function, const char* file,
                       int line) {
  if (status == cudaSuccess) [[likely]]
    return;
  (void)cudaGetLastError();  // clear the last error so that it is reported once
  throw_error(function, file, line, call, " failed: ", cudaGetErrorName(status), ": ",
              cudaGetErrorString(status));
}

}  // namespace shadowkv::detail

/// Checks a CUDA runtime call: `SHADOWKV_CUDA_CHECK(cudaMemcpy(dst, src, n, kind));`
#define SHADOWKV_CUDA_CHECK(call) \
  ::shadowkv::detail::cuda_check((call), #call, __func__, __FILE__, __LINE__)

/// Checks the launch just made (`kernel<<<...>>>(...)`; `SHADOWKV_CUDA_CHECK_LAUNCH();`).
/// Launch errors (bad configuration, no kernel image for this GPU) are reported here; errors
/// while the kernel runs surface at the next synchronising call, or here when the build
/// defines `SHADOWKV_DEBUG_SYNC`, which synchronises the device after every launch (debugging
/// only: it serialises the host with the GPU).
#if defined(SHADOWKV_DEBUG_SYNC)
#define SHADOWKV_CUDA_CHECK_LAUNCH()                 \
  do {                                               \
    SHADOWKV_CUDA_CHECK(cudaGetLastError());         \
    SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());    \
  } while (0)
#else
#define SHADOWKV_CUDA_CHECK_LAUNCH() SHADOWKV_CUDA_CHECK(cudaGetLastError())
#endif

namespace shadowkv::cuda {

/// CUDA devices this process sees, without throwing: 0 when there are none or the runtime
/// fails, and then `why` says what it reported (for a program that falls back to the CPU).
inline int visible_devices(std::string& why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    why = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
    return 0;
  }
  if (count == 0) why = "cudaGetDeviceCount reported 0 devices";
  return count;
}

/// A launch setting of `Kernel` computed once per device — `compute(device)` >= 0, typically
/// after raising the kernel's dynamic shared memory limit with cudaFuncSetAttribute — and
/// returned from then on.
///
/// The cache is keyed by the kernel itself, as a template argument, and must stay so. nvcc
/// gives every translation unit its own host stub of a `__global__` template (whole-program
/// mode, `-static-global-template-stub`, on by default), so each .cu file that includes
/// shadowkv has its own copy of the kernel, with attributes of its own. A cache in an ordinary
/// inline function is one per program: the first .cu file to launch set the attribute on its
/// copy, and a launch from a second .cu file, with the attribute never raised there, failed with
/// cudaErrorInvalidValue (the slot table at k = 4096 on the H200, 2026-11-25). Here each copy
/// of the kernel has its own instantiation, so its own cache.
template <auto Kernel, class Compute>
long long kernel_setting_per_device(Compute&& compute) {
  constexpr int kMaxDevices = 64;
  static std::atomic<long long> cached[kMaxDevices] = {};  // 1 + value; 0: not computed yet
  int device = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  long long value = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) - 1 : -1;
  if (value < 0) {
    value = static_cast<long long>(compute(device));
    SHADOWKV_CHECK(value >= 0, "kernel_setting_per_device: compute returned ", value, " < 0");
    if (device < kMaxDevices) cached[device].store(value + 1, std::memory_order_relaxed);
  }
  return value;
}

}  // namespace shadowkv::cuda
