#pragma once
/// \file low_rank_key_store.hpp
/// \brief CPU `LowRankKeyStore`: truncated SVD of the pre-RoPE keys of one layer of one
/// sequence, with all KV heads concatenated, `K [L, H_kv*d] ~= A [L, r] * B [r, H_kv*d]`.

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <span>
#include <vector>

#include "../core/backend.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rope.hpp"
#include "../core/tensor.hpp"
#include "../device/rope.hpp"
#include "eigen_util.hpp"

namespace shadowkv {

/// Keys of one layer of one sequence stored as `A = U*Sigma` `[rows, r]` and the basis
/// `B^T` kept per KV head as `[H_kv, r, d]` (both in `T`). Two ways to build:
///
/// - one shot: `build(keys)` runs a thin SVD of the whole `[L, H_kv*d]` matrix;
/// - streaming: `accumulate(chunk)` for every prefill chunk (Gram `K^T K` in float64),
///   `finalize_basis()` (one symmetric eigendecomposition), then `append(chunk)` projects
///   each chunk onto the basis. Only the `[H_kv*d]^2` Gram matrix is held meanwhile.
///
/// Both give the same `A*B` (the basis itself is unique up to the signs of its columns).
template <StorageType T>
class LowRankKeyStore<CpuBackend, T> {
 public:
  /// \param num_kv_heads H_kv > 0   \param head_dim d > 0   \param rank 1 <= r <= H_kv*d
  LowRankKeyStore(int num_kv_heads, int head_dim, int rank)
      : num_kv_heads_(num_kv_heads), head_dim_(head_dim), rank_(rank) {
    SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
    SHADOWKV_CHECK(head_dim > 0, "head_dim=", head_dim, " must be positive");
    const index_t kv_dim = index_t{num_kv_heads} * head_dim;
    SHADOWKV_CHECK(kv_dim <= kMaxHeadElements, "num_kv_heads=", num_kv_heads, " times head_dim=",
                   head_dim, " exceeds ", kMaxHeadElements, " elements per token");
    SHADOWKV_CHECK(rank >= 1 && rank <= kv_dim, "rank=", rank,
                   " must be in [1, num_kv_heads*head_dim=", kv_dim, "]");
  }

  int num_kv_heads() const { return num_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int rank() const { return rank_; }
  int kv_dim() const { return num_kv_heads_ * head_dim_; }
  /// Rows of A (positions that can be reconstructed: 0 .. size()-1).
  index_t size() const { return static_cast<index_t>(a_.size()) / rank_; }
  bool has_basis() const { return !basis_.empty(); }
  /// Rows accumulated into the Gram matrix since the last `finalize_basis()`.
  index_t accumulated_rows() const { return gram_rows_; }

  /// One-shot build from `keys_pre_rope` `[L, H_kv, d]`: thin SVD, keeps the top `rank`
  /// right singular vectors, `A = K * V_r`. Replaces any previous content; a failure leaves
  /// the store as it was.
  void build(TensorView<const T, 3> keys_pre_rope) try {
    check_keys(keys_pre_rope, "keys_pre_rope");
    SHADOWKV_CHECK(keys_pre_rope.shape[0] > 0, "keys_pre_rope has no rows");
    const cpu::RowMatrixD k = to_double(keys_pre_rope);
    Eigen::BDCSVD<Eigen::MatrixXd> svd(k, Eigen::ComputeThinV);
    const Eigen::MatrixXd& v = svd.matrixV();  // [n, min(L, n)], descending singular values
    Eigen::MatrixXd basis = Eigen::MatrixXd::Zero(kv_dim(), rank_);
    const int keep = std::min<int>(rank_, static_cast<int>(v.cols()));
    basis.leftCols(keep) = v.leftCols(keep);
    if (keep < rank_) complete_basis(basis, keep);
    std::vector<T> basis_t = to_storage(basis);
    std::vector<T> a = project(k, basis_t);
    basis_.swap(basis_t);
    a_.swap(a);
    clear_gram();
  } SHADOWKV_CATCH_ALLOCATION("in LowRankKeyStore::build (keys_pre_rope ", shape_string(keys_pre_rope), ")")

  /// Streaming build, step 1: adds `K^T K` of `keys_pre_rope` `[n, H_kv, d]` to the Gram.
  void accumulate(TensorView<const T, 3> keys_pre_rope) try {
    check_keys(keys_pre_rope, "keys_pre_rope");
    if (keys_pre_rope.shape[0] == 0) return;
    if (gram_.size() == 0) gram_ = Eigen::MatrixXd::Zero(kv_dim(), kv_dim());
    const cpu::RowMatrixD k = to_double(keys_pre_rope);
    gram_.selfadjointView<Eigen::Lower>().rankUpdate(k.transpose());
    gram_rows_ += keys_pre_rope.shape[0];
  } SHADOWKV_CATCH_ALLOCATION("in LowRankKeyStore::accumulate (keys_pre_rope ", shape_string(keys_pre_rope),
                              ")")

  /// Streaming build, step 2: the top-`rank` eigenvectors of the Gram become the basis.
  /// Clears A (the rows are projected afresh with `append`) and frees the Gram.
  void finalize_basis() try {
    SHADOWKV_CHECK(gram_rows_ > 0, "finalize_basis() called before any accumulate()");
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram_, Eigen::ComputeEigenvectors);
    SHADOWKV_CHECK(eig.info() == Eigen::Success, "eigendecomposition of the key Gram matrix failed");
    // Eigenvalues come in ascending order: the last `rank` columns, reversed.
    Eigen::MatrixXd basis(kv_dim(), rank_);
    for (int j = 0; j < rank_; ++j) basis.col(j) = eig.eigenvectors().col(kv_dim() - 1 - j);
    basis_ = to_storage(basis);
    a_.clear();
    clear_gram();
  } SHADOWKV_CATCH_ALLOCATION("in LowRankKeyStore::finalize_basis (num_kv_heads*head_dim=", kv_dim(), ")")

  /// Projects `keys_pre_rope` `[n, H_kv, d]` onto the basis and appends the `n` rows to A
  /// (positions size() .. size()+n-1).
  void append(TensorView<const T, 3> keys_pre_rope) try {
    check_keys(keys_pre_rope, "keys_pre_rope");
    SHADOWKV_CHECK(has_basis(), "append() needs a basis: call build() or finalize_basis() first");
    if (keys_pre_rope.shape[0] == 0) return;
    const std::vector<T> rows = project(to_double(keys_pre_rope), basis_);
    a_.insert(a_.end(), rows.begin(), rows.end());
  } SHADOWKV_CATCH_ALLOCATION("in LowRankKeyStore::append (keys_pre_rope ", shape_string(keys_pre_rope), ")")

  /// Rebuilds the pre-RoPE keys of `kv_head` at `positions` into `out` `[n, d]` (float),
  /// then rotates each row to its position with `rope` when given.
  void reconstruct(int kv_head, std::span<const index_t> positions, float* out,
                   const RopeTable* rope = nullptr) const try {
    SHADOWKV_CHECK(kv_head >= 0 && kv_head < num_kv_heads_, "kv_head=", kv_head,
                   " out of range [0, ", num_kv_heads_, ")");
    const index_t n = static_cast<index_t>(positions.size());
    if (n == 0) return;
    SHADOWKV_CHECK(out != nullptr, "out is null (", n, " positions to reconstruct)");
    cpu::RowMatrixF a_rows(n, rank_);
    for (index_t i = 0; i < n; ++i) {
      const index_t p = positions[i];
      SHADOWKV_CHECK(p >= 0 && p < size(), "position ", p, " out of range [0, ", size(), ")");
      cpu::to_float(a_.data() + p * rank_, rank_, a_rows.data() + i * rank_);
    }
    cpu::RowMatrixF b(rank_, head_dim_);
    cpu::to_float(basis_.data() + static_cast<index_t>(kv_head) * rank_ * head_dim_,
                  static_cast<index_t>(rank_) * head_dim_, b.data());
    cpu::RowMap<float> o(out, n, head_dim_);
    o.noalias() = a_rows * b;
    if (!rope) return;
    // Runs of consecutive positions (a chunk's tokens) share one sin/cos per pair.
    for (index_t i = 0; i < n;) {
      index_t j = i + 1;
      while (j < n && positions[j] == positions[j - 1] + 1) ++j;
      rope->apply_consecutive(out + i * head_dim_, j - i, head_dim_, positions[i]);
      i = j;
    }
  } SHADOWKV_CATCH_ALLOCATION("in LowRankKeyStore::reconstruct (", positions.size(), " positions)")

  /// A `[size(), rank]`, row-major.
  const T* a_data() const { return a_.data(); }
  /// Basis `[H_kv, rank, d]`: `basis[h]` maps a row of A to head h's key.
  const T* basis_data() const { return basis_.data(); }

  /// Bytes this store holds that the CUDA backend keeps on the device (A and the basis).
  std::size_t device_bytes() const { return cpu::bytes_of(a_) + cpu::bytes_of(basis_); }

 private:
  void check_keys(const TensorView<const T, 3>& keys, const char* arg) const {
    check_view(keys, arg, {Extent{"num_tokens", -1}, Extent{"num_kv_heads", num_kv_heads_},
                           Extent{"head_dim", head_dim_}});
  }

  cpu::RowMatrixD to_double(const TensorView<const T, 3>& keys) const {
    const index_t n = keys.shape[0];
    cpu::RowMatrixD k(n, kv_dim());
    const T* src = keys.data;
    double* dst = k.data();
    for (index_t i = 0; i < n * kv_dim(); ++i) dst[i] = static_cast<double>(static_cast<float>(src[i]));
    return k;
  }

  /// `basis` `[H_kv*d, r]` (columns orthonormal) -> `[H_kv, r, d]` in T, as `basis_` holds it.
  std::vector<T> to_storage(const Eigen::MatrixXd& basis) const {
    std::vector<T> out(static_cast<std::size_t>(num_kv_heads_) * rank_ * head_dim_);
    for (int h = 0; h < num_kv_heads_; ++h)
      for (int j = 0; j < rank_; ++j)
        for (int x = 0; x < head_dim_; ++x)
          out[(static_cast<std::size_t>(h) * rank_ + j) * head_dim_ + x] =
              static_cast<T>(static_cast<float>(basis(h * head_dim_ + x, j)));
    return out;
  }

  /// When L < r the SVD yields fewer vectors: fill the rest with an orthonormal complement
  /// (they carry no energy, so A's extra columns are zero).
  void complete_basis(Eigen::MatrixXd& basis, int keep) const {
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(basis.leftCols(keep));
    Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(kv_dim(), kv_dim());
    basis.rightCols(rank_ - keep) = q.middleCols(keep, rank_ - keep);
  }

  /// Rows of A `[n, r]` for the keys `k` `[n, H_kv*d]`, projected with `basis_t` (a basis in
  /// T, as `to_storage` makes it): the basis reconstruction uses.
  std::vector<T> project(const cpu::RowMatrixD& k, const std::vector<T>& basis_t) const {
    Eigen::MatrixXd basis(kv_dim(), rank_);
    for (int h = 0; h < num_kv_heads_; ++h)
      for (int j = 0; j < rank_; ++j)
        for (int x = 0; x < head_dim_; ++x)
          basis(h * head_dim_ + x, j) = static_cast<double>(static_cast<float>(
              basis_t[(static_cast<std::size_t>(h) * rank_ + j) * head_dim_ + x]));
    const cpu::RowMatrixD rows = k * basis;  // [n, r]
    std::vector<T> out(static_cast<std::size_t>(rows.size()));
    for (index_t i = 0; i < rows.size(); ++i) out[i] = static_cast<T>(static_cast<float>(rows.data()[i]));
    return out;
  }

  void clear_gram() {
    gram_.resize(0, 0);
    gram_rows_ = 0;
  }

  int num_kv_heads_, head_dim_, rank_;
  std::vector<T> a_;          // [rows, r]
  std::vector<T> basis_;      // [H_kv, r, d]
  Eigen::MatrixXd gram_;      // [H_kv*d, H_kv*d] (lower triangle), streaming build only
  index_t gram_rows_ = 0;
};

}  // namespace shadowkv
