#pragma once
/// \file cuda/memory.cuh
/// \brief Device memory through an allocator the engine can replace, and RAII buffers for
/// device and pinned (mapped) host memory. Every allocation is stream-ordered.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
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

namespace detail {
/// Clears the error and throws `shadowkv::Error` naming the size and `where` the allocation came
/// from when `status` (an allocation's result) is not a success.
inline void check_allocation(cudaError_t status, std::size_t bytes, const char* where) {
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    SHADOWKV_FAIL("device allocation of ", bytes, " bytes", where, " failed: ", cudaGetErrorName(status), ": ",
                  cudaGetErrorString(status));
  }
}
}  // namespace detail

/// The default: `cudaMallocAsync` / `cudaFreeAsync` on the device's default memory pool.
class AsyncAllocator final : public DeviceAllocator {
 public:
  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    void* ptr = nullptr;
    if (bytes == 0) return nullptr;
    // The status first, then `ptr`: as one call's arguments their order would be unspecified.
    detail::check_allocation(cudaMallocAsync(&ptr, bytes, stream), bytes, "");
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

/// `cudaMallocFromPoolAsync` on a memory pool of its own (current device at construction).
/// Meant for memory that lives only for a while — a prompt's staging until `finish_prefill`
/// (`SparseAttention::set_staging_allocator`): in a pool shared with long-lived state, freed
/// staging leaves holes between the blocks still in use, which the pool cannot give back; here
/// `trim()` returns all of it to the device once it is freed (until then the pool keeps freed
/// memory for the next allocations). Not copyable; the pool goes when this object and every
/// allocation from it are gone.
class PoolAllocator final : public DeviceAllocator {
 public:
  PoolAllocator() {
    int device = 0;
    SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    SHADOWKV_CUDA_CHECK(cudaMemPoolCreate(&pool_, &props));
    // Keep freed memory until trim(): by default a pool gives it back at every synchronisation.
    std::uint64_t keep = UINT64_MAX;
    const cudaError_t status = cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep);
    if (status != cudaSuccess) {
      (void)cudaMemPoolDestroy(pool_);
      SHADOWKV_CUDA_CHECK(status);
    }
  }
  PoolAllocator(const PoolAllocator&) = delete;
  PoolAllocator& operator=(const PoolAllocator&) = delete;
  ~PoolAllocator() override { (void)cudaMemPoolDestroy(pool_); }

  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    void* ptr = nullptr;
    if (bytes == 0) return nullptr;
    detail::check_allocation(cudaMallocFromPoolAsync(&ptr, bytes, pool_, stream), bytes, " from a PoolAllocator");
    return ptr;
  }
  void deallocate(void* ptr, std::size_t, cudaStream_t stream) noexcept override {
    if (ptr) (void)cudaFreeAsync(ptr, stream);
  }
  /// Gives the device back all but `keep_bytes` of the memory the pool holds and no
  /// allocation uses. Frees are stream-ordered: synchronise the streams that freed first.
  void trim(std::size_t keep_bytes = 0) { SHADOWKV_CUDA_CHECK(cudaMemPoolTrimTo(pool_, keep_bytes)); }
  /// Device memory the pool holds (in use or not).
  std::size_t reserved_bytes() const { return attribute(cudaMemPoolAttrReservedMemCurrent); }
  /// Device memory its live allocations use.
  std::size_t used_bytes() const { return attribute(cudaMemPoolAttrUsedMemCurrent); }
  cudaMemPool_t pool() const { return pool_; }

 private:
  std::size_t attribute(cudaMemPoolAttr attr) const {
    std::uint64_t v = 0;
    SHADOWKV_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, attr, &v));
    return static_cast<std::size_t>(v);
  }
  cudaMemPool_t pool_ = nullptr;
};

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

/// Where the library takes pinned host memory from (the offloaded values, staging rings).
/// Memory must be page-locked, mapped for every device (`cudaHostAllocMapped |
/// cudaHostAllocPortable` or equivalent): kernels read and write it over PCIe. `allocate` throws
/// `shadowkv::Error` (or returns a valid pointer); `deallocate` must not throw.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* ptr, std::size_t bytes) noexcept = 0;
};

/// The default: `cudaHostAlloc` / `cudaFreeHost` per buffer. Pinning is slow (tens of ms per
/// 100 MB) and `cudaFreeHost` waits for the whole device: engines that add and remove sequences
/// all the time want `CachingHostAllocator` over it.
class PinnedHostAllocator final : public HostAllocator {
 public:
  void* allocate(std::size_t bytes) override {
    if (bytes == 0) return nullptr;
    void* ptr = nullptr;
    const cudaError_t status = cudaHostAlloc(&ptr, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      SHADOWKV_FAIL("pinned host allocation of ", bytes, " bytes failed: ", cudaGetErrorName(status), ": ",
                    cudaGetErrorString(status));
    }
    return ptr;
  }
  void deallocate(void* ptr, std::size_t) noexcept override {
    if (ptr) (void)cudaFreeHost(ptr);
  }
};

/// The host allocator used when none is given.
inline HostAllocator& default_host_allocator() {
  static PinnedHostAllocator allocator;
  return allocator;
}

/// Keeps freed pinned blocks and hands them out again to allocations of the same size (the
/// value pools of sequences of one length, layer after layer), so that a sequence's arrival
/// pins nothing and its departure frees nothing once the cache is warm. Thread-safe.
/// Cached memory stays pinned: release it (`release()`) before the host needs it for something
/// else, e.g. before sequences of another length arrive in bulk. A block returns to the cache
/// when its owner is destroyed and may be handed out at once: as
/// for the library's objects in general, work that uses it must be ordered (one stream, or
/// events) before the next owner's work.
class CachingHostAllocator final : public HostAllocator {
 public:
  /// \param upstream where new blocks come from and where `release()` returns them
  /// \param max_cached_bytes blocks freed beyond this go back upstream at once
  explicit CachingHostAllocator(HostAllocator& upstream = default_host_allocator(),
                                std::size_t max_cached_bytes = SIZE_MAX)
      : upstream_(&upstream), max_cached_(max_cached_bytes) {}
  CachingHostAllocator(const CachingHostAllocator&) = delete;
  CachingHostAllocator& operator=(const CachingHostAllocator&) = delete;
  ~CachingHostAllocator() override { release(); }

  /// A cached block of exactly `bytes`, else a new one from upstream; when upstream fails and
  /// blocks of other sizes are cached, they are released and the allocation is tried once more.
  void* allocate(std::size_t bytes) override {
    if (bytes == 0) return nullptr;
    {
      std::lock_guard lock(mutex_);
      if (auto it = free_.find(bytes); it != free_.end()) {
        void* ptr = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return ptr;
      }
    }
    try {
      return upstream_->allocate(bytes);
    } catch (const Error&) {
      if (cached_bytes() == 0) throw;
    }
    release();
    return upstream_->allocate(bytes);
  }
  void deallocate(void* ptr, std::size_t bytes) noexcept override {
    if (!ptr) return;
    {
      std::lock_guard lock(mutex_);
      if (cached_ + bytes <= max_cached_) {
        try {
          free_.emplace(bytes, ptr);
          cached_ += bytes;
          return;
        } catch (...) {  // no room in the map: give the block back instead
        }
      }
    }
    upstream_->deallocate(ptr, bytes);
  }
  /// Gives every cached block back upstream.
  void release() noexcept {
    std::multimap<std::size_t, void*> blocks;
    {
      std::lock_guard lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [bytes, ptr] : blocks) upstream_->deallocate(ptr, bytes);
  }
  /// Bytes held in the cache (not in use).
  std::size_t cached_bytes() const {
    std::lock_guard lock(mutex_);
    return cached_;
  }

 private:
  HostAllocator* upstream_;
  std::size_t max_cached_;
  mutable std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;
  std::size_t cached_ = 0;
};

/// `n` elements of `T` in pinned host memory that kernels can also read directly
/// (mapped: zero-copy over PCIe), from a `HostAllocator`. Move-only. The allocator has no
/// default: every pinned buffer of the library comes from the `host_allocator` its owner was
/// given (pass `default_host_allocator()` for the plain `cudaHostAlloc` one).
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(std::size_t n, HostAllocator& allocator)
      : size_(n), allocator_(&allocator) {
    if (n == 0) return;
    ptr_ = static_cast<T*>(allocator.allocate(n * sizeof(T)));
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept { swap(o); }
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    PinnedBuffer(std::move(o)).swap(*this);
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_) allocator_->deallocate(ptr_, size_ * sizeof(T));
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
    std::swap(allocator_, o.allocator_);
  }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
  HostAllocator* allocator_ = nullptr;
};

}  // namespace shadowkv::cuda
