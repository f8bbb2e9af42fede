#pragma once
/// \file sparse_attention.hpp
/// \brief CPU `SparseAttention<Policy>`: prompt ingestion (chunked prefill), the per-layer
/// build of the policy's state, and batched decode steps over a ragged set of sequences.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory_resource>
#include <optional>
#include <span>
#include <unordered_set>
#include <vector>

#include "../core/backend.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/rope.hpp"
#include "../core/stats.hpp"
#include "../core/tensor.hpp"
#include "attention.hpp"
#include "eigen_util.hpp"
#include "landmark_index.hpp"
#include "low_rank_key_store.hpp"
#include "offloaded_value_pool.hpp"

namespace shadowkv {

/// Attention of a multi-layer model over a ragged batch of sequences with a policy.
///
/// Life of a sequence: `add_sequence(id)`; for each prompt chunk and each layer
/// `prefill(id, layer, ...)`; `finish_prefill(id)`; then per generated token, per layer,
/// `decode(layer, ids, ...)` with any set of prefilled sequences; `remove_sequence(id)`.
/// Queries and keys are passed *before* RoPE: the library rotates them to their positions
/// (a sequence's position is the number of tokens its layer has seen).
///
/// Storage is `T` (fp32, bf16, fp16); all arithmetic is float.
///
/// Errors: every member function validates its arguments before it changes anything and throws
/// `shadowkv::Error` naming the argument; a failed allocation is a `shadowkv::Error` too
/// ("out of memory ..."). After any error the object is as it was before the call, so the
/// same call can be retried and gives what it would have given. (The content of `out` is then
/// unspecified, and statistics and which value chunks are resident may have moved.)
template <AttentionPolicy Policy, StorageType T>
class SparseAttention<Policy, CpuBackend, T> {
  static constexpr bool kLowRank = Policy::keys == KeyStorage::low_rank;
  static constexpr bool kSparse = Policy::selection != ChunkSelection::all;

 public:
  using policy_type = Policy;
  using value_type = T;

  /// \param config validated here   \param num_layers > 0
  /// \param host_memory where the offloaded values of `ShadowKVPolicy` live (the CUDA
  ///        backend's pinned memory): every `OffloadedValuePool` takes its host storage from
  ///        it. Not null; must outlive the object.
  SparseAttention(const Config& config, int num_layers,
                  std::pmr::memory_resource* host_memory = std::pmr::get_default_resource()) try
      : config_(config), num_layers_(num_layers), host_memory_(host_memory) {
    config_.validate();
    SHADOWKV_CHECK(num_layers > 0, "num_layers=", num_layers, " must be positive");
    SHADOWKV_CHECK(host_memory != nullptr, "host_memory is null");
    rope_ = make_rope_table(config_.rope, config_.head_dim);
  } SHADOWKV_CATCH_ALLOCATION("in SparseAttention(num_layers=", num_layers, ")")

  const Config& config() const { return config_; }
  int num_layers() const { return num_layers_; }
  std::pmr::memory_resource* host_memory() const { return host_memory_; }
  const RopeTable& rope() const { return rope_; }

  /// Registers a new, empty sequence.
  void add_sequence(SeqId id) try {
    SHADOWKV_CHECK(!seqs_.contains(id), "sequence id=", id, " already exists");
    Sequence s;
    s.layers.resize(num_layers_);
    seqs_.emplace(id, std::move(s));
  } SHADOWKV_CATCH_ALLOCATION("in add_sequence(id=", id, ")")

  /// Frees everything a sequence holds.
  void remove_sequence(SeqId id) { seqs_.erase(find(id)); }

  bool contains(SeqId id) const { return seqs_.contains(id); }
  std::size_t num_sequences() const { return seqs_.size(); }
  /// Ids of the registered sequences, ascending.
  std::vector<SeqId> sequence_ids() const {
    std::vector<SeqId> ids;
    for (const auto& [id, s] : seqs_) ids.push_back(id);
    return ids;
  }
  bool is_prefilled(SeqId id) const { return find(id)->second.prefilled; }
  /// Tokens `layer` has seen for `id` (prompt + generated).
  index_t length(SeqId id, int layer = 0) const {
    check_layer(layer);
    return find(id)->second.layers[layer].length;
  }
  /// Prompt length (valid after `finish_prefill`).
  index_t prompt_length(SeqId id) const { return find(id)->second.prompt_length; }

  /// Optional: reserves the staging of every layer for a prompt of `tokens` tokens, so that the
  /// `prefill` calls that follow append without reallocating (the CUDA backend's method of the
  /// same name allocates device staging once).
  void reserve_prompt(SeqId id, index_t tokens) {
    Sequence& s = find(id)->second;
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id, " is already prefilled (finish_prefill was called)");
    SHADOWKV_CHECK(tokens >= 0, "tokens=", tokens, " must not be negative");
    const std::size_t elems = static_cast<std::size_t>(tokens) * config_.num_kv_heads * config_.head_dim;
    for (LayerState& st : s.layers) {
      st.staged_k.reserve(elems);
      st.staged_v.reserve(elems);
      if constexpr (kLowRank) st.staged_k_pre.reserve(elems);
    }
  }

  /// Appends prompt tokens of one layer.
  /// \param keys_pre_rope `[n, H_kv, d]`   \param values `[n, H_kv, d]`
  /// \param queries `[n, H_q, d]` pre-RoPE, or empty: then no attention is computed (an
  ///        engine with its own prefill kernel only hands over its keys and values)
  /// \param out `[n, H_q, d]`: causal attention of `queries` over the prompt so far; empty
  ///        exactly when `queries` is
  void prefill(SeqId id, int layer, TensorView<const T, 3> queries,
               TensorView<const T, 3> keys_pre_rope, TensorView<const T, 3> values,
               TensorView<T, 3> out) try {
    Sequence& s = find(id)->second;
    check_layer(layer);
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id,
                   " is already prefilled (finish_prefill was called): use decode");
    const index_t n = keys_pre_rope.shape[0];
    check_view(keys_pre_rope, "keys_pre_rope", kv_extents(-1));
    check_view(values, "values", kv_extents(n));
    SHADOWKV_CHECK(queries.empty() == out.empty(), "queries and out must both be given or both be empty");
    if (!queries.empty()) {
      check_view(queries, "queries", q_extents(n));
      check_view(out, "out", q_extents(n));
    }
    LayerState& st = s.layers[layer];
    const index_t start = st.length;
    const std::size_t row = static_cast<std::size_t>(config_.kv_dim());
    const std::size_t old_size = start * row, new_size = (start + n) * row;
    // Room first: past this point the staging buffers grow without allocating.
    std::vector<float> key(config_.head_dim);
    cpu::reserve_for(st.staged_k, new_size);
    cpu::reserve_for(st.staged_v, new_size);
    if constexpr (kLowRank) cpu::reserve_for(st.staged_k_pre, new_size);
    // Post-RoPE keys for attention and landmarks; pre-RoPE keys for the low-rank store.
    st.staged_k.resize(new_size);
    st.staged_v.resize(new_size);
    try {
      for (index_t t = 0; t < n; ++t)
        for (int h = 0; h < config_.num_kv_heads; ++h) {
          cpu::to_float(&keys_pre_rope(t, h, 0), config_.head_dim, key.data());
          rope_.apply(key.data(), start + t);
          cpu::from_float(key.data(), config_.head_dim,
                          st.staged_k.data() + (start + t) * row + h * config_.head_dim);
        }
      std::copy_n(values.data, n * row, st.staged_v.data() + old_size);
      if (!queries.empty()) prefill_attention(st, start, queries, out);
      // Last, as it is the one change that cannot be undone: the Gram sum of the low-rank store.
      if constexpr (kLowRank) {
        if (!st.keys) st.keys.emplace(config_.num_kv_heads, config_.head_dim, config_.rank);
        st.keys->accumulate(keys_pre_rope);
      }
    } catch (...) {
      st.staged_k.resize(old_size);
      st.staged_v.resize(old_size);
      throw;
    }
    if constexpr (kLowRank)
      st.staged_k_pre.insert(st.staged_k_pre.end(), keys_pre_rope.data, keys_pre_rope.data + n * row);
    st.length = start + n;
  } SHADOWKV_CATCH_ALLOCATION("in prefill of sequence id=", id, ", layer=", layer, " (",
                              keys_pre_rope.shape[0], " tokens)")

  /// Ends the prompt of `id`: every layer must have seen the same number of tokens (at least
  /// `config().min_context()` for the sparse policies). Builds each layer's state (low-rank
  /// store, landmarks, outliers, value pool) and frees the staged prompt.
  void finish_prefill(SeqId id) try {
    Sequence& s = find(id)->second;
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id, " is already prefilled");
    const index_t len = s.layers[0].length;
    for (int l = 1; l < num_layers_; ++l)
      SHADOWKV_CHECK(s.layers[l].length == len, "sequence id=", id, ": layer ", l, " has ",
                     s.layers[l].length, " prompt tokens but layer 0 has ", len);
    SHADOWKV_CHECK(len >= 1, "sequence id=", id, " has an empty prompt (context_length=0)");
    if constexpr (kSparse)
      SHADOWKV_CHECK(len >= config_.min_context(), "context_length=", len, " of sequence id=", id,
                     " is shorter than the static set: (local_chunks=", config_.local_chunks,
                     " + outlier_chunks=", config_.resolved_outlier_chunks(), ") * chunk_size=",
                     config_.chunk_size, " = ", config_.min_context(), " tokens");
    // Build into fresh states first, so a failure leaves the sequence as it was.
    std::vector<LayerState> built(num_layers_);
    for (int l = 0; l < num_layers_; ++l) build_layer(s.layers[l], built[l]);
    s.layers = std::move(built);
    s.prompt_length = len;
    s.prefilled = true;
  } SHADOWKV_CATCH_ALLOCATION("in finish_prefill of sequence id=", id)

  /// One decode step of `layer` for the sequences `ids` (distinct, prefilled, any lengths).
  /// \param queries `[B, H_q, d]` pre-RoPE   \param keys_pre_rope `[B, H_kv, d]`
  /// \param values `[B, H_kv, d]`   \param out `[B, H_q, d]`
  /// The new token's key and value are appended (no cap) and attended to. On an error no
  /// sequence of the batch has advanced.
  void decode(int layer, std::span<const SeqId> ids, TensorView<const T, 3> queries,
              TensorView<const T, 3> keys_pre_rope, TensorView<const T, 3> values,
              TensorView<T, 3> out) try {
    check_layer(layer);
    const index_t b = static_cast<index_t>(ids.size());
    check_view(queries, "queries", q_extents(b));
    check_view(keys_pre_rope, "keys_pre_rope", kv_extents(b));
    check_view(values, "values", kv_extents(b));
    check_view(out, "out", q_extents(b));
    std::vector<Sequence*> batch;
    std::unordered_set<SeqId> seen;
    for (SeqId id : ids) {
      SHADOWKV_CHECK(seen.insert(id).second, "sequence id=", id, " appears twice in ids");
      Sequence& s = find(id)->second;
      SHADOWKV_CHECK(s.prefilled, "sequence id=", id, " is not prefilled: call finish_prefill first");
      batch.push_back(&s);
    }
    // Room for every new token first: past this point appending one cannot fail.
    for (Sequence* s : batch) {
      LayerState& st = s->layers[layer];
      cpu::reserve_for(st.gen_k, st.gen_k.size() + kv_row());
      cpu::reserve_for(st.gen_v, st.gen_v.size() + kv_row());
    }
    StepStats step;
    index_t i = 0;
    try {
      for (; i < b; ++i)
        step += decode_one(batch[i]->layers[layer], queries.row(i), keys_pre_rope.row(i),
                           values.row(i), out.row(i));
    } catch (...) {
      // Take back the token of every sequence the step reached, the failing one included.
      for (index_t j = 0; j <= i && j < b; ++j) drop_last_token(batch[j]->layers[layer]);
      throw;
    }
    last_step_ = step;
    totals_ += step;
  } SHADOWKV_CATCH_ALLOCATION("in decode of layer=", layer, " for ", ids.size(), " sequences")

  /// Chunk ids the last decode of (`id`, `layer`) selected for `kv_head`, ascending (empty
  /// for `DensePolicy`).
  std::span<const std::int32_t> last_selection(SeqId id, int layer, int kv_head) const {
    check_layer(layer);
    SHADOWKV_CHECK(kv_head >= 0 && kv_head < config_.num_kv_heads, "kv_head=", kv_head,
                   " out of range [0, ", config_.num_kv_heads, ")");
    const auto& sel = find(id)->second.layers[layer].selected_chunk_ids;
    if (sel.empty()) return {};
    const std::size_t k = sel.size() / config_.num_kv_heads;
    return {sel.data() + kv_head * k, k};
  }

  /// The last `decode` call (one layer, the whole batch).
  const StepStats& last_step() const { return last_step_; }
  /// Every decode since construction or `reset_stats()`.
  const StepStats& totals() const { return totals_; }
  void reset_stats() { totals_ = {}; last_step_ = {}; }

  /// Bytes sequence `id` holds now, all layers, as the CUDA backend would place them; the
  /// memory planner predicts the same figures (`plan_sequence`). The staged prompt before
  /// `finish_prefill` is not counted (it is transient).
  MemoryUsage memory(SeqId id) const {
    const Sequence& s = find(id)->second;
    MemoryUsage m;
    if (!s.prefilled) return m;
    for (const LayerState& st : s.layers) {
      m.device_bytes += cpu::bytes_of(st.static_k) + cpu::bytes_of(st.static_v) +
                        cpu::bytes_of(st.gen_k) + cpu::bytes_of(st.gen_v) +
                        cpu::bytes_of(st.key_slots);
      if (st.keys) m.device_bytes += st.keys->device_bytes();
      if (st.index) m.device_bytes += st.index->device_bytes();
      if (st.values) {
        m.device_bytes += st.values->device_bytes();
        m.host_bytes += st.values->host_bytes();
      }
    }
    return m;
  }

  /// The components of one layer of a prefilled sequence, for inspection (null when the
  /// policy has none).
  const LowRankKeyStore<CpuBackend, T>* key_store(SeqId id, int layer) const {
    return component(id, layer, &LayerState::keys);
  }
  const LandmarkIndex<CpuBackend, T>* landmark_index(SeqId id, int layer) const {
    return component(id, layer, &LayerState::index);
  }
  const OffloadedValuePool<CpuBackend, T>* value_pool(SeqId id, int layer) const {
    return component(id, layer, &LayerState::values);
  }

 private:
  /// One layer of one sequence. Head-major buffers are `[H_kv, n, d]` with `n` per head.
  struct LayerState {
    index_t length = 0;
    // Prompt staging, token-major [n, H_kv, d]; freed by finish_prefill.
    std::vector<T> staged_k, staged_v, staged_k_pre;
    // After finish_prefill.
    index_t static_tokens = 0;     // per head: static rows (ShadowKV: outliers + local; Dense/
                                   // Oracle: the whole prompt, in prompt order)
    std::vector<T> static_k, static_v;  // [H_kv, static_tokens, d]
    std::vector<T> gen_k, gen_v;        // token-major [n_gen, H_kv, d]
    index_t local_begin = 0;            // first position of the local window
    std::optional<LowRankKeyStore<CpuBackend, T>> keys;
    std::optional<LandmarkIndex<CpuBackend, T>> index;
    std::optional<OffloadedValuePool<CpuBackend, T>> values;
    std::vector<T> key_slots;                   // [H_kv, capacity, c, d], post-RoPE
    std::vector<std::int32_t> selected_chunk_ids;  // [H_kv, k] of the last decode
  };

  struct Sequence {
    std::vector<LayerState> layers;
    index_t prompt_length = 0;
    bool prefilled = false;
  };

  using SeqMap = std::map<SeqId, Sequence>;

  typename SeqMap::iterator find(SeqId id) {
    auto it = seqs_.find(id);
    SHADOWKV_CHECK(it != seqs_.end(), "unknown sequence id=", id);
    return it;
  }
  typename SeqMap::const_iterator find(SeqId id) const {
    auto it = seqs_.find(id);
    SHADOWKV_CHECK(it != seqs_.end(), "unknown sequence id=", id);
    return it;
  }
  void check_layer(int layer) const {
    SHADOWKV_CHECK(layer >= 0 && layer < num_layers_, "layer=", layer, " out of range [0, ",
                   num_layers_, ")");
  }
  std::array<Extent, 3> q_extents(index_t n) const {
    return {Extent{"num_tokens", n}, Extent{"num_q_heads", config_.num_q_heads},
            Extent{"head_dim", config_.head_dim}};
  }
  std::array<Extent, 3> kv_extents(index_t n) const {
    return {Extent{"num_tokens", n}, Extent{"num_kv_heads", config_.num_kv_heads},
            Extent{"head_dim", config_.head_dim}};
  }
  template <class C>
  const C* component(SeqId id, int layer, std::optional<C> LayerState::*member) const {
    check_layer(layer);
    const auto& opt = find(id)->second.layers[layer].*member;
    return opt ? &*opt : nullptr;
  }

  std::size_t kv_row() const { return static_cast<std::size_t>(config_.kv_dim()); }
  std::size_t chunk_elems() const {
    return static_cast<std::size_t>(config_.chunk_size) * config_.head_dim;
  }

  /// Causal attention of the prompt queries `[n, H_q, d]` at positions start.. over the
  /// staged keys `[0, start+n)`.
  void prefill_attention(const LayerState& st, index_t start, TensorView<const T, 3> queries,
                         TensorView<T, 3> out) const {
    constexpr index_t kQueryBlock = 32, kKeyTile = 512;
    const int g = config_.group_size(), d = config_.head_dim;
    const index_t n = queries.shape[0];
    cpu::OnlineAttention attn;
    cpu::RowMatrixF q, k, v;
    std::vector<index_t> limits;
    std::vector<float> row(d);
    for (int h = 0; h < config_.num_kv_heads; ++h)
      for (index_t q0 = 0; q0 < n; q0 += kQueryBlock) {
        const index_t nq = std::min(kQueryBlock, n - q0);
        q.resize(nq * g, d);
        for (index_t t = 0; t < nq; ++t)
          for (int j = 0; j < g; ++j) {
            float* dst = q.data() + (t * g + j) * d;
            cpu::to_float(&queries(q0 + t, h * g + j, 0), d, dst);
            rope_.apply(dst, start + q0 + t);
          }
        attn.reset(nq * g, d);
        const index_t key_end = start + q0 + nq;  // exclusive
        limits.resize(nq * g);
        for (index_t k0 = 0; k0 < key_end; k0 += kKeyTile) {
          const index_t nk = std::min(kKeyTile, key_end - k0);
          k.resize(nk, d);
          v.resize(nk, d);
          for (index_t t = 0; t < nk; ++t) {
            const std::size_t off = (k0 + t) * kv_row() + static_cast<std::size_t>(h) * d;
            cpu::to_float(st.staged_k.data() + off, d, k.data() + t * d);
            cpu::to_float(st.staged_v.data() + off, d, v.data() + t * d);
          }
          for (index_t r = 0; r < nq * g; ++r) limits[r] = start + q0 + r / g - k0 + 1;
          attn.add_tile(q.data(), k.data(), v.data(), nk, config_.scale(), limits.data());
        }
        for (index_t t = 0; t < nq; ++t)
          for (int j = 0; j < g; ++j) {
            attn.finish_row(t * g + j, row.data());
            cpu::from_float(row.data(), d, &out(q0 + t, h * g + j, 0));
          }
      }
  }

  /// Copies staged token-major rows [begin, end) of head h into a head-major buffer.
  void copy_rows(const std::vector<T>& staged, int h, index_t begin, index_t end, T* dst) const {
    const int d = config_.head_dim;
    for (index_t t = begin; t < end; ++t)
      std::copy_n(staged.data() + t * kv_row() + static_cast<std::size_t>(h) * d, d,
                  dst + (t - begin) * d);
  }

  void build_layer(const LayerState& staged, LayerState& st) const {
    const int hkv = config_.num_kv_heads, d = config_.head_dim, c = config_.chunk_size;
    const index_t len = staged.length;
    st.length = len;
    if constexpr (!kLowRank) {
      // Dense and oracle: the whole prompt stays exact, head-major; the oracle reads its
      // static set and its chunks from it.
      st.static_tokens = len;
      st.static_k.resize(hkv * len * d);
      st.static_v.resize(hkv * len * d);
      for (int h = 0; h < hkv; ++h) {
        copy_rows(staged.staged_k, h, 0, len, st.static_k.data() + h * len * d);
        copy_rows(staged.staged_v, h, 0, len, st.static_v.data() + h * len * d);
      }
    }
    if constexpr (kSparse) {
      const index_t n_chunks = len / c - config_.local_chunks;  // indexed region, in chunks
      const int outliers = config_.resolved_outlier_chunks();
      const index_t indexed = n_chunks * c;
      st.local_begin = indexed;
      st.index.emplace(hkv, d, c);
      st.index->build(TensorView<const T, 3>(staged.staged_k.data(), {indexed, hkv, d}), outliers);
      const index_t m = st.index->num_landmarks();
      if constexpr (kLowRank) {
        st.keys.emplace(*staged.keys);
        st.keys->finalize_basis();
        st.keys->append(TensorView<const T, 3>(staged.staged_k_pre.data(), {indexed, hkv, d}));
        const int capacity = std::max(config_.resolved_value_cache_chunks(), 1);
        st.values.emplace(hkv, d, c, m, capacity, host_memory_);
        st.key_slots.assign(static_cast<std::size_t>(hkv) * capacity * chunk_elems(), static_cast<T>(0.0f));
        std::vector<T> chunk(chunk_elems());
        for (int h = 0; h < hkv; ++h) {
          const auto ids = st.index->landmark_chunk_ids(h);
          for (index_t j = 0; j < m; ++j) {
            copy_rows(staged.staged_v, h, index_t{ids[j]} * c, index_t{ids[j] + 1} * c, chunk.data());
            st.values->store(h, j, TensorView<const T, 2>(chunk.data(), {c, d}));
          }
        }
        // Static set per head: outlier chunks (ascending), then the local window + tail.
        st.static_tokens = index_t{outliers} * c + (len - indexed);
        st.static_k.resize(hkv * st.static_tokens * d);
        st.static_v.resize(hkv * st.static_tokens * d);
        for (int h = 0; h < hkv; ++h) {
          T* k_dst = st.static_k.data() + h * st.static_tokens * d;
          T* v_dst = st.static_v.data() + h * st.static_tokens * d;
          index_t row = 0;
          for (std::int32_t ch : st.index->outlier_chunk_ids(h)) {
            copy_rows(staged.staged_k, h, index_t{ch} * c, index_t{ch + 1} * c, k_dst + row * d);
            copy_rows(staged.staged_v, h, index_t{ch} * c, index_t{ch + 1} * c, v_dst + row * d);
            row += c;
          }
          copy_rows(staged.staged_k, h, indexed, len, k_dst + row * d);
          copy_rows(staged.staged_v, h, indexed, len, v_dst + row * d);
        }
      }
    }
  }

  /// Exact attention mass of each landmark chunk (oracle selection) into `scores` [H_kv, M].
  void oracle_scores(const LayerState& st, const float* q, std::vector<float>& scores) const {
    const int hkv = config_.num_kv_heads, d = config_.head_dim, c = config_.chunk_size;
    const int g = config_.group_size();
    const index_t m = st.index->num_landmarks();
    scores.assign(static_cast<std::size_t>(hkv) * m, 0.0f);
    if (m == 0) return;
    cpu::RowMatrixF keys(m * c, d);
    for (int h = 0; h < hkv; ++h) {
      const auto ids = st.index->landmark_chunk_ids(h);
      const T* prompt_k = st.static_k.data() + h * st.static_tokens * d;
      for (index_t j = 0; j < m; ++j)
        cpu::to_float(prompt_k + index_t{ids[j]} * c * d, c * d, keys.data() + j * c * d);
      cpu::ConstRowMap<float> qg(q + static_cast<std::size_t>(h) * g * d, g, d);
      cpu::RowMatrixF logits = (qg * keys.transpose()) * config_.scale();  // [G, M*c]
      for (int j = 0; j < g; ++j) {
        auto row = logits.row(j);
        row = (row.array() - row.maxCoeff()).exp().matrix();
        row /= row.sum();
        for (index_t ch = 0; ch < m; ++ch) {
          float& s = scores[h * m + ch];
          s = std::max(s, row.segment(ch * c, c).sum());
        }
      }
    }
  }

  /// Appends the new token to `st` (first, and without allocating: `decode` made room; a
  /// failure later is undone with `drop_last_token`), then attends. Every change to the value
  /// pool and the key slots leaves them in step with each other, so a failure at any point
  /// leaves a cache that the next step can use.
  StepStats decode_one(LayerState& st, const T* q_in, const T* k_in, const T* v_in, T* out) {
    const int hkv = config_.num_kv_heads, hq = config_.num_q_heads, d = config_.head_dim;
    const int g = config_.group_size(), c = config_.chunk_size;
    const index_t pos = st.length;
    const std::size_t sz = sizeof(T);
    const std::size_t gen_old = st.gen_k.size();
    st.gen_k.resize(gen_old + kv_row());
    st.gen_v.insert(st.gen_v.end(), v_in, v_in + kv_row());
    st.length = pos + 1;
    // Rotate the query and the new key to the current position.
    // Scratch lives in the object: a decode step allocates nothing once warmed up.
    std::vector<float>& q = scratch_.q;
    std::vector<float>& key = scratch_.key;
    q.resize(static_cast<std::size_t>(hq) * d);
    key.resize(d);
    cpu::to_float(q_in, index_t{hq} * d, q.data());
    for (int j = 0; j < hq; ++j) rope_.apply(q.data() + j * d, pos);
    for (int h = 0; h < hkv; ++h) {
      cpu::to_float(k_in + h * d, d, key.data());
      rope_.apply(key.data(), pos);
      cpu::from_float(key.data(), d, st.gen_k.data() + gen_old + h * d);
    }
    const index_t n_gen = static_cast<index_t>(st.gen_k.size() / kv_row());
    StepStats step;
    step.tokens = 1;
    // K and V of the static set and the generated tokens, every head.
    index_t attended_static = st.static_tokens;  // Dense: the prompt; ShadowKV: outliers + local
    if constexpr (kSparse && !kLowRank)
      attended_static = index_t{config_.resolved_outlier_chunks()} * c + st.static_tokens - st.local_begin;
    step.hbm_bytes += 2 * static_cast<std::int64_t>(hkv) * (attended_static + n_gen) * d * sz;

    // Chunk selection.
    std::vector<std::int32_t>& selected = scratch_.selected;  // [H_kv, k], landmark indices
    index_t k_sel = 0;
    if constexpr (kSparse) {
      const index_t m = st.index->num_landmarks();
      k_sel = std::min<index_t>(config_.budget_chunks(), m);
      std::vector<float>& scores = scratch_.scores;
      scores.resize(static_cast<std::size_t>(hkv) * m);
      if constexpr (Policy::selection == ChunkSelection::landmarks) {
        st.index->score(TensorView<const float, 2>(q.data(), {hq, d}), config_.scale(),
                        TensorView<float, 2>(scores.data(), {hkv, m}));
        step.hbm_bytes += static_cast<std::int64_t>(hkv) * m * d * sz;
      } else {
        oracle_scores(st, q.data(), scores);
        step.hbm_bytes += static_cast<std::int64_t>(hkv) * m * c * d * sz;
      }
      selected.resize(static_cast<std::size_t>(hkv) * k_sel);
      LandmarkIndex<CpuBackend, T>::select_top_k(
          TensorView<const float, 2>(scores.data(), {hkv, m}), static_cast<int>(k_sel),
          TensorView<std::int32_t, 2>(selected.data(), {hkv, k_sel}));
      st.selected_chunk_ids.resize(selected.size());
      for (int h = 0; h < hkv; ++h) {
        const auto ids = st.index->landmark_chunk_ids(h);
        for (index_t i = 0; i < k_sel; ++i)
          st.selected_chunk_ids[h * k_sel + i] = ids[selected[h * k_sel + i]];
      }
      // K and V of the selected chunks.
      step.hbm_bytes += 2 * static_cast<std::int64_t>(hkv) * k_sel * c * d * sz;
    }

    std::vector<std::int32_t>& slots = scratch_.slots;
    std::vector<std::int32_t>& missed = scratch_.missed;
    std::vector<index_t>& positions = scratch_.positions;
    std::vector<float>& rebuilt = scratch_.rebuilt;
    std::vector<float>& attn_out = scratch_.attn_out;
    cpu::SegmentAttention<T>& attn = scratch_.attn;
    slots.resize(k_sel);
    attn_out.resize(static_cast<std::size_t>(g) * d);
    for (int h = 0; h < hkv; ++h) {
      attn.begin(q.data() + static_cast<std::size_t>(h) * g * d, g, d, config_.scale());
      const T* static_k = st.static_k.data() + h * st.static_tokens * d;
      const T* static_v = st.static_v.data() + h * st.static_tokens * d;
      if constexpr (kLowRank) {
        attn.add(static_k, static_v, st.static_tokens);
        const std::span<const std::int32_t> sel(selected.data() + h * k_sel, k_sel);
        // Rebuild (A[p] * B_h, then RoPE at p) the keys of the chunks that are not resident,
        // the ones the fetch will copy, before the fetch changes the pool.
        positions.clear();
        for (index_t i = 0; i < k_sel; ++i)
          if (st.values->slot_of(h, sel[i]) < 0) {
            const index_t first = index_t{st.selected_chunk_ids[h * k_sel + i]} * c;
            for (int t = 0; t < c; ++t) positions.push_back(first + t);
          }
        rebuilt.resize(positions.size() * d);
        st.keys->reconstruct(h, positions, rebuilt.data(), &rope_);
        missed.clear();
        const PoolStats before = st.values->stats();
        st.values->fetch(h, sel, slots, missed);  // the misses are the chunks rebuilt above
        step.pool += st.values->stats() - before;
        for (std::size_t j = 0; j < missed.size(); ++j)
          cpu::from_float(rebuilt.data() + j * chunk_elems(), static_cast<index_t>(chunk_elems()),
                          key_slot(st, h, slots[missed[j]]));
        if (!missed.empty())
          step.hbm_bytes += static_cast<std::int64_t>(missed.size()) * c *
                                (config_.rank + 2 * d) * sz +  // A rows read, K and V slots written
                            static_cast<std::int64_t>(config_.rank) * d * sz;  // B_h
        for (index_t i = 0; i < k_sel; ++i)
          attn.add(key_slot(st, h, slots[i]), st.values->slot(h, slots[i]), c);
      } else if constexpr (kSparse) {
        // Oracle: outlier chunks, the local window, the selected chunks, all from the prompt.
        for (std::int32_t ch : st.index->outlier_chunk_ids(h))
          attn.add(static_k + index_t{ch} * c * d, static_v + index_t{ch} * c * d, c);
        attn.add(static_k + st.local_begin * d, static_v + st.local_begin * d,
                 st.static_tokens - st.local_begin);
        for (index_t i = 0; i < k_sel; ++i) {
          const index_t row = index_t{st.selected_chunk_ids[h * k_sel + i]} * c;
          attn.add(static_k + row * d, static_v + row * d, c);
        }
      } else {
        attn.add(static_k, static_v, st.static_tokens);
      }
      for (index_t t = 0; t < n_gen; ++t)
        attn.add(st.gen_k.data() + t * kv_row() + h * d, st.gen_v.data() + t * kv_row() + h * d, 1);
      attn.finish(attn_out.data());
      cpu::from_float(attn_out.data(), index_t{g} * d, out + static_cast<std::size_t>(h) * g * d);
    }
    step.pcie_bytes += step.pool.bytes_copied;
    return step;
  }

  /// Undoes the append of `decode_one` (never allocates, never throws).
  void drop_last_token(LayerState& st) const noexcept {
    st.gen_k.resize(st.gen_k.size() - kv_row());
    st.gen_v.resize(st.gen_v.size() - kv_row());
    st.length -= 1;
  }

  T* key_slot(LayerState& st, int h, std::int32_t slot) const {
    return st.key_slots.data() +
           (static_cast<std::size_t>(h) * st.values->capacity() + slot) * chunk_elems();
  }

  /// Buffers a decode step reuses (not per-sequence state; not counted by `memory()`).
  struct DecodeScratch {
    std::vector<float> q, key, scores, rebuilt, attn_out;
    std::vector<std::int32_t> selected, slots, missed;
    std::vector<index_t> positions;
    cpu::SegmentAttention<T> attn;
  };

  Config config_;
  int num_layers_;
  std::pmr::memory_resource* host_memory_;
  RopeTable rope_;
  DecodeScratch scratch_;
  SeqMap seqs_;
  StepStats last_step_, totals_;
};

}  // namespace shadowkv
