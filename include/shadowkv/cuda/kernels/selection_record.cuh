#pragma once
/// \file cuda/kernels/selection_record.cuh
/// \brief The record of a decode step's selection: each selected landmark's prompt chunk,
/// written per (sequence, KV head) row. `record_selection_kernel` (kernels/attention_steps.cuh)
/// does it alone; the slot-table update (kernels/slot_table.cuh) does it on the way, so that a
/// ShadowKV step needs no launch of its own for it.

#include <cuda_runtime.h>

#include <cstdint>

namespace shadowkv::cuda {

/// What the record of a selection needs of one sequence.
struct SelectionRecordSequence {
  const std::int32_t* landmark_chunk_ids = nullptr;  ///< [H_kv, num_landmarks]
  long long num_landmarks = 0;
  std::int32_t* record = nullptr;  ///< optional [H_kv, record_k]: prompt chunk of each selected landmark
  int record_k = 0;                ///< min(k, num_landmarks)
  const std::int32_t* outlier_chunk_ids = nullptr;  ///< [H_kv, num_outliers] (oracle only)
  int num_outliers = 0;
};

namespace kernels {

/// Row (b, `h`) of the record, by threads `tid, tid + nthreads, ...`: entry i < s.record_k gets
/// the prompt chunk of landmark `sel[i]` (`-1` for padding or an index out of range); with
/// `list` (the oracle) also `list[s.num_outliers + i]`, and the outliers at `list[0 ..)`.
template <class Id>
__device__ __forceinline__ void write_selection_record(const SelectionRecordSequence& s, const Id* sel, int k,
                                                       int h, int tid, int nthreads, Id* list) {
  for (int i = tid; i < k; i += nthreads) {
    const Id m = sel[i];
    const Id chunk =
        m >= 0 && m < s.num_landmarks ? s.landmark_chunk_ids[static_cast<long long>(h) * s.num_landmarks + m] : -1;
    if (s.record && i < s.record_k) s.record[static_cast<long long>(h) * s.record_k + i] = chunk;
    if (list) list[s.num_outliers + i] = chunk;
  }
  if (list)
    for (int i = tid; i < s.num_outliers; i += nthreads)
      list[i] = s.outlier_chunk_ids[static_cast<long long>(h) * s.num_outliers + i];
}

}  // namespace kernels
}  // namespace shadowkv::cuda
