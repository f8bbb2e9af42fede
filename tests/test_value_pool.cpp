// OffloadedValuePool: hit/miss accounting on a hand-made selection sequence, the paper's
// scheme (hits = overlap with the previous step), LRU with a larger capacity, errors.

#include <algorithm>
#include <set>

#include "test_util.hpp"

using namespace shadowkv;
using Pool = OffloadedValuePool<CpuBackend, float>;

TEST_SUITE_BEGIN("value_pool");

namespace {

/// A pool whose host chunk m of head h holds the value 1000*h + m + 0.001*i in element i.
Pool filled_pool(int heads, int d, int c, index_t chunks, int capacity) {
  Pool pool(heads, d, c, chunks, capacity);
  std::vector<float> v(c * d);
  for (int h = 0; h < heads; ++h)
    for (index_t m = 0; m < chunks; ++m) {
      for (int i = 0; i < c * d; ++i) v[i] = 1000.0f * h + m + 0.001f * i;
      pool.store(h, m, TensorView<const float, 2>(v.data(), {c, d}));
    }
  return pool;
}

struct Fetch {
  std::vector<std::int32_t> slots, missed;
};

Fetch fetch(Pool& pool, int h, std::vector<std::int32_t> chunks) {
  Fetch f;
  f.slots.assign(chunks.size(), -7);
  pool.fetch(h, chunks, f.slots, f.missed);
  // Every selected chunk is resident with its host values.
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    CHECK(pool.slot_of(h, chunks[i]) == f.slots[i]);
    CHECK(std::equal(pool.slot(h, f.slots[i]), pool.slot(h, f.slots[i]) + pool.chunk_size() * pool.head_dim(),
                     pool.host_chunk(h, chunks[i])));
  }
  return f;
}

}  // namespace

TEST_CASE("value_pool: hand-made selection sequence") {
  Pool pool = filled_pool(1, 64, 2, 6, 3);
  // Step 1: cold, three misses into slots 0, 1, 2.
  auto f = fetch(pool, 0, {0, 1, 2});
  CHECK(f.missed == std::vector<std::int32_t>{0, 1, 2});
  CHECK(f.slots == std::vector<std::int32_t>{0, 1, 2});
  // Step 2: chunk 1 hits (slot 1); chunk 3 takes the least recently used free-able slot: 0
  // and 2 were both last used at step 1, the lower wins.
  f = fetch(pool, 0, {1, 3});
  CHECK(f.missed == std::vector<std::int32_t>{1});
  CHECK(f.slots == std::vector<std::int32_t>{1, 0});
  CHECK(pool.slot_of(0, 0) == -1);  // chunk 0 evicted
  // Step 3: chunks 2 (slot 2) and 3 (slot 0) hit; chunk 0 goes to slot 1 (last used step 2).
  f = fetch(pool, 0, {0, 2, 3});
  CHECK(f.missed == std::vector<std::int32_t>{0});
  CHECK(f.slots == std::vector<std::int32_t>{1, 2, 0});
  // Step 4: empty selection changes nothing.
  f = fetch(pool, 0, {});
  CHECK(f.missed.empty());
  const PoolStats& s = pool.stats();
  CHECK(s.requested == 8);
  CHECK(s.hits == 3);
  CHECK(s.misses == 5);
  CHECK(s.bytes_copied == 5 * 2 * 64 * 4);
  CHECK(s.hit_rate() == doctest::Approx(3.0 / 8.0));
  pool.reset_stats();
  CHECK(pool.stats().requested == 0);
  // Rewriting a resident chunk drops the resident copy: next fetch is a miss with new values.
  std::vector<float> v(2 * 64, -1.0f);
  pool.store(0, 2, TensorView<const float, 2>(v.data(), {2, 64}));
  CHECK(pool.slot_of(0, 2) == -1);
  f = fetch(pool, 0, {2});
  CHECK(f.missed.size() == 1);
  CHECK(pool.slot(0, f.slots[0])[0] == -1.0f);
}

TEST_CASE("value_pool: capacity = selection size gives hits = overlap with the previous step; larger capacity is an LRU") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const index_t chunks = 40;
  const int k = 8;
  for (int capacity : {k, 13, 40}) {
    CAPTURE(capacity);
    Pool pool = filled_pool(2, 64, 1, chunks, capacity);
    std::vector<int> last_use(chunks, -1);
    std::set<int> prev;
    for (int step = 0; step < 200; ++step) {
      // Half of the previous selection plus fresh chunks: realistic partial overlap.
      std::set<int> sel;
      for (int c : prev)
        if (rng() % 2) sel.insert(c);
      while (static_cast<int>(sel.size()) < k) sel.insert(static_cast<int>(rng() % chunks));
      std::vector<std::int32_t> chosen(sel.begin(), sel.end());
      std::shuffle(chosen.begin(), chosen.end(), rng);
      std::set<int> resident_before, resident_after;
      for (int c = 0; c < chunks; ++c)
        if (pool.slot_of(1, c) >= 0) resident_before.insert(c);
      const auto before = pool.stats();
      auto f = fetch(pool, 1, chosen);
      for (int c = 0; c < chunks; ++c)
        if (pool.slot_of(1, c) >= 0) resident_after.insert(c);
      const std::int64_t hits = pool.stats().hits - before.hits;
      std::int64_t want_hits = 0, overlap = 0;
      for (int c : chosen) {
        want_hits += resident_before.count(c);
        overlap += prev.count(c);
      }
      CHECK(hits == want_hits);
      if (capacity == k) CHECK(hits == overlap);  // the paper's scheme
      CHECK(static_cast<std::int64_t>(f.missed.size()) == k - hits);
      // The cache keeps as much as fits, and evicts only chunks used no later than every
      // chunk it keeps (the LRU property; ties may go either way).
      std::set<int> all = resident_before;
      all.insert(sel.begin(), sel.end());
      CHECK(resident_after.size() == std::min<std::size_t>(capacity, all.size()));
      for (int c : sel) CHECK(resident_after.count(c) == 1);
      for (int e : resident_before)
        if (!resident_after.count(e))
          for (int r : resident_after)
            if (!sel.count(r)) CHECK(last_use[e] <= last_use[r]);
      for (int c : sel) last_use[c] = step;
      prev = sel;
    }
    CHECK(pool.stats().requested == 200 * k);
  }
}

TEST_CASE("value_pool: invalid selections throw before changing anything") {
  Pool pool = filled_pool(2, 64, 4, 10, 4);
  auto what = [](auto&& fn) { return skv_test::error_message(fn); };
  fetch(pool, 0, {1, 2});
  const PoolStats before = pool.stats();
  std::vector<std::int32_t> slots(5), missed;
  const std::vector<std::int32_t> too_many = {0, 1, 2, 3, 4};
  CHECK(what([&] { pool.fetch(0, too_many, slots, missed); }).find("exceeds capacity=4") != std::string::npos);
  const std::vector<std::int32_t> dup = {1, 3, 1};
  CHECK(what([&] { pool.fetch(0, dup, std::span(slots).first(3), missed); }).find("chunk 1 appears twice") !=
        std::string::npos);
  const std::vector<std::int32_t> out_of_range = {2, 10};
  CHECK(what([&] { pool.fetch(0, out_of_range, std::span(slots).first(2), missed); }).find("chunks[1]=10") !=
        std::string::npos);
  CHECK(what([&] { pool.fetch(2, out_of_range, std::span(slots).first(2), missed); }).find("kv_head=2") !=
        std::string::npos);
  CHECK(what([&] { pool.fetch(0, dup, std::span(slots).first(2), missed); }).find("slots has 2 entries") !=
        std::string::npos);
  std::vector<float> v(3 * 64);
  CHECK(what([&] { pool.store(0, 1, TensorView<const float, 2>(v.data(), {3, 64})); }).find("values has shape") !=
        std::string::npos);
  CHECK(what([&] { Pool(1, 64, 4, 10, 0); }).find("capacity=0") != std::string::npos);
  CHECK(missed.empty());
  CHECK(pool.stats().requested == before.requested);
  // Nothing moved: chunks 1 and 2 still hit.
  auto f = fetch(pool, 0, {2, 1});
  CHECK(f.missed.empty());
}

TEST_SUITE_END();
