#pragma once
/// \file policy.hpp
/// \brief Attention policies: what `SparseAttention<Policy>` keeps on the device and how it
/// picks the chunks a decode step attends to.

#include <concepts>
#include <string_view>

namespace shadowkv {

/// Where a policy keeps the keys of the prompt.
enum class KeyStorage {
  exact,     ///< every post-RoPE key on the device
  low_rank,  ///< A = U*Sigma and the basis B; keys rebuilt (and RoPE'd) for selected chunks
};

/// How a policy picks the chunks of the prompt a decode step attends to.
enum class ChunkSelection {
  all,           ///< every token (dense attention)
  landmarks,     ///< softmax(q * landmarks^T / sqrt(d)), max over the group, top-k per KV head
  exact_scores,  ///< exact attention mass of each chunk, max over the group, top-k (oracle)
};

/// A policy is a struct of `static constexpr` knobs.
template <class P>
concept AttentionPolicy = requires {
  { P::name } -> std::convertible_to<std::string_view>;
  { P::keys } -> std::convertible_to<KeyStorage>;
  { P::selection } -> std::convertible_to<ChunkSelection>;
  { P::offload_values } -> std::convertible_to<bool>;
} && (P::keys == KeyStorage::exact || P::selection == ChunkSelection::landmarks)
  && (!P::offload_values || P::selection != ChunkSelection::all);

/// The paper's method: low-rank pre-RoPE keys, values offloaded to the host, landmark
/// selection, static set of local + outlier chunks.
struct ShadowKVPolicy {
  static constexpr std::string_view name = "shadowkv";
  static constexpr KeyStorage keys = KeyStorage::low_rank;
  static constexpr ChunkSelection selection = ChunkSelection::landmarks;
  static constexpr bool offload_values = true;
};
static_assert(AttentionPolicy<ShadowKVPolicy>);

/// Full KV cache on the device, attention over every token: the baseline.
struct DensePolicy {
  static constexpr std::string_view name = "dense";
  static constexpr KeyStorage keys = KeyStorage::exact;
  static constexpr ChunkSelection selection = ChunkSelection::all;
  static constexpr bool offload_values = false;
};
static_assert(AttentionPolicy<DensePolicy>);

/// Exact keys and values; the chunks are picked by their exact attention mass, with the
/// same static set and budget as ShadowKV: the accuracy ceiling of chunk selection.
struct OracleTopKPolicy {
  static constexpr std::string_view name = "oracle";
  static constexpr KeyStorage keys = KeyStorage::exact;
  static constexpr ChunkSelection selection = ChunkSelection::exact_scores;
  static constexpr bool offload_values = false;
};
static_assert(AttentionPolicy<OracleTopKPolicy>);

}  // namespace shadowkv
