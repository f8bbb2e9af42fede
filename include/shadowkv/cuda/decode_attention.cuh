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

namespace shadowkv::cuda {

/// How a launch splits the rows, and the workspace it needs.
struct DecodeAttentionPlan {
  int num_splits = 1;
  long long rows_per_split = 16;
  std::size_t workspace_bytes = 0;
};

namespace detail {
inline constexpr int kDecodeWarps = 4;
inline constexpr long long kRowsGranule = kDecodeWarps * 8;  // warps x rows per warp step (at most)
inline constexpr long long kMinRowsPerSplit = 256;
inline constexpr long long kTargetCtas = 1056;  // ~8 per SM on a 132-SM H200

inline int group_bound(int group) {
  for (int g : {1, 2, 4, 8, 16})
    if (group <= g) return g;
  return 0;
}
}  // namespace detail

/// Validates the shapes and picks the split: enough CTAs to fill the GPU (about 8 per SM)
/// without splits shorter than 256 rows. `max_rows` bounds `KVSegments::total_rows()` over the
/// batch (sequences with fewer rows leave their last splits empty).
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
  DecodeAttentionPlan plan;
  const long long groups = static_cast<long long>(batch) * num_kv_heads;
  const long long wanted = std::max<long long>(1, (detail::kTargetCtas + groups - 1) / groups);
  const long long most = std::max<long long>(1, (max_rows + detail::kMinRowsPerSplit - 1) / detail::kMinRowsPerSplit);
  const long long splits = std::min(wanted, most);
  long long rows = std::max<long long>(1, (max_rows + splits - 1) / splits);
  rows = (rows + detail::kRowsGranule - 1) / detail::kRowsGranule * detail::kRowsGranule;
  plan.rows_per_split = rows;
  plan.num_splits = static_cast<int>(std::max<long long>(1, (max_rows + rows - 1) / rows));
  const std::size_t heads = static_cast<std::size_t>(batch) * num_q_heads;
  plan.workspace_bytes = heads * plan.num_splits * (static_cast<std::size_t>(head_dim) + 2) * sizeof(float);
  return plan;
}

/// Attention of `queries` `[batch, H_q, d]` (float, post-RoPE, device) over `segments`
/// `[batch * H_kv]` (device) into `out` `[batch, H_q, d]` (device). `workspace` holds at least
/// `plan.workspace_bytes` (from `plan_decode_attention` with the same shapes and `max_rows`).
/// Asynchronous on `stream`; nothing is synchronised.
template <class D>
void decode_attention(const float* queries, const KVSegments<D>* segments, D* out, int batch, int num_q_heads,
                      int num_kv_heads, int head_dim, float scale, long long max_rows,
                      const DecodeAttentionPlan& plan, void* workspace, std::size_t workspace_bytes,
                      cudaStream_t stream) {
  const DecodeAttentionPlan check = plan_decode_attention(batch, num_q_heads, num_kv_heads, head_dim, max_rows);
  SHADOWKV_CHECK(plan.num_splits == check.num_splits && plan.rows_per_split == check.rows_per_split,
                 "plan does not match the shapes (num_splits=", plan.num_splits, ", expected ", check.num_splits, ")");
  SHADOWKV_CHECK(workspace_bytes >= check.workspace_bytes, "workspace_bytes=", workspace_bytes, " < required ",
                 check.workspace_bytes);
  SHADOWKV_CHECK(queries && segments && out && workspace, "queries, segments, out and workspace must be non-null");
  SHADOWKV_CHECK(std::isfinite(scale) && scale > 0.0f, "scale=", scale, " must be finite and positive");
  DecodeAttentionParams<D> p;
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
  SHADOWKV_DISPATCH_HEAD_DIM(head_dim, HD, [&] {
    auto launch = [&]<int GMAX>() {
      constexpr int W = detail::kDecodeWarps;
      auto* kernel = kernels::decode_attention_split_kernel<D, HD, GMAX, W>;
      const std::size_t smem = static_cast<std::size_t>(W) * GMAX * (HD + 2) * sizeof(float);
      if (smem > 48 * 1024)
        SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)));
      const dim3 grid(plan.num_splits, static_cast<unsigned>(batch * num_kv_heads));
      kernel<<<grid, W * 32, smem, stream>>>(p, group);
      SHADOWKV_CUDA_CHECK_LAUNCH();
      kernels::decode_attention_combine_kernel<D, HD><<<static_cast<unsigned>(heads), HD, 0, stream>>>(p);
      SHADOWKV_CUDA_CHECK_LAUNCH();
    };
    switch (detail::group_bound(group)) {
      case 1: launch.template operator()<1>(); break;
      case 2: launch.template operator()<2>(); break;
      case 4: launch.template operator()<4>(); break;
      case 8: launch.template operator()<8>(); break;
      default: launch.template operator()<16>(); break;
    }
  });
}

}  // namespace shadowkv::cuda
