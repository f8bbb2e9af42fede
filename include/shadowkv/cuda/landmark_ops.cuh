#pragma once
/// \file cuda/landmark_ops.cuh
/// \brief Host launchers of the decode-step landmark scoring and top-k selection for a ragged
/// batch (kernels/landmark_select.cuh). Both take device pointers and one stream, validate
/// every argument they can see before any CUDA call, check every launch, and never
/// synchronise the host with the device. The first call on a device reads its attributes and
/// sets the kernels' shared-memory limits once; later calls only enqueue work, so an engine can
/// capture them in a CUDA graph (with a workspace it owns).
///
/// Results equal the CPU backend's `LandmarkIndex<CpuBackend, T>::score` (to float rounding;
/// for bf16/fp16 landmarks, on the queries pre-scaled and rounded to that type, see
/// `score_landmarks`) and `select_top_k` (exactly, on the same scores).

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "dispatch.cuh"
#include "error.cuh"
#include "kernels/landmark_select.cuh"
#include "launch.cuh"
#include "memory.cuh"

namespace shadowkv::cuda {

/// The largest `k` `select_top_k` takes.
inline constexpr int kMaxTopK = 4096;

/// Whether `score_and_select_top_k` normalises the scores inside the top-k kernel.
enum class TopKFusion { automatic, fused, separate };

namespace landmark_launch {

inline void check_score_shapes(int batch, int num_q_heads, int num_kv_heads, int max_landmarks,
                               long long scores_capacity) {
  SHADOWKV_CHECK(batch >= 0 && batch <= 65535, "batch=", batch, " must be in [0, 65535]");
  SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
  SHADOWKV_CHECK(num_q_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads=", num_q_heads,
                 " must be a positive multiple of num_kv_heads=", num_kv_heads);
  SHADOWKV_CHECK(num_q_heads <= 4096, "num_q_heads=", num_q_heads, " exceeds 4096");
  SHADOWKV_CHECK(num_kv_heads <= 65535, "num_kv_heads=", num_kv_heads, " exceeds 65535");
  SHADOWKV_CHECK(max_landmarks >= 0, "max_landmarks=", max_landmarks, " must be >= 0");
  SHADOWKV_CHECK(scores_capacity >= 0, "scores_capacity=", scores_capacity, " must be >= 0");
}

/// Heads per block of the logits kernel for a group of G query heads.
inline int head_block(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

/// Once per kernel and device: raises the kernel's dynamic shared memory limit to
/// `smem_bytes` and returns how many of its CTAs of `threads` fit on one SM.
template <auto Kernel>
int configure_kernel(int threads, int smem_bytes) {
  return static_cast<int>(kernel_setting_per_device<Kernel>([&](int) {
    if (smem_bytes > 48 * 1024)
      SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    int n = 0;
    SHADOWKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, threads, smem_bytes));
    SHADOWKV_CHECK(n > 0, "the landmark scoring kernel does not fit on this device (", smem_bytes,
                   " bytes of shared memory)");
    return n;
  }));
}

/// What the launches need to know of the current device, read once per device.
struct DeviceInfo {
  int smem_optin = 0;  ///< bytes of shared memory a block may opt in to
  int sm_count = 0;
  int cc_major = 0;    ///< compute capability major version (clusters from 9)
};
inline DeviceInfo device_info() {
  constexpr int kMaxDevices = 64;
  // 0: not read yet
  static std::atomic<int> smem_optin[kMaxDevices] = {}, sm_count[kMaxDevices] = {}, cc_major[kMaxDevices] = {};
  int device = 0;
  SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
  DeviceInfo d;
  if (device < kMaxDevices) {
    d.smem_optin = smem_optin[device].load(std::memory_order_relaxed);
    d.sm_count = sm_count[device].load(std::memory_order_relaxed);
    d.cc_major = cc_major[device].load(std::memory_order_relaxed);
  }
  if (d.smem_optin == 0 || d.sm_count == 0 || d.cc_major == 0) {
    SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
    SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    if (device < kMaxDevices) {
      smem_optin[device].store(d.smem_optin, std::memory_order_relaxed);
      sm_count[device].store(d.sm_count, std::memory_order_relaxed);
      cc_major[device].store(d.cc_major, std::memory_order_relaxed);
    }
  }
  return d;
}

/// Launches `landmark_top_k_kernel<NT, kNormalize>` for `rows` rows (B * H_kv): slices of up
/// to 32768 keys (128 KiB, less where the device allows less) are cached in shared memory,
/// longer ones read from L2. Rows are shared by a cluster of `C` CTAs (sm_90 and newer), the
/// largest `C` in {8, 4, 2} with `C <= p.max_ctas_per_row`, all `rows * C` CTAs within one per
/// SM, clusters of 4 or 8 only up to half the SMs, and every row's cluster resident at once
/// (`cudaOccupancyMaxActiveClusters`). Measured on the H200 (bm_score_landmarks, 128K context,
/// H_kv = 8): B = 1 (C = 8) 35 us against 38 with one CTA per row, B = 8 fused (C = 2) 107 us
/// against 112; clusters of 8 over 16 rows and of 4 over 32 rows (all SMs) were slower (54 and
/// 77 us against 48 and 72), hence the half-the-SMs rule.
template <int NT, bool kNormalize>
void launch_top_k(const TopKParams& p, const DeviceInfo& dev, long long rows, cudaStream_t stream,
                  const kernels::landmark_detail::TopKNormalize& norm) {
  constexpr auto kernel = kernels::landmark_top_k_kernel<NT, kNormalize>;
  // Once per device: the keys a CTA can cache (bits 0-19) and how many clusters of 2, 4 and 8
  // CTAs can be resident at once (bits 20-29, 30-39, 40-49; 0 without cluster support).
  const long long setting = kernel_setting_per_device<kernel>([&](int) {
    constexpr int kMaxCached = 32768;
    cudaFuncAttributes attr{};
    SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    // Room for the keys: the opt-in limit less the static shared memory, a 1 KiB margin and
    // the 512-byte pad below.
    const int room = dev.smem_optin - static_cast<int>(attr.sharedSizeBytes) - 1024 - 512;
    const int keys = room > 0 ? std::min(room / 16 * 4, kMaxCached) : 0;
    SHADOWKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, keys * 4 + 512));
    long long value = keys;
    // Clusters need the device (sm_90+) and this kernel compiled for it: its cluster code exists
    // only for __CUDA_ARCH__ >= 900, i.e. PTX version 9.0 and up (a build for an older
    // architecture, JIT-compiled here, keeps one CTA per row).
    if (dev.cc_major >= 9 && attr.ptxVersion >= 90)
      for (int c = 2, shift = 20; c <= kernels::landmark_detail::kMaxClusterCtas; c *= 2, shift += 10) {
        const int active = max_active_clusters<kernel>(static_cast<unsigned>(c), NT, static_cast<std::size_t>(keys) * 4 + 512);
        value |= static_cast<long long>(std::min(active, 1023)) << shift;
      }
    return value;
  });
  const int limit = static_cast<int>(setting & 0xfffff);
  int ctas = 1;
  for (int c = kernels::landmark_detail::kMaxClusterCtas, shift = 40; c >= 2; c /= 2, shift -= 10) {
    const long long active = (setting >> shift) & 1023;
    if (c <= p.max_ctas_per_row && rows * c <= dev.sm_count && (c == 2 || rows * c * 2 <= dev.sm_count) &&
        rows <= active) {
      ctas = c;
      break;
    }
  }
  // The kernel's slices: multiples of 128 keys.
  const long long slice = (static_cast<long long>(p.max_landmarks) + ctas * 128ll - 1) / (ctas * 128ll) * 128;
  const int cache = static_cast<int>(slice < limit ? slice : limit);
  // Padded by 128 keys: the compiler may merge the kernel's guarded tail reads of 4 keys into
  // one (speculative) vector load, which must stay inside the allocation.
  const std::size_t smem = (static_cast<std::size_t>(cache) + 3) / 4 * 16 + 512;
  // The kernel waits for the previous grid before touching memory, so it may be resident while
  // the logits kernel (or any other) finishes.
  launch_kernel<kernel>(dim3(static_cast<unsigned>(p.num_kv_heads * ctas), static_cast<unsigned>(p.batch)), dim3(NT),
                        smem, stream, static_cast<unsigned>(ctas), p, cache, norm);
}

/// `select_top_k`'s checks, before any CUDA call.
inline void check_top_k(const TopKParams& p) {
  SHADOWKV_CHECK(p.k >= 1 && p.k <= kMaxTopK, "k=", p.k, " must be in [1, ", kMaxTopK, "]");
  SHADOWKV_CHECK(p.max_ctas_per_row == 1 || p.max_ctas_per_row == 2 || p.max_ctas_per_row == 4 ||
                     p.max_ctas_per_row == 8,
                 "max_ctas_per_row=", p.max_ctas_per_row, " must be 1, 2, 4 or 8");
  SHADOWKV_CHECK(p.batch >= 0 && p.batch <= 65535, "batch=", p.batch, " must be in [0, 65535]");
  SHADOWKV_CHECK(p.num_kv_heads > 0, "num_kv_heads=", p.num_kv_heads, " must be positive");
  SHADOWKV_CHECK(p.max_landmarks >= 0, "max_landmarks=", p.max_landmarks, " must be >= 0");
  SHADOWKV_CHECK(p.scores_capacity >= 0, "scores_capacity=", p.scores_capacity, " must be >= 0");
  if (p.batch == 0) return;
  SHADOWKV_CHECK(p.num_landmarks, "num_landmarks must be non-null");
  SHADOWKV_CHECK(p.score_offsets, "score_offsets must be non-null");
  SHADOWKV_CHECK(p.selected, "selected must be non-null");
  SHADOWKV_CHECK(p.scores || p.max_landmarks == 0, "scores must be non-null");
}

/// The top-k launch for `p` (rows already checked): few rows (a small batch) take the widest
/// CTA, since each row is one SM's work (and a cluster of CTAs, see `launch_top_k`).
template <bool kNormalize>
void top_k(const TopKParams& p, cudaStream_t stream, const kernels::landmark_detail::TopKNormalize& norm = {}) {
  const DeviceInfo dev = device_info();
  const long long rows = static_cast<long long>(p.batch) * p.num_kv_heads;
  if (rows < dev.sm_count)
    launch_top_k<1024, kNormalize>(p, dev, rows, stream, norm);
  else
    launch_top_k<512, kNormalize>(p, dev, rows, stream, norm);
}

}  // namespace landmark_launch

/// Device workspace bytes `score_landmarks` needs for these shapes: the partial softmax states
/// (`8 * G` bytes per 32 landmarks of `max_landmarks` per (sequence, KV head)) and the logits
/// of query heads 1..G-1 (`4 * (G - 1) * scores_capacity` bytes; none when G = 1). Throws `shadowkv::Error` on
/// shapes `score_landmarks` would reject.
inline std::size_t landmark_score_workspace_bytes(int batch, int num_q_heads, int num_kv_heads, int max_landmarks,
                                                  long long scores_capacity) {
  landmark_launch::check_score_shapes(batch, num_q_heads, num_kv_heads, max_landmarks, scores_capacity);
  using W = kernels::landmark_detail::LandmarkScoreWorkspace;
  const int group = num_q_heads / num_kv_heads;
  return W::partial_bytes(batch, num_kv_heads, group, max_landmarks) + W::logit_bytes(group, scores_capacity);
}

namespace landmark_launch {

/// What `launch_logits` leaves for the kernel that finishes the scoring: the workspace (owned
/// when the caller gave none; freed stream-ordered when this goes) and whether it launched.
struct ScoreLaunch {
  DeviceBuffer<std::byte> owned;
  kernels::landmark_detail::LandmarkScoreWorkspace ws{};
  bool launched = false;
};

/// `score_landmarks`' checks and its logits launch (nothing for an empty batch).
template <StorageType T>
ScoreLaunch launch_logits(const LandmarkScoreParams<T>& p, cudaStream_t stream, DeviceAllocator& allocator) {
  check_score_shapes(p.batch, p.num_q_heads, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
  check_kernel_head_dim(p.head_dim);
  SHADOWKV_CHECK(std::isfinite(p.scale), "scale=", p.scale, " must be finite");
  const std::size_t need =
      cuda::landmark_score_workspace_bytes(p.batch, p.num_q_heads, p.num_kv_heads, p.max_landmarks, p.scores_capacity);
  if (p.workspace) {
    SHADOWKV_CHECK(p.workspace_bytes >= need, "workspace_bytes=", p.workspace_bytes, " < required ", need,
                   " (landmark_score_workspace_bytes)");
    SHADOWKV_CHECK(reinterpret_cast<std::uintptr_t>(p.workspace) % 16 == 0, "workspace must be 16-byte aligned");
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  const int gb = head_block(group);
  const long long head_blocks = (group + gb - 1) / gb;
  namespace kd = kernels::landmark_detail;
  // Work items of the logits kernel, counted with the smallest tile (an upper bound).
  const long long max_items = (static_cast<long long>(p.max_landmarks) + kd::kMinLogitsTileRows - 1) /
                              kd::kMinLogitsTileRows * p.num_kv_heads * head_blocks * p.batch;
  SHADOWKV_CHECK(max_items < (1ll << 31), "batch=", p.batch, " x num_kv_heads=", p.num_kv_heads,
                 " x max_landmarks=", p.max_landmarks, " is too large for one launch");
  ScoreLaunch launch;
  if (p.batch == 0 || p.max_landmarks == 0) return launch;
  SHADOWKV_CHECK(p.queries, "queries must be non-null");
  SHADOWKV_CHECK(reinterpret_cast<std::uintptr_t>(p.queries) % 16 == 0, "queries must be 16-byte aligned");
  SHADOWKV_CHECK(p.landmarks, "landmarks must be non-null");
  SHADOWKV_CHECK(p.num_landmarks, "num_landmarks must be non-null");
  SHADOWKV_CHECK(p.score_offsets, "score_offsets must be non-null");
  SHADOWKV_CHECK(p.scores, "scores must be non-null");

  void* workspace = p.workspace;
  if (!workspace) {
    launch.owned = DeviceBuffer<std::byte>(need, stream, allocator);
    workspace = launch.owned.data();
  }
  kd::LandmarkScoreWorkspace& ws = launch.ws;
  ws.group = group;
  ws.partials = static_cast<float2*>(workspace);
  ws.logits = reinterpret_cast<float*>(static_cast<std::byte*>(workspace) +
                                       kd::LandmarkScoreWorkspace::partial_bytes(p.batch, p.num_kv_heads, group,
                                                                                 p.max_landmarks));
  SHADOWKV_DISPATCH_HEAD_DIM(p.head_dim, HD, [&] {
    if constexpr (sizeof(device_t<T>) == 2) {  // 16-bit landmarks: the tensor-core kernel
      using S = kd::MmaLogitsShape<HD>;
      constexpr auto kernel = kernels::landmark_logits_mma_kernel<T, HD>;
      constexpr int kThreads = kd::kMmaLogitsWarps * 32;
      ws.tile_rows = kd::kMmaLogitsTileRows;
      ws.num_tiles = (p.max_landmarks + ws.tile_rows - 1) / ws.tile_rows;
      const int per_sm = configure_kernel<kernel>(kThreads, S::kSmemBytes);
      const long long blocks16 = (group + kd::kMmaHeads - 1) / kd::kMmaHeads;
      const long long items = static_cast<long long>(ws.num_tiles) * p.num_kv_heads * blocks16 * p.batch;
      const long long resident_warps =
          static_cast<long long>(per_sm) * device_info().sm_count * kd::kMmaLogitsWarps;
      const long long warps = items < resident_warps ? items : resident_warps;
      const unsigned grid = static_cast<unsigned>((warps + kd::kMmaLogitsWarps - 1) / kd::kMmaLogitsWarps);
      launch_kernel<kernel>(dim3(grid), dim3(kThreads), S::kSmemBytes, stream, 1u,
                            p, ws);
    } else {  // float landmarks: float queries and CUDA-core FMAs
      auto launch = [&]<int GB>() {
        using L = kd::LogitsLayout<device_t<T>, HD, GB>;
        constexpr auto kernel = kernels::landmark_logits_kernel<T, HD, GB>;
        ws.tile_rows = L::kTileRows;
        ws.num_tiles = (p.max_landmarks + ws.tile_rows - 1) / ws.tile_rows;
        const int per_sm = configure_kernel<kernel>(kd::kLogitsThreads, L::kSmemBytes);
        const long long items = static_cast<long long>(ws.num_tiles) * p.num_kv_heads * head_blocks * p.batch;
        const long long resident = static_cast<long long>(per_sm) * device_info().sm_count;
        const unsigned grid = static_cast<unsigned>(items < resident ? items : resident);
        launch_kernel<kernel>(dim3(grid), dim3(kd::kLogitsThreads), L::kSmemBytes, stream,
                              1u, p, ws);
      };
      switch (gb) {
        case 1: launch.template operator()<1>(); break;
        case 2: launch.template operator()<2>(); break;
        case 4: launch.template operator()<4>(); break;
        default: launch.template operator()<8>(); break;
      }
    }
  });
  launch.launched = true;
  return launch;
}

/// The normalize kernel over the logits `launch_logits` left in `ws` and `p.scores`.
template <StorageType T>
void launch_normalize(const LandmarkScoreParams<T>& p, const kernels::landmark_detail::LandmarkScoreWorkspace& ws,
                      cudaStream_t stream) {
  namespace kd = kernels::landmark_detail;
  const dim3 grid(static_cast<unsigned>((p.max_landmarks + kd::kNormalizeTile - 1) / kd::kNormalizeTile),
                  static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(p.batch));
  launch_kernel<kernels::landmark_normalize_kernel<T>>(grid, dim3(kd::kNormalizeThreads), ws.group * sizeof(float),
                                                       stream, 1u, p, ws);
}

}  // namespace landmark_launch

/// Scores the landmarks of a ragged batch for one decode step: for sequence `b`, KV head `h`,
/// landmark `m`, `scores[score_offsets[b] + h * M_b + m] = max over the G query heads j of
/// head h of softmax_m(queries[b, h*G + j] · landmarks[b][h, m] * scale)`, the softmax taken
/// over the M_b landmarks of that sequence and head (as `LandmarkIndex<CpuBackend, T>::score`).
///
/// For bf16 and fp16 landmarks the logits are computed on the tensor cores from the queries
/// pre-scaled by `scale` and rounded to the landmarks' type (`landmark_logits_mma_kernel`):
/// scores then equal the CPU backend's on those rounded queries to float rounding, and differ
/// from its scores on the float queries by that rounding (a logit moves by at most
/// `sum_i |round(q_i * scale) - q_i * scale| * |landmark_i|`; ~7e-3 relative at most for bf16
/// and ~1e-3 for fp16 with unit-variance queries, see `landmark_logits_mma_kernel`); fp16 also
/// needs `|q * scale| < 65504`. Float landmarks keep float queries and CUDA-core FMAs.
///
/// \param p       shapes and device pointers, see `LandmarkScoreParams`. `p.workspace` may be
///                null: `allocator` then provides it, stream-ordered, for this call.
/// \param stream  every launch (and a workspace allocation) goes on it; nothing synchronises.
///
/// Throws `shadowkv::Error` naming the argument for bad shapes (head_dim outside {64, 96, 128,
/// 256}, H_q not a multiple of H_kv, ...), a null pointer, or a workspace that is too small;
/// and for a failed launch. Device-resident sizes that break the contract of
/// `LandmarkScoreParams` (M_b > max_landmarks, a row outside scores_capacity, a misaligned
/// landmark pointer) stop the kernel with a trap, which the stream reports.
template <StorageType T>
void score_landmarks(const LandmarkScoreParams<T>& p, cudaStream_t stream,
                     DeviceAllocator& allocator = default_allocator()) {
  landmark_launch::ScoreLaunch launch = landmark_launch::launch_logits(p, stream, allocator);
  if (launch.launched) landmark_launch::launch_normalize(p, launch.ws, stream);
}

/// Top-`k` landmarks per (sequence, KV head) of `p.scores` into `p.selected` `[batch, H_kv,
/// k]`: row (b, h) holds the `min(k, M_b)` indices of the highest scores in ascending order,
/// then -1. Ties go to the lower index, NaN ranks last, -0 equals +0 — exactly
/// `LandmarkIndex<CpuBackend, T>::select_top_k` on the same scores.
///
/// Throws `shadowkv::Error` naming the argument for k outside [1, kMaxTopK], bad shapes or a
/// null pointer (before any CUDA call), and for a failed launch. Asynchronous on `stream`.
inline void select_top_k(const TopKParams& p, cudaStream_t stream) {
  landmark_launch::check_top_k(p);
  if (p.batch == 0) return;
  landmark_launch::top_k<false>(p, stream);
}

/// `score_landmarks(sp)` then `select_top_k(tp)`, with one launch fewer where that pays: the
/// top-k kernel merges the softmax normalisers and turns the logits into scores itself
/// (reading them once, from L2 right after the logits kernel) instead of a normalize kernel
/// writing the scores for it to read back. Scores (written to `sp.scores` as
/// `score_landmarks` writes them) and selection are bit-identical to the two calls'. `tp` must
/// describe the same rows: its `scores`, `num_landmarks`, `score_offsets`, `scores_capacity`,
/// `batch`, `num_kv_heads` and `max_landmarks` equal `sp`'s. `fusion`: `automatic` fuses
/// unless the device has no thread-block clusters (before sm_90) and the batch has fewer than
/// `sm_count / 4` rows (B * H_kv); `fused` always (tests, or
/// an engine that measured its shapes), `separate` never. Groups of more than 64 query heads
/// per KV head always take the two calls' kernels. Same errors as the two functions, all
/// before any CUDA call.
template <StorageType T>
void score_and_select_top_k(const LandmarkScoreParams<T>& sp, const TopKParams& tp, cudaStream_t stream,
                            DeviceAllocator& allocator = default_allocator(),
                            TopKFusion fusion = TopKFusion::automatic) {
  landmark_launch::check_top_k(tp);
  SHADOWKV_CHECK(tp.scores == sp.scores && tp.num_landmarks == sp.num_landmarks &&
                     tp.score_offsets == sp.score_offsets && tp.scores_capacity == sp.scores_capacity &&
                     tp.batch == sp.batch && tp.num_kv_heads == sp.num_kv_heads &&
                     tp.max_landmarks == sp.max_landmarks,
                 "score_and_select_top_k: the top-k parameters (scores, num_landmarks, score_offsets, "
                 "scores_capacity, batch, num_kv_heads, max_landmarks) must equal the scoring parameters'");
  landmark_launch::ScoreLaunch launch = landmark_launch::launch_logits(sp, stream, allocator);
  if (!launch.launched) {  // no landmarks at all: rows of -1
    if (tp.batch > 0) landmark_launch::top_k<false>(tp, stream);
    return;
  }
  // Fused, except for few rows on a device without thread-block clusters: there the top-k
  // kernel is one CTA per row, so with few rows its reading the logits costs more than a
  // separate normalize kernel spread over the whole GPU (H200 with one CTA per row,
  // Llama-3.1-8B shapes at 128K: B = 8 (64 rows) 115 vs 122 us, B = 4 equal, B = 1 44 vs
  // 38 us; bm_score_landmarks). With clusters (sm_90 and newer) a few rows spread over up to 8
  // CTAs each, and the fused kernel is the faster at every batch (H200, 2026-11-26: B = 1
  // 32.9 vs 34.7 us, B = 2 42.1 vs 44.0, B = 4 66.1 vs 67.7, B = 8 103.7 vs 111.6).
  const long long rows = static_cast<long long>(tp.batch) * tp.num_kv_heads;
  const landmark_launch::DeviceInfo dev = landmark_launch::device_info();
  const bool few_rows = dev.cc_major < 9 && rows * 4 < dev.sm_count;
  if (launch.ws.group > kernels::landmark_detail::kMaxFusedGroup || fusion == TopKFusion::separate ||
      (fusion == TopKFusion::automatic && few_rows)) {
    landmark_launch::launch_normalize(sp, launch.ws, stream);
    landmark_launch::top_k<false>(tp, stream);
    return;
  }
  kernels::landmark_detail::TopKNormalize norm;
  norm.scores = sp.scores;
  norm.ws = launch.ws;
  landmark_launch::top_k<true>(tp, stream, norm);
}

}  // namespace shadowkv::cuda
