#pragma once
/// \file cuda/library_handles.cuh
/// \brief cuBLAS and cuSOLVER: status checks that throw `shadowkv::Error` naming the call, and
/// one handle per (host thread, device), created on first use and bound to the caller's stream
/// on every use.
///
/// Handles are never destroyed: they live until the process ends (destroying them from a
/// thread-exit or static destructor can run after the CUDA runtime has shut down). An engine
/// that owns its handles can pass them instead (`LowRankKeyStore<CudaBackend, T>::set_handles`).

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <array>

#include "../core/error.hpp"
#include "error.cuh"

namespace shadowkv::detail {

inline void cublas_check(cublasStatus_t status, const char* call, const char* function, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) [[likely]]
    return;
  throw_error(function, file, line, call, " failed: ", cublasGetStatusName(status), ": ",
              cublasGetStatusString(status));
}

inline const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolverStatus_t (see cusolver_common.h)";
  }
}

inline void cusolver_check(cusolverStatus_t status, const char* call, const char* function, const char* file,
                           int line) {
  if (status == CUSOLVER_STATUS_SUCCESS) [[likely]]
    return;
  throw_error(function, file, line, call, " failed: ", cusolver_status_name(status), " (", static_cast<int>(status),
              ")");
}

}  // namespace shadowkv::detail

/// Checks a cuBLAS call: `SHADOWKV_CUBLAS_CHECK(cublasGemmEx(...));`
#define SHADOWKV_CUBLAS_CHECK(call) ::shadowkv::detail::cublas_check((call), #call, __func__, __FILE__, __LINE__)
/// Checks a cuSOLVER call.
#define SHADOWKV_CUSOLVER_CHECK(call) ::shadowkv::detail::cusolver_check((call), #call, __func__, __FILE__, __LINE__)

namespace shadowkv::cuda {

/// cuBLAS and cuSOLVER handles the library's dense linear algebra runs on.
struct LibraryHandles {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
};

namespace detail {
inline constexpr int kMaxHandleDevices = 64;
}

/// This thread's handles for the current device, created on first use.
inline LibraryHandles thread_library_handles() {
  thread_local std::array<LibraryHandles, detail::kMaxHandleDevices> handles{};
  int device = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  SHADOWKV_CHECK(device < detail::kMaxHandleDevices, "device ", device, " is beyond the ",
                 detail::kMaxHandleDevices, " devices the library keeps handles for");
  LibraryHandles& h = handles[device];
  if (!h.blas) SHADOWKV_CUBLAS_CHECK(cublasCreate(&h.blas));
  if (!h.solver) SHADOWKV_CUSOLVER_CHECK(cusolverDnCreate(&h.solver));
  return h;
}

}  // namespace shadowkv::cuda
