#pragma once
/// \file cuda/kernels/gather_values.cuh
/// \brief The value half of a decode step's miss path: chunks that were not resident are read
/// straight from mapped pinned host memory (zero-copy, over PCIe) into their device value
/// slots, for a ragged batch, in one launch. Also defines `ChunkMiss`, the entry of the flat
/// miss list that the key rebuild (kernels/rebuild_keys.cuh) reads too.

#include <cuda_runtime.h>

#include <cstdint>

#include "../types.cuh"

namespace shadowkv::cuda {

/// One chunk of one (sequence, KV head) that a decode step selected but that was not resident:
/// its keys are rebuilt and its values fetched into slot `slot` of that head. A flat list of
/// these covers the whole batch; at most one entry may target a given (seq, kv_head, slot).
/// 16 bytes, loaded as one vector.
struct alignas(16) ChunkMiss {
  std::int32_t seq;      ///< index into the per-sequence descriptor array
  std::int32_t kv_head;  ///< in [0, num_kv_heads)
  std::int32_t chunk;    ///< landmark chunk: tokens [chunk * c, (chunk + 1) * c)
  std::int32_t slot;     ///< destination slot, in [0, capacity of the sequence)
};
static_assert(sizeof(ChunkMiss) == 16, "ChunkMiss is loaded as one 16-byte vector");

/// Where one sequence's values live (`D`: float, __nv_bfloat16 or __half).
template <class D>
struct GatherValuesSequence {
  const D* host_values = nullptr;  ///< [H_kv, num_chunks, c, d], mapped pinned host memory
                                   ///< (`PinnedBuffer::device_data()`) or any device address
  D* value_slots = nullptr;        ///< [H_kv, capacity, c, d], device
  long long num_chunks = 0;        ///< chunks per head on the host
  int capacity = 0;                ///< slots per head on the device
};

/// Plain parameters of `gather_values` (cuda/miss_ops.cuh). Pointers are device addresses.
template <class D>
struct GatherValuesParams {
  const GatherValuesSequence<D>* sequences = nullptr;  ///< [num_sequences]
  int num_sequences = 0;
  const ChunkMiss* misses = nullptr;  ///< [num_misses], any order
  /// Entries of `misses` (the grid is sized from it). With `maybe_num_misses`, an upper bound.
  int num_misses = 0;
  /// When non-null, the number of misses to process is read here on the device (a selection
  /// computed on the GPU); counts above `num_misses` are processed up to `num_misses` and the
  /// excess is added to `*maybe_num_invalid`.
  const int* maybe_num_misses = nullptr;
  int num_kv_heads = 0;
  int head_dim = 0;
  int chunk_size = 0;
  /// When non-null, misses with an index out of range (sequence, head, chunk, slot, or a null
  /// pointer of their sequence) are added here; such misses are skipped, never written.
  int* maybe_num_invalid = nullptr;
};

namespace kernels {

/// Warps per CTA of `gather_values_kernel`; one warp copies one chunk.
inline constexpr int kGatherWarps = 8;
/// 16-byte vectors a lane loads before it stores any (memory-level parallelism over PCIe).
inline constexpr int kGatherUnroll = 4;

/// The number of misses a launch processes: `num_misses`, or the device count clamped to
/// [0, num_misses]; the excess is added to `maybe_num_invalid` by the one thread that passes
/// `count_excess`.
__device__ __forceinline__ int miss_list_count(int num_misses, const int* maybe_num_misses,
                                               int* maybe_num_invalid, bool count_excess) {
  if (!maybe_num_misses) return num_misses;
  const int n = __ldcg(maybe_num_misses);  // past L1: written by an earlier kernel
  if (n > num_misses && maybe_num_invalid && count_excess) atomicAdd(maybe_num_invalid, n - num_misses);
  return n < 0 ? 0 : (n > num_misses ? num_misses : n);
}

/// The copies of `gather_values_kernel`, by warp `warp` of `warps` (a grid, or the gather CTAs
/// of `rebuild_keys_kernel`'s combined launch): misses `warp, warp + warps, ...` of the first
/// `n`. `lane` is the thread's lane.
template <class D>
__device__ __forceinline__ void gather_values_warp(const GatherValuesParams<D>& p, int n, int warp, int warps,
                                                   int lane) {
  for (int m = warp; m < n; m += warps) {
    ChunkMiss miss;
    {
      const int4 e = __ldcg(reinterpret_cast<const int4*>(p.misses) + m);
      miss = ChunkMiss{e.x, e.y, e.z, e.w};
    }
    bool valid = miss.seq >= 0 && miss.seq < p.num_sequences && miss.kv_head >= 0 &&
                 miss.kv_head < p.num_kv_heads && miss.chunk >= 0 && miss.slot >= 0;
    GatherValuesSequence<D> seq{};
    if (valid) {
      seq = p.sequences[miss.seq];
      valid = seq.host_values != nullptr && seq.value_slots != nullptr && miss.chunk < seq.num_chunks &&
              miss.slot < seq.capacity;
    }
    if (!valid) {
      if (lane == 0 && p.maybe_num_invalid) atomicAdd(p.maybe_num_invalid, 1);
      continue;
    }
    const long long chunk_elems = static_cast<long long>(p.chunk_size) * p.head_dim;
    const D* src =
        seq.host_values + (static_cast<long long>(miss.kv_head) * seq.num_chunks + miss.chunk) * chunk_elems;
    D* dst = seq.value_slots + (static_cast<long long>(miss.kv_head) * seq.capacity + miss.slot) * chunk_elems;
    const long long bytes = chunk_elems * static_cast<long long>(sizeof(D));
    const bool vectors = bytes % 16 == 0 && (reinterpret_cast<std::uintptr_t>(src) & 15) == 0 &&
                         (reinterpret_cast<std::uintptr_t>(dst) & 15) == 0;
    if (vectors) {
      const uint4* s = reinterpret_cast<const uint4*>(src);
      uint4* d = reinterpret_cast<uint4*>(dst);
      const long long n16 = bytes / 16;
      for (long long base = 0; base < n16; base += 32 * kGatherUnroll) {
        uint4 v[kGatherUnroll];
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u) {
          const long long i = base + u * 32 + lane;
          if (i < n16) v[u] = s[i];
        }
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u) {
          const long long i = base + u * 32 + lane;
          if (i < n16) d[i] = v[u];
        }
      }
    } else {
      for (long long i = lane; i < chunk_elems; i += 32) dst[i] = src[i];
    }
  }
}

/// Grid of at most `ceil(num_misses / kGatherWarps)` CTAs of `kGatherWarps` warps; warp `w` of
/// the grid copies misses `w, w + warps, ...`: the `c * d` elements of host chunk `chunk` of
/// `kv_head` to slot `slot`, as 16-byte vectors (`kGatherUnroll` loads in flight per lane, a 2 KiB chunk
/// in one round) when the chunk's size and both addresses allow, element by element
/// otherwise. Bits are copied unchanged.
///
/// Performance: the floor is PCIe, `num_misses * c * d * sizeof(D)` bytes read from host
/// memory at the zero-copy gather rate (GPU.md: ≈ 51 GB/s for 1–4 KiB chunks, ≈ 36 GB/s at
/// 512 B), e.g. 6400 misses of 2 KiB (c = 8, d = 128, bf16) = 13.1 MB ≈ 257 µs; the same bytes
/// written to HBM and the 16-byte miss entries are noise at 4 TB/s. Warps stay resident while
/// their loads cross PCIe, so a few CTAs per SM keep far more than the ≈ 100–200 KB that the
/// link needs in flight, and leave the SMs to the key rebuild running beside.
template <class D>
__global__ void __launch_bounds__(kGatherWarps * 32)
    gather_values_kernel(const GatherValuesParams<D> p) {
  const int n = miss_list_count(p.num_misses, p.maybe_num_misses, p.maybe_num_invalid,
                                blockIdx.x == 0 && threadIdx.x == 0);
  gather_values_warp(p, n, static_cast<int>(blockIdx.x) * kGatherWarps + static_cast<int>(threadIdx.x >> 5),
                     static_cast<int>(gridDim.x) * kGatherWarps, static_cast<int>(threadIdx.x) & 31);
}

}  // namespace kernels
}  // namespace shadowkv::cuda
