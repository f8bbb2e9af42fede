#pragma once
/// \file attention.hpp
/// \brief Exact softmax attention on the CPU, tile by tile with the online-softmax merge of
/// `device/softmax.hpp`, so no `[queries, keys]` buffer larger than a tile is ever formed.

#include <algorithm>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/tensor.hpp"
#include "../device/softmax.hpp"
#include "eigen_util.hpp"

namespace shadowkv::cpu {

/// Attention of `rows` float query rows over key/value tiles fed one after another.
class OnlineAttention {
 public:
  void reset(index_t rows, int head_dim) {
    rows_ = rows;
    head_dim_ = head_dim;
    state_.assign(rows, device::empty_softmax_state());
    acc_.setZero(rows, head_dim);
  }

  /// Adds the keys `k` `[n, d]` and values `v` `[n, d]` (float, row-major). Query row `i`
  /// sees only the first `limits[i]` keys of the tile when `limits` is given (causal masks).
  void add_tile(const float* q, const float* k, const float* v, index_t n, float scale,
                const index_t* limits = nullptr) {
    if (n == 0 || rows_ == 0) return;
    ConstRowMap<float> qm(q, rows_, head_dim_), km(k, n, head_dim_), vm(v, n, head_dim_);
    logits_.noalias() = (qm * km.transpose()) * scale;  // [rows, n]
    std::vector<device::SoftmaxState> tile(rows_);
    for (index_t i = 0; i < rows_; ++i) {
      const index_t valid = limits ? std::clamp<index_t>(limits[i], 0, n) : n;
      auto row = logits_.row(i);
      if (valid == 0) {
        row.setZero();
        tile[i] = device::empty_softmax_state();
        continue;
      }
      const float m = row.head(valid).maxCoeff();
      row.head(valid) = (row.head(valid).array() - m).exp().matrix();
      row.tail(n - valid).setZero();
      tile[i] = {m, row.head(valid).sum()};
    }
    tile_out_.noalias() = logits_ * vm;  // [rows, d], unnormalised
    for (index_t i = 0; i < rows_; ++i)
      device::merge_partial(state_[i], acc_.data() + i * head_dim_, tile[i],
                            tile_out_.data() + i * head_dim_, head_dim_);
  }

  /// Normalised output of row `i` into `out[0..d)`; zeros for a row that saw no key.
  void finish_row(index_t i, float* out) const {
    const float l = state_[i].l;
    for (int x = 0; x < head_dim_; ++x) out[x] = l > 0 ? acc_(i, x) / l : 0.0f;
  }

  index_t rows() const { return rows_; }

 private:
  index_t rows_ = 0;
  int head_dim_ = 0;
  std::vector<device::SoftmaxState> state_;
  RowMatrixF acc_, logits_, tile_out_;
};

/// Decode-time attention of one KV head's query group over segments of rows stored in `T`
/// (static set, selected chunks, generated tokens): rows are converted into float tiles of
/// `kTileRows` and fed to `OnlineAttention`.
template <StorageType T>
class SegmentAttention {
 public:
  static constexpr index_t kTileRows = 1024;

  /// `queries` `[G, d]` float, post-RoPE.
  void begin(const float* queries, int group, int head_dim, float scale) {
    q_ = queries;
    head_dim_ = head_dim;
    scale_ = scale;
    attn_.reset(group, head_dim);
    if (k_.rows() != kTileRows || k_.cols() != head_dim) {
      k_.resize(kTileRows, head_dim);
      v_.resize(kTileRows, head_dim);
    }
    fill_ = 0;
  }

  /// Adds `n` consecutive rows `[n, d]` of keys and values.
  void add(const T* keys, const T* values, index_t n) {
    while (n > 0) {
      const index_t take = std::min(n, kTileRows - fill_);
      to_float(keys, take * head_dim_, k_.data() + fill_ * head_dim_);
      to_float(values, take * head_dim_, v_.data() + fill_ * head_dim_);
      fill_ += take;
      keys += take * head_dim_;
      values += take * head_dim_;
      n -= take;
      if (fill_ == kTileRows) flush();
    }
  }

  /// Output `[G, d]` in float.
  void finish(float* out) {
    flush();
    for (index_t i = 0; i < attn_.rows(); ++i) attn_.finish_row(i, out + i * head_dim_);
  }

 private:
  void flush() {
    attn_.add_tile(q_, k_.data(), v_.data(), fill_, scale_);
    fill_ = 0;
  }

  const float* q_ = nullptr;
  int head_dim_ = 0;
  float scale_ = 1.0f;
  OnlineAttention attn_;
  RowMatrixF k_, v_;
  index_t fill_ = 0;
};

}  // namespace shadowkv::cpu
