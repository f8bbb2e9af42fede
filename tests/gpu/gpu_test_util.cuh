#pragma once
// What the GPU tests share: the skip check for machines without a GPU, and a device buffer
// with upload, download and NaN poisoning.

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "../test_util.hpp"

namespace skv_gpu_test {

/// True when a CUDA device can run the kernels; otherwise prints why the test case is skipped.
inline bool cuda_device_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  std::string why;
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    why = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  } else if (count == 0) {
    why = "cudaGetDeviceCount reported 0 devices";
  }
  if (why.empty()) return true;
  MESSAGE("SKIPPED: no CUDA device (", why, ")");
  return false;
}

/// A device buffer of `n` T, freed on scope exit (frees are unchecked: a destructor must not
/// throw, and a failed free leaves nothing to recover).
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : size_(n) {
    SHADOWKV_CUDA_CHECK(cudaMalloc(&ptr_, std::max<std::size_t>(n, 1) * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { (void)cudaFree(ptr_); }

  T* get() const { return ptr_; }
  std::size_t size() const { return size_; }

  /// Complete on return. A plain cudaMemcpy from pageable memory may return before its DMA
  /// lands, and it runs on the legacy default stream, which the tests' non-blocking streams do
  /// not wait for: a kernel launched next could read the old bytes (seen on an H200 shared
  /// with other processes). Hence the legacy stream is synchronised.
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == size_);
    SHADOWKV_CUDA_CHECK(cudaMemcpy(ptr_, h.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  std::vector<T> download() const {
    std::vector<T> h(size_);
    SHADOWKV_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  /// Fills with quiet NaNs, so an element the kernel fails to write cannot pass a comparison.
  /// Complete on return (cudaMemset on device memory is asynchronous; see `upload`).
  void poison() { fill_bytes(0xff); }
  /// Every byte set to `byte`; complete on return.
  void fill_bytes(unsigned char byte) {
    SHADOWKV_CUDA_CHECK(cudaMemset(ptr_, byte, size_ * sizeof(T)));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
};

/// A non-blocking stream (no implicit sync with the legacy default stream), destroyed on exit.
class Stream {
 public:
  Stream() { SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() { (void)cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }
  void sync() const { SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace skv_gpu_test

/// First statement of every GPU test case: returns (the case then passes, and ctest reports
/// the test as skipped) when no CUDA device is usable.
#define SKV_REQUIRE_GPU()                                   \
  do {                                                      \
    if (!::skv_gpu_test::cuda_device_available()) return;   \
  } while (0)
