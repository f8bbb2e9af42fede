#pragma once
/// \file config.hpp
/// \brief The attention shapes and ShadowKV knobs of one model, validated in one place.

#include <cmath>
#include <cstdint>

#include "error.hpp"
#include "rope.hpp"
#include "tensor.hpp"

namespace shadowkv {

/// Head dims the library supports (one set for every backend, so a config that runs on the
/// CPU also runs on the GPU).
inline constexpr int kSupportedHeadDims[] = {64, 96, 128, 256};

/// Largest `num_q_heads * head_dim` a `Config` accepts (4096 heads of 256: far beyond any model).
inline constexpr index_t kMaxHeadElements = index_t{1} << 20;

/// `outlier_chunks` value meaning "the reference's default": 24 chunks per 1024 tokens of
/// budget (48 for the default budget 2048).
inline constexpr int kAutoOutlierChunks = -1;

/// Shapes of one attention layer and the ShadowKV parameters (defaults from the paper).
struct Config {
  int num_q_heads = 32;   ///< H_q
  int num_kv_heads = 8;   ///< H_kv; H_q must be a multiple (G = H_q / H_kv >= 1)
  int head_dim = 128;     ///< d, one of kSupportedHeadDims
  int rank = 160;         ///< r, rank of the low-rank pre-RoPE keys, 1..H_kv*d
  int chunk_size = 8;     ///< c, tokens per chunk
  int sparse_budget = 2048;  ///< S, selected tokens per KV head per step (a multiple of c)
  int outlier_chunks = kAutoOutlierChunks;  ///< O, exact outlier chunks per KV head
  int local_chunks = 4;   ///< exact chunks at the end of the prompt (plus the partial tail)
  /// Device value slots per KV head, in chunks; 0 means the budget (S / c), as in the paper.
  /// More than the budget keeps recently used chunks on the device (LRU).
  int value_cache_chunks = 0;
  RopeConfig rope{};

  int group_size() const { return num_q_heads / num_kv_heads; }
  int budget_chunks() const { return sparse_budget / chunk_size; }
  int resolved_outlier_chunks() const {
    return outlier_chunks == kAutoOutlierChunks
               ? static_cast<int>(std::int64_t{24} * sparse_budget / 1024)  // no int overflow
               : outlier_chunks;
  }
  int resolved_value_cache_chunks() const {
    return value_cache_chunks == 0 ? budget_chunks() : value_cache_chunks;
  }
  int kv_dim() const { return num_kv_heads * head_dim; }
  /// Softmax scale 1/sqrt(d).
  float scale() const;

  /// Smallest prompt a ShadowKV sequence accepts: the local and outlier chunks must fit.
  index_t min_context() const {
    return (index_t{local_chunks} + resolved_outlier_chunks()) * chunk_size;
  }

  /// Throws `shadowkv::Error` naming the first invalid field and its value.
  void validate() const;
};

inline float Config::scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

inline bool is_supported_head_dim(int d) {
  for (int s : kSupportedHeadDims)
    if (s == d) return true;
  return false;
}

inline void Config::validate() const {
  SHADOWKV_CHECK(num_q_heads > 0, "num_q_heads=", num_q_heads, " must be positive");
  SHADOWKV_CHECK(num_kv_heads > 0, "num_kv_heads=", num_kv_heads, " must be positive");
  SHADOWKV_CHECK(num_q_heads % num_kv_heads == 0, "num_q_heads=", num_q_heads,
                 " must be a multiple of num_kv_heads=", num_kv_heads);
  SHADOWKV_CHECK(is_supported_head_dim(head_dim), "head_dim=", head_dim,
                 " is not supported (supported: 64, 96, 128, 256)");
  // Every backend indexes a token's heads with int: bound num_q_heads * head_dim (and with
  // it num_kv_heads * head_dim) well inside int.
  SHADOWKV_CHECK(index_t{num_q_heads} * head_dim <= kMaxHeadElements, "num_q_heads=", num_q_heads,
                 " times head_dim=", head_dim, " exceeds ", kMaxHeadElements,
                 " elements per token");
  SHADOWKV_CHECK(rank >= 1 && rank <= kv_dim(), "rank=", rank,
                 " must be in [1, num_kv_heads*head_dim=", kv_dim(), "]");
  SHADOWKV_CHECK(chunk_size >= 1, "chunk_size=", chunk_size, " must be positive");
  SHADOWKV_CHECK(sparse_budget >= 1, "sparse_budget=", sparse_budget, " must be positive");
  SHADOWKV_CHECK(sparse_budget % chunk_size == 0, "sparse_budget=", sparse_budget,
                 " is not a multiple of chunk_size=", chunk_size);
  SHADOWKV_CHECK(outlier_chunks >= 0 || outlier_chunks == kAutoOutlierChunks,
                 "outlier_chunks=", outlier_chunks, " must be >= 0 (or kAutoOutlierChunks)");
  SHADOWKV_CHECK(local_chunks >= 0, "local_chunks=", local_chunks, " must be >= 0");
  SHADOWKV_CHECK(value_cache_chunks == 0 || value_cache_chunks >= budget_chunks(),
                 "value_cache_chunks=", value_cache_chunks,
                 " must be 0 (the budget) or at least sparse_budget/chunk_size=", budget_chunks());
  shadowkv::validate(rope, head_dim);
}

}  // namespace shadowkv
