#pragma once
// What the CPU churn (test_churn.cpp) and the GPU churn (tests/gpu/test_churn_gpu.cu) share: the
// random choice of operations, the live sequences and their mirrors, the checks that the batch and
// a mirror agree, finishing a prompt, removal, and the calls that must fail. A backend's churn
// derives from `ChurnDriver<Derived, Attn>` and provides the operations that touch tensors:
// `add()`, `decode()`, `prefill_layer(seq, id, layer, n, with_queries)` (n prompt tokens of one
// layer into the batch and the mirror, outputs compared), `finish_prefill(attn, id)` (the call on
// either object), and for the failing calls `bad_decode(ids)` (a decode of `ids`, any inputs).

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "reliability_util.hpp"

namespace skv_test {

/// What a churn did.
struct ChurnFigures {
  std::int64_t ops = 0, adds = 0, prefills = 0, finishes = 0, decodes = 0, removes = 0, bad_calls = 0;
  std::int64_t decoded = 0;         ///< decode outputs (sequence x layer) compared with the mirror
  std::int64_t within_tolerance = 0;  ///< of those, compared within a tolerance instead of bit for bit
  std::size_t max_live = 0;
  index_t longest = 0;  ///< the longest sequence decoded (tokens)
  ChurnFigures& operator+=(const ChurnFigures& o) {
    ops += o.ops, adds += o.adds, prefills += o.prefills, finishes += o.finishes, decodes += o.decodes;
    removes += o.removes, bad_calls += o.bad_calls, decoded += o.decoded, within_tolerance += o.within_tolerance;
    max_live = std::max(max_live, o.max_live);
    longest = std::max(longest, o.longest);
    return *this;
  }
};

template <class Derived, class Attn>
class ChurnDriver {
 public:
  static constexpr bool kSparse = Attn::policy_type::selection != shadowkv::ChunkSelection::all;
  static constexpr int kLayers = 2;

  /// Runs until `ops` operations were done, then removes every sequence.
  ChurnFigures run(int ops) {
    CAPTURE(cfg_.num_q_heads);
    CAPTURE(cfg_.num_kv_heads);
    CAPTURE(cfg_.chunk_size);
    CAPTURE(cfg_.sparse_budget);
    CAPTURE(cfg_.outlier_chunks);
    CAPTURE(cfg_.local_chunks);
    CAPTURE(cfg_.rank);
    CAPTURE(cfg_.value_cache_chunks);
    Derived& self = static_cast<Derived&>(*this);
    while (f_.ops < ops) {
      CAPTURE(f_.ops);
      const unsigned pick = static_cast<unsigned>(rng_() % 100);
      const bool done = pick < 14   ? self.add()
                        : pick < 40 ? prefill()
                        : pick < 50 ? finish()
                        : pick < 86 ? self.decode()
                        : pick < 93 ? remove()
                                    : bad_call();
      if (done) ++f_.ops;
      f_.max_live = std::max(f_.max_live, live_.size());
    }
    while (!live_.empty()) remove();
    CHECK(batch_.num_sequences() == 0);
    return f_;
  }

 protected:
  struct Seq {
    std::unique_ptr<Attn> solo;  ///< the mirror: this sequence alone
    index_t target = 0;          ///< prompt length
    index_t staged = 0;          ///< prompt tokens given so far
    bool finished = false;
  };

  /// \param batch_args what the batch object is built from after the configuration
  template <class... BatchArgs>
  explicit ChurnDriver(std::uint64_t seed, BatchArgs&&... batch_args)
      : rng_(seed), cfg_(random_small_config(rng_)), batch_(cfg_, kLayers, std::forward<BatchArgs>(batch_args)...) {}

  template <class Pred>
  std::vector<shadowkv::SeqId> ids_where(Pred pred) const {
    std::vector<shadowkv::SeqId> out;
    for (const auto& [id, s] : live_)
      if (pred(s)) out.push_back(id);
    return out;
  }
  shadowkv::SeqId pick(const std::vector<shadowkv::SeqId>& ids) { return ids[rng_() % ids.size()]; }
  /// An id no live sequence has (ids come back after a remove).
  shadowkv::SeqId absent_id() {
    shadowkv::SeqId id;
    do id = static_cast<shadowkv::SeqId>(rng_() % 2001) - 1000;
    while (live_.contains(id));
    return id;
  }
  /// Registers a sequence in the batch and in its mirror `solo`.
  void add_live(shadowkv::SeqId id, Seq s) {
    batch_.add_sequence(id);
    s.solo->add_sequence(id);
    live_.emplace(id, std::move(s));
    ++f_.adds;
  }
  /// A shortest prompt every policy accepts, plus `extra` tokens.
  index_t prompt_length(index_t extra) const { return std::max<index_t>(1, kSparse ? cfg_.min_context() : 1) + extra; }

  /// Same state in the batch and in the sequence's own object.
  void check_agrees(shadowkv::SeqId id) {
    const Seq& s = live_.at(id);
    for (int l = 0; l < kLayers; ++l) REQUIRE(batch_.length(id, l) == s.solo->length(id, l));
    REQUIRE(batch_.is_prefilled(id) == s.solo->is_prefilled(id));
    REQUIRE(batch_.memory(id).device_bytes == s.solo->memory(id).device_bytes);
    REQUIRE(batch_.memory(id).host_bytes == s.solo->memory(id).host_bytes);
  }

  /// A random chunk (1-96 tokens) of a random unfinished prompt into every layer; with queries
  /// (prefill attention) half of the time.
  bool prefill() {
    const auto ids = ids_where([](const Seq& s) { return !s.finished && s.staged < s.target; });
    if (ids.empty()) return false;
    const shadowkv::SeqId id = pick(ids);
    Seq& s = live_.at(id);
    const index_t n = std::min<index_t>(s.target - s.staged, 1 + static_cast<index_t>(rng_() % 96));
    const bool with_queries = rng_() % 2;
    for (int l = 0; l < kLayers; ++l) {
      CAPTURE(l);
      static_cast<Derived&>(*this).prefill_layer(s, id, l, n, with_queries);
    }
    s.staged += n;
    check_agrees(id);
    ++f_.prefills;
    return true;
  }

  bool finish() {
    const auto ids = ids_where([](const Seq& s) { return !s.finished && s.staged == s.target; });
    if (ids.empty()) return false;
    const shadowkv::SeqId id = pick(ids);
    Seq& s = live_.at(id);
    Derived& self = static_cast<Derived&>(*this);
    self.finish_prefill(batch_, id);
    self.finish_prefill(*s.solo, id);
    s.finished = true;
    check_agrees(id);
    ++f_.finishes;
    return true;
  }

  bool remove() {
    if (live_.empty()) return false;
    const shadowkv::SeqId id = pick(ids_where([](const Seq&) { return true; }));
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
    Derived& self = static_cast<Derived&>(*this);
    const auto finished = ids_where([](const Seq& s) { return s.finished; });
    const auto unfinished = ids_where([](const Seq& s) { return !s.finished; });
    const shadowkv::SeqId absent = absent_id();
    std::string what, needle;
    switch (rng_() % 6) {
      case 0:
        if (finished.empty()) return false;
        what = error_message([&] { self.bad_decode({pick(finished), absent}); });
        needle = "unknown sequence id=" + std::to_string(absent);
        break;
      case 1: {
        if (finished.empty()) return false;
        const shadowkv::SeqId id = pick(finished);
        what = error_message([&] { self.bad_decode({id, id}); });
        needle = "sequence id=" + std::to_string(id) + " appears twice";
        break;
      }
      case 2:
        if (unfinished.empty()) return false;
        what = error_message([&] { self.bad_decode({pick(unfinished)}); });
        needle = "is not prefilled";
        break;
      case 3: {
        if (live_.empty()) return false;
        const shadowkv::SeqId id = pick(ids_where([](const Seq&) { return true; }));
        what = error_message([&] { batch_.add_sequence(id); });
        needle = "sequence id=" + std::to_string(id) + " already exists";
        break;
      }
      case 4: {
        const auto short_ones = ids_where(
            [&](const Seq& s) { return !s.finished && (s.staged == 0 || (kSparse && s.staged < cfg_.min_context())); });
        if (short_ones.empty()) return false;
        const shadowkv::SeqId id = pick(short_ones);
        what = error_message([&] { self.finish_prefill(batch_, id); });
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
  shadowkv::Config cfg_;
  Attn batch_;
  std::map<shadowkv::SeqId, Seq> live_;
  ChurnFigures f_;
};

}  // namespace skv_test
