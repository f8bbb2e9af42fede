#pragma once
/// \file cuda/kernels/slot_table.cuh
/// \brief The slot-table update of a decode step on the GPU, for a ragged batch in one launch:
/// each (sequence, KV head) row turns its selected landmark chunks into value/key slots, keeps
/// the chunks already resident (hits), gives the others the least recently used slots that
/// this selection does not need (misses), updates its tables, and appends its misses to the
/// flat `ChunkMiss` list that the key rebuild and the value gather read
/// (kernels/rebuild_keys.cuh, kernels/gather_values.cuh). Host launcher: cuda/slot_table.cuh.
///
/// The result is exactly `OffloadedValuePool<CpuBackend, T>::fetch` on each row: same slots,
/// same victims, same tables.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gather_values.cuh"
#include "grid_dependency.cuh"
#include "selection_record.cuh"

namespace shadowkv::cuda {

/// Where one sequence's slot table lives (device pointers), one per sequence of the batch.
/// The tables of different entries of one launch must not overlap (each row updates its own).
struct SlotTableSequence {
  std::int32_t* slot_chunk = nullptr;      ///< [H_kv, capacity]: landmark chunk in each slot, -1 free
  std::int64_t* slot_last_used = nullptr;  ///< [H_kv, capacity]: step of last use, -1 never
  std::int32_t* chunk_slot = nullptr;      ///< [H_kv, num_chunks]: slot of each chunk, -1 not resident
                                           ///< (may be null when num_chunks == 0)
  std::int64_t* steps = nullptr;           ///< [H_kv]: fetch steps so far
  long long num_chunks = 0;                ///< landmark chunks per head
  int capacity = 0;                        ///< slots per head, 1 ..= kMaxSlotCapacity (cuda/slot_table.cuh)
};

/// Plain parameters of `update_slot_tables` (cuda/slot_table.cuh). Pointers are device addresses.
struct SlotTableParams {
  const SlotTableSequence* sequences = nullptr;  ///< [batch], device
  int batch = 0;
  int num_kv_heads = 0;
  /// [batch, H_kv, k], device: distinct landmark indices, then -1 padding. `select_top_k`
  /// writes them ascending (the fast path); any order of distinct indices is accepted.
  const std::int32_t* selected = nullptr;
  int k = 0;
  std::int32_t* slots = nullptr;           ///< [batch, H_kv, k] out: slot of selected[b,h,i]; -1 where selected is -1
  ChunkMiss* misses = nullptr;             ///< out: one entry {seq=b, kv_head=h, chunk=landmark index, slot} per miss
  int misses_capacity = 0;                 ///< entries of `misses` (batch*H_kv*k always suffices)
  int* num_misses = nullptr;               ///< device counter, the caller zeroes it; entries appended (atomic)
  std::int64_t* counters = nullptr;        ///< optional, device [4]: += requested, hits, misses, (seq, head) pairs with >= 1 miss
  int* maybe_num_invalid = nullptr;        ///< optional: += rows skipped for invalid device data
  /// Optional [batch], device: every row (valid or not) also writes the prompt chunks of its
  /// selected landmarks to `records[b].record`, as `record_selection_kernel` would.
  const SelectionRecordSequence* records = nullptr;
  /// Optional device counter, not `num_misses`: set to 0 by the launch, so that the next
  /// step's update can append to it without a memset in between (a decode step alternates two).
  int* next_num_misses = nullptr;
};

namespace kernels {
namespace slot_table_detail {

/// Threads per CTA (one CTA per row).
inline constexpr int kThreads = 512;
/// Largest selection per row (the dynamic shared memory holds a few arrays of k).
inline constexpr int kMaxK = 4096;
/// Largest capacity per head: the hit bitmap is static shared memory, and a sort key packs
/// the slot into its low 16 bits.
inline constexpr int kMaxCapacity = 65536;
inline constexpr int kRadixBins = 256;  ///< 8-bit digits
/// Up to this many victims are ordered by counting (each key's rank), above by a bitonic sort.
inline constexpr int kRankMax = 512;
/// `steps[h]` must stay below this (a row whose counter does not is invalid).
inline constexpr std::int64_t kMaxSteps = std::int64_t{1} << 62;

__host__ __device__ constexpr int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

/// Dynamic shared memory for selections of `k`: a sort buffer of `pow2_ceil(k)` 64-bit keys,
/// then the selection, the slots and the miss positions (`k` int32 each).
constexpr std::size_t smem_bytes(int k) {
  return static_cast<std::size_t>(pow2_ceil(k)) * 8 + static_cast<std::size_t>(k) * 12;
}

template <int NT>
struct Shared {
  static constexpr int kWarps = NT / 32;
  unsigned hit_bits[kMaxCapacity / 32];  ///< bit s: slot s is a hit of this step
  unsigned hist[kRadixBins];
  std::int64_t warp_min[kWarps], warp_max[kWarps];
  int warp_int[kWarps];
  int bin, below, bin_count;  ///< radix pass result (warp 0 writes, everyone reads)
  int victims_written;        ///< compaction cursor
  int miss_base;              ///< first reserved entry of `misses`
};

/// Exclusive prefix sum of one value per thread over the CTA, in thread order; `total` gets
/// the sum. Ends with a barrier, so `warp_int` may be reused right after.
template <int NT>
__device__ __forceinline__ int block_exclusive_sum(int v, Shared<NT>& s, int& total) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) s.warp_int[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < Shared<NT>::kWarps; ++w) {
    const int x = s.warp_int[w];
    before += w < warp ? x : 0;
    total += x;
  }
  __syncthreads();
  return before + incl - v;
}

/// Minimum, maximum and count over the CTA (every thread gets the results). Ends with a barrier.
template <int NT>
__device__ __forceinline__ void block_min_max_count(std::int64_t& mn, std::int64_t& mx, int& count, Shared<NT>& s) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const std::int64_t a = __shfl_xor_sync(0xffffffffu, mn, o);
    const std::int64_t b = __shfl_xor_sync(0xffffffffu, mx, o);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
    count += __shfl_xor_sync(0xffffffffu, count, o);
  }
  if (lane == 0) {
    s.warp_min[warp] = mn;
    s.warp_max[warp] = mx;
    s.warp_int[warp] = count;
  }
  __syncthreads();
  count = 0;
#pragma unroll
  for (int w = 0; w < Shared<NT>::kWarps; ++w) {
    mn = s.warp_min[w] < mn ? s.warp_min[w] : mn;
    mx = s.warp_max[w] > mx ? s.warp_max[w] : mx;
    count += s.warp_int[w];
  }
  __syncthreads();
}

/// Sorts `keys[0, n)` ascending (`n` a power of two) with a bitonic network; each
/// compare-exchange pair belongs to one thread per stage, a barrier between stages. The caller
/// has made the keys visible (barrier) before; ends with a barrier.
template <int NT>
__device__ __forceinline__ void bitonic_sort(unsigned long long* keys, int n) {
  for (int size = 2; size <= n; size *= 2)
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int t = static_cast<int>(threadIdx.x); t < n / 2; t += NT) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const unsigned long long a = keys[lo], b = keys[hi];
        if ((a > b) == ascending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
}

template <int NT>
__device__ __forceinline__ bool is_hit(const Shared<NT>& s, int slot) {
  return (s.hit_bits[slot >> 5] >> (slot & 31)) & 1u;
}

}  // namespace slot_table_detail

/// Grid `(H_kv, batch)`, `NT` threads (`kThreads`), `smem_bytes(k)` bytes of dynamic shared memory:
/// one CTA per (sequence b, KV head h) row. With `step = steps[h] + 1`:
///  1. the selection is loaded and checked (indices in range, -1 padding only at the end,
///     `n <= capacity` valid entries, no index twice: adjacent comparison when ascending,
///     a bitonic sort of a copy otherwise);
///  2. hits: `chunk_slot[chunk]` (checked against `slot_chunk`) marks the slot in a shared
///     bitmap; a block-wide scan lists the misses in ascending `i`;
///  3. victims, when there are misses: every slot that is neither a hit nor used at `step`
///     gets the unique key `(last_used - min) << bits(capacity - 1) | slot` (its LRU order);
///     an MSB-first radix select (8-bit digits, only the digits the keys span, warp-aggregated
///     shared histograms) finds the `n_miss` smallest, which are compacted and ordered (each
///     key's rank counted up to `kRankMax` victims, a bitonic sort above) so that the j-th
///     miss takes the j-th least recently used slot — (last_used, slot) ascending, as the CPU
///     pool's `nth_element` + `sort`;
///  4. only when every check passed, one atomicAdd on `num_misses` reserves the row's entries
///     (contiguous, in ascending i) and the row commits: tables, slots, misses, counters.
/// A row that fails a check writes -1 slots, changes no table, appends nothing and adds 1 to
/// `*maybe_num_invalid`; no index read from device memory is used before it is checked.
/// A row whose misses do not fit `misses_capacity` is skipped the same way, after its
/// reservation: the reserved entries inside the list are written as `{-1, -1, -1, -1}`
/// (which the miss kernels skip and count) and `*num_misses` may then exceed the capacity.
///
/// Performance: the byte floor is one read of the row's `slot_last_used` (`8 * capacity`
/// bytes; the radix passes re-read it from L1), plus `4 * k` bytes of selection read and of
/// slots written, `8 * n` of table reads and writes and 16 bytes per miss — well under a
/// microsecond of HBM for a whole batch at the usual sizes. The kernel is latency-bound
/// instead: a row is a chain of dependent loads (descriptor, steps, selection, chunk_slot,
/// slot_chunk, ...) and some 25-40 barriers, and the rows run in parallel across SMs.
/// Measured on the H200 (event-timed launches, launch overhead included; H_kv = 8, k = 256,
/// ~70% hits): 16.5 us at capacity 1024 for B = 1 to 8, 33 us at B = 64 (512 rows), 13.8 us
/// at capacity == k (no radix passes), 22.8 us at capacity 4096, 43 us at k = 2048 with
/// capacity 8192, and 220 us at capacity 65536 (B = 8), where the passes over the slots of a
/// row dominate. 512 threads beat 256 and 128 except at B = 64 with small capacities.
template <int NT>
__global__ void __launch_bounds__(NT) update_slot_tables_kernel(const SlotTableParams p) {
  using namespace slot_table_detail;
  static_assert(NT % 32 == 0 && NT >= 32 && NT <= 1024, "whole warps");
  extern __shared__ unsigned long long s_slot_table_dyn[];
  __shared__ Shared<NT> s;
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31;
  const int h = static_cast<int>(blockIdx.x), b = static_cast<int>(blockIdx.y);
  const int k = p.k;
  const long long row = static_cast<long long>(b) * p.num_kv_heads + h;
  const std::int32_t* sel_row = p.selected + row * k;
  std::int32_t* out = p.slots + row * k;
  // Launched with a programmatic dependency where the device allows (cuda/launch.cuh): the
  // selection comes from the kernel before. The miss path after it may take SMs as this grid's
  // CTAs retire (one wave: a CTA per (sequence, head)).
  wait_for_previous_grids();
  allow_next_grid();
  if (p.records) write_selection_record(p.records[b], sel_row, k, h, tid, NT, static_cast<std::int32_t*>(nullptr));
  if (p.next_num_misses && h == 0 && b == 0 && tid == 0) *p.next_num_misses = 0;

  unsigned long long* s_sort = s_slot_table_dyn;                              // [pow2_ceil(k)]
  int* s_sel = reinterpret_cast<int*>(s_slot_table_dyn + pow2_ceil(k));  // [k] selected chunks
  int* s_slot = s_sel + k;                                          // [k] slot of each, -1 none yet
  int* s_miss = s_slot + k;                                         // [n_miss] i of the j-th miss

  // Every exit below is taken by the whole CTA: its condition comes from the descriptor or a
  // block-wide vote.
  auto skip_row = [&] {
    for (int i = tid; i < k; i += NT) out[i] = -1;
    if (tid == 0 && p.maybe_num_invalid) atomicAdd(p.maybe_num_invalid, 1);
  };

  const SlotTableSequence seq = p.sequences[b];
  if (!seq.slot_chunk || !seq.slot_last_used || !seq.steps || (!seq.chunk_slot && seq.num_chunks > 0) ||
      seq.capacity < 1 || seq.capacity > kMaxCapacity || seq.num_chunks < 0) {
    skip_row();
    return;
  }
  const int capacity = seq.capacity;
  const long long num_chunks = seq.num_chunks;
  std::int32_t* slot_chunk = seq.slot_chunk + static_cast<long long>(h) * capacity;
  std::int64_t* last_used = seq.slot_last_used + static_cast<long long>(h) * capacity;
  std::int32_t* chunk_slot = num_chunks > 0 ? seq.chunk_slot + static_cast<long long>(h) * num_chunks : nullptr;
  const std::int64_t prev_step = seq.steps[h];
  if (prev_step < 0 || prev_step >= kMaxSteps) {
    skip_row();
    return;
  }
  const std::int64_t step = prev_step + 1;

  // 1. The selection: in range, padding only at the end, n valid entries.
  const int words = (capacity + 31) / 32;
  for (int w = tid; w < words; w += NT) s.hit_bits[w] = 0u;
  if (tid == 0) s.victims_written = 0;
  bool bad = false;
  int valid = 0;
  for (int i = tid; i < k; i += NT) {
    const int c = sel_row[i];
    s_sel[i] = c;
    if (c < -1 || c >= num_chunks) bad = true;
    if (c != -1 && i > 0 && sel_row[i - 1] == -1) bad = true;
    valid += c != -1;
  }
  int n = 0;
  (void)block_exclusive_sum(valid, s, n);
  if (__syncthreads_or(bad) || n > capacity) {
    skip_row();
    return;
  }
  // No index twice: ascending rows (select_top_k's) need one comparison per entry; other
  // orders sort a copy.
  bool unsorted = false;
  for (int i = tid + 1; i < n; i += NT) unsorted |= s_sel[i] <= s_sel[i - 1];
  if (__syncthreads_or(unsorted)) {
    const int n_pow2 = pow2_ceil(n);
    for (int i = tid; i < n_pow2; i += NT)
      s_sort[i] = i < n ? static_cast<unsigned long long>(static_cast<unsigned>(s_sel[i])) : ~0ull;
    __syncthreads();
    bitonic_sort<NT>(s_sort, n_pow2);
    bool twice = false;
    for (int i = tid + 1; i < n; i += NT) twice |= s_sort[i] == s_sort[i - 1];
    if (__syncthreads_or(twice)) {
      skip_row();
      return;
    }
  }

  // 2. Hits, and the misses in ascending i: thread t owns entries [t * per, (t + 1) * per).
  const int per = (k + NT - 1) / NT;
  const int first = tid * per < k ? tid * per : k, last = first + per < k ? first + per : k;
  int my_misses = 0;
  for (int i = first; i < last; ++i) {
    int slot = -1;
    if (i < n) {
      const int c = s_sel[i];
      slot = chunk_slot[c];
      if (slot != -1) {
        if (slot < 0 || slot >= capacity || slot_chunk[slot] != c) {
          bad = true;
          slot = -2;  // neither a hit nor a miss: the row is skipped below
        } else {
          atomicOr(&s.hit_bits[slot >> 5], 1u << (slot & 31));
        }
      } else {
        ++my_misses;
      }
    }
    s_slot[i] = slot;
  }
  int n_miss = 0;
  int rank = block_exclusive_sum(my_misses, s, n_miss);
  for (int i = first; i < last; ++i)
    if (i < n && s_slot[i] == -1) s_miss[rank++] = i;  // this thread's own s_slot entries
  if (__syncthreads_or(bad)) {
    skip_row();
    return;
  }

  // 3. Victims: the n_miss least recently used slots among those neither hit nor used at step.
  if (n_miss > 0) {
    std::int64_t mn = INT64_MAX, mx = INT64_MIN;
    int candidates = 0;
    for (int slot = tid; slot < capacity; slot += NT) {
      if (is_hit(s, slot)) continue;
      const std::int64_t lu = last_used[slot];
      if (lu == step) continue;
      mn = lu < mn ? lu : mn;
      mx = lu > mx ? lu : mx;
      ++candidates;
    }
    block_min_max_count(mn, mx, candidates, s);
    // Unique keys: the slot in the low `slot_bits`, the age above (it must fit: only tables
    // with last-use steps 2^48 apart fail this).
    const int slot_bits = capacity > 1 ? 32 - __clz(capacity - 1) : 0;
    const unsigned long long range = static_cast<unsigned long long>(mx) - static_cast<unsigned long long>(mn);
    if (candidates < n_miss || (slot_bits > 0 && (range >> (64 - slot_bits)) != 0)) {
      skip_row();
      return;
    }
    const unsigned long long slot_mask = (1ull << slot_bits) - 1;
    // The key of `slot`, or false when it is no candidate.
    auto key_of = [&](int slot, unsigned long long& key) {
      if (slot >= capacity || is_hit(s, slot)) return false;
      const std::int64_t lu = last_used[slot];
      if (lu == step) return false;
      key = ((static_cast<unsigned long long>(lu) - static_cast<unsigned long long>(mn)) << slot_bits) |
            static_cast<unsigned long long>(slot);
      return true;
    };

    // Radix select: after a pass, keys whose processed digits are below `prefix` are victims
    // for sure, and `remaining` more are needed among those equal to it. Keys are unique, so
    // the loop ends at the last digit at the latest, with the victims exactly the keys whose
    // processed digits are <= prefix.
    unsigned long long prefix = 0ull, mask = 0ull;
    if (candidates > n_miss) {
      const unsigned long long max_key = (range << slot_bits) | slot_mask;  // >= 1: two candidates at least
      const int bits = 64 - __clzll(static_cast<long long>(max_key));
      int remaining = n_miss;
      for (int shift = (bits - 1) / 8 * 8;; shift -= 8) {
        for (int i = tid; i < kRadixBins; i += NT) s.hist[i] = 0u;
        __syncthreads();
        for (int base = 0; base < capacity; base += NT) {  // warp-uniform trip count
          unsigned long long key = 0ull;
          int bin = kRadixBins;  // none
          if (key_of(base + tid, key) && (key & mask) == prefix) bin = static_cast<int>((key >> shift) & 0xffu);
          const unsigned peers = __match_any_sync(0xffffffffu, bin);
          if (bin < kRadixBins && lane == __ffs(peers) - 1) atomicAdd(&s.hist[bin], static_cast<unsigned>(__popc(peers)));
        }
        __syncthreads();
        if (tid < 32) {
          // Lane l owns bins 8l..8l+7; an inclusive scan over lanes counts from the lowest.
          unsigned c[8], total = 0u;
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            c[q] = s.hist[8 * lane + q];
            total += c[q];
          }
          unsigned incl = total;
#pragma unroll
          for (int o = 1; o < 32; o *= 2) {
            const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
          }
          const unsigned excl = incl - total, need = static_cast<unsigned>(remaining);
          if (excl < need && need <= incl) {
            unsigned cum = excl;
#pragma unroll
            for (int q = 0; q < 8; ++q) {
              if (cum + c[q] >= need) {
                s.bin = 8 * lane + q;
                s.below = static_cast<int>(cum);
                s.bin_count = static_cast<int>(c[q]);
                break;
              }
              cum += c[q];
            }
          }
        }
        __syncthreads();
        prefix |= static_cast<unsigned long long>(s.bin) << shift;
        mask |= 0xffull << shift;
        remaining -= s.below;
        if (s.bin_count == remaining || shift == 0) break;  // the bin's keys are exactly the rest
      }
    }

    // Compact the victims' keys (any order), then sort them: the j-th is the j-th LRU slot.
    for (int base = 0; base < capacity; base += NT) {
      unsigned long long key = 0ull;
      const bool take = key_of(base + tid, key) && (key & mask) <= prefix;
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (ballot == 0u) continue;
      int pos = 0;
      if (lane == 0) pos = atomicAdd(&s.victims_written, __popc(ballot));
      pos = __shfl_sync(0xffffffffu, pos, 0) + __popc(ballot & ((1u << lane) - 1u));
      if (take && pos < n_miss) s_sort[pos] = key;
    }
    if (n_miss <= kRankMax) {
      // Few victims: each key's rank is the number of smaller ones (broadcast reads, one
      // barrier), cheaper than the ~log2(n)^2/2 barrier stages of a sort.
      __syncthreads();
      int rank_of[(kRankMax + NT - 1) / NT];
#pragma unroll
      for (int u = 0; u < (kRankMax + NT - 1) / NT; ++u) {
        const int j = tid + u * NT;
        if (j >= n_miss) break;
        const unsigned long long key = s_sort[j];
        int r = 0;
        for (int x = 0; x < n_miss; ++x) r += s_sort[x] < key;
        rank_of[u] = r;
      }
#pragma unroll
      for (int u = 0; u < (kRankMax + NT - 1) / NT; ++u) {
        const int j = tid + u * NT;
        if (j >= n_miss) break;
        s_slot[s_miss[rank_of[u]]] = static_cast<int>(s_sort[j] & slot_mask);
      }
    } else {
      const int m_pow2 = pow2_ceil(n_miss);
      for (int i = n_miss + tid; i < m_pow2; i += NT) s_sort[i] = ~0ull;
      __syncthreads();
      bitonic_sort<NT>(s_sort, m_pow2);
      for (int j = tid; j < n_miss; j += NT) s_slot[s_miss[j]] = static_cast<int>(s_sort[j] & slot_mask);
    }
    __syncthreads();
    // The j-th miss takes the j-th least recently used victim. Each victim's old chunk must be
    // in range and map back to it; (old, victim) is kept for the commit.
    for (int j = tid; j < n_miss; j += NT) {
      const int victim = s_slot[s_miss[j]];
      const int old = slot_chunk[victim];
      if (old != -1 && (old < 0 || old >= num_chunks || chunk_slot[old] != victim)) bad = true;
      s_sort[j] = (static_cast<unsigned long long>(static_cast<unsigned>(old)) << 32) | static_cast<unsigned>(victim);
    }
    if (__syncthreads_or(bad)) {
      skip_row();
      return;
    }

    // 4a. Reserve the row's entries of the miss list.
    if (tid == 0) s.miss_base = atomicAdd(p.num_misses, n_miss);
    __syncthreads();
    const int base = s.miss_base;
    if (base < 0 || static_cast<long long>(base) + n_miss > p.misses_capacity) {
      const long long lo = base > 0 ? base : 0;
      const long long hi = static_cast<long long>(base) + n_miss < p.misses_capacity
                               ? static_cast<long long>(base) + n_miss
                               : static_cast<long long>(p.misses_capacity);
      for (long long e = lo + tid; e < hi; e += NT) p.misses[e] = ChunkMiss{-1, -1, -1, -1};
      skip_row();
      return;
    }
  }

  // 4b. Commit. The addresses written are distinct: slots of the selection are distinct (hits
  // map back to their chunk, victims are no hits), an old chunk maps to its victim while a
  // missed chunk mapped to no slot.
  if (tid == 0) seq.steps[h] = step;
  for (int i = tid; i < n; i += NT) last_used[s_slot[i]] = step;
  for (int j = tid; j < n_miss; j += NT) {
    const int c = s_sel[s_miss[j]];
    const unsigned long long e = s_sort[j];
    const int victim = static_cast<int>(e & 0xffffffffull), old = static_cast<int>(e >> 32);
    if (old != -1) chunk_slot[old] = -1;
    slot_chunk[victim] = c;
    chunk_slot[c] = victim;
    p.misses[s.miss_base + j] = ChunkMiss{b, h, c, victim};
  }
  for (int i = tid; i < k; i += NT) out[i] = i < n ? s_slot[i] : -1;
  if (tid == 0 && p.counters) {
    auto* counters = reinterpret_cast<unsigned long long*>(p.counters);
    atomicAdd(counters + 0, static_cast<unsigned long long>(n));
    atomicAdd(counters + 1, static_cast<unsigned long long>(n - n_miss));
    atomicAdd(counters + 2, static_cast<unsigned long long>(n_miss));
    atomicAdd(counters + 3, n_miss > 0 ? 1ull : 0ull);
  }
}

}  // namespace kernels
}  // namespace shadowkv::cuda
