#pragma once
/// \file cuda/kernels/landmark_build.cuh
/// \brief The prefill-time landmark build: per (KV head, chunk) the mean post-RoPE key and
/// its minimum cosine against the chunk's keys, the split of each head's chunks into outliers
/// (lowest minimum cosine) and landmarks, and the gather of the landmark means. Host side:
/// cuda/landmark_index.cuh (`LandmarkIndex<CudaBackend, T>`, `cuda::chunk_min_cosine`).
///
/// Three launches, all on one stream:
///  1. `chunk_stats_kernel`: a group of lanes per (head, chunk) reads the chunk's keys with
///     16-byte loads, several keys at once, sums each element over the tokens *in token
///     order* (the CPU class's order, so the means equal the CPU's bit for bit), divides by c,
///     writes the mean rounded to T, then takes the cosines from the keys still in registers
///     (c <= 8 for 16-bit d = 128) or re-read from L2.
///  2. `outlier_split_kernel`: one CTA per head; an MSB-first 8-bit radix select over the
///     head's minimum cosines (held in registers up to 16384 chunks) finds the O-th lowest,
///     then one ordered pass (warp ballots and a scan over the warps) writes the outlier ids
///     and the landmark ids, both ascending, ties at the threshold to the lower chunk id as in
///     the CPU class. Unlike `select_top_k` (k <= 4096), any O in [0, num_chunks], no sort.
///  3. `landmark_gather_kernel`: copies the means of the landmark chunks into `[H_kv, M, d]`
///     (skipped when there are no outliers: launch 1 then writes the means in place).
///
/// Measured on the H200 (ncu --clock-control none, gpu__time_duration; H_kv = 8, d = 128,
/// bf16, c = 8, 128K tokens: N = 16384 chunks per head, O = 48): stats 91 us (268 MB of keys
/// read once from HBM: 2.9 TB/s, ~73% of the floor; issue-bound at 70% issue-active), split
/// 22.5 us, gather 19.4 us; the whole build 135 us event-timed (104 us with O = 0, no
/// gather). Slower shapes: d = 96 (12 of 16 lanes busy; 188 us for 201 MB) and c = 1 (a batch
/// of cosines holds one key; 0.9 ms at 131072 chunks per head, where the single-CTA split
/// re-reads 8 tiles).

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../../core/tensor.hpp"
#include "../types.cuh"

namespace shadowkv::cuda {

/// Parameters of `chunk_stats_kernel`. Every pointer is a device address.
template <class D>
struct ChunkStatsParams {
  /// `[num_chunks * chunk_size, H_kv, d]` token-major; `token_stride` elements between tokens.
  const D* keys = nullptr;
  long long token_stride = 0;
  index_t num_chunks = 0;
  int num_kv_heads = 0;
  int chunk_size = 0;
  float* min_cosine = nullptr;  ///< `[H_kv, num_chunks]` output
  D* maybe_means = nullptr;     ///< `[H_kv, num_chunks, d]` output (rounded to D), or null
};

/// Parameters of `outlier_split_kernel`. Every pointer is a device address.
struct OutlierSplitParams {
  const float* min_cosine = nullptr;     ///< `[H_kv, num_chunks]`
  index_t num_chunks = 0;                ///< N, at most INT32_MAX
  index_t num_outliers = 0;              ///< O in [0, N]
  std::int32_t* outlier_ids = nullptr;   ///< `[H_kv, O]` output, ascending per head
  std::int32_t* landmark_ids = nullptr;  ///< `[H_kv, N - O]` output, ascending per head
};

/// Parameters of `landmark_gather_kernel`. Every pointer is a device address.
struct LandmarkGatherParams {
  const void* means = nullptr;                 ///< `[H_kv, num_chunks, d]` of the storage type
  const std::int32_t* landmark_ids = nullptr;  ///< `[H_kv, num_landmarks]`
  void* landmarks = nullptr;                   ///< `[H_kv, num_landmarks, d]` output
  index_t num_chunks = 0;
  index_t num_landmarks = 0;
  int num_kv_heads = 0;
  int row_bytes = 0;  ///< d * sizeof(storage type), a multiple of the copy unit
};

namespace kernels {
namespace landmark_build_detail {

inline constexpr int kStatsThreads = 256;
inline constexpr int kSplitThreads = 1024;
inline constexpr int kSplitItems = 16;  ///< chunks per thread per tile (32 apart)
inline constexpr int kGatherThreads = 256;

constexpr int min_of(int a, int b) { return a < b ? a : b; }
constexpr int pow2_at_most(int x) {
  int p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}
constexpr int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

/// How `chunk_stats_kernel` spreads a (head, chunk) over a warp: `kLanes` lanes (a power of
/// two, 8 to 32) share it, lane `r` owning vectors `r, r + kLanes, ...` of `kVec` elements of
/// every key row (one `VecBytes` load each); a warp holds `kGroups` chunks at once. Lanes past
/// the row's `kVecsPerRow` vectors idle (d = 96: 12 of 16 lanes busy for 16-bit types). The
/// keys are loaded, and their cosines taken, `kBatch` at a time (<= kLanes / 2, <= 8, and at
/// most 32 registers of loaded keys per lane): the `kValues = 2 * kBatch`
/// partial sums of a lane (dot product and squared norm of each key) are summed over the lane
/// bits above kValues, then reduce-scattered over the rest, which leaves lane `r` holding the
/// dot product (r even) or squared norm (r odd) of key `(r % kValues) / 2` of the batch.
/// (Fewer lanes per chunk would issue fewer instructions, but the keys of the chunks in flight
/// then no longer stay in L2 until the second pass: measured 1.9x the HBM reads at 4 lanes.)
template <class D, int HD, int VecBytes>
struct StatsLayout {
  static constexpr int kVec = VecBytes / static_cast<int>(sizeof(D));
  static_assert(kVec >= 1 && VecBytes % sizeof(D) == 0, "vector width");
  static_assert(HD % kVec == 0, "head dim must be a whole number of vectors");
  static constexpr int kVecsPerRow = HD / kVec;
  static constexpr int kLanes = pow2_at_least(kVecsPerRow) < 32 ? pow2_at_least(kVecsPerRow) : 32;
  static_assert(kLanes >= 2, "a batch needs two lanes per key");
  static constexpr int kVecsPerLane = (kVecsPerRow + kLanes - 1) / kLanes;
  static constexpr int kGroups = 32 / kLanes;
  /// Registers holding one key row's share of a lane (a 2-byte vector still takes one).
  static constexpr int kRegsPerRow = kVecsPerLane * (VecBytes < 4 ? 1 : VecBytes / 4);
  static constexpr int kBatch =
      pow2_at_most(min_of(min_of(kLanes / 2, 8), kRegsPerRow >= 32 ? 1 : 32 / kRegsPerRow));
  static constexpr int kValues = 2 * kBatch;
};

template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

/// The `N` elements of type D packed in `w` as floats.
template <class D, int N, class W>
__device__ __forceinline__ void unpack_floats(const W& w, float (&out)[N]) {
  static_assert(sizeof(W) == N * sizeof(D), "word size");
  D e[N];
  memcpy(e, &w, sizeof(W));
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
}

/// Rounds `N` floats to D and stores them at `p` (aligned to their total size), one store.
template <class D, int N>
__device__ __forceinline__ void store_floats(D* p, const float (&in)[N]) {
  using W = typename Word<N * static_cast<int>(sizeof(D))>::type;
  D e[N];
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_float<D>(in[i]);
  W w;
  memcpy(&w, e, sizeof(W));
  *reinterpret_cast<W*>(p) = w;
}

/// Sum over the `Lanes` lanes of an aligned lane group (every lane of the warp calls it).
template <int Lanes>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = Lanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

/// One step of `group_reduce_scatter`: lanes with bit `Half` set keep values [Half, 2 Half)
/// of what is left, the others [0, Half), each adding its partner's copy of the kept half.
/// (Compile-time `Half`, so that every index is a constant and `v` stays in registers.)
template <int Half, int N>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int sub) {
  if constexpr (Half >= 1) {
    const bool upper = (sub & Half) != 0;
#pragma unroll
    for (int k = 0; k < Half; ++k) {
      const float lo = v[k], hi = v[k + Half];
      const float send = upper ? lo : hi;
      const float keep = upper ? hi : lo;
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, Half);
    }
    reduce_scatter_step<Half / 2>(v, sub);
  }
}

/// Butterfly reduce-scatter over an aligned group of `Lanes` lanes (every lane of the warp
/// calls it): on entry each lane holds `Lanes` partial values; on exit lane `sub` (its index in
/// the group) returns the group's sum of value `sub`. Lanes - 1 shuffles in all, where a sum
/// of each value on every lane would take Lanes * log2(Lanes).
template <int Lanes>
__device__ __forceinline__ float group_reduce_scatter(float (&v)[Lanes], int sub) {
  static_assert(Lanes >= 2 && Lanes <= 32 && (Lanes & (Lanes - 1)) == 0, "Lanes must be a power of two in [2, 32]");
  reduce_scatter_step<Lanes / 2>(v, sub);
  return v[0];
}

/// Maps a minimum cosine to an unsigned key of the same order: -0 as +0 (they compare equal
/// in the CPU class, so they tie), NaN above +inf (never an outlier before a number; the
/// stats kernel produces no NaN: like `std::min`, it skips NaN cosines).
__device__ __forceinline__ unsigned order_key(float s) {
  if (s != s) return 0xffffffffu;
  if (s == 0.0f) s = 0.0f;
  const unsigned u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace landmark_build_detail

/// Grid: any number of CTAs of 256 threads (grid-stride over the (head, chunk) items, head
/// fastest, so a warp's groups read neighbouring heads of the same tokens). A group of
/// `kLanes` lanes per item: it sums the chunk's keys per element in token order (float),
/// divides by c (IEEE), writes the mean rounded to D, and takes min over the keys of
/// `dot(key, mean) / max(|key| * |mean|, 1e-30)` from the float mean, skipping NaN as
/// `std::min(lowest, cos)` does. `VecBytes`: 16 when the keys, their row stride and the means
/// are 16-byte aligned, else sizeof(D) (one element per load).
///
/// Performance: the floor is the key bytes, `H_kv * n * d * sizeof(T)`, read once from HBM
/// (the second pass reads registers, or L2 for c > kBatch: a warp's chunks are a few KiB),
/// plus the means written (`H_kv * N * d * sizeof(T)`, 1/c of the keys) and 4 bytes per
/// (head, chunk). Arithmetic: ~3 flops per key element, plus per key two lane reductions
/// (shared by the batch through the reduce-scatter), a sqrt and a division.
template <class D, int HD, int VecBytes>
__global__ void __launch_bounds__(landmark_build_detail::kStatsThreads) chunk_stats_kernel(ChunkStatsParams<D> p) {
  namespace bd = landmark_build_detail;
  using L = bd::StatsLayout<D, HD, VecBytes>;
  constexpr int kWarps = bd::kStatsThreads / 32;
  const int lane = threadIdx.x & 31;
  const int group = lane / L::kLanes, sub = lane % L::kLanes;
  const index_t items = p.num_chunks * p.num_kv_heads;
  const index_t step = static_cast<index_t>(gridDim.x) * kWarps * L::kGroups;
  const float count = static_cast<float>(p.chunk_size);
  // The loop bound is uniform over the warp (every lane takes part in the shuffles); groups
  // past the last item compute on zeros and write nothing.
  for (index_t base = (static_cast<index_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * L::kGroups; base < items;
       base += step) {
    const index_t item = base + group;
    const bool active = item < items;
    const int h = active ? static_cast<int>(item % p.num_kv_heads) : 0;
    const index_t ch = active ? item / p.num_kv_heads : 0;
    const D* chunk = p.keys + ch * p.chunk_size * p.token_stride + static_cast<long long>(h) * HD;

    // Lane `sub`'s vectors of `kBatch` consecutive keys, loaded together (so that a batch's
    // loads are in flight at once); with c <= kBatch the first pass's stay for the second.
    using W = typename bd::Word<VecBytes>::type;
    W rows[L::kBatch][L::kVecsPerLane];
    auto has = [&](int t, int v) { return active && t < p.chunk_size && sub + v * L::kLanes < L::kVecsPerRow; };
    auto load_batch = [&](int t0) {
#pragma unroll
      for (int b = 0; b < L::kBatch; ++b)
#pragma unroll
        for (int v = 0; v < L::kVecsPerLane; ++v)
          if (has(t0 + b, v))
            rows[b][v] = *reinterpret_cast<const W*>(chunk + (t0 + b) * p.token_stride +
                                                    (sub + v * L::kLanes) * L::kVec);
    };

    float mean[L::kVecsPerLane][L::kVec];
#pragma unroll
    for (int v = 0; v < L::kVecsPerLane; ++v)
#pragma unroll
      for (int e = 0; e < L::kVec; ++e) mean[v][e] = 0.0f;
    for (int t0 = 0; t0 < p.chunk_size; t0 += L::kBatch) {
      load_batch(t0);
      // Summed in token order, as the CPU class does: the means come out bit-equal.
#pragma unroll
      for (int b = 0; b < L::kBatch; ++b)
#pragma unroll
        for (int v = 0; v < L::kVecsPerLane; ++v)
          if (has(t0 + b, v)) {
            float x[L::kVec];
            bd::unpack_floats<D, L::kVec>(rows[b][v], x);
#pragma unroll
            for (int e = 0; e < L::kVec; ++e) mean[v][e] += x[e];
          }
    }
    float mean_sq = 0.0f;
#pragma unroll
    for (int v = 0; v < L::kVecsPerLane; ++v) {
      const int j = sub + v * L::kLanes;
#pragma unroll
      for (int e = 0; e < L::kVec; ++e) {
        mean[v][e] = __fdiv_rn(mean[v][e], count);
        mean_sq = fmaf(mean[v][e], mean[v][e], mean_sq);
      }
      if (active && p.maybe_means && j < L::kVecsPerRow)
        bd::store_floats<D, L::kVec>(p.maybe_means + (static_cast<index_t>(h) * p.num_chunks + ch) * HD + j * L::kVec,
                                     mean[v]);
    }
    const float mean_norm = __fsqrt_rn(bd::group_sum<L::kLanes>(mean_sq));

    float lowest = INFINITY;
    for (int t0 = 0; t0 < p.chunk_size; t0 += L::kBatch) {
      if (p.chunk_size > L::kBatch) load_batch(t0);  // again, from L2
      float part[L::kValues];  // dot product and squared norm of each key of the batch
#pragma unroll
      for (int b = 0; b < L::kBatch; ++b) {
        float dot = 0.0f, key_sq = 0.0f;
#pragma unroll
        for (int v = 0; v < L::kVecsPerLane; ++v)
          if (has(t0 + b, v)) {
            float x[L::kVec];
            bd::unpack_floats<D, L::kVec>(rows[b][v], x);
#pragma unroll
            for (int e = 0; e < L::kVec; ++e) {
              dot = fmaf(x[e], mean[v][e], dot);
              key_sq = fmaf(x[e], x[e], key_sq);
            }
          }
        part[2 * b] = dot;
        part[2 * b + 1] = key_sq;
      }
#pragma unroll
      for (int off = L::kValues; off < L::kLanes; off *= 2)
#pragma unroll
        for (int k = 0; k < L::kValues; ++k) part[k] += __shfl_xor_sync(0xffffffffu, part[k], off);
      const int slot = sub % L::kValues;  // this lane's value of the batch after the scatter
      const float mine = bd::group_reduce_scatter<L::kValues>(part, slot);
      const float other = __shfl_xor_sync(0xffffffffu, mine, 1);
      const float dot = (sub & 1) ? other : mine, key_sq = (sub & 1) ? mine : other;
      const float norms = __fmul_rn(__fsqrt_rn(key_sq), mean_norm);
      const float denom = norms < 1e-30f ? 1e-30f : norms;  // std::max(norms, 1e-30f)
      const float cosine = __fdiv_rn(dot, denom);
      // std::min(lowest, cosine) over the keys in order skips NaN; the minimum of the others
      // does not depend on the order.
      float batch_min = t0 + slot / 2 < p.chunk_size && cosine == cosine ? cosine : INFINITY;
#pragma unroll
      for (int off = 1; off < L::kLanes; off *= 2) {
        const float o = __shfl_xor_sync(0xffffffffu, batch_min, off);
        batch_min = o < batch_min ? o : batch_min;
      }
      lowest = batch_min < lowest ? batch_min : lowest;
    }
    if (active && sub == 0) p.min_cosine[static_cast<index_t>(h) * p.num_chunks + ch] = lowest;
  }
}

/// Grid: H_kv CTAs of 1024 threads, one per head. Finds the O-th lowest minimum cosine with
/// an MSB-first 8-bit radix select (four histogram passes over the head's N scores, each
/// narrowing the candidates to one digit), so that the outliers are the chunks below that
/// threshold plus the first ones (by id) equal to it. One more pass writes every chunk's id to
/// its slot: the outliers before chunk i are `below(i) + min(equal(i), O - below_total)`, its
/// landmark slot `i` minus that. The chunks go in tiles of 16384, warp w taking chunks
/// [512 w, 512 (w + 1)) of a tile 32 at a time (coalesced), its counts offset by a scan over
/// the warps and ranked within a step by ballots. The first tile's keys stay in registers
/// across the passes (all of them up to N = 16384: 128K tokens at c = 8); later tiles are
/// re-read.
///
/// Performance: `4 * N` bytes of scores read (from L2, just written by `chunk_stats_kernel`;
/// six times for the chunks past the first tile) and `4 * N` bytes of ids written per head.
// A template only so that the header can be included by several translation units.
template <class Params = OutlierSplitParams>
__global__ void __launch_bounds__(landmark_build_detail::kSplitThreads) outlier_split_kernel(Params p) {
  namespace bd = landmark_build_detail;
  constexpr int kWarps = bd::kSplitThreads / 32;
  constexpr int kSteps = bd::kSplitItems;
  constexpr unsigned kSegment = 32 * kSteps;  // chunks per warp per tile
  constexpr unsigned kTile = kWarps * kSegment;
  __shared__ unsigned hist[256];
  __shared__ unsigned warp_below[kWarps], warp_equal[kWarps];
  __shared__ unsigned tile_below, tile_equal;
  __shared__ unsigned found_digit, found_below;
  const int h = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // N <= INT32_MAX (checked by the launcher), so chunk indices and counts fit in 32 bits, and
  // so does a tile start past N.
  const unsigned n = static_cast<unsigned>(p.num_chunks), num_out = static_cast<unsigned>(p.num_outliers);
  const float* score = p.min_cosine + static_cast<long long>(h) * n;
  const unsigned mine = warp * kSegment + lane;  // this lane's chunk of step 0 of a tile

  // The first tile's keys stay in registers; later tiles' are read where used (past N:
  // 0xffffffff, which no caller counts: they test the index).
  unsigned cached[kSteps];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) cached[k] = mine + 32 * k < n ? bd::order_key(score[mine + 32 * k]) : 0xffffffffu;
  auto key_at = [&](unsigned base, int k) {
    const unsigned c = base + mine + 32 * k;
    return base == 0 ? cached[k] : c < n ? bd::order_key(score[c]) : 0xffffffffu;
  };

  // Radix select: afterwards `threshold` is the O-th lowest key and `take_equal` how many of
  // the keys equal to it are outliers (those of the lowest ids). O = 0: none is taken.
  unsigned threshold = 0, mask = 0, take_equal = 0;
  if (num_out > 0) {
    take_equal = num_out;
    for (int shift = 24; shift >= 0; shift -= 8) {
      if (tid < 256) hist[tid] = 0;
      __syncthreads();
      for (unsigned base = 0; base < n; base += kTile) {  // uniform over the block
#pragma unroll
        for (int k = 0; k < kSteps; ++k) {
          const unsigned key = key_at(base, k);
          const bool candidate = base + mine + 32 * k < n && (key & mask) == threshold;
          const unsigned digit = candidate ? (key >> shift) & 255u : 256u;
          // Neighbouring chunks' cosines often share their top bytes: one atomic for a warp
          // whose lanes all agree, instead of 32 serialised on one address.
          const unsigned first = __shfl_sync(0xffffffffu, digit, 0);
          if (__all_sync(0xffffffffu, digit == first)) {
            if (lane == 0 && first < 256u) atomicAdd(&hist[first], 32u);
          } else if (candidate) {
            atomicAdd(&hist[digit], 1u);
          }
        }
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l scans digits 8l .. 8l+7; exactly one digit holds the take_equal-th key.
        unsigned counts[8], local = 0;
#pragma unroll
        for (int d = 0; d < 8; ++d) local += (counts[d] = hist[lane * 8 + d]);
        unsigned incl = local;
#pragma unroll
        for (int off = 1; off < 32; off *= 2) {
          const unsigned m = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += m;
        }
        unsigned running = incl - local;
#pragma unroll
        for (int d = 0; d < 8; ++d) {
          if (running < take_equal && take_equal <= running + counts[d]) {
            found_digit = static_cast<unsigned>(lane * 8 + d);
            found_below = running;
          }
          running += counts[d];
        }
      }
      __syncthreads();
      threshold |= found_digit << shift;
      mask |= 0xffu << shift;
      take_equal -= found_below;
    }
  }

  std::int32_t* outlier_ids = p.outlier_ids + static_cast<long long>(h) * num_out;
  std::int32_t* landmark_ids = p.landmark_ids + static_cast<long long>(h) * (n - num_out);
  const unsigned lower_lanes = (1u << lane) - 1u;
  unsigned below_done = 0, equal_done = 0;  // over the tiles before this one
  for (unsigned base = 0; base < n; base += kTile) {
    unsigned below = 0, equal = 0;  // this warp's, over its segment
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const unsigned key = key_at(base, k);
      const bool valid = base + mine + 32 * k < n;
      below += __popc(__ballot_sync(0xffffffffu, valid && key < threshold));
      equal += __popc(__ballot_sync(0xffffffffu, valid && key == threshold));
    }
    if (lane == 0) {
      warp_below[warp] = below;
      warp_equal[warp] = equal;
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan over the warps, in place
      const unsigned b = warp_below[lane], e = warp_equal[lane];
      unsigned ib = b, ie = e;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const unsigned mb = __shfl_up_sync(0xffffffffu, ib, off), me = __shfl_up_sync(0xffffffffu, ie, off);
        if (lane >= off) {
          ib += mb;
          ie += me;
        }
      }
      warp_below[lane] = ib - b;
      warp_equal[lane] = ie - e;
      if (lane == 31) {
        tile_below = ib;
        tile_equal = ie;
      }
    }
    __syncthreads();
    unsigned below_before = below_done + warp_below[warp], equal_before = equal_done + warp_equal[warp];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const unsigned key = key_at(base, k);  // later tiles: a second read, from L1
      const unsigned c = base + mine + 32 * k;
      const bool valid = c < n, is_below = valid && key < threshold, is_equal = valid && key == threshold;
      const unsigned below_ballot = __ballot_sync(0xffffffffu, is_below);
      const unsigned equal_ballot = __ballot_sync(0xffffffffu, is_equal);
      if (valid) {
        const unsigned b = below_before + __popc(below_ballot & lower_lanes);
        const unsigned e = equal_before + __popc(equal_ballot & lower_lanes);
        const unsigned outliers_before = b + (e < take_equal ? e : take_equal);
        if (is_below || (is_equal && e < take_equal))
          outlier_ids[outliers_before] = static_cast<std::int32_t>(c);
        else
          landmark_ids[c - outliers_before] = static_cast<std::int32_t>(c);
      }
      below_before += __popc(below_ballot);
      equal_before += __popc(equal_ballot);
    }
    below_done += tile_below;
    equal_done += tile_equal;
    __syncthreads();  // the next tile rewrites warp_below / warp_equal and the totals
  }
}

/// Grid: any number of CTAs of 256 threads, grid-stride over the `U`-sized units of the
/// landmark rows: unit `u` of landmark `(h, m)` comes from the mean of chunk
/// `landmark_ids[h, m]`. `U` is uint4 when both buffers are 16-byte aligned, else 4 bytes.
///
/// Performance: `H_kv * M * d * sizeof(T)` bytes read and written, coalesced, plus the ids.
template <class U>
__global__ void __launch_bounds__(landmark_build_detail::kGatherThreads)
    landmark_gather_kernel(LandmarkGatherParams p) {
  const long long units = p.row_bytes / static_cast<int>(sizeof(U));
  const long long total = p.num_kv_heads * p.num_landmarks * units;
  const U* means = static_cast<const U*>(p.means);
  U* landmarks = static_cast<U*>(p.landmarks);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / units, u = i - row * units;  // row = h * M + m
    const long long h = row / p.num_landmarks;
    const long long chunk = p.landmark_ids[row];
    landmarks[i] = means[(h * p.num_chunks + chunk) * units + u];
  }
}

}  // namespace kernels
}  // namespace shadowkv::cuda
