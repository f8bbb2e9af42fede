#pragma once
// The accuracy harness (issue 7) as a template over the backend: accuracy.cpp holds the command
// line and the CPU run, accuracy_cuda.cu the CUDA run (nvcc, when the build has CUDA).
//
// Per context length, one dense `Decoder` runs each test prompt; its observer hands every
// layer's keys and values to the attention states of the other configurations (ShadowKV and
// oracle at each budget, the rank sweep, outliers off), which then build their own state
// (`finish_prefill`) — the prompt pass is exact attention for every policy, so it is shared.
// Each configuration then decodes greedily from the same first token and is right when it
// emits exactly the answer's digits and eos. Attention-level figures run the same way with the
// dense model's own queries, keys and values fed to every configuration at each decode step
// (teacher forcing): output error against dense, chunk recall against the oracle, hit rate.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <shadowkv/model/decoder.hpp>

#include "../examples/retrieval_tasks.hpp"

namespace shadowkv_bench::accuracy {

using namespace shadowkv;
using namespace shadowkv::model;
using shadowkv_examples::RetrievalCase;
using shadowkv_examples::RetrievalTasks;

struct Options {
  std::string model, device = "auto", json_out;
  std::vector<std::string> tasks;
  std::vector<std::int64_t> lengths{2048, 4096, 8192, 16384};
  int cases = 100;
  std::vector<double> budgets{1.5625, 3.125, 6.25};  ///< percent of the context
  int rank = 0;                                     ///< 0: 15.625% of H_kv * d (the paper's 160 / 1024)
  std::vector<int> rank_sweep{8, 16, 24, 40, 64, 128};
  std::int64_t sweep_length = 8192;  ///< rank sweep and outlier ablation at this length (0: none)
  double sweep_budget = 6.25;
  std::int64_t attention_length = 8192;  ///< attention-level figures at this length (0: none)
  int attention_cases = 20;
  int chunk_size = 8, local_chunks = 4;
  index_t prefill_chunk = 2048;
  std::uint64_t seed = 20261125;
  std::string command, device_name;
};

/// One attention configuration.
struct Spec {
  std::string policy;  ///< dense, shadowkv, oracle
  int budget_tokens = 0, rank = 0;
  bool outliers = true;
  std::string group;  ///< "grid", "rank-sweep" or "outliers"
  bool operator<(const Spec& o) const {
    return std::tie(policy, budget_tokens, rank, outliers) < std::tie(o.policy, o.budget_tokens, o.rank, o.outliers);
  }
};

inline int budget_tokens(double percent, std::int64_t length, int chunk) {
  const double tokens = percent / 100.0 * static_cast<double>(length) / chunk;
  return static_cast<int>(std::max<std::int64_t>(1, std::llround(tokens))) * chunk;
}

inline int default_rank(const ModelConfig& cfg) {
  return std::max(1, static_cast<int>(std::lround(0.15625 * cfg.num_kv_heads * cfg.head_dim)));
}

/// The configurations measured at `length` (dense first).
inline std::vector<Spec> specs_for(const Options& o, const ModelConfig& cfg, std::int64_t length) {
  const int rank = o.rank > 0 ? o.rank : default_rank(cfg);
  std::set<Spec> seen;
  std::vector<Spec> out;
  auto add = [&](Spec s) {
    if (seen.insert(s).second) out.push_back(std::move(s));
  };
  add({"dense", 0, 0, true, "grid"});
  for (double b : o.budgets) {
    add({"shadowkv", budget_tokens(b, length, o.chunk_size), rank, true, "grid"});
    add({"oracle", budget_tokens(b, length, o.chunk_size), 0, true, "grid"});
  }
  if (length == o.sweep_length) {
    const int b = budget_tokens(o.sweep_budget, length, o.chunk_size);
    for (int r : o.rank_sweep) add({"shadowkv", b, r, true, "rank-sweep"});  // <= H_kv*d: checked by the caller
    add({"shadowkv", b, rank, false, "outliers"});
    add({"oracle", b, 0, false, "outliers"});
  }
  return out;
}

template <Backend B>
using ArgsOf = decltype(std::declval<const LinearOps<B>&>().attention_args());

/// A decoder of one configuration behind a policy-free interface.
template <Backend B>
struct Runner {
  using Args = ArgsOf<B>;
  Spec spec;
  explicit Runner(Spec s) : spec(std::move(s)) {}
  virtual ~Runner() = default;
  virtual void add(SeqId id) = 0;
  virtual void remove(SeqId id) = 0;
  virtual void take_prefill(SeqId id, int layer, TensorView<const float, 3> k, TensorView<const float, 3> v,
                            const Args& a) = 0;
  virtual void finish(SeqId id, const Args& a) = 0;
  virtual std::vector<float> decode(SeqId id, token_id t) = 0;
  virtual void decode_layer(int layer, std::span<const SeqId> ids, TensorView<const float, 3> q,
                            TensorView<const float, 3> k, TensorView<const float, 3> v, TensorView<float, 3> out,
                            const Args& a) = 0;
  virtual std::vector<std::int32_t> selection(SeqId id, int layer, int kv_head, const Args& a) const = 0;
  virtual PoolStats last_pool() const = 0;
};

template <AttentionPolicy P, Backend B>
struct RunnerOf final : Runner<B> {
  using Args = ArgsOf<B>;
  Decoder<P, B> dec;
  RunnerOf(Spec s, const ModelConfig& cfg, const WeightStore& store, const Config& knobs)
      : Runner<B>(std::move(s)), dec(cfg, store, knobs) {}
  void add(SeqId id) override { dec.add_sequence(id); }
  void remove(SeqId id) override { dec.remove_sequence(id); }
  void take_prefill(SeqId id, int layer, TensorView<const float, 3> k, TensorView<const float, 3> v,
                    const Args& a) override {
    std::apply([&](auto... x) { dec.attention().prefill(id, layer, {}, k, v, {}, x...); }, a);
  }
  void finish(SeqId id, const Args& a) override {
    std::apply([&](auto... x) { dec.attention().finish_prefill(id, x...); }, a);
  }
  std::vector<float> decode(SeqId id, token_id t) override {
    const SeqId ids[1] = {id};
    const token_id tokens[1] = {t};
    return dec.decode(ids, tokens);
  }
  void decode_layer(int layer, std::span<const SeqId> ids, TensorView<const float, 3> q, TensorView<const float, 3> k,
                    TensorView<const float, 3> v, TensorView<float, 3> out, const Args& a) override {
    std::apply([&](auto... x) { dec.attention().decode(layer, ids, q, k, v, out, x...); }, a);
  }
  std::vector<std::int32_t> selection(SeqId id, int layer, int kv_head, const Args& a) const override {
    return std::apply(
        [&](auto... x) {
          const auto sel = dec.attention().last_selection(id, layer, kv_head, x...);
          return std::vector<std::int32_t>(sel.begin(), sel.end());
        },
        a);
  }
  PoolStats last_pool() const override { return dec.attention().last_step().pool; }
};

template <Backend B>
std::unique_ptr<Runner<B>> make_runner(const Spec& s, const Options& o, const ModelConfig& cfg,
                                       const WeightStore& store) {
  Config k = cfg.attention_config();
  k.chunk_size = o.chunk_size;
  k.local_chunks = o.local_chunks;
  k.rank = s.rank > 0 ? s.rank : k.kv_dim();
  k.sparse_budget = std::max(s.budget_tokens, o.chunk_size);
  k.outlier_chunks = s.outliers ? kAutoOutlierChunks : 0;
  if (s.policy == "shadowkv") return std::make_unique<RunnerOf<ShadowKVPolicy, B>>(s, cfg, store, k);
  if (s.policy == "oracle") return std::make_unique<RunnerOf<OracleTopKPolicy, B>>(s, cfg, store, k);
  return std::make_unique<RunnerOf<DensePolicy, B>>(s, cfg, store, k);
}

template <Backend B>
using Runners = std::vector<std::unique_ptr<Runner<B>>>;

/// Adds `id` everywhere and runs `prompt` once through `lead`, whose observer hands the keys and
/// values to `runners`; each runner then builds its state. \return the last prompt logits
template <Backend B>
std::vector<float> prefill_all(Decoder<DensePolicy, B>& lead, Runners<B>& runners, SeqId id,
                               const std::vector<token_id>& prompt, index_t chunk) {
  lead.add_sequence(id);
  for (auto& r : runners) r->add(id);
  std::vector<float> last = lead.prefill(id, prompt, chunk);
  for (auto& r : runners) r->finish(id, lead.attention_args());
  return last;
}

template <Backend B>
void remove_all(Decoder<DensePolicy, B>& lead, Runners<B>& runners, SeqId id) {
  lead.remove_sequence(id);
  for (auto& r : runners) r->remove(id);
}

inline token_id argmax(const std::vector<float>& logits) {
  return static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

/// Greedy decode from `first` (the prompt's next token); true when it emits exactly `answer`.
template <class Decode>
bool greedy_matches(token_id first, const std::vector<token_id>& answer, Decode&& decode) {
  token_id t = first;
  for (std::size_t i = 0;; ++i) {
    if (t != answer[i]) return false;
    if (i + 1 == answer.size()) return true;
    t = argmax(decode(t));
  }
}

inline std::uint64_t case_seed(std::uint64_t seed, const std::string& task, std::int64_t length, int i) {
  std::uint64_t h = seed ^ 0x5A17ED5EEDull;
  for (unsigned char c : task) h = (h ^ c) * 0x100000001B3ull;
  h = (h ^ static_cast<std::uint64_t>(length)) * 0x9E3779B97F4A7C15ull;
  return (h ^ static_cast<std::uint64_t>(i)) * 0xD1B54A32D192ED03ull;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Accuracy rows and attention-level rows into `result["rows"]` and `result["attention"]`.
/// `Io` is the backend's glue: `std::vector<float> host(TensorView<const float, 3>, const Args&)`
/// (waits), `TensorView<float, 3> scratch(n, heads, d, const Args&)` (device memory ordered on
/// the stream of Args) and `void sync(const Args&)`.
/// `checkpoint()` is called after each (length, task) and after the attention figures (the
/// command line writes the JSON there, so that a run stopped early keeps what it measured).
template <Backend B, class Io, class Checkpoint>
void run(const Options& o, const ModelConfig& cfg, const WeightStore& store, const RetrievalTasks& tasks, Io& io,
         nlohmann::json& result, Checkpoint&& checkpoint) {
  using Args = ArgsOf<B>;
  const auto t_start = std::chrono::steady_clock::now();
  Config dense_knobs = cfg.attention_config();
  dense_knobs.rank = dense_knobs.kv_dim();
  constexpr SeqId id = 1;

  for (const std::int64_t length : o.lengths) {
    const std::vector<Spec> specs = specs_for(o, cfg, length);
    Decoder<DensePolicy, B> lead(cfg, store, dense_knobs);
    Runners<B> runners;
    for (std::size_t i = 1; i < specs.size(); ++i) runners.push_back(make_runner<B>(specs[i], o, cfg, store));
    lead.set_observer([&](const AttentionEvent& e) {
      if (e.prefill)
        for (auto& r : runners) r->take_prefill(id, e.layer, e.keys, e.values, lead.attention_args());
    });
    for (const std::string& task : o.tasks) {
      std::vector<int> correct(specs.size(), 0);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < o.cases; ++i) {
        const RetrievalCase c = tasks.make(task, length, case_seed(o.seed, task, length, i));
        const std::vector<float> last = prefill_all(lead, runners, id, c.prompt, o.prefill_chunk);
        io.sync(lead.attention_args());  // the runners decode on their own streams
        const token_id first = argmax(last);
        const SeqId ids[1] = {id};
        correct[0] += greedy_matches(first, c.answer, [&](token_id t) {
          const token_id tokens[1] = {t};
          return lead.decode(ids, tokens);
        });
        for (std::size_t r = 0; r < runners.size(); ++r)
          correct[r + 1] += greedy_matches(first, c.answer, [&](token_id t) { return runners[r]->decode(id, t); });
        remove_all(lead, runners, id);
        if ((i + 1) % 10 == 0 || i + 1 == o.cases) {
          std::fprintf(stderr, "\r%-8s %6lld tokens: %3d/%d cases, dense %5.1f%%, %.1f s (%.0f s in all)", task.c_str(),
                       static_cast<long long>(length), i + 1, o.cases, 100.0 * correct[0] / (i + 1), seconds_since(t0),
                       seconds_since(t_start));
          if (i + 1 == o.cases) std::fprintf(stderr, "\n");
        }
      }
      for (std::size_t s = 0; s < specs.size(); ++s)
        result["rows"].push_back({{"task", task},
                                  {"policy", specs[s].policy},
                                  {"context", length},
                                  {"budget_tokens", specs[s].budget_tokens},
                                  {"rank", specs[s].rank},
                                  {"outliers", specs[s].outliers},
                                  {"accuracy", static_cast<double>(correct[s]) / o.cases},
                                  {"n", o.cases},
                                  {"group", specs[s].group}});
      checkpoint();
    }
  }

  if (o.attention_length <= 0 || o.attention_cases <= 0) return;
  // Attention-level figures: ShadowKV and oracle at each budget, fed the dense model's own
  // queries, keys and values at every decode step of the answer (teacher forcing).
  const std::int64_t length = o.attention_length;
  const int rank = o.rank > 0 ? o.rank : default_rank(cfg);
  std::vector<Spec> specs;
  for (double b : o.budgets) {
    specs.push_back({"shadowkv", budget_tokens(b, length, o.chunk_size), rank, true, "attention"});
    specs.push_back({"oracle", budget_tokens(b, length, o.chunk_size), 0, true, "attention"});
  }
  Decoder<DensePolicy, B> lead(cfg, store, dense_knobs);
  Runners<B> runners;
  for (const Spec& s : specs) runners.push_back(make_runner<B>(s, o, cfg, store));
  const int layers = cfg.num_layers, hkv = cfg.num_kv_heads;
  struct Acc {
    double err = 0, recall = 0;
    std::int64_t steps = 0, recall_n = 0;
    PoolStats pool;
  };
  std::vector<std::vector<Acc>> acc(specs.size(), std::vector<Acc>(static_cast<std::size_t>(layers)));
  lead.set_observer([&](const AttentionEvent& e) {
    const Args a = lead.attention_args();
    if (e.prefill) {
      for (auto& r : runners) r->take_prefill(id, e.layer, e.keys, e.values, a);
      return;
    }
    const std::vector<float> dense = io.host(e.out, a);
    double norm = 0;
    for (float x : dense) norm += static_cast<double>(x) * x;
    for (std::size_t r = 0; r < runners.size(); ++r) {
      TensorView<float, 3> out = io.scratch(e.out.shape[0], e.out.shape[1], e.out.shape[2], a);
      runners[r]->decode_layer(e.layer, e.ids, e.queries, e.keys, e.values, out, a);
      const std::vector<float> mine = io.host(TensorView<const float, 3>(out), a);
      double diff = 0;
      for (std::size_t j = 0; j < mine.size(); ++j) diff += (static_cast<double>(mine[j]) - dense[j]) * (mine[j] - dense[j]);
      Acc& x = acc[r][static_cast<std::size_t>(e.layer)];
      x.err += norm > 0 ? std::sqrt(diff / norm) : 0.0;
      ++x.steps;
      x.pool += runners[r]->last_pool();
    }
    for (std::size_t r = 0; r + 1 < runners.size(); r += 2)  // (shadowkv, oracle) pairs at one budget
      for (int h = 0; h < hkv; ++h) {
        const std::vector<std::int32_t> s = runners[r]->selection(id, e.layer, h, a);
        const std::vector<std::int32_t> t = runners[r + 1]->selection(id, e.layer, h, a);
        if (t.empty()) continue;
        std::vector<std::int32_t> both;
        std::set_intersection(s.begin(), s.end(), t.begin(), t.end(), std::back_inserter(both));
        Acc& x = acc[r][static_cast<std::size_t>(e.layer)];
        x.recall += static_cast<double>(both.size()) / static_cast<double>(t.size());
        ++x.recall_n;
      }
  });
  const auto t0 = std::chrono::steady_clock::now();
  int done = 0;
  for (const std::string& task : o.tasks)
    for (int i = 0; i < o.attention_cases; ++i) {
      const RetrievalCase c = tasks.make(task, length, case_seed(o.seed ^ 0xA77E, task, length, i));
      prefill_all(lead, runners, id, c.prompt, o.prefill_chunk);
      const SeqId ids[1] = {id};
      for (std::size_t j = 0; j + 1 < c.answer.size(); ++j) {
        const token_id t[1] = {c.answer[j]};
        lead.decode(ids, t);
      }
      remove_all(lead, runners, id);
      ++done;
      std::fprintf(stderr, "\rattention figures %6lld tokens: %d/%zu cases, %.1f s", static_cast<long long>(length), done,
                   o.tasks.size() * static_cast<std::size_t>(o.attention_cases), seconds_since(t0));
    }
  std::fprintf(stderr, "\n");
  for (std::size_t r = 0; r < specs.size(); ++r)
    for (int l = 0; l < layers; ++l) {
      const Acc& x = acc[r][static_cast<std::size_t>(l)];
      nlohmann::json row = {{"policy", specs[r].policy},
                            {"context", length},
                            {"budget_tokens", specs[r].budget_tokens},
                            {"rank", specs[r].rank},
                            {"layer", l},
                            {"steps", x.steps},
                            {"output_rel_error", x.steps ? x.err / x.steps : 0.0}};
      if (specs[r].policy == "shadowkv") {
        row["chunk_recall"] = x.recall_n ? x.recall / x.recall_n : 0.0;
        row["hit_rate"] = x.pool.hit_rate();
      }
      result["attention"].push_back(row);
    }
  checkpoint();
}

}  // namespace shadowkv_bench::accuracy
