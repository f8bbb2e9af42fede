#pragma once
/// \file cuda/sparse_attention.cuh
/// \brief CUDA `SparseAttention<Policy>`: the CPU backend's API (cpu/sparse_attention.hpp) with
/// every tensor on the device and every call on a caller's stream. Prompt ingestion stages the
/// keys and values on the device; `finish_prefill` builds each layer's state there (cuBLAS Gram +
/// cuSOLVER eigensolve, landmarks and outliers, values offloaded to pinned host memory); a decode
/// step for a ragged batch is a fixed sequence of launches with no host synchronisation:
///
///   RoPE (queries to float, the new key and value appended) → landmark scores (ShadowKV) or
///   exact chunk scores (oracle) → top-k → slot-table update (hits stay, misses listed) →
///   key rebuild with RoPE ∥ value gather of the misses from pinned memory (one launch, CTAs
///   in both roles side by side) →
///   split-K attention over static ∪ selected ∪ generated rows, which also copies the step's
///   counters to mapped host memory.

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
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
#include "decode_attention.cuh"
#include "error.cuh"
#include "kernels/attention_steps.cuh"
#include "launch.cuh"
#include "landmark_index.cuh"
#include "landmark_ops.cuh"
#include "low_rank_key_store.cuh"
#include "memory.cuh"
#include "miss_ops.cuh"
#include "offloaded_value_pool.cuh"
#include "slot_table.cuh"
#include "types.cuh"

namespace shadowkv {

namespace cuda::detail {

/// Host-built descriptor arrays of one launch sequence, packed into one blob and copied to the
/// device with one `cudaMemcpyAsync`.
class DescriptorBlob {
 public:
  void clear() { bytes_.clear(); }
  /// Appends `n` default-initialised `S` (16-byte aligned) and returns their offset.
  template <class S>
  std::size_t add(std::size_t n) {
    const std::size_t at = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(at + n * sizeof(S));
    for (std::size_t i = 0; i < n; ++i) new (bytes_.data() + at + i * sizeof(S)) S{};
    return at;
  }
  template <class S>
  S* host(std::size_t offset) {
    return reinterpret_cast<S*>(bytes_.data() + offset);
  }
  std::size_t size() const { return bytes_.size(); }
  const std::byte* data() const { return bytes_.data(); }

 private:
  std::vector<std::byte> bytes_;
};

/// A ring of pinned + device buffer pairs for descriptor blobs. A slot is reused only after the
/// work that read it has finished (its event), so the host waits only when it runs
/// `kSlots` launch sequences ahead of the GPU.
class StagingRing {
 public:
  static constexpr int kSlots = 16;

  StagingRing() {
    for (Slot& s : slots_) SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
  }
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;
  ~StagingRing() {
    // The host writes a slot's pinned buffer with memcpy, not in stream order: wait for its last
    // reader before the buffer goes back to the host allocator (a caching one hands it out at once).
    for (Slot& s : slots_)
      if (s.done) {
        (void)cudaEventSynchronize(s.done);
        (void)cudaEventDestroy(s.done);
      }
    if (copied_) (void)cudaEventDestroy(copied_);
  }

  /// Copies `blob` to the device for `stream`; returns the device address. Call
  /// `release(stream)` after the last launch that reads it. A failed allocation leaves the slot
  /// as it was. With `copy_stream`, the copy runs there, so that it overlaps whatever `stream`
  /// still runs before it (the descriptors depend on no GPU work), and `stream` waits for it.
  std::byte* upload(const DescriptorBlob& blob, cudaStream_t stream, DeviceAllocator& allocator,
                    HostAllocator& host_allocator, cudaStream_t copy_stream = nullptr) {
    Slot& s = slots_[next_];
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(s.done));  // its last reader has finished
    // A slot uploaded but never released (the step threw after its upload) may still be read by
    // that step's launches on `stream`: copy behind them.
    if (uploaded_) copy_stream = nullptr;
    if (s.host.size() < blob.size()) {
      // A new device buffer is stream-ordered on `stream` (its memory may have been freed there
      // by work still running): copy there this time.
      copy_stream = nullptr;
      // Both buffers first, then the swap: the slot's two sizes must stay equal.
      const std::size_t n = std::max<std::size_t>(blob.size(), 2 * s.host.size());
      PinnedBuffer<std::byte> host(n, host_allocator);
      DeviceBuffer<std::byte> device(n, stream, allocator);
      s.host = std::move(host);
      s.device = std::move(device);
    }
    uploaded_ = true;
    if (blob.size() == 0) return s.device.data();
    std::memcpy(s.host.data(), blob.data(), blob.size());
    // The slot's last reader has finished (above), and its buffer was allocated before that
    // reader in stream order, so the copy needs no order after `stream`.
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(s.device.data(), s.host.data(), blob.size(), cudaMemcpyHostToDevice,
                                        copy_stream ? copy_stream : stream));
    if (copy_stream) {
      SHADOWKV_CUDA_CHECK(cudaEventRecord(copied_, copy_stream));
      SHADOWKV_CUDA_CHECK(cudaStreamWaitEvent(stream, copied_, 0));
    }
    return s.device.data();
  }
  void release(cudaStream_t stream) {
    SHADOWKV_CUDA_CHECK(cudaEventRecord(slots_[next_].done, stream));
    uploaded_ = false;
    next_ = (next_ + 1) % kSlots;
  }

 private:
  struct Slot {
    PinnedBuffer<std::byte> host;
    DeviceBuffer<std::byte> device;
    cudaEvent_t done = nullptr;
  };
  std::array<Slot, kSlots> slots_{};
  cudaEvent_t copied_ = nullptr;  // the last upload on a copy stream
  int next_ = 0;
  bool uploaded_ = false;  // slot next_ uploaded and not released
};

/// A device scratch buffer that only grows (stream-ordered).
template <class S>
struct Scratch {
  DeviceBuffer<S> buf;
  S* get(std::size_t n, cudaStream_t stream, DeviceAllocator& allocator) {
    if (buf.size() < n) buf = DeviceBuffer<S>(std::max<std::size_t>(n, buf.size() * 3 / 2), stream, allocator);
    return buf.data();
  }
};

template <class In, class Out>
void launch_rope_rows(const RopeRowsParams<In, Out>& p, cudaStream_t stream) {
  const long long total = static_cast<long long>(p.n) * p.heads * p.head_dim;
  if (total == 0) return;
  kernels::rope_rows_kernel<In, Out><<<elementwise_grid(total), 256, 0, stream>>>(p);
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

/// `decode_rope_kernel`: the three RoPE row copies of a decode step in one launch.
template <class D>
void launch_decode_rope(const RopeRowsParams<D, float>& q, const RopeRowsParams<D, D>& k,
                        const RopeRowsParams<D, D>& v, cudaStream_t stream) {
  const long long total = std::max(static_cast<long long>(q.n) * q.heads * q.head_dim,
                                   static_cast<long long>(k.n) * k.heads * k.head_dim);
  if (total == 0) return;
  launch_kernel<kernels::decode_rope_kernel<D>>(dim3(elementwise_grid(total), 3), dim3(256), 0, stream, 1u, q, k, v);
}

template <class DT>
void launch_gather_rows(const GatherRowsParams<DT>& p, cudaStream_t stream) {
  const long long total = p.rows_per_head * p.head_dim * p.num_kv_heads;
  if (total == 0) return;
  kernels::gather_rows_kernel<DT><<<elementwise_grid(total), 256, 0, stream>>>(p);
  SHADOWKV_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda::detail

namespace cuda {

/// What a selection hook sees (`SparseAttention::set_selection_hook`): the chunks the top-k chose
/// in one `decode` call of one layer, before the value pool and the attention use them.
struct SelectionHookArgs {
  int layer = 0;
  std::span<const SeqId> ids;      ///< the call's sequences, in batch order
  int num_kv_heads = 0;
  int k = 0;                       ///< entries per (sequence, KV head)
  /// Device `[batch, H_kv, k]`: landmark indices in `[0, num_landmarks[b])`, ascending, `-1`
  /// past the end of a row when the sequence has fewer than `k` landmarks. A hook may rewrite
  /// it in place (distinct valid indices, or `-1`), stream-ordered on the stream it is given.
  std::int32_t* selected = nullptr;
  const int* num_landmarks = nullptr;  ///< device `[batch]`
};

/// Called on the host inside `decode`, after the selection is enqueued and before anything reads
/// it; it must only enqueue work on the stream it is given (no synchronisation is needed).
/// Engines use it to log or override selections; the throughput harness replays synthetic
/// selection traces through it.
using SelectionHook = std::function<void(const SelectionHookArgs&, cudaStream_t)>;

}  // namespace cuda

/// Attention of a multi-layer model over a ragged batch of sequences with a policy, on the GPU.
/// Same life of a sequence as the CPU backend (`add_sequence`, `prefill` per chunk and layer,
/// `finish_prefill`, `decode` per step and layer, `remove_sequence`); queries and keys are passed
/// before RoPE. Differences:
///
/// - Every `TensorView` passed points to **device** memory (`T` = fp32, bf16 or fp16), and every
///   call takes a `cudaStream_t`. Calls on one object must be ordered: use one stream, or order
///   the streams with events (per-step scratch is shared, and buffers are freed stream-ordered on
///   the stream that allocated them, which must outlive them).
/// - `decode` never waits for the GPU: it enqueues its launches (and the descriptor upload on an
///   internal side stream that yours waits for). The host blocks only when it runs 16
///   launch sequences ahead of the GPU (descriptor staging ring). `finish_prefill` waits for the
///   eigensolver's status (ShadowKV).
/// - `last_step()`, `totals()` and `last_selection()` read results back: they wait for the work
///   they describe.
/// - Device memory comes from `allocator` (default: `cudaMallocAsync` pools); the offloaded
///   values from `host_allocator` (default: `cudaHostAlloc` per buffer, pinned and mapped;
///   `cuda::CachingHostAllocator` reuses them across sequences). Generated rows grow in blocks of
///   `kGeneratedBlock` tokens; `memory()` reports the rows held, as the planner predicts.
template <AttentionPolicy Policy, StorageType T>
class SparseAttention<Policy, CudaBackend, T> {
  static constexpr bool kLowRank = Policy::keys == KeyStorage::low_rank;
  static constexpr bool kSparse = Policy::selection != ChunkSelection::all;
  static constexpr bool kOracle = Policy::selection == ChunkSelection::exact_scores;
  using D = cuda::device_t<T>;

 public:
  using policy_type = Policy;
  using value_type = T;
  /// Generated rows are allocated this many tokens at a time.
  static constexpr index_t kGeneratedBlock = 256;
  /// Query tokens per launch of the prefill attention.
  static constexpr index_t kPrefillQueryBlock = 1024;

  /// \param config validated here (head_dim must be one the kernels support, H_q/H_kv <= 16)
  /// \param num_layers > 0
  /// \param allocator device memory   \param host_allocator the offloaded values (pinned)
  SparseAttention(const Config& config, int num_layers, cuda::DeviceAllocator& allocator = cuda::default_allocator(),
                  cuda::HostAllocator& host_allocator = cuda::default_host_allocator())
      : config_(config), num_layers_(num_layers), allocator_(&allocator), host_allocator_(&host_allocator) {
    config_.validate();
    SHADOWKV_CHECK(num_layers > 0, "num_layers=", num_layers, " must be positive");
    cuda::check_kernel_head_dim(config_.head_dim);
    SHADOWKV_CHECK(config_.group_size() <= 16, "num_q_heads/num_kv_heads=", config_.group_size(),
                   " exceeds 16, the largest group the CUDA kernels support");
    if constexpr (kSparse)
      SHADOWKV_CHECK(config_.budget_chunks() <= cuda::kMaxTopK, "sparse_budget/chunk_size=", config_.budget_chunks(),
                     " exceeds ", cuda::kMaxTopK, " chunks, the largest selection the CUDA kernels make");
    rope_ = make_rope_table(config_.rope, config_.head_dim);
    counters_host_ = cuda::PinnedBuffer<std::int64_t>(2 * kCounters, host_allocator);
    std::fill_n(counters_host_.data(), 2 * kCounters, 0);
    try {  // the destructor does not run when a constructor throws
      SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
      SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
      SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
      SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&step_done_, cudaEventDisableTiming));
    } catch (...) {
      destroy_stream_and_events();
      throw;
    }
  }
  SparseAttention(const SparseAttention&) = delete;
  SparseAttention& operator=(const SparseAttention&) = delete;
  ~SparseAttention() { destroy_stream_and_events(); }

  const Config& config() const { return config_; }
  int num_layers() const { return num_layers_; }
  const RopeTable& rope() const { return rope_; }

  /// Installs (or, with an empty function, removes) a hook that sees, and may rewrite, every
  /// selection `decode` makes (sparse policies; see `cuda::SelectionHook`).
  void set_selection_hook(cuda::SelectionHook hook) { selection_hook_ = std::move(hook); }

  /// Where the memory that lives only until `finish_prefill` comes from: the staged prompt
  /// (`reserve_prompt`/`prefill`), the key Gram matrices, the eigensolver's work space and the
  /// landmark build's scratch. The default is the
  /// constructor's allocator. A pool of its own (`cuda::PoolAllocator`) keeps the freed staging
  /// from leaving holes among the long-lived state, and can be trimmed once a batch is built.
  /// Buffers remember their allocator, so this may change at any time; it must outlive every
  /// sequence staged through it.
  void set_staging_allocator(cuda::DeviceAllocator& allocator) { staging_allocator_ = &allocator; }

  /// Registers a new, empty sequence.
  void add_sequence(SeqId id) {
    SHADOWKV_CHECK(!seqs_.contains(id), "sequence id=", id, " already exists");
    Sequence s;
    s.layers.resize(num_layers_);
    seqs_.emplace(id, std::move(s));
  }
  /// Frees everything a sequence holds (stream-ordered, on the streams that allocated it).
  void remove_sequence(SeqId id) { seqs_.erase(find(id)); }

  bool contains(SeqId id) const { return seqs_.contains(id); }
  std::size_t num_sequences() const { return seqs_.size(); }
  std::vector<SeqId> sequence_ids() const {
    std::vector<SeqId> ids;
    for (const auto& [id, s] : seqs_) ids.push_back(id);
    return ids;
  }
  bool is_prefilled(SeqId id) const { return find(id)->second.prefilled; }
  index_t length(SeqId id, int layer = 0) const {
    check_layer(layer);
    return find(id)->second.layers[layer].length;
  }
  index_t prompt_length(SeqId id) const { return find(id)->second.prompt_length; }

  /// Optional: allocates the staging of every layer for a prompt of `tokens` tokens now, so that
  /// the `prefill` calls that follow append without growing (and copying) their buffers; a
  /// longer prompt still grows them. Device memory: `(3 for ShadowKV, else 2) · tokens · H_kv · d`
  /// elements per layer, until `finish_prefill`.
  void reserve_prompt(SeqId id, index_t tokens, cudaStream_t stream) {
    Sequence& s = find(id)->second;
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id, " is already prefilled (finish_prefill was called)");
    SHADOWKV_CHECK(tokens >= 0, "tokens=", tokens, " must not be negative");
    for (LayerState& st : s.layers) reserve_staging(st, tokens, stream);
  }

  /// Appends prompt tokens of one layer (device tensors). After a failed allocation the sequence
  /// is as it was.
  /// \param keys_pre_rope `[n, H_kv, d]`   \param values `[n, H_kv, d]`
  /// \param queries `[n, H_q, d]` pre-RoPE, or empty: then no attention is computed
  /// \param out `[n, H_q, d]`: causal attention of `queries` over the prompt so far (a plain
  ///        correctness path: each query re-reads its prefix; engines bring their own prefill
  ///        kernel and hand over keys and values only)
  void prefill(SeqId id, int layer, TensorView<const T, 3> queries, TensorView<const T, 3> keys_pre_rope,
               TensorView<const T, 3> values, TensorView<T, 3> out, cudaStream_t stream) {
    Sequence& s = find(id)->second;
    check_layer(layer);
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id, " is already prefilled (finish_prefill was called): use decode");
    const index_t n = keys_pre_rope.shape[0];
    check_view(keys_pre_rope, "keys_pre_rope", kv_extents(-1));
    check_view(values, "values", kv_extents(n));
    SHADOWKV_CHECK(queries.empty() == out.empty(), "queries and out must both be given or both be empty");
    if (!queries.empty()) {
      check_view(queries, "queries", q_extents(n));
      check_view(out, "out", q_extents(n));
    }
    if (n == 0) return;
    upload_rope(stream);
    LayerState& st = s.layers[layer];
    const index_t start = st.length;
    const std::size_t row = kv_row();
    if (start + n > st.staged_capacity) reserve_staging(st, std::max<index_t>(start + n, st.staged_capacity * 2), stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(st.staged_v.data() + start * row, values.data, n * row * sizeof(T),
                                        cudaMemcpyDeviceToDevice, stream));
    cuda::RopeRowsParams<D, D> rp;
    rp.src = cuda::as_device(keys_pre_rope.data);
    rp.src_stride = static_cast<long long>(row);
    rp.dst = st.staged_k.data() + start * row;
    rp.dst_stride = static_cast<long long>(row);
    rp.n = static_cast<int>(n);
    rp.heads = config_.num_kv_heads;
    rp.head_dim = config_.head_dim;
    rp.first_position = start;
    rp.rope = row_rope();
    cuda::detail::launch_rope_rows(rp, stream);
    if constexpr (kLowRank)
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(st.staged_k_pre.data() + start * row, keys_pre_rope.data,
                                          n * row * sizeof(T), cudaMemcpyDeviceToDevice, stream));
    // So far only rows past `length` were written: a failure (an allocation) up to the Gram
    // update below leaves the sequence as it was, and the call can be retried.
    if (!queries.empty()) prefill_attention(st, start, queries, out, stream);
    if constexpr (kLowRank) {
      if (!st.keys) {
        st.keys.emplace(config_.num_kv_heads, config_.head_dim, config_.rank, *allocator_);
        st.keys->set_scratch_allocator(*staging_allocator_);
      }
      st.keys->accumulate(keys_pre_rope.data, n, static_cast<long long>(row), stream);
    }
    st.length = start + n;
  }

  /// Ends the prompt of `id` (same contract as the CPU backend) and builds each layer's state on
  /// `stream`. Waits for the eigensolver of each layer (ShadowKV). On an error the sequence is
  /// as it was (the call can be retried); while it runs, each layer's key Gram matrix is held
  /// twice (`4·(H_kv·d)²` bytes more per layer, ShadowKV).
  void finish_prefill(SeqId id, cudaStream_t stream) {
    Sequence& s = find(id)->second;
    SHADOWKV_CHECK(!s.prefilled, "sequence id=", id, " is already prefilled");
    const index_t len = s.layers[0].length;
    for (int l = 1; l < num_layers_; ++l)
      SHADOWKV_CHECK(s.layers[l].length == len, "sequence id=", id, ": layer ", l, " has ", s.layers[l].length,
                     " prompt tokens but layer 0 has ", len);
    SHADOWKV_CHECK(len >= 1, "sequence id=", id, " has an empty prompt (context_length=0)");
    if constexpr (kSparse)
      SHADOWKV_CHECK(len >= config_.min_context(), "context_length=", len, " of sequence id=", id,
                     " is shorter than the static set: (local_chunks=", config_.local_chunks,
                     " + outlier_chunks=", config_.resolved_outlier_chunks(), ") * chunk_size=", config_.chunk_size,
                     " = ", config_.min_context(), " tokens");
    upload_rope(stream);
    // Whatever happens, `stream` waits for the value offloads of the side stream before the
    // staged prompt (freed in order on `stream`) can go; after an error the host waits too,
    // since the half-built layers' pinned blocks may go back to a caching host allocator.
    struct Join {
      cudaStream_t side, main;
      cudaEvent_t event;
      int exceptions = std::uncaught_exceptions();
      ~Join() {
        if (std::uncaught_exceptions() > exceptions) (void)cudaStreamSynchronize(side);
        if (cudaEventRecord(event, side) == cudaSuccess) (void)cudaStreamWaitEvent(main, event, 0);
      }
    };
    std::vector<LayerState> built(num_layers_);
    {
      Join join{side_stream_, stream, join_};
      for (int l = 0; l < num_layers_; ++l) build_layer(s.layers[l], built[l], stream);
      if constexpr (kLowRank) {
        // Every layer's eigensolve in batched cuSOLVER calls, while the values are offloaded;
        // on copies of the Gram matrices, so that the staged prompt stays as it was until every
        // layer is built and a failed call can be retried.
        using Store = LowRankKeyStore<CudaBackend, T>;
        std::vector<Store*> stores;
        for (int l = 0; l < num_layers_; ++l)
          stores.push_back(&built[l].keys.emplace(s.layers[l].keys->clone(stream)));
        Store::finalize_bases(stores, stream, staging_allocator_);
        for (int l = 0; l < num_layers_; ++l) build_layer_keys(s.layers[l], built[l], stream);
      }
    }
    s.layers = std::move(built);
    s.prompt_length = len;
    s.prefilled = true;
  }

  /// One decode step of `layer` for the sequences `ids` (distinct, prefilled, any lengths), all
  /// tensors on the device. \param queries `[B, H_q, d]` pre-RoPE   \param keys_pre_rope
  /// `[B, H_kv, d]`   \param values `[B, H_kv, d]`   \param out `[B, H_q, d]`
  /// Every allocation comes before the first launch: after a failed one no sequence of the
  /// batch has advanced.
  void decode(int layer, std::span<const SeqId> ids, TensorView<const T, 3> queries,
              TensorView<const T, 3> keys_pre_rope, TensorView<const T, 3> values, TensorView<T, 3> out,
              cudaStream_t stream) {
    check_layer(layer);
    const index_t b = static_cast<index_t>(ids.size());
    check_view(queries, "queries", q_extents(b));
    check_view(keys_pre_rope, "keys_pre_rope", kv_extents(b));
    check_view(values, "values", kv_extents(b));
    check_view(out, "out", q_extents(b));
    SHADOWKV_CHECK(b <= 65535 / config_.num_kv_heads, "batch=", b, " exceeds 65535/num_kv_heads=",
                   65535 / config_.num_kv_heads, " sequences per decode call");
    std::vector<LayerState*> batch;
    std::unordered_set<SeqId> seen;
    for (SeqId id : ids) {
      SHADOWKV_CHECK(seen.insert(id).second, "sequence id=", id, " appears twice in ids");
      Sequence& s = find(id)->second;
      SHADOWKV_CHECK(s.prefilled, "sequence id=", id, " is not prefilled: call finish_prefill first");
      batch.push_back(&s.layers[layer]);
    }
    last_step_fixed_ = {};
    last_step_has_pool_ = false;
    if (b == 0) return;
    upload_rope(stream);
    current_layer_ = layer;
    current_ids_ = ids;
    decode_batch(batch, queries, keys_pre_rope, values, out, stream);
    current_ids_ = {};
  }

  /// Prompt chunk ids the last decode of (`id`, `layer`) selected for `kv_head`, ascending
  /// (empty for `DensePolicy`). Waits for that decode and copies on `stream`.
  std::vector<std::int32_t> last_selection(SeqId id, int layer, int kv_head, cudaStream_t stream) const {
    check_layer(layer);
    SHADOWKV_CHECK(kv_head >= 0 && kv_head < config_.num_kv_heads, "kv_head=", kv_head, " out of range [0, ",
                   config_.num_kv_heads, ")");
    const LayerState& st = find(id)->second.layers[layer];
    if (!st.has_selection || st.k_sel == 0) return {};
    std::vector<std::int32_t> sel(st.k_sel);
    SHADOWKV_CUDA_CHECK(cudaStreamWaitEvent(stream, step_done_, 0));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(sel.data(), st.selected_chunk_ids.data() + kv_head * st.k_sel,
                                        sel.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    return sel;
  }

  /// The last `decode` call (waits for it).
  StepStats last_step() const {
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(step_done_));
    StepStats s = last_step_fixed_;
    if (last_step_has_pool_) {
      // The pool's counters are running totals: this step is the latest snapshot minus the one before.
      std::array<std::int64_t, kCounters> delta = counter_snapshot(snapshot_);
      const std::array<std::int64_t, kCounters> before = counter_snapshot(1 - snapshot_);
      for (int i = 0; i < kCounters; ++i) delta[i] -= before[i];
      add_pool(s, delta);
    }
    return s;
  }
  /// Every decode since construction or `reset_stats()` (waits for the last one).
  StepStats totals() const {
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(step_done_));
    StepStats s = totals_fixed_;
    if constexpr (kLowRank) add_pool(s, counter_snapshot(snapshot_));
    return s;
  }
  void reset_stats() {
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(step_done_));
    totals_fixed_ = {};
    last_step_fixed_ = {};
    last_step_has_pool_ = false;
    std::fill_n(counters_host_.data(), 2 * kCounters, 0);
    reset_device_totals_ = true;
  }

  /// Bytes sequence `id` holds now, all layers (the planner's `plan_sequence` figures).
  MemoryUsage memory(SeqId id) const {
    const Sequence& s = find(id)->second;
    MemoryUsage m;
    if (!s.prefilled) return m;
    const std::size_t sz = sizeof(T);
    for (const LayerState& st : s.layers) {
      m.device_bytes += 2 * static_cast<std::size_t>(config_.num_kv_heads) * (st.static_tokens + st.gen_rows) *
                        config_.head_dim * sz;
      m.device_bytes += st.key_slots.bytes();
      if (st.keys) m.device_bytes += st.keys->device_bytes();
      if (st.index) m.device_bytes += st.index->device_bytes();
      if (st.values) {
        m.device_bytes += st.values->device_bytes();
        m.host_bytes += st.values->host_bytes();
      }
    }
    return m;
  }

  /// The components of one layer of a prefilled sequence (null when the policy has none).
  const LowRankKeyStore<CudaBackend, T>* key_store(SeqId id, int layer) const {
    return component(id, layer, &LayerState::keys);
  }
  const LandmarkIndex<CudaBackend, T>* landmark_index(SeqId id, int layer) const {
    return component(id, layer, &LayerState::index);
  }
  const OffloadedValuePool<CudaBackend, T>* value_pool(SeqId id, int layer) const {
    return component(id, layer, &LayerState::values);
  }

 private:
  using Blob = cuda::detail::DescriptorBlob;

  struct LayerState {
    index_t length = 0;
    // Prompt staging, token-major [capacity, H_kv, d]; freed by finish_prefill.
    cuda::DeviceBuffer<D> staged_k, staged_v, staged_k_pre;
    index_t staged_capacity = 0;
    // After finish_prefill.
    index_t static_tokens = 0;  // per head: ShadowKV outliers + local; Dense/Oracle the prompt
    cuda::DeviceBuffer<D> static_k, static_v;  // [H_kv, static_tokens, d]
    cuda::DeviceBuffer<D> gen_k, gen_v;        // [gen_capacity, H_kv, d]
    index_t gen_rows = 0, gen_capacity = 0;
    index_t local_begin = 0;
    std::optional<LowRankKeyStore<CudaBackend, T>> keys;
    std::optional<LandmarkIndex<CudaBackend, T>> index;
    std::optional<OffloadedValuePool<CudaBackend, T>> values;
    cuda::DeviceBuffer<D> key_slots;                     // [H_kv, capacity, c, d]
    cuda::DeviceBuffer<std::int32_t> selected_chunk_ids; // [H_kv, k_sel] of the last decode
    index_t k_sel = 0;
    bool has_selection = false;
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
    SHADOWKV_CHECK(layer >= 0 && layer < num_layers_, "layer=", layer, " out of range [0, ", num_layers_, ")");
  }
  std::array<Extent, 3> q_extents(index_t n) const {
    return {Extent{"num_tokens", n}, Extent{"num_q_heads", config_.num_q_heads}, Extent{"head_dim", config_.head_dim}};
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

  /// Waits for the side stream and the last step, then destroys what the constructor created.
  void destroy_stream_and_events() noexcept {
    if (side_stream_) (void)cudaStreamSynchronize(side_stream_);
    if (step_done_) (void)cudaEventSynchronize(step_done_);
    for (cudaEvent_t e : {step_done_, join_, fork_})
      if (e) (void)cudaEventDestroy(e);
    if (side_stream_) (void)cudaStreamDestroy(side_stream_);
  }

  void upload_rope(cudaStream_t stream) {
    if (rope_device_.size() != 0 || rope_.inv_freq.empty()) return;
    rope_device_ = cuda::DeviceBuffer<float>(rope_.inv_freq.size(), stream, *allocator_);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(rope_device_.data(), rope_.inv_freq.data(),
                                        rope_.inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  }
  cuda::RowRope row_rope() const {
    cuda::RowRope r;
    r.inv_freq = rope_device_.data();
    r.rotary_dim = rope_.rotary_dim;
    r.interleaved = rope_.layout == RopeLayout::interleaved;
    r.attention_scale = rope_.attention_scale;
    return r;
  }

  /// Grows the staged prompt of `st` to hold `capacity` tokens (never shrinks).
  void reserve_staging(LayerState& st, index_t capacity, cudaStream_t stream) {
    if (capacity <= st.staged_capacity) return;
    grow(st.staged_k, st.length, capacity, *staging_allocator_, stream);
    grow(st.staged_v, st.length, capacity, *staging_allocator_, stream);
    if constexpr (kLowRank) grow(st.staged_k_pre, st.length, capacity, *staging_allocator_, stream);
    st.staged_capacity = capacity;
  }

  /// Replaces `buf` by one of `capacity` token rows keeping its first `rows` rows.
  void grow(cuda::DeviceBuffer<D>& buf, index_t rows, index_t capacity, cuda::DeviceAllocator& allocator,
            cudaStream_t stream) {
    cuda::DeviceBuffer<D> bigger(static_cast<std::size_t>(capacity) * kv_row(), stream, allocator);
    if (rows > 0)
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(bigger.data(), buf.data(), static_cast<std::size_t>(rows) * kv_row() * sizeof(D),
                                          cudaMemcpyDeviceToDevice, stream));
    buf = std::move(bigger);
  }

  /// Causal attention of prompt queries at positions start.. over the staged keys, through the
  /// decode kernel: each query token is one "sequence" whose generated rows are its prefix.
  void prefill_attention(LayerState& st, index_t start, TensorView<const T, 3> queries, TensorView<T, 3> out,
                         cudaStream_t stream) {
    const int hq = config_.num_q_heads, hkv = config_.num_kv_heads, d = config_.head_dim;
    const index_t n = queries.shape[0];
    const index_t block = std::min<index_t>(kPrefillQueryBlock, 65535 / hkv);
    for (index_t t0 = 0; t0 < n; t0 += block) {
      const index_t nq = std::min(block, n - t0);
      // Every allocation before the first launch that reads the descriptors.
      float* q = q_float_.get(static_cast<std::size_t>(nq) * hq * d, stream, *allocator_);
      const long long max_rows = start + t0 + nq;
      const auto plan = cuda::plan_decode_attention(static_cast<int>(nq), hq, hkv, d, max_rows);
      void* ws = workspace_.get(plan.workspace_bytes, stream, *allocator_);
      cuda::RopeRowsParams<D, float> rp;
      rp.src = cuda::as_device(queries.data) + t0 * hq * d;
      rp.src_stride = static_cast<long long>(hq) * d;
      rp.dst = q;
      rp.dst_stride = rp.src_stride;
      rp.n = static_cast<int>(nq);
      rp.heads = hq;
      rp.head_dim = d;
      rp.first_position = start + t0;
      rp.rope = row_rope();
      cuda::detail::launch_rope_rows(rp, stream);
      blob_.clear();
      const std::size_t seg_off = blob_.add<cuda::KVSegments<D>>(static_cast<std::size_t>(nq) * hkv);
      auto* segs = blob_.host<cuda::KVSegments<D>>(seg_off);
      for (index_t t = 0; t < nq; ++t)
        for (int h = 0; h < hkv; ++h) {
          cuda::KVSegments<D>& sg = segs[t * hkv + h];
          sg.chunk_size = 1;
          sg.gen_k = st.staged_k.data() + h * d;
          sg.gen_v = st.staged_v.data() + h * d;
          sg.gen_rows = static_cast<int>(start + t0 + t + 1);
          sg.gen_stride = static_cast<long long>(kv_row());
        }
      std::byte* dev = ring_.upload(blob_, stream, *allocator_, *host_allocator_);
      cuda::decode_attention<D>(q, reinterpret_cast<const cuda::KVSegments<D>*>(dev + seg_off),
                                cuda::as_device(out.data) + t0 * hq * d, static_cast<int>(nq), hq, hkv, d,
                                config_.scale(), max_rows, plan, ws, plan.workspace_bytes, stream);
      ring_.release(stream);
    }
  }

  void gather_rows(const cuda::DeviceBuffer<D>& src, D* dst, index_t rows_per_head, const std::int32_t* chunk_ids,
                   index_t num_list_chunks, index_t range_begin, index_t range_end, cudaStream_t stream) const {
    cuda::GatherRowsParams<D> p;
    p.src = src.data();
    p.src_stride = static_cast<long long>(kv_row());
    p.dst = dst;
    p.rows_per_head = rows_per_head;
    p.chunk_ids = chunk_ids;
    p.num_list_chunks = num_list_chunks;
    p.chunk_size = config_.chunk_size;
    p.range_begin = range_begin;
    p.range_end = range_end;
    p.num_kv_heads = config_.num_kv_heads;
    p.head_dim = config_.head_dim;
    cuda::detail::launch_gather_rows(p, stream);
  }

  void build_layer(LayerState& staged, LayerState& st, cudaStream_t stream) {
    const int hkv = config_.num_kv_heads, d = config_.head_dim, c = config_.chunk_size;
    const index_t len = staged.length;
    const std::size_t head_elems = static_cast<std::size_t>(hkv) * d;
    st.length = len;
    if constexpr (!kLowRank) {
      st.static_tokens = len;
      st.static_k = cuda::DeviceBuffer<D>(head_elems * len, stream, *allocator_);
      st.static_v = cuda::DeviceBuffer<D>(head_elems * len, stream, *allocator_);
      gather_rows(staged.staged_k, st.static_k.data(), len, nullptr, 0, 0, len, stream);
      gather_rows(staged.staged_v, st.static_v.data(), len, nullptr, 0, 0, len, stream);
    }
    if constexpr (kSparse) {
      const index_t n_chunks = len / c - config_.local_chunks;
      const int outliers = config_.resolved_outlier_chunks();
      const index_t indexed = n_chunks * c;
      st.local_begin = indexed;
      st.index.emplace(hkv, d, c, *allocator_);
      st.index->build(reinterpret_cast<const T*>(staged.staged_k.data()), indexed, static_cast<long long>(kv_row()),
                      outliers, stream, staging_allocator_);
      const index_t m = st.index->num_landmarks();
      st.k_sel = std::min<index_t>(config_.budget_chunks(), m);
      st.selected_chunk_ids = cuda::DeviceBuffer<std::int32_t>(static_cast<std::size_t>(hkv) * st.k_sel, stream,
                                                               *allocator_);
      if constexpr (kLowRank) {
        const int capacity = std::max(config_.resolved_value_cache_chunks(), 1);
        st.values.emplace(hkv, d, c, m, capacity, stream, *allocator_, *host_allocator_, /*zero_host=*/false);
        // The values cross PCIe on the side stream, meanwhile the keys' eigensolves run here
        // (finish_prefill joins the side stream before the staged prompt is freed).
        SHADOWKV_CUDA_CHECK(cudaEventRecord(fork_, stream));
        SHADOWKV_CUDA_CHECK(cudaStreamWaitEvent(side_stream_, fork_, 0));
        gather_rows(staged.staged_v, cuda::as_device(st.values->device_host_data()), m * c,
                    st.index->landmark_chunk_ids_data(), m, 0, 0, side_stream_);
        st.key_slots = cuda::DeviceBuffer<D>(static_cast<std::size_t>(hkv) * capacity * c * d, stream, *allocator_);
        SHADOWKV_CUDA_CHECK(cudaMemsetAsync(st.key_slots.data(), 0, st.key_slots.bytes(), stream));
        st.static_tokens = index_t{outliers} * c + (len - indexed);
        st.static_k = cuda::DeviceBuffer<D>(head_elems * st.static_tokens, stream, *allocator_);
        st.static_v = cuda::DeviceBuffer<D>(head_elems * st.static_tokens, stream, *allocator_);
        gather_rows(staged.staged_k, st.static_k.data(), st.static_tokens, st.index->outlier_chunk_ids_data(),
                    outliers, indexed, len, stream);
        gather_rows(staged.staged_v, st.static_v.data(), st.static_tokens, st.index->outlier_chunk_ids_data(),
                    outliers, indexed, len, stream);
      }
    }
  }

  /// The keys of a built layer (ShadowKV), once `finalize_bases` has made its basis: A for the
  /// indexed prompt rows.
  void build_layer_keys(const LayerState& staged, LayerState& st, cudaStream_t stream) {
    st.keys->append(reinterpret_cast<const T*>(staged.staged_k_pre.data()), st.local_begin,
                    static_cast<long long>(kv_row()), stream);
  }

  /// Makes room for one more generated row of `st`.
  void reserve_generated(LayerState& st, cudaStream_t stream) {
    if (st.gen_rows < st.gen_capacity) return;
    const index_t cap = st.gen_capacity + kGeneratedBlock;
    grow(st.gen_k, st.gen_rows, cap, *allocator_, stream);
    grow(st.gen_v, st.gen_rows, cap, *allocator_, stream);
    st.gen_capacity = cap;
  }

  void decode_batch(const std::vector<LayerState*>& batch, TensorView<const T, 3> queries,
                    TensorView<const T, 3> keys_pre_rope, TensorView<const T, 3> values, TensorView<T, 3> out,
                    cudaStream_t stream) {
    const int hkv = config_.num_kv_heads, hq = config_.num_q_heads, d = config_.head_dim;
    const int c = config_.chunk_size, g = config_.group_size();
    const int nb = static_cast<int>(batch.size());
    const std::size_t sz = sizeof(T);
    for (LayerState* st : batch) reserve_generated(*st, stream);

    // Selection shapes over the batch.
    int max_m = 0, max_outliers = 0;
    if constexpr (kSparse)
      for (LayerState* st : batch) {
        max_m = std::max(max_m, static_cast<int>(st->index->num_landmarks()));
        max_outliers = std::max(max_outliers, st->index->num_outliers());
      }
    const int k = std::min(config_.budget_chunks(), max_m);  // 0: nothing to select
    const int list_stride = max_outliers + k;

    // Descriptors.
    blob_.clear();
    const std::size_t pos_off = blob_.add<long long>(nb);
    const std::size_t krow_off = blob_.add<D*>(nb);
    const std::size_t vrow_off = blob_.add<D*>(nb);
    const std::size_t seg_off = blob_.add<cuda::KVSegments<D>>(static_cast<std::size_t>(nb) * hkv);
    std::size_t lm_off = 0, nlm_off = 0, soff_off = 0, rec_off = 0, oracle_off = 0, table_off = 0, rebuild_off = 0,
                gather_off = 0;
    if constexpr (kSparse) {
      nlm_off = blob_.add<int>(nb);
      soff_off = blob_.add<long long>(nb);
      rec_off = blob_.add<cuda::SelectionRecordSequence>(nb);
      if constexpr (kOracle) oracle_off = blob_.add<cuda::kernels::OracleSequence<D>>(nb);
      else lm_off = blob_.add<const D*>(nb);
    }
    if constexpr (kLowRank) {
      table_off = blob_.add<cuda::SlotTableSequence>(nb);
      rebuild_off = blob_.add<cuda::RebuildKeysSequence<D>>(nb);
      gather_off = blob_.add<cuda::GatherValuesSequence<D>>(nb);
    }
    // Per-step device scratch (addresses fixed before the blob is written).
    float* q = q_float_.get(static_cast<std::size_t>(nb) * hq * d, stream, *allocator_);
    long long score_total = 0;
    for (LayerState* st : batch)
      if constexpr (kSparse) score_total += static_cast<long long>(hkv) * st->index->num_landmarks();
    const std::size_t sel_elems = static_cast<std::size_t>(nb) * hkv * std::max(k, 1);
    std::int32_t* selected = nullptr;
    std::int32_t* slots = nullptr;
    std::int32_t* lists = nullptr;
    float* scores = nullptr;
    if (k > 0) {
      selected = selected_.get(sel_elems, stream, *allocator_);
      scores = scores_.get(static_cast<std::size_t>(score_total) * (kOracle ? g + 1 : 1), stream, *allocator_);
      if constexpr (kLowRank) slots = slots_.get(sel_elems, stream, *allocator_);
    }
    if constexpr (kOracle)
      if (list_stride > 0) lists = slots_.get(static_cast<std::size_t>(nb) * hkv * list_stride, stream, *allocator_);

    StepStats step;
    step.tokens = nb;
    long long max_rows = 0, score_at = 0;
    auto* positions = blob_.host<long long>(pos_off);
    auto* krows = blob_.host<D*>(krow_off);
    auto* vrows = blob_.host<D*>(vrow_off);
    auto* segs = blob_.host<cuda::KVSegments<D>>(seg_off);
    for (int bi = 0; bi < nb; ++bi) {
      const LayerState& st = *batch[bi];
      positions[bi] = st.length;
      krows[bi] = st.gen_k.data() + st.gen_rows * kv_row();
      vrows[bi] = st.gen_v.data() + st.gen_rows * kv_row();
      const index_t n_gen = st.gen_rows + 1;
      const int m = kSparse ? static_cast<int>(st.index->num_landmarks()) : 0;
      const int k_b = std::min(k, m);
      const int outliers = kSparse ? st.index->num_outliers() : 0;
      long long rows = n_gen;
      for (int h = 0; h < hkv; ++h) {
        cuda::KVSegments<D>& sg = segs[bi * hkv + h];
        sg.chunk_size = c;
        sg.gen_k = st.gen_k.data() + h * d;
        sg.gen_v = st.gen_v.data() + h * d;
        sg.gen_rows = static_cast<int>(n_gen);
        sg.gen_stride = static_cast<long long>(kv_row());
        const std::size_t head_static = static_cast<std::size_t>(h) * st.static_tokens * d;
        if constexpr (kLowRank) {
          const std::size_t head_slots = static_cast<std::size_t>(h) * st.values->capacity() * c * d;
          sg.static_k = st.static_k.data() + head_static;
          sg.static_v = st.static_v.data() + head_static;
          sg.static_rows = static_cast<int>(st.static_tokens);
          sg.slot_k = st.key_slots.data() + head_slots;
          sg.slot_v = cuda::as_device(st.values->slots_data()) + head_slots;
          sg.slots = slots ? slots + (static_cast<std::size_t>(bi) * hkv + h) * k : nullptr;
          sg.num_slots = k_b;
        } else if constexpr (kSparse) {  // oracle: local window static, outliers + selection as chunks
          sg.static_k = st.static_k.data() + head_static + st.local_begin * d;
          sg.static_v = st.static_v.data() + head_static + st.local_begin * d;
          sg.static_rows = static_cast<int>(st.static_tokens - st.local_begin);
          sg.slot_k = st.static_k.data() + head_static;
          sg.slot_v = st.static_v.data() + head_static;
          sg.slots = lists ? lists + (static_cast<std::size_t>(bi) * hkv + h) * list_stride : nullptr;
          sg.num_slots = outliers + k_b;
        } else {
          sg.static_k = st.static_k.data() + head_static;
          sg.static_v = st.static_v.data() + head_static;
          sg.static_rows = static_cast<int>(st.static_tokens);
        }
        rows = sg.total_rows();
      }
      max_rows = std::max(max_rows, rows);
      // Bytes, as the CPU backend counts them.
      index_t attended_static = st.static_tokens;
      if constexpr (kSparse && !kLowRank) attended_static = index_t{outliers} * c + st.static_tokens - st.local_begin;
      step.hbm_bytes += 2 * static_cast<std::int64_t>(hkv) * (attended_static + n_gen) * d * sz;
      if constexpr (kSparse) {
        step.hbm_bytes += static_cast<std::int64_t>(hkv) * m * d * sz * (kOracle ? c : 1);
        step.hbm_bytes += 2 * static_cast<std::int64_t>(hkv) * k_b * c * d * sz;
        blob_.host<int>(nlm_off)[bi] = m;
        blob_.host<long long>(soff_off)[bi] = score_at;
        cuda::SelectionRecordSequence& rec = blob_.host<cuda::SelectionRecordSequence>(rec_off)[bi];
        rec.landmark_chunk_ids = st.index->landmark_chunk_ids_data();
        rec.num_landmarks = m;
        rec.record = st.k_sel > 0 ? st.selected_chunk_ids.data() : nullptr;
        rec.record_k = static_cast<int>(st.k_sel);
        if constexpr (kOracle) {
          rec.outlier_chunk_ids = st.index->outlier_chunk_ids_data();
          rec.num_outliers = outliers;
          auto& o = blob_.host<cuda::kernels::OracleSequence<D>>(oracle_off)[bi];
          o.keys = st.static_k.data();
          o.prompt_rows = st.static_tokens;
          o.landmark_chunk_ids = st.index->landmark_chunk_ids_data();
          o.num_landmarks = m;
          o.score_offset = score_at;
        } else {
          blob_.host<const D*>(lm_off)[bi] = cuda::as_device(st.index->landmarks_data());
        }
        score_at += static_cast<long long>(hkv) * m;
      }
      if constexpr (kLowRank) {
        blob_.host<cuda::SlotTableSequence>(table_off)[bi] = st.values->descriptor();
        auto& rb = blob_.host<cuda::RebuildKeysSequence<D>>(rebuild_off)[bi];
        rb.a = cuda::as_device(st.keys->a_data());
        rb.basis = cuda::as_device(st.keys->basis_data());
        rb.key_slots = st.key_slots.data();
        rb.num_rows = st.keys->size();
        rb.capacity = st.values->capacity();
        rb.chunk_ids = st.index->landmark_chunk_ids_data();
        rb.num_chunk_ids = m;
        auto& gv = blob_.host<cuda::GatherValuesSequence<D>>(gather_off)[bi];
        gv.host_values = cuda::as_device(st.values->device_host_data());
        gv.value_slots = cuda::as_device(st.values->slots_data());
        gv.num_chunks = m;
        gv.capacity = st.values->capacity();
      }
    }
    // The rest of the scratch, then the descriptors: the step's last allocations. Up to here
    // nothing of the batch has changed (rows past `gen_rows` aside), so a failed allocation
    // leaves every sequence as it was.
    void* score_ws = nullptr;
    std::size_t score_ws_bytes = 0;
    if constexpr (kSparse && !kOracle)
      if (k > 0) {
        score_ws_bytes = cuda::landmark_score_workspace_bytes(nb, hq, hkv, max_m, score_total);
        score_ws = workspace_.get(score_ws_bytes, stream, *allocator_);
      }
    cuda::ChunkMiss* misses = nullptr;
    std::int64_t* counters = nullptr;  // totals[4], skipped, then two miss counts (one per step parity)
    if constexpr (kLowRank)
      if (k > 0) {
        misses = misses_.get(sel_elems, stream, *allocator_);
        counters = counters_.get(kCounters + 2, stream, *allocator_);
      }
    const auto plan = cuda::plan_decode_attention(nb, hq, hkv, d, max_rows);
    void* attn_ws = attn_workspace_.get(plan.workspace_bytes, stream, *allocator_);
    std::byte* dev = ring_.upload(blob_, stream, *allocator_, *host_allocator_, side_stream_);
    auto dev_ptr = [&](std::size_t off) { return dev + off; };
    for (LayerState* st : batch) {
      st->length += 1;
      st->gen_rows += 1;
      if constexpr (kSparse) st->has_selection = true;
    }

    // RoPE: queries to float; the new key (rotated) and value appended to the generated rows.
    {
      cuda::RopeRowsParams<D, float> rq;
      rq.src = cuda::as_device(queries.data);
      rq.src_stride = static_cast<long long>(hq) * d;
      rq.dst = q;
      rq.dst_stride = rq.src_stride;
      rq.n = nb;
      rq.heads = hq;
      rq.head_dim = d;
      rq.positions = reinterpret_cast<const long long*>(dev_ptr(pos_off));
      rq.rope = row_rope();
      cuda::RopeRowsParams<D, D> rk;
      rk.src = cuda::as_device(keys_pre_rope.data);
      rk.src_stride = static_cast<long long>(kv_row());
      rk.dst_rows = reinterpret_cast<D* const*>(dev_ptr(krow_off));
      rk.n = nb;
      rk.heads = hkv;
      rk.head_dim = d;
      rk.positions = rq.positions;
      rk.rope = row_rope();
      cuda::RopeRowsParams<D, D> rv = rk;
      rv.src = cuda::as_device(values.data);
      rv.dst_rows = reinterpret_cast<D* const*>(dev_ptr(vrow_off));
      rv.rope = {};
      cuda::detail::launch_decode_rope(rq, rk, rv, stream);
    }

    if constexpr (kSparse) {
      if (k > 0) {
        const auto* nlm = reinterpret_cast<const int*>(dev_ptr(nlm_off));
        const auto* soff = reinterpret_cast<const long long*>(dev_ptr(soff_off));
        cuda::TopKParams tp;
        tp.scores = scores;
        tp.num_landmarks = nlm;
        tp.score_offsets = soff;
        tp.scores_capacity = score_total;
        tp.selected = selected;
        tp.batch = nb;
        tp.num_kv_heads = hkv;
        tp.k = k;
        tp.max_landmarks = max_m;
        if constexpr (kOracle) {
          const auto* oseq = reinterpret_cast<const cuda::kernels::OracleSequence<D>*>(dev_ptr(oracle_off));
          float* lse = scores + score_total;
          constexpr int kWarps = 8;
          const long long items = static_cast<long long>(hkv) * max_m;
          const dim3 grid(static_cast<unsigned>((items + kWarps - 1) / kWarps), static_cast<unsigned>(nb));
          cuda::kernels::oracle_chunk_lse_kernel<D><<<grid, kWarps * 32, 0, stream>>>(
              oseq, q, hq, hkv, d, c, config_.scale(), max_m, lse);
          SHADOWKV_CUDA_CHECK_LAUNCH();
          cuda::kernels::oracle_scores_kernel<D><<<dim3(hkv, nb), 256, 0, stream>>>(oseq, hq, hkv, lse, scores);
          SHADOWKV_CUDA_CHECK_LAUNCH();
          cuda::select_top_k(tp, stream);
        } else {
          cuda::LandmarkScoreParams<T> sp;
          sp.queries = q;
          sp.landmarks = reinterpret_cast<const T* const*>(dev_ptr(lm_off));
          sp.num_landmarks = nlm;
          sp.score_offsets = soff;
          sp.scores = scores;
          sp.scores_capacity = score_total;
          sp.batch = nb;
          sp.num_q_heads = hq;
          sp.num_kv_heads = hkv;
          sp.head_dim = d;
          sp.max_landmarks = max_m;
          sp.scale = config_.scale();
          sp.workspace_bytes = score_ws_bytes;
          sp.workspace = score_ws;
          // Scoring and top-k; the normalisation runs inside the top-k kernel where the batch has
          // enough rows for that to pay (score_and_select_top_k).
          cuda::score_and_select_top_k(sp, tp, stream, *allocator_);
        }
        if (selection_hook_) {
          cuda::SelectionHookArgs ha;
          ha.layer = current_layer_;
          ha.ids = current_ids_;
          ha.num_kv_heads = hkv;
          ha.k = k;
          ha.selected = selected;
          ha.num_landmarks = nlm;
          selection_hook_(ha, stream);
        }
      }
      // The record of the selection (and the oracle's chunk lists, outliers first). ShadowKV's
      // slot-table update writes it on the way (below), one launch fewer.
      if (!kLowRank && (k > 0 || lists)) {
        cuda::kernels::record_selection_kernel<std::int32_t><<<dim3(hkv, nb), 128, 0, stream>>>(
            reinterpret_cast<const cuda::SelectionRecordSequence*>(dev_ptr(rec_off)), selected, k, hkv, lists,
            list_stride);
        SHADOWKV_CUDA_CHECK_LAUNCH();
      }
    }

    cuda::AttentionWordCopy counter_copy;
    if constexpr (kLowRank) {
      if (k > 0) {
        const std::size_t max_misses = sel_elems;
        // counters: the pool's running totals (requested, hits, misses, heads with misses), the
        // skipped rows and entries (an int in a 64-bit slot), then the miss-list lengths of even
        // and odd steps: each step's update appends to its own and zeroes the other for the
        // next step, so no step needs a memset.
        if (reset_device_totals_ || !counters_ready_) {
          SHADOWKV_CUDA_CHECK(cudaMemsetAsync(counters, 0, (kCounters + 2) * sizeof(std::int64_t), stream));
          reset_device_totals_ = false;
          counters_ready_ = true;
        }
        int* num_misses = reinterpret_cast<int*>(counters + kCounters + parity_);
        int* skipped = reinterpret_cast<int*>(counters + 4);
        cuda::SlotTableParams up;
        up.sequences = reinterpret_cast<const cuda::SlotTableSequence*>(dev_ptr(table_off));
        up.batch = nb;
        up.num_kv_heads = hkv;
        up.selected = selected;
        up.k = k;
        up.slots = slots;
        up.misses = misses;
        up.misses_capacity = static_cast<int>(max_misses);
        up.num_misses = num_misses;
        up.counters = counters;
        up.records = reinterpret_cast<const cuda::SelectionRecordSequence*>(dev_ptr(rec_off));
        up.next_num_misses = reinterpret_cast<int*>(counters + kCounters + (1 - parity_));
        up.maybe_num_invalid = skipped;
        cuda::update_slot_tables(up, stream);
        parity_ = 1 - parity_;
        cuda::GatherValuesParams<D> gp;
        gp.sequences = reinterpret_cast<const cuda::GatherValuesSequence<D>*>(dev_ptr(gather_off));
        gp.num_sequences = nb;
        gp.misses = misses;
        gp.num_misses = static_cast<int>(max_misses);
        gp.maybe_num_misses = num_misses;
        gp.maybe_num_invalid = skipped;
        gp.num_kv_heads = hkv;
        gp.head_dim = d;
        gp.chunk_size = c;
        cuda::RebuildKeysParams<D> rp;
        rp.sequences = reinterpret_cast<const cuda::RebuildKeysSequence<D>*>(dev_ptr(rebuild_off));
        rp.num_sequences = nb;
        rp.misses = misses;
        rp.num_misses = static_cast<int>(max_misses);
        rp.maybe_num_misses = num_misses;
        rp.maybe_num_invalid = skipped;
        rp.num_kv_heads = hkv;
        rp.head_dim = d;
        rp.rank = config_.rank;
        rp.chunk_size = c;
        rp.rope = cuda::make_rebuild_rope(rope_, rope_device_.data());
        // The values over PCIe while the keys are rebuilt, in one launch.
        cuda::rebuild_keys_beside_gather(rp, gp, stream);
        // The attention kernel copies the running totals (final once the gather and the rebuild,
        // which add to `skipped`, are done) to the other snapshot in mapped host memory, which
        // becomes the latest once that launch is queued (below).
        counter_copy.src = counters;
        counter_copy.dst = counters_host_.device_data() + kCounters * (1 - snapshot_);
        counter_copy.words = kCounters;
      }
    }

    cuda::decode_attention<D>(q, reinterpret_cast<const cuda::KVSegments<D>*>(dev_ptr(seg_off)),
                              cuda::as_device(out.data), nb, hq, hkv, d, config_.scale(), max_rows, plan, attn_ws,
                              plan.workspace_bytes, stream, counter_copy);
    if (counter_copy.words > 0) {
      snapshot_ = 1 - snapshot_;
      last_step_has_pool_ = true;
    }
    ring_.release(stream);
    SHADOWKV_CUDA_CHECK(cudaEventRecord(step_done_, stream));
    last_step_fixed_ = step;
    totals_fixed_ += step;
  }

  static constexpr int kCounters = 5;  // requested, hits, misses, heads with misses, skipped

  /// Snapshot `which` (0 or 1) of the pool's running totals as counts. The skipped count is a
  /// 32-bit int the kernels add to, in the first 4 bytes of its 64-bit slot (little-endian hosts).
  std::array<std::int64_t, kCounters> counter_snapshot(int which) const {
    std::array<std::int64_t, kCounters> c;
    std::copy_n(counters_host_.data() + kCounters * which, kCounters, c.begin());
    std::int32_t skipped = 0;
    std::memcpy(&skipped, &c[4], sizeof skipped);
    c[4] = skipped;
    return c;
  }

  /// Adds the pool counters (`requested, hits, misses, heads with misses, skipped`) and the
  /// bytes they imply (A rows read, key and value slots written, each head's basis) to `s`.
  void add_pool(StepStats& s, const std::array<std::int64_t, kCounters>& counters) const {
    const std::int64_t sz = sizeof(T), c = config_.chunk_size, d = config_.head_dim, r = config_.rank;
    s.pool.requested += counters[0];
    s.pool.hits += counters[1];
    s.pool.misses += counters[2];
    s.pool.bytes_copied += counters[2] * c * d * sz;
    s.pcie_bytes += counters[2] * c * d * sz;
    s.hbm_bytes += counters[2] * c * (r + 2 * d) * sz + counters[3] * r * d * sz;
    s.skipped += counters[4];
  }

  cuda::SelectionHook selection_hook_;
  int current_layer_ = 0;               // the decode call in progress, for the hook
  std::span<const SeqId> current_ids_;
  Config config_;
  int num_layers_;
  cuda::DeviceAllocator* allocator_;
  cuda::DeviceAllocator* staging_allocator_ = allocator_;
  cuda::HostAllocator* host_allocator_;
  RopeTable rope_;
  cuda::DeviceBuffer<float> rope_device_;
  SeqMap seqs_;
  cudaStream_t side_stream_ = nullptr;
  cudaEvent_t fork_ = nullptr, join_ = nullptr, step_done_ = nullptr;
  cuda::detail::StagingRing ring_;
  Blob blob_;
  // Per-step scratch (grown, never shrunk; not counted by memory()).
  cuda::detail::Scratch<float> q_float_, scores_;
  cuda::detail::Scratch<std::int32_t> selected_, slots_;
  cuda::detail::Scratch<cuda::ChunkMiss> misses_;
  cuda::detail::Scratch<std::int64_t> counters_;
  cuda::detail::Scratch<std::byte> workspace_, attn_workspace_;
  // Two snapshots of the pool's running totals [kCounters]: the last decode's (at kCounters *
  // snapshot_) and the one before; a step's counts are their difference. Mapped host memory:
  // the step's attention kernel writes its snapshot (cuda::AttentionWordCopy).
  cuda::PinnedBuffer<std::int64_t> counters_host_;
  int snapshot_ = 0;
  int parity_ = 0;  // which miss counter of counters_ the next step appends to
  bool counters_ready_ = false, reset_device_totals_ = false;
  StepStats last_step_fixed_, totals_fixed_;
  bool last_step_has_pool_ = false;
};

}  // namespace shadowkv
