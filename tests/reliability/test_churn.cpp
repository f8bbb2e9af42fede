// Continuous-batching churn: thousands of random operations on one SparseAttention holding a
// ragged batch (add a sequence, prefill a random chunk of it, finish its prompt, decode a
// random subset of the prefilled sequences in a random order, remove one, and calls that must
// fail), each sequence mirrored in an object of its own that sees only its calls. Every output
// of the batch must equal, bit for bit, what the sequence's own object computes from the same
// inputs; lengths, memory and the selected chunks must agree too; a failing call must change
// nothing. SHADOWKV_CHURN_OPS sets the number of operations over all runs (default 12000).

#include <algorithm>
#include <map>
#include <memory>

#include "reliability_util.hpp"

using namespace shadowkv;
using skv_test::contains;
using skv_test::error_message;
using skv_test::random_rows;
using skv_test::same_bits;

TEST_SUITE_BEGIN("churn");

namespace {

int churn_ops() {
  if (const char* env = std::getenv("SHADOWKV_CHURN_OPS")) return std::max(1, std::atoi(env));
  return 12000;
}

struct ChurnFigures {
  std::int64_t ops = 0, adds = 0, prefills = 0, finishes = 0, decodes = 0, decoded_tokens = 0, removes = 0,
               bad_calls = 0;
  std::size_t max_live = 0;
  ChurnFigures& operator+=(const ChurnFigures& o) {
    ops += o.ops, adds += o.adds, prefills += o.prefills, finishes += o.finishes, decodes += o.decodes;
    decoded_tokens += o.decoded_tokens, removes += o.removes, bad_calls += o.bad_calls;
    max_live = std::max(max_live, o.max_live);
    return *this;
  }
};

/// A random small configuration (any group size, chunk size, budget, static set, rank and value
/// cache), valid for every policy.
Config random_config(std::mt19937_64& rng) {
  Config cfg;
  cfg.head_dim = 64;
  cfg.num_kv_heads = 1 + static_cast<int>(rng() % 2);
  cfg.num_q_heads = cfg.num_kv_heads * (1 + static_cast<int>(rng() % 3));
  cfg.chunk_size = 1 + static_cast<int>(rng() % 8);
  cfg.sparse_budget = cfg.chunk_size * (1 + static_cast<int>(rng() % 6));
  cfg.outlier_chunks = static_cast<int>(rng() % 3);
  cfg.local_chunks = static_cast<int>(rng() % 3);
  cfg.rank = 1 + static_cast<int>(rng() % cfg.kv_dim());
  cfg.value_cache_chunks = rng() % 2 ? 0 : cfg.budget_chunks() + static_cast<int>(rng() % 4);
  return cfg;
}

template <class Policy, class T>
class Churn {
  using Attn = SparseAttention<Policy, CpuBackend, T>;
  static constexpr bool kSparse = Policy::selection != ChunkSelection::all;
  static constexpr int kLayers = 2;
  static constexpr std::size_t kMaxLive = 12;

  struct Seq {
    std::unique_ptr<Attn> solo;
    index_t target = 0;  // prompt length
    index_t staged = 0;  // prompt tokens given so far
    bool finished = false;
  };

 public:
  Churn(std::uint64_t seed) : rng_(seed), cfg_(random_config(rng_)), batch_(cfg_, kLayers) {}

  ChurnFigures run(int ops) {
    CAPTURE(cfg_.num_q_heads);
    CAPTURE(cfg_.num_kv_heads);
    CAPTURE(cfg_.chunk_size);
    CAPTURE(cfg_.sparse_budget);
    CAPTURE(cfg_.outlier_chunks);
    CAPTURE(cfg_.local_chunks);
    CAPTURE(cfg_.rank);
    CAPTURE(cfg_.value_cache_chunks);
    while (f_.ops < ops) {
      CAPTURE(f_.ops);
      const unsigned pick = static_cast<unsigned>(rng_() % 100);
      const bool done = pick < 14   ? add()
                        : pick < 40 ? prefill()
                        : pick < 50 ? finish()
                        : pick < 86 ? decode()
                        : pick < 93 ? remove()
                                    : bad_call();
      if (done) ++f_.ops;
      f_.max_live = std::max(f_.max_live, live_.size());
    }
    while (!live_.empty()) remove();
    CHECK(batch_.num_sequences() == 0);
    return f_;
  }

 private:
  template <class Pred>
  std::vector<SeqId> ids_where(Pred pred) const {
    std::vector<SeqId> out;
    for (const auto& [id, s] : live_)
      if (pred(s)) out.push_back(id);
    return out;
  }
  SeqId pick(const std::vector<SeqId>& ids) { return ids[rng_() % ids.size()]; }

  /// Same state in the batch and in the sequence's own object.
  void check_agrees(SeqId id) {
    const Seq& s = live_.at(id);
    REQUIRE(batch_.length(id) == s.solo->length(id));
    REQUIRE(batch_.is_prefilled(id) == s.solo->is_prefilled(id));
    REQUIRE(batch_.memory(id).device_bytes == s.solo->memory(id).device_bytes);
    REQUIRE(batch_.memory(id).host_bytes == s.solo->memory(id).host_bytes);
  }

  bool add() {
    if (live_.size() >= kMaxLive) return false;
    SeqId id;
    do id = static_cast<SeqId>(rng_() % 2001) - 1000;  // ids come back after a remove
    while (live_.contains(id));
    Seq s;
    s.solo = std::make_unique<Attn>(cfg_, kLayers);
    s.target = std::max<index_t>(1, kSparse ? cfg_.min_context() : 1) + static_cast<index_t>(rng_() % 160);
    batch_.add_sequence(id);
    s.solo->add_sequence(id);
    live_.emplace(id, std::move(s));
    ++f_.adds;
    return true;
  }

  /// A random chunk of a random unfinished prompt into every layer; with queries (prefill
  /// attention) half of the time.
  bool prefill() {
    const auto ids = ids_where([](const Seq& s) { return !s.finished && s.staged < s.target; });
    if (ids.empty()) return false;
    const SeqId id = pick(ids);
    Seq& s = live_.at(id);
    const index_t n = std::min<index_t>(s.target - s.staged, 1 + static_cast<index_t>(rng_() % 96));
    const bool with_queries = rng_() % 2;
    for (int l = 0; l < kLayers; ++l) {
      const auto k = random_rows<T>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim);
      const auto v = random_rows<T>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim);
      if (!with_queries) {
        batch_.prefill(id, l, {}, k.view(), v.view(), {});
        s.solo->prefill(id, l, {}, k.view(), v.view(), {});
        continue;
      }
      const auto q = random_rows<T>(rng_, n, cfg_.num_q_heads, cfg_.head_dim);
      auto out_batch = skv_test::output_rows<T>(n, cfg_.num_q_heads, cfg_.head_dim);
      auto out_solo = out_batch;
      batch_.prefill(id, l, q.view(), k.view(), v.view(), out_batch.mut());
      s.solo->prefill(id, l, q.view(), k.view(), v.view(), out_solo.mut());
      REQUIRE(same_bits(out_batch.data, out_solo.data));
    }
    s.staged += n;
    check_agrees(id);
    ++f_.prefills;
    return true;
  }

  bool finish() {
    const auto ids = ids_where([](const Seq& s) { return !s.finished && s.staged == s.target; });
    if (ids.empty()) return false;
    const SeqId id = pick(ids);
    Seq& s = live_.at(id);
    batch_.finish_prefill(id);
    s.solo->finish_prefill(id);
    s.finished = true;
    check_agrees(id);
    ++f_.finishes;
    return true;
  }

  /// One step, every layer, for a random subset of the prefilled sequences in a random order.
  bool decode() {
    std::vector<SeqId> ids = ids_where([](const Seq& s) { return s.finished; });
    if (ids.empty()) return false;
    std::shuffle(ids.begin(), ids.end(), rng_);
    ids.resize(1 + rng_() % std::min<std::size_t>(ids.size(), 8));
    const index_t b = static_cast<index_t>(ids.size());
    for (int l = 0; l < kLayers; ++l) {
      const auto q = random_rows<T>(rng_, b, cfg_.num_q_heads, cfg_.head_dim);
      const auto k = random_rows<T>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim);
      const auto v = random_rows<T>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim);
      auto out = skv_test::output_rows<T>(b, cfg_.num_q_heads, cfg_.head_dim);
      batch_.decode(l, ids, q.view(), k.view(), v.view(), out.mut());
      const std::size_t q_row = static_cast<std::size_t>(cfg_.num_q_heads) * cfg_.head_dim;
      const std::size_t kv_row = static_cast<std::size_t>(cfg_.num_kv_heads) * cfg_.head_dim;
      for (index_t i = 0; i < b; ++i) {
        Attn& solo = *live_.at(ids[i]).solo;
        std::vector<T> own(q_row, static_cast<T>(NAN));
        const SeqId one[] = {ids[i]};
        solo.decode(l, one, TensorView<const T, 3>(q.data.data() + i * q_row, {1, cfg_.num_q_heads, cfg_.head_dim}),
                    TensorView<const T, 3>(k.data.data() + i * kv_row, {1, cfg_.num_kv_heads, cfg_.head_dim}),
                    TensorView<const T, 3>(v.data.data() + i * kv_row, {1, cfg_.num_kv_heads, cfg_.head_dim}),
                    TensorView<T, 3>(own.data(), {1, cfg_.num_q_heads, cfg_.head_dim}));
        const std::vector<T> got(out.data.begin() + i * q_row, out.data.begin() + (i + 1) * q_row);
        CAPTURE(ids[i]);
        CAPTURE(l);
        REQUIRE(same_bits(got, own));
        for (int h = 0; h < cfg_.num_kv_heads; ++h) {
          const auto a = batch_.last_selection(ids[i], l, h), o = solo.last_selection(ids[i], l, h);
          REQUIRE(std::equal(a.begin(), a.end(), o.begin(), o.end()));
        }
      }
      f_.decoded_tokens += b;
    }
    for (SeqId id : ids) check_agrees(id);
    ++f_.decodes;
    return true;
  }

  bool remove() {
    if (live_.empty()) return false;
    const SeqId id = pick(ids_where([](const Seq&) { return true; }));
    batch_.remove_sequence(id);
    live_.erase(id);
    REQUIRE_FALSE(batch_.contains(id));
    REQUIRE(batch_.num_sequences() == live_.size());
    ++f_.removes;
    return true;
  }

  /// A call that must throw naming what is wrong and change nothing (the exact comparisons of
  /// the following operations would show a change).
  bool bad_call() {
    const auto finished = ids_where([](const Seq& s) { return s.finished; });
    const auto unfinished = ids_where([](const Seq& s) { return !s.finished; });
    const index_t hq = cfg_.num_q_heads, hkv = cfg_.num_kv_heads, d = cfg_.head_dim;
    std::vector<T> q(2 * hq * d, static_cast<T>(0.5f)), kv(2 * hkv * d, static_cast<T>(0.25f)), out(2 * hq * d);
    auto decode = [&](std::vector<SeqId> ids) {
      const index_t b = static_cast<index_t>(ids.size());
      batch_.decode(static_cast<int>(rng_() % kLayers), ids, TensorView<const T, 3>(q.data(), {b, hq, d}),
                    TensorView<const T, 3>(kv.data(), {b, hkv, d}), TensorView<const T, 3>(kv.data(), {b, hkv, d}),
                    TensorView<T, 3>(out.data(), {b, hq, d}));
    };
    SeqId absent;
    do absent = static_cast<SeqId>(rng_() % 2001) - 1000;
    while (live_.contains(absent));
    std::string what, needle;
    switch (rng_() % 6) {
      case 0:
        if (finished.empty()) return false;
        what = error_message([&] { decode({pick(finished), absent}); });
        needle = "unknown sequence id=" + std::to_string(absent);
        break;
      case 1: {
        if (finished.empty()) return false;
        const SeqId id = pick(finished);
        what = error_message([&] { decode({id, id}); });
        needle = "sequence id=" + std::to_string(id) + " appears twice";
        break;
      }
      case 2:
        if (unfinished.empty()) return false;
        what = error_message([&] { decode({pick(unfinished)}); });
        needle = "is not prefilled";
        break;
      case 3: {
        if (live_.empty()) return false;
        const SeqId id = pick(ids_where([](const Seq&) { return true; }));
        what = error_message([&] { batch_.add_sequence(id); });
        needle = "sequence id=" + std::to_string(id) + " already exists";
        break;
      }
      case 4: {
        const auto short_ones = ids_where(
            [&](const Seq& s) { return !s.finished && (s.staged == 0 || (kSparse && s.staged < cfg_.min_context())); });
        if (short_ones.empty()) return false;
        const SeqId id = pick(short_ones);
        what = error_message([&] { batch_.finish_prefill(id); });
        needle = live_.at(id).staged == 0 ? "empty prompt" : "shorter than the static set";
        break;
      }
      default:
        what = error_message([&] { batch_.remove_sequence(absent); });
        needle = "unknown sequence id=" + std::to_string(absent);
        break;
    }
    CAPTURE(what);
    CAPTURE(needle);
    REQUIRE(contains(what, needle));
    ++f_.bad_calls;
    return true;
  }

  std::mt19937_64 rng_;
  Config cfg_;
  Attn batch_;
  std::map<SeqId, Seq> live_;
  ChurnFigures f_;
};

template <class Policy, class T>
ChurnFigures churn_runs(std::uint64_t seed, int runs, int ops) {
  ChurnFigures total;
  for (int r = 0; r < runs; ++r) {
    CAPTURE(seed + r);
    total += Churn<Policy, T>(seed + r).run(ops);
  }
  MESSAGE(Policy::name, " (", dtype_name<T>(), "): ", runs, " runs, ", total.ops, " operations survived (", total.adds,
          " adds, ", total.prefills, " prefill chunks, ", total.finishes, " finishes, ", total.decodes,
          " decode steps = ", total.decoded_tokens, " sequence-layer tokens compared, ", total.removes, " removes, ",
          total.bad_calls, " failing calls), up to ", total.max_live, " live sequences");
  return total;
}

}  // namespace

TEST_CASE("churn: random add / prefill / decode / remove on a ragged batch equals each sequence alone") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  const int ops = churn_ops();
  ChurnFigures all;
  // Runs of a fresh random configuration each; the operations split 35/20/20/25 %.
  all += churn_runs<ShadowKVPolicy, float>(seed, 3, ops * 35 / 300);
  all += churn_runs<DensePolicy, float>(seed + 100, 2, ops * 20 / 200);
  all += churn_runs<OracleTopKPolicy, float>(seed + 200, 2, ops * 20 / 200);
  all += churn_runs<ShadowKVPolicy, bf16>(seed + 300, 2, ops * 25 / 200);
  MESSAGE("churn: ", all.ops, " operations survived in all, ", all.decoded_tokens,
          " decoded tokens compared bit for bit with the sequence alone");
}

TEST_SUITE_END();
