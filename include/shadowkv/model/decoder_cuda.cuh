#pragma once
/// \file model/decoder_cuda.cuh
/// \brief `LinearOps<CudaBackend>`: the dense math of the example decoder on the GPU, so that
/// `Decoder<Policy, CudaBackend>` (model/decoder.hpp) runs every layer on the device with
/// attention through `SparseAttention<Policy, CudaBackend, float>` — the same `Decoder` code as
/// the CPU path, only the backend below it differs.
///
/// - Weights are uploaded once, when the decoder is built, as **float** (BF16/F16 checkpoints
///   widen exactly). cuBLAS's `cublasGemmEx` needs A and B of one type, so bf16 weights would
///   force bf16 activations and make the GPU's greedy tokens drift from the CPU decoder's on
///   near-ties; float keeps both paths on the same numbers. The cost is 2x the memory of a BF16
///   checkpoint (an 8B model: ~32 GB, which an H200 holds) and fp32 GEMM throughput in prefill.
/// - Matmuls: `cublasGemmEx` with float A/B/C and `CUBLAS_COMPUTE_32F` (no TF32), on the
///   thread's cuBLAS handle (`cuda::thread_library_handles`) bound to the decoder's stream.
/// - RMSNorm, SwiGLU, bias add and the embedding lookup are small kernels below (float, one
///   pass each); RoPE happens inside `SparseAttention`.
/// - Everything runs on one stream the ops own (created on the device current at construction;
///   use the decoder from that device). The only host synchronisation per forward pass is
///   `to_host`: the logits row(s) are copied to the host for sampling (`sample_token`), which is
///   plenty for an example decoder (a vocab-sized D2H copy per token, ~0.5 MB for Llama-3).
///
/// Include this header (nvcc) before instantiating `Decoder<Policy, CudaBackend>`.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>

#include <cstddef>
#include <span>
#include <tuple>
#include <vector>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../cuda/error.cuh"
#include "../cuda/library_handles.cuh"
#include "../cuda/memory.cuh"
#include "../cuda/sparse_attention.cuh"
#include "decoder.hpp"

namespace shadowkv::model {

namespace cuda_detail {

inline constexpr int kThreads = 256;

inline unsigned grid_for(long long n) {
  const long long blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

/// `x[i, :] = table[ids[i], :]`: x `[n, hidden]`, table `[vocab, hidden]`.
__global__ void embed_kernel(const float* __restrict__ table, const token_id* __restrict__ ids, long long n,
                             int hidden, float* __restrict__ x) {
  const long long total = n * hidden;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = e / hidden;
    const int col = static_cast<int>(e - row * hidden);
    x[e] = table[static_cast<long long>(ids[row]) * hidden + col];
  }
}

/// `y[i, j] += bias[j]`: y `[n, out]`.
__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, long long n, int out) {
  const long long total = n * out;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x)
    y[e] += bias[e % out];
}

/// One block per row: `y[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight`. Reads the row twice
/// (from L1/L2 the second time); the byte floor is one read of `x` and one write of `y`.
__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ weight, int hidden, float eps,
                                float* __restrict__ y) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ float inv;
  const float* xr = x + static_cast<long long>(blockIdx.x) * hidden;
  float* yr = y + static_cast<long long>(blockIdx.x) * hidden;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < hidden; j += kThreads) ss += xr[j] * xr[j];
  const float total = Reduce(temp).Sum(ss);
  if (threadIdx.x == 0) inv = rsqrtf(total / static_cast<float>(hidden) + eps);
  __syncthreads();
  for (int j = threadIdx.x; j < hidden; j += kThreads) yr[j] = xr[j] * inv * weight[j];
}

/// `gate = silu(gate) * up` elementwise.
__global__ void silu_mul_kernel(float* __restrict__ gate, const float* __restrict__ up, long long n) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float g = gate[e];
    gate[e] = g / (1.0f + expf(-g)) * up[e];
  }
}

/// A growable device array of `T` (stream-ordered allocation). `resize` does not keep the
/// contents: every caller overwrites them.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  T* data() { return buf_.data(); }
  const T* data() const { return buf_.data(); }
  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  void resize(std::size_t n, cudaStream_t stream) {
    if (n > buf_.size()) buf_ = cuda::DeviceBuffer<T>(n, stream);
    size_ = n;
  }

 private:
  cuda::DeviceBuffer<T> buf_;
  std::size_t size_ = 0;
};

/// A stream created on construction and destroyed (after draining it) on destruction.
class OwnedStream {
 public:
  OwnedStream() { SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  ~OwnedStream() {
    (void)cudaStreamSynchronize(stream_);
    (void)cudaStreamDestroy(stream_);
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace cuda_detail

/// cuBLAS + small kernels on one stream; every buffer on the device, float.
template <>
class LinearOps<CudaBackend> {
 public:
  using Buffer = cuda_detail::DeviceArray<float>;  ///< activations `[n, features]` row-major, or a vector weight

  /// A weight `[out_features, in_features]`, row-major, on the device.
  struct Matrix {
    cuda_detail::DeviceArray<float> values;
    index_t out_features = 0, in_features = 0;
    index_t rows() const { return out_features; }
    index_t cols() const { return in_features; }
    std::size_t size() const { return values.size(); }
  };

  LinearOps() = default;
  LinearOps(const LinearOps&) = delete;
  LinearOps& operator=(const LinearOps&) = delete;

  /// The stream every operation (and the decoder's attention) runs on.
  cudaStream_t stream() const { return stream_.get(); }

  /// Trailing arguments of the attention calls on this backend: the stream.
  std::tuple<cudaStream_t> attention_args() const { return {stream()}; }

  /// A matrix weight, converted to float on the host and uploaded.
  Matrix load_matrix(const WeightStore& store, const WeightRef& w) {
    SHADOWKV_CHECK(w.shape.size() == 2, "weight '", w.tensor, "' is not a matrix");
    Matrix m;
    m.out_features = w.shape[0];
    m.in_features = w.shape[1];
    upload(store, w, static_cast<std::size_t>(m.out_features * m.in_features), m.values);
    return m;
  }
  /// A vector weight (norm, bias) uploaded as float; empty when the model has none.
  Buffer load_vector(const WeightStore& store, const WeightRef& w) {
    Buffer b;
    if (w.empty()) return b;
    std::size_t n = 1;
    for (auto e : w.shape) n *= static_cast<std::size_t>(e);
    upload(store, w, n, b);
    return b;
  }

  /// `x[i] = table[ids[i]]`: `[n, hidden]` from the embedding `[vocab, hidden]`; `ids` on the host.
  void embed(const Matrix& table, std::span<const token_id> ids, Buffer& x) {
    const index_t n = static_cast<index_t>(ids.size());
    const int hidden = static_cast<int>(table.cols());
    x.resize(static_cast<std::size_t>(n * hidden), stream());
    if (n == 0) return;
    ids_.resize(ids.size(), stream());
    // From pageable memory: returns once `ids` is staged, so the caller may reuse it.
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(ids_.data(), ids.data(), ids.size_bytes(), cudaMemcpyHostToDevice, stream()));
    cuda_detail::embed_kernel<<<cuda_detail::grid_for(n * hidden), cuda_detail::kThreads, 0, stream()>>>(
        table.values.data(), ids_.data(), n, hidden, x.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
  }

  /// `y = x Wᵀ (+ bias)`: x `[n, in]`, w `[out, in]`, bias `[out]` or empty, y `[n, out]`.
  void linear(const Buffer& x, index_t n, const Matrix& w, const Buffer& bias, Buffer& y) {
    y.resize(static_cast<std::size_t>(n * w.rows()), stream());
    gemm(x, n, w, bias, y, 0.0f);
  }
  /// `y += x Wᵀ (+ bias)` (the residual connections).
  void add_linear(const Buffer& x, index_t n, const Matrix& w, const Buffer& bias, Buffer& y) {
    SHADOWKV_CHECK(y.size() == static_cast<std::size_t>(n * w.rows()), "add_linear: y holds ", y.size(),
                   " floats, expected n*out=", n * w.rows());
    gemm(x, n, w, bias, y, 1.0f);
  }

  /// `y[i] = x[i] / sqrt(mean(x[i]²) + eps) * weight` per row of `x` `[n, hidden]`; with an
  /// empty `weight`, a plain copy.
  void rms_norm(const Buffer& x, index_t n, const Buffer& weight, double eps, Buffer& y) {
    y.resize(x.size(), stream());
    if (n == 0) return;
    if (weight.empty()) {
      SHADOWKV_CUDA_CHECK(
          cudaMemcpyAsync(y.data(), x.data(), x.size() * sizeof(float), cudaMemcpyDeviceToDevice, stream()));
      return;
    }
    SHADOWKV_CHECK(n <= 0x7fffffff, "rms_norm: n=", n, " rows exceed the grid");
    cuda_detail::rms_norm_kernel<<<static_cast<unsigned>(n), cuda_detail::kThreads, 0, stream()>>>(
        x.data(), weight.data(), static_cast<int>(weight.size()), static_cast<float>(eps), y.data());
    SHADOWKV_CUDA_CHECK_LAUNCH();
  }

  /// `gate = silu(gate) * up`, elementwise (SwiGLU).
  void silu_mul(Buffer& gate, const Buffer& up) {
    const long long n = static_cast<long long>(gate.size());
    if (n == 0) return;
    cuda_detail::silu_mul_kernel<<<cuda_detail::grid_for(n), cuda_detail::kThreads, 0, stream()>>>(gate.data(),
                                                                                                up.data(), n);
    SHADOWKV_CUDA_CHECK_LAUNCH();
  }

  /// Rows `[row_begin, row_begin + n)` of `x` (`[*, features]`) into `y`.
  void copy_rows(const Buffer& x, index_t features, index_t row_begin, index_t n, Buffer& y) {
    y.resize(static_cast<std::size_t>(n * features), stream());
    if (n == 0) return;
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data() + row_begin * features, y.size() * sizeof(float),
                                        cudaMemcpyDeviceToDevice, stream()));
  }

  /// Host copy of a buffer (logits go to the sampler on the host): waits for the stream.
  std::vector<float> to_host(const Buffer& x) {
    std::vector<float> h(x.size());
    if (!h.empty())
      SHADOWKV_CUDA_CHECK(
          cudaMemcpyAsync(h.data(), x.data(), h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream()));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream()));
    return h;
  }

  /// `x` holds `n` floats (contents unspecified: the caller overwrites them).
  void resize(Buffer& x, std::size_t n) { x.resize(n, stream()); }

  /// Bytes a weight occupies on the device.
  static std::size_t bytes(const Matrix& w) { return w.size() * sizeof(float); }
  static std::size_t bytes(const Buffer& w) { return w.size() * sizeof(float); }

  /// A device view `[n, heads, d]` of `x`.
  static TensorView<float, 3> view(Buffer& x, index_t n, index_t heads, index_t d) {
    return TensorView<float, 3>(x.data(), {n, heads, d});
  }

 private:
  void upload(const WeightStore& store, const WeightRef& w, std::size_t n, Buffer& dst) {
    host_.resize(n);
    load_weight<float>(store, w, std::span<float>(host_.data(), n));
    dst.resize(n, stream());
    // From pageable memory: returns once staged, so `host_` may be refilled by the next weight.
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host_.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream()));
  }

  /// Row-major `y[n, out] = x[n, in] · Wᵀ (+ beta·y)` is column-major `Yᶜ[out, n] = Wᶜᵀ · Xᶜ`
  /// with `Wᶜ = [in, out]` (ld in), `Xᶜ = [in, n]` (ld in), `Yᶜ` (ld out).
  void gemm(const Buffer& x, index_t n, const Matrix& w, const Buffer& bias, Buffer& y, float beta) {
    const index_t out = w.rows(), in = w.cols();
    SHADOWKV_CHECK(x.size() >= static_cast<std::size_t>(n * in), "linear: x holds ", x.size(),
                   " floats, expected n*in=", n * in);
    SHADOWKV_CHECK(n <= 0x7fffffff && out <= 0x7fffffff && in <= 0x7fffffff, "linear: n=", n, " out=", out,
                   " in=", in, " exceed cuBLAS's int sizes");
    if (n == 0 || out == 0) return;
    cublasHandle_t blas = cuda::thread_library_handles().blas;
    SHADOWKV_CUBLAS_CHECK(cublasSetStream(blas, stream()));
    SHADOWKV_CUBLAS_CHECK(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_HOST));
    const float alpha = 1.0f;
    SHADOWKV_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(n),
                                       static_cast<int>(in), &alpha, w.values.data(), CUDA_R_32F,
                                       static_cast<int>(in), x.data(), CUDA_R_32F, static_cast<int>(in), &beta,
                                       y.data(), CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    if (!bias.empty()) {
      cuda_detail::add_bias_kernel<<<cuda_detail::grid_for(n * out), cuda_detail::kThreads, 0, stream()>>>(
          y.data(), bias.data(), n, static_cast<int>(out));
      SHADOWKV_CUDA_CHECK_LAUNCH();
    }
  }

  cuda_detail::OwnedStream stream_;  // first: every buffer below is freed on it
  cuda_detail::DeviceArray<token_id> ids_;
  std::vector<float> host_;  // weight staging while loading
};

}  // namespace shadowkv::model
