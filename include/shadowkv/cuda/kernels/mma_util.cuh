#pragma once
/// \file cuda/kernels/mma_util.cuh
/// \brief PTX wrappers of the warp-level tensor-core kernels for 16-bit storage (bf16, fp16):
/// 16-byte `cp.async` copies into shared memory, `ldmatrix`, `mma.sync.m16n8k16` with fp32
/// accumulators, and the small conversions around them. Used by
/// `decode_attention_mma_kernel` (decode_attention.cuh) and `landmark_logits_mma_kernel`
/// (landmark_select.cuh). They need sm_80 or newer; kernels calling them trap on older devices.
///
/// Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
/// point type", "Warp-level matrix load instruction: ldmatrix"). Kernels write `qr` = lane / 4
/// ("groupID") and `qc` = lane % 4 ("threadID_in_group"):
///   - A (16 x 16, row-major), 4 registers: a[0] = (row qr, cols 2qc, 2qc+1), a[1] = (row
///     qr+8, same cols), a[2] = (row qr, cols 2qc+8, 2qc+9), a[3] = (row qr+8, cols 2qc+8, +9);
///   - B (16 x 8, "col"), 2 registers: b0 = (k 2qc, 2qc+1; n qr), b1 = (k 2qc+8, 2qc+9; n qr);
///   - C/D (16 x 8 float), 4 registers: c[0], c[1] = (row qr, cols 2qc, 2qc+1), c[2], c[3] =
///     (row qr+8, same cols);
/// the lower index of a pair in the low 16 bits of its register.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace shadowkv::cuda::kernels::mma {

/// Shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/// 16-byte asynchronous copy global -> shared that bypasses L1 (`.cg`: every row is read
/// once). `src_bytes` = 0 reads nothing and writes 16 zero bytes (rows past the end).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

/// An L2 cache policy that marks lines evict-first: for data streamed once per step that
/// should not push out what a following kernel reads back from L2.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

/// As `cp_async_16`, with an L2 cache policy (from `l2_evict_first_policy`).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes), "l"(policy)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/// Waits until at most `N` of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and lane `x`
/// receives (row x/4, columns 2(x%4), 2(x%4)+1) of each matrix in `r[i]`.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/// As `ldmatrix_x4`, transposed: lane `x` receives (rows 2(x%4), 2(x%4)+1, column x/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/// `c += a * b` on the tensor cores: a 16x16 (row-major fragment), b 16x8 (column-major
/// fragment), c 16x8 float.
template <class D>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<D, __half>, "the tensor-core path takes bf16 or fp16 storage");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two floats rounded (to nearest even) to `D` in one 32-bit fragment register, `lo` in the
/// low half (the lower column index of a fragment pair).
template <class D>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  }
  return u;
}

/// 2^x with the special-function unit (2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// A pointer broadcast from lane `src` of the warp (all lanes take part).
template <class T>
__device__ __forceinline__ const T* shfl_pointer(const T* ptr, int src) {
  return reinterpret_cast<const T*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(ptr), src));
}

}  // namespace shadowkv::cuda::kernels::mma
