// attention_demo: DensePolicy vs ShadowKVPolicy vs OracleTopKPolicy on the CPU over a synthetic
// long prompt with a planted needle.
//
// The prompt is fed the way an engine with its own prefill kernel would: keys and values only,
// in blocks of --prefill-chunk tokens (no prefill attention). Then --steps decode steps run over
// every layer with the same queries for each policy, and the demo reports, per policy:
//   - the relative L2 error of the decode output against DensePolicy,
//   - ShadowKV's chunk recall against the oracle's selection (|S n O| / |O|),
//   - whether the needle chunk was attended (selected, outlier or local),
//   - the value-pool hit rate (steps after the first: the first step starts from an empty pool),
//   - HBM and PCIe bytes per decode step and layer, as the CUDA backend would move them,
//   - device and host bytes of the sequence against the memory planner,
//   - wall time per decode step.
//
// Synthetic data (see SyntheticLayer): pre-RoPE keys are a slowly varying mix of a few shared
// latent directions (all KV heads together) plus small noise, so a low rank captures nearly all
// their energy, as with real pre-RoPE keys; values are i.i.d. One chunk of the prompt (the
// needle) carries an extra key direction in the low-frequency RoPE dimensions, and every decode
// query points at it; the rest of each query drifts slowly from step to step, so consecutive
// steps select similar chunks.

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Dense>
#include <shadowkv/shadowkv.hpp>

#include "synthetic_rng.hpp"

namespace {

using namespace shadowkv;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Options {
  index_t context = 16384;
  int steps = 16;
  int layers = 2;
  int rank = 160;
  int budget = 512;
  int chunk_size = 8;
  std::string outliers = "auto";
  int local_chunks = 4;
  int value_cache = 0;
  std::string dtype = "bf16";
  std::uint64_t seed = 1;
  int q_heads = 32;
  int kv_heads = 8;
  int head_dim = 128;
  index_t prefill_chunk = 4096;
  double needle_at = 0.5;
  double drift = 0.2;
  double needle_logit = 10.0;
  double logit_std = 2.0;
};

// -------------------------------------------------------------------------------------------
// Synthetic data

using shadowkv_examples::Rng;

/// Knobs of the synthetic model (fixed; printed by the demo).
struct SyntheticKnobs {
  int latent_dim = 96;                ///< shared latent directions of the keys (all KV heads)
  double latent_decay = 24.0;         ///< latent j has standard deviation exp(-j / decay)
  double correlation = 0.95;          ///< AR(1) correlation of the latents between tokens
  double key_noise = 0.05;            ///< i.i.d. noise per key element (keys have rms ~1)
  double needle_key = 4.0;            ///< norm of the extra direction of each needle key
  double needle_logit = 10.0;         ///< target q.k/sqrt(d) of the needle at the first step
  double background_logit_std = 2.0;  ///< target spread of q.k/sqrt(d) over the prompt
  double drift = 0.2;                 ///< per-step drift of the non-needle part of a query
  int samples = 512;                  ///< prompt keys kept for calibration and diagnostics
};

/// Rotated pair of dimension `x` (dims >= rotary_dim are not rotated: -1).
int rope_pair(const RopeTable& rope, int x) {
  if (x >= rope.rotary_dim) return -1;
  return rope.layout == RopeLayout::interleaved ? x / 2 : x % (rope.rotary_dim / 2);
}

/// Keys, values and decode queries of one layer, generated as a stream of tokens.
///
/// Keys (pre-RoPE) `k_t = z_t * W + noise`: `z_t` is an AR(1) process over `latent_dim`
/// latents with decaying scales, `W` `[latent_dim, H_kv*d]` is shared by all tokens and puts
/// little energy in the highest-frequency RoPE pairs (so neighbouring tokens stay similar after
/// RoPE and chunks are coherent). The needle chunk adds `needle_key * n_h` to its keys, `n_h` a
/// unit direction per KV head in the lowest-frequency pairs (which RoPE barely turns over the
/// context, so the needle matches a query from any distance). Queries of group `h` are
/// `a * n_h + b_j * u_j`; `u_j` drifts from step to step; `a` and `b_j` are calibrated at the
/// first query so that the needle's logit and the spread of the prompt's logits hit their
/// targets.
template <StorageType T>
class SyntheticLayer {
 public:
  SyntheticLayer(const Config& cfg, const RopeTable& rope, const SyntheticKnobs& knobs,
                 index_t context, index_t horizon, index_t needle_begin, std::uint64_t seed)
      : cfg_(cfg), rope_(rope), knobs_(knobs), rng_(seed), needle_begin_(needle_begin),
        sample_stride_(std::max<index_t>(1, context / knobs.samples)) {
    const int d = cfg.head_dim, kv = cfg.kv_dim();
    latent_ = std::min(knobs.latent_dim, std::max(1, kv / 2));
    // Channel scale per dimension: low-frequency pairs carry the needle, so the background
    // keeps them quiet; the highest-frequency pairs (which turn ~1 rad per token) are damped.
    const int half = rope.rotary_dim / 2;
    std::vector<int> order(half);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return rope.inv_freq[a] < rope.inv_freq[b]; });
    std::vector<char> semantic(half, 0);
    int n_semantic = 0;
    for (int i : order)
      if (rope.inv_freq[i] * static_cast<double>(horizon) < 0.5 || n_semantic < std::min(8, half)) {
        semantic[i] = 1;
        ++n_semantic;
      }
    semantic_pairs_ = n_semantic;
    channel_.assign(d, 1.0f);
    for (int x = 0; x < d; ++x) {
      const int p = rope_pair(rope, x);
      if (p < 0) continue;
      const double turn = 8.0 * rope.inv_freq[p];
      channel_[x] = semantic[p] ? 0.3f : static_cast<float>(1.0 / std::sqrt(1.0 + turn * turn));
    }
    // Latent scales and the mixing matrix, normalised to a mean key element variance of 1.
    sigma_.resize(latent_);
    for (int j = 0; j < latent_; ++j) sigma_[j] = static_cast<float>(std::exp(-j / knobs.latent_decay));
    w_.resize(latent_, kv);
    for (int j = 0; j < latent_; ++j)
      for (int c = 0; c < kv; ++c) w_(j, c) = rng_.normal() * channel_[c % d];
    double var = 0;
    for (int c = 0; c < kv; ++c)
      for (int j = 0; j < latent_; ++j) var += double(sigma_[j]) * sigma_[j] * w_(j, c) * w_(j, c);
    w_ *= static_cast<float>(1.0 / std::sqrt(var / kv));
    z_.resize(latent_);
    for (int j = 0; j < latent_; ++j) z_[j] = sigma_[j] * rng_.normal();
    // Needle direction per KV head: unit, in the semantic pairs only.
    needle_dir_.assign(static_cast<std::size_t>(kv), 0.0f);
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      float* n = needle_dir_.data() + static_cast<std::size_t>(h) * d;
      for (int x = 0; x < d; ++x) {
        const int p = rope_pair(rope, x);
        n[x] = (p >= 0 && semantic[p]) ? rng_.normal() : 0.0f;
      }
      normalize(n, d);
    }
    // Initial non-needle query directions.
    u_.resize(static_cast<std::size_t>(cfg.num_q_heads) * d);
    for (int j = 0; j < cfg.num_q_heads; ++j) random_direction(u_.data() + static_cast<std::size_t>(j) * d);
  }

  /// Number of RoPE pairs the needle direction lives in.
  int semantic_pairs() const { return semantic_pairs_; }

  /// The next `n` tokens: `keys_pre_rope` and `values` `[n, H_kv, d]`.
  void tokens(index_t n, T* keys_pre_rope, T* values) {
    const int kv = cfg_.kv_dim();
    const float rho = static_cast<float>(knobs_.correlation);
    const float innovation = std::sqrt(1.0f - rho * rho);
    cpu::RowMatrixF z(n, latent_);
    for (index_t t = 0; t < n; ++t)
      for (int j = 0; j < latent_; ++j) {
        z_[j] = rho * z_[j] + innovation * sigma_[j] * rng_.normal();
        z(t, j) = z_[j];
      }
    const cpu::RowMatrixF k = z * w_;  // [n, H_kv*d]
    const float noise = static_cast<float>(knobs_.key_noise);
    const float needle = static_cast<float>(knobs_.needle_key);
    std::vector<float> row(kv);
    for (index_t t = 0; t < n; ++t) {
      const index_t pos = pos_ + t;
      const bool in_needle = pos >= needle_begin_ && pos < needle_begin_ + cfg_.chunk_size;
      for (int c = 0; c < kv; ++c) {
        float x = k(t, c) + noise * rng_.unit_uniform();
        if (in_needle) x += needle * needle_dir_[c];
        const T stored = static_cast<T>(x);
        keys_pre_rope[t * kv + c] = stored;
        row[c] = static_cast<float>(stored);
      }
      if (in_needle) needle_keys_.push_back({pos, row});
      else if (pos % sample_stride_ == 0 && static_cast<int>(samples_.size()) < knobs_.samples)
        samples_.push_back({pos, row});
      for (int c = 0; c < kv; ++c) values[t * kv + c] = static_cast<T>(rng_.unit_uniform());
    }
    pos_ += n;
  }

  /// The pre-RoPE query `[H_q, d]` of the decode token at `position` (queries of successive
  /// calls drift; the first call calibrates the scales).
  void query(index_t position, T* q) {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    if (b_.empty()) calibrate(position);
    else drift();
    for (int j = 0; j < cfg_.num_q_heads; ++j) {
      const float* n = needle_dir_.data() + static_cast<std::size_t>(j / g) * d;
      const float* u = u_.data() + static_cast<std::size_t>(j) * d;
      for (int x = 0; x < d; ++x)
        q[static_cast<std::size_t>(j) * d + x] = static_cast<T>(a_ * n[x] + b_[j] * u[x]);
    }
  }

  /// Pre-RoPE prompt keys kept for diagnostics: positions and rows `[H_kv*d]` (as stored in T).
  struct Sample {
    index_t position;
    std::vector<float> key;
  };
  const std::vector<Sample>& samples() const { return samples_; }

  /// Step-0 diagnostics of query head 0 (valid after the first `query`): the needle's mean
  /// logit, and the mean, spread and maximum of the sampled prompt logits.
  struct Calibration {
    double needle_logit = 0, background_mean = 0, background_std = 0, background_max = 0;
  };
  const Calibration& calibration() const { return calibration_; }

 private:
  static void normalize(float* v, int n) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += double(v[i]) * v[i];
    const float inv = s > 0 ? static_cast<float>(1.0 / std::sqrt(s)) : 0.0f;
    for (int i = 0; i < n; ++i) v[i] *= inv;
  }
  void random_direction(float* v) {
    for (int x = 0; x < cfg_.head_dim; ++x) v[x] = rng_.normal() * channel_[x];
    normalize(v, cfg_.head_dim);
  }
  void drift() {
    const int d = cfg_.head_dim;
    std::vector<float> step(d);
    for (int j = 0; j < cfg_.num_q_heads; ++j) {
      float* u = u_.data() + static_cast<std::size_t>(j) * d;
      random_direction(step.data());
      for (int x = 0; x < d; ++x) u[x] += static_cast<float>(knobs_.drift) * step[x];
      normalize(u, d);
    }
  }
  /// Post-RoPE dot product / sqrt(d) of a pre-RoPE query row at `qpos` with the rotated keys.
  std::vector<double> logits(const float* q_pre, index_t qpos, const std::vector<Sample>& keys,
                             int kv_head) const {
    const int d = cfg_.head_dim;
    std::vector<float> q(q_pre, q_pre + d), k(d);
    rope_.apply(q.data(), qpos);
    std::vector<double> out;
    for (const Sample& s : keys) {
      std::copy_n(s.key.data() + static_cast<std::size_t>(kv_head) * d, d, k.data());
      rope_.apply(k.data(), s.position);
      double dot = 0;
      for (int x = 0; x < d; ++x) dot += double(q[x]) * k[x];
      out.push_back(dot * cfg_.scale());
    }
    return out;
  }
  static void moments(const std::vector<double>& x, const std::vector<double>& y, double& vx,
                      double& vy, double& cxy) {
    const double n = static_cast<double>(x.size());
    const double mx = std::accumulate(x.begin(), x.end(), 0.0) / n;
    const double my = std::accumulate(y.begin(), y.end(), 0.0) / n;
    vx = vy = cxy = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      vx += (x[i] - mx) * (x[i] - mx) / n;
      vy += (y[i] - my) * (y[i] - my) / n;
      cxy += (x[i] - mx) * (y[i] - my) / n;
    }
  }
  void calibrate(index_t position) {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    a_ = static_cast<float>(knobs_.needle_logit * std::sqrt(static_cast<double>(d)) / knobs_.needle_key);
    b_.assign(cfg_.num_q_heads, 0.0f);
    const double target = knobs_.background_logit_std * knobs_.background_logit_std;
    if (samples_.empty()) {  // a prompt of needle tokens only: nothing to calibrate against
      b_.assign(cfg_.num_q_heads, static_cast<float>(knobs_.background_logit_std * std::sqrt(double(d))));
      return;
    }
    for (int j = 0; j < cfg_.num_q_heads; ++j) {
      const int h = j / g;
      // Logit = a * X + b * Y over the sampled prompt keys; pick b >= 0 for the target spread.
      const auto x = logits(needle_dir_.data() + static_cast<std::size_t>(h) * d, position, samples_, h);
      const auto y = logits(u_.data() + static_cast<std::size_t>(j) * d, position, samples_, h);
      double vx, vy, cxy;
      moments(x, y, vx, vy, cxy);
      const double a = a_, c0 = a * a * vx - target, c1 = 2 * a * cxy;
      const double disc = c1 * c1 - 4 * vy * c0;
      if (vy > 0 && disc >= 0) b_[j] = static_cast<float>(std::max(0.0, (-c1 + std::sqrt(disc)) / (2 * vy)));
    }
    // Diagnostics of query head 0.
    std::vector<float> q0(d);
    for (int x = 0; x < d; ++x) q0[x] = a_ * needle_dir_[x] + b_[0] * u_[x];
    const auto bg = logits(q0.data(), position, samples_, 0);
    const auto nd = logits(q0.data(), position, needle_keys_, 0);
    double vx, vy, cxy;
    moments(bg, bg, vx, vy, cxy);
    calibration_.background_mean = std::accumulate(bg.begin(), bg.end(), 0.0) / bg.size();
    calibration_.background_std = std::sqrt(vx);
    calibration_.background_max = *std::max_element(bg.begin(), bg.end());
    calibration_.needle_logit = nd.empty() ? 0.0 : std::accumulate(nd.begin(), nd.end(), 0.0) / nd.size();
  }

  Config cfg_;
  RopeTable rope_;
  SyntheticKnobs knobs_;
  Rng rng_;
  index_t needle_begin_, sample_stride_;
  index_t pos_ = 0;
  int latent_ = 0, semantic_pairs_ = 0;
  std::vector<float> channel_, sigma_, z_, needle_dir_, u_, b_;
  cpu::RowMatrixF w_;
  float a_ = 0.0f;
  std::vector<Sample> samples_, needle_keys_;
  Calibration calibration_;
};

// -------------------------------------------------------------------------------------------
// Running the policies

/// Decode inputs of every step and layer, generated once and replayed for each policy.
template <StorageType T>
struct DecodeInputs {
  int steps = 0, layers = 0;
  std::vector<std::vector<T>> q, k, v;  // [step * layers + layer] -> [H, d]
};

/// What one policy produced and cost.
struct PolicyResult {
  std::string name;
  std::vector<std::vector<float>> out;              // [step * layers + layer] -> [H_q * d]
  std::vector<std::vector<std::int32_t>> selected;  // [step * layers + layer] -> [H_kv, k]
  std::vector<std::vector<std::int32_t>> outliers;  // [layer] -> [H_kv, O]
  std::vector<StepStats> stats;                     // [step * layers + layer]
  MemoryUsage memory;
  MemoryPlan plan;
  double build_s = 0, decode_s = 0;
};

template <class Attn>
void finish(Attn& attn, PolicyResult& r) {
  const auto t0 = Clock::now();
  attn.finish_prefill(0);
  r.build_s = seconds_since(t0);
  std::printf("  finish_prefill %-8s %7.2f s\n", r.name.c_str(), r.build_s);
  std::fflush(stdout);
}

template <class Policy, StorageType T>
void decode_all(SparseAttention<Policy, CpuBackend, T>& attn, const DecodeInputs<T>& in,
                index_t context, PolicyResult& r) {
  const Config& cfg = attn.config();
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  const SeqId ids[] = {0};
  std::vector<T> out(static_cast<std::size_t>(hq) * d);
  const auto t0 = Clock::now();
  for (int s = 0; s < in.steps; ++s)
    for (int l = 0; l < in.layers; ++l) {
      const std::size_t i = static_cast<std::size_t>(s) * in.layers + l;
      attn.decode(l, ids, TensorView<const T, 3>(in.q[i].data(), {1, hq, d}),
                  TensorView<const T, 3>(in.k[i].data(), {1, hkv, d}),
                  TensorView<const T, 3>(in.v[i].data(), {1, hkv, d}),
                  TensorView<T, 3>(out.data(), {1, hq, d}));
      r.stats.push_back(attn.last_step());
      r.out.emplace_back(out.size());
      for (std::size_t x = 0; x < out.size(); ++x) r.out.back()[x] = static_cast<float>(out[x]);
      std::vector<std::int32_t> sel;
      for (int h = 0; h < hkv; ++h) {
        const auto ids_h = attn.last_selection(0, l, h);
        sel.insert(sel.end(), ids_h.begin(), ids_h.end());
      }
      r.selected.push_back(std::move(sel));
    }
  r.decode_s = seconds_since(t0);
  for (int l = 0; l < in.layers; ++l) {
    std::vector<std::int32_t> o;
    if (const auto* index = attn.landmark_index(0, l))
      for (int h = 0; h < hkv; ++h) {
        const auto ids_h = index->outlier_chunk_ids(h);
        o.insert(o.end(), ids_h.begin(), ids_h.end());
      }
    r.outliers.push_back(std::move(o));
  }
  r.memory = attn.memory(0);
  r.plan = plan_sequence<Policy>(cfg, attn.num_layers(), context, in.steps, dtype_of<T>());
  std::printf("  decode %-8s %3d steps x %d layers %7.2f s  (%.1f ms/step)\n", r.name.c_str(),
              in.steps, in.layers, r.decode_s, 1e3 * r.decode_s / in.steps);
  std::fflush(stdout);
}

// -------------------------------------------------------------------------------------------
// Reporting

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::abs(b) >= 1024.0 && u < 4) {
    b /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return buf;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

/// Per-policy summary figures.
struct Summary {
  double error = 0, recall = -1, needle = 1, hit_rate = -1;
  double hbm = 0, pcie_cold = 0, pcie_warm = 0, ms_per_step = 0;
};

Summary summarize(const PolicyResult& r, const PolicyResult& dense, const PolicyResult* oracle,
                  const Config& cfg, int steps, int layers, index_t context, index_t needle_chunk,
                  bool sparse) {
  const int hkv = cfg.num_kv_heads;
  Summary s;
  const std::size_t n = r.out.size();
  for (std::size_t i = 0; i < n; ++i) s.error += rel_l2(r.out[i], dense.out[i]) / n;
  for (const StepStats& st : r.stats) s.hbm += static_cast<double>(st.hbm_bytes) / n;
  PoolStats warm;
  for (std::size_t i = 0; i < n; ++i) {
    const bool cold = static_cast<int>(i) < layers;
    (cold ? s.pcie_cold : s.pcie_warm) += static_cast<double>(r.stats[i].pcie_bytes);
    if (!cold) warm += r.stats[i].pool;
  }
  s.pcie_cold /= layers;
  s.pcie_warm = steps > 1 ? s.pcie_warm / ((steps - 1.0) * layers) : 0.0;
  if (warm.requested > 0) s.hit_rate = warm.hit_rate();
  s.ms_per_step = 1e3 * r.decode_s / steps;
  if (!sparse) return s;
  // Recall against the oracle and needle coverage, per (step, layer, KV head).
  const index_t indexed_chunks = context / cfg.chunk_size - cfg.local_chunks;
  double recall = 0;
  std::int64_t found = 0, cases = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const int l = static_cast<int>(i % layers);
    const std::size_t k = r.selected[i].size() / hkv;
    const std::size_t n_out = r.outliers[l].size() / hkv;
    for (int h = 0; h < hkv; ++h) {
      const auto sel = r.selected[i].begin() + h * k;
      if (oracle) {
        const std::size_t ko = oracle->selected[i].size() / hkv;
        const auto ora = oracle->selected[i].begin() + h * ko;
        std::vector<std::int32_t> both;
        std::set_intersection(sel, sel + k, ora, ora + ko, std::back_inserter(both));
        recall += ko ? static_cast<double>(both.size()) / ko : 1.0;
      }
      const auto out = r.outliers[l].begin() + h * n_out;
      const bool attended = needle_chunk >= indexed_chunks || std::binary_search(sel, sel + k, needle_chunk) ||
                            std::binary_search(out, out + n_out, needle_chunk);
      found += attended;
      ++cases;
    }
  }
  if (oracle) s.recall = recall / cases;
  s.needle = static_cast<double>(found) / cases;
  return s;
}

// -------------------------------------------------------------------------------------------

template <StorageType T>
int run(const Options& o) {
  Config cfg;
  cfg.num_q_heads = o.q_heads;
  cfg.num_kv_heads = o.kv_heads;
  cfg.head_dim = o.head_dim;
  cfg.rank = o.rank;
  cfg.chunk_size = o.chunk_size;
  cfg.sparse_budget = o.budget;
  cfg.outlier_chunks = o.outliers == "auto" ? kAutoOutlierChunks : std::stoi(o.outliers);
  cfg.local_chunks = o.local_chunks;
  cfg.value_cache_chunks = o.value_cache;
  cfg.rope = llama31_rope();
  cfg.validate();
  // Validates the context against the static set before anything is generated.
  const MemoryPlan shadow_plan = plan_sequence<ShadowKVPolicy>(cfg, o.layers, o.context, o.steps, dtype_of<T>());
  const MemoryPlan dense_plan = plan_sequence<DensePolicy>(cfg, o.layers, o.context, o.steps, dtype_of<T>());
  const RopeTable rope = make_rope_table(cfg.rope, cfg.head_dim);

  const index_t c = cfg.chunk_size;
  const index_t total_chunks = o.context / c;
  const index_t needle_chunk =
      std::clamp<index_t>(static_cast<index_t>(o.needle_at * static_cast<double>(o.context)) / c, 0,
                          std::max<index_t>(total_chunks - 1, 0));
  SyntheticKnobs knobs;
  knobs.drift = o.drift;
  knobs.needle_logit = o.needle_logit;
  knobs.background_logit_std = o.logit_std;

  std::printf("attention_demo: %s storage, context %lld, %d decode steps, %d layers\n",
              std::string(dtype_name<T>()).c_str(), static_cast<long long>(o.context), o.steps, o.layers);
  std::printf("  heads: %d q / %d kv, head_dim %d; rope: llama3 (theta 5e5, factor 8)\n",
              cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
  std::printf("  shadowkv: rank %d, chunk %d, budget %d tokens (%d chunks), outliers %d chunks, local %d chunks, "
              "value cache %d chunks/head\n",
              cfg.rank, cfg.chunk_size, cfg.sparse_budget, cfg.budget_chunks(), cfg.resolved_outlier_chunks(),
              cfg.local_chunks, cfg.resolved_value_cache_chunks());
  std::printf("  planner (per sequence): dense %s device; shadowkv %s device + %s host\n",
              human_bytes(static_cast<double>(dense_plan.device_bytes)).c_str(),
              human_bytes(static_cast<double>(shadow_plan.device_bytes)).c_str(),
              human_bytes(static_cast<double>(shadow_plan.host_bytes)).c_str());
  std::printf("  synthetic keys: %d shared latents (decay %.0f, AR(1) %.2f), noise %.2f; needle = chunk %lld "
              "(tokens %lld..%lld), query drift %.2f/step, seed %llu\n",
              std::min(knobs.latent_dim, std::max(1, cfg.kv_dim() / 2)), knobs.latent_decay, knobs.correlation,
              knobs.key_noise, static_cast<long long>(needle_chunk), static_cast<long long>(needle_chunk * c),
              static_cast<long long>(needle_chunk * c + c - 1), knobs.drift,
              static_cast<unsigned long long>(o.seed));
  std::fflush(stdout);

  std::vector<SyntheticLayer<T>> gens;
  for (int l = 0; l < o.layers; ++l)
    gens.emplace_back(cfg, rope, knobs, o.context, o.context + o.steps, needle_chunk * c,
                      o.seed * 0x100000001B3ull + static_cast<std::uint64_t>(l));

  SparseAttention<DensePolicy, CpuBackend, T> dense(cfg, o.layers);
  SparseAttention<ShadowKVPolicy, CpuBackend, T> shadow(cfg, o.layers);
  SparseAttention<OracleTopKPolicy, CpuBackend, T> oracle(cfg, o.layers);
  PolicyResult r_dense, r_shadow, r_oracle;
  r_dense.name = "dense";
  r_shadow.name = "shadowkv";
  r_oracle.name = "oracle";
  dense.add_sequence(0);
  shadow.add_sequence(0);
  oracle.add_sequence(0);

  // Prefill: keys and values only, block by block, every layer, every policy.
  {
    const auto t0 = Clock::now();
    const std::size_t row = static_cast<std::size_t>(cfg.kv_dim());
    std::vector<T> k, v;
    for (index_t b = 0; b < o.context; b += o.prefill_chunk) {
      const index_t n = std::min(o.prefill_chunk, o.context - b);
      k.resize(n * row);
      v.resize(n * row);
      for (int l = 0; l < o.layers; ++l) {
        gens[l].tokens(n, k.data(), v.data());
        const TensorView<const T, 3> kv_k(k.data(), {n, cfg.num_kv_heads, cfg.head_dim});
        const TensorView<const T, 3> kv_v(v.data(), {n, cfg.num_kv_heads, cfg.head_dim});
        dense.prefill(0, l, {}, kv_k, kv_v, {});
        shadow.prefill(0, l, {}, kv_k, kv_v, {});
        oracle.prefill(0, l, {}, kv_k, kv_v, {});
      }
      std::printf("  prefill ingest %6lld/%lld tokens %7.2f s\n", static_cast<long long>(b + n),
                  static_cast<long long>(o.context), seconds_since(t0));
      std::fflush(stdout);
    }
  }
  finish(dense, r_dense);
  finish(shadow, r_shadow);
  finish(oracle, r_oracle);

  // Low-rank key error on the sampled prompt rows (pre-RoPE, all KV heads).
  {
    double num = 0, den = 0;
    std::size_t n_rows = 0;
    const int d = cfg.head_dim;
    for (int l = 0; l < o.layers; ++l) {
      // The store holds the indexed region only (the local window stays exact).
      const auto* store = shadow.key_store(0, l);
      std::vector<const typename SyntheticLayer<T>::Sample*> samples;
      std::vector<index_t> pos;
      for (const auto& s : gens[l].samples())
        if (s.position < store->size()) {
          samples.push_back(&s);
          pos.push_back(s.position);
        }
      n_rows = pos.size();
      std::vector<float> rebuilt(pos.size() * d);
      for (int h = 0; h < cfg.num_kv_heads; ++h) {
        store->reconstruct(h, pos, rebuilt.data());
        for (std::size_t i = 0; i < pos.size(); ++i)
          for (int x = 0; x < d; ++x) {
            const double ref = samples[i]->key[static_cast<std::size_t>(h) * d + x];
            num += (rebuilt[i * d + x] - ref) * (rebuilt[i * d + x] - ref);
            den += ref * ref;
          }
      }
    }
    std::printf("  low-rank keys (rank %d of %d): relative error %.2e on %zu sampled prompt rows/layer\n",
                cfg.rank, cfg.kv_dim(), std::sqrt(num / std::max(den, 1e-30)), n_rows);
  }

  // Decode inputs, generated once.
  DecodeInputs<T> in;
  in.steps = o.steps;
  in.layers = o.layers;
  for (int s = 0; s < o.steps; ++s)
    for (int l = 0; l < o.layers; ++l) {
      std::vector<T> q(static_cast<std::size_t>(cfg.num_q_heads) * cfg.head_dim), k(cfg.kv_dim()), v(cfg.kv_dim());
      gens[l].tokens(1, k.data(), v.data());
      gens[l].query(o.context + s, q.data());
      in.q.push_back(std::move(q));
      in.k.push_back(std::move(k));
      in.v.push_back(std::move(v));
    }
  {
    const auto& cal = gens[0].calibration();
    std::printf("  step-0 logits q.k/sqrt(d) (layer 0, q head 0): needle %.1f; prompt mean %.1f, std %.1f, "
                "max %.1f over %zu samples; needle pairs %d of %d\n",
                cal.needle_logit, cal.background_mean, cal.background_std, cal.background_max,
                gens[0].samples().size(), gens[0].semantic_pairs(), rope.rotary_dim / 2);
    std::fflush(stdout);
  }

  decode_all(dense, in, o.context, r_dense);
  decode_all(shadow, in, o.context, r_shadow);
  decode_all(oracle, in, o.context, r_oracle);

  const Summary s_dense = summarize(r_dense, r_dense, nullptr, cfg, o.steps, o.layers, o.context, needle_chunk, false);
  const Summary s_shadow = summarize(r_shadow, r_dense, &r_oracle, cfg, o.steps, o.layers, o.context, needle_chunk, true);
  const Summary s_oracle = summarize(r_oracle, r_dense, &r_oracle, cfg, o.steps, o.layers, o.context, needle_chunk, true);

  std::printf("\nshadowkv / dense: HBM bytes per step %.3fx (%.1fx fewer), wall time per step %.3fx (%.1fx faster) "
              "on this CPU\n",
              s_shadow.hbm / std::max(s_dense.hbm, 1.0), s_dense.hbm / std::max(s_shadow.hbm, 1.0),
              s_shadow.ms_per_step / std::max(s_dense.ms_per_step, 1e-9),
              s_dense.ms_per_step / std::max(s_shadow.ms_per_step, 1e-9));
  std::printf("\n  err       mean relative L2 error of the decode output against dense (%d steps x %d layers)\n"
              "  recall    |S n O| / |O|, S ShadowKV's chunks, O the oracle's; mean over steps, layers, KV heads\n"
              "  needle    share of (step, layer, KV head) whose attended set held the needle chunk\n"
              "            (selected, outlier or local)\n"
              "  hit rate  value-pool hits / chunks requested over steps 2..%d; step 1 starts from an empty pool\n"
              "  HBM, PCIe bytes of one layer's decode step as the CUDA backend would move them (last_step());\n"
              "            PCIe: step 1 / mean of later steps\n"
              "  device, host  memory(id) after decode; plan: equal to plan_sequence<Policy>\n\n",
              o.steps, o.layers, o.steps);
  std::printf("%-9s %9s %7s %7s %8s %10s %21s %10s %10s %5s %9s\n", "policy", "err", "recall", "needle",
              "hit rate", "HBM/step", "PCIe/step 1st/later", "device", "host", "plan", "ms/step");
  auto line = [&](const PolicyResult& r, const Summary& s) {
    char err[16], rec[16], hit[16], pcie[40];
    std::snprintf(err, sizeof err, &r == &r_dense ? "(ref)" : "%.2e", s.error);
    std::snprintf(rec, sizeof rec, s.recall < 0 ? "-" : "%.1f%%", 100 * s.recall);
    std::snprintf(hit, sizeof hit, s.hit_rate < 0 ? "-" : "%.1f%%", 100 * s.hit_rate);
    std::snprintf(pcie, sizeof pcie, "%s / %s", human_bytes(s.pcie_cold).c_str(), human_bytes(s.pcie_warm).c_str());
    const bool planned = r.memory.device_bytes == r.plan.device_bytes && r.memory.host_bytes == r.plan.host_bytes;
    std::printf("%-9s %9s %7s %6.0f%% %8s %10s %21s %10s %10s %5s %9.1f\n", r.name.c_str(), err, rec,
                100 * s.needle, hit, human_bytes(s.hbm).c_str(), pcie,
                human_bytes(static_cast<double>(r.memory.device_bytes)).c_str(),
                human_bytes(static_cast<double>(r.memory.host_bytes)).c_str(), planned ? "=" : "DIFF",
                s.ms_per_step);
    if (!planned)
      std::printf("%-9s planner: device %zu B, host %zu B; actual: device %zu B, host %zu B\n", "",
                  r.plan.device_bytes, r.plan.host_bytes, r.memory.device_bytes, r.memory.host_bytes);
  };
  line(r_dense, s_dense);
  line(r_shadow, s_shadow);
  line(r_oracle, s_oracle);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"ShadowKV attention demo: dense vs ShadowKV vs oracle top-k on the CPU, synthetic "
               "long prompt with a planted needle"};
  app.add_option("--context", o.context, "prompt tokens")->check(CLI::Range(index_t{1}, index_t{1} << 30))->capture_default_str();
  app.add_option("--steps", o.steps, "decode steps")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  app.add_option("--layers", o.layers, "attention layers")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--rank", o.rank, "rank of the low-rank pre-RoPE keys")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--budget", o.budget, "sparse budget in tokens per KV head (a multiple of --chunk-size)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunk-size", o.chunk_size, "tokens per chunk")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--outliers", o.outliers, "outlier chunks per KV head, or 'auto' (24 per 1024 tokens of budget)")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            if (s == "auto") return {};
            std::size_t used = 0;
            try {
              const long v = std::stol(s, &used);
              if (used == s.size() && v >= 0 && v <= (1l << 30)) return {};
            } catch (const std::exception&) {
            }
            return "must be 'auto' or a non-negative integer, got '" + s + "'";
          },
          "auto|INT", "outliers"))
      ->capture_default_str();
  app.add_option("--local-chunks", o.local_chunks, "exact chunks at the end of the prompt")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--value-cache", o.value_cache, "device value slots per KV head in chunks (0: the budget)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--dtype", o.dtype, "storage type")->check(CLI::IsMember({"fp32", "bf16"}))->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the synthetic data")->capture_default_str();
  app.add_option("--q-heads", o.q_heads, "query heads")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--kv-heads", o.kv_heads, "KV heads")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--head-dim", o.head_dim, "head dim (64, 96, 128 or 256)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--prefill-chunk", o.prefill_chunk, "prompt tokens per prefill call")
      ->check(CLI::Range(index_t{1}, index_t{1} << 30))->capture_default_str();
  app.add_option("--needle-at", o.needle_at, "needle position as a fraction of the context")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  app.add_option("--drift", o.drift, "per-step drift of the decode queries (0: the same direction every step)")
      ->check(CLI::Range(0.0, 100.0))->capture_default_str();
  app.add_option("--needle-logit", o.needle_logit, "target logit q.k/sqrt(d) of the needle at the first step")
      ->check(CLI::Range(-100.0, 100.0))->capture_default_str();
  app.add_option("--logit-std", o.logit_std, "target spread of the prompt's logits q.k/sqrt(d)")
      ->check(CLI::Range(0.0, 100.0))->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints the help, or the error naming the option
    return rc == 0 ? 0 : 2;
  }
  try {
    return o.dtype == "fp32" ? run<float>(o) : run<bf16>(o);
  } catch (const shadowkv::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
