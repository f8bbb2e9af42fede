#pragma once
/// \file cuda/decode_attention.cuh
/// \brief Host launcher of the split-K decode attention (kernels/decode_attention.cuh): one
/// decode token per sequence, a ragged batch, exact softmax over each (sequence, KV head)'s
/// `KVSegments`.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../core/error.hpp"
#include "dispatch.cuh"
#include "error.cuh"
#include "kernels/decode_attention.cuh"
#include "launch.cuh"

namespace shadowkv::cuda {

/// How a launch splits the rows, and the workspace it needs.
struct DecodeAttentionPlan {
  int num_splits = 1;
  long long rows_per_split = 16;
  std::size_t workspace_bytes = 0;
};

namespace detail {
inline constexpr int kDecodeWarps = 4;  // warps of both split kernels
/// Rows per split are a multiple of this: the tensor-core kernel's 4 warps x 16-row tiles (and
/// a multiple of the float kernel's 4 warps x 8 rows per step).
inline constexpr long long kRowsGranule = kDecodeWarps * 16;
inline constexpr long long kMinRowsPerSplit = 256;
/// CTAs of the tensor-core kernel resident at once on an H200 (2 per SM x 132 SMs at d <= 128).
inline constexpr long long kResidentCtas = 264;
/// The split planner's fixed cost of a wave of CTAs, in rows (see `plan_decode_attention`).
inline constexpr long long kSplitOverheadRows = 256;

/// How many clusters of `c` CTAs of `Kernel` (`threads` per CTA, `smem` bytes) can be resident
/// at once, for c = 2 .. kernels::kCombinePreload, 8 bits each from bit 8 (c - 2) (capped at
/// 255); 0 where the device (before sm_90) or the kernel's build (PTX older than 9.0,
/// JIT-compiled here) has no clusters.
template <auto Kernel>
long long resident_clusters(int device, unsigned threads, std::size_t smem) {
  int major = 0;
  SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attr{};
  SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
  if (major < 9 || attr.ptxVersion < 90) return 0;
  long long packed = 0;
  for (int c = 2; c <= kernels::kCombinePreload; ++c)
    packed |= static_cast<long long>(std::min(max_active_clusters<Kernel>(static_cast<unsigned>(c), threads, smem), 255))
              << (8 * (c - 2));
  return packed;
}

inline int group_bound(int group) {
  for (int g : {1, 2, 4, 8, 16})
    if (group <= g) return g;
  return 0;
}

/// Rows per split for `splits` splits of `max_rows` rows, rounded up to the granule.
inline long long rows_for_splits(long long max_rows, long long splits) {
  const long long rows = std::max<long long>(1, (max_rows + splits - 1) / splits);
  return (rows + kRowsGranule - 1) / kRowsGranule * kRowsGranule;
}

inline DecodeAttentionPlan make_plan(int batch, int num_q_heads, int head_dim, long long max_rows,
                                     long long rows_per_split) {
  DecodeAttentionPlan plan;
  plan.rows_per_split = rows_per_split;
  plan.num_splits = static_cast<int>(std::max<long long>(1, (max_rows + rows_per_split - 1) / rows_per_split));
  const std::size_t heads = static_cast<std::size_t>(batch) * num_q_heads;
  plan.workspace_bytes = heads * plan.num_splits * (static_cast<std::size_t>(head_dim) + 2) * sizeof(float);
  return plan;
}
}  // namespace detail

/// Validates the shapes and picks the split by a cost model of the grid: the CTAs run in
/// `ceil(CTAs / kResidentCtas)` waves, and a wave lasts about as long as one CTA's rows plus
/// a fixed cost (`kSplitOverheadRows`: the pipeline's fill and drain, the partials, the
/// uneven finish of the CTAs of a wave). Among 1 .. `max_rows / kMinRowsPerSplit` splits it
/// takes the one of least `waves * (rows_per_split + kSplitOverheadRows)`, the fewest splits
/// on a tie. Measured on the H200 (bm_dense_splits, bm_shadowkv_attention_splits): one full
/// wave beats several (B = 1, 128K rows: 32 splits 0.156 ms, 128 splits 0.212 ms; ShadowKV's
/// ~2.5K rows at B = 8: 4 splits 39 us, 10 splits 47 us), while long dense rows at B = 8 vary
/// by ~3% across 8 to 66 splits. `max_rows` bounds `KVSegments::total_rows()` over the batch
/// (sequences with fewer rows leave their last splits empty).
inline DecodeAttentionPlan plan_decode_attention(int batch, int num_q_heads, int num_kv_heads, int head_dim,
                                                 long long max_rows) {
  SHADOWKV_CHECK(batch > 0, "batch=", batch, " must be positive");
  SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
  SHADOWKV_CHECK(num_q_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads=", num_q_heads,
                 " must be a positive multiple of num_kv_heads=", num_kv_heads);
  SHADOWKV_CHECK(detail::group_bound(num_q_heads / num_kv_heads) > 0, "num_q_heads/num_kv_heads=",
                 num_q_heads / num_kv_heads, " exceeds 16, the largest group the CUDA kernels support");
  check_kernel_head_dim(head_dim);
  SHADOWKV_CHECK(max_rows >= 0, "max_rows=", max_rows, " must be >= 0");
  const long long groups = static_cast<long long>(batch) * num_kv_heads;
  const long long most = std::max<long long>(1, (max_rows + detail::kMinRowsPerSplit - 1) / detail::kMinRowsPerSplit);
  long long best_rows = detail::rows_for_splits(max_rows, 1);
  long long best_cost = -1;
  auto consider = [&](long long s) {
    const long long rows = detail::rows_for_splits(max_rows, s);
    const long long splits = std::max<long long>(1, (max_rows + rows - 1) / rows);
    const long long waves = (groups * splits + detail::kResidentCtas - 1) / detail::kResidentCtas;
    const long long cost = waves * (rows + detail::kSplitOverheadRows);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_rows = rows;
    }
  };
  if (groups < detail::kResidentCtas) {
    // Within a wave count the most splits cost least, so only the largest s of each count is
    // a candidate: about groups * most / resident of them, not most.
    for (long long w = 1;; ++w) {
      if (best_cost >= 0 && w * detail::kSplitOverheadRows > best_cost) break;  // a plan of w waves costs more
      const long long s = std::min(most, std::max<long long>(1, w * detail::kResidentCtas / groups));
      consider(s);
      if (s == most) break;
    }
  } else {
    for (long long s = 1; s <= most; ++s) {
      // Every plan from here on costs at least groups * s * overhead / resident.
      if (best_cost >= 0 && groups * s * detail::kSplitOverheadRows > best_cost * detail::kResidentCtas) break;
      consider(s);
    }
  }
  return detail::make_plan(batch, num_q_heads, head_dim, max_rows, best_rows);
}

/// A plan with `num_splits` splits (rows per split rounded up to the kernels' granule of 64),
/// for tuning and benchmarks; `decode_attention` accepts it like the default plan.
inline DecodeAttentionPlan plan_decode_attention_with_splits(int batch, int num_q_heads, int num_kv_heads,
                                                             int head_dim, long long max_rows, int num_splits) {
  (void)plan_decode_attention(batch, num_q_heads, num_kv_heads, head_dim, max_rows);  // validates the shapes
  SHADOWKV_CHECK(num_splits >= 1, "num_splits=", num_splits, " must be positive");
  return detail::make_plan(batch, num_q_heads, head_dim, max_rows, detail::rows_for_splits(max_rows, num_splits));
}

/// Attention of `queries` `[batch, H_q, d]` (float, post-RoPE, device) over `segments`
/// `[batch * H_kv]` (device) into `out` `[batch, H_q, d]` (device). `plan` comes from
/// `plan_decode_attention` (or `plan_decode_attention_with_splits`) with the same shapes and
/// `max_rows`; `workspace` holds at least `plan.workspace_bytes`.
/// Asynchronous on `stream`; nothing is synchronised. bf16 and fp16 storage run the
/// tensor-core kernel, which rounds the scaled queries and the softmax weights to `D` before
/// the MMAs (as FlashAttention does; accumulation stays in float); float storage runs the
/// CUDA-core kernel, all in float. The splits' partials are merged by a second kernel, except
/// that the tensor-core kernel merges them itself with one split, or with up to 8 where the
/// device (sm_90+) can keep every cluster of a row's splits resident at once (the workspace
/// is then not touched). H200, all-hit ShadowKV ops at 128K (`bm_shadowkv_step`, 2026-11-26):
/// B = 14 (2 splits, merged in clusters of 2) 0.2106 ms against 0.2119 with the combine kernel;
/// at B = 8 (4 splits) only 62 of the 64 clusters of 4 fit at once, so the combine kernel
/// runs. `copy` (optional, up to 32 words) is copied once the kernels
/// before on `stream` are done (see `AttentionWordCopy`).
template <class D>
void decode_attention(const float* queries, const KVSegments<D>* segments, D* out, int batch, int num_q_heads,
                      int num_kv_heads, int head_dim, float scale, long long max_rows,
                      const DecodeAttentionPlan& plan, void* workspace, std::size_t workspace_bytes,
                      cudaStream_t stream, const AttentionWordCopy& copy = {}) {
  (void)plan_decode_attention(batch, num_q_heads, num_kv_heads, head_dim, max_rows);  // validates the shapes
  SHADOWKV_CHECK(plan.num_splits >= 1 && plan.rows_per_split >= detail::kRowsGranule &&
                     plan.rows_per_split % detail::kRowsGranule == 0,
                 "plan (num_splits=", plan.num_splits, ", rows_per_split=", plan.rows_per_split,
                 ") is not a plan: rows_per_split must be a positive multiple of ", detail::kRowsGranule);
  SHADOWKV_CHECK(static_cast<long long>(plan.num_splits) * plan.rows_per_split >= max_rows, "plan (num_splits=",
                 plan.num_splits, ", rows_per_split=", plan.rows_per_split, ") does not cover max_rows=", max_rows);
  SHADOWKV_CHECK(plan.num_splits <= 65535, "plan has num_splits=", plan.num_splits, " > 65535");
  const std::size_t required = static_cast<std::size_t>(batch) * num_q_heads * plan.num_splits *
                               (static_cast<std::size_t>(head_dim) + 2) * sizeof(float);
  SHADOWKV_CHECK(workspace_bytes >= required, "workspace_bytes=", workspace_bytes, " < required ", required);
  SHADOWKV_CHECK(queries && segments && out && workspace, "queries, segments, out and workspace must be non-null");
  SHADOWKV_CHECK(std::isfinite(scale) && scale > 0.0f, "scale=", scale, " must be finite and positive");
  SHADOWKV_CHECK(copy.words >= 0 && copy.words <= 32, "copy.words=", copy.words, " must be in [0, 32]");
  SHADOWKV_CHECK(copy.words == 0 || (copy.src && copy.dst), "copy.words=", copy.words,
                 " but copy.src or copy.dst is null");
  DecodeAttentionParams<D> p;
  p.copy = copy;
  p.queries = queries;
  p.out = out;
  p.segments = segments;
  p.batch = batch;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.num_splits = plan.num_splits;
  p.rows_per_split = plan.rows_per_split;
  p.scale = scale;
  const std::size_t heads = static_cast<std::size_t>(batch) * num_q_heads;
  p.partial_acc = static_cast<float*>(workspace);
  p.partial_ml = p.partial_acc + heads * plan.num_splits * head_dim;
  const int group = num_q_heads / num_kv_heads;
  const dim3 grid(plan.num_splits, static_cast<unsigned>(batch * num_kv_heads));
  constexpr int W = detail::kDecodeWarps;
  SHADOWKV_DISPATCH_HEAD_DIM(head_dim, HD, [&] {
    if constexpr (sizeof(D) == 2) {
      // bf16 / fp16: the tensor-core kernel (any G <= 16: query heads are MMA rows).
      constexpr auto kernel = kernels::decode_attention_mma_kernel<D, HD, W>;
      constexpr std::size_t smem = kernels::mma_decode_smem_bytes<HD, W>();
      // Once per device, not on every decode call: the attributes, then how many clusters of
      // c = 2 .. kCombinePreload CTAs can be resident at once (8 bits each from bit 8 (c - 2);
      // 0 where the device or this build has no clusters).
      const long long resident = kernel_setting_per_device<kernel>([](int device) {
        SHADOWKV_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        // All of the unified L1/shared space as shared memory: two CTAs per SM at d <= 128 need
        // about 210 KB, and the copies bypass L1 (cp.async.cg).
        SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                 cudaSharedmemCarveoutMaxShared));
        return detail::resident_clusters<kernel>(device, detail::kDecodeWarps * 32, smem);
      });
      // The splits merge inside the kernel where a cluster can hold a row's splits and every
      // cluster of the grid is resident at once (else the combine kernel below does it).
      const int splits = plan.num_splits;
      const long long clusters = splits >= 2 && splits <= kernels::kCombinePreload
                                     ? (resident >> (8 * (splits - 2))) & 0xff
                                     : 0;
      p.combine_in_kernel = splits == 1 || clusters * splits >= static_cast<long long>(grid.x) * grid.y;
      launch_kernel<kernel>(grid, dim3(W * 32), smem, stream, p.combine_in_kernel ? static_cast<unsigned>(splits) : 1u,
                            p, group);
    } else {
      // float: the CUDA-core kernel, its register arrays sized by G rounded up to a power of 2.
      auto launch = [&]<int GMAX>() {
        constexpr auto kernel = kernels::decode_attention_split_kernel<D, HD, GMAX, W>;
        constexpr std::size_t smem = static_cast<std::size_t>(W) * GMAX * (HD + 2) * sizeof(float);
        if constexpr (smem > 48 * 1024)
          (void)kernel_setting_per_device<kernel>([](int) {
            SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem)));
            return 0;
          });
        launch_kernel<kernel>(grid, dim3(W * 32), smem, stream, 1u, p, group);
      };
      switch (detail::group_bound(group)) {
        case 1: launch.template operator()<1>(); break;
        case 2: launch.template operator()<2>(); break;
        case 4: launch.template operator()<4>(); break;
        case 8: launch.template operator()<8>(); break;
        default: launch.template operator()<16>(); break;
      }
    }
    if (!p.combine_in_kernel)
      launch_kernel<kernels::decode_attention_combine_kernel<D, HD>>(dim3(static_cast<unsigned>(heads)), dim3(HD), 0,
                                                                    stream, 1u, p);
  });
}

}  // namespace shadowkv::cuda
