#pragma once
/// \file stats.hpp
/// \brief What both backends report: sequence ids, value-pool hit counts, the bytes a decode
/// step moved, and the bytes a sequence holds.

#include <cstddef>
#include <cstdint>

namespace shadowkv {

/// Hit/miss counts of an `OffloadedValuePool` (or of a whole decode step).
struct PoolStats {
  std::int64_t requested = 0;     ///< chunks asked for
  std::int64_t hits = 0;          ///< already resident: nothing copied
  std::int64_t misses = 0;        ///< copied host -> device
  std::int64_t bytes_copied = 0;  ///< host -> device bytes
  double hit_rate() const { return requested ? static_cast<double>(hits) / requested : 0.0; }
  PoolStats& operator+=(const PoolStats& o) {
    requested += o.requested;
    hits += o.hits;
    misses += o.misses;
    bytes_copied += o.bytes_copied;
    return *this;
  }
  /// The counts between two snapshots.
  friend PoolStats operator-(PoolStats a, const PoolStats& b) {
    a.requested -= b.requested;
    a.hits -= b.hits;
    a.misses -= b.misses;
    a.bytes_copied -= b.bytes_copied;
    return a;
  }
};

/// Identifier of a sequence, chosen by the caller.
using SeqId = std::int64_t;

/// What a decode step (or a run of them) read and moved, as the CUDA backend would:
/// `hbm_bytes` read or written in device memory, `pcie_bytes` copied host -> device.
struct StepStats {
  std::int64_t tokens = 0;  ///< (sequence, layer) pairs decoded
  std::int64_t hbm_bytes = 0;
  std::int64_t pcie_bytes = 0;
  PoolStats pool;  ///< chunk hits and misses (ShadowKV only)
  /// CUDA backend: slot-table rows and miss-list entries a decode step found inconsistent and
  /// skipped (such a (sequence, KV head) attends without its selected chunks); a miss entry
  /// counts once in the key rebuild and once in the value fetch that skip it. Always 0 unless
  /// device memory was overwritten; the CPU backend throws instead.
  std::int64_t skipped = 0;
  StepStats& operator+=(const StepStats& o) {
    tokens += o.tokens;
    hbm_bytes += o.hbm_bytes;
    pcie_bytes += o.pcie_bytes;
    pool += o.pool;
    skipped += o.skipped;
    return *this;
  }
};

/// Bytes one sequence holds now, split as the CUDA backend would place them.
struct MemoryUsage {
  std::size_t device_bytes = 0;  ///< HBM with the CUDA backend
  std::size_t host_bytes = 0;    ///< pinned host memory with the CUDA backend
};

}  // namespace shadowkv
