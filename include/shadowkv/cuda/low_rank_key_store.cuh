#pragma once
/// \file cuda/low_rank_key_store.cuh
/// \brief CUDA `LowRankKeyStore`: the pre-RoPE keys of one layer of one sequence as
/// `A [L, r] · B [r, H_kv·d]`, built on the device — Gram `KᵀK` in fp32 through cuBLAS, one
/// symmetric eigendecomposition through cuSOLVER, `A = K·V_r` through cuBLAS.

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "error.cuh"
#include "library_handles.cuh"
#include "memory.cuh"
#include "types.cuh"

namespace shadowkv {

namespace cuda::kernels {

/// `out[i] = double(gram[i])`, `n` elements.
template <class F = float>
__global__ void gram_to_double_kernel(const F* gram, double* out, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = static_cast<double>(gram[i]);
}

/// From the eigenvectors `vectors` (column-major `[D, D]`, eigenvalues ascending, D = H_kv·d):
/// the top `rank` as the basis `[H_kv, r, d]`, `basis[(h·r + j)·d + x] = T(vector D-1-j, row
/// h·d + x)`.
template <class DT>
__global__ void basis_from_eigenvectors_kernel(const double* vectors, int num_kv_heads, int head_dim, int rank,
                                               DT* basis) {
  const long long dim = static_cast<long long>(num_kv_heads) * head_dim;
  const long long total = dim * rank;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int x = static_cast<int>(e % head_dim);
    const long long hj = e / head_dim;
    const int j = static_cast<int>(hj % rank);
    const int h = static_cast<int>(hj / rank);
    basis[e] = from_float<DT>(static_cast<float>(vectors[(dim - 1 - j) * dim + static_cast<long long>(h) * head_dim + x]));
  }
}

/// The projection `V_r` as column-major `r × D` (`proj[(h·d + x)·r + j] = basis[(h·r + j)·d + x]`).
template <class DT>
__global__ void projection_from_basis_kernel(const DT* basis, int num_kv_heads, int head_dim, int rank, DT* proj) {
  const long long total = static_cast<long long>(num_kv_heads) * rank * head_dim;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int x = static_cast<int>(e % head_dim);
    const long long hj = e / head_dim;
    const int j = static_cast<int>(hj % rank);
    const int h = static_cast<int>(hj / rank);
    proj[(static_cast<long long>(h) * head_dim + x) * rank + j] = basis[e];
  }
}

}  // namespace cuda::kernels

namespace cuda::detail {

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  else return CUDA_R_16F;
}

/// Grid of a grid-stride elementwise kernel over `n` elements.
inline unsigned elementwise_grid(long long n, int threads = 256) {
  const long long blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

}  // namespace cuda::detail

/// Keys of one layer of one sequence on the device, `A = K·V_r` `[rows, r]` and the basis
/// `[H_kv, r, d]` (both in `T`), as `LowRankKeyStore<CpuBackend, T>` holds them. Two ways to
/// build, both through the Gram matrix `KᵀK` (`[H_kv·d]²`, fp32, accumulated by cuBLAS with
/// fp32 compute) and one eigendecomposition (cuSOLVER `syevd`, in float64 on the fp32 Gram):
///
/// - streaming: `accumulate(chunk)` per prefill chunk, `finalize_basis()`, then `append(rows)`;
/// - one shot: `build(keys)` does the three in one call. (The CPU backend's one-shot path is a
///   thin SVD; for the tall `[L, H_kv·d]` key matrix the Gram route finds the same subspace at
///   a fraction of the cost, so the GPU uses it for both.)
///
/// Key pointers are device addresses of token-major rows `[n, H_kv, d]` with `token_stride`
/// elements between tokens. Every call is asynchronous on the given stream except
/// `finalize_basis`/`build`, which wait for the eigensolver to report success, and the
/// `download_*` helpers. Device memory comes from the allocator given at construction.
template <StorageType T>
class LowRankKeyStore<CudaBackend, T> {
  using D = cuda::device_t<T>;

 public:
  /// \param num_kv_heads H_kv > 0   \param head_dim d > 0   \param rank 1 <= r <= H_kv·d
  LowRankKeyStore(int num_kv_heads, int head_dim, int rank,
                  cuda::DeviceAllocator& allocator = cuda::default_allocator())
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), rank_(rank), allocator_(&allocator) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
    SHADOWKV_CHECK(rank >= 1 && rank <= num_kv_heads * head_dim, "rank=", rank,
                   " must be in [1, num_kv_heads*head_dim=", num_kv_heads * head_dim, "]");
  }

  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int rank() const { return rank_; }
  int kv_dim() const { return num_kv_heads_ * head_dim_; }
  /// Rows of A (positions that can be reconstructed: 0 .. size()-1).
  index_t size() const { return rows_; }
  bool has_basis() const { return basis_.size() != 0; }
  /// Rows accumulated into the Gram matrix since the last `finalize_basis()`.
  index_t accumulated_rows() const { return gram_rows_; }

  /// Uses the engine's cuBLAS/cuSOLVER handles instead of this thread's (`thread_library_handles`).
  void set_handles(cuda::LibraryHandles handles) { handles_ = handles; }
  /// Where the build's short-lived memory comes from — the Gram, the eigensolver's work space,
  /// the projection of `append` — instead of the allocator of A and the basis (e.g. a pool of
  /// memory that lives only while a prompt is built). Must outlive the store; `clone` keeps it.
  void set_scratch_allocator(cuda::DeviceAllocator& scratch) { scratch_ = &scratch; }

  /// One-shot build from `num_tokens` rows of pre-RoPE keys: Gram, eigendecomposition, A.
  /// Replaces any previous content.
  void build(const T* keys_pre_rope, index_t num_tokens, long long token_stride, cudaStream_t stream) {
    check_keys(keys_pre_rope, num_tokens, token_stride);
    SHADOWKV_CHECK(num_tokens > 0, "num_tokens=0: keys_pre_rope has no rows");
    gram_ = {};
    gram_rows_ = 0;
    accumulate(keys_pre_rope, num_tokens, token_stride, stream);
    finalize_basis(stream);
    append(keys_pre_rope, num_tokens, token_stride, stream);
  }

  /// Streaming build, step 1: adds `KᵀK` of `num_tokens` rows to the fp32 Gram.
  void accumulate(const T* keys_pre_rope, index_t num_tokens, long long token_stride, cudaStream_t stream) {
    check_keys(keys_pre_rope, num_tokens, token_stride);
    if (num_tokens == 0) return;
    const int dim = kv_dim();
    const float beta = gram_.size() == 0 ? 0.0f : 1.0f;
    if (gram_.size() == 0) {
      gram_ = cuda::DeviceBuffer<float>(static_cast<std::size_t>(dim) * dim, stream, *scratch_);
      // The GEMM below (beta = 0) writes every element, but compute-sanitizer initcheck did not
      // see the writes of the bf16 GEMM on the H200 (likely tensor-memory-accelerator stores) and
      // flagged the Gram's copy in finish_prefill as uninitialized: zero it first (dim² floats,
      // once per sequence and layer), so that initcheck runs clean and the copy is well defined.
      SHADOWKV_CUDA_CHECK(cudaMemsetAsync(gram_.data(), 0, gram_.size() * sizeof(float), stream));
    }
    const float alpha = 1.0f;
    cublasHandle_t blas = handles().blas;
    SHADOWKV_CUBLAS_CHECK(cublasSetStream(blas, stream));
    // Column-major X = Kᵀ [dim, n] (ld = token_stride): Gram += X · Xᵀ.
    SHADOWKV_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, dim, dim, static_cast<int>(num_tokens),
                                       &alpha, keys_pre_rope, cuda::detail::cuda_data_type<T>(),
                                       static_cast<int>(token_stride), keys_pre_rope,
                                       cuda::detail::cuda_data_type<T>(), static_cast<int>(token_stride), &beta,
                                       gram_.data(), CUDA_R_32F, dim, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    gram_rows_ += num_tokens;
  }

  /// Streaming build, step 2: the top-`rank` eigenvectors of the Gram become the basis.
  /// Clears A (rows are projected afresh with `append`) and frees the Gram. Waits for the
  /// eigensolver's status (a host synchronisation with `stream`). The eigensolver's work space
  /// comes from `scratch` (default: this store's scratch allocator).
  void finalize_basis(cudaStream_t stream, cuda::DeviceAllocator* scratch = nullptr) {
    SHADOWKV_CHECK(gram_rows_ > 0, "finalize_basis() called before any accumulate()");
    const int dim = kv_dim();
    const long long elems = static_cast<long long>(dim) * dim;
    cuda::DeviceAllocator& alloc = scratch ? *scratch : *scratch_;
    cuda::DeviceBuffer<double> vectors(static_cast<std::size_t>(elems), stream, alloc);
    cuda::DeviceBuffer<double> values(static_cast<std::size_t>(dim), stream, alloc);
    cuda::kernels::gram_to_double_kernel<float><<<cuda::detail::elementwise_grid(elems), 256, 0, stream>>>(
        gram_.data(), vectors.data(), elems);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    cusolverDnHandle_t solver = handles().solver;
    SHADOWKV_CUSOLVER_CHECK(cusolverDnSetStream(solver, stream));
    int lwork = 0;
    SHADOWKV_CUSOLVER_CHECK(cusolverDnDsyevd_bufferSize(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, dim,
                                                        vectors.data(), dim, values.data(), &lwork));
    cuda::DeviceBuffer<double> work(static_cast<std::size_t>(lwork > 0 ? lwork : 1), stream, alloc);
    cuda::DeviceBuffer<int> info(1, stream, alloc);
    SHADOWKV_CUSOLVER_CHECK(cusolverDnDsyevd(solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, dim,
                                             vectors.data(), dim, values.data(), work.data(), lwork, info.data()));
    int host_info = 0;
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(&host_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    SHADOWKV_CHECK(host_info == 0, "eigendecomposition of the key Gram matrix failed (cusolverDnDsyevd info=",
                   host_info, ")");
    take_basis(vectors.data(), stream);
  }

  /// `finalize_basis()` of several stores (same `num_kv_heads`, `head_dim`, `rank`, each with
  /// rows accumulated) with their eigensolves batched: one `cusolverDnXsyevBatched` call per
  /// group of Grams (up to 256 MiB of float64 matrices at a time) instead of one `syevd` each —
  /// ~3x less time per matrix for the 1024² Grams of Llama-3.1-8B shapes. A multi-layer
  /// `SparseAttention` builds its layers' bases this way. Handles of `stores[0]`; the work
  /// space from `scratch` (default: the scratch allocator of `stores[0]`). Waits for the
  /// eigensolver's status once per group.
  static void finalize_bases(std::span<LowRankKeyStore* const> stores, cudaStream_t stream,
                             cuda::DeviceAllocator* scratch = nullptr) {
    if (stores.empty()) return;
    LowRankKeyStore& first = *stores[0];
    for (std::size_t i = 0; i < stores.size(); ++i) {
      SHADOWKV_CHECK(stores[i] != nullptr, "finalize_bases: stores[", i, "] is null");
      const LowRankKeyStore& s = *stores[i];
      SHADOWKV_CHECK(s.num_kv_heads_ == first.num_kv_heads_ && s.head_dim_ == first.head_dim_ &&
                         s.rank_ == first.rank_,
                     "finalize_bases: stores[", i, "] has num_kv_heads=", s.num_kv_heads_, ", head_dim=", s.head_dim_,
                     ", rank=", s.rank_, " but stores[0] has ", first.num_kv_heads_, ", ", first.head_dim_, ", ",
                     first.rank_);
      SHADOWKV_CHECK(s.gram_rows_ > 0, "finalize_bases: stores[", i, "] has no accumulate()d rows");
    }
    if (stores.size() == 1) {
      first.finalize_basis(stream, scratch);
      return;
    }
    const int dim = first.kv_dim();
    const long long elems = static_cast<long long>(dim) * dim;
    const std::size_t group =
        std::clamp<std::size_t>((std::size_t{256} << 20) / (static_cast<std::size_t>(elems) * sizeof(double)), 1,
                                stores.size());
    cuda::DeviceAllocator& alloc = scratch ? *scratch : *first.scratch_;
    cusolverDnHandle_t solver = first.handles().solver;
    SHADOWKV_CUSOLVER_CHECK(cusolverDnSetStream(solver, stream));
    cusolverDnParams_t params = nullptr;
    SHADOWKV_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
    struct ParamsGuard {
      cusolverDnParams_t p;
      ~ParamsGuard() { (void)cusolverDnDestroyParams(p); }
    } guard{params};
    for (std::size_t g0 = 0; g0 < stores.size(); g0 += group) {
      const std::size_t nb = std::min(group, stores.size() - g0);
      cuda::DeviceBuffer<double> vectors(nb * static_cast<std::size_t>(elems), stream, alloc);
      cuda::DeviceBuffer<double> values(nb * static_cast<std::size_t>(dim), stream, alloc);
      for (std::size_t b = 0; b < nb; ++b) {
        cuda::kernels::gram_to_double_kernel<float><<<cuda::detail::elementwise_grid(elems), 256, 0, stream>>>(
            stores[g0 + b]->gram_.data(), vectors.data() + b * elems, elems);
        SHADOWKV_CUDA_CHECK_LAUNCH();
      }
      std::size_t device_bytes = 0, host_bytes = 0;
      SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(
          solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, dim, CUDA_R_64F, vectors.data(), dim,
          CUDA_R_64F, values.data(), CUDA_R_64F, &device_bytes, &host_bytes, static_cast<std::int64_t>(nb)));
      cuda::DeviceBuffer<std::byte> work(std::max<std::size_t>(device_bytes, 1), stream, alloc);
      std::vector<std::byte> host_work(std::max<std::size_t>(host_bytes, 1));
      cuda::DeviceBuffer<int> info(nb, stream, alloc);
      SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevBatched(solver, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER,
                                                     dim, CUDA_R_64F, vectors.data(), dim, CUDA_R_64F, values.data(),
                                                     CUDA_R_64F, work.data(), device_bytes, host_work.data(),
                                                     host_bytes, info.data(), static_cast<std::int64_t>(nb)));
      std::vector<int> host_info(nb);
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(host_info.data(), info.data(), nb * sizeof(int), cudaMemcpyDeviceToHost,
                                          stream));
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (std::size_t b = 0; b < nb; ++b)
        SHADOWKV_CHECK(host_info[b] == 0, "eigendecomposition of the key Gram matrix of stores[", g0 + b,
                       "] failed (cusolverDnXsyevBatched info=", host_info[b], ")");
      for (std::size_t b = 0; b < nb; ++b)
        stores[g0 + b]->take_basis(vectors.data() + b * elems, stream);
    }
  }

  /// Projects `num_tokens` rows onto the basis and appends them to A (positions size() ..
  /// size()+n-1): `A_new = K · V_r` by cuBLAS, fp32 accumulation, stored in `T`. A grows
  /// geometrically (a reallocation copies it on `stream`).
  void append(const T* keys_pre_rope, index_t num_tokens, long long token_stride, cudaStream_t stream) {
    check_keys(keys_pre_rope, num_tokens, token_stride);
    SHADOWKV_CHECK(has_basis(), "append() needs a basis: call build() or finalize_basis() first");
    if (num_tokens == 0) return;
    reserve(rows_ + num_tokens, stream);
    // The projection V_r (column-major r × dim), from the basis rounded to T — the one
    // reconstruction uses — for this call only.
    const long long elems = static_cast<long long>(kv_dim()) * rank_;
    cuda::DeviceBuffer<D> proj(static_cast<std::size_t>(elems), stream, *scratch_);
    cuda::kernels::projection_from_basis_kernel<D><<<cuda::detail::elementwise_grid(elems), 256, 0, stream>>>(
        basis_.data(), num_kv_heads_, head_dim_, rank_, proj.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
    const float alpha = 1.0f, beta = 0.0f;
    cublasHandle_t blas = handles().blas;
    SHADOWKV_CUBLAS_CHECK(cublasSetStream(blas, stream));
    // Column-major: A_newᵀ [r, n] = proj [r, dim] (ld r) · Kᵀ [dim, n] (ld token_stride).
    SHADOWKV_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, rank_, static_cast<int>(num_tokens), kv_dim(),
                                       &alpha, proj.data(), cuda::detail::cuda_data_type<T>(), rank_, keys_pre_rope,
                                       cuda::detail::cuda_data_type<T>(), static_cast<int>(token_stride), &beta,
                                       a_.data() + static_cast<std::size_t>(rows_) * rank_,
                                       cuda::detail::cuda_data_type<T>(), rank_, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    rows_ += num_tokens;
  }

  /// Reserves room for `rows` rows of A (so that appends up to it do not reallocate).
  void reserve(index_t rows, cudaStream_t stream) {
    if (rows <= a_capacity_) return;
    const index_t grown = std::max<index_t>(rows, a_capacity_ + a_capacity_ / 2);
    cuda::DeviceBuffer<D> bigger(static_cast<std::size_t>(grown) * rank_, stream, *allocator_);
    if (rows_ > 0)
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(bigger.data(), a_.data(), static_cast<std::size_t>(rows_) * rank_ * sizeof(D),
                                          cudaMemcpyDeviceToDevice, stream));
    a_ = std::move(bigger);
    a_capacity_ = grown;
  }

  /// A copy of this store (Gram, basis and A; same allocators and handles), made on `stream`.
  LowRankKeyStore clone(cudaStream_t stream) const {
    LowRankKeyStore c(num_kv_heads_, head_dim_, rank_, *allocator_);
    c.handles_ = handles_;
    c.scratch_ = scratch_;
    c.gram_ = copy_of(gram_, gram_.size(), *scratch_, stream);
    c.gram_rows_ = gram_rows_;
    c.basis_ = copy_of(basis_, basis_.size(), *allocator_, stream);
    c.a_ = copy_of(a_, static_cast<std::size_t>(rows_) * rank_, *allocator_, stream);
    c.rows_ = rows_;
    c.a_capacity_ = a_capacity_;
    return c;
  }

  /// A `[size(), rank]`, row-major, device.
  const T* a_data() const { return reinterpret_cast<const T*>(a_.data()); }
  /// Basis `[H_kv, rank, d]`, device: `basis[h]` maps a row of A to head h's key.
  const T* basis_data() const { return reinterpret_cast<const T*>(basis_.data()); }

  /// Copies of A and the basis on the host (synchronise `stream`; for tests and inspection).
  std::vector<T> download_a(cudaStream_t stream) const {
    return download(a_data(), static_cast<std::size_t>(rows_) * rank_, stream);
  }
  std::vector<T> download_basis(cudaStream_t stream) const {
    return download(basis_data(), has_basis() ? static_cast<std::size_t>(kv_dim()) * rank_ : 0, stream);
  }

  /// Bytes of A (its rows, not the reserve) and of the basis, as the CPU backend counts them.
  std::size_t device_bytes() const {
    return (static_cast<std::size_t>(rows_) * rank_ + (has_basis() ? static_cast<std::size_t>(kv_dim()) * rank_ : 0)) *
           sizeof(T);
  }

 private:
  /// The top `rank` of the eigenvectors `vectors` (column-major `[D, D]`, eigenvalues ascending)
  /// become the basis; A and the Gram are cleared.
  void take_basis(const double* vectors, cudaStream_t stream) {
    const int dim = kv_dim();
    basis_ = cuda::DeviceBuffer<D>(static_cast<std::size_t>(dim) * rank_, stream, *allocator_);
    const long long n = static_cast<long long>(dim) * rank_;
    cuda::kernels::basis_from_eigenvectors_kernel<D><<<cuda::detail::elementwise_grid(n), 256, 0, stream>>>(
        vectors, num_kv_heads_, head_dim_, rank_, basis_.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
    a_ = {};
    rows_ = 0;
    a_capacity_ = 0;
    gram_ = {};
    gram_rows_ = 0;
  }

  void check_keys(const T* keys, index_t num_tokens, long long token_stride) const {
    SHADOWKV_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
    SHADOWKV_CHECK(num_tokens <= 0x7fffffff, "num_tokens=", num_tokens, " exceeds 2^31-1");
    SHADOWKV_CHECK(num_tokens == 0 || keys != nullptr, "keys_pre_rope is null");
    SHADOWKV_CHECK(token_stride >= kv_dim() && token_stride <= 0x7fffffff, "token_stride=", token_stride,
                   " must be in [num_kv_heads*head_dim=", kv_dim(), ", 2^31-1]");
  }
  /// A buffer of `src.size()` elements holding the first `n` of `src` (empty when `src` is).
  template <class E>
  static cuda::DeviceBuffer<E> copy_of(const cuda::DeviceBuffer<E>& src, std::size_t n, cuda::DeviceAllocator& allocator,
                                       cudaStream_t stream) {
    if (src.size() == 0) return {};
    cuda::DeviceBuffer<E> dst(src.size(), stream, allocator);
    if (n > 0)
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), n * sizeof(E), cudaMemcpyDeviceToDevice, stream));
    return dst;
  }
  cuda::LibraryHandles handles() const { return handles_.blas ? handles_ : cuda::thread_library_handles(); }
  static std::vector<T> download(const T* src, std::size_t n, cudaStream_t stream) {
    std::vector<T> out(n);
    if (n == 0) return out;
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    return out;
  }

  int num_kv_heads_, head_dim_, rank_;
  cuda::DeviceAllocator* allocator_;
  cuda::DeviceAllocator* scratch_ = allocator_;  // Gram, eigensolver work space, projection
  cuda::LibraryHandles handles_{};
  cuda::DeviceBuffer<float> gram_;  // [dim, dim] column-major, streaming build only
  index_t gram_rows_ = 0;
  cuda::DeviceBuffer<D> basis_;     // [H_kv, r, d]
  cuda::DeviceBuffer<D> a_;         // [a_capacity_, r]
  index_t rows_ = 0, a_capacity_ = 0;
};

}  // namespace shadowkv
