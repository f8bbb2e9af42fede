#pragma once
/// \file cuda/landmark_index.cuh
/// \brief `LandmarkIndex<CudaBackend, T>`: the landmark build on the device (chunk means of the
/// post-RoPE keys, min-cosine outlier chunks, landmark and outlier ids), and
/// `cuda::chunk_min_cosine`. Kernels: kernels/landmark_build.cuh. The decode-step scoring and
/// top-k of these landmarks are `cuda::score_landmarks` / `cuda::select_top_k`
/// (cuda/landmark_ops.cuh).
///
/// Results equal `LandmarkIndex<CpuBackend, T>`: the landmarks bit for bit (each element is
/// summed over the chunk's tokens in token order, in float, then divided by c, as the CPU class
/// does when its compiler keeps the order of float additions, i.e. without -ffast-math); the
/// minimum cosines to float rounding (the dot products are summed in another order; measured
/// within 1.1e-6 on Gaussian keys, bit-equal when every sum is exact); so the outlier and
/// landmark ids are equal wherever the O-th and (O+1)-th lowest minimum cosines of a head are
/// more than that rounding apart, and in any case the split is the CPU's rule applied to the
/// device's minimum cosines (lowest first, ties to the lower chunk id, -0 equal to +0).
///
/// Head dims: those of the CUDA kernels, 64, 96, 128 and 256 (`check_kernel_head_dim`).

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/backend.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "dispatch.cuh"
#include "error.cuh"
#include "kernels/landmark_build.cuh"
#include "memory.cuh"
#include "types.cuh"

namespace shadowkv::cuda {

namespace landmark_build_launch {

/// Shape checks shared by `chunk_min_cosine` and `LandmarkIndex::build`; no CUDA call.
inline void check_key_shapes(index_t num_tokens, long long token_stride, int num_kv_heads, int head_dim,
                             int chunk_size) {
  SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
  check_kernel_head_dim(head_dim);
  SHADOWKV_CHECK(chunk_size > 0, "chunk_size=", chunk_size, " must be positive");
  SHADOWKV_CHECK(num_tokens >= 0, "num_tokens=", num_tokens, " must be >= 0");
  SHADOWKV_CHECK(num_tokens % chunk_size == 0, "num_tokens=", num_tokens, " is not a multiple of chunk_size=",
                 chunk_size);
  SHADOWKV_CHECK(num_tokens / chunk_size <= INT32_MAX, "num_tokens=", num_tokens, " makes more than 2^31-1 chunks");
  const long long row = static_cast<long long>(num_kv_heads) * head_dim;
  SHADOWKV_CHECK(token_stride >= row, "token_stride=", token_stride, " must be >= num_kv_heads*head_dim=", row);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// Enqueues `chunk_stats_kernel` for validated shapes (`num_chunks` > 0).
template <StorageType T>
void launch_chunk_stats(const T* keys, index_t num_chunks, long long token_stride, int num_kv_heads, int head_dim,
                        int chunk_size, float* min_cosine, T* maybe_means, cudaStream_t stream) {
  using D = device_t<T>;
  ChunkStatsParams<D> p;
  p.keys = as_device(keys);
  p.token_stride = token_stride;
  p.num_chunks = num_chunks;
  p.num_kv_heads = num_kv_heads;
  p.chunk_size = chunk_size;
  p.min_cosine = min_cosine;
  p.maybe_means = maybe_means ? as_device(maybe_means) : nullptr;
  // 16-byte vectors need every row start aligned: the base, the token stride (head offsets are
  // multiples of d * sizeof(T), itself a multiple of 16 for every supported d) and the means.
  const bool vec16 = aligned16(keys) && (token_stride * static_cast<long long>(sizeof(T))) % 16 == 0 &&
                     (maybe_means == nullptr || aligned16(maybe_means));
  namespace bd = kernels::landmark_build_detail;
  SHADOWKV_DISPATCH_HEAD_DIM(head_dim, HD, [&] {
    auto launch = [&]<int VecBytes>() {
      using L = bd::StatsLayout<D, HD, VecBytes>;
      constexpr long long kItemsPerCta = (bd::kStatsThreads / 32) * L::kGroups;
      const long long items = num_chunks * num_kv_heads;
      const long long ctas = (items + kItemsPerCta - 1) / kItemsPerCta;
      const unsigned grid = static_cast<unsigned>(ctas < (1 << 20) ? ctas : (1 << 20));  // grid-stride past that
      kernels::chunk_stats_kernel<D, HD, VecBytes><<<grid, bd::kStatsThreads, 0, stream>>>(p);
      SHADOWKV_CUDA_CHECK_LAUNCH();
    };
    if (vec16)
      launch.template operator()<16>();
    else
      launch.template operator()<static_cast<int>(sizeof(T))>();
  });
}

}  // namespace landmark_build_launch

/// Minimum over each chunk's keys of cos(key, chunk mean), per KV head, on the device: the
/// device counterpart of `LandmarkIndex<CpuBackend, T>::chunk_min_cosine` (equal to float
/// rounding; the mean is the float mean, not the one rounded to T).
///
/// \param keys          device `[num_tokens, H_kv, d]` token-major post-RoPE keys, `token_stride`
///                      elements between consecutive tokens (>= H_kv * d); may be null when
///                      num_tokens = 0. 16-byte aligned rows take the vectorised path.
/// \param num_tokens    a multiple of `chunk_size` (num_chunks = num_tokens / chunk_size)
/// \param head_dim      d: 64, 96, 128 or 256
/// \param out           device `[H_kv, num_chunks]` floats
/// \param stream        the launch goes on it; nothing synchronises.
///
/// Throws `shadowkv::Error` naming the argument for bad shapes or a null pointer (before any
/// CUDA call), and for a failed launch.
template <StorageType T>
void chunk_min_cosine(const T* keys, index_t num_tokens, long long token_stride, int num_kv_heads, int head_dim,
                      int chunk_size, float* out, cudaStream_t stream) {
  landmark_build_launch::check_key_shapes(num_tokens, token_stride, num_kv_heads, head_dim, chunk_size);
  if (num_tokens == 0) return;
  SHADOWKV_CHECK(keys, "keys must be non-null");
  SHADOWKV_CHECK(out, "out must be non-null");
  landmark_build_launch::launch_chunk_stats(keys, num_tokens / chunk_size, token_stride, num_kv_heads, head_dim,
                                            chunk_size, out, static_cast<T*>(nullptr), stream);
}

}  // namespace shadowkv::cuda

namespace shadowkv {

/// The CUDA backend's `LandmarkIndex`: per KV head of one layer of one sequence, which chunks
/// of the indexed region are outliers and a landmark (the chunk's mean post-RoPE key) for each
/// other chunk, all in device memory from the allocator. Same member names and semantics as
/// `LandmarkIndex<CpuBackend, T>`; the accessors return device pointers, and the `std::vector`
/// downloads (for tests and inspection) synchronise the given stream.
///
/// Not thread-safe; movable, not copyable.
template <StorageType T>
class LandmarkIndex<CudaBackend, T> {
 public:
  /// \param num_kv_heads H_kv   \param head_dim d (64, 96, 128 or 256)   \param chunk_size c
  /// \param allocator    device memory of the index and the build's scratch; must outlive it.
  /// Throws `shadowkv::Error` naming the argument; makes no CUDA call.
  LandmarkIndex(int num_kv_heads, int head_dim, int chunk_size,
                cuda::DeviceAllocator& allocator = cuda::default_allocator())
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), chunk_size_(chunk_size), allocator_(&allocator) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    cuda::check_kernel_head_dim(head_dim);
    SHADOWKV_CHECK(chunk_size > 0, "chunk_size=", chunk_size, " must be positive");
  }

  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int chunk_size() const { return chunk_size_; }
  /// Chunks in the indexed region (outliers included).
  index_t num_chunks() const { return num_chunks_; }
  int num_outliers() const { return num_outliers_; }
  /// Landmarks per head: num_chunks() - num_outliers().
  index_t num_landmarks() const { return num_chunks_ - num_outliers_; }

  /// Builds from the post-RoPE keys of the indexed region, on `stream`, without synchronising
  /// the host. Per head, the `num_outlier_chunks` chunks with the lowest minimum cosine (see
  /// `cuda::chunk_min_cosine`; ties: lower chunk id) become outliers; every other chunk gets
  /// its mean key (float sum over its tokens / c, rounded to T) as landmark, in chunk order.
  ///
  /// \param keys_post_rope      device `[num_tokens, H_kv, d]` token-major, `token_stride`
  ///                            elements between consecutive tokens (>= H_kv * d: a wider
  ///                            buffer is fine); read by kernels on `stream`, so it must stay
  ///                            valid until they ran. May be null when num_tokens = 0.
  /// \param num_tokens          num_chunks * c
  /// \param num_outlier_chunks  O in [0, num_chunks]; O = num_chunks leaves no landmark.
  ///
  /// The index's buffers are allocated anew (stream-ordered on `stream`, with a scratch of
  /// `4 * H_kv * num_chunks` bytes of scores plus, when 0 < O < num_chunks, the means of every
  /// chunk, freed at the end of the call, stream-ordered); the previous build's are released
  /// stream-ordered on the stream they were built on, so work still reading them must be
  /// ordered before that stream's next work. Throws `shadowkv::Error` naming the argument
  /// before any CUDA call for a bad shape or a null pointer, and for a failed allocation or
  /// launch (the index then keeps its previous contents). The scratch comes from `scratch`
  /// when given (e.g. a pool for memory that lives only while a prompt is built), else from
  /// the index's allocator.
  void build(const T* keys_post_rope, index_t num_tokens, long long token_stride, int num_outlier_chunks,
             cudaStream_t stream, cuda::DeviceAllocator* scratch = nullptr) {
    cuda::landmark_build_launch::check_key_shapes(num_tokens, token_stride, num_kv_heads_, head_dim_, chunk_size_);
    const index_t n_chunks = num_tokens / chunk_size_;
    SHADOWKV_CHECK(num_outlier_chunks >= 0 && num_outlier_chunks <= n_chunks, "num_outlier_chunks=",
                   num_outlier_chunks, " must be in [0, num_chunks=", n_chunks, "]");
    SHADOWKV_CHECK(keys_post_rope || num_tokens == 0, "keys_post_rope must be non-null");
    const index_t m = n_chunks - num_outlier_chunks;
    const auto h = static_cast<std::size_t>(num_kv_heads_);
    const auto d = static_cast<std::size_t>(head_dim_);

    cuda::DeviceBuffer<T> landmarks;
    cuda::DeviceBuffer<std::int32_t> landmark_ids, outlier_ids;
    if (n_chunks > 0) {
      landmarks = make_buffer<T>(h * static_cast<std::size_t>(m) * d, stream);
      landmark_ids = make_buffer<std::int32_t>(h * static_cast<std::size_t>(m), stream);
      outlier_ids = make_buffer<std::int32_t>(h * static_cast<std::size_t>(num_outlier_chunks), stream);
      cuda::DeviceAllocator& temp = scratch ? *scratch : *allocator_;
      cuda::DeviceBuffer<float> min_cosine = make_buffer<float>(h * static_cast<std::size_t>(n_chunks), stream, temp);
      // The means go straight into the landmarks when every chunk is one; with outliers they
      // are gathered from a scratch copy once the split is known; with no landmark, nowhere.
      cuda::DeviceBuffer<T> means;
      T* means_out = nullptr;
      if (m == n_chunks) {
        means_out = landmarks.data();
      } else if (m > 0) {
        means = make_buffer<T>(h * static_cast<std::size_t>(n_chunks) * d, stream, temp);
        means_out = means.data();
      }
      cuda::landmark_build_launch::launch_chunk_stats(keys_post_rope, n_chunks, token_stride, num_kv_heads_,
                                                      head_dim_, chunk_size_, min_cosine.data(), means_out, stream);

      namespace bd = cuda::kernels::landmark_build_detail;
      cuda::OutlierSplitParams split;
      split.min_cosine = min_cosine.data();
      split.num_chunks = n_chunks;
      split.num_outliers = num_outlier_chunks;
      split.outlier_ids = outlier_ids.data();
      split.landmark_ids = landmark_ids.data();
      cuda::kernels::outlier_split_kernel<cuda::OutlierSplitParams><<<static_cast<unsigned>(num_kv_heads_), bd::kSplitThreads, 0, stream>>>(
          split);
      SHADOWKV_CUDA_CHECK_LAUNCH();

      if (means.data()) {
        cuda::LandmarkGatherParams gather;
        gather.means = means.data();
        gather.landmark_ids = landmark_ids.data();
        gather.landmarks = landmarks.data();
        gather.num_chunks = n_chunks;
        gather.num_landmarks = m;
        gather.num_kv_heads = num_kv_heads_;
        gather.row_bytes = head_dim_ * static_cast<int>(sizeof(T));
        auto launch = [&]<class U>() {
          const long long units = static_cast<long long>(h) * m * (gather.row_bytes / static_cast<int>(sizeof(U)));
          const long long ctas = (units + bd::kGatherThreads - 1) / bd::kGatherThreads;
          const unsigned grid = static_cast<unsigned>(ctas < (1 << 20) ? ctas : (1 << 20));
          cuda::kernels::landmark_gather_kernel<U><<<grid, bd::kGatherThreads, 0, stream>>>(gather);
          SHADOWKV_CUDA_CHECK_LAUNCH();
        };
        if (cuda::landmark_build_launch::aligned16(means.data()) &&
            cuda::landmark_build_launch::aligned16(landmarks.data()))
          launch.template operator()<uint4>();
        else
          launch.template operator()<unsigned int>();  // rows are whole 4-byte words for every d
      }
    }
    landmarks_.swap(landmarks);
    landmark_ids_.swap(landmark_ids);
    outlier_ids_.swap(outlier_ids);
    num_chunks_ = n_chunks;
    num_outliers_ = num_outlier_chunks;
  }

  /// Device `[H_kv, num_landmarks(), d]`: landmark m of head h at `(h * M + m) * d`; null when
  /// there is none (before a build, or M = 0).
  const T* landmarks_data() const { return landmarks_.data(); }
  /// Device `[H_kv, num_landmarks()]`: the chunk id of each landmark, ascending per head.
  const std::int32_t* landmark_chunk_ids_data() const { return landmark_ids_.data(); }
  /// Device `[H_kv, num_outliers()]`: the outlier chunk ids, ascending per head.
  const std::int32_t* outlier_chunk_ids_data() const { return outlier_ids_.data(); }

  /// Chunk id of each landmark of head `h`, ascending: `[num_landmarks()]`. Copies on
  /// `stream` and synchronises it.
  std::vector<std::int32_t> landmark_chunk_ids(int h, cudaStream_t stream) const {
    check_head(h);
    return download(landmark_ids_.data(), static_cast<std::size_t>(h) * num_landmarks(),
                    static_cast<std::size_t>(num_landmarks()), stream);
  }
  /// Outlier chunk ids of head `h`, ascending: `[num_outliers()]`. Synchronises `stream`.
  std::vector<std::int32_t> outlier_chunk_ids(int h, cudaStream_t stream) const {
    check_head(h);
    return download(outlier_ids_.data(), static_cast<std::size_t>(h) * num_outliers_,
                    static_cast<std::size_t>(num_outliers_), stream);
  }
  /// Landmarks of head `h`: `[num_landmarks(), d]`. Synchronises `stream`.
  std::vector<T> landmarks(int h, cudaStream_t stream) const {
    check_head(h);
    const auto per_head = static_cast<std::size_t>(num_landmarks()) * head_dim_;
    return download(landmarks_.data(), static_cast<std::size_t>(h) * per_head, per_head, stream);
  }

  /// Bytes kept on the device: landmarks and both id lists (what the CPU class counts).
  std::size_t device_bytes() const { return landmarks_.bytes() + landmark_ids_.bytes() + outlier_ids_.bytes(); }

 private:
  void check_head(int h) const {
    SHADOWKV_CHECK(h >= 0 && h < num_kv_heads_, "kv_head=", h, " out of range [0, ", num_kv_heads_, ")");
  }
  /// An empty buffer for n = 0 (no allocator call), else n elements from the allocator.
  template <class E>
  cuda::DeviceBuffer<E> make_buffer(std::size_t n, cudaStream_t stream) const {
    return make_buffer<E>(n, stream, *allocator_);
  }
  template <class E>
  static cuda::DeviceBuffer<E> make_buffer(std::size_t n, cudaStream_t stream, cuda::DeviceAllocator& allocator) {
    return n == 0 ? cuda::DeviceBuffer<E>() : cuda::DeviceBuffer<E>(n, stream, allocator);
  }
  template <class E>
  static std::vector<E> download(const E* src, std::size_t offset, std::size_t n, cudaStream_t stream) {
    std::vector<E> out(n);
    if (n == 0) return out;
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(out.data(), src + offset, n * sizeof(E), cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    return out;
  }

  int num_kv_heads_, head_dim_, chunk_size_;
  cuda::DeviceAllocator* allocator_;
  index_t num_chunks_ = 0;
  int num_outliers_ = 0;
  cuda::DeviceBuffer<T> landmarks_;                 // [H_kv, M, d]
  cuda::DeviceBuffer<std::int32_t> landmark_ids_;   // [H_kv, M]
  cuda::DeviceBuffer<std::int32_t> outlier_ids_;    // [H_kv, O]
};

}  // namespace shadowkv
