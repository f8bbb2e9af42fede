#pragma once
/// \file memory_plan.hpp
/// \brief The memory planner: bytes on the device and on the host per sequence for a config,
/// a policy and a context, and the largest batch that fits given budgets — so an engine can
/// size its batch before it allocates.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "config.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "policy.hpp"
#include "tensor.hpp"

namespace shadowkv {

/// Bytes of one sequence (all layers).
struct MemoryPlan {
  std::size_t device_bytes = 0;  ///< HBM: low-rank store, landmarks, slots, static set, ...
  std::size_t host_bytes = 0;    ///< pinned host memory: the offloaded values
};

/// Bytes one sequence of `context_length` prompt tokens holds after `generated_tokens`
/// decode steps, over `num_layers` layers, with storage type `dtype`. These are the bytes
/// `SparseAttention::memory(id)` reports for such a sequence (per-step scratch and the
/// transient staged prompt excluded). Throws naming the arguments when the figures do not
/// fit std::size_t.
template <AttentionPolicy P>
MemoryPlan plan_sequence(const Config& cfg, int num_layers, index_t context_length,
                         index_t generated_tokens, DType dtype) {
  cfg.validate();
  SHADOWKV_CHECK(num_layers > 0, "num_layers=", num_layers, " must be positive");
  SHADOWKV_CHECK(context_length >= 1, "context_length=", context_length, " must be positive");
  SHADOWKV_CHECK(generated_tokens >= 0, "generated_tokens=", generated_tokens, " must be >= 0");
  constexpr bool sparse = P::selection != ChunkSelection::all;
  if constexpr (sparse)
    SHADOWKV_CHECK(context_length >= cfg.min_context(), "context_length=", context_length,
                   " is shorter than the static set (", cfg.min_context(), " tokens)");
  const std::size_t s = dtype_size(dtype);
  const std::size_t h = cfg.num_kv_heads, d = cfg.head_dim, c = cfg.chunk_size;
  const std::size_t len = context_length, gen = generated_tokens;
  detail::CheckedSize device, host;  // one layer
  device.add({2, h, gen, d, s});      // generated K and V
  if constexpr (!sparse) {
    device.add({2, h, len, d, s});
  } else {
    const std::size_t chunks = len / c - cfg.local_chunks;  // indexed region
    const std::size_t outliers = cfg.resolved_outlier_chunks();
    const std::size_t landmarks = chunks - outliers;
    // LandmarkIndex: landmarks, landmark chunk ids, outlier chunk ids.
    device.add({h, landmarks, d, s}).add({h, landmarks, 4}).add({h, outliers, 4});
    if constexpr (P::keys == KeyStorage::exact) {
      device.add({2, h, len, d, s});  // the whole prompt, exact
    } else {
      const std::size_t r = cfg.rank, cap = cfg.resolved_value_cache_chunks();
      device.add({chunks, c, r, s}).add({h, r, d, s});            // A and the basis
      device.add({2, h, cap, c, d, s});                           // value and key slots
      device.add({h, cap, 4 + 8}).add({h, landmarks, 4});         // slot table
      device.add({2, h, outliers * c + len - chunks * c, d, s});  // static set
      host.add({h, landmarks, c, d, s});                          // offloaded values
    }
  }
  detail::CheckedSize total_device, total_host;
  total_device.add({device.value(), static_cast<std::size_t>(num_layers)});
  total_host.add({host.value(), static_cast<std::size_t>(num_layers)});
  SHADOWKV_CHECK(!device.overflow() && !host.overflow() && !total_device.overflow() &&
                     !total_host.overflow(),
                 "context_length=", context_length, ", generated_tokens=", generated_tokens,
                 " and num_layers=", num_layers, " need more bytes than std::size_t counts");
  return {total_device.value(), total_host.value()};
}

/// The largest batch of sequences of `per_sequence` bytes that fits `device_budget` and
/// `host_budget` bytes (a sequence that needs no host memory is bounded by the device alone).
inline std::int64_t max_batch(const MemoryPlan& per_sequence, std::size_t device_budget,
                              std::size_t host_budget) {
  std::int64_t b = std::numeric_limits<std::int64_t>::max();
  if (per_sequence.device_bytes > 0)
    b = std::min<std::int64_t>(b, static_cast<std::int64_t>(device_budget / per_sequence.device_bytes));
  if (per_sequence.host_bytes > 0)
    b = std::min<std::int64_t>(b, static_cast<std::int64_t>(host_budget / per_sequence.host_bytes));
  SHADOWKV_CHECK(b != std::numeric_limits<std::int64_t>::max(),
                 "per_sequence needs no memory: the batch is unbounded");
  return b;
}

}  // namespace shadowkv
