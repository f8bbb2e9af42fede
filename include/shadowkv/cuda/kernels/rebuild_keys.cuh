#pragma once
/// \file cuda/kernels/rebuild_keys.cuh
/// \brief The key half of a decode step's miss path: for every missed chunk of a ragged batch,
/// rebuild its pre-RoPE keys from the low-rank store (`A[p] · B_h`), rotate them to their
/// positions and store them in the chunk's key slot, in one launch. The keys never exist
/// unrotated in global memory: each tile is rebuilt in registers, rotated in shared memory and
/// written once, in the storage type.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../device/rope.hpp"
#include "../types.cuh"
#include "gather_values.cuh"
#include "grid_dependency.cuh"

namespace shadowkv::cuda {

/// Where one sequence's low-rank keys and key slots live (device addresses; `D`: float,
/// __nv_bfloat16 or __half). One layer of one sequence, as `LowRankKeyStore` holds it.
template <class D>
struct RebuildKeysSequence {
  const D* a = nullptr;      ///< A = U·Σ `[num_rows, rank]`, row p is token position p
  const D* basis = nullptr;  ///< `[H_kv, rank, d]`: basis[h] maps a row of A to head h's key
  D* key_slots = nullptr;    ///< `[H_kv, capacity, c, d]`
  long long num_rows = 0;    ///< rows of A; chunk m can be rebuilt when (m + 1) * c <= num_rows
  int capacity = 0;          ///< key slots per head
  /// Optional `[H_kv, num_chunk_ids]`: when non-null, a miss's `chunk` is an index into its
  /// head's row (a landmark index, as the value pool numbers chunks) and the chunk rebuilt is
  /// `chunk_ids[kv_head * num_chunk_ids + chunk]` (its position in the prompt); when null the
  /// miss's `chunk` is the prompt chunk itself.
  const std::int32_t* chunk_ids = nullptr;
  long long num_chunk_ids = 0;
};

/// RoPE of the rebuilt keys: a `RopeTable` (core/rope.hpp) with its frequencies on the
/// device, shared by the batch. `inv_freq == nullptr` leaves the keys pre-RoPE.
struct RebuildRope {
  const float* inv_freq = nullptr;  ///< [rotary_dim / 2], device
  int rotary_dim = 0;               ///< even, in [2, head_dim]; dims >= rotary_dim pass through
  bool interleaved = false;         ///< pair i is (2i, 2i+1); otherwise (i, i + rotary_dim/2)
  float attention_scale = 1.0f;     ///< multiplies cos and sin (YaRN mscale)
};

/// Plain parameters of `rebuild_keys` (cuda/miss_ops.cuh). Pointers are device addresses.
template <class D>
struct RebuildKeysParams {
  const RebuildKeysSequence<D>* sequences = nullptr;  ///< [num_sequences]
  int num_sequences = 0;
  /// [num_misses]. Any order is correct; misses of one (seq, kv_head) next to each other share
  /// one load of the basis, so sort by (seq, kv_head) (as a per-head fetch produces them).
  const ChunkMiss* misses = nullptr;
  int num_misses = 0;                     ///< entries (with `maybe_num_misses`: upper bound)
  const int* maybe_num_misses = nullptr;  ///< device count, as in `GatherValuesParams`
  int num_kv_heads = 0;
  int head_dim = 0;    ///< 64, 96, 128 or 256
  int rank = 0;        ///< r, in [1, num_kv_heads * head_dim]
  int chunk_size = 0;  ///< c, tokens per chunk
  RebuildRope rope;
  /// When non-null, misses with an out-of-range index (sequence, head, slot, a chunk past the
  /// rows of A, a null pointer of their sequence) are added here; they are skipped.
  int* maybe_num_invalid = nullptr;
};

namespace kernels {

/// Token rows of one output tile (the tokens of consecutive misses of one (seq, head)).
inline constexpr int kRebuildTileRows = 32;
/// Most misses one CTA takes (their entries are staged in shared memory).
inline constexpr int kRebuildMaxMissesPerBlock = 128;

// ------------------------------------------------------------------------------------------
// Tile policies: how a CTA multiplies a `kRebuildTileRows x k` tile of A (staged in shared
// memory as `AElem`, row stride `kAStride`) by `k` rows of the basis (shared memory, `D`, row
// stride `kBStride`) into float accumulators, and writes them to a float tile
// `[kRebuildTileRows][kOutStride]`. `k` is rounded up to `kRankAlign` with zeros on both sides.

/// CUDA cores, float FMAs in k order (fp32 storage: the keys must match the float reference to
/// ~1e-6, which TF32 tensor cores would not). A thread owns a `kRowsPerThread x 4` block.
template <class D, int HD>
struct RebuildFmaTile {
  static constexpr int kColsPerThread = 4;
  static constexpr int kColGroups = HD / kColsPerThread;
  static constexpr int kRowsPerThread = HD == 64 ? 2 : (HD == 256 ? 8 : 4);
  static constexpr int kRowGroups = kRebuildTileRows / kRowsPerThread;
  static constexpr int kThreads = kColGroups * kRowGroups;  // 256, 192, 256, 256
  static constexpr int kMinBlocksPerSm = 2;                 // up to 128 registers
  static constexpr int kRankStep = 64;                      // A columns staged at a time
  static constexpr int kRankAlign = 4;
  using AElem = float;
  static constexpr int kAStride = kRankStep + 4;  // floats; rows stay 16-byte aligned
  static constexpr int kBStride = HD;
  static constexpr int kOutStride = HD + 4;
  static_assert(kColGroups * kColsPerThread == HD && kRowGroups * kRowsPerThread == kRebuildTileRows);

  struct Acc {
    float v[kRowsPerThread][kColsPerThread];
  };

  __device__ static void clear(Acc& acc) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = 0.0f;
  }

  /// Four consecutive basis elements as float (one 8- or 16-byte shared-memory load).
  __device__ static void load_b4(const D* p, float (&out)[4]) {
    if constexpr (sizeof(D) == 4) {
      const float4 v = *reinterpret_cast<const float4*>(p);
      out[0] = v.x;
      out[1] = v.y;
      out[2] = v.z;
      out[3] = v.w;
    } else {
      const uint2 raw = *reinterpret_cast<const uint2*>(p);
      const D* e = reinterpret_cast<const D*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = to_float(e[i]);
    }
  }

  __device__ static void multiply(Acc& acc, const AElem* a_stage, const D* b_stage, int k_aligned) {
    const int tid = static_cast<int>(threadIdx.x);
    const int rg = tid / kColGroups;
    const int cg = tid - rg * kColGroups;
    const float* a_tile = a_stage + rg * kRowsPerThread * kAStride;
    const D* b_tile = b_stage + cg * kColsPerThread;
    for (int kk = 0; kk < k_aligned; kk += 4) {
      float a[kRowsPerThread][4];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float4 v = *reinterpret_cast<const float4*>(a_tile + i * kAStride + kk);
        a[i][0] = v.x;
        a[i][1] = v.y;
        a[i][2] = v.z;
        a[i][3] = v.w;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float b[kColsPerThread];
        load_b4(b_tile + (kk + q) * kBStride, b);
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) acc.v[i][j] = fmaf(a[i][q], b[j], acc.v[i][j]);
      }
    }
  }

  __device__ static void write(const Acc& acc, float* out) {
    const int tid = static_cast<int>(threadIdx.x);
    const int rg = tid / kColGroups;
    const int cg = tid - rg * kColGroups;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
      *reinterpret_cast<float4*>(out + (rg * kRowsPerThread + i) * kOutStride + cg * kColsPerThread) =
          make_float4(acc.v[i][0], acc.v[i][1], acc.v[i][2], acc.v[i][3]);
  }
};

/// `mma.sync.m16n8k16` with float accumulators, `D` = __nv_bfloat16 or __half.
template <class D>
__device__ __forceinline__ void rebuild_mma_16816(float (&c)[4], const std::uint32_t (&a)[4],
                                                  const std::uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void rebuild_ldmatrix_x4(std::uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void rebuild_ldmatrix_x2_trans(std::uint32_t (&r)[2], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

/// Tensor cores for 16-bit storage: the products of two bf16/fp16 values are exact in float and
/// the sums are kept in float, so the keys match the float reference to float rounding (well
/// inside one unit of the 16-bit result). 8 warps as 2 (rows) x 4 (columns); a warp owns a
/// 16 x HD/4 block, `HD/32` accumulators of m16n8. Row strides are padded by 16 bytes so that
/// `ldmatrix` reads hit distinct banks.
template <class D, int HD>
struct RebuildMmaTile {
  static constexpr int kThreads = 256;
  /// At most 80 registers: three CTAs per SM, two rebuilding (the launcher's kRebuildCtasPerSm)
  /// and one gathering values in the combined launch, so the fetch runs beside the rebuild.
  static constexpr int kMinBlocksPerSm = 3;
  static constexpr int kWarpCols = HD / 4;
  static constexpr int kN8 = kWarpCols / 8;  // 2, 3, 4, 8
  static constexpr int kRankStep = 160;      // the default rank in one step
  static constexpr int kRankAlign = 16;
  using AElem = D;
  static constexpr int kAStride = kRankStep + 8;  // elements
  static constexpr int kBStride = HD + 8;
  static constexpr int kOutStride = HD + 4;
  static_assert(kN8 * 8 * 4 == HD && kRebuildTileRows == 32, "2 x 4 warps of m16 x HD/4");

  struct Acc {
    float c[kN8][4];
  };

  __device__ static void clear(Acc& acc) {
#pragma unroll
    for (int j = 0; j < kN8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc.c[j][i] = 0.0f;
  }

  __device__ static void multiply(Acc& acc, const AElem* a_stage, const D* b_stage, int k_aligned) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm = warp & 1;
    const int wn = warp >> 1;
    // ldmatrix.x4 of A: lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8.
    const D* a_row = a_stage + (wm * 16 + (lane & 15)) * kAStride + (lane >> 4) * 8;
    // ldmatrix.x2.trans of B: lanes 0-15 address basis rows k .. k+15 (16-31 repeat them).
    const D* b_row = b_stage + (lane & 15) * kBStride + wn * kWarpCols;
    for (int k = 0; k < k_aligned; k += 16) {
      std::uint32_t a[4];
      rebuild_ldmatrix_x4(a, a_row + k);
#pragma unroll
      for (int j = 0; j < kN8; ++j) {
        std::uint32_t b[2];
        rebuild_ldmatrix_x2_trans(b, b_row + k * kBStride + j * 8);
        rebuild_mma_16816<D>(acc.c[j], a, b);
      }
    }
  }

  __device__ static void write(const Acc& acc, float* out) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int row = (warp & 1) * 16 + (lane >> 2);
    const int col = (warp >> 1) * kWarpCols + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < kN8; ++j) {
      *reinterpret_cast<float2*>(out + row * kOutStride + col + j * 8) = make_float2(acc.c[j][0], acc.c[j][1]);
      *reinterpret_cast<float2*>(out + (row + 8) * kOutStride + col + j * 8) = make_float2(acc.c[j][2], acc.c[j][3]);
    }
  }
};

/// The tile policy of storage type `D`: tensor cores for bf16/fp16, CUDA cores for fp32.
template <class D, int HD>
using RebuildTile = std::conditional_t<sizeof(D) == 2, RebuildMmaTile<D, HD>, RebuildFmaTile<D, HD>>;

/// Bytes of the shared region that holds the A tile during the products and the float output
/// tile after them.
template <class Tile>
inline constexpr int kRebuildStageBytes =
    kRebuildTileRows * (Tile::kAStride * static_cast<int>(sizeof(typename Tile::AElem)) >
                                Tile::kOutStride * static_cast<int>(sizeof(float))
                            ? Tile::kAStride * static_cast<int>(sizeof(typename Tile::AElem))
                            : Tile::kOutStride * static_cast<int>(sizeof(float)));

/// Rows [0, rows) of a basis tile (`rows` rows of `HD` contiguous elements at `src`) into shared
/// memory with row stride `kBStride`, 16 bytes at a time when `src` allows; rows
/// [rows, rows_aligned) are zeroed, so the products may run over whole `kRankAlign` steps.
template <class D, int HD, int kBStride, int kThreads>
__device__ __forceinline__ void rebuild_load_basis(D* dst, const D* src, int rows, int rows_aligned) {
  static_assert(HD * sizeof(D) % 16 == 0 && kBStride * sizeof(D) % 16 == 0, "rows of whole 16-byte vectors");
  constexpr int kVecsPerRow = HD * static_cast<int>(sizeof(D)) / 16;
  const int tid = static_cast<int>(threadIdx.x);
  if ((reinterpret_cast<std::uintptr_t>(src) & 15) == 0) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (int i = tid; i < rows * kVecsPerRow; i += kThreads) {
      const int row = i / kVecsPerRow;
      const int v = i - row * kVecsPerRow;
      *reinterpret_cast<uint4*>(dst + row * kBStride + v * (16 / static_cast<int>(sizeof(D)))) = s[i];
    }
  } else {
    for (int i = tid; i < rows * HD; i += kThreads) {
      const int row = i / HD;
      dst[row * kBStride + (i - row * HD)] = src[i];
    }
  }
  for (int i = tid; i < (rows_aligned - rows) * HD; i += kThreads) {
    const int row = i / HD;
    dst[(rows + row) * kBStride + (i - row * HD)] = from_float<D>(0.0f);
  }
}

/// Grid `ceil(num_misses / misses_per_block)` rebuild CTAs (the launcher: one wave, at most two
/// per SM), plus the gather CTAs of a combined launch (below),
/// `RebuildTile<D, HD>::kThreads` threads. CTA `b` takes misses `[b * misses_per_block, ...)`,
/// `kRebuildMaxMissesPerBlock` at a time: it stages their entries in shared memory (checking
/// every index) and walks them as runs of one (seq, kv_head). Per run, tiles of
/// `kRebuildTileRows` token rows; per tile, `acc = A_rows · B_h` in float registers (the tile
/// policy: tensor-core `mma.sync` for bf16/fp16, FMAs for fp32), with A staged `kRankStep`
/// columns at a time (16-byte loads when r and the pointer allow). The tile then goes through
/// shared memory, where each (row, pair) is rotated with `device::rotate_pair` to position
/// `chunk * c + t` (cos/sin from `device::rope_cos_sin` at every 8th row of a chunk and the
/// angle-addition step in between, as `RopeTable::apply_consecutive` does on the CPU), and out
/// to the slot as `D` with 16-byte stores.
///
/// The basis: when `basis_rows >= rank` (the launcher keeps B_h whole when it takes at most
/// 100 KiB: 42.5 KiB for r = 160, d = 128, bf16, rows padded by 16 bytes) B_h is loaded once
/// per run and kept while the CTA's next run has the same (seq, head); otherwise it streams
/// through shared memory `kRankStep` rows at a time with A (each tile re-reads it, from L2).
///
/// Performance: the byte floor per miss is `c * r` A elements read plus `c * d` keys written,
/// plus `r * d` basis elements per (seq, head) (from L2 after the first CTA): for c = 8,
/// r = 160, d = 128, bf16, 2.5 KiB + 2 KiB per miss and 40 KiB per head, i.e. 6400 misses
/// (batch 8 x 8 heads x 100) ≈ 32 MB ≈ 8 µs at 4 TB/s. The work, `2 * c * r * d` FLOPs per
/// miss (2.1 GFLOP here, 72 FLOP per byte), is small for the bf16/fp16 tensor cores, so the
/// 16-bit kernel is bound by latency (A loads, barriers, the RoPE sin/cos) rather than by
/// either floor; on the CUDA cores (fp32 storage) it is compute-bound, 31 µs at the H200's
/// 67 TFLOP/s FP32 peak. What matters is that it hides under the value gather beside it,
/// whose PCIe floor for the same misses (2 KiB each at ≈ 51 GB/s: ≈ 257 µs here)
/// is far longer: hence at most two CTAs per SM and, for 16-bit storage, 80 registers, which
/// leave each SM room for a gather CTA.
///
/// Combined launch (`rebuild_keys_beside_gather`): CTAs `rebuild_ctas` and up copy the values
/// of the same misses instead (`gather_values_warp` over their warps, as `gather_values_kernel`
/// does), so that both halves of the miss path run side by side in one launch; a standalone
/// rebuild passes `rebuild_ctas = gridDim.x`. Either way the grid first waits for the kernel
/// before it (programmatic dependent launch, a no-op when launched the ordinary way).
template <class D, int HD>
__global__ void __launch_bounds__(RebuildTile<D, HD>::kThreads, RebuildTile<D, HD>::kMinBlocksPerSm)
    rebuild_keys_kernel(const RebuildKeysParams<D> p, int misses_per_block, int basis_rows,
                        const GatherValuesParams<D> gather, int rebuild_ctas) {
  using Tile = RebuildTile<D, HD>;
  using AElem = typename Tile::AElem;
  constexpr int kThreads = Tile::kThreads;
  constexpr int kRows = kRebuildTileRows;
  constexpr int kVecElems = 16 / static_cast<int>(sizeof(D));
  constexpr int kVecsPerRow = HD / kVecElems;
  constexpr int kAVecs = Tile::kRankStep / kVecElems;
  static_assert(Tile::kRankStep % kVecElems == 0 && Tile::kRankStep % Tile::kRankAlign == 0);

  extern __shared__ __align__(16) unsigned char rebuild_smem[];
  __shared__ int4 s_miss[kRebuildMaxMissesPerBlock];  // (seq, kv_head, chunk, slot); seq -1: skip
  __shared__ float s_inv_freq[HD / 2];
  __shared__ float s_step_cos[HD / 2];  // cos/sin of one position step of pair j
  __shared__ float s_step_sin[HD / 2];
  __shared__ long long s_row_pos[kRows];  // position of tile row r; -1 past the run
  __shared__ long long s_row_dst[kRows];  // its element offset in key_slots
  D* s_basis = reinterpret_cast<D*>(rebuild_smem);
  unsigned char* s_stage_bytes = rebuild_smem + static_cast<std::size_t>(basis_rows) * Tile::kBStride * sizeof(D);
  AElem* s_a = reinterpret_cast<AElem*>(s_stage_bytes);
  float* s_out = reinterpret_cast<float*>(s_stage_bytes);

  wait_for_previous_grids();  // the miss list's writers
  allow_next_grid();          // the kernel after may take SMs as this grid's CTAs retire (one wave)
  const int tid = static_cast<int>(threadIdx.x);
  if (static_cast<int>(blockIdx.x) >= rebuild_ctas) {  // a gather CTA of the combined launch
    constexpr int kWarps = kThreads / 32;
    const int cta = static_cast<int>(blockIdx.x) - rebuild_ctas;
    const int n_gather = miss_list_count(gather.num_misses, gather.maybe_num_misses, gather.maybe_num_invalid,
                                         cta == 0 && tid == 0);
    gather_values_warp(gather, n_gather, cta * kWarps + tid / 32,
                       (static_cast<int>(gridDim.x) - rebuild_ctas) * kWarps, tid & 31);
    return;
  }
  const int n = miss_list_count(p.num_misses, p.maybe_num_misses, p.maybe_num_invalid, blockIdx.x == 0 && tid == 0);
  const long long cta_begin = static_cast<long long>(blockIdx.x) * misses_per_block;
  if (cta_begin >= n) return;
  const int cta_end = static_cast<int>(min(static_cast<long long>(n), cta_begin + misses_per_block));
  const int c = p.chunk_size;
  const int rank = p.rank;
  const bool rope = p.rope.inv_freq != nullptr;
  const int half = rope ? p.rope.rotary_dim / 2 : 0;
  for (int i = tid; i < half; i += kThreads) {
    const float f = p.rope.inv_freq[i];
    s_inv_freq[i] = f;
    device::rope_cos_sin(1, f, 1.0f, s_step_cos[i], s_step_sin[i]);
  }
  const bool resident = basis_rows >= rank;
  const bool a_vectors = rank % kVecElems == 0;
  int cached_seq = -1;
  int cached_head = -1;

  // The CTA's misses, kRebuildMaxMissesPerBlock entries at a time.
  for (int batch_begin = static_cast<int>(cta_begin); batch_begin < cta_end;
       batch_begin += kRebuildMaxMissesPerBlock) {
    const int m_count = min(kRebuildMaxMissesPerBlock, cta_end - batch_begin);
    __syncthreads();  // the previous batch's readers of s_miss are done
    for (int i = tid; i < m_count; i += kThreads) {
      const ChunkMiss m = p.misses[batch_begin + i];
      bool valid = m.seq >= 0 && m.seq < p.num_sequences && m.kv_head >= 0 && m.kv_head < p.num_kv_heads &&
                   m.chunk >= 0 && m.slot >= 0;
      int chunk = m.chunk;
      if (valid) {
        const RebuildKeysSequence<D>& s = p.sequences[m.seq];
        if (s.chunk_ids) {
          valid = chunk < s.num_chunk_ids;
          if (valid) chunk = s.chunk_ids[static_cast<long long>(m.kv_head) * s.num_chunk_ids + chunk];
        }
        valid = valid && chunk >= 0 && s.a != nullptr && s.basis != nullptr && s.key_slots != nullptr &&
                m.slot < s.capacity && (static_cast<long long>(chunk) + 1) * c <= s.num_rows;
      }
      if (!valid && p.maybe_num_invalid) atomicAdd(p.maybe_num_invalid, 1);
      s_miss[i] = valid ? make_int4(m.seq, m.kv_head, chunk, m.slot) : make_int4(-1, -1, -1, -1);
    }
    __syncthreads();

    for (int run_begin = 0; run_begin < m_count;) {
      const int4 first = s_miss[run_begin];
      int run_end = run_begin + 1;
      if (first.x < 0) {  // invalid: already counted
        run_begin = run_end;
        continue;
      }
      while (run_end < m_count && s_miss[run_end].x == first.x && s_miss[run_end].y == first.y) ++run_end;
      const RebuildKeysSequence<D> seq = p.sequences[first.x];
      const D* basis_h = seq.basis + static_cast<long long>(first.y) * rank * HD;
      const bool a_vector_loads = a_vectors && (reinterpret_cast<std::uintptr_t>(seq.a) & 15) == 0;
      const bool vector_store = (reinterpret_cast<std::uintptr_t>(seq.key_slots) & 15) == 0;
      const int run_rows = (run_end - run_begin) * c;

      for (int row0 = 0; row0 < run_rows; row0 += kRows) {
        if (tid < kRows) {
          const int row = row0 + tid;
          long long position = -1;
          long long dst = 0;
          if (row < run_rows) {
            const int q = row / c;
            const int t = row - q * c;
            const int4 m = s_miss[run_begin + q];
            position = static_cast<long long>(m.z) * c + t;
            dst = ((static_cast<long long>(m.y) * seq.capacity + m.w) * c + t) * HD;
          }
          s_row_pos[tid] = position;
          s_row_dst[tid] = dst;
        }
        __syncthreads();
        typename Tile::Acc acc;
        Tile::clear(acc);
        for (int k0 = 0; k0 < rank; k0 += Tile::kRankStep) {
          const int klen = min(Tile::kRankStep, rank - k0);
          const int k_aligned = (klen + Tile::kRankAlign - 1) / Tile::kRankAlign * Tile::kRankAlign;
          // Every reader of s_basis and of the stage has passed a barrier since its last use.
          if (!resident) {
            rebuild_load_basis<D, HD, Tile::kBStride, kThreads>(s_basis, basis_h + static_cast<long long>(k0) * HD,
                                                                klen, k_aligned);
          } else if (k0 == 0 && (first.x != cached_seq || first.y != cached_head)) {
            const int rows_aligned = (rank + Tile::kRankAlign - 1) / Tile::kRankAlign * Tile::kRankAlign;
            rebuild_load_basis<D, HD, Tile::kBStride, kThreads>(s_basis, basis_h, rank, rows_aligned);
            cached_seq = first.x;
            cached_head = first.y;
          }
          // A tile: kRows rows (the tokens of this run's misses) x kRankStep columns from k0,
          // zero past klen and past the run.
          if (a_vector_loads) {
            for (int idx = tid; idx < kRows * kAVecs; idx += kThreads) {
              const int r = idx / kAVecs;
              const int v = idx - r * kAVecs;
                const long long position = s_row_pos[r];
              uint4 raw = make_uint4(0u, 0u, 0u, 0u);
              if (v * kVecElems < klen && position >= 0)
                raw = *reinterpret_cast<const uint4*>(seq.a + position * rank + k0 + v * kVecElems);
              AElem* dst = s_a + r * Tile::kAStride + v * kVecElems;
              if constexpr (std::is_same_v<AElem, D>) {
                *reinterpret_cast<uint4*>(dst) = raw;
              } else {
                const D* e = reinterpret_cast<const D*>(&raw);
#pragma unroll
                for (int i = 0; i < kVecElems; ++i) dst[i] = to_float(e[i]);
              }
            }
          } else {
            for (int idx = tid; idx < kRows * Tile::kRankStep; idx += kThreads) {
              const int r = idx / Tile::kRankStep;
              const int kk = idx - r * Tile::kRankStep;
              const long long position = s_row_pos[r];
              D v = from_float<D>(0.0f);
              if (kk < klen && position >= 0) v = seq.a[position * rank + k0 + kk];
              if constexpr (std::is_same_v<AElem, D>) {
                s_a[r * Tile::kAStride + kk] = v;
              } else {
                s_a[r * Tile::kAStride + kk] = to_float(v);
              }
            }
          }
          __syncthreads();
          Tile::multiply(acc, s_a, s_basis + static_cast<long long>(resident ? k0 : 0) * Tile::kBStride, k_aligned);
          __syncthreads();
        }

        // The tile to shared memory (over the A tile, free since the last barrier), rotated
        // there pair by pair, then out as D.
        Tile::write(acc, s_out);
        __syncthreads();
        if (rope) {
          // Work items (segment, pair): a segment is the rows of one miss inside this tile, i.e.
          // consecutive positions. cos/sin come from `device::rope_cos_sin` at the segment's first
          // row and every kRopeReseed rows, and are advanced by one position step in between (at
          // most kRopeReseed - 1 complex products: a few float roundings, ~1e-7 of the pair).
          constexpr int kRopeReseed = 8;
          const bool interleaved = p.rope.interleaved;
          const float scale = p.rope.attention_scale;
          const int tile_rows = min(kRows, run_rows - row0);
          const int q_first = row0 / c;
          const int segments = (row0 + tile_rows - 1) / c - q_first + 1;
          for (int idx = tid; idx < segments * half; idx += kThreads) {
            const int seg = idx / half;
            const int j = idx - seg * half;
            const int q = q_first + seg;
            const int r_begin = max(q * c, row0) - row0;
            const int r_end = min((q + 1) * c, row0 + tile_rows) - row0;
            const int i0 = interleaved ? 2 * j : j;
            const int i1 = interleaved ? 2 * j + 1 : j + half;
            const float step_cos = s_step_cos[j];
            const float step_sin = s_step_sin[j];
            float cos_a = 0.0f;
            float sin_a = 0.0f;
            for (int r = r_begin; r < r_end; ++r) {
              if ((r - r_begin) % kRopeReseed == 0) {
                device::rope_cos_sin(s_row_pos[r], s_inv_freq[j], scale, cos_a, sin_a);
              } else {
                const float next_cos = cos_a * step_cos - sin_a * step_sin;
                sin_a = sin_a * step_cos + cos_a * step_sin;
                cos_a = next_cos;
              }
              float* x = s_out + r * Tile::kOutStride;
              device::rotate_pair(x[i0], x[i1], cos_a, sin_a);
            }
          }
          __syncthreads();
        }
        for (int idx = tid; idx < kRows * kVecsPerRow; idx += kThreads) {
          const int r = idx / kVecsPerRow;
          const int v = idx - r * kVecsPerRow;
          if (s_row_pos[r] < 0) continue;
          D* dst = seq.key_slots + s_row_dst[r] + v * kVecElems;
          const float* src = s_out + r * Tile::kOutStride + v * kVecElems;
          if (vector_store) {
            uint4 raw;
            D* e = reinterpret_cast<D*>(&raw);
#pragma unroll
            for (int i = 0; i < kVecElems; ++i) e[i] = from_float<D>(src[i]);
            *reinterpret_cast<uint4*>(dst) = raw;
          } else {
#pragma unroll
            for (int i = 0; i < kVecElems; ++i) dst[i] = from_float<D>(src[i]);
          }
        }
        __syncthreads();
      }
      run_begin = run_end;
    }
  }
}

}  // namespace kernels
}  // namespace shadowkv::cuda
