#pragma once
/// \file cuda/kernels/attention_steps.cuh
/// \brief The small kernels `SparseAttention<Policy, CudaBackend, T>` strings between the big
/// ones: RoPE of rows at their positions (queries to float, keys appended to a sequence's
/// generated rows), row gathers from token-major prompts into head-major sets (the static set,
/// the offloaded values in pinned host memory), the record of a step's selection, and the
/// oracle policy's exact chunk scores.

#include <cuda_runtime.h>

#include <cstdint>

#include "../../device/rope.hpp"
#include "../types.cuh"
#include "grid_dependency.cuh"
#include "selection_record.cuh"

namespace shadowkv::cuda {

/// RoPE as kernels take it: the table's frequencies on the device (`inv_freq == nullptr`:
/// no rotation, a plain copy/convert).
struct RowRope {
  const float* inv_freq = nullptr;  ///< [rotary_dim / 2], device
  int rotary_dim = 0;
  bool interleaved = false;
  float attention_scale = 1.0f;
};

/// `n` token rows of `heads × d` to rotate (or copy) from `src` to `dst`.
template <class In, class Out>
struct RopeRowsParams {
  const In* src = nullptr;
  long long src_stride = 0;        ///< elements between tokens of src
  Out* dst = nullptr;              ///< used when dst_rows is null
  long long dst_stride = 0;        ///< elements between tokens of dst
  Out* const* dst_rows = nullptr;  ///< optional [n]: token t goes to dst_rows[t] (`heads × d`)
  int n = 0;
  int heads = 0;
  int head_dim = 0;
  long long first_position = 0;        ///< position of token t: first_position + t ...
  const long long* positions = nullptr;  ///< ... or positions[t] when non-null
  RowRope rope;
};

/// Row gathers into head-major `[H_kv, rows_per_head, d]`: per head, first the chunks of a
/// per-head list (each `chunk_size` tokens), then the token range `[range_begin, range_end)`.
template <class DT>
struct GatherRowsParams {
  const DT* src = nullptr;    ///< token-major `[*, H_kv, d]`
  long long src_stride = 0;   ///< elements between tokens
  DT* dst = nullptr;          ///< `[H_kv, rows_per_head, d]` (device or mapped host memory)
  long long rows_per_head = 0;
  const std::int32_t* chunk_ids = nullptr;  ///< [H_kv, num_list_chunks] (may be null when 0)
  long long num_list_chunks = 0;
  int chunk_size = 1;
  long long range_begin = 0, range_end = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

namespace kernels {

/// Elements `first, first + stride, ...` of `p`'s rows, one per thread: element e of a rotated
/// pair takes its partner from src.
template <class In, class Out>
__device__ __forceinline__ void rope_rows(const RopeRowsParams<In, Out>& p, long long first, long long stride) {
  const long long per_token = static_cast<long long>(p.heads) * p.head_dim;
  const long long total = per_token * p.n;
  const int half = p.rope.inv_freq ? p.rope.rotary_dim / 2 : 0;
  for (long long idx = first; idx < total; idx += stride) {
    const int t = static_cast<int>(idx / per_token);
    const long long within = idx - t * per_token;
    const int e = static_cast<int>(within % p.head_dim);
    const long long head_base = within - e;
    const In* row = p.src + t * p.src_stride + head_base;
    float x = to_float(row[e]);
    if (e < 2 * half) {
      int pair, partner;
      bool first_of_pair;
      if (p.rope.interleaved) {
        pair = e / 2;
        first_of_pair = (e % 2) == 0;
        partner = first_of_pair ? e + 1 : e - 1;
      } else {
        pair = e < half ? e : e - half;
        first_of_pair = e < half;
        partner = first_of_pair ? e + half : e - half;
      }
      const long long pos = p.positions ? p.positions[t] : p.first_position + t;
      float cos_a, sin_a;
      device::rope_cos_sin(pos, p.rope.inv_freq[pair], p.rope.attention_scale, cos_a, sin_a);
      const float y = to_float(row[partner]);
      float x0 = first_of_pair ? x : y, x1 = first_of_pair ? y : x;
      device::rotate_pair(x0, x1, cos_a, sin_a);
      x = first_of_pair ? x0 : x1;
    }
    Out* dst = p.dst_rows ? p.dst_rows[t] : p.dst + t * p.dst_stride;
    dst[head_base + e] = from_float<Out>(x);
  }
}

/// `rope_rows` over a grid-stride loop.
template <class In, class Out>
__global__ void rope_rows_kernel(const RopeRowsParams<In, Out> p) {
  rope_rows(p, blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x,
            static_cast<long long>(gridDim.x) * blockDim.x);
}

/// The three row copies of a decode step in one launch, `blockIdx.y` choosing the task: the
/// queries rotated to float (`q`), the new keys rotated into the generated rows (`k`), the new
/// values copied there (`v`, no rotation). Saves two launches and the gaps between them per
/// layer and step. Launched overlapping the kernel before it (programmatic dependent launch,
/// cuda/launch.cuh): its CTAs are resident when that kernel ends and wait for it before
/// touching memory; the scoring kernel after it may be resident likewise.
template <class D>
__global__ void decode_rope_kernel(const RopeRowsParams<D, float> q, const RopeRowsParams<D, D> k,
                                   const RopeRowsParams<D, D> v) {
  wait_for_previous_grids();
  allow_next_grid();
  const long long first = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  if (blockIdx.y == 0) rope_rows(q, first, stride);
  else if (blockIdx.y == 1) rope_rows(k, first, stride);
  else rope_rows(v, first, stride);
}

/// One thread per element of the destination.
template <class DT>
__global__ void gather_rows_kernel(const GatherRowsParams<DT> p) {
  const long long per_head = p.rows_per_head * p.head_dim;
  const long long total = per_head * p.num_kv_heads;
  const long long list_rows = p.num_list_chunks * p.chunk_size;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int h = static_cast<int>(idx / per_head);
    const long long within = idx - h * per_head;
    const long long r = within / p.head_dim;
    const int e = static_cast<int>(within - r * p.head_dim);
    long long token;
    if (r < list_rows) {
      const long long q = r / p.chunk_size;
      token = static_cast<long long>(p.chunk_ids[h * p.num_list_chunks + q]) * p.chunk_size + (r - q * p.chunk_size);
    } else {
      token = p.range_begin + (r - list_rows);
    }
    p.dst[idx] = p.src[token * p.src_stride + static_cast<long long>(h) * p.head_dim + e];
  }
}

/// Grid (H_kv, batch): writes each selected landmark's prompt chunk (`selected` `[batch, H_kv,
/// k]`, -1 padded; may be null when k = 0) to the sequence's record and, when `slot_lists` is
/// given (the oracle), `[outlier chunks..., selected chunks...]` to
/// `slot_lists[(b·H_kv + h)·list_stride ...]`.
template <class Id = std::int32_t>
__global__ void record_selection_kernel(const SelectionRecordSequence* seqs, const Id* selected, int k,
                                        int num_kv_heads, Id* slot_lists, int list_stride) {
  const int h = blockIdx.x, b = blockIdx.y;
  const long long row = static_cast<long long>(b) * num_kv_heads + h;
  write_selection_record(seqs[b], selected + row * k, k, h, static_cast<int>(threadIdx.x),
                         static_cast<int>(blockDim.x), slot_lists ? slot_lists + row * list_stride : nullptr);
}

/// What the oracle scoring reads of one sequence: its exact prompt keys and landmark chunks.
template <class DT>
struct OracleSequence {
  const DT* keys = nullptr;  ///< [H_kv, prompt_rows, d] post-RoPE, head-major
  long long prompt_rows = 0;
  const std::int32_t* landmark_chunk_ids = nullptr;  ///< [H_kv, M]
  int num_landmarks = 0;
  long long score_offset = 0;  ///< into scores [.. H_kv·M ..]; chunk LSEs at G·score_offset
};

/// One warp per (sequence, KV head, landmark): for each of the G query heads, the log-sum-exp
/// of the scaled logits of the chunk's `c` keys, into `lse[G·off + (h·G + g)·M + m]`.
template <class DT>
__global__ void oracle_chunk_lse_kernel(const OracleSequence<DT>* seqs, const float* queries, int num_q_heads,
                                        int num_kv_heads, int head_dim, int chunk_size, float scale, int max_landmarks,
                                        float* lse) {
  const int warps = blockDim.x / 32;
  const long long item = static_cast<long long>(blockIdx.x) * warps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int b = blockIdx.y;
  const OracleSequence<DT> s = seqs[b];
  const int h = static_cast<int>(item / max_landmarks);
  const int m = static_cast<int>(item % max_landmarks);
  if (h >= num_kv_heads || m >= s.num_landmarks) return;
  const int group = num_q_heads / num_kv_heads;
  const long long first = static_cast<long long>(s.landmark_chunk_ids[static_cast<long long>(h) * s.num_landmarks + m]) *
                          chunk_size;
  const DT* keys = s.keys + (static_cast<long long>(h) * s.prompt_rows + first) * head_dim;
  for (int g = 0; g < group; ++g) {
    const float* q = queries + (static_cast<long long>(b) * num_q_heads + h * group + g) * head_dim;
    float mx = -INFINITY, sum = 0.0f;
    for (int t = 0; t < chunk_size; ++t) {
      float dot = 0.0f;
      for (int e = lane; e < head_dim; e += 32) dot += q[e] * to_float(keys[static_cast<long long>(t) * head_dim + e]);
      for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      const float logit = dot * scale;
      const float nm = fmaxf(mx, logit);
      sum = sum * __expf(mx - nm) + __expf(logit - nm);
      mx = nm;
    }
    if (lane == 0)
      lse[group * s.score_offset + (static_cast<long long>(h) * group + g) * s.num_landmarks + m] = mx + logf(sum);
  }
}

/// Grid (H_kv, batch), 256 threads: per query head the log-sum-exp over all landmark chunks,
/// then `scores[off + h·M + m] = max_g exp(lse_g[m] - total_g)` — each chunk's exact share of
/// the attention over the indexed region, max over the group (as the CPU oracle computes it).
template <class DT>
__global__ void oracle_scores_kernel(const OracleSequence<DT>* seqs, int num_q_heads, int num_kv_heads,
                                     const float* lse, float* scores) {
  constexpr int kThreads = 256;
  __shared__ float s_red[kThreads / 32];
  __shared__ float s_total[16];
  const int h = blockIdx.x, b = blockIdx.y;
  const OracleSequence<DT> s = seqs[b];
  const int group = num_q_heads / num_kv_heads;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int g = 0; g < group; ++g) {
    const float* row = lse + group * s.score_offset + (static_cast<long long>(h) * group + g) * s.num_landmarks;
    float mx = -INFINITY;
    for (int m = threadIdx.x; m < s.num_landmarks; m += kThreads) mx = fmaxf(mx, row[m]);
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) s_red[warp] = mx;
    __syncthreads();
    mx = s_red[0];
    for (int w = 1; w < kThreads / 32; ++w) mx = fmaxf(mx, s_red[w]);
    __syncthreads();
    float sum = 0.0f;
    for (int m = threadIdx.x; m < s.num_landmarks; m += kThreads) sum += __expf(row[m] - mx);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) s_red[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) total += s_red[w];
      s_total[g] = mx + logf(total);
    }
    __syncthreads();
  }
  for (int m = threadIdx.x; m < s.num_landmarks; m += kThreads) {
    float best = 0.0f;
    for (int g = 0; g < group; ++g)
      best = fmaxf(best, __expf(lse[group * s.score_offset + (static_cast<long long>(h) * group + g) * s.num_landmarks + m] -
                                s_total[g]));
    scores[s.score_offset + static_cast<long long>(h) * s.num_landmarks + m] = best;
  }
}

}  // namespace kernels
}  // namespace shadowkv::cuda
