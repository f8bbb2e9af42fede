#pragma once
/// \file landmark_index.hpp
/// \brief CPU `LandmarkIndex`: chunk landmarks (mean post-RoPE key of each chunk), cosine-min
/// outlier chunks, and the per-step scoring and top-k selection.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>
#include <vector>

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "eigen_util.hpp"

namespace shadowkv {

/// Per KV head of one layer of one sequence: which chunks of the indexed region are outliers
/// (kept exact elsewhere) and a landmark for each other chunk. Landmark `m` of head `h`
/// stands for chunk `landmark_chunk_ids(h)[m]` (ascending); selections are landmark
/// indices, which is also how `OffloadedValuePool` numbers its host chunks.
template <StorageType T>
class LandmarkIndex<CpuBackend, T> {
 public:
  /// \param num_kv_heads H_kv   \param head_dim d   \param chunk_size c
  LandmarkIndex(int num_kv_heads, int head_dim, int chunk_size)
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), chunk_size_(chunk_size) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
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

  /// Minimum over a chunk's keys of cos(key, chunk mean), per head: `[H_kv, num_chunks]`.
  /// The lower, the less the mean represents the chunk.
  /// `keys_post_rope` `[n, H_kv, d]`; a tail of fewer than `chunk_size` tokens is not scored.
  static std::vector<float> chunk_min_cosine(TensorView<const T, 3> keys_post_rope,
                                             int chunk_size) try {
    SHADOWKV_CHECK(chunk_size > 0, "chunk_size=", chunk_size, " must be positive");
    check_view(keys_post_rope, "keys_post_rope",
               {Extent{"num_tokens", -1}, Extent{"num_kv_heads", -1}, Extent{"head_dim", -1}});
    const index_t n_chunks = keys_post_rope.shape[0] / chunk_size;
    const int h_kv = static_cast<int>(keys_post_rope.shape[1]);
    const int d = static_cast<int>(keys_post_rope.shape[2]);
    std::vector<float> out(static_cast<std::size_t>(h_kv) * n_chunks);
    std::vector<float> mean(d), key(d);
    for (int h = 0; h < h_kv; ++h)
      for (index_t ch = 0; ch < n_chunks; ++ch) {
        chunk_mean(keys_post_rope, h, ch, chunk_size, mean.data());
        const float mean_norm = norm(mean.data(), d);
        float lowest = INFINITY;
        for (int t = 0; t < chunk_size; ++t) {
          const T* k = &keys_post_rope(ch * chunk_size + t, h, 0);
          cpu::to_float(k, d, key.data());
          const float denom = std::max(norm(key.data(), d) * mean_norm, 1e-30f);
          lowest = std::min(lowest, dot(key.data(), mean.data(), d) / denom);
        }
        out[static_cast<std::size_t>(h) * n_chunks + ch] = lowest;
      }
    return out;
  } SHADOWKV_CATCH_ALLOCATION("in LandmarkIndex::chunk_min_cosine (keys_post_rope ",
                              shape_string(keys_post_rope), ")")

  /// Builds from the post-RoPE keys of the indexed region, `keys_post_rope`
  /// `[num_chunks*c, H_kv, d]` (a whole number of chunks). Per head, the
  /// `num_outlier_chunks` chunks with the lowest `chunk_min_cosine` (ties: lower chunk id)
  /// become outliers; every other chunk gets its mean key as landmark.
  /// Throws before changing anything for an invalid argument or a failed allocation.
  void build(TensorView<const T, 3> keys_post_rope, int num_outlier_chunks) try {
    check_view(keys_post_rope, "keys_post_rope",
               {Extent{"num_tokens", -1}, Extent{"num_kv_heads", num_kv_heads_},
                Extent{"head_dim", head_dim_}});
    SHADOWKV_CHECK(keys_post_rope.shape[0] % chunk_size_ == 0, "keys_post_rope has ",
                   keys_post_rope.shape[0], " tokens, not a multiple of chunk_size=", chunk_size_);
    const index_t n_chunks = keys_post_rope.shape[0] / chunk_size_;
    SHADOWKV_CHECK(num_outlier_chunks >= 0 && num_outlier_chunks <= n_chunks,
                   "num_outlier_chunks=", num_outlier_chunks, " must be in [0, num_chunks=",
                   n_chunks, "]");
    const int num_outliers = num_outlier_chunks;
    const index_t m = n_chunks - num_outliers;
    const std::vector<float> min_cos = chunk_min_cosine(keys_post_rope, chunk_size_);

    // Built aside and swapped in at the end, so that a failure leaves the index as it was.
    std::vector<std::int32_t> outlier_ids(static_cast<std::size_t>(num_kv_heads_) * num_outliers, 0);
    std::vector<std::int32_t> landmark_ids(static_cast<std::size_t>(num_kv_heads_) * m, 0);
    std::vector<T> landmarks(static_cast<std::size_t>(num_kv_heads_) * m * head_dim_, static_cast<T>(0.0f));
    std::vector<std::int32_t> order(n_chunks);
    std::vector<char> is_outlier(n_chunks);
    std::vector<float> mean(head_dim_);
    for (int h = 0; h < num_kv_heads_; ++h) {
      const float* score = min_cos.data() + static_cast<std::size_t>(h) * n_chunks;
      std::iota(order.begin(), order.end(), 0);
      auto lower = [&](std::int32_t a, std::int32_t b) {
        return score[a] < score[b] || (score[a] == score[b] && a < b);
      };
      std::partial_sort(order.begin(), order.begin() + num_outliers, order.end(), lower);
      std::sort(order.begin(), order.begin() + num_outliers);
      std::fill(is_outlier.begin(), is_outlier.end(), 0);
      for (int o = 0; o < num_outliers; ++o) {
        is_outlier[order[o]] = 1;
        outlier_ids[static_cast<std::size_t>(h) * num_outliers + o] = order[o];
      }
      index_t slot = 0;
      for (index_t ch = 0; ch < n_chunks; ++ch) {
        if (is_outlier[ch]) continue;
        landmark_ids[static_cast<std::size_t>(h) * m + slot] = static_cast<std::int32_t>(ch);
        chunk_mean(keys_post_rope, h, ch, chunk_size_, mean.data());
        cpu::from_float(mean.data(), head_dim_,
                        landmarks.data() + (static_cast<std::size_t>(h) * m + slot) * head_dim_);
        ++slot;
      }
    }
    num_chunks_ = n_chunks;
    num_outliers_ = num_outliers;
    outlier_ids_.swap(outlier_ids);
    landmark_ids_.swap(landmark_ids);
    landmarks_.swap(landmarks);
  } SHADOWKV_CATCH_ALLOCATION("in LandmarkIndex::build (keys_post_rope ", shape_string(keys_post_rope),
                              ")")

  /// Outlier chunk ids of head `h`, ascending.
  std::span<const std::int32_t> outlier_chunk_ids(int h) const {
    check_head(h);
    return {outlier_ids_.data() + static_cast<std::size_t>(h) * num_outliers_,
            static_cast<std::size_t>(num_outliers_)};
  }
  /// Chunk id of each landmark of head `h`, ascending: `[num_landmarks()]`.
  std::span<const std::int32_t> landmark_chunk_ids(int h) const {
    check_head(h);
    return {landmark_ids_.data() + static_cast<std::size_t>(h) * num_landmarks(),
            static_cast<std::size_t>(num_landmarks())};
  }
  /// Landmarks of head `h`: `[num_landmarks(), d]`.
  const T* landmarks(int h) const {
    check_head(h);
    return landmarks_.data() + static_cast<std::size_t>(h) * num_landmarks() * head_dim_;
  }

  /// Scores post-RoPE `queries` `[H_q, d]` (H_q a multiple of H_kv) against the landmarks:
  /// `softmax(q * landmarks^T * scale)` per query head, max over the G query heads of each
  /// KV head, into `scores` `[H_kv, num_landmarks()]`.
  void score(TensorView<const float, 2> queries, float scale, TensorView<float, 2> scores) const try {
    check_view(queries, "queries", {Extent{"num_q_heads", -1}, Extent{"head_dim", head_dim_}});
    SHADOWKV_CHECK(queries.shape[0] > 0 && queries.shape[0] % num_kv_heads_ == 0,
                   "queries has ", queries.shape[0], " heads, not a positive multiple of num_kv_heads=",
                   num_kv_heads_);
    const index_t m = num_landmarks();
    check_view(scores, "scores", {Extent{"num_kv_heads", num_kv_heads_}, Extent{"num_landmarks", m}});
    if (m == 0) return;
    const int g = static_cast<int>(queries.shape[0] / num_kv_heads_);
    cpu::RowMatrixF lm(m, head_dim_);
    for (int h = 0; h < num_kv_heads_; ++h) {
      cpu::to_float(landmarks(h), m * head_dim_, lm.data());
      cpu::ConstRowMap<float> q(queries.row(static_cast<index_t>(h) * g), g, head_dim_);
      cpu::RowMatrixF logits = (q * lm.transpose()) * scale;  // [G, M]
      cpu::RowMap<float> out(scores.row(h), 1, m);
      for (int j = 0; j < g; ++j) {
        auto row = logits.row(j);
        const float mx = row.maxCoeff();
        row = (row.array() - mx).exp().matrix();
        row /= row.sum();
        if (j == 0) out = row;
        else out = out.cwiseMax(row);
      }
    }
  } SHADOWKV_CATCH_ALLOCATION("in LandmarkIndex::score (", num_landmarks(), " landmarks)")

  /// Top-`k` per head of `scores` `[H_kv, M]` into `selected` `[H_kv, min(k, M)]`, each row
  /// ascending. Ties go to the lower index; NaN scores rank last.
  static void select_top_k(TensorView<const float, 2> scores, int k,
                           TensorView<std::int32_t, 2> selected) try {
    SHADOWKV_CHECK(k >= 0, "k=", k, " must be >= 0");
    check_view(scores, "scores", {Extent{"num_kv_heads", -1}, Extent{"num_landmarks", -1}});
    const index_t m = scores.shape[1];
    const index_t kk = std::min<index_t>(k, m);
    check_view(selected, "selected", {Extent{"num_kv_heads", scores.shape[0]}, Extent{"k", kk}});
    std::vector<std::int32_t> order(m);
    for (index_t h = 0; h < scores.shape[0]; ++h) {
      const float* s = scores.row(h);
      std::iota(order.begin(), order.end(), 0);
      auto value = [&](std::int32_t i) { return std::isnan(s[i]) ? -INFINITY : s[i]; };
      auto higher = [&](std::int32_t a, std::int32_t b) {
        const float va = value(a), vb = value(b);
        return va > vb || (va == vb && a < b);
      };
      std::nth_element(order.begin(), order.begin() + kk, order.end(), higher);
      std::sort(order.begin(), order.begin() + kk);
      std::copy(order.begin(), order.begin() + kk, selected.row(h));
    }
  } SHADOWKV_CATCH_ALLOCATION("in LandmarkIndex::select_top_k (scores ", shape_string(scores), ")")

  /// Bytes the CUDA backend keeps on the device: landmarks and both id lists.
  std::size_t device_bytes() const {
    return cpu::bytes_of(landmarks_) + cpu::bytes_of(landmark_ids_) + cpu::bytes_of(outlier_ids_);
  }

 private:
  void check_head(int h) const {
    SHADOWKV_CHECK(h >= 0 && h < num_kv_heads_, "kv_head=", h, " out of range [0, ",
                   num_kv_heads_, ")");
  }
  static float dot(const float* a, const float* b, int n) {
    float s = 0;
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
  static float norm(const float* a, int n) { return std::sqrt(dot(a, a, n)); }
  static void chunk_mean(const TensorView<const T, 3>& keys, int h, index_t ch, int c, float* mean) {
    const int d = static_cast<int>(keys.shape[2]);
    std::fill(mean, mean + d, 0.0f);
    for (int t = 0; t < c; ++t) {
      const T* k = &keys(ch * c + t, h, 0);
      for (int x = 0; x < d; ++x) mean[x] += static_cast<float>(k[x]);
    }
    for (int x = 0; x < d; ++x) mean[x] /= static_cast<float>(c);
  }

  int num_kv_heads_, head_dim_, chunk_size_;
  index_t num_chunks_ = 0;
  int num_outliers_ = 0;
  std::vector<std::int32_t> outlier_ids_;   // [H_kv, O]
  std::vector<std::int32_t> landmark_ids_;  // [H_kv, M]
  std::vector<T> landmarks_;                // [H_kv, M, d]
};

}  // namespace shadowkv
