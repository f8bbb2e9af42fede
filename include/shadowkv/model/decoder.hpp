#pragma once
/// \file model/decoder.hpp
/// \brief A Llama-family decoder (Llama 2/3/3.1, Yi, Qwen2, GLM-4 with RMSNorm) over a
/// `ModelConfig` + `WeightStore`, with attention through `SparseAttention<Policy, B, float>`:
/// chunked prefill, batched decode steps, greedy or temperature/top-p sampling.
///
/// Layer: `x += o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))` with
/// `n1 = rms_norm(x)`, then `x += down(silu(gate(n2)) * up(n2))` with `n2 = rms_norm(x)`;
/// biases where the config has them. Final norm (when the model has one), LM head (the
/// embedding when tied).
///
/// Backend split: everything but attention goes through `LinearOps<B>` (embedding lookup,
/// `y = x Wᵀ + b`, RMSNorm, SwiGLU, residual add), and attention through
/// `SparseAttention<Policy, B, float>`; `Decoder` itself only sequences these calls over
/// `LinearOps<B>::Buffer`s. `LinearOps<CpuBackend>` (Eigen) is here; `LinearOps<CudaBackend>`
/// (device buffers, cublasGemmEx, one stream) is in model/decoder_cuda.cuh, so this header
/// stays free of CUDA. A backend's `LinearOps` is a member of the decoder (it may own state: a
/// stream, scratch); `attention_args()` are the trailing arguments every attention call takes on
/// that backend (none on the CPU, the stream on CUDA).
///
/// Precision (CPU): weights are converted to float once, when the decoder is built (BF16 and
/// F16 widen exactly, so the arithmetic sees the checkpoint's values), activations and the KV
/// state are float. This doubles the memory of a BF16 checkpoint — the right trade for the
/// small models the CPU path runs (the project's own, tests); an 8B model wants the GPU.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include <Eigen/Core>

#include "../core/backend.hpp"
#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/policy.hpp"
#include "../core/stats.hpp"
#include "../core/tensor.hpp"
#include "../cpu/eigen_util.hpp"
#include "../cpu/sparse_attention.hpp"
#include "model_config.hpp"
#include "tokenizer.hpp"
#include "weights.hpp"

namespace shadowkv::model {

/// The dense math of a decoder on backend `B`: the only part besides attention that a new
/// backend provides. Activations are row-major `[n, features]` buffers.
template <Backend B>
struct LinearOps;

/// Eigen on the host: weights `[out, in]` as float row-major matrices, buffers as vectors.
template <>
struct LinearOps<CpuBackend> {
  using Buffer = std::vector<float>;  ///< activations, `[n, features]` row-major
  using Matrix = cpu::RowMatrixF;     ///< a weight `[out_features, in_features]`

  /// A matrix weight converted to float.
  static Matrix load_matrix(const WeightStore& store, const WeightRef& w) {
    SHADOWKV_CHECK(w.shape.size() == 2, "weight '", w.tensor, "' is not a matrix");
    Matrix m(w.shape[0], w.shape[1]);
    load_weight<float>(store, w, std::span<float>(m.data(), static_cast<std::size_t>(m.size())));
    return m;
  }
  /// A vector weight (norm, bias) converted to float; empty when the model has none.
  static Buffer load_vector(const WeightStore& store, const WeightRef& w) {
    if (w.empty()) return {};
    return load_weight<float>(store, w);
  }

  /// `x[i] = table[ids[i]]`: `[n, hidden]` from the embedding `[vocab, hidden]`.
  static void embed(const Matrix& table, std::span<const token_id> ids, Buffer& x) {
    const index_t hidden = table.cols();
    x.resize(ids.size() * static_cast<std::size_t>(hidden));
    for (std::size_t i = 0; i < ids.size(); ++i)
      std::copy_n(table.row(ids[i]).data(), hidden, x.data() + i * hidden);
  }

  /// `y = x Wᵀ (+ bias)`: x `[n, in]`, w `[out, in]`, bias `[out]` or empty, y `[n, out]`.
  static void linear(const Buffer& x, index_t n, const Matrix& w, const Buffer& bias, Buffer& y) {
    y.resize(static_cast<std::size_t>(n * w.rows()));
    cpu::RowMap<float> ym(y.data(), n, w.rows());
    ym.noalias() = cpu::ConstRowMap<float>(x.data(), n, w.cols()) * w.transpose();
    if (!bias.empty()) ym.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias.data(), w.rows());
  }

  /// `y += x Wᵀ (+ bias)` (the residual connections).
  static void add_linear(const Buffer& x, index_t n, const Matrix& w, const Buffer& bias, Buffer& y) {
    cpu::RowMap<float> ym(y.data(), n, w.rows());
    ym.noalias() += cpu::ConstRowMap<float>(x.data(), n, w.cols()) * w.transpose();
    if (!bias.empty()) ym.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias.data(), w.rows());
  }

  /// `y[i] = x[i] / sqrt(mean(x[i]²) + eps) * weight` per row of `x` `[n, hidden]`; with an
  /// empty `weight`, a plain copy (models without a final norm).
  static void rms_norm(const Buffer& x, index_t n, const Buffer& weight, double eps, Buffer& y) {
    y.resize(x.size());
    if (weight.empty()) {
      std::copy(x.begin(), x.end(), y.begin());
      return;
    }
    const index_t hidden = static_cast<index_t>(weight.size());
    for (index_t i = 0; i < n; ++i) {
      const float* xr = x.data() + i * hidden;
      float* yr = y.data() + i * hidden;
      float ss = 0.0f;
      for (index_t j = 0; j < hidden; ++j) ss += xr[j] * xr[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + static_cast<float>(eps));
      for (index_t j = 0; j < hidden; ++j) yr[j] = xr[j] * inv * weight[j];
    }
  }

  /// `gate = silu(gate) * up`, elementwise (SwiGLU).
  static void silu_mul(Buffer& gate, const Buffer& up) {
    for (std::size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }

  /// Rows `[row_begin, row_begin + n)` of `x` (`[*, features]`) into `y`.
  static void copy_rows(const Buffer& x, index_t features, index_t row_begin, index_t n, Buffer& y) {
    y.assign(x.begin() + row_begin * features, x.begin() + (row_begin + n) * features);
  }

  /// Host copy of a buffer (logits go to the sampler on the host).
  static std::vector<float> to_host(const Buffer& x) { return x; }

  /// `x` holds `n` floats (contents unspecified: the caller overwrites them).
  static void resize(Buffer& x, std::size_t n) { x.resize(n); }

  /// Bytes a weight occupies.
  static std::size_t bytes(const Matrix& w) { return static_cast<std::size_t>(w.size()) * sizeof(float); }
  static std::size_t bytes(const Buffer& w) { return w.size() * sizeof(float); }

  /// Trailing arguments of the attention calls on this backend: none.
  static std::tuple<> attention_args() { return {}; }

  static TensorView<float, 3> view(Buffer& x, index_t n, index_t heads, index_t d) {
    return TensorView<float, 3>(x.data(), {n, heads, d});
  }
};

/// Prefill progress: `(tokens done, tokens in the prompt)`, after each chunk.
using PrefillProgress = std::function<void(index_t done, index_t total)>;

/// One layer's attention call as `Decoder` makes it, shown to `Decoder::set_observer`: a chunk
/// of one sequence's prompt (`prefill`, `ids` holds that id) or one decode step of a batch
/// (`ids[i]` is row i). The views are `[n, H, d]` in the backend's memory (device pointers on
/// CUDA, written on the decoder's stream: see `Decoder::attention_args`) and valid during the
/// call only. Queries and keys are before RoPE; `out` is the layer's attention output.
///
/// What it is for: measuring a policy's attention against another's on the same inputs, and
/// handing one prefill's keys and values to other attention states (`SparseAttention::prefill`
/// with empty queries) so that several policies share one prompt pass.
struct AttentionEvent {
  bool prefill = false;
  std::span<const SeqId> ids;
  int layer = 0;
  TensorView<const float, 3> queries, keys, values, out;
};
using AttentionObserver = std::function<void(const AttentionEvent&)>;

/// What `Decoder::generate` does.
struct GenerationOptions {
  int max_new_tokens = 64;     ///< generated tokens at most (the eos, when hit, counts)
  index_t prefill_chunk = 512;  ///< prompt tokens per forward pass during prefill
  double temperature = 0.0;    ///< 0: greedy; otherwise softmax(logits / temperature)
  double top_p = 1.0;          ///< nucleus: sample from the smallest set with mass >= top_p
  std::uint64_t seed = 0;      ///< of the sampler (unused when greedy)
  bool stop_at_eos = true;     ///< stop at any of the config's eos ids
  PrefillProgress on_prefill;  ///< may be empty
  std::function<void(token_id)> on_token;  ///< each generated token as it comes; may be empty
};

/// What `Decoder::generate` did.
struct GenerationResult {
  std::vector<token_id> tokens;  ///< generated (an eos that stopped generation included)
  bool stopped_at_eos = false;
  index_t prompt_tokens = 0;
  double prefill_seconds = 0;  ///< forward passes over the prompt + `finish_prefill`
  double decode_seconds = 0;   ///< the decode steps (tokens fed back), sampling included
  index_t decode_steps = 0;    ///< tokens fed back through a decode step
  MemoryUsage memory;          ///< the sequence's attention state at the end (all layers)
  StepStats attention;         ///< every decode step of every layer (bytes, hit counts)

  double prefill_tokens_per_second() const {
    return prefill_seconds > 0 ? static_cast<double>(prompt_tokens) / prefill_seconds : 0.0;
  }
  /// Generated tokens per second of decoding: the first token comes from the prefill's
  /// logits, every later one costs one decode step.
  double decode_tokens_per_second() const {
    return decode_seconds > 0 ? static_cast<double>(decode_steps) / decode_seconds : 0.0;
  }
};

/// The next token from `logits` `[vocab]`: the first argmax when `temperature == 0`, else a
/// draw from softmax(logits / temperature) restricted to the top-p nucleus. Throws naming the
/// argument for a temperature that is not finite and >= 0, a top_p outside (0, 1], and (when
/// sampling) logits that are not finite.
inline token_id sample_token(std::span<const float> logits, double temperature, double top_p,
                             std::mt19937_64& rng) {
  SHADOWKV_CHECK(!logits.empty(), "sample_token: empty logits");
  SHADOWKV_CHECK(std::isfinite(temperature) && temperature >= 0.0, "temperature=", temperature,
                 " must be finite and >= 0");
  if (temperature == 0.0)
    return static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  SHADOWKV_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p=", top_p, " must be in (0, 1]");
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double sum = 0;
  for (std::size_t i = 0; i < p.size(); ++i) sum += (p[i] = std::exp((logits[i] - mx) / temperature));
  // NaN or infinite logits leave no mass to sample from (and no nucleus to index).
  SHADOWKV_CHECK(std::isfinite(sum) && sum > 0.0, "sample_token: the logits are not finite (softmax sum ",
                 sum, ")");
  std::vector<token_id> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](token_id a, token_id b) { return p[a] > p[b]; });
  std::size_t keep = 0;
  double mass = 0;
  while (keep < order.size() && mass < top_p * sum) mass += p[order[keep++]];
  const double u = std::uniform_real_distribution<double>(0.0, mass)(rng);
  double acc = 0;
  for (std::size_t i = 0; i < keep; ++i)
    if ((acc += p[order[i]]) > u) return order[i];
  return order[keep - 1];
}

/// A Llama-family model whose attention is `SparseAttention<Policy, B, float>`. Holds the
/// weights (converted once) and the attention state of any number of sequences.
///
/// Use: `generate(prompt, options)` for one sequence end to end, or, as an engine would,
/// `add_sequence` / `prefill` / `decode` (a batch of sequences per step) / `remove_sequence`.
template <AttentionPolicy Policy, Backend B = CpuBackend>
class Decoder {
 public:
  using Ops = LinearOps<B>;
  using Buffer = typename Ops::Buffer;
  using Matrix = typename Ops::Matrix;
  using Attention = SparseAttention<Policy, B, float>;

  /// Checks every weight against `cfg` (`check_weights`), validates `attention` against the
  /// model's shapes, then loads. \param attention the ShadowKV knobs; its heads, head dim and
  /// RoPE must be the model's (start from `cfg.attention_config()`).
  Decoder(const ModelConfig& cfg, const WeightStore& store, const Config& attention)
      : cfg_(cfg), attn_((validate(cfg, store, attention), attention), cfg.num_layers) {
    const ModelWeights mw = model_weights(cfg_);
    embed_ = ops_.load_matrix(store, mw.embed_tokens);
    final_norm_ = ops_.load_vector(store, mw.final_norm);
    if (!cfg_.tie_word_embeddings) lm_head_ = ops_.load_matrix(store, mw.lm_head);
    layers_.resize(cfg_.num_layers);
    for (int l = 0; l < cfg_.num_layers; ++l) {
      const LayerWeights w = layer_weights(cfg_, l);
      Layer& L = layers_[l];
      L.input_norm = ops_.load_vector(store, w.input_norm);
      L.post_norm = ops_.load_vector(store, w.post_attention_norm);
      L.q = ops_.load_matrix(store, w.q_proj);
      L.k = ops_.load_matrix(store, w.k_proj);
      L.v = ops_.load_matrix(store, w.v_proj);
      L.o = ops_.load_matrix(store, w.o_proj);
      L.q_bias = ops_.load_vector(store, w.q_bias);
      L.k_bias = ops_.load_vector(store, w.k_bias);
      L.v_bias = ops_.load_vector(store, w.v_bias);
      L.o_bias = ops_.load_vector(store, w.o_bias);
      L.gate = ops_.load_matrix(store, w.gate_proj);
      L.up = ops_.load_matrix(store, w.up_proj);
      L.down = ops_.load_matrix(store, w.down_proj);
      L.gate_bias = ops_.load_vector(store, w.gate_bias);
      L.up_bias = ops_.load_vector(store, w.up_bias);
      L.down_bias = ops_.load_vector(store, w.down_bias);
    }
  }

  const ModelConfig& model_config() const { return cfg_; }
  const Attention& attention() const { return attn_; }
  Attention& attention() { return attn_; }

  /// Called after every layer's attention in `prefill` and `decode` (empty: none, the default).
  void set_observer(AttentionObserver observer) { observer_ = std::move(observer); }
  /// The trailing arguments this decoder passes to its attention calls: `std::tuple<>` on the
  /// CPU, `std::tuple<cudaStream_t>` (its stream) on CUDA. An observer that calls another
  /// attention state passes these so that the work is ordered after the decoder's.
  auto attention_args() const { return ops_.attention_args(); }

  void add_sequence(SeqId id) { attn_.add_sequence(id); }
  void remove_sequence(SeqId id) { attn_.remove_sequence(id); }

  /// The smallest prompt `prefill` accepts: 1 for dense, the static set (local + outlier
  /// chunks, `Config::min_context`) for the sparse policies.
  index_t min_prompt_tokens() const {
    return Policy::selection == ChunkSelection::all ? 1 : std::max<index_t>(1, attn_.config().min_context());
  }

  /// Runs the prompt of a new sequence `id` (already added, nothing prefilled) through every
  /// layer, `chunk` tokens at a time (no `[L, L]` buffer: attention is tiled inside
  /// `SparseAttention::prefill`), then `finish_prefill` (low-rank keys, landmarks, offload).
  /// \param prompt token ids in [0, vocab_size), at least `min_prompt_tokens()` of them
  /// \param all_logits when not null, receives the logits of every prompt token
  ///        `[prompt.size(), vocab]` (tests; costs an LM head per token)
  /// \return the logits of the last prompt token `[vocab]`
  std::vector<float> prefill(SeqId id, std::span<const token_id> prompt, index_t chunk = 512,
                             const PrefillProgress& progress = {}, std::vector<float>* all_logits = nullptr) {
    SHADOWKV_CHECK(chunk >= 1, "prefill chunk=", chunk, " must be positive");
    const index_t n = static_cast<index_t>(prompt.size());
    SHADOWKV_CHECK(n >= min_prompt_tokens(), "prompt of ", n, " tokens is shorter than the ", min_prompt_tokens(),
                   " tokens the policy's static set needs: (local_chunks=", attn_.config().local_chunks,
                   " + outlier_chunks=", attn_.config().resolved_outlier_chunks(), ") * chunk_size=",
                   attn_.config().chunk_size, "; lower the budget or the outlier/local chunks, or use DensePolicy");
    check_ids(prompt);
    SHADOWKV_CHECK(!attn_.is_prefilled(id) && attn_.length(id) == 0, "sequence id=", id,
                   " already has tokens: prefill takes a whole prompt of a fresh sequence");
    if (all_logits) all_logits->clear();
    std::vector<float> last;
    for (index_t begin = 0; begin < n; begin += chunk) {
      const index_t m = std::min(chunk, n - begin);
      ops_.embed(embed_, prompt.subspan(begin, m), x_);
      run_layers(m, [&](int layer, auto q, auto k, auto v, auto out) {
        std::apply([&](auto... args) { attn_.prefill(id, layer, q, k, v, out, args...); }, ops_.attention_args());
        if (observer_) observer_(AttentionEvent{true, std::span<const SeqId>(&id, 1), layer, q, k, v, TensorView<const float, 3>(out)});
      });
      if (all_logits) {
        const std::vector<float> logits = lm_head(x_, 0, m);
        all_logits->insert(all_logits->end(), logits.begin(), logits.end());
      }
      if (begin + m == n) last = lm_head(x_, m - 1, 1);
      if (progress) progress(begin + m, n);
    }
    std::apply([&](auto... args) { attn_.finish_prefill(id, args...); }, ops_.attention_args());
    return last;
  }

  /// One decode step for a batch of prefilled sequences: `tokens[i]` is the next token of
  /// `ids[i]`. \return the logits of each `[ids.size(), vocab]`, row-major.
  std::vector<float> decode(std::span<const SeqId> ids, std::span<const token_id> tokens) {
    SHADOWKV_CHECK(ids.size() == tokens.size(), "decode: ", ids.size(), " sequence ids but ", tokens.size(),
                   " tokens");
    SHADOWKV_CHECK(!ids.empty(), "decode: no sequences");
    check_ids(tokens);
    const index_t b = static_cast<index_t>(ids.size());
    ops_.embed(embed_, tokens, x_);
    run_layers(b, [&](int layer, auto q, auto k, auto v, auto out) {
      std::apply([&](auto... args) { attn_.decode(layer, ids, q, k, v, out, args...); }, ops_.attention_args());
      if (observer_) observer_(AttentionEvent{false, ids, layer, q, k, v, TensorView<const float, 3>(out)});
    });
    return lm_head(x_, 0, b);
  }

  /// Prefill + sampling loop for one sequence `id` (added here, removed at the end).
  GenerationResult generate(std::span<const token_id> prompt, const GenerationOptions& opt, SeqId id = 0) {
    using Clock = std::chrono::steady_clock;
    SHADOWKV_CHECK(opt.max_new_tokens >= 0, "max_new_tokens=", opt.max_new_tokens, " must be >= 0");
    SHADOWKV_CHECK(std::isfinite(opt.temperature) && opt.temperature >= 0.0, "temperature=", opt.temperature,
                   " must be finite and >= 0");
    SHADOWKV_CHECK(opt.top_p > 0.0 && opt.top_p <= 1.0, "top_p=", opt.top_p, " must be in (0, 1]");
    GenerationResult r;
    r.prompt_tokens = static_cast<index_t>(prompt.size());
    attn_.reset_stats();
    add_sequence(id);
    struct Remove {
      Decoder* d;
      SeqId id;
      ~Remove() {
        if (d->attn_.contains(id)) d->attn_.remove_sequence(id);
      }
    } remove{this, id};
    std::mt19937_64 rng(opt.seed);
    auto t0 = Clock::now();
    std::vector<float> logits = prefill(id, prompt, opt.prefill_chunk, opt.on_prefill);
    r.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    t0 = Clock::now();
    const SeqId ids[1] = {id};
    for (int i = 0; i < opt.max_new_tokens; ++i) {
      if (i > 0) {
        const token_id prev[1] = {r.tokens.back()};
        logits = decode(ids, prev);
        ++r.decode_steps;
      }
      const token_id next = sample_token(logits, opt.temperature, opt.top_p, rng);
      r.tokens.push_back(next);
      if (opt.on_token) opt.on_token(next);
      if (opt.stop_at_eos && is_eos(next)) {
        r.stopped_at_eos = true;
        break;
      }
    }
    r.decode_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    r.memory = attn_.memory(id);
    r.attention = attn_.totals();
    return r;
  }

  bool is_eos(token_id t) const {
    return std::find(cfg_.eos_token_ids.begin(), cfg_.eos_token_ids.end(), t) != cfg_.eos_token_ids.end();
  }

  /// Bytes of the weights as this backend holds them (float).
  std::size_t weight_bytes() const {
    auto m = [](const Matrix& w) { return Ops::bytes(w); };
    auto v = [](const Buffer& w) { return Ops::bytes(w); };
    std::size_t bytes = m(embed_) + m(lm_head_) + v(final_norm_);
    for (const Layer& L : layers_)
      bytes += m(L.q) + m(L.k) + m(L.v) + m(L.o) + m(L.gate) + m(L.up) + m(L.down) + v(L.input_norm) +
               v(L.post_norm) + v(L.q_bias) + v(L.k_bias) + v(L.v_bias) + v(L.o_bias) + v(L.gate_bias) +
               v(L.up_bias) + v(L.down_bias);
    return bytes;
  }

 private:
  struct Layer {
    Buffer input_norm, post_norm;
    Matrix q, k, v, o, gate, up, down;
    Buffer q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias;
  };

  static int validate(const ModelConfig& cfg, const WeightStore& store, const Config& attention) {
    cfg.validate();
    check_weights(store, cfg);
    attention.validate();
    SHADOWKV_CHECK(attention.num_q_heads == cfg.num_q_heads && attention.num_kv_heads == cfg.num_kv_heads &&
                       attention.head_dim == cfg.head_dim,
                   "attention config (num_q_heads=", attention.num_q_heads, ", num_kv_heads=",
                   attention.num_kv_heads, ", head_dim=", attention.head_dim, ") differs from ", cfg.source,
                   " (", cfg.num_q_heads, ", ", cfg.num_kv_heads, ", ", cfg.head_dim, ")");
    return 0;
  }

  void check_ids(std::span<const token_id> ids) const {
    for (std::size_t i = 0; i < ids.size(); ++i)
      SHADOWKV_CHECK(ids[i] >= 0 && ids[i] < cfg_.vocab_size, "token id ", ids[i], " at position ", i,
                     " is outside the vocabulary [0, vocab_size=", cfg_.vocab_size, ")");
  }

  /// Every layer over the `n` rows of `x_`; `attend(layer, q, k, v, out)` runs attention
  /// (views `[n, H, d]`, q/k before RoPE).
  template <class Attend>
  void run_layers(index_t n, Attend&& attend) {
    const index_t hq = cfg_.num_q_heads, hkv = cfg_.num_kv_heads, d = cfg_.head_dim;
    for (const Layer& L : layers_) {
      const int layer = static_cast<int>(&L - layers_.data());
      ops_.rms_norm(x_, n, L.input_norm, cfg_.rms_norm_eps, h_);
      ops_.linear(h_, n, L.q, L.q_bias, q_);
      ops_.linear(h_, n, L.k, L.k_bias, k_);
      ops_.linear(h_, n, L.v, L.v_bias, v_);
      ops_.resize(attn_out_, static_cast<std::size_t>(n * hq * d));
      attend(layer, TensorView<const float, 3>(ops_.view(q_, n, hq, d)),
             TensorView<const float, 3>(ops_.view(k_, n, hkv, d)),
             TensorView<const float, 3>(ops_.view(v_, n, hkv, d)), ops_.view(attn_out_, n, hq, d));
      ops_.add_linear(attn_out_, n, L.o, L.o_bias, x_);
      ops_.rms_norm(x_, n, L.post_norm, cfg_.rms_norm_eps, h_);
      ops_.linear(h_, n, L.gate, L.gate_bias, gate_);
      ops_.linear(h_, n, L.up, L.up_bias, up_);
      ops_.silu_mul(gate_, up_);
      ops_.add_linear(gate_, n, L.down, L.down_bias, x_);
    }
  }

  /// Final norm + LM head of rows `[row, row + n)` of `x`: `[n, vocab]` on the host.
  std::vector<float> lm_head(const Buffer& x, index_t row, index_t n) {
    ops_.copy_rows(x, cfg_.hidden_size, row, n, h_);
    ops_.rms_norm(h_, n, final_norm_, cfg_.rms_norm_eps, q_);
    ops_.linear(q_, n, cfg_.tie_word_embeddings ? embed_ : lm_head_, Buffer{}, logits_);
    return ops_.to_host(logits_);
  }

  Ops ops_;  // first: destroyed last (on CUDA it owns the stream every buffer below is freed on)
  ModelConfig cfg_;
  Attention attn_;
  AttentionObserver observer_;
  Matrix embed_, lm_head_;
  Buffer final_norm_;
  std::vector<Layer> layers_;
  Buffer x_, h_, q_, k_, v_, attn_out_, gate_, up_, logits_;  // activations, reused
};

}  // namespace shadowkv::model
