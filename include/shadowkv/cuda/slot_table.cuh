#pragma once
/// \file cuda/slot_table.cuh
/// \brief Host launcher of the decode step's slot-table update for a ragged batch
/// (kernels/slot_table.cuh): selected landmark chunks -> slots, hits kept, misses given the
/// least recently used slots and appended to the `ChunkMiss` list that `rebuild_keys` and
/// `gather_values` (cuda/miss_ops.cuh) then read.
///
/// The launcher validates its arguments before any CUDA call (a bad argument throws
/// `shadowkv::Error` naming it, and nothing is launched), checks the launch, and never
/// synchronises: the work is queued on the given stream. The first call on a device (per .cu
/// file: each has its own copy of the kernel, see `kernel_setting_per_device`) reads its
/// shared-memory limits and raises the kernel's; later calls only enqueue work.

#include <cuda_runtime.h>

#include <cstddef>

#include "../core/error.hpp"
#include "error.cuh"
#include "kernels/slot_table.cuh"
#include "launch.cuh"

namespace shadowkv::cuda {

/// The largest `k` (selection per row) `update_slot_tables` takes.
inline constexpr int kMaxSlotTableK = kernels::slot_table_detail::kMaxK;
/// The largest `capacity` (slots per head) of a `SlotTableSequence`; rows of larger ones are
/// skipped as invalid (`OffloadedValuePool<CudaBackend, T>` rejects them at construction).
inline constexpr int kMaxSlotCapacity = kernels::slot_table_detail::kMaxCapacity;

/// Throws `shadowkv::Error` naming the first invalid field of `p`; makes no CUDA call.
/// Checks k in [1, kMaxSlotTableK], batch in [0, 65535], num_kv_heads in [1, 65535],
/// misses_capacity >= 0, and, for a non-empty batch, the pointers (`misses` may be null only
/// with misses_capacity == 0; `counters` and `maybe_num_invalid` are optional).
inline void check_slot_table_params(const SlotTableParams& p) {
  SHADOWKV_CHECK(p.k >= 1 && p.k <= kMaxSlotTableK, "k=", p.k, " must be in [1, ", kMaxSlotTableK, "]");
  SHADOWKV_CHECK(p.batch >= 0 && p.batch <= 65535, "batch=", p.batch, " must be in [0, 65535]");
  SHADOWKV_CHECK(p.num_kv_heads >= 1 && p.num_kv_heads <= 65535, "num_kv_heads=", p.num_kv_heads,
                 " must be in [1, 65535]");
  SHADOWKV_CHECK(p.misses_capacity >= 0, "misses_capacity=", p.misses_capacity, " must be >= 0");
  if (p.batch == 0) return;
  SHADOWKV_CHECK(p.sequences, "sequences must be non-null");
  SHADOWKV_CHECK(p.selected, "selected must be non-null");
  SHADOWKV_CHECK(p.slots, "slots must be non-null");
  SHADOWKV_CHECK(p.num_misses, "num_misses must be non-null");
  SHADOWKV_CHECK(p.misses || p.misses_capacity == 0, "misses is null but misses_capacity=", p.misses_capacity);
  SHADOWKV_CHECK(p.next_num_misses != p.num_misses, "next_num_misses must not be num_misses");
}

namespace slot_table_launch {

/// Raises the kernel's dynamic shared memory limit to what k = kMaxSlotTableK needs (less where
/// the device cannot) once per device and per copy of the kernel; returns the limit.
template <auto Kernel>
std::size_t configure_kernel() {
  return static_cast<std::size_t>(kernel_setting_per_device<Kernel>([](int device) {
    int optin = 0;
    cudaFuncAttributes attr{};
    SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
    const long long room = static_cast<long long>(optin) - static_cast<long long>(attr.sharedSizeBytes);
    const long long want = static_cast<long long>(kernels::slot_table_detail::smem_bytes(kMaxSlotTableK));
    const long long bytes = room < want ? (room > 0 ? room : 0) : want;
    SHADOWKV_CUDA_CHECK(
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    return bytes;
  }));
}

}  // namespace slot_table_launch

/// The slot-table update of one decode step for a ragged batch: for every sequence `b` and
/// KV head `h`, exactly what `OffloadedValuePool<CpuBackend, T>::fetch(h, selection, slots,
/// missed)` does on sequence b's tables, with `selection` the valid entries of
/// `p.selected[b, h, :]`: `step = ++steps[h]`; each selected chunk already resident is a hit,
/// keeps its slot and gets `last_used = step`; the misses, in ascending i, take the slots
/// not used at `step`, least recently used first ((last_used, slot) ascending); a victim's
/// old chunk is unmapped; `p.slots[b, h, i]` gets the slot of `selected[b, h, i]` (-1 for
/// padding). Each row's misses are appended to `p.misses` as one contiguous run, in ascending
/// i, reserved with one atomicAdd on `*p.num_misses` (rows land in any order). Values are not
/// copied: `gather_values` (with `maybe_num_misses = p.num_misses`) does that, and
/// `rebuild_keys` rebuilds the keys of the same list.
///
/// \param p       shapes and device pointers, see `SlotTableParams`; `*p.num_misses` is
///                zeroed by the caller (or holds the entries already in the list)
/// \param stream  the launch goes on it; nothing synchronises
///
/// One CTA of 512 threads per (b, h), `8 * pow2_ceil(k) + 12 * k` bytes of dynamic shared
/// memory (80 KiB at k = 4096) plus ~9.7 KiB static (the hit bitmap of kMaxSlotCapacity slots).
///
/// Throws `shadowkv::Error` naming the argument for k outside [1, kMaxSlotTableK], a bad
/// batch or head count, a negative misses_capacity, a null pointer (before any CUDA call), a
/// device whose shared memory cannot hold a CTA for `k`, and for a failed launch. Device data
/// that breaks the contract skips its (b, h) row — slots -1, tables, miss list and counters
/// untouched — and adds 1 to `*p.maybe_num_invalid` when given: a descriptor with a null
/// table, capacity outside [1, kMaxSlotCapacity] or negative num_chunks; a selected index
/// outside [0, num_chunks) and not -1, a valid index after -1, more valid entries than
/// capacity, an index twice; tables whose entries point out of range or not back at each
/// other, or that leave fewer slots to evict than there are misses (slots already marked used
/// at the new step); steps outside [0, 2^62); last-use steps too far apart to pack beside the
/// slot index (2^48 steps at capacity 65536). A row whose misses do not fit `misses_capacity`
/// is skipped the same way once it has reserved them: the reserved entries inside the list
/// are written as {-1, -1, -1, -1} (which the miss kernels skip and count as invalid), and
/// `*p.num_misses` may then exceed `misses_capacity`. Nothing is ever written out of bounds.
inline void update_slot_tables(const SlotTableParams& p, cudaStream_t stream) {
  check_slot_table_params(p);
  if (p.batch == 0) return;
  const std::size_t smem = kernels::slot_table_detail::smem_bytes(p.k);
  constexpr int kThreads = kernels::slot_table_detail::kThreads;
  constexpr auto kernel = kernels::update_slot_tables_kernel<kThreads>;
  const std::size_t limit = slot_table_launch::configure_kernel<kernel>();
  SHADOWKV_CHECK(smem <= limit, "k=", p.k, " needs ", smem, " bytes of shared memory; this device allows ", limit,
                 " (beside the kernel's static shared memory)");
  const dim3 grid(static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(p.batch));
  launch_kernel<kernel>(grid, dim3(kThreads), smem, stream, 1, p);
}

}  // namespace shadowkv::cuda
