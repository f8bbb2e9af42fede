#pragma once
/// \file cuda/miss_ops.cuh
/// \brief Host launchers of a decode step's miss path on the GPU, for a ragged batch: rebuild
/// the keys of the missed chunks from the low-rank store with RoPE fused
/// (kernels/rebuild_keys.cuh), and gather their values from mapped pinned host memory
/// (kernels/gather_values.cuh). Both read one flat `ChunkMiss` list; `rebuild_keys_beside_gather`
/// runs them side by side in one launch, so that the rebuild hides under the PCIe-bound fetch.
///
/// Every launcher validates its arguments before any CUDA call (a bad argument throws
/// `shadowkv::Error` naming it, and nothing is launched), checks every CUDA call and launch,
/// and never synchronises: the work is queued on the given stream. Indices inside the miss
/// list and the per-sequence descriptors live on the device and are checked by the kernels
/// (see `maybe_num_invalid`).

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/error.hpp"
#include "../core/rope.hpp"
#include "dispatch.cuh"
#include "error.cuh"
#include "kernels/gather_values.cuh"
#include "kernels/rebuild_keys.cuh"
#include "launch.cuh"

namespace shadowkv::cuda {

namespace detail {

template <class D>
inline constexpr bool is_kernel_storage_type_v =
    std::is_same_v<D, float> || std::is_same_v<D, __nv_bfloat16> || std::is_same_v<D, __half>;

/// The basis is kept whole in shared memory up to this size (r = 160, d = 128 is 42.5 KiB in
/// bf16 with its padded rows, 80 KiB in fp32); larger ones stream through it with A.
inline constexpr std::size_t kRebuildResidentBasisBytes = 100 * 1024;
/// Tokens per chunk the miss kernels accept (row counts stay in 32-bit ints).
inline constexpr int kMaxMissChunkSize = 1 << 16;
/// Rebuild CTAs per SM (one wave, each looping over its share): two keep the tensor cores and
/// the loads busy and leave room for a gather CTA on the same SM (`rebuild_keys_beside_gather`).
inline constexpr int kRebuildCtasPerSm = 2;
/// Gather CTAs per SM: 8 warps each, 2 KiB in flight per warp, i.e. ≈ 4 MB over the GPU,
/// far above the ≈ 100-200 KB that PCIe needs in flight, in few registers.
inline constexpr int kGatherCtasPerSm = 2;

inline void check_miss_list(int num_misses, const void* misses, int num_sequences, const void* sequences) {
  SHADOWKV_CHECK(num_misses >= 0, "num_misses=", num_misses, " must be >= 0");
  if (num_misses == 0) return;
  SHADOWKV_CHECK(misses != nullptr, "misses is null but num_misses=", num_misses);
  SHADOWKV_CHECK(num_sequences > 0, "num_sequences=", num_sequences, " must be positive");
  SHADOWKV_CHECK(sequences != nullptr, "sequences is null but num_sequences=", num_sequences);
}

}  // namespace detail

/// `RebuildRope` for `table`, whose `inv_freq` the caller has copied to `inv_freq_device`
/// (`table.rotary_dim / 2` floats).
inline RebuildRope make_rebuild_rope(const RopeTable& table, const float* inv_freq_device) {
  SHADOWKV_CHECK(inv_freq_device != nullptr, "inv_freq_device is null");
  SHADOWKV_CHECK(static_cast<int>(table.inv_freq.size()) * 2 == table.rotary_dim, "RopeTable has ",
                 table.inv_freq.size(), " frequencies for rotary_dim=", table.rotary_dim);
  RebuildRope rope;
  rope.inv_freq = inv_freq_device;
  rope.rotary_dim = table.rotary_dim;
  rope.interleaved = table.layout == RopeLayout::interleaved;
  rope.attention_scale = table.attention_scale;
  return rope;
}

/// Throws `shadowkv::Error` naming the first invalid field of `p`; makes no CUDA call.
/// Checks head_dim in {64, 96, 128, 256}, num_kv_heads > 0, rank in [1, num_kv_heads*head_dim],
/// chunk_size in [1, 65536], num_misses >= 0, the list and descriptor pointers when there are
/// misses, and with RoPE an even rotary_dim in [2, head_dim] and a finite attention_scale.
template <class D>
void check_rebuild_keys_params(const RebuildKeysParams<D>& p) {
  static_assert(detail::is_kernel_storage_type_v<D>, "D must be float, __nv_bfloat16 or __half");
  check_kernel_head_dim(p.head_dim);
  SHADOWKV_CHECK(p.num_kv_heads > 0, "num_kv_heads=", p.num_kv_heads, " must be positive");
  SHADOWKV_CHECK(p.rank >= 1 && static_cast<long long>(p.rank) <= static_cast<long long>(p.num_kv_heads) * p.head_dim,
                 "rank=", p.rank, " must be in [1, num_kv_heads*head_dim=",
                 static_cast<long long>(p.num_kv_heads) * p.head_dim, "]");
  SHADOWKV_CHECK(p.chunk_size >= 1 && p.chunk_size <= detail::kMaxMissChunkSize, "chunk_size=", p.chunk_size,
                 " must be in [1, ", detail::kMaxMissChunkSize, "]");
  detail::check_miss_list(p.num_misses, p.misses, p.num_sequences, p.sequences);
  if (p.rope.inv_freq) {
    SHADOWKV_CHECK(p.rope.rotary_dim >= 2 && p.rope.rotary_dim <= p.head_dim && p.rope.rotary_dim % 2 == 0,
                   "rope.rotary_dim=", p.rope.rotary_dim, " must be even and in [2, head_dim=", p.head_dim, "]");
    SHADOWKV_CHECK(std::isfinite(p.rope.attention_scale), "rope.attention_scale=", p.rope.attention_scale,
                   " must be finite");
  }
}

/// Throws `shadowkv::Error` naming the first invalid field of `p`; makes no CUDA call.
/// Checks num_kv_heads > 0, head_dim > 0 (any head dim: the copy is bytewise), chunk_size in
/// [1, 65536], num_misses >= 0 and the list and descriptor pointers when there are misses.
template <class D>
void check_gather_values_params(const GatherValuesParams<D>& p) {
  static_assert(detail::is_kernel_storage_type_v<D>, "D must be float, __nv_bfloat16 or __half");
  SHADOWKV_CHECK(p.head_dim > 0, "head_dim=", p.head_dim, " must be positive");
  SHADOWKV_CHECK(p.num_kv_heads > 0, "num_kv_heads=", p.num_kv_heads, " must be positive");
  SHADOWKV_CHECK(p.chunk_size >= 1 && p.chunk_size <= detail::kMaxMissChunkSize, "chunk_size=", p.chunk_size,
                 " must be in [1, ", detail::kMaxMissChunkSize, "]");
  detail::check_miss_list(p.num_misses, p.misses, p.num_sequences, p.sequences);
}

namespace detail {

/// `gather_values`'s launch (the caller checked the parameters).
template <class D>
void launch_gather_values(const GatherValuesParams<D>& p, cudaStream_t stream) {
  if (p.num_misses == 0) return;
  constexpr int kWarps = kernels::kGatherWarps;
  int device = 0;
  int sms = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const long long wanted = (static_cast<long long>(p.num_misses) + kWarps - 1) / kWarps;
  const unsigned grid =
      static_cast<unsigned>(std::min<long long>(wanted, static_cast<long long>(sms) * detail::kGatherCtasPerSm));
  kernels::gather_values_kernel<D><<<grid, kWarps * 32, 0, stream>>>(p);
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

/// What a rebuild launch of `smem` bytes needs from the device: its SM count and the CTAs of
/// that size resident per SM.
struct RebuildSetting {
  int sms = 0;
  int per_sm = 0;
};

/// `Kernel`'s `RebuildSetting` for `smem` bytes of dynamic shared memory, computed once per
/// (device, smem) — the decode step asks on every call — after raising the kernel's dynamic
/// shared memory limit to the largest `smem` asked for on that device (always raised: the
/// kernel's static shared memory counts against the 48 KiB default as well). A cache per
/// kernel copy, as `kernel_setting_per_device` explains.
template <auto Kernel>
RebuildSetting rebuild_setting(int threads, std::size_t smem) {
  struct Entry {
    int device;
    std::size_t smem;
    RebuildSetting setting;
  };
  static std::mutex mutex;
  static std::vector<Entry> entries;
  static std::vector<std::pair<int, std::size_t>> raised;  // (device, attribute set so far)
  int device = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : entries)
    if (e.device == device && e.smem == smem) return e.setting;
  auto limit = std::find_if(raised.begin(), raised.end(), [&](const auto& r) { return r.first == device; });
  if (limit == raised.end()) limit = raised.insert(raised.end(), {device, 0});
  if (limit->second < smem) {
    SHADOWKV_CUDA_CHECK(
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    limit->second = smem;
  }
  RebuildSetting setting;
  SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&setting.sms, cudaDevAttrMultiProcessorCount, device));
  SHADOWKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&setting.per_sm, Kernel, threads, smem));
  entries.push_back({device, smem, setting});
  return setting;
}

/// `rebuild_keys`'s launch (the caller checked the parameters), with a programmatic dependency on
/// the kernel before. With `gather`, the value gather of the same misses joins the launch as
/// extra CTAs, one per SM beside the rebuild's, so that both halves run side by side; where a
/// rebuild CTA cannot share an SM with another CTA, the gather is launched after it instead.
template <class D>
void launch_rebuild_keys(const RebuildKeysParams<D>& p, const GatherValuesParams<D>* gather, cudaStream_t stream) {
  if (p.num_misses == 0) return;
  SHADOWKV_DISPATCH_HEAD_DIM(p.head_dim, HD, [&] {
    using Tile = kernels::RebuildTile<D, HD>;
    const int rank_aligned = (p.rank + Tile::kRankAlign - 1) / Tile::kRankAlign * Tile::kRankAlign;
    const std::size_t basis_row_bytes = static_cast<std::size_t>(Tile::kBStride) * sizeof(D);
    const bool resident = rank_aligned * basis_row_bytes <= detail::kRebuildResidentBasisBytes;
    const int basis_rows = resident ? rank_aligned : Tile::kRankStep;
    const std::size_t smem = basis_rows * basis_row_bytes + static_cast<std::size_t>(kernels::kRebuildStageBytes<Tile>);
    const RebuildSetting setting = rebuild_setting<kernels::rebuild_keys_kernel<D, HD>>(Tile::kThreads, smem);
    const int sms = setting.sms, per_sm = setting.per_sm;
    SHADOWKV_CHECK(per_sm > 0, "rebuild_keys: a CTA of ", Tile::kThreads, " threads with ", smem,
                   " bytes of shared memory does not fit on this device (head_dim=", HD, ", rank=", p.rank, ")");
    // One wave: with the gather joined, one of the SM's CTAs gathers and the others (at most
    // kRebuildCtasPerSm) rebuild; alone, at most kRebuildCtasPerSm rebuild. Each rebuild CTA
    // takes an equal share of the misses, whole row tiles of them.
    const bool joined = gather != nullptr && per_sm >= 2;
    const int rebuild_per_sm = std::min(joined ? per_sm - 1 : per_sm, detail::kRebuildCtasPerSm);
    const int misses_per_tile = std::max(1, kernels::kRebuildTileRows / p.chunk_size);
    const long long ctas = static_cast<long long>(sms) * rebuild_per_sm;
    long long per_cta = (p.num_misses + ctas - 1) / ctas;
    per_cta = std::max<long long>(misses_per_tile, (per_cta + misses_per_tile - 1) / misses_per_tile * misses_per_tile);
    const int misses_per_block = static_cast<int>(std::min<long long>(per_cta, p.num_misses));
    const int rebuild_grid = static_cast<int>((p.num_misses + misses_per_block - 1) / misses_per_block);
    int gather_grid = 0;
    if (joined && gather->num_misses > 0) {
      constexpr int kWarps = Tile::kThreads / 32;
      gather_grid = static_cast<int>(
          std::min<long long>((static_cast<long long>(gather->num_misses) + kWarps - 1) / kWarps, sms));
    }
    launch_kernel<kernels::rebuild_keys_kernel<D, HD>>(
        dim3(static_cast<unsigned>(rebuild_grid + gather_grid)), dim3(Tile::kThreads), smem, stream, 1u, p,
        misses_per_block, basis_rows, joined ? *gather : GatherValuesParams<D>{}, rebuild_grid);
    if (gather && !joined) launch_gather_values(*gather, stream);
  });
}

}  // namespace detail

/// Rebuilds the keys of every miss of `p.misses` with RoPE into its key slot:
/// for miss (seq, h, m, s) and t in [0, c), with p = m * c + t,
/// `key_slots_seq[h][s][t][:] = D(rope_p(A_seq[p, :] · basis_seq[h]))` (`[H_kv, capacity, c, d]`
/// slots; products and sums in float (tensor cores for bf16/fp16, FMAs for fp32), RoPE with the
/// shared `device::` functions, so the keys equal
/// `LowRankKeyStore<CpuBackend>::reconstruct(h, positions, out, &table)` to float rounding).
/// Nothing else is written. Asynchronous on `stream`.
template <class D>
void rebuild_keys(const RebuildKeysParams<D>& p, cudaStream_t stream) {
  check_rebuild_keys_params(p);
  detail::launch_rebuild_keys<D>(p, nullptr, stream);
}

/// Copies the values of every miss of `p.misses` from the host chunk to its value slot:
/// for miss (seq, h, m, s), `value_slots_seq[h][s] = host_values_seq[h][m]` (`[c, d]`, bit for
/// bit; host `[H_kv, num_chunks, c, d]` read zero-copy over PCIe, slots `[H_kv, capacity, c, d]`).
/// Nothing else is written. Asynchronous on `stream`.
template <class D>
void gather_values(const GatherValuesParams<D>& p, cudaStream_t stream) {
  check_gather_values_params(p);
  detail::launch_gather_values(p, stream);
}

/// `rebuild_keys(rp, stream)` and `gather_values(gp, stream)` over the same miss list, side by
/// side in one launch on `stream`: one CTA per SM copies values while the others rebuild keys
/// (where a rebuild CTA cannot share an SM, the gather follows the rebuild instead). What
/// follows on `stream` sees both done.
template <class D>
void rebuild_keys_beside_gather(const RebuildKeysParams<D>& rp, const GatherValuesParams<D>& gp,
                                cudaStream_t stream) {
  check_rebuild_keys_params(rp);
  check_gather_values_params(gp);
  if (rp.num_misses == 0) {
    detail::launch_gather_values(gp, stream);
    return;
  }
  detail::launch_rebuild_keys(rp, &gp, stream);
}
}  // namespace shadowkv::cuda
