#pragma once
// What the GPU reliability tests share (docs/reliability.md, "GPU"): a device and a pinned host
// allocator that count their live blocks and fail the n-th allocation on request, the bytes the
// device's default memory pool has in use (memory taken without the caller's allocator), and
// device copies of the host inputs of `reliability_util.hpp`.

#include <cstdint>
#include <map>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "../reliability/reliability_util.hpp"
#include "gpu_test_util.cuh"

namespace skv_gpu_test {

/// Fails the n-th allocation made through the allocators that share it, counted from `arm(n)`;
/// `arm(0)` only counts.
class FailNth {
 public:
  void arm(std::int64_t n) {
    n_ = n;
    seen_ = 0;
    fired_ = false;
  }
  /// Counts an allocation; true when it is the one to fail.
  bool next() {
    if (++seen_ != n_) return false;
    fired_ = true;
    return true;
  }
  std::int64_t seen() const { return seen_; }
  bool fired() const { return fired_; }

 private:
  std::int64_t n_ = 0, seen_ = 0;
  bool fired_ = false;
};

/// The blocks an allocator has handed out and not had back.
class LiveBlocks {
 public:
  void add(void* ptr, std::size_t bytes) {
    blocks_.emplace(ptr, bytes);
    bytes_ += bytes;
    ++allocations_;
  }
  /// Forgets a block; a pointer never handed out, or given back with another size, is counted
  /// as a bad free.
  void remove(void* ptr, std::size_t bytes) noexcept {
    const auto it = blocks_.find(ptr);
    if (it == blocks_.end() || it->second != bytes) {
      ++bad_frees_;
      return;
    }
    bytes_ -= bytes;
    blocks_.erase(it);
  }
  std::size_t bytes() const { return bytes_; }
  std::size_t blocks() const { return blocks_.size(); }
  std::int64_t allocations() const { return allocations_; }  ///< since construction
  std::int64_t bad_frees() const { return bad_frees_; }

 private:
  std::map<void*, std::size_t> blocks_;
  std::size_t bytes_ = 0;
  std::int64_t allocations_ = 0, bad_frees_ = 0;
};

/// Device memory from a memory pool of its own (so the default pool's figures show memory taken
/// without the caller's allocator), counted. An injected failure is reported as
/// `cuda::AsyncAllocator` reports a failed `cudaMallocAsync`: a `shadowkv::Error`.
class CountingDeviceAllocator final : public shadowkv::cuda::DeviceAllocator {
 public:
  explicit CountingDeviceAllocator(FailNth* inject = nullptr) : inject_(inject) {}
  CountingDeviceAllocator(const CountingDeviceAllocator&) = delete;
  CountingDeviceAllocator& operator=(const CountingDeviceAllocator&) = delete;
  ~CountingDeviceAllocator() override { (void)cudaDeviceSynchronize(); }

  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    if (bytes == 0) return nullptr;
    if (inject_ && inject_->next())
      SHADOWKV_FAIL("device allocation of ", bytes, " bytes failed: cudaErrorMemoryAllocation: out of memory (injected)");
    void* ptr = pool_.allocate(bytes, stream);
    live_.add(ptr, bytes);
    return ptr;
  }
  void deallocate(void* ptr, std::size_t bytes, cudaStream_t stream) noexcept override {
    if (!ptr) return;
    live_.remove(ptr, bytes);
    pool_.deallocate(ptr, bytes, stream);
  }
  const LiveBlocks& live() const { return live_; }

 private:
  FailNth* inject_;
  shadowkv::cuda::PoolAllocator pool_;
  LiveBlocks live_;
};

/// Pinned, mapped host memory from `cuda::PinnedHostAllocator`, counted; fails as it does.
class CountingHostAllocator final : public shadowkv::cuda::HostAllocator {
 public:
  explicit CountingHostAllocator(FailNth* inject = nullptr) : inject_(inject) {}

  void* allocate(std::size_t bytes) override {
    if (bytes == 0) return nullptr;
    if (inject_ && inject_->next())
      SHADOWKV_FAIL("pinned host allocation of ", bytes,
                    " bytes failed: cudaErrorMemoryAllocation: out of memory (injected)");
    void* ptr = upstream_.allocate(bytes);
    live_.add(ptr, bytes);
    return ptr;
  }
  void deallocate(void* ptr, std::size_t bytes) noexcept override {
    if (!ptr) return;
    live_.remove(ptr, bytes);
    upstream_.deallocate(ptr, bytes);
  }
  const LiveBlocks& live() const { return live_; }

 private:
  FailNth* inject_;
  shadowkv::cuda::PinnedHostAllocator upstream_;
  LiveBlocks live_;
};

/// Bytes of the current device's default memory pool in use (`cudaMallocAsync` without a pool:
/// `cuda::AsyncAllocator`, `default_allocator()`), after the device is idle.
inline std::uint64_t default_pool_bytes_in_use() {
  SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
  int device = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  SHADOWKV_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  std::uint64_t used = 0;
  SHADOWKV_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used));
  return used;
}

/// A device copy of host rows `[n, heads, d]` (`skv_test::RandomRows`), made at construction.
/// `poison` and `download` are ordered on the stream the library's calls ran on.
template <class T>
class DeviceRows {
 public:
  explicit DeviceRows(const skv_test::RandomRows<T>& h)
      : buf_(h.data.size()), rows_(h.rows), heads_(h.heads), dim_(h.dim) {
    buf_.upload(h.data);
  }
  shadowkv::TensorView<const T, 3> view() const { return {buf_.get(), {rows_, heads_, dim_}}; }
  shadowkv::TensorView<T, 3> mut() { return {buf_.get(), {rows_, heads_, dim_}}; }
  /// Quiet NaNs everywhere, so a row nobody wrote shows.
  void poison(cudaStream_t stream) {
    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(buf_.get(), 0xff, buf_.size() * sizeof(T), stream));
  }
  std::vector<T> download(cudaStream_t stream) const {
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    return buf_.download();
  }

 private:
  DeviceBuffer<T> buf_;
  shadowkv::index_t rows_, heads_, dim_;
};

}  // namespace skv_gpu_test
