// Allocation-failure injection over a prefill + decode scenario (two sequences of different
// lengths, chunked prefill with prefill attention, batched decode steps, a removal), swept over
// n: the n-th allocation fails, for every n up to the number of allocations the scenario makes.
// Each failure must surface as a shadowkv::Error ("out of memory ...") or be absorbed by the
// library; the failed call is then retried and the run continues, and every output must equal
// the run without failures bit for bit (what the calls promise: a failure changes nothing). A
// second sweep destroys the object right after the failure instead. Leaks: LeakSanitizer in
// the sanitizer build, and the injected memory resource counts its bytes back to zero.

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>

#include "failing_allocation.hpp"
#include "reliability_util.hpp"

using namespace shadowkv;
using skv_test::contains;
using skv_test::FailingResource;
using skv_test::FailNthAllocation;
using skv_test::InjectionReport;
using skv_test::random_rows;
using skv_test::same_bits;

TEST_SUITE_BEGIN("alloc_failure");

namespace {

/// How an allocation is made to fail: `arm(n)` fails the n-th from then on (0: none, count only),
/// `disarm()` stops and reports.
struct Injector {
  std::function<void(std::int64_t)> arm;
  std::function<InjectionReport()> disarm;
};

enum class AfterFailure { retry, destroy };

std::string to_string(AfterFailure a) { return a == AfterFailure::retry ? "retry" : "destroy"; }

struct SweepFigures {
  std::int64_t allocations = 0;  ///< in the scenario without failures
  std::int64_t injected = 0, surfaced = 0, absorbed = 0;
};

template <class Policy>
class Scenario {
  using Attn = SparseAttention<Policy>;

 public:
  Scenario(std::uint64_t seed, std::pmr::memory_resource* host_memory) : rng_(seed), host_memory_(host_memory) {
    steps_.push_back([this] { attn_.emplace(cfg_, kLayers, host_memory_); });
    steps_.push_back([this] { attn_->add_sequence(1); });
    for (index_t n : {24, 17})
      for (int l = 0; l < kLayers; ++l) prefill_step(1, l, n, true);
    steps_.push_back([this] { attn_->add_sequence(2); });
    for (int l = 0; l < kLayers; ++l) prefill_step(2, l, 29, false);
    steps_.push_back([this] { attn_->finish_prefill(1); });
    steps_.push_back([this] { attn_->finish_prefill(2); });
    for (int step = 0; step < 3; ++step)
      for (int l = 0; l < kLayers; ++l) decode_step({2, 1}, l);
    steps_.push_back([this] { attn_->remove_sequence(1); });
    for (int l = 0; l < kLayers; ++l) decode_step({2}, l);
  }

  /// Runs the steps with `inject` armed at `n`; after a failure, retries the step or destroys
  /// the object. Returns what the injector saw and, through the figures, what happened.
  InjectionReport run(const Injector& inject, std::int64_t n, AfterFailure after, std::string& error, bool& failed) {
    for (auto& o : outputs_) std::fill(o.data.begin(), o.data.end(), static_cast<float>(NAN));
    attn_.reset();
    failed = false;
    inject.arm(n);
    for (std::size_t k = 0; k < steps_.size(); ++k) {
      try {
        steps_[k]();
      } catch (const Error& e) {
        failed = true;
        error = e.what();
        if (after == AfterFailure::destroy) {
          attn_.reset();
          break;
        }
        steps_[k]();  // the injector fails one allocation only: the retry must work
      } catch (const std::exception& e) {
        failed = true;
        error = std::string("(not a shadowkv::Error) ") + e.what();
        break;
      }
    }
    const InjectionReport report = inject.disarm();
    return report;
  }

  void destroy() { attn_.reset(); }
  const std::deque<skv_test::RandomRows<float>>& outputs() const { return outputs_; }
  std::size_t num_steps() const { return steps_.size(); }

 private:
  static constexpr int kLayers = 2;

  void prefill_step(SeqId id, int l, index_t n, bool with_queries) {
    inputs_.push_back(random_rows<float>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim));
    inputs_.push_back(random_rows<float>(rng_, n, cfg_.num_kv_heads, cfg_.head_dim));
    const auto& k = inputs_[inputs_.size() - 2];
    const auto& v = inputs_.back();
    if (!with_queries) {
      steps_.push_back([this, id, l, &k, &v] { attn_->prefill(id, l, {}, k.view(), v.view(), {}); });
      return;
    }
    inputs_.push_back(random_rows<float>(rng_, n, cfg_.num_q_heads, cfg_.head_dim));
    const auto& q = inputs_.back();
    outputs_.push_back(skv_test::output_rows<float>(n, cfg_.num_q_heads, cfg_.head_dim));
    auto& out = outputs_.back();
    steps_.push_back(
        [this, id, l, &q, &k, &v, &out] { attn_->prefill(id, l, q.view(), k.view(), v.view(), out.mut()); });
  }

  void decode_step(std::vector<SeqId> ids, int l) {
    const index_t b = static_cast<index_t>(ids.size());
    inputs_.push_back(random_rows<float>(rng_, b, cfg_.num_q_heads, cfg_.head_dim));
    inputs_.push_back(random_rows<float>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim));
    inputs_.push_back(random_rows<float>(rng_, b, cfg_.num_kv_heads, cfg_.head_dim));
    const auto& q = inputs_[inputs_.size() - 3];
    const auto& k = inputs_[inputs_.size() - 2];
    const auto& v = inputs_.back();
    outputs_.push_back(skv_test::output_rows<float>(b, cfg_.num_q_heads, cfg_.head_dim));
    auto& out = outputs_.back();
    steps_.push_back(
        [this, ids, l, &q, &k, &v, &out] { attn_->decode(l, ids, q.view(), k.view(), v.view(), out.mut()); });
  }

  std::mt19937_64 rng_;
  std::pmr::memory_resource* host_memory_;
  Config cfg_ = skv_test::small_config();
  std::optional<Attn> attn_;
  std::deque<skv_test::RandomRows<float>> inputs_, outputs_;  // the steps refer to them
  std::vector<std::function<void()>> steps_;
};

/// Sweeps n = 1, 2, ... until the n-th allocation no longer comes.
template <class Policy>
SweepFigures sweep(std::uint64_t seed, const Injector& inject, AfterFailure after, FailingResource* resource,
                   std::pmr::memory_resource* host_memory) {
  Scenario<Policy> s(seed, host_memory);
  std::string error;
  bool failed = false;
  SweepFigures f;
  s.run(inject, 0, AfterFailure::retry, error, failed);  // first-use allocations of the process
  const InjectionReport clean = s.run(inject, 0, AfterFailure::retry, error, failed);
  REQUIRE_FALSE(failed);
  f.allocations = clean.allocations;
  const auto want = s.outputs();
  for (std::int64_t n = 1; n <= clean.allocations + 1; ++n) {
    CAPTURE(n);
    const InjectionReport r = s.run(inject, n, after, error, failed);
    if (!r.fired) {
      CHECK(n == clean.allocations + 1);  // the scenario allocates as often each time
      break;
    }
    ++f.injected;
    CAPTURE(error);
    if (failed) {
      ++f.surfaced;
      CHECK(contains(error, "shadowkv: out of memory"));
    } else {
      ++f.absorbed;
    }
    if (after == AfterFailure::retry || !failed) {
      bool same = true;
      for (std::size_t i = 0; i < want.size(); ++i) same = same && same_bits(s.outputs()[i].data, want[i].data);
      CHECK(same);
    }
    s.destroy();
    if (resource) CHECK(resource->outstanding() == 0);
  }
  return f;
}

Injector global_new() {
  auto guard = std::make_shared<std::optional<FailNthAllocation>>();
  return {[guard](std::int64_t n) { guard->emplace(n); },
          [guard] {
            const InjectionReport r = (*guard)->report();
            guard->reset();
            return r;
          }};
}

Injector through(FailingResource& resource) {
  return {[&resource](std::int64_t n) { resource.arm(n); },
          [&resource] {
            const InjectionReport r = resource.report();
            resource.arm(0);
            return r;
          }};
}

template <class Policy>
SweepFigures sweep_global_new(std::uint64_t seed, AfterFailure after) {
  const SweepFigures f = sweep<Policy>(seed, global_new(), after, nullptr, std::pmr::get_default_resource());
  MESSAGE(Policy::name, ", every operator new, ", to_string(after), " after the failure: ", f.allocations,
          " allocations in the scenario, ", f.injected, " failures injected: ", f.surfaced,
          " surfaced as shadowkv::Error, ", f.absorbed, " absorbed");
  CHECK(f.injected == f.allocations);
  CHECK(f.surfaced > 0);
  return f;
}

}  // namespace

TEST_CASE("alloc_failure: every operator new of a prefill + decode scenario, each policy") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  SweepFigures total;
  for (AfterFailure after : {AfterFailure::retry, AfterFailure::destroy}) {
    for (const SweepFigures& f :
         {sweep_global_new<ShadowKVPolicy>(seed, after), sweep_global_new<DensePolicy>(seed, after),
          sweep_global_new<OracleTopKPolicy>(seed, after)}) {
      total.injected += f.injected;
      total.surfaced += f.surfaced;
      total.absorbed += f.absorbed;
    }
  }
  MESSAGE("operator new: ", total.injected, " failures injected, ", total.surfaced, " surfaced as shadowkv::Error, ",
          total.absorbed, " absorbed");
}

TEST_CASE("alloc_failure: the host memory of the offloaded values (SparseAttention's host_memory)") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  FailingResource resource;
  for (AfterFailure after : {AfterFailure::retry, AfterFailure::destroy}) {
    const SweepFigures f = sweep<ShadowKVPolicy>(seed, through(resource), after, &resource, &resource);
    MESSAGE("shadowkv, host_memory, ", to_string(after), " after the failure: ", f.allocations,
            " allocations in the scenario, ", f.injected, " failures injected, ", f.surfaced,
            " surfaced as shadowkv::Error");
    CHECK(f.allocations == 4);  // one pool per layer per sequence
    CHECK(f.surfaced == f.injected);
  }
  // The values really live there: a pool made by SparseAttention reports it.
  SparseAttention<ShadowKVPolicy> attn(Config{}, 1, &resource);
  CHECK(attn.host_memory() == &resource);
}

namespace {

/// Fails each allocation that `call(object)` makes, in turn (counted first on a copy of
/// `object`), and checks after each failure that `object` is `unchanged`. Returns the count.
template <class T, class Call, class Check>
std::int64_t fail_each_allocation(T& object, Call call, Check unchanged) {
  std::int64_t allocations = 0;
  {
    T twin = object;
    FailNthAllocation count(0);
    call(twin);
    allocations = count.report().allocations;
  }
  for (std::int64_t n = 1; n <= allocations; ++n) {
    CAPTURE(n);
    std::string what = "(no throw)";
    {
      FailNthAllocation fail(n);
      try {
        call(object);
      } catch (const Error& e) {
        what = e.what();
      }
    }
    CHECK(contains(what, "shadowkv: out of memory"));
    unchanged(object);
  }
  return allocations;
}

}  // namespace

TEST_CASE("alloc_failure: a failed rebuild leaves LandmarkIndex and LowRankKeyStore as they were") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const auto keys = random_rows<float>(rng, 48, 2, 64), other = random_rows<float>(rng, 64, 2, 64);

  LandmarkIndex<CpuBackend, float> index(2, 64, 4);
  index.build(keys.view(), 2);
  const std::vector<std::int32_t> ids(index.landmark_chunk_ids(1).begin(), index.landmark_chunk_ids(1).end());
  const std::vector<float> landmarks(index.landmarks(1), index.landmarks(1) + 10 * 64);
  const std::int64_t index_allocations = fail_each_allocation(
      index, [&](auto& i) { i.build(other.view(), 1); },
      [&](const auto& i) {
        CHECK(i.num_landmarks() == 10);
        CHECK(std::equal(ids.begin(), ids.end(), i.landmark_chunk_ids(1).begin(), i.landmark_chunk_ids(1).end()));
        CHECK(std::memcmp(i.landmarks(1), landmarks.data(), landmarks.size() * sizeof(float)) == 0);
      });

  LowRankKeyStore<CpuBackend, float> store(2, 64, 8);
  store.build(keys.view());
  const std::vector<float> a(store.a_data(), store.a_data() + 48 * 8);
  auto same_store = [&](const auto& s) {
    CHECK(s.size() == 48);
    CHECK(std::memcmp(s.a_data(), a.data(), a.size() * sizeof(float)) == 0);
  };
  std::int64_t store_allocations = fail_each_allocation(
      store, [&](auto& s) { s.build(other.view()); }, same_store);
  store_allocations += fail_each_allocation(
      store, [&](auto& s) { s.append(other.view()); }, same_store);
  CHECK(index_allocations > 0);
  CHECK(store_allocations > 0);
  MESSAGE("components: ", index_allocations + store_allocations,
          " failures injected into LandmarkIndex::build, LowRankKeyStore::build and ::append, each left unchanged");
}

TEST_CASE("alloc_failure: a failed fetch of the value pool leaves the pool as it was") {
  // Two pools in the same state: `counted` tells how many allocations the second fetch makes,
  // `pool` fails each of them in turn and must come out unchanged every time.
  using Pool = OffloadedValuePool<CpuBackend, float>;
  Pool pool(1, 64, 4, 6, 3), counted(1, 64, 4, 6, 3);
  const std::int32_t first[] = {0, 1, 2}, second[] = {3, 1, 4};
  std::int32_t slots[3], want_slots[3];
  std::vector<std::int32_t> missed, want_missed;
  pool.fetch(0, first, slots, missed);
  counted.fetch(0, first, slots, missed);
  std::int64_t allocations = 0;
  {
    FailNthAllocation count(0);
    counted.fetch(0, second, want_slots, want_missed);
    allocations = count.report().allocations;
  }
  CHECK(allocations > 0);
  const PoolStats before = pool.stats();
  for (std::int64_t n = 1; n <= allocations; ++n) {
    CAPTURE(n);
    std::vector<std::int32_t> m;
    std::string what = "(no throw)";
    {
      FailNthAllocation fail(n);
      try {
        pool.fetch(0, second, slots, m);
      } catch (const Error& e) {
        what = e.what();
      }
    }
    CHECK(contains(what, "out of memory in OffloadedValuePool::fetch(kv_head=0, 3 chunks)"));
    CHECK(m.empty());
    CHECK(pool.stats().requested == before.requested);
    for (std::int32_t c : {0, 1, 2}) CHECK(pool.slot_of(0, c) >= 0);
    for (std::int32_t c : {3, 4}) CHECK(pool.slot_of(0, c) < 0);
  }
  pool.fetch(0, second, slots, missed = {});
  CHECK(std::equal(slots, slots + 3, want_slots));
  CHECK(missed == want_missed);
}

TEST_SUITE_END();
