#pragma once
/// \file cuda/kernels/decode_attention.cuh
/// \brief Split-K (flash-decoding) attention of one decode token per sequence over the rows of
/// a `KVSegments` set: static rows, selected chunks in device slots, generated rows. The same
/// kernel serves `DensePolicy` (static = the whole cache) and `ShadowKVPolicy`.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../device/softmax.hpp"
#include "../types.cuh"

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
};

namespace kernels {

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
  for (int idx = threadIdx.x; idx < group * HD; idx += kWarps * 32) {
    const int g = idx / HD, e = idx % HD;
    device::SoftmaxState st = device::empty_softmax_state();
    float a = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      float sa, sb;
      const device::SoftmaxState other{s_ml[(w * GMAX + g) * 2], s_ml[(w * GMAX + g) * 2 + 1]};
      st = device::merge_softmax_state(st, other, sa, sb);
      a = a * sa + s_acc[(w * GMAX + g) * HD + e] * sb;
    }
    const long long qh = static_cast<long long>(b) * p.num_q_heads + h * group + g;
    p.partial_acc[(qh * p.num_splits + split) * HD + e] = a;
    if (e == 0) {
      p.partial_ml[(qh * p.num_splits + split) * 2] = st.m;
      p.partial_ml[(qh * p.num_splits + split) * 2 + 1] = st.l;
    }
  }
}

/// Grid `batch * H_q`, `HD` threads (one per output element): merges the splits' partials
/// and normalises. A head that saw no row writes zeros (as the CPU backend does).
///
/// Performance: reads `num_splits * (HD + 2) * 4` bytes and writes `HD * sizeof(D)` per query
/// head — a few percent of the split kernel's bytes when splits hold hundreds of rows.
template <class D, int HD>
__global__ void __launch_bounds__(HD) decode_attention_combine_kernel(const DecodeAttentionParams<D> p) {
  const long long qh = blockIdx.x;
  const int e = threadIdx.x;
  device::SoftmaxState st = device::empty_softmax_state();
  float a = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) {
    float sa, sb;
    const device::SoftmaxState other{p.partial_ml[(qh * p.num_splits + s) * 2],
                                     p.partial_ml[(qh * p.num_splits + s) * 2 + 1]};
    st = device::merge_softmax_state(st, other, sa, sb);
    a = a * sa + p.partial_acc[(qh * p.num_splits + s) * HD + e] * sb;
  }
  p.out[qh * HD + e] = from_float<D>(st.l > 0.0f ? a / st.l : 0.0f);
}

}  // namespace kernels
}  // namespace shadowkv::cuda
