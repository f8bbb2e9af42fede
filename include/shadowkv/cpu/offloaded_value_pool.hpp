#pragma once
/// \file offloaded_value_pool.hpp
/// \brief CPU `OffloadedValuePool`: chunk-major values on the host, a set of device slots per
/// KV head, and the slot table that keeps chunks used recently resident.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory_resource>
#include <span>
#include <vector>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/stats.hpp"
#include "../core/tensor.hpp"
#include "eigen_util.hpp"

namespace shadowkv {

/// Values of the landmark chunks of one layer of one sequence. Host storage is chunk-major
/// `[H_kv, num_chunks, c, d]` (chunk `m` of head `h` is landmark `m` of the
/// `LandmarkIndex`); the device holds `capacity` slots of `[c, d]` per head. `fetch` makes a
/// selection resident: chunks already in a slot are hits and stay where they are, misses go
/// to the least recently used slots not needed by this selection. With `capacity` equal to
/// the selection size this is the paper's scheme (a chunk stays only if selected again at the
/// next step); a larger capacity keeps more history.
///
/// The host values come from a `std::pmr::memory_resource` the engine may choose (where the
/// CUDA backend uses pinned memory: e.g. memory it registered with the GPU, huge pages, a
/// NUMA node); the slots and tables, device memory with the CUDA backend, come from the heap.
template <StorageType T>
class OffloadedValuePool<CpuBackend, T> {
 public:
  /// \param num_chunks chunks per head on the host (>= 0)
  /// \param capacity device slots per head (>= 1; must be >= the size of every selection)
  /// \param host_memory where the host values `[H_kv, num_chunks, c, d]` are allocated (not
  ///        null; must outlive the pool). A failed allocation is a `shadowkv::Error`.
  OffloadedValuePool(int num_kv_heads, int head_dim, int chunk_size, index_t num_chunks,
                     int capacity,
                     std::pmr::memory_resource* host_memory = std::pmr::get_default_resource()) try
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), chunk_size_(chunk_size),
        num_chunks_(num_chunks), capacity_(capacity),
        host_(checked(host_memory)) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
    SHADOWKV_CHECK(chunk_size > 0, "chunk_size=", chunk_size, " must be positive");
    SHADOWKV_CHECK(num_chunks >= 0, "num_chunks=", num_chunks, " must be >= 0");
    SHADOWKV_CHECK(capacity >= 1, "capacity=", capacity, " must be positive");
    const std::size_t heads = static_cast<std::size_t>(num_kv_heads);
    detail::CheckedSize elems;
    elems.add({heads, static_cast<std::size_t>(num_chunks), chunk_elems()})
        .add({heads, static_cast<std::size_t>(capacity), chunk_elems()});
    SHADOWKV_CHECK(!elems.overflow(), "num_chunks=", num_chunks, " and capacity=", capacity,
                   " chunks of ", chunk_size, " x ", head_dim,
                   " values per head hold more elements than std::size_t counts");
    host_.assign(heads * num_chunks * chunk_elems(), static_cast<T>(0.0f));
    slots_.assign(heads * capacity * chunk_elems(), static_cast<T>(0.0f));
    slot_chunk_.assign(heads * capacity, -1);
    slot_last_used_.assign(heads * capacity, -1);
    chunk_slot_.assign(heads * num_chunks, -1);
    steps_.assign(heads, 0);
  } SHADOWKV_CATCH_ALLOCATION("in OffloadedValuePool(num_kv_heads=", num_kv_heads, ", head_dim=",
                              head_dim, ", chunk_size=", chunk_size, ", num_chunks=", num_chunks,
                              ", capacity=", capacity, ")")

  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int chunk_size() const { return chunk_size_; }
  index_t num_chunks() const { return num_chunks_; }
  int capacity() const { return capacity_; }
  /// Where the host values live.
  std::pmr::memory_resource* host_memory() const { return host_.get_allocator().resource(); }

  /// Writes host chunk `chunk` of `kv_head` from `values` `[c, d]`. A resident copy of that
  /// chunk is dropped, so the next fetch sees the new values.
  void store(int kv_head, index_t chunk, TensorView<const T, 2> values) {
    check_head(kv_head);
    check_chunk(chunk);
    check_view(values, "values", {Extent{"chunk_size", chunk_size_}, Extent{"head_dim", head_dim_}});
    std::copy_n(values.data, chunk_elems(), host_chunk_mut(kv_head, chunk));
    std::int32_t& s = chunk_slot_[table_index(kv_head, chunk)];
    if (s >= 0) {
      slot_chunk_[slot_index(kv_head, s)] = -1;
      s = -1;
    }
  }

  /// Makes `chunks` (distinct landmark indices of `kv_head`, at most `capacity()`) resident.
  /// Writes the slot of `chunks[i]` to `slots[i]`, and appends to `missed` each `i` whose
  /// chunk was copied from the host (the chunks whose keys a caller must also rebuild).
  /// Throws before changing anything (`missed` included) if an argument is invalid or memory
  /// runs out.
  void fetch(int kv_head, std::span<const std::int32_t> chunks, std::span<std::int32_t> slots,
             std::vector<std::int32_t>& missed) try {
    check_head(kv_head);
    SHADOWKV_CHECK(slots.size() == chunks.size(), "slots has ", slots.size(),
                   " entries, expected one per chunk (", chunks.size(), ")");
    SHADOWKV_CHECK(chunks.size() <= static_cast<std::size_t>(capacity_), "selection of ",
                   chunks.size(), " chunks exceeds capacity=", capacity_);
    validate_selection(chunks);
    // Every allocation comes before the first change.
    std::vector<std::int32_t>& victims = victims_;
    victims.reserve(capacity_);
    victims.clear();
    cpu::reserve_for(missed, missed.size() + chunks.size());
    const std::int64_t step = ++steps_[kv_head];
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      const std::int32_t s = chunk_slot_[table_index(kv_head, chunks[i])];
      slots[i] = s;
      if (s >= 0) slot_last_used_[slot_index(kv_head, s)] = step;
    }
    // Victims: the least recently used slots not touched by this selection.
    for (std::int32_t s = 0; s < capacity_; ++s)
      if (slot_last_used_[slot_index(kv_head, s)] != step) victims.push_back(s);
    const std::size_t first_miss = missed.size();
    for (std::size_t i = 0; i < chunks.size(); ++i)
      if (slots[i] < 0) missed.push_back(static_cast<std::int32_t>(i));
    const std::size_t n_miss = missed.size() - first_miss;
    auto older = [&](std::int32_t a, std::int32_t b) {
      const auto ua = slot_last_used_[slot_index(kv_head, a)];
      const auto ub = slot_last_used_[slot_index(kv_head, b)];
      return ua < ub || (ua == ub && a < b);
    };
    std::nth_element(victims.begin(), victims.begin() + n_miss, victims.end(), older);
    std::sort(victims.begin(), victims.begin() + n_miss, older);
    for (std::size_t j = 0; j < n_miss; ++j) {
      const std::int32_t i = missed[first_miss + j];
      const std::int32_t s = victims[j];
      const std::int32_t old_chunk = slot_chunk_[slot_index(kv_head, s)];
      if (old_chunk >= 0) chunk_slot_[table_index(kv_head, old_chunk)] = -1;
      slot_chunk_[slot_index(kv_head, s)] = chunks[i];
      slot_last_used_[slot_index(kv_head, s)] = step;
      chunk_slot_[table_index(kv_head, chunks[i])] = s;
      std::copy_n(host_chunk(kv_head, chunks[i]), chunk_elems(), slot_mut(kv_head, s));
      slots[i] = s;
    }
    stats_.requested += static_cast<std::int64_t>(chunks.size());
    stats_.misses += static_cast<std::int64_t>(n_miss);
    stats_.hits += static_cast<std::int64_t>(chunks.size() - n_miss);
    stats_.bytes_copied += static_cast<std::int64_t>(n_miss * chunk_elems() * sizeof(T));
  } SHADOWKV_CATCH_ALLOCATION("in OffloadedValuePool::fetch(kv_head=", kv_head, ", ", chunks.size(),
                              " chunks)")

  /// Resident values of a slot: `[c, d]`.
  const T* slot(int kv_head, std::int32_t s) const {
    check_head(kv_head);
    SHADOWKV_CHECK(s >= 0 && s < capacity_, "slot=", s, " out of range [0, capacity=", capacity_, ")");
    return slots_.data() + slot_index(kv_head, s) * chunk_elems();
  }
  /// Host values of a chunk: `[c, d]`.
  const T* host_chunk(int kv_head, index_t chunk) const {
    check_head(kv_head);
    check_chunk(chunk);
    return host_.data() + table_index(kv_head, chunk) * chunk_elems();
  }
  /// Slot holding `chunk`, or -1.
  std::int32_t slot_of(int kv_head, index_t chunk) const {
    check_head(kv_head);
    check_chunk(chunk);
    return chunk_slot_[table_index(kv_head, chunk)];
  }

  const PoolStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

  /// Device side: value slots and the slot table.
  std::size_t device_bytes() const {
    return cpu::bytes_of(slots_) + cpu::bytes_of(slot_chunk_) + cpu::bytes_of(slot_last_used_) +
           cpu::bytes_of(chunk_slot_);
  }
  /// Host side (pinned memory with the CUDA backend): the values.
  std::size_t host_bytes() const { return cpu::bytes_of(host_); }

 private:
  std::size_t chunk_elems() const { return static_cast<std::size_t>(chunk_size_) * head_dim_; }
  std::size_t table_index(int h, index_t chunk) const {
    return static_cast<std::size_t>(h) * num_chunks_ + chunk;
  }
  std::size_t slot_index(int h, std::int32_t s) const {
    return static_cast<std::size_t>(h) * capacity_ + s;
  }
  T* host_chunk_mut(int h, index_t chunk) { return host_.data() + table_index(h, chunk) * chunk_elems(); }
  T* slot_mut(int h, std::int32_t s) { return slots_.data() + slot_index(h, s) * chunk_elems(); }
  static std::pmr::memory_resource* checked(std::pmr::memory_resource* host_memory) {
    SHADOWKV_CHECK(host_memory != nullptr, "host_memory is null");
    return host_memory;
  }
  void check_head(int h) const {
    SHADOWKV_CHECK(h >= 0 && h < num_kv_heads_, "kv_head=", h, " out of range [0, ",
                   num_kv_heads_, ")");
  }
  void check_chunk(index_t c) const {
    SHADOWKV_CHECK(c >= 0 && c < num_chunks_, "chunk=", c, " out of range [0, num_chunks=",
                   num_chunks_, ")");
  }
  /// Every chunk in range and none twice; checked before any state changes.
  void validate_selection(std::span<const std::int32_t> chunks) const {
    for (std::size_t i = 0; i < chunks.size(); ++i)
      SHADOWKV_CHECK(chunks[i] >= 0 && chunks[i] < num_chunks_, "chunks[", i, "]=", chunks[i],
                     " out of range [0, num_chunks=", num_chunks_, ")");
    std::vector<std::int32_t> sorted(chunks.begin(), chunks.end());
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    SHADOWKV_CHECK(dup == sorted.end(), "chunk ", (dup == sorted.end() ? -1 : *dup),
                   " appears twice in the selection");
  }

  int num_kv_heads_, head_dim_, chunk_size_;
  index_t num_chunks_;
  int capacity_;
  std::pmr::vector<T> host_;                  // [H_kv, num_chunks, c, d], from host_memory
  std::vector<T> slots_;                      // [H_kv, capacity, c, d]
  std::vector<std::int32_t> slot_chunk_;      // [H_kv, capacity], -1 when free
  std::vector<std::int64_t> slot_last_used_;  // [H_kv, capacity], fetch step of last use
  std::vector<std::int32_t> chunk_slot_;      // [H_kv, num_chunks], -1 when not resident
  std::vector<std::int64_t> steps_;           // [H_kv]
  std::vector<std::int32_t> victims_;         // fetch's scratch
  PoolStats stats_;
};

}  // namespace shadowkv
