#pragma once
/// \file cuda/kernels/decode_attention.cuh
/// \brief Split-K (flash-decoding) attention of one decode token per sequence over the rows of
/// a `KVSegments` set: static rows, selected chunks in device slots, generated rows. The same
/// kernels serve `DensePolicy` (static = the whole cache) and `ShadowKVPolicy`: a tensor-core
/// kernel for 16-bit storage (`decode_attention_mma_kernel`), a CUDA-core one for float
/// (`decode_attention_split_kernel`); both write the same partials, merged by
/// `decode_attention_combine_kernel` — or, for the tensor-core kernel launched in clusters of
/// a row's splits, by the cluster itself over distributed shared memory (one launch fewer).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../device/softmax.hpp"
#include "../types.cuh"
#include "cluster.cuh"
#include "grid_dependency.cuh"
#include "mma_util.cuh"

namespace shadowkv::cuda {

/// The rows one (sequence, KV head) attends to, in three segments read in this order:
/// `static_rows` contiguous rows; `num_slots` chunks of `chunk_size` rows, chunk `i` at
/// `slot_k + slots[i] * chunk_size * d`; `gen_rows` rows `i * gen_stride` apart. Any segment
/// may be empty. Pointers are device (or mapped host) addresses of `D` storage elements.
template <class D>
struct KVSegments {
  const D* static_k = nullptr;
  const D* static_v = nullptr;
  int static_rows = 0;
  const D* slot_k = nullptr;
  const D* slot_v = nullptr;
  const int* slots = nullptr;
  int num_slots = 0;
  int chunk_size = 1;
  const D* gen_k = nullptr;
  const D* gen_v = nullptr;
  int gen_rows = 0;
  long long gen_stride = 0;  ///< elements between generated rows (H_kv * d when token-major)

  __host__ __device__ long long total_rows() const {
    return static_cast<long long>(static_rows) + static_cast<long long>(num_slots) * chunk_size + gen_rows;
  }
};

/// A few 64-bit words that a decode-attention launch copies once every kernel before it on the
/// stream has finished: one thread, at the start of the split kernel. The decode step uses it
/// to bring its counters to mapped host memory without a copy of its own on the stream.
struct AttentionWordCopy {
  const std::int64_t* src = nullptr;  ///< device
  std::int64_t* dst = nullptr;        ///< device, or mapped host memory (`PinnedBuffer::device_data()`)
  int words = 0;                      ///< at most 32
};

/// Plain parameters of one launch (see `decode_attention` in cuda/decode_attention.cuh).
template <class D>
struct DecodeAttentionParams {
  const float* queries = nullptr;        ///< [batch, H_q, d], post-RoPE
  D* out = nullptr;                      ///< [batch, H_q, d]
  const KVSegments<D>* segments = nullptr;  ///< [batch * H_kv]
  float* partial_acc = nullptr;          ///< [batch * H_q, num_splits, d] workspace
  float* partial_ml = nullptr;           ///< [batch * H_q, num_splits, 2] workspace
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int num_splits = 1;
  long long rows_per_split = 0;
  float scale = 1.0f;
  AttentionWordCopy copy;
  /// The tensor-core kernel merges the splits itself and writes `out` (no combine kernel):
  /// launched in clusters of `num_splits` CTAs along x (or with one split), each cluster one
  /// (sequence, KV head). The partials workspace is then not used.
  bool combine_in_kernel = false;
};

namespace kernels {

/// `p.copy`, by thread `i < words` of CTA (0, 0), read past L1: the words were written by the
/// kernels this launch waited for.
template <class D>
__device__ __forceinline__ void attention_word_copy(const DecodeAttentionParams<D>& p) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && static_cast<int>(threadIdx.x) < p.copy.words)
    p.copy.dst[threadIdx.x] = __ldcg(p.copy.src + threadIdx.x);
}


/// `N` consecutive storage elements held raw in registers, loaded with the widest aligned
/// vector loads the width allows (rows start 16-byte aligned when the base pointer is).
template <class D, int N>
struct Slice {
  static constexpr int kBytes = N * static_cast<int>(sizeof(D));
  using Word = std::conditional_t<
      kBytes % 16 == 0, uint4,
      std::conditional_t<kBytes % 8 == 0, uint2, std::conditional_t<kBytes % 4 == 0, unsigned, unsigned short>>>;
  static constexpr int kWords = kBytes / static_cast<int>(sizeof(Word));
  Word w[kWords];

  __device__ __forceinline__ void load(const D* __restrict__ src) {
    const Word* s = reinterpret_cast<const Word*>(src);
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = s[i];
  }
  __device__ __forceinline__ float get(int i) const { return to_float(reinterpret_cast<const D*>(w)[i]); }
};

/// Lanes that share one row: as many as make 16-byte loads cover the row, when that divides
/// the warp (d = 128 bf16: 16 lanes, so a warp works on two rows at once); else 32.
template <class D, int HD>
constexpr int threads_per_row() {
  constexpr int t = HD * static_cast<int>(sizeof(D)) / 16;
  return (t >= 1 && t <= 32 && 32 % t == 0 && HD % t == 0) ? t : 32;
}

template <class D>
__device__ __forceinline__ void row_pointers(const KVSegments<D>& s, long long row, int head_dim,
                                             const D*& k, const D*& v) {
  if (row < s.static_rows) {
    k = s.static_k + row * head_dim;
    v = s.static_v + row * head_dim;
    return;
  }
  row -= s.static_rows;
  const long long selected = static_cast<long long>(s.num_slots) * s.chunk_size;
  if (row < selected) {
    const long long chunk = row / s.chunk_size, within = row - chunk * s.chunk_size;
    const long long off = (static_cast<long long>(s.slots[chunk]) * s.chunk_size + within) * head_dim;
    k = s.slot_k + off;
    v = s.slot_v + off;
    return;
  }
  row -= selected;
  k = s.gen_k + row * s.gen_stride;
  v = s.gen_v + row * s.gen_stride;
}

/// The end of both split kernels: merges the `kWarps` per-warp partials that sit in shared
/// memory (`s_acc` `[kWarps][kRowStride][HD]`, `s_ml` `[kWarps][kRowStride][2]` holding
/// `(m, l)` with `m` in natural-log units) into one `(m, l, acc)` per query head `g` of the
/// group and element `e`, handed to `sink(g, e, state, acc)`. Called by every thread after a
/// barrier.
template <int HD, int kRowStride, int kWarps, class Sink>
__device__ __forceinline__ void merge_warp_partials(const float* s_acc, const float* s_ml, int group, Sink&& sink) {
  for (int idx = threadIdx.x; idx < group * HD; idx += kWarps * 32) {
    const int g = idx / HD, e = idx % HD;
    device::SoftmaxState st = device::empty_softmax_state();
    float a = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      float sa, sb;
      const device::SoftmaxState other{s_ml[(w * kRowStride + g) * 2], s_ml[(w * kRowStride + g) * 2 + 1]};
      st = device::merge_softmax_state(st, other, sa, sb);
      a = a * sa + s_acc[(w * kRowStride + g) * HD + e] * sb;
    }
    sink(g, e, st, a);
  }
}

/// `merge_warp_partials` into the split's slot of the workspace.
template <int HD, int kRowStride, int kWarps, class D>
__device__ __forceinline__ void store_split_partials(const DecodeAttentionParams<D>& p, const float* s_acc,
                                                     const float* s_ml, int b, int h, int group, int split) {
  merge_warp_partials<HD, kRowStride, kWarps>(s_acc, s_ml, group, [&](int g, int e, device::SoftmaxState st, float a) {
    const long long qh = static_cast<long long>(b) * p.num_q_heads + h * group + g;
    p.partial_acc[(qh * p.num_splits + split) * HD + e] = a;
    if (e == 0) {
      p.partial_ml[(qh * p.num_splits + split) * 2] = st.m;
      p.partial_ml[(qh * p.num_splits + split) * 2 + 1] = st.l;
    }
  });
}

/// Splits up to which `decode_attention_combine_kernel` loads every partial state first, and
/// the most splits (CTAs per cluster) a kernel merges itself (`combine_in_kernel`).
inline constexpr int kCombinePreload = 8;

/// The weighted merge of `n <= kCombinePreload` split states `(m_s, l_s, a_s)` of one output
/// element, normalised: the combine kernel's arithmetic, in split order (one split gives its
/// `a / l` bit for bit). An element no row reached is 0, as the CPU backend has it.
__device__ __forceinline__ float combine_splits(const float (&m_s)[kCombinePreload], const float (&l_s)[kCombinePreload],
                                                const float (&a_s)[kCombinePreload], int n) {
  float mx = -INFINITY, l = 0.0f, a = 0.0f;
#pragma unroll
  for (int s = 0; s < kCombinePreload; ++s) mx = fmaxf(mx, m_s[s]);
  if (mx != -INFINITY) {
#pragma unroll
    for (int s = 0; s < kCombinePreload; ++s) {
      if (s >= n) break;
      const float w = m_s[s] == -INFINITY ? 0.0f : expf(m_s[s] - mx);
      l += l_s[s] * w;
      a += a_s[s] * w;
    }
  }
  return l > 0.0f ? a / l : 0.0f;
}

/// The end of the tensor-core kernel with `combine_in_kernel`: every CTA of the cluster (one
/// per split, rank = split) has its merged partial in `s_part` (`[16][HD + 2]`: acc, then m, l
/// per query head); after a cluster barrier, CTA 0 reads the others' through distributed shared
/// memory and writes the group's outputs; a second barrier keeps every CTA resident until
/// those reads are done. Without a cluster (one split) the barriers are `__syncthreads`.
template <int HD, int kThreads, class D>
__device__ __forceinline__ void combine_cluster_partials(const DecodeAttentionParams<D>& p, const float* s_part, int b,
                                                         int h, int group) {
  const ClusterRank cr = cluster_rank();
  if (cr.size != static_cast<int>(gridDim.x)) __trap();  // the launcher's contract: a cluster is a row's splits
  cluster_sync(cr);
  if (cr.rank == 0) {
    for (int idx = threadIdx.x; idx < group * HD; idx += kThreads) {
      const int g = idx / HD, e = idx % HD;
      float m_s[kCombinePreload], l_s[kCombinePreload], a_s[kCombinePreload];
#pragma unroll
      for (int s = 0; s < kCombinePreload; ++s) {
        const bool in = s < cr.size;
        const float* part = cluster_shared(s_part, in ? s : 0, cr) + g * (HD + 2);
        m_s[s] = in ? part[HD] : -INFINITY;
        l_s[s] = in ? part[HD + 1] : 0.0f;
        a_s[s] = in ? part[e] : 0.0f;
      }
      const long long qh = static_cast<long long>(b) * p.num_q_heads + h * group + g;
      p.out[qh * HD + e] = from_float<D>(combine_splits(m_s, l_s, a_s, cr.size));
    }
  }
  cluster_sync(cr);
}

/// Grid `(num_splits, batch * H_kv)`, `kWarps` warps. Each CTA reads the rows
/// `[split * rows_per_split, (split+1) * rows_per_split)` of its (sequence, KV head) once and
/// scores them against the `G` query heads of the group (GQA: K and V are read once per
/// group, not per query head). `TPR` lanes share a row, each holding `HD/TPR` elements loaded
/// with 16-byte loads; a warp works on `32/TPR` rows side by side, `kRowsPerLane` rows per
/// step, and keeps the loads of the next `kAhead` steps in flight while it computes. Dot products are
/// reduced over the `TPR` lanes with shuffles; each sub-warp keeps an online softmax per
/// head; sub-warps merge with shuffles, warps in shared memory; the CTA writes one partial
/// `(m, l, acc)` per query head and split.
///
/// Performance: the floor is the K and V bytes, `2 * rows * HD * sizeof(D)` per (sequence,
/// KV head), at HBM bandwidth (≈ 4 TB/s on the H200); the partials add
/// `batch * H_q * num_splits * (HD + 2) * 4` bytes, small when a split holds hundreds of rows.
template <class D, int HD, int GMAX, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    decode_attention_split_kernel(const DecodeAttentionParams<D> p, int group) {
  constexpr int TPR = threads_per_row<D, HD>();
  constexpr int EPL = HD / TPR;
  constexpr int SUB = 32 / TPR;
  constexpr int kRowsPerLane = 2;
  constexpr int kRowsPerWarpStep = SUB * kRowsPerLane;
  wait_for_previous_grids();  // launched overlapping the kernel before it (cuda/decode_attention.cuh)
  allow_next_grid();          // the combine kernel
  attention_word_copy(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / TPR, sl = lane % TPR;
  const int seq_head = blockIdx.y;  // b * H_kv + h
  const int split = blockIdx.x;
  const int b = seq_head / p.num_kv_heads, h = seq_head % p.num_kv_heads;
  const KVSegments<D> seg = p.segments[seq_head];
  const long long total = seg.total_rows();
  const long long row_begin = static_cast<long long>(split) * p.rows_per_split;
  const long long row_end = min(total, row_begin + p.rows_per_split);

  float q[GMAX][EPL];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    const float* src = p.queries + (static_cast<long long>(b) * p.num_q_heads + h * group + min(g, group - 1)) * HD + sl * EPL;
#pragma unroll
    for (int e = 0; e < EPL; ++e) q[g][e] = g < group ? src[e] * p.scale : 0.0f;
  }
  float m[GMAX], l[GMAX], acc[GMAX][EPL];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.0f;
  }

  // Rows of this lane at a step starting at r0: r0 + sub * kRowsPerLane + i. The loads of the
  // next kAhead steps are in flight while a step computes (a ring of register buffers).
  constexpr int kAhead = 2;
  Slice<D, EPL> kb[kAhead + 1][kRowsPerLane], vb[kAhead + 1][kRowsPerLane];
  auto load_step = [&](long long r0, Slice<D, EPL>(&ks)[kRowsPerLane], Slice<D, EPL>(&vs)[kRowsPerLane]) {
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
      const long long r = r0 + sub * kRowsPerLane + i;
      if (r < row_end) {
        const D* kp;
        const D* vp;
        if (r < seg.static_rows) {  // the common case (dense: every row): no segment logic
          kp = seg.static_k + r * HD;
          vp = seg.static_v + r * HD;
        } else {
          row_pointers(seg, r, HD, kp, vp);
        }
        ks[i].load(kp + sl * EPL);
        vs[i].load(vp + sl * EPL);
      }
    }
  };
  const long long stride = static_cast<long long>(kWarps) * kRowsPerWarpStep;
  long long r0 = row_begin + static_cast<long long>(warp) * kRowsPerWarpStep;
#pragma unroll
  for (int a = 0; a < kAhead; ++a)
    if (r0 + a * stride < row_end) load_step(r0 + a * stride, kb[a], vb[a]);
  for (; r0 < row_end; r0 += stride) {
    if (r0 + kAhead * stride < row_end) load_step(r0 + kAhead * stride, kb[kAhead], vb[kAhead]);
    const auto& kcur = kb[0];
    const auto& vcur = vb[0];
    auto compute = [&]<bool kFull>() {
      bool valid[kRowsPerLane];
      float kf[kRowsPerLane][EPL], vf[kRowsPerLane][EPL];
#pragma unroll
      for (int i = 0; i < kRowsPerLane; ++i) {
        valid[i] = kFull || r0 + sub * kRowsPerLane + i < row_end;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          // Rows past the end hold stale registers: zero them so 0 * garbage cannot be NaN.
          kf[i][e] = kFull || valid[i] ? kcur[i].get(e) : 0.0f;
          vf[i][e] = kFull || valid[i] ? vcur[i].get(e) : 0.0f;
        }
      }
      // Every head's dot products first, then their reductions interleaved: independent
      // shuffle chains keep the warp busy instead of waiting on one chain per head.
      float s[GMAX][kRowsPerLane];
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) {
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) dot += q[g][e] * kf[i][e];
          s[g][i] = dot;
        }
#pragma unroll
      for (int off = TPR / 2; off > 0; off /= 2)
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
#pragma unroll
          for (int i = 0; i < kRowsPerLane; ++i) s[g][i] += __shfl_xor_sync(0xffffffffu, s[g][i], off);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        if (g >= group) break;
        float tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) tile_max = fmaxf(tile_max, kFull || valid[i] ? s[g][i] : -INFINITY);
        // Rescale only when the running max rises (rare after the first rows).
        if (tile_max > m[g]) {
          const float corr = __expf(m[g] - tile_max);  // 0 when m was -inf
          l[g] *= corr;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc[g][e] *= corr;
          m[g] = tile_max;
        }
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) {
          const float pr = kFull || valid[i] ? __expf(s[g][i] - m[g]) : 0.0f;
          l[g] += pr;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc[g][e] += pr * vf[i][e];
        }
      }
    };
    if (r0 + kRowsPerWarpStep <= row_end)
      compute.template operator()<true>();
    else
      compute.template operator()<false>();
#pragma unroll
    for (int a = 0; a < kAhead; ++a)
#pragma unroll
      for (int i = 0; i < kRowsPerLane; ++i) {
        kb[a][i] = kb[a + 1][i];
        vb[a][i] = vb[a + 1][i];
      }
  }

  // Merge the sub-warps of the warp (lanes sl of every sub hold the same elements).
#pragma unroll
  for (int off = TPR; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const device::SoftmaxState other{__shfl_xor_sync(0xffffffffu, m[g], off),
                                       __shfl_xor_sync(0xffffffffu, l[g], off)};
      float sa, sb;
      const device::SoftmaxState merged = device::merge_softmax_state({m[g], l[g]}, other, sa, sb);
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        acc[g][e] = acc[g][e] * sa + o * sb;
      }
      m[g] = merged.m;
      l[g] = merged.l;
    }
  }

  // Merge the warps: sub-warp 0 of each writes (m, l) and acc per head to shared memory.
  extern __shared__ float smem[];
  float* s_acc = smem;                          // [kWarps][GMAX][HD]
  float* s_ml = smem + kWarps * GMAX * HD;      // [kWarps][GMAX][2]
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) s_acc[(warp * GMAX + g) * HD + sl * EPL + e] = acc[g][e];
      if (sl == 0) {
        s_ml[(warp * GMAX + g) * 2] = m[g];
        s_ml[(warp * GMAX + g) * 2 + 1] = l[g];
      }
    }
  }
  __syncthreads();
  store_split_partials<HD, GMAX, kWarps>(p, s_acc, s_ml, b, h, group, split);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path for 16-bit storage (bf16, fp16): its shapes and the kernel; the PTX
// wrappers are in mma_util.cuh (namespace `mma`), whose header states the fragment layouts;
// `qr` = lane / 4 ("groupID") and `qc` = lane % 4 ("threadID_in_group") below.

/// Shapes of the tensor-core kernel for head dim `HD` (16-bit storage).
template <int HD>
struct MmaDecodeShape {
  /// Keys a warp handles per step: the k of one P·V MMA, two n8 tiles of S = Q·Kᵀ.
  static constexpr int kTileRows = 16;
  /// Bytes of one row in shared memory: padded by 16 bytes so that the 8 rows one ldmatrix
  /// matrix reads at the same column fall into 8 different 16-byte bank groups.
  static constexpr int kRowPitch = HD * 2 + 16;
  static constexpr int kTileBytes = kTileRows * kRowPitch;  ///< one K (or V) tile
  /// Tiles in each warp's ring: about 24 KB of K and V per warp for d <= 128 (two CTAs per
  /// SM), 48 KB for d = 256 (one CTA per SM).
  static constexpr int kStages = HD <= 64 ? 6 : (HD <= 96 ? 4 : 3);
  static constexpr int kChunksPerRow = HD * 2 / 16;  ///< 16-byte copies per row
  static constexpr int kChunksPerLane = kTileRows * kChunksPerRow / 32;
  static_assert(HD % 16 == 0 && kTileRows * kChunksPerRow % 32 == 0, "head dim must be a multiple of 16");
};

/// Dynamic shared memory of `decode_attention_mma_kernel<D, HD, kWarps>`: the warps' rings,
/// reused at the end for the per-warp partials `[kWarps][16][HD + 2]` floats and the CTA's
/// merged partial `[16][HD + 2]` (`combine_in_kernel`).
template <int HD, int kWarps>
constexpr std::size_t mma_decode_smem_bytes() {
  using S = MmaDecodeShape<HD>;
  const std::size_t rings = static_cast<std::size_t>(kWarps) * S::kStages * 2 * S::kTileBytes;
  const std::size_t partials = static_cast<std::size_t>(kWarps + 1) * 16 * (HD + 2) * sizeof(float);
  return rings > partials ? rings : partials;
}

/// Tensor-core split kernel for 16-bit storage: the same grid `(num_splits, batch * H_kv)`,
/// rows per split and partials `(m, l, acc)` as `decode_attention_split_kernel`, `kWarps`
/// warps.
///
/// Design (FlashAttention-2 adapted to one query token per sequence): the `G <= 16` query
/// heads of the group are the 16 rows of the MMA's A operand (rows >= G are zero); Q is read
/// once, pre-scaled by `scale * log2(e)` and kept in registers as A fragments (k = head dim).
/// The split's rows are cut into 16-row tiles dealt round-robin to the warps (warp `w` takes
/// tiles `w, w + kWarps, ...`); each warp streams its tiles through its own ring of
/// `kStages` K/V tiles in shared memory with 16-byte `cp.async` copies, `kStages - 1` tiles
/// in flight while it computes one. A row's source address follows the segments (static rows
/// contiguous; slot chunks through `slots[]`; generated rows `gen_stride` apart): a tile wholly
/// inside the static rows is one contiguous block; otherwise lane `i` of the warp locates row
/// `i` and the lanes copying that row take its address by shuffle. Rows past the split end
/// are zero-filled (src-size 0) and their logits set to -inf. Per tile: S (16 heads x 16 keys)
/// = Q·Kᵀ with `mma.m16n8k16` (K fragments by `ldmatrix`, fp32 accumulators); an online
/// softmax per head row in registers (base 2; a row's max reduced over the 4 lanes of a quad);
/// P, rounded to D, is formed from the S accumulators in place as the A operand of P·V (V
/// fragments by `ldmatrix.trans`), accumulated into fp32 O fragments `[16 x HD]`. No block
/// barrier until the end: the rings are private to their warps (`cp.async.wait_group`, then
/// `__syncwarp`, orders a tile's copies before its reads and a slot's reads before its next
/// copies). At the end the warps' (m, l, O) meet in shared memory (reusing the rings) and
/// merge into one partial per query head.
///
/// Performance: the floor is the K and V bytes, `2 * rows * HD * sizeof(D)` per (sequence,
/// KV head), at HBM bandwidth (≈ 4 TB/s on the H200); the partials add
/// `batch * H_q * num_splits * (HD + 2) * 4` bytes. Per 16 keys a warp issues `HD / 8`
/// MMAs for S and `HD / 8` for P·V (about 16 FLOP per byte of K and V, far under the tensor
/// cores' rate), so the kernel is bound by the bytes in flight: each warp keeps
/// `(kStages - 1) * 16 * HD * 4` bytes of K and V requested (16 KB at d = 128), 128 KB per SM.
template <class D, int HD, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    decode_attention_mma_kernel(const DecodeAttentionParams<D> p, int group) {
  static_assert(sizeof(D) == 2, "the tensor-core path takes 16-bit storage");
  using namespace mma;
  using Shape = MmaDecodeShape<HD>;
  constexpr int kRows = Shape::kTileRows;
  constexpr int kPitch = Shape::kRowPitch;
  constexpr int kStages = Shape::kStages;
  constexpr int kTileBytes = Shape::kTileBytes;
  constexpr int kStageBytes = 2 * kTileBytes;  // K tile, then V tile
  constexpr int kChunksPerRow = Shape::kChunksPerRow;
  constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(D));
  constexpr int kKSteps = HD / 16;  // k steps of S = Q·Kᵀ
  constexpr int kNTiles = HD / 8;   // n8 tiles of O
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  constexpr unsigned kFull = 0xffffffffu;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async, ldmatrix and bf16 mma need sm_80 or newer
#else
  wait_for_previous_grids();  // launched overlapping the kernel before it (cuda/decode_attention.cuh)
  allow_next_grid();          // the combine kernel
  attention_word_copy(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int qr = lane / 4, qc = lane % 4;
  const int seq_head = blockIdx.y;  // b * H_kv + h
  const int split = blockIdx.x;
  const int b = seq_head / p.num_kv_heads, h = seq_head % p.num_kv_heads;
  const KVSegments<D> seg = p.segments[seq_head];
  const long long total = seg.total_rows();
  const long long row_begin = static_cast<long long>(split) * p.rows_per_split;
  const long long row_end = min(total, row_begin + p.rows_per_split);

  // O fragments: o[n] holds (row qr, dims 8n + 2qc, +1) in [0], [1] and row qr + 8 in [2], [3].
  // m and l per row (qr, qr + 8), in base-2 units; l sums this lane's columns only until the end.
  float o[kNTiles][4];
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  extern __shared__ __align__(16) unsigned char mma_smem[];
  const uint32_t ring = shared_address(mma_smem) + static_cast<uint32_t>(warp * kStages * kStageBytes);

  const long long warp_stride = static_cast<long long>(kWarps) * kRows;
  const long long first_row = row_begin + static_cast<long long>(warp) * kRows;
  const int num_tiles =
      first_row < row_end ? static_cast<int>((row_end - first_row + warp_stride - 1) / warp_stride) : 0;

  // Issues the copies of this warp's tile `tile` into ring slot `slot` (warp-uniform call).
  // Copy `c` of a tile (lane + 32 i) is row c / kChunksPerRow, bytes 16 (c % kChunksPerRow):
  // a warp instruction covers 512 consecutive bytes of a contiguous tile.
  // K and V are read once per step: evict-first in L2, so that they do not push out what is
  // reused (the partials, the queries, the next kernels' inputs).
  const uint64_t policy = l2_evict_first_policy();
  auto load_tile = [&](int tile, int slot) {
    const long long row0 = first_row + static_cast<long long>(tile) * warp_stride;
    const uint32_t k_dst = ring + static_cast<uint32_t>(slot * kStageBytes), v_dst = k_dst + kTileBytes;
    if (row0 + kRows <= row_end && row0 + kRows <= seg.static_rows) {
      // The common case (dense attention: every tile but the last): one contiguous block.
      const D* ks = seg.static_k + row0 * HD;
      const D* vs = seg.static_v + row0 * HD;
#pragma unroll
      for (int i = 0; i < Shape::kChunksPerLane; ++i) {
        const int c = lane + 32 * i;
        const uint32_t off = (c / kChunksPerRow) * kPitch + (c % kChunksPerRow) * 16;
        cp_async_16(k_dst + off, ks + c * kElemsPerChunk, 16, policy);
        cp_async_16(v_dst + off, vs + c * kElemsPerChunk, 16, policy);
      }
    } else {
      // Lane i (and i + 16) locates row row0 + i; nullptr past the split end. Row row0 is
      // always inside the split, so its address is a valid source for the zero-fills.
      const long long row = row0 + lane % kRows;
      const D* k_row = nullptr;
      const D* v_row = nullptr;
      if (row < row_end) row_pointers(seg, row, HD, k_row, v_row);
      const D* k_first = shfl_pointer(k_row, 0);
#pragma unroll
      for (int i = 0; i < Shape::kChunksPerLane; ++i) {
        const int c = lane + 32 * i, r = c / kChunksPerRow, col = c % kChunksPerRow;
        const D* kp = shfl_pointer(k_row, r);
        const D* vp = shfl_pointer(v_row, r);
        const uint32_t off = r * kPitch + col * 16;
        const bool valid = kp != nullptr;
        cp_async_16(k_dst + off, valid ? kp + col * kElemsPerChunk : k_first, valid ? 16 : 0, policy);
        cp_async_16(v_dst + off, valid ? vp + col * kElemsPerChunk : k_first, valid ? 16 : 0, policy);
      }
    }
  };

  // This lane's ldmatrix row addresses within a tile. K (non-transposed, B of S): matrices
  // (keys 0-7, dims +0), (keys 0-7, dims +8), (keys 8-15, dims +0), (keys 8-15, dims +8) give
  // the two b registers of n-tiles 0 and 1. V (transposed, B of P·V): matrices (keys 0-7,
  // dims +0), (keys 8-15, dims +0), (keys 0-7, dims +8), (keys 8-15, dims +8) give the two b
  // registers of two consecutive n8 tiles of O.
  const uint32_t k_lane = ((lane / 16) * 8 + lane % 8) * kPitch + ((lane / 8) % 2) * 16;
  const uint32_t v_lane = (((lane / 8) % 2) * 8 + lane % 8) * kPitch + (lane / 16) * 16;

  // One commit per prologue slot and per iteration, empty or not, so that "tile t landed" is
  // always "at most kStages - 2 groups pending" at iteration t.
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < num_tiles) load_tile(t, t);
    cp_async_commit();
  }
  // Q as A fragments (read while the first tiles are in flight): qa[kk] covers head dims
  // [16 kk, 16 kk + 16); rows qr and qr + 8 are query heads h * group + row, zero past the group.
  uint32_t qa[kKSteps][4];
  {
    const float qscale = p.scale * kLog2e;
    const float* q = p.queries + (static_cast<long long>(b) * p.num_q_heads + static_cast<long long>(h) * group) * HD;
    auto at = [&](int row, int col) { return row < group ? q[row * HD + col] * qscale : 0.0f; };
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const int col = kk * 16 + 2 * qc;
      qa[kk][0] = pack_pair<D>(at(qr, col), at(qr, col + 1));
      qa[kk][1] = pack_pair<D>(at(qr + 8, col), at(qr + 8, col + 1));
      qa[kk][2] = pack_pair<D>(at(qr, col + 8), at(qr, col + 9));
      qa[kk][3] = pack_pair<D>(at(qr + 8, col + 8), at(qr + 8, col + 9));
    }
  }
  int slot = 0;  // tile % kStages
  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // every lane's copies of this tile visible; every lane done reading slot - 1
    {
      const int ahead = tile + kStages - 1;  // lands in slot (tile - 1) % kStages, read last iteration
      if (ahead < num_tiles) load_tile(ahead, slot == 0 ? kStages - 1 : slot - 1);
      cp_async_commit();
    }
    const uint32_t k_tile = ring + static_cast<uint32_t>(slot * kStageBytes), v_tile = k_tile + kTileBytes;

    // S = Q·Kᵀ: s[j] is n-tile j (keys 8j..8j+7); [0], [1] row qr, [2], [3] row qr + 8, keys
    // 8j + 2qc, +1.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t kb[4];
      ldmatrix_x4(kb, k_tile + k_lane + kk * 32);
      mma_16816<D>(s[0], qa[kk], kb[0], kb[1]);
      mma_16816<D>(s[1], qa[kk], kb[2], kb[3]);
    }
    const long long row0 = first_row + static_cast<long long>(tile) * warp_stride;
    if (row0 + kRows > row_end) {  // the split's last tile: keys past the end score -inf
      const int valid = static_cast<int>(row_end - row0);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j * 8 + 2 * qc + (e & 1) >= valid) s[j][e] = -INFINITY;
    }

    // Online softmax per row r (qr + 8r): new max over the quad, rescale, exponentiate.
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // no (-inf) - (-inf)
      corr[r] = exp2_approx(m[r] - base);                    // 0 while m was -inf
      m[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = exp2_approx(s[j][e] - base);
          sum += s[j][e];
        }
      l[r] = l[r] * corr[r] + sum;
    }
    if (__any_sync(kFull, corr[0] != 1.0f || corr[1] != 1.0f)) {  // rare once the max settles
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        o[n][0] *= corr[0];
        o[n][1] *= corr[0];
        o[n][2] *= corr[1];
        o[n][3] *= corr[1];
      }
    }

    // P as the A operand (rows = heads, k = the tile's 16 keys), straight from S's layout.
    const uint32_t pa[4] = {pack_pair<D>(s[0][0], s[0][1]), pack_pair<D>(s[0][2], s[0][3]),
                            pack_pair<D>(s[1][0], s[1][1]), pack_pair<D>(s[1][2], s[1][3])};
#pragma unroll
    for (int nn = 0; nn < HD / 16; ++nn) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_tile + v_lane + nn * 32);
      mma_16816<D>(o[2 * nn], pa, vb[0], vb[1]);
      mma_16816<D>(o[2 * nn + 1], pa, vb[2], vb[3]);
    }
    slot = slot + 1 == kStages ? 0 : slot + 1;
  }
  cp_async_wait<0>();  // only empty groups can remain; drain them before the space is reused

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
  }

  // Merge the warps through shared memory, reusing the rings once every warp is done.
  __syncthreads();
  float* s_acc = reinterpret_cast<float*>(mma_smem);  // [kWarps][16][HD]
  float* s_ml = s_acc + kWarps * 16 * HD;              // [kWarps][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = qr + 8 * r;
    if (row >= group) continue;
    float* dst = s_acc + (warp * 16 + row) * HD + 2 * qc;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
    if (qc == 0) {
      s_ml[(warp * 16 + row) * 2] = m[r] * kLn2;  // natural-log units, as the partials hold
      s_ml[(warp * 16 + row) * 2 + 1] = l[r];
    }
  }
  __syncthreads();
  if (p.combine_in_kernel) {
    float* s_part = s_ml + kWarps * 16 * 2;  // [16][HD + 2], inside the rings (mma_decode_smem_bytes)
    merge_warp_partials<HD, 16, kWarps>(s_acc, s_ml, group, [&](int g, int e, device::SoftmaxState st, float a) {
      s_part[g * (HD + 2) + e] = a;
      if (e == 0) {
        s_part[g * (HD + 2) + HD] = st.m;
        s_part[g * (HD + 2) + HD + 1] = st.l;
      }
    });
    combine_cluster_partials<HD, kWarps * 32>(p, s_part, b, h, group);
  } else {
    store_split_partials<HD, 16, kWarps>(p, s_acc, s_ml, b, h, group, split);
  }
#endif
}

/// Grid `batch * H_q`, `HD` threads (one per output element): merges the splits' partials
/// and normalises. A head that saw no row writes zeros (as the CPU backend does).
///
/// The splits' maxima come first (loads independent of each other), then one pass weights
/// each split by `exp(m_s - max)`: no chain of loads through a running merge, so a head waits
/// for memory about twice however many splits it has; up to `kCombinePreload` splits, every
/// split's state is loaded before any arithmetic, so it waits once (H200, all-hit ShadowKV step
/// at B = 8, 128K: 3.1 -> 2.55 us). With one split the result is the split's
/// `acc / l`, bit for bit (its weight is exactly 1).
///
/// Performance: reads `num_splits * (HD + 2) * 4` bytes and writes `HD * sizeof(D)` per query
/// head — a few percent of the split kernel's bytes when splits hold hundreds of rows.
template <class D, int HD>
__global__ void __launch_bounds__(HD) decode_attention_combine_kernel(const DecodeAttentionParams<D> p) {
  wait_for_previous_grids();  // launched overlapping the split kernel
  const long long qh = blockIdx.x;
  const int e = threadIdx.x;
  const float* __restrict__ ml = p.partial_ml + qh * p.num_splits * 2;
  const float* __restrict__ acc = p.partial_acc + qh * p.num_splits * HD + e;
  float mx = -INFINITY;
  float l = 0.0f, a = 0.0f;
  if (p.num_splits <= kCombinePreload) {
    // Every split's state loaded before any arithmetic: one memory round trip, not two
    // dependent ones; then the same operations in the same order as below (same bits).
    float m_s[kCombinePreload], l_s[kCombinePreload], a_s[kCombinePreload];
#pragma unroll
    for (int s = 0; s < kCombinePreload; ++s) {
      const bool in = s < p.num_splits;
      m_s[s] = in ? ml[2 * s] : -INFINITY;
      l_s[s] = in ? ml[2 * s + 1] : 0.0f;
      a_s[s] = in ? acc[static_cast<long long>(s) * HD] : 0.0f;
    }
    p.out[qh * HD + e] = from_float<D>(combine_splits(m_s, l_s, a_s, p.num_splits));
    return;
  }
#pragma unroll 8
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, ml[2 * s]);
  if (mx != -INFINITY) {
#pragma unroll 8
    for (int s = 0; s < p.num_splits; ++s) {
      const float m_s = ml[2 * s];
      const float w = m_s == -INFINITY ? 0.0f : expf(m_s - mx);  // an empty split weighs nothing
      l += ml[2 * s + 1] * w;
      a += acc[static_cast<long long>(s) * HD] * w;
    }
  }
  p.out[qh * HD + e] = from_float<D>(l > 0.0f ? a / l : 0.0f);
}

}  // namespace kernels
}  // namespace shadowkv::cuda
