// bench_decode_cpu: one decode step of one layer on the CPU backend, batch 1, Llama-3.1-8B
// attention shapes (32 q heads, 8 KV heads, head dim 128), bf16 storage, at 8K and 32K context:
// DensePolicy vs ShadowKVPolicy (rank 160, budget 2048, chunk 8, other knobs at their defaults).
//
// ShadowKV query modes:
//   repeat  the same pre-RoPE query every step (the position still advances by one per step, so
//           RoPE turns the post-RoPE query a little; the hit rate counter says what that gives);
//   drift   a slowly drifting query (as a real decode), part of the selection changes per step;
//   fresh   an independent random query every step: nearly every chunk is a miss.
//
// Setup (synthetic prompt ingested without prefill attention, finish_prefill) runs once per
// (policy, context) and is cached across benchmarks and repetitions; it is not timed. Every
// decode step appends its token, so the sequence grows by one token per iteration (plus one
// untimed warm-up step per benchmark): iteration counts are fixed and small, so the context
// grows by well under 1% over a whole run (the `context` counter reports the length at the end).
//
// Counters (per decode step of one layer): hbm_bytes and pcie_bytes as the CUDA backend would
// move them (StepStats), hbm_Bps / pcie_Bps the same divided by the measured CPU step time,
// hit_rate the value-pool hit rate over the timed steps.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.hpp>

#include "../examples/synthetic_rng.hpp"

namespace {

using namespace shadowkv;
using T = bf16;

Config llama_config() {
  Config cfg;  // 32 q heads, 8 KV heads, d 128, rank 160, chunk 8, budget 2048: the defaults
  cfg.rope = llama31_rope();
  cfg.validate();
  return cfg;
}

using shadowkv_examples::Rng;

/// Token stream of one layer: pre-RoPE keys from 96 shared latents (AR(1) over tokens,
/// decaying scales, highest-frequency RoPE pairs damped) plus small noise, i.i.d. values, and
/// queries whose logits over the prompt have a spread of ~2 (calibrated on sampled keys).
class Synthetic {
 public:
  Synthetic(const Config& cfg, const RopeTable& rope, std::uint64_t seed)
      : cfg_(cfg), rope_(rope), rng_(seed) {
    const int d = cfg.head_dim, kv = cfg.kv_dim();
    channel_.assign(d, 1.0f);
    for (int x = 0; x < rope.rotary_dim; ++x) {
      const double turn = 8.0 * rope.inv_freq[x % (rope.rotary_dim / 2)];
      channel_[x] = static_cast<float>(1.0 / std::sqrt(1.0 + turn * turn));
    }
    sigma_.resize(kLatent);
    for (int j = 0; j < kLatent; ++j) sigma_[j] = std::exp(-j / 24.0f);
    w_.resize(kLatent, kv);
    double var = 0;
    for (int j = 0; j < kLatent; ++j)
      for (int c = 0; c < kv; ++c) {
        w_(j, c) = rng_.normal() * channel_[c % d];
        var += double(sigma_[j]) * sigma_[j] * w_(j, c) * w_(j, c);
      }
    w_ *= static_cast<float>(1.0 / std::sqrt(var / kv));
    z_.resize(kLatent);
    for (int j = 0; j < kLatent; ++j) z_[j] = sigma_[j] * rng_.normal();
  }

  /// Next `n` tokens: keys (pre-RoPE) and values `[n, H_kv, d]`.
  void tokens(index_t n, T* keys, T* values) {
    const int kv = cfg_.kv_dim();
    cpu::RowMatrixF z(n, kLatent);
    for (index_t t = 0; t < n; ++t)
      for (int j = 0; j < kLatent; ++j) {
        z_[j] = 0.95f * z_[j] + 0.3122499f * sigma_[j] * rng_.normal();
        z(t, j) = z_[j];
      }
    const cpu::RowMatrixF k = z * w_;
    for (index_t t = 0; t < n; ++t) {
      const index_t pos = pos_ + t;
      for (int c = 0; c < kv; ++c) {
        keys[t * kv + c] = static_cast<T>(k(t, c) + 0.05f * rng_.unit_uniform());
        values[t * kv + c] = static_cast<T>(rng_.unit_uniform());
      }
      if (pos % 128 == 0 && samples_.size() < 256) {  // post-RoPE copies for the calibration
        std::vector<float> row(kv);
        for (int c = 0; c < kv; ++c) row[c] = static_cast<float>(keys[t * kv + c]);
        for (int h = 0; h < cfg_.num_kv_heads; ++h) rope_.apply(row.data() + h * cfg_.head_dim, pos);
        samples_.push_back(std::move(row));
      }
    }
    pos_ += n;
  }

  /// A random unit direction per query head, `[H_q, d]`, channel-weighted like the keys.
  std::vector<float> direction() {
    std::vector<float> u(static_cast<std::size_t>(cfg_.num_q_heads) * cfg_.head_dim);
    for (int j = 0; j < cfg_.num_q_heads; ++j) unit(u.data() + j * cfg_.head_dim);
    return u;
  }
  /// `u` moved by `step` towards a random direction, renormalised per head.
  void drift(std::vector<float>& u, float step) {
    const std::vector<float> e = direction();
    for (std::size_t i = 0; i < u.size(); ++i) u[i] += step * e[i];
    for (int j = 0; j < cfg_.num_q_heads; ++j) normalize(u.data() + j * cfg_.head_dim);
  }
  /// Query `[H_q, d]` in T from unit directions `u` at `position`, scaled so that its logits
  /// over the sampled prompt keys have a standard deviation of 2.
  std::vector<T> query(const std::vector<float>& u, index_t position) const {
    const int d = cfg_.head_dim, g = cfg_.group_size();
    std::vector<T> q(u.size());
    std::vector<float> r(d);
    for (int j = 0; j < cfg_.num_q_heads; ++j) {
      std::copy_n(u.data() + j * d, d, r.data());
      rope_.apply(r.data(), position);
      double s = 0, s2 = 0;
      for (const auto& k : samples_) {
        double dot = 0;
        for (int x = 0; x < d; ++x) dot += double(r[x]) * k[(j / g) * d + x];
        dot *= cfg_.scale();
        s += dot;
        s2 += dot * dot;
      }
      const double n = static_cast<double>(samples_.size());
      const double sd = std::sqrt(std::max(s2 / n - (s / n) * (s / n), 1e-12));
      for (int x = 0; x < d; ++x) q[j * d + x] = static_cast<T>(u[j * d + x] * (2.0 / sd));
    }
    return q;
  }

 private:
  static constexpr int kLatent = 96;
  void normalize(float* v) const {
    double s = 0;
    for (int x = 0; x < cfg_.head_dim; ++x) s += double(v[x]) * v[x];
    for (int x = 0; x < cfg_.head_dim; ++x) v[x] = static_cast<float>(v[x] / std::sqrt(s));
  }
  void unit(float* v) {
    for (int x = 0; x < cfg_.head_dim; ++x) v[x] = rng_.normal() * channel_[x];
    normalize(v);
  }

  Config cfg_;
  RopeTable rope_;
  Rng rng_;
  index_t pos_ = 0;
  std::vector<float> channel_, sigma_, z_;
  cpu::RowMatrixF w_;
  std::vector<std::vector<float>> samples_;
};

/// A prefilled single-layer sequence (id 0) and its token stream, built once per
/// (policy, context).
template <class Policy>
struct Prefilled {
  Prefilled(const Config& cfg, index_t context)
      : attn(cfg, 1), gen(cfg, attn.rope(), 0x5eed + static_cast<std::uint64_t>(context)) {
    const auto t0 = std::chrono::steady_clock::now();
    attn.add_sequence(0);
    constexpr index_t kBlock = 4096;
    std::vector<T> k, v;
    for (index_t b = 0; b < context; b += kBlock) {
      const index_t n = std::min(kBlock, context - b);
      k.resize(n * cfg.kv_dim());
      v.resize(n * cfg.kv_dim());
      gen.tokens(n, k.data(), v.data());
      attn.prefill(0, 0, {}, TensorView<const T, 3>(k.data(), {n, cfg.num_kv_heads, cfg.head_dim}),
                   TensorView<const T, 3>(v.data(), {n, cfg.num_kv_heads, cfg.head_dim}), {});
    }
    attn.finish_prefill(0);
    std::fprintf(stderr, "[setup] %s, context %lld: %.1f s\n", std::string(Policy::name).c_str(),
                 static_cast<long long>(context),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  SparseAttention<Policy, CpuBackend, T> attn;
  Synthetic gen;
};

template <class Policy>
Prefilled<Policy>& prefilled(index_t context) {
  static std::map<index_t, std::unique_ptr<Prefilled<Policy>>> cache;
  auto& slot = cache[context];
  if (!slot) slot = std::make_unique<Prefilled<Policy>>(llama_config(), context);
  return *slot;
}

enum class QueryMode { repeat, drift, fresh };

template <class Policy>
void bm_decode(benchmark::State& state, QueryMode mode) {
  Prefilled<Policy>& p = prefilled<Policy>(state.range(0));
  auto& attn = p.attn;
  const Config& cfg = attn.config();
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  // Inputs of every step (one warm-up + the timed ones), made before the clock starts.
  const std::int64_t steps = static_cast<std::int64_t>(state.max_iterations) + 1;
  const index_t first = attn.length(0);
  std::vector<std::vector<T>> q, k, v;
  std::vector<float> u = p.gen.direction();
  for (std::int64_t s = 0; s < steps; ++s) {
    if (s > 0 && mode == QueryMode::drift) p.gen.drift(u, 0.1f);
    if (s > 0 && mode == QueryMode::fresh) u = p.gen.direction();
    // repeat: the first step's scaled pre-RoPE query, unchanged.
    q.push_back(mode == QueryMode::repeat && s > 0 ? q.front() : p.gen.query(u, first + s));
    k.emplace_back(cfg.kv_dim());
    v.emplace_back(cfg.kv_dim());
    p.gen.tokens(1, k.back().data(), v.back().data());
  }
  std::vector<T> out(static_cast<std::size_t>(hq) * d);
  const SeqId ids[] = {0};
  auto step = [&](std::int64_t s) {
    attn.decode(0, ids, TensorView<const T, 3>(q[s].data(), {1, hq, d}),
                TensorView<const T, 3>(k[s].data(), {1, hkv, d}),
                TensorView<const T, 3>(v[s].data(), {1, hkv, d}), TensorView<T, 3>(out.data(), {1, hq, d}));
  };
  step(0);  // warm-up: the pool now holds this mode's selection
  std::int64_t s = 1;
  double hbm = 0, pcie = 0;
  PoolStats pool;
  for (auto _ : state) {
    step(s++);
    benchmark::DoNotOptimize(out.data());
    hbm += static_cast<double>(attn.last_step().hbm_bytes);
    pcie += static_cast<double>(attn.last_step().pcie_bytes);
    pool += attn.last_step().pool;
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["hbm_bytes"] = benchmark::Counter(hbm / n);
  state.counters["pcie_bytes"] = benchmark::Counter(pcie / n);
  state.counters["hbm_Bps"] = benchmark::Counter(hbm / n, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pcie_Bps"] = benchmark::Counter(pcie / n, benchmark::Counter::kIsIterationInvariantRate);
  if (pool.requested > 0) state.counters["hit_rate"] = pool.hit_rate();
  state.counters["context"] = static_cast<double>(attn.length(0));
}

/// The ceiling the decode steps are compared with: one core streaming a 1 GiB float buffer
/// (far larger than any cache) from memory. A decode step's floor is its bytes / this rate.
void bm_memory_read(benchmark::State& state) {
  const std::size_t n = std::size_t{256} << 20;  // 256 Mi floats = 1 GiB
  std::vector<float> buf(n);
  for (std::size_t i = 0; i < n; ++i) buf[i] = static_cast<float>(i % 1024) * 0.001f;
  for (auto _ : state) {
    float acc[16] = {};
    for (std::size_t i = 0; i < n; i += 16)
      for (int j = 0; j < 16; ++j) acc[j] += buf[i + j];
    benchmark::DoNotOptimize(acc);
  }
  state.counters["read_Bps"] = benchmark::Counter(static_cast<double>(n * sizeof(float)),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("shapes", "32 q heads, 8 kv heads, head_dim 128, batch 1, one layer");
  benchmark::AddCustomContext("storage", "bf16 (CPU backend, float arithmetic)");
  benchmark::AddCustomContext("shadowkv", "rank 160, budget 2048, chunk 8, 48 outlier + 4 local chunks");
  // Fixed, small iteration counts: each step appends a token (see the file comment).
  struct Case {
    const char* name;
    void (*fn)(benchmark::State&, QueryMode);
    QueryMode mode;
    int iterations;
  };
  const Case cases[] = {
      {"decode/dense", bm_decode<DensePolicy>, QueryMode::fresh, 20},
      {"decode/shadowkv_repeat", bm_decode<ShadowKVPolicy>, QueryMode::repeat, 50},
      {"decode/shadowkv_drift", bm_decode<ShadowKVPolicy>, QueryMode::drift, 50},
      {"decode/shadowkv_fresh", bm_decode<ShadowKVPolicy>, QueryMode::fresh, 20},
  };
  benchmark::RegisterBenchmark("memory/read_fp32_1GiB", bm_memory_read)->Iterations(5)->Unit(benchmark::kMillisecond);
  for (const Case& c : cases)
    benchmark::RegisterBenchmark(c.name, c.fn, c.mode)
        ->ArgName("context")
        ->Arg(8192)
        ->Arg(32768)
        ->Iterations(c.iterations)
        ->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
