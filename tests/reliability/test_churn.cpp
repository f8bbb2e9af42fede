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

#include "churn_driver.hpp"

using namespace shadowkv;
using skv_test::ChurnFigures;
using skv_test::random_rows;
using skv_test::same_bits;

TEST_SUITE_BEGIN("churn");

namespace {

int churn_ops() { return skv_test::env_count("SHADOWKV_CHURN_OPS", 12000); }

template <class Policy, class T>
class Churn : public skv_test::ChurnDriver<Churn<Policy, T>, SparseAttention<Policy, CpuBackend, T>> {
  using Attn = SparseAttention<Policy, CpuBackend, T>;
  using Base = skv_test::ChurnDriver<Churn, Attn>;
  using typename Base::Seq;
  using Base::batch_, Base::cfg_, Base::f_, Base::kLayers, Base::live_, Base::rng_;
  static constexpr std::size_t kMaxLive = 12;

 public:
  explicit Churn(std::uint64_t seed) : Base(seed) {}

  bool add() {
    if (live_.size() >= kMaxLive) return false;
    Seq s;
    s.solo = std::make_unique<Attn>(cfg_, kLayers);
    s.target = this->prompt_length(static_cast<index_t>(rng_() % 160));
    this->add_live(this->absent_id(), std::move(s));
    return true;
  }

  void prefill_layer(Seq& s, SeqId id, int l, index_t n, bool with_queries) {
    const auto k = random_rows<T>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim);
    const auto v = random_rows<T>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim);
    if (!with_queries) {
      batch_.prefill(id, l, {}, k.view(), v.view(), {});
      s.solo->prefill(id, l, {}, k.view(), v.view(), {});
      return;
    }
    const auto q = random_rows<T>(rng_, n, cfg_.num_q_heads, cfg_.head_dim);
    auto out_batch = skv_test::output_rows<T>(n, cfg_.num_q_heads, cfg_.head_dim);
    auto out_solo = out_batch;
    batch_.prefill(id, l, q.view(), k.view(), v.view(), out_batch.mut());
    s.solo->prefill(id, l, q.view(), k.view(), v.view(), out_solo.mut());
    REQUIRE(same_bits(out_batch.data, out_solo.data));
  }
  void finish_prefill(Attn& attn, SeqId id) { attn.finish_prefill(id); }

  /// One step, every layer, for a random subset of the prefilled sequences in a random order.
  bool decode() {
    std::vector<SeqId> ids = this->ids_where([](const Seq& s) { return s.finished; });
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
      f_.decoded += b;
    }
    for (SeqId id : ids) this->check_agrees(id);
    ++f_.decodes;
    return true;
  }

  /// A decode of `ids` (that must fail) with any inputs.
  void bad_decode(std::vector<SeqId> ids) {
    const index_t b = static_cast<index_t>(ids.size()), hq = cfg_.num_q_heads, hkv = cfg_.num_kv_heads;
    const index_t d = cfg_.head_dim;
    std::vector<T> q(b * hq * d, static_cast<T>(0.5f)), kv(b * hkv * d, static_cast<T>(0.25f)), out(b * hq * d);
    batch_.decode(static_cast<int>(rng_() % kLayers), ids, TensorView<const T, 3>(q.data(), {b, hq, d}),
                  TensorView<const T, 3>(kv.data(), {b, hkv, d}), TensorView<const T, 3>(kv.data(), {b, hkv, d}),
                  TensorView<T, 3>(out.data(), {b, hq, d}));
  }
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
          " decode steps = ", total.decoded, " sequence-layer tokens compared, ", total.removes, " removes, ",
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
  MESSAGE("churn: ", all.ops, " operations survived in all, ", all.decoded,
          " decoded tokens compared bit for bit with the sequence alone");
}

TEST_SUITE_END();
