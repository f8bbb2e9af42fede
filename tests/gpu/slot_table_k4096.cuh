#pragma once
// One update_slot_tables launch at k = 4096 (80 KiB of dynamic shared memory, past the 48 KiB
// default), compiled into every .cu file that includes this header: the helpers are in an
// unnamed namespace, so each file has its own (nvcc gives each file its own host stub, so its
// own copy, of a __global__ template). test_slot_table.cu and test_slot_table_second_tu.cu both
// run them: configuring one file's copy must not leave the other's unconfigured. The launches go
// through the inline `update_slot_tables`, which launches this file's copy only where the
// compiler inlines it; `slot_table_limit_here` checks the copy of this file in any case.

#include <cstdint>
#include <numeric>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

namespace {

/// This file's copy of the slot-table kernel (its host stub's address).
inline const void* slot_table_kernel_here() {
  return reinterpret_cast<const void*>(
      shadowkv::cuda::kernels::update_slot_tables_kernel<shadowkv::cuda::kernels::slot_table_detail::kThreads>);
}

/// Configures this file's copy of the kernel through the library's per-copy cache (the template
/// argument names this file's copy, whatever the compiler inlines) and returns the dynamic
/// shared memory limit that copy then has.
inline int slot_table_limit_here() {
  namespace skc = shadowkv::cuda;
  constexpr auto kernel = skc::kernels::update_slot_tables_kernel<skc::kernels::slot_table_detail::kThreads>;
  (void)skc::slot_table_launch::configure_kernel<kernel>();
  cudaFuncAttributes attr{};
  SHADOWKV_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.maxDynamicSharedSizeBytes;
}

/// One sequence (one head, 5000 chunks, 4096 slots, empty) asked for chunks 0..4095 at k = 4096,
/// launched from this file; returns the slots it got (all misses: slot i for chunk i).
inline std::vector<std::int32_t> slot_table_k4096_here(cudaStream_t stream) {
  namespace skc = shadowkv::cuda;
  using skv_gpu_test::DeviceBuffer;
  constexpr int k = 4096, capacity = 4096, chunks = 5000;
  DeviceBuffer<std::int32_t> slot_chunk(capacity), chunk_slot(chunks), selected(k), slots(k), num_misses(1);
  DeviceBuffer<std::int64_t> last_used(capacity), steps(1);
  DeviceBuffer<skc::ChunkMiss> misses(k);
  slot_chunk.upload(std::vector<std::int32_t>(capacity, -1));
  chunk_slot.upload(std::vector<std::int32_t>(chunks, -1));
  last_used.upload(std::vector<std::int64_t>(capacity, -1));
  steps.upload({0});
  num_misses.upload({0});
  std::vector<std::int32_t> want(k);
  std::iota(want.begin(), want.end(), 0);
  selected.upload(want);
  const skc::SlotTableSequence seq{slot_chunk.get(), last_used.get(), chunk_slot.get(), steps.get(), chunks, capacity};
  DeviceBuffer<skc::SlotTableSequence> sequences(1);
  sequences.upload({seq});
  const skc::SlotTableParams p{.sequences = sequences.get(), .batch = 1, .num_kv_heads = 1, .selected = selected.get(),
                               .k = k, .slots = slots.get(), .misses = misses.get(), .misses_capacity = k,
                               .num_misses = num_misses.get()};
  skc::update_slot_tables(p, stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return slots.download();
}

}  // namespace
