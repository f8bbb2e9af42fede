#pragma once
/// \file cuda/memory.cuh
/// \brief Device memory through an allocator the engine can replace, and RAII buffers for
/// device and pinned (mapped) host memory. Every allocation is stream-ordered.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "../core/error.hpp"
#include "error.cuh"

namespace shadowkv::cuda {

/// Where the library takes device memory from. Engines plug in their own pool by deriving
/// from this; `allocate` must throw `shadowkv::Error` (or return a valid pointer), and
/// `deallocate` must not throw.
class DeviceAllocator {
 public:
  virtual ~DeviceAllocator() = default;
  virtual void* allocate(std::size_t bytes, cudaStream_t stream) = 0;
  virtual void deallocate(void* ptr, std::size_t bytes, cudaStream_t stream) noexcept = 0;
};

/// The default: `cudaMallocAsync` / `cudaFreeAsync` on the device's default memory pool.
class AsyncAllocator final : public DeviceAllocator {
 public:
  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    void* ptr = nullptr;
    if (bytes == 0) return nullptr;
    const cudaError_t status = cudaMallocAsync(&ptr, bytes, stream);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      SHADOWKV_FAIL("device allocation of ", bytes, " bytes failed: ", cudaGetErrorName(status), ": ",
                    cudaGetErrorString(status));
    }
    return ptr;
  }
  void deallocate(void* ptr, std::size_t, cudaStream_t stream) noexcept override {
    if (ptr) (void)cudaFreeAsync(ptr, stream);
  }
};

/// The allocator used when none is given.
inline DeviceAllocator& default_allocator() {
  static AsyncAllocator allocator;
  return allocator;
}

/// `n` elements of `T` in device memory, freed (stream-ordered) on destruction. Move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t n, cudaStream_t stream, DeviceAllocator& allocator = default_allocator())
      : ptr_(static_cast<T*>(allocator.allocate(n * sizeof(T), stream))), size_(n), stream_(stream),
        allocator_(&allocator) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { swap(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    DeviceBuffer(std::move(o)).swap(*this);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (allocator_) allocator_->deallocate(ptr_, size_ * sizeof(T), stream_);
  }

  T* data() const { return ptr_; }
  std::size_t size() const { return size_; }
  std::size_t bytes() const { return size_ * sizeof(T); }
  void swap(DeviceBuffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    std::swap(stream_, o.stream_);
    std::swap(allocator_, o.allocator_);
  }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
  cudaStream_t stream_ = nullptr;
  DeviceAllocator* allocator_ = nullptr;
};

/// `n` elements of `T` in pinned host memory that kernels can also read directly
/// (`cudaHostAllocMapped`: zero-copy over PCIe). Move-only.
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t n) : size_(n) {
    if (n == 0) return;
    const cudaError_t status =
        cudaHostAlloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T), cudaHostAllocMapped | cudaHostAllocPortable);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      ptr_ = nullptr;
      SHADOWKV_FAIL("pinned host allocation of ", n * sizeof(T), " bytes failed: ", cudaGetErrorName(status),
                    ": ", cudaGetErrorString(status));
    }
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept { swap(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    PinnedBuffer(std::move(o)).swap(*this);
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_) (void)cudaFreeHost(ptr_);
  }

  T* data() const { return ptr_; }
  std::size_t size() const { return size_; }
  /// The address kernels use for this memory (unified addressing makes it the host pointer).
  T* device_data() const {
    T* d = nullptr;
    if (ptr_) SHADOWKV_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&d), ptr_, 0));
    return d;
  }
  void swap(PinnedBuffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
  }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace shadowkv::cuda
