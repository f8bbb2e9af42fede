#pragma once
/// \file cuda/offloaded_value_pool.cuh
/// \brief CUDA `OffloadedValuePool`: chunk-major values in mapped pinned host memory, value
/// slots and the slot table on the device, and a per-head `fetch` that runs the decode step's
/// slot-table update (cuda/slot_table.cuh) and zero-copy value gather (cuda/miss_ops.cuh).
/// Engines batch many pools in one launch through `descriptor()` / `value_descriptor()`.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../cpu/offloaded_value_pool.hpp"  // PoolStats
#include "error.cuh"
#include "kernels/gather_values.cuh"
#include "memory.cuh"
#include "miss_ops.cuh"
#include "slot_table.cuh"
#include "types.cuh"

namespace shadowkv {

/// Values of the landmark chunks of one layer of one sequence, as
/// `OffloadedValuePool<CpuBackend, T>` keeps them, with the CUDA backend: host storage
/// `[H_kv, num_chunks, c, d]` in mapped pinned memory (the GPU reads it over PCIe), `capacity`
/// value slots `[c, d]` per head on the device, and the slot table on the device. `fetch`
/// gives the same slots, victims and tables as the CPU pool's on the same selections.
///
/// Every device buffer is allocated from `allocator` and initialised on the `stream` given to
/// the constructor (stream-ordered); work on another stream must be ordered after it. Fetches
/// of one pool share its scratch: order them (one stream, or events). Not thread-safe.
template <StorageType T>
class OffloadedValuePool<CudaBackend, T> {
 public:
  using device_type = cuda::device_t<T>;

  /// \param num_chunks chunks per head on the host (>= 0, < 2^31: chunk ids are int32)
  /// \param capacity device slots per head (1 ..= `cuda::kMaxSlotCapacity`)
  /// \param stream where the buffers are allocated and initialised (slots 0, tables empty)
  /// \param host_allocator where the pinned memory comes from (the host values, and the small
  ///        staging and read-back buffers)   \param zero_host zero the host values (the owner
  ///        may skip it when it writes every chunk before the first fetch)
  /// Throws `shadowkv::Error` naming the argument before any CUDA call.
  OffloadedValuePool(int num_kv_heads, int head_dim, int chunk_size, index_t num_chunks, int capacity,
                     cudaStream_t stream, cuda::DeviceAllocator& allocator = cuda::default_allocator(),
                     cuda::HostAllocator& host_allocator = cuda::default_host_allocator(), bool zero_host = true)
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), chunk_size_(chunk_size), num_chunks_(num_chunks),
        capacity_(capacity), stream_(stream) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
    SHADOWKV_CHECK(chunk_size > 0 && chunk_size <= cuda::detail::kMaxMissChunkSize, "chunk_size=", chunk_size,
                   " must be in [1, ", cuda::detail::kMaxMissChunkSize, "]");
    SHADOWKV_CHECK(num_chunks >= 0 && num_chunks <= INT32_MAX, "num_chunks=", num_chunks, " must be in [0, 2^31)");
    SHADOWKV_CHECK(capacity >= 1 && capacity <= cuda::kMaxSlotCapacity, "capacity=", capacity, " must be in [1, ",
                   cuda::kMaxSlotCapacity, "]");
    const std::size_t heads = static_cast<std::size_t>(num_kv_heads);
    const std::size_t chunks = static_cast<std::size_t>(num_chunks);
    const std::size_t slots = static_cast<std::size_t>(capacity);

    host_ = cuda::PinnedBuffer<T>(heads * chunks * chunk_elems(), host_allocator);
    if (zero_host && host_.size()) std::memset(static_cast<void*>(host_.data()), 0, host_.size() * sizeof(T));
    device_host_ = host_.device_data();
    slots_ = cuda::DeviceBuffer<T>(heads * slots * chunk_elems(), stream, allocator);
    slot_chunk_ = cuda::DeviceBuffer<std::int32_t>(heads * slots, stream, allocator);
    slot_last_used_ = cuda::DeviceBuffer<std::int64_t>(heads * slots, stream, allocator);
    chunk_slot_ = cuda::DeviceBuffer<std::int32_t>(heads * chunks, stream, allocator);
    steps_ = cuda::DeviceBuffer<std::int64_t>(heads, stream, allocator);
    head_tables_ = cuda::DeviceBuffer<cuda::SlotTableSequence>(heads, stream, allocator);
    head_values_ = cuda::DeviceBuffer<cuda::GatherValuesSequence<device_type>>(heads, stream, allocator);
    misses_ = cuda::DeviceBuffer<cuda::ChunkMiss>(static_cast<std::size_t>(max_fetch()), stream, allocator);
    counters_ = cuda::DeviceBuffer<std::int64_t>(4, stream, allocator);
    counts_ = cuda::DeviceBuffer<int>(2, stream, allocator);
    readback_ = cuda::PinnedBuffer<std::int64_t>(5, host_allocator);

    fill(slots_.data(), 0, slots_.bytes());
    fill(slot_chunk_.data(), 0xff, slot_chunk_.bytes());  // -1
    fill(slot_last_used_.data(), 0xff, slot_last_used_.bytes());
    fill(chunk_slot_.data(), 0xff, chunk_slot_.bytes());
    fill(steps_.data(), 0, steps_.bytes());
    fill(counters_.data(), 0, counters_.bytes());
    fill(counts_.data(), 0, counts_.bytes());

    // The per-head views `fetch` launches on: head h as a one-head sequence. Staged in pinned
    // memory that lives as long as the pool, so the copies stay asynchronous.
    staged_tables_ = cuda::PinnedBuffer<cuda::SlotTableSequence>(heads, host_allocator);
    staged_values_ = cuda::PinnedBuffer<cuda::GatherValuesSequence<device_type>>(heads, host_allocator);
    const cuda::SlotTableSequence all = descriptor();
    const cuda::GatherValuesSequence<device_type> all_values = value_descriptor();
    for (int h = 0; h < num_kv_heads; ++h) {
      const std::size_t table_offset = static_cast<std::size_t>(h) * chunks;
      const std::size_t slot_offset = static_cast<std::size_t>(h) * slots;
      cuda::SlotTableSequence t;
      t.slot_chunk = all.slot_chunk + slot_offset;
      t.slot_last_used = all.slot_last_used + slot_offset;
      t.chunk_slot = chunks ? all.chunk_slot + table_offset : nullptr;
      t.steps = all.steps + h;
      t.num_chunks = num_chunks;
      t.capacity = capacity;
      staged_tables_.data()[h] = t;
      cuda::GatherValuesSequence<device_type> v;
      v.host_values = chunks ? all_values.host_values + table_offset * chunk_elems() : nullptr;
      v.value_slots = all_values.value_slots + slot_offset * chunk_elems();
      v.num_chunks = num_chunks;
      v.capacity = capacity;
      staged_values_.data()[h] = v;
    }
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(head_tables_.data(), staged_tables_.data(), head_tables_.bytes(),
                                        cudaMemcpyHostToDevice, stream));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(head_values_.data(), staged_values_.data(), head_values_.bytes(),
                                        cudaMemcpyHostToDevice, stream));
  }

  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int chunk_size() const { return chunk_size_; }
  index_t num_chunks() const { return num_chunks_; }
  int capacity() const { return capacity_; }
  /// The stream the buffers were allocated and initialised on (the default of `stats`).
  cudaStream_t stream() const { return stream_; }

  /// Host values `[H_kv, num_chunks, c, d]` (pinned, zero-initialised), for the caller to
  /// write. A fetch's value gather reads them when it runs on the GPU, so a write must not
  /// race with a fetch in flight (write before enqueuing it, or after synchronising). Unlike
  /// the CPU pool's `store`, writing here does not drop a resident copy of the chunk: write
  /// chunks before they are first fetched.
  T* host_data() const { return host_.data(); }
  /// The same memory as kernels address it (for a kernel that writes the values, and for the
  /// value gather).
  T* device_host_data() const { return device_host_; }
  /// Device value slots `[H_kv, capacity, c, d]` (zero-initialised).
  T* slots_data() const { return slots_.data(); }

  /// The whole pool's slot table, for batched `update_slot_tables` launches (one entry per
  /// sequence; the pool's layer and sequence are the caller's to index).
  cuda::SlotTableSequence descriptor() const {
    cuda::SlotTableSequence d;
    d.slot_chunk = slot_chunk_.data();
    d.slot_last_used = slot_last_used_.data();
    d.chunk_slot = chunk_slot_.data();
    d.steps = steps_.data();
    d.num_chunks = num_chunks_;
    d.capacity = capacity_;
    return d;
  }
  /// The whole pool's values, for batched `gather_values` launches.
  cuda::GatherValuesSequence<device_type> value_descriptor() const {
    cuda::GatherValuesSequence<device_type> d;
    d.host_values = cuda::as_device(device_host_);
    d.value_slots = cuda::as_device(slots_.data());
    d.num_chunks = num_chunks_;
    d.capacity = capacity_;
    return d;
  }

  /// Makes `chunks` (device int32 `[k]`: distinct landmark indices of `kv_head`, any order,
  /// optionally followed by -1 padding; 1 <= k <= min(capacity, kMaxSlotTableK)) resident,
  /// as `OffloadedValuePool<CpuBackend, T>::fetch` does: writes the slot of `chunks[i]` to
  /// `slots[i]` (device `[k]`, -1 for padding) and copies the missed chunks' values from the
  /// host into their slots. Asynchronous on `stream`; the pool's own device scratch holds the
  /// miss list between the two launches.
  ///
  /// Throws `shadowkv::Error` naming the argument (kv_head out of range, sizes that differ or
  /// are outside [1, min(capacity, kMaxSlotTableK)], a null pointer) before any CUDA call.
  /// A selection that breaks the contract on the device (an index out of range, one twice)
  /// changes nothing, writes -1 slots and is counted by `invalid_fetches`.
  void fetch(int kv_head, std::span<const std::int32_t> chunks, std::span<std::int32_t> slots,
             cudaStream_t stream) {
    SHADOWKV_CHECK(kv_head >= 0 && kv_head < num_kv_heads_, "kv_head=", kv_head, " out of range [0, ",
                   num_kv_heads_, ")");
    SHADOWKV_CHECK(slots.size() == chunks.size(), "slots has ", slots.size(), " entries, expected one per chunk (",
                   chunks.size(), ")");
    SHADOWKV_CHECK(!chunks.empty() && chunks.size() <= static_cast<std::size_t>(max_fetch()), "selection of ",
                   chunks.size(), " chunks must be in [1, min(capacity=", capacity_, ", ", cuda::kMaxSlotTableK,
                   ")]");
    SHADOWKV_CHECK(chunks.data() != nullptr, "chunks must be non-null");
    SHADOWKV_CHECK(slots.data() != nullptr, "slots must be non-null");
    const int k = static_cast<int>(chunks.size());

    cuda::SlotTableParams p;
    p.sequences = head_tables_.data() + kv_head;
    p.batch = 1;
    p.num_kv_heads = 1;
    p.selected = chunks.data();
    p.k = k;
    p.slots = slots.data();
    p.misses = misses_.data();
    p.misses_capacity = k;
    p.num_misses = counts_.data();
    p.counters = counters_.data();
    p.maybe_num_invalid = counts_.data() + 1;
    cuda::check_slot_table_params(p);

    cuda::GatherValuesParams<device_type> g;
    g.sequences = head_values_.data() + kv_head;
    g.num_sequences = 1;
    g.misses = misses_.data();
    g.num_misses = k;
    g.maybe_num_misses = counts_.data();
    g.num_kv_heads = 1;
    g.head_dim = head_dim_;
    g.chunk_size = chunk_size_;
    g.maybe_num_invalid = counts_.data() + 1;
    cuda::check_gather_values_params(g);

    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(counts_.data(), 0, sizeof(int), stream));
    cuda::update_slot_tables(p, stream);
    cuda::gather_values(g, stream);
  }

  /// Hit/miss counts of every fetch so far (`bytes_copied`: misses times the bytes of a
  /// chunk). Reads the device counters back: synchronises `stream` (give the one the fetches
  /// ran on, or one ordered after them).
  PoolStats stats(cudaStream_t stream) const {
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(readback_.data(), counters_.data(), counters_.bytes(),
                                        cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    PoolStats s;
    s.requested = readback_.data()[0];
    s.hits = readback_.data()[1];
    s.misses = readback_.data()[2];
    s.bytes_copied = s.misses * static_cast<std::int64_t>(chunk_elems() * sizeof(T));
    return s;
  }
  /// `stats(stream())`.
  PoolStats stats() const { return stats(stream_); }
  /// Zeroes the counters, ordered on `stream`.
  void reset_stats(cudaStream_t stream) { SHADOWKV_CUDA_CHECK(cudaMemsetAsync(counters_.data(), 0, counters_.bytes(), stream)); }
  void reset_stats() { reset_stats(stream_); }

  /// Fetches skipped for invalid device data (and value copies skipped, which valid tables
  /// never cause) so far. Synchronises `stream`, as `stats`.
  std::int64_t invalid_fetches(cudaStream_t stream) const {
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(readback_.data() + 4, counts_.data() + 1, sizeof(int), cudaMemcpyDeviceToHost,
                                        stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    int n = 0;
    std::memcpy(&n, readback_.data() + 4, sizeof(int));
    return n;
  }

  /// Device side, as the CPU pool and the memory planner count it: value slots, slot_chunk
  /// (4 B per slot), slot_last_used (8 B per slot), chunk_slot (4 B per chunk). The step
  /// counters (8 B per head), the per-head descriptors and the fetch scratch (a miss list of
  /// min(capacity, 4096) entries and a few counters) are not counted.
  std::size_t device_bytes() const {
    return slots_.bytes() + slot_chunk_.bytes() + slot_last_used_.bytes() + chunk_slot_.bytes();
  }
  /// Host side (pinned): the values.
  std::size_t host_bytes() const { return host_.size() * sizeof(T); }

 private:
  std::size_t chunk_elems() const { return static_cast<std::size_t>(chunk_size_) * head_dim_; }
  /// The largest selection `fetch` takes.
  int max_fetch() const { return std::min(capacity_, cuda::kMaxSlotTableK); }
  void fill(void* ptr, int byte, std::size_t bytes) {
    if (bytes) SHADOWKV_CUDA_CHECK(cudaMemsetAsync(ptr, byte, bytes, stream_));
  }

  int num_kv_heads_, head_dim_, chunk_size_;
  index_t num_chunks_;
  int capacity_;
  cudaStream_t stream_;
  cuda::PinnedBuffer<T> host_;                        // [H_kv, num_chunks, c, d]
  T* device_host_ = nullptr;                          // host_ as kernels address it
  cuda::DeviceBuffer<T> slots_;                       // [H_kv, capacity, c, d]
  cuda::DeviceBuffer<std::int32_t> slot_chunk_;       // [H_kv, capacity], -1 when free
  cuda::DeviceBuffer<std::int64_t> slot_last_used_;   // [H_kv, capacity], -1 never used
  cuda::DeviceBuffer<std::int32_t> chunk_slot_;       // [H_kv, num_chunks], -1 when not resident
  cuda::DeviceBuffer<std::int64_t> steps_;            // [H_kv]
  cuda::DeviceBuffer<cuda::SlotTableSequence> head_tables_;                 // [H_kv] one-head views
  cuda::DeviceBuffer<cuda::GatherValuesSequence<device_type>> head_values_;  // [H_kv]
  cuda::DeviceBuffer<cuda::ChunkMiss> misses_;        // [min(capacity, 4096)] fetch scratch
  cuda::DeviceBuffer<std::int64_t> counters_;         // requested, hits, misses, heads with misses
  cuda::DeviceBuffer<int> counts_;                    // misses of the current fetch, invalid
  cuda::PinnedBuffer<cuda::SlotTableSequence> staged_tables_;
  cuda::PinnedBuffer<cuda::GatherValuesSequence<device_type>> staged_values_;
  cuda::PinnedBuffer<std::int64_t> readback_;         // counters, then the invalid count
};

}  // namespace shadowkv
