#pragma once
/// \file cuda/kernels/landmark_select.cuh
/// \brief The decode-step landmark kernels of a ragged batch: scoring
/// (`softmax(q · landmarksᵀ · scale)` per query head, max over the `G` query heads of each KV
/// head) and top-k selection per (sequence, KV head). Host launchers: cuda/landmark_ops.cuh.
///
/// Scoring takes two launches. A logits kernel reads every landmark once for all the query
/// heads of its group and writes their logits plus a partial softmax state (max, sum) per tile
/// — `landmark_logits_mma_kernel` on the tensor cores for bf16/fp16 landmarks (the queries
/// rounded to that type), `landmark_logits_kernel` with float FMAs for fp32 ones;
/// `landmark_normalize_kernel` merges the partial states of a row and turns the logits into
/// scores. (The normalisers are global over a row, so the logits must be kept
/// somewhere until they are known; `G` floats per landmark cost far less than a second pass
/// over the landmarks, `d * sizeof(T)` bytes each, and usually stay in L2 between the two
/// launches.)
///
/// Selection, `landmark_top_k_kernel`: one CTA per row, the row's keys cached in shared memory,
/// an MSB-first 8-bit radix select finds the k-th largest key, and one ordered compaction
/// (warp segments in index order) writes the selected indices already ascending, ties
/// resolved to the lower index, so no sort is needed.
///
/// Measured on the H200 before the tensor-core path, i.e. `landmark_logits_kernel` on bf16
/// (ncu --clock-control none, gpu__time_duration; B = 1, H_kv = 8, G = 4,
/// d = 128, bf16, M = 16384, k = 256): logits 16.7 us (33.6 MB of landmarks: 2.0 TB/s, ~50% of
/// HBM; the CTAs are issue/latency-bound at this size), normalize 5.8 us, top-k 13.9 us. At
/// B = 64 (2.1 GB of landmarks) the two scoring launches take 742 us together (event-timed),
/// 2.9 TB/s of landmarks, ~80% of the floor that counts the logits round trip too.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../core/dtype.hpp"
#include "../../device/softmax.hpp"
#include "../types.cuh"
#include "cluster.cuh"
#include "grid_dependency.cuh"
#include "mma_util.cuh"

namespace shadowkv::cuda {

/// Parameters of `score_landmarks` (cuda/landmark_ops.cuh). Every pointer is a device address.
/// Sequence `b` of the batch has `M_b = num_landmarks[b]` landmarks per KV head (`0 <= M_b <=
/// max_landmarks`, any mix); its scores occupy `scores[score_offsets[b] ..
/// score_offsets[b] + H_kv * M_b)`, laid out `[H_kv, M_b]`, which must lie inside
/// `[0, scores_capacity)`. Elements of `scores` outside every sequence's range are not touched.
template <StorageType T>
struct LandmarkScoreParams {
  const float* queries = nullptr;            ///< [batch, H_q, d] post-RoPE queries
  const T* const* landmarks = nullptr;       ///< [batch] pointers, sequence b: [H_kv, M_b, d], 16-byte aligned
  const int* num_landmarks = nullptr;        ///< [batch] M_b
  const long long* score_offsets = nullptr;  ///< [batch] first element of sequence b's scores
  float* scores = nullptr;                   ///< [scores_capacity] output
  long long scores_capacity = 0;             ///< elements of `scores`
  /// `landmark_score_workspace_bytes(...)` bytes, 16-byte aligned; nullptr: the launcher takes
  /// it from its allocator (stream-ordered) for the duration of the call.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  int batch = 0;
  int num_q_heads = 0;   ///< H_q, a multiple of H_kv
  int num_kv_heads = 0;  ///< H_kv
  int head_dim = 0;      ///< d: 64, 96, 128 or 256
  int max_landmarks = 0; ///< bound on every M_b (sizes the grid and the workspace)
  float scale = 1.0f;    ///< logit scale, usually 1/sqrt(d)
};

/// Parameters of `select_top_k` (cuda/landmark_ops.cuh). Every pointer is a device address;
/// `scores`, `num_landmarks`, `score_offsets` are laid out as in `LandmarkScoreParams`.
struct TopKParams {
  const float* scores = nullptr;             ///< [scores_capacity]
  const int* num_landmarks = nullptr;        ///< [batch] M_b
  const long long* score_offsets = nullptr;  ///< [batch]
  long long scores_capacity = 0;
  /// [batch, H_kv, k]: row (b, h) holds the min(k, M_b) landmark indices of the highest scores,
  /// ascending, then -1 up to k. Ties go to the lower index; NaN ranks as -inf, -0 as +0.
  std::int32_t* selected = nullptr;
  int batch = 0;
  int num_kv_heads = 0;
  int k = 0;              ///< 1 ..= kMaxTopK
  int max_landmarks = 0;  ///< bound on every M_b
  /// At most this many CTAs (a thread-block cluster, sm_90 and newer) share one row when the
  /// rows are fewer than the SMs: 1, 2, 4 or 8 (1: one CTA per row).
  int max_ctas_per_row = 8;
};

namespace kernels {
namespace landmark_detail {

inline constexpr int kLogitsThreads = 256;
inline constexpr int kLogitsTileBytes = 32768;  ///< landmark bytes per CTA of the logits kernel
inline constexpr int kMinLogitsTileRows = 32;   ///< smallest tile (fp32, d = 256): sizes the partials
inline constexpr int kNormalizeThreads = 256;
inline constexpr int kNormalizeTile = 512;  ///< landmarks per CTA of the normalize kernel
inline constexpr int kTopKItems = 4;         ///< consecutive keys per thread per step

constexpr int pow2_ceil(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}
constexpr int log2_exact(int x) {
  int l = 0;
  while ((1 << l) < x) ++l;
  return l;
}
constexpr int min_int(int a, int b) { return a < b ? a : b; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

constexpr int pow2_floor(int x) {
  int p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

/// How the logits kernel tiles the landmarks and spreads a row over a warp. A CTA copies
/// `kTileRows` rows (<= 32 KiB) into shared memory with one bulk copy, then `kLanes`
/// consecutive lanes share a row, each holding `kElems` elements of it and of the `GB` query
/// heads (in registers): 8 elements per lane when GB = 8, 16 otherwise, so that the query
/// slices fit in <= 64 registers and the FMAs per lane outnumber the shuffles of the reduction
/// by ~8x or more. Lane `r` of a row owns vectors `r, r + kLanes, ...` of `kVec` elements
/// (16-byte vectors where the split allows): a warp's shared-memory reads are conflict-free.
template <class D, int HD, int GB>
struct LogitsLayout {
  static constexpr int kRowBytes = HD * static_cast<int>(sizeof(D));
  static constexpr int kTileRows = max_int(kMinLogitsTileRows, min_int(256, pow2_floor(kLogitsTileBytes / kRowBytes)));
  static constexpr int kTileBytes = kTileRows * kRowBytes;
  /// Dynamic shared memory: two landmark stages and the staged logits.
  static constexpr int kSmemBytes = 2 * kTileBytes + GB * kTileRows * static_cast<int>(sizeof(float));
  static constexpr int kLanes = pow2_ceil(HD / (GB >= 8 ? 8 : 16));
  static_assert(kLanes <= 32 && HD % kLanes == 0, "head dim does not split over the lanes");
  static constexpr int kElems = HD / kLanes;
  static constexpr int vec_for(int max_vec) {
    int v = max_vec;
    while (kElems % v != 0) v /= 2;
    return v;
  }
  static constexpr int kVec = vec_for(16 / static_cast<int>(sizeof(D)));
  static constexpr int kVecBytes = kVec * static_cast<int>(sizeof(D));
  static_assert(kVecBytes == 4 || kVecBytes == 8 || kVecBytes == 16, "vector width");
  static constexpr int kWords = kVecBytes / 4;
  static constexpr int kVecsPerLane = kElems / kVec;
  static constexpr int kRowsPerPass = kLogitsThreads / kLanes;
  static constexpr int kUnroll = 2;  ///< rows per lane loaded before the FMAs
  static constexpr int kRowsPerStep = kRowsPerPass * kUnroll;
  static_assert(kTileRows % kRowsPerStep == 0, "tile must hold whole steps");
  /// After the reduce-scatter a lane holds `kKeep` consecutive heads' sums; `kDupMask` selects
  /// the lanes holding duplicates (only the one with these bits clear writes).
  static constexpr int kScatterSteps = min_int(log2_exact(GB), log2_exact(kLanes));
  static constexpr int kKeep = GB >> kScatterSteps;
  static constexpr int kDupMask = (kLanes >> kScatterSteps) - 1;
};

inline constexpr int kMmaLogitsWarps = 4;
/// Landmarks per work item of the tensor-core logits kernel, i.e. per partial softmax state.
inline constexpr int kMmaLogitsTileRows = 64;
/// Query heads per work item of the tensor-core logits kernel: the MMA's m16 (G > 16 takes
/// ceil(G / 16) items per tile, each reading the landmarks again).
inline constexpr int kMmaHeads = 16;

/// How `landmark_logits_mma_kernel` (16-bit landmarks) stages landmarks for head dim `HD`.
template <int HD>
struct MmaLogitsShape {
  /// Landmarks per ring stage: the two n8 tiles that one `ldmatrix.x4` per k step feeds.
  static constexpr int kStageRows = 16;
  /// Bytes of one landmark row in shared memory, padded by 16 so that the 8 rows one
  /// `ldmatrix` matrix reads at the same column fall into 8 different 16-byte bank groups
  /// (pitch / 16 is odd for every supported head dim).
  static constexpr int kRowPitch = HD * 2 + 16;
  static constexpr int kStageBytes = kStageRows * kRowPitch;
  /// Stages in each warp's ring; all but one are in flight. d = 128: 2 stages (8.5 KB per warp,
  /// 34 KB per CTA), so that four CTAs (16 warps, the register limit at 117 registers) share an
  /// SM with 4 KB of landmarks in flight per warp, 64 KB per SM. ncu on the H200 (B = 8, 128K
  /// context) showed the kernel issue-bound at 6 stages and two CTAs per SM: 0.47 eligible warps
  /// per scheduler, 66% of DRAM bandwidth; at four CTAs per SM, 3 to 5 stages ran equally fast
  /// (~76-80 us), 2 stages 1-2 us faster (five A/B calls, 2026-11-25/26). Other head dims keep
  /// ~23-26 KB per warp (two CTAs per SM; d = 256: one), not yet re-measured.
  static constexpr int kStages = HD <= 64 ? 10 : HD <= 96 ? 7 : HD <= 128 ? 2 : 3;
  static constexpr int kChunksPerRow = HD * 2 / 16;  ///< 16-byte copies per row
  static constexpr int kChunksPerLane = kStageRows * kChunksPerRow / 32;
  static constexpr int kKSteps = HD / 16;  ///< k16 steps of one stage's logits
  static constexpr int kSmemBytes = kMmaLogitsWarps * kStages * kStageBytes;
  static_assert(HD % 16 == 0 && kStageRows * kChunksPerRow % 32 == 0, "head dim must be a multiple of 16");
  static_assert(kMmaLogitsTileRows % kStageRows == 0 && kMmaLogitsTileRows >= kMinLogitsTileRows,
                "a work item is whole stages, and no smaller than the workspace's partial tiles");
  static_assert(((kRowPitch / 16) & 1) == 1, "the row pitch must be an odd number of 16-byte units");
};

/// One vector of `W` 32-bit words from shared memory.
template <int W>
__device__ __forceinline__ void load_words(const void* src, unsigned (&w)[W]) {
  if constexpr (W == 1) {
    w[0] = *static_cast<const unsigned*>(src);
  } else if constexpr (W == 2) {
    const uint2 v = *static_cast<const uint2*>(src);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    const uint4 v = *static_cast<const uint4*>(src);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

/// A shared-memory stage filled from global memory: on sm_90 by a bulk copy (the copy engine;
/// evict-first in L2, since landmarks are read once per step and should not push the logits
/// out of L2) that completes on an mbarrier, elsewhere by the CTA with 16-byte loads. `bytes`
/// is a multiple of 16 and both addresses are 16-byte aligned.
///
/// `stage_init` (before a __syncthreads) once per barrier; `stage_issue` by any CTA after
/// every thread is done reading the stage; `stage_wait(..., parity)` with the parity of the
/// barrier's use count.
__device__ __forceinline__ void stage_init(unsigned long long* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#else
  (void)bar;
#endif
}

__device__ __forceinline__ void stage_issue(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
    const unsigned bar_addr = static_cast<unsigned>(__cvta_generic_to_shared(bar));
    // The stage was last read through the generic proxy; order that before the async write.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_addr), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
            static_cast<unsigned>(__cvta_generic_to_shared(dst))),
        "l"(src), "r"(bytes), "r"(bar_addr), "l"(policy)
        : "memory");
  }
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
#endif
}

__device__ __forceinline__ void stage_wait(void* dst, const void* src, unsigned bytes, unsigned long long* bar,
                                           unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)dst, (void)src, (void)bytes;
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
  for (unsigned i = threadIdx.x; i < bytes / 16; i += blockDim.x)
    static_cast<uint4*>(dst)[i] = __ldcs(static_cast<const uint4*>(src) + i);
  __syncthreads();
#endif
}

/// `N` consecutive query floats (16-byte aligned when N >= 4), or zeros for a null `src`.
template <int N>
__device__ __forceinline__ void load_query(const float* src, float* dst) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int v = 0; v < N / 4; ++v) {
      const float4 x = src ? reinterpret_cast<const float4*>(src)[v] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      dst[4 * v] = x.x;
      dst[4 * v + 1] = x.y;
      dst[4 * v + 2] = x.z;
      dst[4 * v + 3] = x.w;
    }
  } else {
    static_assert(N == 2, "query slices are 2, 4 or 8 floats");
    const float2 x = src ? *reinterpret_cast<const float2*>(src) : make_float2(0.0f, 0.0f);
    dst[0] = x.x;
    dst[1] = x.y;
  }
}

/// The elements of one 32-bit word of storage type `D` as floats (1 for float, 2 otherwise).
template <class D>
__device__ __forceinline__ void unpack_word(unsigned w, float* out) {
  if constexpr (sizeof(D) == 4) {
    out[0] = __uint_as_float(w);
  } else if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  } else {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

/// Butterfly reduce-scatter of `GB` per-lane partial sums over the `M*2` lanes of a row group
/// (called with M = kLanes / 2): while a lane holds several heads, each step sends half of
/// them to its partner and keeps the other half, so the GB sums take GB - 1 shuffles (not
/// GB * log2(kLanes)); once one value is left, plain xor steps finish it. `off` returns the
/// head index of `v[0]`.
template <int M, int N, int GB>
__device__ __forceinline__ void reduce_scatter(float (&v)[GB], int r, int& off) {
  if constexpr (M > 0) {
    if constexpr (N > 1) {
      constexpr int kHalf = N / 2;
      const bool upper = (r & M) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
      }
      if (upper) off += kHalf;
      reduce_scatter<M / 2, kHalf, GB>(v, r, off);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], M);
      reduce_scatter<M / 2, 1, GB>(v, r, off);
    }
  }
}

/// Launch-time contract on device-resident sizes the host cannot see without a sync. A
/// violation stops the kernel with a trap (the stream then reports an error) instead of
/// reading or writing out of bounds or silently dropping landmarks.
__device__ __forceinline__ void require(bool ok) {
  if (!ok) __trap();
}

__device__ __forceinline__ void check_row(int m, long long off, int num_kv_heads, int max_landmarks,
                                          long long capacity) {
  require(m >= 0 && m <= max_landmarks && off >= 0 &&
          off + static_cast<long long>(num_kv_heads) * m <= capacity);
}

/// Maps a score to an unsigned key whose order is the selection order: NaN as -inf (it ranks
/// last, as in the CPU backend), -0 as +0 (they compare equal there, so they tie).
__device__ __forceinline__ unsigned order_key(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN -> -inf
  if ((u << 1) == 0u) u = 0u;                             // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// Largest group `G` whose row normalisers the fused top-k kernel keeps in shared memory
/// (`select_top_k` with a `TopKNormalize`); larger groups take the separate normalize kernel.
inline constexpr int kMaxFusedGroup = 64;

/// Merges the partial softmax states of query head `j` over the `tiles` tiles of one row
/// (`partials` `[tiles, G]`, stride `group`) across the 32 lanes of a warp: every lane returns
/// the row's (max, sum of exp). Loads go 4 per lane at a time.
__device__ __forceinline__ device::SoftmaxState merge_row_partials(const float2* __restrict__ partials, int tiles,
                                                                    int group, int j, int lane) {
  device::SoftmaxState st = device::empty_softmax_state();
  for (int t = lane; t < tiles; t += 32 * 4) {
    float2 pt[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      pt[u] = t + 32 * u < tiles ? partials[static_cast<long long>(t + 32 * u) * group + j] : make_float2(-INFINITY, 0.0f);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float sa, sb;
      st = device::merge_softmax_state(st, device::SoftmaxState{pt[u].x, pt[u].y}, sa, sb);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const device::SoftmaxState other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.l, o)};
    float sa, sb;
    st = device::merge_softmax_state(st, other, sa, sb);
  }
  return st;
}

/// A row's softmax under one query head as a single offset: with the row's max `m` and sum of
/// exp `l` (natural-log units), the softmax value of logit x is `exp(x - m) / l = 2^(x log2(e)
/// - c)`, `c = (m + ln l) log2(e)`. A landmark's score is then `2^(max_j (x_j log2(e) - c_j))`
/// (`softmax_exponent` folded with fmaxf over j = 0, 1, ..., G-1, then `softmax_score`): one
/// exp2f per landmark, however large G, and no division (2^y increases with y, so this is the
/// max over j of the softmax values). The normalize kernel and the fused top-k kernel both use
/// these expressions, so their scores are bit-identical. Against `exp(x - m) / l` in float, a
/// score moves by the rounding of c and of the exponent (~|c| 2^-24 relative, c ~ 20 at 16K
/// landmarks) and exp2f's 2 ulp: a few 1e-7 to ~1e-6. On the H200 (B = 8 rows of 16K
/// landmarks, G = 4) that took the fused top-k kernel's scoring phase from 9.9 to 7.1 us
/// (%globaltimer stamps in the kernel) and the whole kernel from 21.7 to 18.9 us (ncu), where
/// one expf and one division per (landmark, head) had kept it issue-bound.
inline constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float softmax_offset(float row_max, float row_sum) {
  return (row_max + logf(row_sum)) * kLog2e;
}
__device__ __forceinline__ float softmax_exponent(float x, float offset) { return fmaf(x, kLog2e, -offset); }
__device__ __forceinline__ float softmax_score(float max_exponent) { return exp2f(max_exponent); }

/// Where the scoring workspace keeps what: the partial softmax states `[batch, H_kv,
/// num_tiles, G]` (float2: max, sum of exp), then the logits of query heads 1..G-1 of each
/// group (head 0's go straight into `scores`), sequence b's at `(G - 1) * score_offsets[b]`,
/// laid out `[H_kv, G - 1, M_b]`.
struct LandmarkScoreWorkspace {
  float2* partials = nullptr;
  float* logits = nullptr;
  int tile_rows = kMinLogitsTileRows;  ///< landmarks per partial state (the logits kernel's tile)
  int num_tiles = 0;                   ///< ceil(max_landmarks / tile_rows)
  int group = 1;

  static constexpr std::size_t align(std::size_t n) { return (n + 255) / 256 * 256; }
  /// Sized for the smallest tile, so that the size does not depend on dtype and head dim.
  static std::size_t partial_bytes(int batch, int num_kv_heads, int group, int max_landmarks) {
    const std::size_t tiles =
        (static_cast<std::size_t>(max_landmarks) + kMinLogitsTileRows - 1) / kMinLogitsTileRows;
    return align(static_cast<std::size_t>(batch) * num_kv_heads * tiles * group * sizeof(float2));
  }
  static std::size_t logit_bytes(int group, long long scores_capacity) {
    return align(static_cast<std::size_t>(group - 1) * static_cast<std::size_t>(scores_capacity) * sizeof(float));
  }
};

/// The most CTAs of a top-k cluster (the portable cluster size).
inline constexpr int kMaxClusterCtas = 8;

/// What the fused top-k kernel (`landmark_top_k_kernel<NT, true>`) needs to finish the
/// scoring itself: the logits kernel's workspace and the scores array it writes (which holds
/// head 0's logits on entry and the scores on exit, as after the normalize kernel).
struct TopKNormalize {
  float* scores = nullptr;
  LandmarkScoreWorkspace ws{};
};

}  // namespace landmark_detail

/// The logits kernel for fp32 landmarks (16-bit ones take `landmark_logits_mma_kernel`).
/// Persistent grid (the resident CTA count, or fewer items), 256 threads, `kSmemBytes` of
/// dynamic shared memory. The work items are the tiles of `kTileRows` landmarks (32 KiB; 128 rows for bf16,
/// d = 128) of each (sequence, KV head, block of up to `GB` query heads of its group; GB in
/// {1, 2, 4, 8}: G rounded up to a power of two, or blocks of 8 when G > 8); a CTA takes a
/// contiguous range of them (tiles past a sequence's M_b skipped), so consecutive tiles of a
/// row share its query slices. Two shared-memory stages: the bulk copy of the next tile is in
/// flight while the current one is computed. Each row
/// is read once from shared memory for all GB heads (query slices in registers), the GB dot
/// products of a row are reduced with a butterfly reduce-scatter, and the logits are staged in
/// shared memory; the CTA then writes them (head 0 into `scores`, the others into the
/// workspace) with the tile's max and sum of exp per head.
///
/// Performance: the floor is the landmark bytes, `sum_b H_kv * M_b * d * sizeof(T)` (times
/// ceil(G / 8) when G > 8), at HBM bandwidth (~4 TB/s on the H200); the logits add
/// `sum_b H_q * M_b * 4` bytes written (1/16 of the landmark bytes for bf16, d = 128, G = 4),
/// absorbed by L2 for small batches; queries and partial states are negligible. Arithmetic is
/// `G * d` FMAs per landmark on the CUDA cores (float, as the CPU backend): ~50% of the FMA
/// rate at G = 8 and HBM speed for 16-bit landmarks, so the issue rate, not HBM, is what
/// holds this kernel at 50-70% of the floor (see the figures at the top of the file).
template <class T, int HD, int GB>
__global__ void __launch_bounds__(landmark_detail::kLogitsThreads)
    landmark_logits_kernel(const LandmarkScoreParams<T> p, const landmark_detail::LandmarkScoreWorkspace ws) {
  using namespace landmark_detail;
  using D = device_t<T>;
  using L = LogitsLayout<D, HD, GB>;
  constexpr int kWarps = kLogitsThreads / 32;
  wait_for_previous_grids();  // launched overlapping the kernel before it (landmark_ops.cuh)
  allow_next_grid();          // the normalize or top-k kernel may take SMs as this grid's CTAs retire
  extern __shared__ uint4 s_dyn[];  // [2][kTileRows * kRowBytes] landmark stages, then [GB][kTileRows] logits
  unsigned char* s_stage = reinterpret_cast<unsigned char*>(s_dyn);
  float(*s_logits)[L::kTileRows] = reinterpret_cast<float(*)[L::kTileRows]>(s_stage + 2 * L::kTileBytes);
  __shared__ unsigned long long s_bar[2];

  const int group = ws.group;
  const int head_blocks = (group + GB - 1) / GB;
  const int rows_y = p.num_kv_heads * head_blocks;
  const int items = ws.num_tiles * rows_y * p.batch;  // < 2^31: checked by the launcher

  // Work item w -> (tile, y = h * head_blocks + block, b), tiles of a row consecutive.
  // Each CTA takes a contiguous range of items: consecutive tiles of one row share the query
  // slices (kept in registers) and the row's metadata. A cursor walks the range (one division
  // at the start), skipping the tiles past a row's M_b.
  struct Item {
    int w, tile, y, b, m;  // cursor: item index, its tile / row / sequence, M_b
    int h, head0, n_valid;
    long long off_b;
    const D* src;
  };
  const int w_begin = static_cast<int>(static_cast<long long>(items) * blockIdx.x / gridDim.x);
  const int w_end = static_cast<int>(static_cast<long long>(items) * (blockIdx.x + 1) / gridDim.x);
  auto next_row = [&](Item& it) {
    it.tile = 0;
    if (++it.y == rows_y) {
      it.y = 0;
      ++it.b;
      it.m = it.b < p.batch ? p.num_landmarks[it.b] : 0;
    }
  };
  auto seek = [&](Item& it) {  // to the first valid item at or after the cursor
    while (it.w < w_end) {
      if (it.tile * L::kTileRows < it.m) {
        it.h = it.y / head_blocks;
        it.head0 = (it.y - it.h * head_blocks) * GB;
        it.n_valid = min(L::kTileRows, it.m - it.tile * L::kTileRows);
        it.off_b = p.score_offsets[it.b];
        check_row(it.m, it.off_b, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
        const D* seq = reinterpret_cast<const D*>(p.landmarks[it.b]);
        require(reinterpret_cast<std::uintptr_t>(seq) % 16 == 0);
        it.src = seq + (static_cast<long long>(it.h) * it.m + static_cast<long long>(it.tile) * L::kTileRows) * HD;
        return;
      }
      it.w += ws.num_tiles - it.tile;  // the rest of this row is past M_b
      next_row(it);
    }
  };
  auto first_item = [&] {
    Item it{};
    it.w = w_begin;
    const int rest = w_begin / ws.num_tiles;
    it.tile = w_begin - rest * ws.num_tiles;
    it.b = rest / rows_y;
    it.y = rest - it.b * rows_y;
    it.m = it.b < p.batch ? p.num_landmarks[it.b] : 0;
    seek(it);
    return it;
  };
  auto next_item = [&](Item it) {
    ++it.w;
    if (++it.tile == ws.num_tiles) next_row(it);
    seek(it);
    return it;
  };
  auto valid = [&](const Item& it) { return it.w < w_end; };

  stage_init(&s_bar[0]);
  stage_init(&s_bar[1]);
  __syncthreads();
  Item cur = first_item();
  if (valid(cur)) stage_issue(s_stage, cur.src, static_cast<unsigned>(cur.n_valid * L::kRowBytes), &s_bar[0]);

  const int tid = threadIdx.x;
  const int r = tid % L::kLanes;  // lane within the row group
  const int row_in_pass = tid / L::kLanes;
  const int warp = tid / 32, lane = tid % 32;
  unsigned phase = 0u;  // bit s: parity of stage s's next completion
  float q[GB][L::kElems];
  long long q_row = -1;  // (b * H_kv + h) * G + head0 of the slices in q
  for (int s = 0; valid(cur); s ^= 1) {
    const Item nxt = next_item(cur);
    if (valid(nxt))  // stage s^1 was released by the barrier that ended the previous item
      stage_issue(s_stage + (s ^ 1) * L::kTileBytes, nxt.src, static_cast<unsigned>(nxt.n_valid * L::kRowBytes),
                  &s_bar[s ^ 1]);

    const long long row_id = (static_cast<long long>(cur.b) * p.num_kv_heads + cur.h) * group + cur.head0;
    if (row_id != q_row) {
      q_row = row_id;
#pragma unroll
      for (int j = 0; j < GB; ++j) {
        const bool head_valid = cur.head0 + j < group;
        const float* src = p.queries + (static_cast<long long>(cur.b) * p.num_q_heads +
                                         static_cast<long long>(cur.h) * group + cur.head0 + j) *
                                            HD;
#pragma unroll
        for (int i = 0; i < L::kVecsPerLane; ++i)
          load_query<L::kVec>(head_valid ? src + (r + L::kLanes * i) * L::kVec : nullptr, &q[j][i * L::kVec]);
      }
    }
    unsigned char* tile_smem = s_stage + s * L::kTileBytes;
    stage_wait(tile_smem, cur.src, static_cast<unsigned>(cur.n_valid * L::kRowBytes), &s_bar[s], (phase >> s) & 1u);
    phase ^= 1u << s;

    const D* rows = reinterpret_cast<const D*>(tile_smem);
    for (int base = 0; base < cur.n_valid; base += L::kRowsPerStep) {  // uniform: warps stay converged
      unsigned raw[L::kUnroll][L::kVecsPerLane][L::kWords];
#pragma unroll
      for (int u = 0; u < L::kUnroll; ++u) {
        const int row = base + u * L::kRowsPerPass + row_in_pass;  // < kTileRows: inside the stage
#pragma unroll
        for (int i = 0; i < L::kVecsPerLane; ++i)
          load_words<L::kWords>(rows + row * HD + (r + L::kLanes * i) * L::kVec, raw[u][i]);
      }
#pragma unroll
      for (int u = 0; u < L::kUnroll; ++u) {
        float acc[GB];
#pragma unroll
        for (int j = 0; j < GB; ++j) acc[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < L::kVecsPerLane; ++i)
#pragma unroll
          for (int w = 0; w < L::kWords; ++w) {
            constexpr int kPer = 4 / static_cast<int>(sizeof(D));
            float x[kPer];
            unpack_word<D>(raw[u][i][w], x);
#pragma unroll
            for (int e = 0; e < kPer; ++e)
#pragma unroll
              for (int j = 0; j < GB; ++j) acc[j] = fmaf(q[j][i * L::kVec + w * kPer + e], x[e], acc[j]);
          }
        int head_off = 0;
        reduce_scatter<L::kLanes / 2, GB, GB>(acc, r, head_off);
        const int row = base + u * L::kRowsPerPass + row_in_pass;
        if ((r & L::kDupMask) == 0 && row < cur.n_valid) {
#pragma unroll
          for (int i = 0; i < L::kKeep; ++i) s_logits[head_off + i][row] = acc[i] * p.scale;
        }
      }
    }
    __syncthreads();  // logits staged; stage s fully read

    for (int j = warp; j < GB && cur.head0 + j < group; j += kWarps) {
      const int head = cur.head0 + j;
      float mx = -INFINITY;
      for (int i = lane; i < cur.n_valid; i += 32) mx = fmaxf(mx, s_logits[j][i]);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      float sum = 0.0f;
      if (mx != -INFINITY)
        for (int i = lane; i < cur.n_valid; i += 32) sum += expf(s_logits[j][i] - mx);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      float* dst = head == 0 ? p.scores + cur.off_b + static_cast<long long>(cur.h) * cur.m
                             : ws.logits + (group - 1) * cur.off_b +
                                   (static_cast<long long>(cur.h) * (group - 1) + head - 1) * cur.m;
      dst += static_cast<long long>(cur.tile) * L::kTileRows;
      for (int i = lane; i < cur.n_valid; i += 32) dst[i] = s_logits[j][i];
      if (lane == 0)
        ws.partials[((static_cast<long long>(cur.b) * p.num_kv_heads + cur.h) * ws.num_tiles + cur.tile) * group +
                    head] = make_float2(mx, sum);
    }
    __syncthreads();  // s_logits is rewritten by the next item
    cur = nxt;
  }
}

/// Tensor-core logits kernel for 16-bit landmarks (bf16, fp16): the same outputs as
/// `landmark_logits_kernel` (logits of head 0 into `scores`, of heads 1..G-1 into the
/// workspace, one partial softmax state `(max, sum of exp)` per (query head, tile of
/// `kMmaLogitsTileRows` landmarks)), for the same `landmark_normalize_kernel`.
///
/// Design. Persistent grid (the resident CTA count, or fewer), `kMmaLogitsWarps` independent
/// warps per CTA and no block barrier. A work item is one tile of 64 landmarks of one
/// (sequence, KV head, block of up to 16 query heads); items are numbered tile-fastest, so
/// consecutive items are consecutive tiles of one row, and each warp takes a contiguous range
/// of them (tiles past a sequence's M_b skipped), i.e. mostly one or two rows. The block's
/// query heads, pre-scaled by `scale` and rounded to D, are the 16 rows of the MMA's A operand
/// (rows past G zero), held in registers as A fragments over k = head dim and reloaded only
/// when the row changes. The landmarks stream through each warp's own ring of `kStages`
/// stages of 16 rows (row pitch padded by 16 bytes against bank conflicts) with 16-byte
/// `cp.async` copies, evict-first in L2 so that the logits survive there until the normalise
/// kernel reads them; `kStages - 1` stages are in flight while the warp computes one, and the
/// ring runs on across items and rows (a second cursor walks the same items `kStages - 1`
/// stages ahead, issuing the copies). Rows past M_b are zero-filled and their logits masked.
/// Per stage: the logits of 16 heads x 16 landmarks with `HD / 16` `ldmatrix.x4` (non-
/// transposed: landmark rows are the columns of B) and `HD / 8` `mma.m16n8k16` with fp32
/// accumulators; each lane then holds heads qr (and qr + 8) x landmarks 2qc, 2qc + 1, 8 + 2qc,
/// 9 + 2qc, stores them and folds them into its running (max, sum of exp) per head (`expf`, as
/// the CUDA-core kernel); at the end of an item the 4 lanes of a quad merge their states and
/// one writes the item's partial per head. `cp.async.wait_group` then `__syncwarp` orders a
/// stage's copies before its reads and a slot's reads before its next copies.
///
/// Numerics: the logits are `round_D(q * scale) · landmark` summed in fp32 by the tensor cores,
/// where the CUDA-core kernel takes `(q · landmark) * scale` in float. Rounding the scaled
/// queries to D (at most 2^-8 relative for bf16, 2^-11 for fp16, per element) moves logit m
/// of head j by at most `Delta_jm = sum_i |round_D(q_i s) - q_i s| |k_mi|`, hence a score by a
/// factor within `exp(+-(Delta_jm + max_m Delta_jm))`. Measured with the CPU backend (d = 64-
/// 256, G = 4, unit-variance queries and landmarks, scale 1/sqrt(d)): scores move by up to
/// ~7e-3 relative for bf16 (1.6e-2 with queries of standard deviation 2), ~1e-3 for fp16, a
/// fifth to a third of that bound. On the rounded queries the scores agree with the CPU
/// backend's to float rounding. fp16 also needs `|q * scale| < 65504`.
///
/// Performance: the floor is the landmark bytes, `sum_b H_kv * M_b * d * 2` (times
/// ceil(G / 16) when G > 16), at HBM bandwidth (~4 TB/s on the H200; 67 us for 8 sequences
/// x 8 KV heads x 16K landmarks at d = 128); the logits add `sum_b H_q * M_b * 4` bytes written
/// (1/16 of the landmark bytes at G = 4, d = 128), the partials `8 / 64` bytes per landmark
/// and query head. Per 16 landmarks a warp issues `HD / 16` copies per lane, `HD / 16`
/// `ldmatrix` and `HD / 8` MMAs, 5 `expf` and 2 float2 stores per lane (twice that when G > 8): by
/// count, well under a tenth of an SM's issue slots at HBM speed (not yet profiled), so the
/// kernel should be bound by the bytes in flight (`(kStages - 1) * 16 * HD * 2` bytes per
/// warp, 64 KB per SM at d = 128, where ~30 KB per SM covers the latency at 4 TB/s).
template <class T, int HD>
__global__ void __launch_bounds__(landmark_detail::kMmaLogitsWarps * 32)
    landmark_logits_mma_kernel(const LandmarkScoreParams<T> p, const landmark_detail::LandmarkScoreWorkspace ws) {
  using namespace landmark_detail;
  using namespace mma;
  using D = device_t<T>;
  static_assert(sizeof(D) == 2, "the tensor-core path takes 16-bit landmarks");
  using S = MmaLogitsShape<HD>;
  constexpr int kTile = kMmaLogitsTileRows;
  constexpr int kRows = S::kStageRows;
  constexpr int kStages = S::kStages;
  constexpr int kPitch = S::kRowPitch;
  constexpr int kStageBytes = S::kStageBytes;
  constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(D));
  constexpr unsigned kFull = 0xffffffffu;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async, ldmatrix and bf16 mma need sm_80 or newer
#else
  wait_for_previous_grids();  // launched overlapping the kernel before it (landmark_ops.cuh)
  allow_next_grid();          // the normalize or top-k kernel may take SMs as this grid's CTAs retire
  extern __shared__ uint4 s_ring_raw[];  // [kMmaLogitsWarps][kStages][kRows][kPitch bytes]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qr = lane / 4, qc = lane % 4;
  const int group = ws.group;
  const int head_blocks = (group + kMmaHeads - 1) / kMmaHeads;
  const int rows_y = p.num_kv_heads * head_blocks;
  const int items = ws.num_tiles * rows_y * p.batch;  // < 2^31: checked by the launcher
  const long long warps_total = static_cast<long long>(gridDim.x) * kMmaLogitsWarps;
  const long long global_warp = static_cast<long long>(blockIdx.x) * kMmaLogitsWarps + warp;
  const int w_begin = static_cast<int>(items * global_warp / warps_total);
  const int w_end = static_cast<int>(items * (global_warp + 1) / warps_total);

  // A cursor over this warp's ring stages: item w -> (tile, y = h * head_blocks + block, b),
  // then the item's stages of 16 landmarks. Every field is warp-uniform. Sequence b's M_b,
  // score offset and landmark pointer are read when b changes, not per item (ncu on the H200,
  // B = 8, 128K: those dependent loads drew ~20% of the warps' stall samples when every item
  // re-read them, though the kernel's time barely moved without them).
  struct Cursor {
    int w, tile, y, b, m;   // item index, its tile / row / sequence, M_b
    int h, head0, n_valid;  // KV head, first query head of the block, landmarks of the item
    int sub;                // stage within the item
    long long off_b;        // sequence b's score offset
    const D* seq;           // sequence b's landmarks
    const D* src;           // the item's first landmark row
  };
  auto load_sequence = [&](Cursor& c) {
    c.m = 0;
    if (c.b >= p.batch) return;
    c.m = p.num_landmarks[c.b];
    c.off_b = p.score_offsets[c.b];
    c.seq = reinterpret_cast<const D*>(p.landmarks[c.b]);
    if (c.m > 0) {  // a sequence with items
      check_row(c.m, c.off_b, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
      require(reinterpret_cast<std::uintptr_t>(c.seq) % 16 == 0);
    }
  };
  auto next_row = [&](Cursor& c) {
    c.tile = 0;
    if (++c.y == rows_y) {
      c.y = 0;
      ++c.b;
      load_sequence(c);
    }
  };
  auto seek = [&](Cursor& c) {  // to the first stage of the first valid item at or after c.w
    c.sub = 0;
    while (c.w < w_end) {
      if (c.tile * kTile < c.m) {
        c.h = c.y / head_blocks;
        c.head0 = (c.y - c.h * head_blocks) * kMmaHeads;
        c.n_valid = min(kTile, c.m - c.tile * kTile);
        c.src = c.seq + (static_cast<long long>(c.h) * c.m + static_cast<long long>(c.tile) * kTile) * HD;
        return;
      }
      c.w += ws.num_tiles - c.tile;  // the rest of this row is past M_b
      next_row(c);
    }
  };
  auto advance = [&](Cursor& c) {  // to the next stage
    if (++c.sub * kRows < c.n_valid) return;
    ++c.w;
    if (++c.tile == ws.num_tiles) next_row(c);
    seek(c);
  };
  Cursor cur{};
  cur.w = w_begin;
  {
    const int rest = w_begin / ws.num_tiles;
    cur.tile = w_begin - rest * ws.num_tiles;
    cur.b = rest / rows_y;
    cur.y = rest - cur.b * rows_y;
    load_sequence(cur);
    seek(cur);
  }

  // Issues the copies of stage c into ring slot `slot` (warp-uniform call). Copy `chunk` of a
  // stage (lane + 32 i) is row chunk / kChunksPerRow, bytes 16 (chunk % kChunksPerRow) of it:
  // a stage is one contiguous block, and a warp instruction covers 512 consecutive bytes.
  const uint32_t ring = shared_address(s_ring_raw) + static_cast<uint32_t>(warp * kStages * kStageBytes);
  const uint64_t policy = l2_evict_first_policy();
  auto load_stage = [&](const Cursor& c, int slot) {
    const int row0 = c.sub * kRows;
    const int rows = min(kRows, c.n_valid - row0);  // >= 1
    const D* src = c.src + static_cast<long long>(row0) * HD;
    const uint32_t dst = ring + static_cast<uint32_t>(slot * kStageBytes);
#pragma unroll
    for (int i = 0; i < S::kChunksPerLane; ++i) {
      const int chunk = lane + 32 * i, r = chunk / S::kChunksPerRow, col = chunk % S::kChunksPerRow;
      const bool in = r < rows;  // rows past M_b: 16 zero bytes, nothing read (src is row0)
      cp_async_16(dst + static_cast<uint32_t>(r * kPitch + col * 16), in ? src + chunk * kElemsPerChunk : src,
                  in ? 16 : 0, policy);
    }
  };

  // One commit per prologue slot and per iteration, empty or not, so that "stage t landed" is
  // always "at most kStages - 2 groups pending" at iteration t.
  Cursor prod = cur;
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (prod.w < w_end) {
      load_stage(prod, s);
      advance(prod);
    }
    cp_async_commit();
  }

  // This lane's ldmatrix row addresses within a stage: matrices (landmarks 0-7, dims +0),
  // (0-7, +8), (8-15, +0), (8-15, +8) give b0, b1 of n-tile 0, then b0, b1 of n-tile 1.
  const uint32_t b_lane = static_cast<uint32_t>(((lane / 16) * 8 + lane % 8) * kPitch + ((lane / 8) % 2) * 16);
  // Q as A fragments: qa[kk] covers head dims [16 kk, 16 kk + 16), rows qr and qr + 8 are
  // query heads head0 + row of the current block, zero past it.
  uint32_t qa[S::kKSteps][4];
  int q_y = -1, q_b = -1, block_heads = 0;  // the row whose queries qa holds; its heads (<= 16)
  float* out[2] = {nullptr, nullptr};       // logits of heads head0 + qr (+ 8) of the current item
  float run_m[2] = {-INFINITY, -INFINITY}, run_l[2] = {0.0f, 0.0f};  // this lane's running state
  int slot = 0;  // stage count % kStages
  while (cur.w < w_end) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // every lane's copies of this stage visible; every lane done reading slot - 1
    if (prod.w < w_end) {  // into slot - 1, read last iteration
      load_stage(prod, slot == 0 ? kStages - 1 : slot - 1);
      advance(prod);
    }
    cp_async_commit();

    if (cur.sub == 0) {  // a new item
      if (cur.y != q_y || cur.b != q_b) {
        q_y = cur.y;
        q_b = cur.b;
        block_heads = min(kMmaHeads, group - cur.head0);
        const float* q = p.queries + (static_cast<long long>(cur.b) * p.num_q_heads +
                                      static_cast<long long>(cur.h) * group + cur.head0) *
                                         HD;
        // The rounding of the scaled queries to D happens here (see "Numerics").
        auto pair = [&](int row, int col) {
          const float2 v =
              row < block_heads ? *reinterpret_cast<const float2*>(q + row * HD + col) : make_float2(0.0f, 0.0f);
          return pack_pair<D>(v.x * p.scale, v.y * p.scale);
        };
#pragma unroll
        for (int kk = 0; kk < S::kKSteps; ++kk) {
          const int col = 16 * kk + 2 * qc;
          qa[kk][0] = pair(qr, col);
          qa[kk][1] = pair(qr + 8, col);
          qa[kk][2] = pair(qr, col + 8);
          qa[kk][3] = pair(qr + 8, col + 8);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int head = cur.head0 + qr + 8 * r;
        float* dst = nullptr;
        if (qr + 8 * r < block_heads)
          dst = (head == 0 ? p.scores + cur.off_b + static_cast<long long>(cur.h) * cur.m
                           : ws.logits + (group - 1) * cur.off_b +
                                 (static_cast<long long>(cur.h) * (group - 1) + head - 1) * cur.m) +
                static_cast<long long>(cur.tile) * kTile;
        out[r] = dst;
      }
    }

    // Logits of the stage: acc[j] is n-tile j (landmarks 8j..8j+7); [0], [1] head row qr,
    // [2], [3] head row qr + 8; landmarks 8j + 2qc, +1.
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const uint32_t stage = ring + static_cast<uint32_t>(slot * kStageBytes) + b_lane;
#pragma unroll
    for (int kk = 0; kk < S::kKSteps; ++kk) {
      uint32_t kb[4];
      ldmatrix_x4(kb, stage + kk * 32);
      mma_16816<D>(acc[0], qa[kk], kb[0], kb[1]);
      mma_16816<D>(acc[1], qa[kk], kb[2], kb[3]);
    }

    const int row0 = cur.sub * kRows;                  // first landmark of the stage in the item
    const int valid = min(kRows, cur.n_valid - row0);  // landmarks of the stage inside M_b
    const bool item_end = row0 + kRows >= cur.n_valid;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (r == 1 && block_heads <= 8) break;  // warp-uniform: rows qr + 8 are all past the block
      const bool head_valid = qr + 8 * r < block_heads;
      // v[2n], v[2n + 1]: landmarks c, c + 1 of n-tile n, c = 8n + 2qc, stored as one float2
      // where the pair is whole and the row 8-byte aligned (a quad then writes one 32-byte
      // sector per head and n-tile), else one float at a time.
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = 8 * (i / 2) + 2 * qc + (i % 2) < valid ? acc[i / 2][2 * r + i % 2] : -INFINITY;
      if (head_valid) {
        float* const o = out[r] + row0;
        const bool pairs = (reinterpret_cast<std::uintptr_t>(out[r]) & 7u) == 0u;  // row0 is even
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          const int c = 8 * n + 2 * qc;
          if (pairs && c + 1 < valid) {
            *reinterpret_cast<float2*>(o + c) = make_float2(v[2 * n], v[2 * n + 1]);
          } else {
            if (c < valid) o[c] = v[2 * n];
            if (c + 1 < valid) o[c + 1] = v[2 * n + 1];
          }
        }
      }
      // Running (max, sum of exp) of this lane's landmarks of the item, natural-log units.
      const float m_new = fmaxf(run_m[r], fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])));
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // no (-inf) - (-inf)
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) sum += expf(v[i] - base);
      run_l[r] = run_l[r] * expf(run_m[r] - base) + sum;
      run_m[r] = m_new;
      if (item_end) {  // warp-uniform: merge the quad's states, write the item's partial
        device::SoftmaxState st{run_m[r], run_l[r]};
#pragma unroll
        for (int o = 1; o <= 2; o *= 2) {
          const device::SoftmaxState other{__shfl_xor_sync(kFull, st.m, o), __shfl_xor_sync(kFull, st.l, o)};
          float sa, sb;
          st = device::merge_softmax_state(st, other, sa, sb);
        }
        if (qc == 0 && head_valid)
          ws.partials[((static_cast<long long>(cur.b) * p.num_kv_heads + cur.h) * ws.num_tiles + cur.tile) * group +
                      cur.head0 + qr + 8 * r] = make_float2(st.m, st.l);
        run_m[r] = -INFINITY;
        run_l[r] = 0.0f;
      }
    }
    advance(cur);
    slot = slot + 1 == kStages ? 0 : slot + 1;
  }
  cp_async_wait<0>();  // only empty groups can remain; drain them before the warp exits
#endif
}

/// Grid `(ceil(max_landmarks / 512), H_kv, batch)`, 256 threads, `G` floats of dynamic
/// shared memory. Each CTA merges the partial softmax states of its row (one warp per head),
/// then turns the logits of 512 landmarks into `max_j exp(logit_j - max_j) / sum_j` (as
/// `2^(max_j (logit_j log2(e) - c_j))`, see `softmax_offset`). Loads
/// are issued in batches (2 landmarks x 4 heads per thread) so that a CTA waits for memory a
/// few times, not once per landmark.
///
/// Performance: reads `G * 4` bytes and writes 4 bytes per landmark (`sum_b H_q * M_b * 4 +
/// sum_b H_kv * M_b * 4` in all, from L2 right after the logits kernel for small batches),
/// plus the partial states of the row per CTA (`8 * G` bytes per tile of the logits kernel,
/// from L2): ~1/12 of the logits kernel's bytes for bf16, d = 128, G = 4.
template <class T>
__global__ void __launch_bounds__(landmark_detail::kNormalizeThreads)
    landmark_normalize_kernel(const LandmarkScoreParams<T> p, const landmark_detail::LandmarkScoreWorkspace ws) {
  using namespace landmark_detail;
  constexpr int kWarps = kNormalizeThreads / 32;
  constexpr int kPer = kNormalizeTile / kNormalizeThreads;  // landmarks per thread
  constexpr int kHeads = 4;                                  // heads loaded per batch
  extern __shared__ float s_offset[];                        // [G]: softmax_offset per head
  wait_for_previous_grids();  // launched overlapping the logits kernel (landmark_ops.cuh)
  allow_next_grid();
  const int group = ws.group;

  const int h = blockIdx.y, b = blockIdx.z;
  const int m = p.num_landmarks[b];
  const long long off_b = p.score_offsets[b];
  check_row(m, off_b, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
  const int t0 = blockIdx.x * kNormalizeTile;
  if (t0 >= m) return;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tiles = (m + ws.tile_rows - 1) / ws.tile_rows;
  const float2* __restrict__ partials =
      ws.partials + (static_cast<long long>(b) * p.num_kv_heads + h) * ws.num_tiles * group;
  for (int j = warp; j < group; j += kWarps) {
    const device::SoftmaxState st = merge_row_partials(partials, tiles, group, j, lane);
    if (lane == 0) s_offset[j] = softmax_offset(st.m, st.l);
  }
  __syncthreads();

  float* __restrict__ row0 = p.scores + off_b + static_cast<long long>(h) * m;
  const float* __restrict__ rows = ws.logits + (group - 1) * off_b + static_cast<long long>(h) * (group - 1) * m;
  float score[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = t0 + u * kNormalizeThreads + tid;
    score[u] = i < m ? row0[i] : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) score[u] = softmax_exponent(score[u], s_offset[0]);
  for (int j0 = 1; j0 < group; j0 += kHeads) {
    float v[kHeads][kPer];
#pragma unroll
    for (int jj = 0; jj < kHeads; ++jj)
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int i = t0 + u * kNormalizeThreads + tid;
        v[jj][u] = j0 + jj < group && i < m ? rows[static_cast<long long>(j0 + jj - 1) * m + i] : 0.0f;
      }
#pragma unroll
    for (int jj = 0; jj < kHeads; ++jj)
      if (j0 + jj < group)
#pragma unroll
        for (int u = 0; u < kPer; ++u)
          score[u] = fmaxf(score[u], softmax_exponent(v[jj][u], s_offset[j0 + jj]));
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = t0 + u * kNormalizeThreads + tid;
    if (i < m) row0[i] = softmax_score(score[u]);
  }
}

/// Grid `(C * H_kv, batch)` in clusters of `C` CTAs (`C` in {1, 2, 4, 8}; 1 without a
/// cluster launch), `NT` threads: the `C` CTAs of a cluster share one (sequence, KV head) row,
/// CTA `r` owning the slice `[r * seg, (r + 1) * seg)` of it (`seg` a multiple of 128); dynamic
/// shared memory caches up to `cache_capacity` keys of the slice (longer slices read their keys
/// from global memory, i.e. L2, on each pass). Radix select, MSB first, 8 bits per pass: each
/// CTA builds a histogram of its candidates' next digit in shared memory (the first one while
/// the keys are cached), the cluster sums them over distributed shared memory, and one warp
/// per CTA scans the sum for the digit holding the k-th largest key (every CTA finds the
/// same); the passes stop early once that digit's candidates are exactly the ones still
/// needed. Then one ordered compaction: an element is selected if its key prefix is above the
/// found one, or equal and among the first `remaining` such in index order. Each warp owns a
/// contiguous segment of its CTA's slice, counts its (above, equal) elements, and writes its
/// selected indices at the offsets that the counts of the CTAs and warps before it give (ranks
/// within a warp by shuffle scans, skipped for steps of 128 elements holding none), so the
/// row comes out ascending without a sort. Rows with `M_b <= k` take all indices without
/// reading scores.
///
/// With `kNormalize` the kernel first finishes the scoring (see `normalize_row`), so that
/// `score_and_select_top_k` needs no normalize kernel.
///
/// Performance: the floor is one read of the scores, `sum_b H_kv * M_b * 4` bytes, plus the
/// `batch * H_kv * k * 4` bytes of indices written. The passes re-read the cached keys from
/// shared memory (at most 3 + 2 times), so a CTA is bound by its SM's issue rate, not by HBM:
/// one CTA per row took ~14 us for rows of 16384 keys (an SM per row), 47 us for 512 such
/// rows; clusters spread a row over several SMs when the rows are fewer than the SMs.
template <int NT, bool kNormalize = false>
__global__ void __launch_bounds__(NT, NT >= 1024 ? 1 : 2)
    landmark_top_k_kernel(const TopKParams p, int cache_capacity, const landmark_detail::TopKNormalize norm) {
  using namespace landmark_detail;
  static_assert(NT >= 256 && NT % 32 == 0, "a thread per histogram bin");
  constexpr int kWarps = NT / 32;
  extern __shared__ uint4 s_cache_raw[];
  unsigned* s_keys = reinterpret_cast<unsigned*>(s_cache_raw);  // keys of this CTA's slice
  // Digit histograms, two so that a pass never clears the one other CTAs of the cluster may still
  // be reading (pass i counts into s_hist[i % 2]; the first digit into s_hist[0]).
  __shared__ unsigned s_hist[2][256];
  __shared__ unsigned s_cluster_hist[256];  // the histograms summed over the cluster
  __shared__ unsigned s_warp_above[kWarps], s_warp_equal[kWarps];
  __shared__ unsigned s_cta_counts[2];  // this CTA's (above, equal) elements, read by the cluster
  __shared__ int s_bin, s_above, s_bin_count;
  __shared__ float s_norm[kNormalize ? kMaxFusedGroup : 1];  // fused: softmax_offset of the G heads
  wait_for_previous_grids();  // launched overlapping the kernel before it (landmark_ops.cuh)
  allow_next_grid();

  const ClusterRank cr = cluster_rank();
  const int h = blockIdx.x / cr.size, b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int m = p.num_landmarks[b];
  const long long off_b = p.score_offsets[b];
  check_row(m, off_b, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
  const int kk = min(p.k, m);
  std::int32_t* out = p.selected + (static_cast<long long>(b) * p.num_kv_heads + h) * p.k;
  // This CTA's slice [lo, hi) of the row.
  const int seg_cta = (m + cr.size * 128 - 1) / (cr.size * 128) * 128;
  const int lo = min(m, cr.rank * seg_cta), hi = min(m, lo + seg_cta);
  const bool cached = hi - lo <= cache_capacity;
  for (int i = tid; i < 2 * 256; i += NT) s_hist[i / 256][i % 256] = 0u;

  // Fused scoring of the slice: the row's normalisers from the logits kernel's partial states,
  // then each landmark's score from its G logits (the normalize kernel's arithmetic, see
  // softmax_offset), written over head 0's logits in `scores` and, when the slice is cached,
  // keyed into shared memory with its top digit counted. 4 landmarks per thread per step,
  // their logits loaded 4 heads at a time (16 loads in flight; one round trip per step when
  // G <= 4).
  auto normalize_slice = [&](bool to_cache) {
    if constexpr (kNormalize) {
      const int group = norm.ws.group;
      const int tiles = (m + norm.ws.tile_rows - 1) / norm.ws.tile_rows;
      const float2* __restrict__ partials =
          norm.ws.partials + (static_cast<long long>(b) * p.num_kv_heads + h) * norm.ws.num_tiles * group;
      float* __restrict__ row0 = norm.scores + off_b + static_cast<long long>(h) * m;
      const float* __restrict__ rest =
          norm.ws.logits + (group - 1) * off_b + static_cast<long long>(h) * (group - 1) * m;
      constexpr int kPer = 4;  // landmarks per thread per step (64 registers at NT = 1024)
      // The logits of heads j0 .. j0 + 3 of landmarks base + u * NT + tid: 16 loads in flight.
      float v[4][kPer];
      auto load_logits = [&](int base, int j0) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int u = 0; u < kPer; ++u) {
            const int i = base + u * NT + tid, j = j0 + jj;
            v[jj][u] = j < group && i < hi ? (j == 0 ? row0[i] : rest[static_cast<long long>(j - 1) * m + i]) : 0.0f;
          }
      };
      load_logits(lo, 0);  // the first batch in flight while the partial states merge
      for (int j = warp; j < group; j += kWarps) {
        const device::SoftmaxState st = merge_row_partials(partials, tiles, group, j, lane);
        if (lane == 0) s_norm[j] = softmax_offset(st.m, st.l);
      }
      __syncthreads();
      for (int base = lo; base < hi; base += NT * kPer) {
        float score[kPer];
        for (int j0 = 0; j0 < group; j0 += 4) {
          if (base != lo || j0 != 0) load_logits(base, j0);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int j = j0 + jj;
            if (j >= group) break;
#pragma unroll
            for (int u = 0; u < kPer; ++u) {
              const float x = softmax_exponent(v[jj][u], s_norm[j]);
              score[u] = j == 0 ? x : fmaxf(score[u], x);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          const int i = base + u * NT + tid;
          score[u] = softmax_score(score[u]);
          if (i < hi) {
            row0[i] = score[u];
            if (to_cache) {
              const unsigned key = order_key(score[u]);
              s_keys[i - lo] = key;
              atomicAdd(&s_hist[0][key >> 24], 1u);
            }
          }
        }
      }
    }
  };

  if (kk == m) {  // every landmark is selected (M_b <= k): no cluster exchange
    if constexpr (kNormalize) normalize_slice(false);
    if (cr.rank == 0)
      for (int i = tid; i < p.k; i += NT) out[i] = i < m ? i : -1;
    return;
  }

  const float* __restrict__ row = p.scores + off_b + static_cast<long long>(h) * m;
  __syncthreads();
  if constexpr (kNormalize) {
    // Cached slices get their keys and top digit here; longer ones are read back from global
    // memory by the passes below (visible to the whole CTA after the barrier).
    normalize_slice(cached);
    __syncthreads();
  } else if (cached) {  // cache the keys and count their top digit; 8 loads in flight per thread
    for (int base = lo; base < hi; base += NT * 8) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = base + u * NT + tid < hi ? row[base + u * NT + tid] : 0.0f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int i = base + u * NT + tid;
        if (i < hi) {
          const unsigned key = order_key(v[u]);
          s_keys[i - lo] = key;
          atomicAdd(&s_hist[0][key >> 24], 1u);
        }
      }
    }
  }

  // The rest reads keys through `key_at` (and 4 at a time, aligned, through `key4_at`), by
  // index in the row, compiled once for the shared-memory cache and once for global memory.
  auto select = [&](auto key_at, auto key4_at, bool top_digit_counted) {
    // Radix select: after each pass, keys whose masked top bits exceed `prefix` are selected
    // for sure; `remaining` more are needed among those equal to it.
    unsigned prefix = 0u, mask = 0u;
    int remaining = kk;
    for (int shift = 24, pass = 0;; shift -= 8, ++pass) {
      unsigned* const pass_hist = s_hist[pass % 2];
      if (!(top_digit_counted && shift == 24)) {
        for (int first = lo + tid * kTopKItems; first < hi; first += NT * kTopKItems) {
          unsigned keys[kTopKItems];
          if (first + kTopKItems <= hi) {
            key4_at(first, keys);
          } else {
#pragma unroll
            for (int q = 0; q < kTopKItems; ++q) keys[q] = first + q < hi ? key_at(first + q) : 0u;
          }
#pragma unroll
          for (int q = 0; q < kTopKItems; ++q)
            if (first + q < hi && (keys[q] & mask) == prefix) atomicAdd(&pass_hist[(keys[q] >> shift) & 0xffu], 1u);
        }
      }
      __syncthreads();
      const unsigned* hist = pass_hist;
      if (cr.size > 1) {
        cluster_sync(cr);  // every CTA's histogram of this pass is complete
        // The cluster's histogram: thread t < 256 sums bin t over the CTAs (independent loads).
        if (tid < 256) {
          unsigned sum = 0u;
#pragma unroll
          for (int r = 0; r < kMaxClusterCtas; ++r)
            if (r < cr.size) sum += cluster_shared(pass_hist, r, cr)[tid];
          s_cluster_hist[tid] = sum;
        }
        __syncthreads();
        hist = s_cluster_hist;
      }
      if (warp == 0) {
        // Lane l owns bins 255 - 8l down to 248 - 8l; an inclusive scan over lanes counts the
        // candidates from the top bin down.
        unsigned c[8], total = 0u;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          c[q] = hist[255 - 8 * lane - q];
          total += c[q];
        }
        unsigned incl = total;
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
          const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += v;
        }
        const unsigned excl = incl - total;
        const unsigned need = static_cast<unsigned>(remaining);
        if (excl < need && need <= incl) {
          unsigned cum = excl;
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (cum + c[q] >= need) {
              s_bin = 255 - 8 * lane - q;
              s_above = static_cast<int>(cum);
              s_bin_count = static_cast<int>(c[q]);
              break;
            }
            cum += c[q];
          }
        }
      }
      __syncthreads();
      prefix |= static_cast<unsigned>(s_bin) << shift;
      mask |= 0xffu << shift;
      remaining -= s_above;
      // Done once the found digit's candidates are exactly the ones still needed (the same
      // decision in every CTA of the cluster).
      if (s_bin_count == remaining || shift == 0) break;
      // The next pass counts into the histogram of the pass before this one: every CTA of the
      // cluster read that one before it arrived at this pass's cluster barrier, so it may be
      // cleared without another barrier.
      for (int i = tid; i < 256; i += NT) s_hist[(pass + 1) % 2][i] = 0u;
      __syncthreads();
    }

    // Ordered compaction over warp segments (multiples of 128 elements, in index order; lane
    // l holds elements 4l..4l+3 of each 128). Selected elements are rare (k of M, plus ties),
    // so a step with none costs one vote; only steps with some rank them.
    const unsigned need = static_cast<unsigned>(remaining);
    const unsigned need_above = static_cast<unsigned>(kk - remaining);
    const int seg = (hi - lo + kWarps * 128 - 1) / (kWarps * 128) * 128;
    const int seg_begin = min(hi, lo + warp * seg), seg_end = min(hi, seg_begin + seg);
    // Per lane, bit q of `above_bits` / `equal_bits`: element first + q is above / equal.
    auto classify = [&](int first, unsigned& above_bits, unsigned& equal_bits) {
      unsigned keys[kTopKItems];
      if (first + kTopKItems <= seg_end) {
        key4_at(first, keys);
      } else {
#pragma unroll
        for (int q = 0; q < kTopKItems; ++q) keys[q] = first + q < seg_end ? key_at(first + q) : 0u;
      }
      above_bits = equal_bits = 0u;
#pragma unroll
      for (int q = 0; q < kTopKItems; ++q) {
        const unsigned top = keys[q] & mask;
        const bool in = first + q < seg_end;
        above_bits |= static_cast<unsigned>(in && top > prefix) << q;
        equal_bits |= static_cast<unsigned>(in && top == prefix) << q;
      }
    };
    unsigned n_above = 0u, n_equal = 0u;
    for (int base = seg_begin; base < seg_end; base += 128) {
      unsigned above_bits, equal_bits;
      classify(base + 4 * lane, above_bits, equal_bits);
      n_above += __popc(above_bits);
      n_equal += __popc(equal_bits);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      n_above += __shfl_xor_sync(0xffffffffu, n_above, o);
      n_equal += __shfl_xor_sync(0xffffffffu, n_equal, o);
    }
    if (lane == 0) {
      s_warp_above[warp] = n_above;
      s_warp_equal[warp] = n_equal;
    }
    __syncthreads();
    if (tid == 0) {
      unsigned a = 0u, e = 0u;
      for (int w = 0; w < kWarps; ++w) {
        a += s_warp_above[w];
        e += s_warp_equal[w];
      }
      s_cta_counts[0] = a;
      s_cta_counts[1] = e;
    }
    cluster_sync(cr);  // every CTA's counts (and, without a cluster, the warps') are in place
    // Counts before this warp: of the CTAs before this one (lane r < rank holds CTA r's), then
    // of the warps before it in this CTA (lane w < warp holds warp w's).
    unsigned above = 0u, equal = 0u;
    if (lane < cr.rank) {
      const unsigned* counts = cluster_shared(s_cta_counts, lane, cr);
      above = counts[0];
      equal = counts[1];
    }
    // This CTA's last remote reads are done: the cluster's CTAs may exit once every CTA got here
    // (the matching wait is at the end, so the compaction does not wait for the slowest CTA).
    cluster_arrive(cr);
    if (lane < warp) {
      above += s_warp_above[lane];
      equal += s_warp_equal[lane];
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      above += __shfl_xor_sync(0xffffffffu, above, o);
      equal += __shfl_xor_sync(0xffffffffu, equal, o);
    }
    for (int base = seg_begin; base < seg_end; base += 128) {  // warp-uniform
      if (above == need_above && equal >= need) break;         // everything selected is written
      const int first = base + 4 * lane;
      unsigned above_bits, equal_bits;
      classify(first, above_bits, equal_bits);
      if (!__any_sync(0xffffffffu, (above_bits | equal_bits) != 0u)) continue;
      // Inclusive scans over lanes of the per-lane counts give each lane's starting ranks.
      const unsigned lane_above = __popc(above_bits), lane_equal = __popc(equal_bits);
      unsigned incl_above = lane_above, incl_equal = lane_equal;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const unsigned a = __shfl_up_sync(0xffffffffu, incl_above, o);
        const unsigned e = __shfl_up_sync(0xffffffffu, incl_equal, o);
        if (lane >= o) {
          incl_above += a;
          incl_equal += e;
        }
      }
      unsigned my_above = above + incl_above - lane_above, my_equal = equal + incl_equal - lane_equal;
#pragma unroll
      for (int q = 0; q < kTopKItems; ++q) {
        if ((above_bits >> q) & 1u) {
          out[my_above + min(my_equal, need)] = first + q;
          ++my_above;
        } else if ((equal_bits >> q) & 1u) {
          if (my_equal < need) out[my_above + my_equal] = first + q;
          ++my_equal;
        }
      }
      above += __shfl_sync(0xffffffffu, incl_above, 31);
      equal += __shfl_sync(0xffffffffu, incl_equal, 31);
    }
    cluster_wait(cr);  // no CTA leaves while another may still read its shared memory
  };
  if (cached) {
    select([&](int i) { return s_keys[i - lo]; },
           [&](int i, unsigned(&k4)[kTopKItems]) {
             const uint4 v = reinterpret_cast<const uint4*>(s_keys)[(i - lo) / kTopKItems];
             k4[0] = v.x;
             k4[1] = v.y;
             k4[2] = v.z;
             k4[3] = v.w;
           },
           true);
  } else {
    select([&](int i) { return order_key(row[i]); },
           [&](int i, unsigned(&k4)[kTopKItems]) {
#pragma unroll
             for (int q = 0; q < kTopKItems; ++q) k4[q] = order_key(row[i + q]);
           },
           false);
  }
  if (cr.rank == 0)
    for (int i = kk + tid; i < p.k; i += NT) out[i] = -1;
}

}  // namespace kernels
}  // namespace shadowkv::cuda
