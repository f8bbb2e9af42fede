// Invalid-input tables of the attention library: Config, the memory planner, the four
// components and SparseAttention with each policy. Every bad call must throw shadowkv::Error
// naming the argument (and its value), and a valid call right after it must still work and give
// what it gave before (or what a twin object that never saw the bad calls gives).

#include <limits>
#include <memory_resource>

#include "reliability_util.hpp"

using namespace shadowkv;
using skv_test::BadCall;
using skv_test::random_rows;
using skv_test::run_table;
using skv_test::same_bits;
using skv_test::small_config;

TEST_SUITE_BEGIN("invalid_input");

namespace {

constexpr int kIntMax = std::numeric_limits<int>::max();

struct ConfigCase {
  const char* what;
  void (*mutate)(Config&);
  const char* needle;
};

/// One bad field each, with the text that must name it.
const ConfigCase kConfigCases[] = {
    {"no query heads", [](Config& c) { c.num_q_heads = 0; }, "num_q_heads=0"},
    {"negative query heads", [](Config& c) { c.num_q_heads = -4; }, "num_q_heads=-4"},
    {"no kv heads", [](Config& c) { c.num_kv_heads = 0; }, "num_kv_heads=0"},
    {"negative kv heads", [](Config& c) { c.num_kv_heads = -2; }, "num_kv_heads=-2"},
    {"query heads not a multiple", [](Config& c) { c.num_q_heads = 6, c.num_kv_heads = 4; }, "num_q_heads=6"},
    {"unsupported head dim", [](Config& c) { c.head_dim = 80; }, "head_dim=80"},
    {"zero head dim", [](Config& c) { c.head_dim = 0; }, "head_dim=0"},
    {"negative head dim", [](Config& c) { c.head_dim = -64; }, "head_dim=-64"},
    {"heads overflow int", [](Config& c) { c.num_q_heads = c.num_kv_heads = 1 << 30; }, "num_q_heads=1073741824"},
    {"zero rank", [](Config& c) { c.rank = 0; }, "rank=0"},
    {"negative rank", [](Config& c) { c.rank = -1; }, "rank=-1"},
    {"rank > H_kv*d", [](Config& c) { c.rank = 129; }, "rank=129"},
    {"zero chunk", [](Config& c) { c.chunk_size = 0; }, "chunk_size=0"},
    {"negative chunk", [](Config& c) { c.chunk_size = -8; }, "chunk_size=-8"},
    {"zero budget", [](Config& c) { c.sparse_budget = 0; }, "sparse_budget=0"},
    {"negative budget", [](Config& c) { c.sparse_budget = -16; }, "sparse_budget=-16"},
    {"budget not a multiple of the chunk", [](Config& c) { c.sparse_budget = 20; }, "sparse_budget=20"},
    {"largest budget not a multiple", [](Config& c) { c.sparse_budget = kIntMax; }, "sparse_budget=2147483647"},
    {"negative outliers", [](Config& c) { c.outlier_chunks = -2; }, "outlier_chunks=-2"},
    {"negative local chunks", [](Config& c) { c.local_chunks = -1; }, "local_chunks=-1"},
    {"value cache below the budget", [](Config& c) { c.value_cache_chunks = 1; }, "value_cache_chunks=1"},
    {"negative value cache", [](Config& c) { c.value_cache_chunks = -3; }, "value_cache_chunks=-3"},
    {"theta 1", [](Config& c) { c.rope.theta = 1.0; }, "rope.theta=1"},
    {"theta NaN", [](Config& c) { c.rope.theta = NAN; }, "rope.theta=nan"},
    {"odd rotary dim", [](Config& c) { c.rope.rotary_dim = 3; }, "rope.rotary_dim=3"},
    {"rotary dim > head dim", [](Config& c) { c.rope.rotary_dim = 66; }, "rope.rotary_dim=66"},
    {"unknown scaling", [](Config& c) { c.rope.scaling = static_cast<RopeScaling>(42); }, "rope.scaling=42"},
    {"unknown layout", [](Config& c) { c.rope.layout = static_cast<RopeLayout>(7); }, "rope.layout=7"},
    {"scaling factor < 1",
     [](Config& c) {
       c.rope.scaling = RopeScaling::linear;
       c.rope.factor = 0.5;
     },
     "rope.factor=0.5"},
    {"llama3 frequency band reversed",
     [](Config& c) {
       c.rope.scaling = RopeScaling::llama3;
       c.rope.factor = 8;
       c.rope.high_freq_factor = 0.5;
     },
     "rope.high_freq_factor=0.5"},
    {"yarn betas reversed",
     [](Config& c) {
       c.rope.scaling = RopeScaling::yarn;
       c.rope.factor = 4;
       c.rope.beta_fast = 0.5;
     },
     "rope.beta_fast=0.5"},
};

std::vector<BadCall> config_rows(const std::function<void(const Config&)>& entry) {
  std::vector<BadCall> rows;
  for (const ConfigCase& c : kConfigCases) {
    Config bad = small_config();
    c.mutate(bad);
    rows.push_back({c.what, [entry, bad] { entry(bad); }, {c.needle}});
  }
  return rows;
}

}  // namespace

TEST_CASE("invalid_input: Config, the SparseAttention constructor and the memory planner") {
  int cases = 0;
  const Config good = small_config();
  auto probe = [&] {
    CHECK_NOTHROW(good.validate());
    SparseAttention<ShadowKVPolicy> attn(good, 1);
    CHECK(attn.num_layers() == 1);
  };
  cases += run_table("Config::validate", config_rows([](const Config& c) { c.validate(); }), probe);
  cases += run_table("SparseAttention<ShadowKVPolicy>(config)",
                     config_rows([](const Config& c) { SparseAttention<ShadowKVPolicy>(c, 1); }), probe);
  cases += run_table("SparseAttention<DensePolicy, CpuBackend, bf16>(config)",
                     config_rows([](const Config& c) { SparseAttention<DensePolicy, CpuBackend, bf16>(c, 1); }), probe);
  cases += run_table(
      "SparseAttention(num_layers, host_memory)",
      {
          {"no layers", [&] { SparseAttention<ShadowKVPolicy>(good, 0); }, {"num_layers=0"}},
          {"negative layers", [&] { SparseAttention<OracleTopKPolicy>(good, -3); }, {"num_layers=-3"}},
          {"null host memory", [&] { SparseAttention<ShadowKVPolicy>(good, 1, nullptr); }, {"host_memory is null"}},
      },
      probe);

  // The planner: the same bad configs, then its own arguments. The probe compares a valid
  // plan with the one made before any bad call.
  const MemoryPlan want = plan_sequence<ShadowKVPolicy>(good, 2, 1000, 10, DType::bf16);
  auto plan_probe = [&] {
    const MemoryPlan got = plan_sequence<ShadowKVPolicy>(good, 2, 1000, 10, DType::bf16);
    CHECK(got.device_bytes == want.device_bytes);
    CHECK(got.host_bytes == want.host_bytes);
  };
  cases += run_table("plan_sequence(config)",
                     config_rows([](const Config& c) { plan_sequence<DensePolicy>(c, 1, 100, 0, DType::fp32); }),
                     plan_probe);
  cases += run_table(
      "plan_sequence / max_batch",
      {
          {"no layers", [&] { plan_sequence<DensePolicy>(good, 0, 100, 0, DType::fp32); }, {"num_layers=0"}},
          {"negative layers", [&] { plan_sequence<DensePolicy>(good, -1, 100, 0, DType::fp32); }, {"num_layers=-1"}},
          {"empty context", [&] { plan_sequence<DensePolicy>(good, 1, 0, 0, DType::fp32); }, {"context_length=0"}},
          {"negative context", [&] { plan_sequence<DensePolicy>(good, 1, -5, 0, DType::fp32); }, {"context_length=-5"}},
          {"negative generated",
           [&] { plan_sequence<DensePolicy>(good, 1, 100, -1, DType::fp32); },
           {"generated_tokens=-1"}},
          {"context shorter than the static set (shadowkv)",
           [&] { plan_sequence<ShadowKVPolicy>(good, 1, 15, 0, DType::fp32); },
           {"context_length=15", "16 tokens"}},
          {"context shorter than the static set (oracle)",
           [&] { plan_sequence<OracleTopKPolicy>(good, 1, 8, 0, DType::fp32); },
           {"context_length=8"}},
          {"bytes past size_t (dense)",
           [&] { plan_sequence<DensePolicy>(good, kIntMax, index_t{1} << 60, 0, DType::fp32); },
           {"context_length=1152921504606846976", "num_layers=2147483647"}},
          {"bytes past size_t (shadowkv)",
           [&] { plan_sequence<ShadowKVPolicy>(good, 64, index_t{1} << 62, index_t{1} << 62, DType::fp32); },
           {"context_length=4611686018427387904", "generated_tokens=4611686018427387904"}},
          {"a plan of no bytes", [&] { max_batch(MemoryPlan{}, 1 << 30, 1 << 30); }, {"per_sequence"}},
      },
      plan_probe);
  MESSAGE("config, constructor and planner: ", cases, " invalid calls");
}

TEST_CASE("invalid_input: LowRankKeyStore") {
  using Store = LowRankKeyStore<CpuBackend, float>;
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  int cases = run_table("LowRankKeyStore(num_kv_heads, head_dim, rank)",
                        {
                            {"no heads", [] { Store(0, 64, 8); }, {"num_kv_heads=0"}},
                            {"negative heads", [] { Store(-2, 64, 8); }, {"num_kv_heads=-2"}},
                            {"no head dim", [] { Store(2, 0, 8); }, {"head_dim=0"}},
                            {"zero rank", [] { Store(2, 64, 0); }, {"rank=0"}},
                            {"rank > H_kv*d", [] { Store(2, 64, 129); }, {"rank=129"}},
                            {"H_kv*d past int", [] { Store(1 << 20, 1 << 20, 8); }, {"num_kv_heads=1048576"}},
                        });

  const auto keys = random_rows<float>(rng, 40, 2, 64);
  Store store(2, 64, 8);
  store.build(keys.view());
  std::vector<index_t> all(40);
  std::iota(all.begin(), all.end(), 0);
  auto rebuild = [&](int h) {
    std::vector<float> out(40 * 64);
    store.reconstruct(h, all, out.data());
    return out;
  };
  const std::vector<float> want0 = rebuild(0), want1 = rebuild(1);
  auto probe = [&] {
    CHECK(store.size() == 40);
    CHECK(same_bits(rebuild(0), want0));
    CHECK(same_bits(rebuild(1), want1));
  };
  const auto wrong_heads = random_rows<float>(rng, 10, 3, 64);
  const auto wrong_dim = random_rows<float>(rng, 10, 2, 32);
  const TensorView<const float, 3> null_keys(nullptr, {10, 2, 64});
  const TensorView<const float, 3> strided(keys.data.data(), {10, 2, 64}, {256, 64, 2});
  const TensorView<const float, 3> negative(keys.data.data(), {-3, 2, 64});
  const TensorView<const float, 3> no_rows(keys.data.data(), {0, 2, 64});
  std::vector<float> out(64);
  const index_t minus_one[] = {-1}, forty[] = {40}, zero[] = {0};
  cases += run_table(
      "LowRankKeyStore methods",
      {
          {"build: wrong heads", [&] { store.build(wrong_heads.view()); }, {"keys_pre_rope has shape [10, 3, 64]"}},
          {"build: wrong head dim", [&] { store.build(wrong_dim.view()); }, {"keys_pre_rope has shape [10, 2, 32]"}},
          {"build: null", [&] { store.build(null_keys); }, {"keys_pre_rope is null"}},
          {"build: strided", [&] { store.build(strided); }, {"keys_pre_rope must be contiguous"}},
          {"build: negative rows", [&] { store.build(negative); }, {"keys_pre_rope has a negative extent"}},
          {"build: no rows", [&] { store.build(no_rows); }, {"keys_pre_rope has no rows"}},
          {"accumulate: wrong heads", [&] { store.accumulate(wrong_heads.view()); }, {"keys_pre_rope has shape"}},
          {"accumulate: null", [&] { store.accumulate(null_keys); }, {"keys_pre_rope is null"}},
          {"finalize without accumulate", [&] { store.finalize_basis(); }, {"finalize_basis() called before"}},
          {"append: wrong dim", [&] { store.append(wrong_dim.view()); }, {"keys_pre_rope has shape"}},
          {"append: strided", [&] { store.append(strided); }, {"keys_pre_rope must be contiguous"}},
          {"reconstruct: negative head", [&] { store.reconstruct(-1, zero, out.data()); }, {"kv_head=-1"}},
          {"reconstruct: head out of range", [&] { store.reconstruct(2, zero, out.data()); }, {"kv_head=2"}},
          {"reconstruct: negative position",
           [&] { store.reconstruct(0, minus_one, out.data()); },
           {"position -1 out of range [0, 40)"}},
          {"reconstruct: position past the end",
           [&] { store.reconstruct(1, forty, out.data()); },
           {"position 40 out of range"}},
          {"reconstruct: null output", [&] { store.reconstruct(0, zero, nullptr); }, {"out is null"}},
          {"append without a basis", [&] { Store(2, 64, 8).append(keys.view()); }, {"needs a basis"}},
      },
      probe);
  MESSAGE("LowRankKeyStore: ", cases, " invalid calls");
}

TEST_CASE("invalid_input: LandmarkIndex") {
  using Index = LandmarkIndex<CpuBackend, float>;
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  int cases = run_table("LandmarkIndex(num_kv_heads, head_dim, chunk_size)",
                        {
                            {"no heads", [] { Index(0, 64, 4); }, {"num_kv_heads=0"}},
                            {"no head dim", [] { Index(2, 0, 4); }, {"head_dim=0"}},
                            {"zero chunk", [] { Index(2, 64, 0); }, {"chunk_size=0"}},
                            {"negative chunk", [] { Index(2, 64, -4); }, {"chunk_size=-4"}},
                        });

  const auto keys = random_rows<float>(rng, 48, 2, 64);  // 12 chunks of 4
  Index index(2, 64, 4);
  index.build(keys.view(), 2);
  const auto queries = random_rows<float>(rng, 1, 4, 64);
  const TensorView<const float, 2> q(queries.data.data(), {4, 64});
  auto scores_of = [&] {
    std::vector<float> s(2 * 10);
    index.score(q, 0.125f, TensorView<float, 2>(s.data(), {2, 10}));
    return s;
  };
  const std::vector<float> want_scores = scores_of();
  const std::vector<std::int32_t> want_ids(index.landmark_chunk_ids(1).begin(), index.landmark_chunk_ids(1).end());
  auto probe = [&] {
    CHECK(index.num_landmarks() == 10);
    CHECK(same_bits(scores_of(), want_scores));
    CHECK(std::vector<std::int32_t>(index.landmark_chunk_ids(1).begin(), index.landmark_chunk_ids(1).end()) ==
          want_ids);
  };
  const TensorView<const float, 3> ten_tokens(keys.data.data(), {10, 2, 64});
  const auto wrong_heads = random_rows<float>(rng, 8, 3, 64);
  const TensorView<const float, 3> null_keys(nullptr, {8, 2, 64});
  const TensorView<const float, 3> strided(keys.data.data(), {8, 2, 64}, {256, 64, 2});
  std::vector<float> buf(4 * 64), scores(2 * 10);
  std::vector<std::int32_t> sel(2 * 3);
  const TensorView<const float, 2> scores_view(scores.data(), {2, 10});
  cases += run_table(
      "LandmarkIndex methods",
      {
          {"build: tokens not a multiple of the chunk",
           [&] { index.build(ten_tokens, 0); },
           {"keys_post_rope has 10 tokens", "chunk_size=4"}},
          {"build: negative outliers", [&] { index.build(keys.view(), -1); }, {"num_outlier_chunks=-1"}},
          {"build: more outliers than chunks", [&] { index.build(keys.view(), 13); }, {"num_outlier_chunks=13"}},
          {"build: wrong heads", [&] { index.build(wrong_heads.view(), 0); }, {"keys_post_rope has shape [8, 3, 64]"}},
          {"build: null", [&] { index.build(null_keys, 0); }, {"keys_post_rope is null"}},
          {"build: strided", [&] { index.build(strided, 0); }, {"keys_post_rope must be contiguous"}},
          {"score: heads not a multiple of H_kv",
           [&] {
             index.score(TensorView<const float, 2>(buf.data(), {3, 64}), 1.0f,
                         TensorView<float, 2>(scores.data(), {2, 10}));
           },
           {"queries has 3 heads", "num_kv_heads=2"}},
          {"score: no heads",
           [&] {
             index.score(TensorView<const float, 2>(buf.data(), {0, 64}), 1.0f,
                         TensorView<float, 2>(scores.data(), {2, 10}));
           },
           {"queries has 0 heads"}},
          {"score: wrong head dim",
           [&] {
             index.score(TensorView<const float, 2>(buf.data(), {4, 32}), 1.0f,
                         TensorView<float, 2>(scores.data(), {2, 10}));
           },
           {"queries has shape [4, 32]"}},
          {"score: scores of the wrong shape",
           [&] {
             index.score(q, 1.0f, TensorView<float, 2>(scores.data(), {2, 9}));
           },
           {"scores has shape [2, 9]"}},
          {"score: null scores",
           [&] {
             index.score(q, 1.0f, TensorView<float, 2>(nullptr, {2, 10}));
           },
           {"scores is null"}},
          {"select_top_k: negative k",
           [&] {
             Index::select_top_k(scores_view, -1, TensorView<std::int32_t, 2>(sel.data(), {2, 0}));
           },
           {"k=-1"}},
          {"select_top_k: selected of the wrong shape",
           [&] {
             Index::select_top_k(scores_view, 3, TensorView<std::int32_t, 2>(sel.data(), {2, 2}));
           },
           {"selected has shape [2, 2]", "k=3"}},
          {"select_top_k: null scores",
           [&] {
             Index::select_top_k(TensorView<const float, 2>(nullptr, {2, 10}), 3,
                                 TensorView<std::int32_t, 2>(sel.data(), {2, 3}));
           },
           {"scores is null"}},
          {"outlier ids of a head out of range", [&] { (void)index.outlier_chunk_ids(2); }, {"kv_head=2"}},
          {"landmark ids of a negative head", [&] { (void)index.landmark_chunk_ids(-1); }, {"kv_head=-1"}},
          {"landmarks of a head out of range", [&] { (void)index.landmarks(5); }, {"kv_head=5"}},
          {"chunk_min_cosine: zero chunk", [&] { (void)Index::chunk_min_cosine(keys.view(), 0); }, {"chunk_size=0"}},
          {"chunk_min_cosine: negative chunk",
           [&] { (void)Index::chunk_min_cosine(keys.view(), -8); },
           {"chunk_size=-8"}},
          {"chunk_min_cosine: null", [&] { (void)Index::chunk_min_cosine(null_keys, 4); }, {"keys_post_rope is null"}},
      },
      probe);
  MESSAGE("LandmarkIndex: ", cases, " invalid calls");
}

TEST_CASE("invalid_input: OffloadedValuePool") {
  using Pool = OffloadedValuePool<CpuBackend, float>;
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  int cases = run_table(
      "OffloadedValuePool(num_kv_heads, head_dim, chunk_size, num_chunks, capacity, host_memory)",
      {
          {"no heads", [] { Pool(0, 64, 4, 10, 4); }, {"num_kv_heads=0"}},
          {"no head dim", [] { Pool(2, 0, 4, 10, 4); }, {"head_dim=0"}},
          {"zero chunk", [] { Pool(2, 64, 0, 10, 4); }, {"chunk_size=0"}},
          {"negative chunks", [] { Pool(2, 64, 4, -1, 4); }, {"num_chunks=-1"}},
          {"zero capacity", [] { Pool(2, 64, 4, 10, 0); }, {"capacity=0"}},
          {"negative capacity", [] { Pool(2, 64, 4, 10, -2); }, {"capacity=-2"}},
          {"null host memory", [] { Pool(2, 64, 4, 10, 4, nullptr); }, {"host_memory is null"}},
          {"elements past size_t", [] { Pool(2, 64, 4, index_t{1} << 60, 4); }, {"num_chunks=1152921504606846976"}},
          {"more than memory holds",
           [] { Pool(2, 64, 4, index_t{1} << 50, 4); },
           {"out of memory", "num_chunks=1125899906842624"}},
      });

  Pool pool(2, 64, 4, 10, 4);
  const auto values = random_rows<float>(rng, 10 * 4 * 2, 1, 64);  // [2 heads, 10 chunks, 4, 64]
  for (int h = 0; h < 2; ++h)
    for (index_t ch = 0; ch < 10; ++ch)
      pool.store(h, ch, TensorView<const float, 2>(values.data.data() + ((h * 10 + ch) * 4) * 64, {4, 64}));
  // The probe fetches chunks 1 and 2 of head 1: the values in their slots are the stored ones,
  // and after the first probe both are hits. A bad call must not have counted or moved anything.
  std::int64_t requested = 0;
  auto probe = [&] {
    const std::int32_t chunks[] = {1, 2};
    std::int32_t slots[2];
    std::vector<std::int32_t> missed;
    pool.fetch(1, chunks, slots, missed);
    requested += 2;
    CHECK(pool.stats().requested == requested);
    CHECK(missed.size() == (requested == 2 ? 2u : 0u));
    for (int i = 0; i < 2; ++i)
      CHECK(std::memcmp(pool.slot(1, slots[i]), pool.host_chunk(1, chunks[i]), 4 * 64 * 4) == 0);
  };
  probe();
  std::vector<std::int32_t> slots(5), missed;
  const std::vector<std::int32_t> five = {0, 1, 2, 3, 4}, dup = {1, 3, 1}, past = {2, 10}, negative = {-1, 2};
  const TensorView<const float, 2> chunk(values.data.data(), {4, 64});
  cases += run_table(
      "OffloadedValuePool methods",
      {
          {"store: head out of range", [&] { pool.store(2, 0, chunk); }, {"kv_head=2"}},
          {"store: negative chunk", [&] { pool.store(0, -1, chunk); }, {"chunk=-1"}},
          {"store: chunk out of range", [&] { pool.store(0, 10, chunk); }, {"chunk=10", "num_chunks=10"}},
          {"store: values of the wrong shape",
           [&] {
             pool.store(0, 1, TensorView<const float, 2>(values.data.data(), {3, 64}));
           },
           {"values has shape [3, 64]"}},
          {"store: null values",
           [&] {
             pool.store(0, 1, TensorView<const float, 2>(nullptr, {4, 64}));
           },
           {"values is null"}},
          {"fetch: one slot short",
           [&] { pool.fetch(0, std::span(dup).first(2), std::span(slots).first(1), missed); },
           {"slots has 1 entries"}},
          {"fetch: more chunks than capacity",
           [&] { pool.fetch(0, five, slots, missed); },
           {"selection of 5 chunks exceeds capacity=4"}},
          {"fetch: a chunk twice",
           [&] { pool.fetch(0, dup, std::span(slots).first(3), missed); },
           {"chunk 1 appears twice"}},
          {"fetch: chunk out of range",
           [&] { pool.fetch(0, past, std::span(slots).first(2), missed); },
           {"chunks[1]=10"}},
          {"fetch: negative chunk",
           [&] { pool.fetch(1, negative, std::span(slots).first(2), missed); },
           {"chunks[0]=-1"}},
          {"fetch: negative head", [&] { pool.fetch(-1, past, std::span(slots).first(2), missed); }, {"kv_head=-1"}},
          {"slot_of: chunk out of range", [&] { (void)pool.slot_of(0, 12); }, {"chunk=12"}},
          {"slot: out of range", [&] { (void)pool.slot(0, 4); }, {"slot=4", "capacity=4"}},
          {"slot: negative", [&] { (void)pool.slot(1, -1); }, {"slot=-1"}},
          {"slot: head out of range", [&] { (void)pool.slot(2, 0); }, {"kv_head=2"}},
          {"host_chunk: out of range", [&] { (void)pool.host_chunk(0, 10); }, {"chunk=10"}},
          {"host_chunk: head out of range", [&] { (void)pool.host_chunk(3, 0); }, {"kv_head=3"}},
      },
      probe);
  CHECK(missed.empty());
  MESSAGE("OffloadedValuePool: ", cases, " invalid calls");
}

namespace {

/// Two SparseAttention objects fed the same valid calls; the bad calls go to `attn` only, and
/// the probe decodes one step of sequence 1 in both and compares the outputs bit for bit.
/// Sequences: 1 prefilled (40 tokens), 2 staged on both layers (24), 3 staged on layer 0 only
/// (16), 4 staged (8 tokens: shorter than the static set of 16), 5 empty.
template <class Policy>
struct Twins {
  static constexpr int kLayers = 2;
  Config cfg = small_config();
  SparseAttention<Policy> attn{cfg, kLayers}, twin{cfg, kLayers};
  std::mt19937_64 rng;

  explicit Twins(std::uint64_t seed) : rng(seed) {
    for (SeqId id : {1, 2, 3, 4, 5}) both([&](auto& a) { a.add_sequence(id); });
    prefill(1, 0, 40);
    prefill(1, 1, 40);
    both([](auto& a) { a.finish_prefill(1); });
    prefill(2, 0, 24);
    prefill(2, 1, 24);
    prefill(3, 0, 16);
    prefill(4, 0, 8);
    prefill(4, 1, 8);
  }

  template <class F>
  void both(F&& f) {
    f(attn);
    f(twin);
  }

  void prefill(SeqId id, int layer, index_t n) {
    const auto k = random_rows<float>(rng, n, cfg.num_kv_heads, cfg.head_dim);
    const auto v = random_rows<float>(rng, n, cfg.num_kv_heads, cfg.head_dim);
    both([&](auto& a) { a.prefill(id, layer, {}, k.view(), v.view(), {}); });
  }

  /// One decode step of `id` (every layer) in both; the outputs must be equal bit for bit.
  void probe(SeqId id = 1) {
    for (int l = 0; l < kLayers; ++l) {
      const auto q = random_rows<float>(rng, 1, cfg.num_q_heads, cfg.head_dim);
      const auto k = random_rows<float>(rng, 1, cfg.num_kv_heads, cfg.head_dim);
      const auto v = random_rows<float>(rng, 1, cfg.num_kv_heads, cfg.head_dim);
      auto out_a = skv_test::output_rows<float>(1, cfg.num_q_heads, cfg.head_dim);
      auto out_b = out_a;
      const SeqId ids[] = {id};
      attn.decode(l, ids, q.view(), k.view(), v.view(), out_a.mut());
      twin.decode(l, ids, q.view(), k.view(), v.view(), out_b.mut());
      CHECK(same_bits(out_a.data, out_b.data));
    }
    CHECK(attn.length(id) == twin.length(id));
    CHECK(attn.memory(id).device_bytes == twin.memory(id).device_bytes);
    CHECK(attn.memory(id).host_bytes == twin.memory(id).host_bytes);
  }
};

template <class Policy>
int sparse_attention_table(std::uint64_t seed) {
  constexpr bool kSparse = Policy::selection != ChunkSelection::all;
  Twins<Policy> t(seed);
  auto& attn = t.attn;
  const int hq = 4, hkv = 2, d = 64;
  std::mt19937_64& rng = t.rng;
  const auto k8 = random_rows<float>(rng, 8, hkv, d), v8 = random_rows<float>(rng, 8, hkv, d);
  const auto q8 = random_rows<float>(rng, 8, hq, d);
  auto out8 = skv_test::output_rows<float>(8, hq, d);
  const auto k8_wrong_heads = random_rows<float>(rng, 8, 3, d), k8_wrong_dim = random_rows<float>(rng, 8, hkv, 32);
  const auto v7 = random_rows<float>(rng, 7, hkv, d);
  const TensorView<const float, 3> k8_strided(k8.data.data(), {4, hkv, d}, {2 * hkv * d, d, 1});
  const TensorView<const float, 3> k_negative(k8.data.data(), {-3, hkv, d});
  const auto q1 = random_rows<float>(rng, 1, hq, d), q2 = random_rows<float>(rng, 2, hq, d);
  const auto k1 = random_rows<float>(rng, 1, hkv, d), k2 = random_rows<float>(rng, 2, hkv, d);
  auto out1 = skv_test::output_rows<float>(1, hq, d);
  auto out2 = skv_test::output_rows<float>(2, hq, d);
  const SeqId one[] = {1}, twice[] = {1, 1}, unknown[] = {1, 99}, staged[] = {2}, ones_pair[] = {1, 2};
  const TensorView<float, 3> out1_strided(out2.data.data(), {1, hq, d}, {2 * hq * d, 2 * d, 2});
  std::vector<BadCall> rows = {
      {"add_sequence: duplicate id", [&] { attn.add_sequence(1); }, {"sequence id=1 already exists"}},
      {"remove_sequence: unknown id", [&] { attn.remove_sequence(99); }, {"unknown sequence id=99"}},
      {"prefill: unknown id", [&] { attn.prefill(99, 0, {}, k8.view(), v8.view(), {}); }, {"unknown sequence id=99"}},
      {"prefill: negative layer", [&] { attn.prefill(2, -1, {}, k8.view(), v8.view(), {}); }, {"layer=-1"}},
      {"prefill: layer out of range", [&] { attn.prefill(2, 2, {}, k8.view(), v8.view(), {}); }, {"layer=2"}},
      {"prefill: keys with the wrong heads",
       [&] { attn.prefill(2, 0, {}, k8_wrong_heads.view(), v8.view(), {}); },
       {"keys_pre_rope has shape [8, 3, 64]"}},
      {"prefill: keys with the wrong head dim",
       [&] { attn.prefill(2, 0, {}, k8_wrong_dim.view(), v8.view(), {}); },
       {"keys_pre_rope has shape [8, 2, 32]"}},
      {"prefill: strided keys",
       [&] { attn.prefill(2, 0, {}, k8_strided, v8.view(), {}); },
       {"keys_pre_rope must be contiguous"}},
      {"prefill: negative token count",
       [&] { attn.prefill(2, 0, {}, k_negative, v8.view(), {}); },
       {"keys_pre_rope has a negative extent"}},
      {"prefill: fewer values than keys",
       [&] { attn.prefill(2, 1, {}, k8.view(), v7.view(), {}); },
       {"values has shape [7, 2, 64]"}},
      {"prefill: null values",
       [&] {
         attn.prefill(2, 1, {}, k8.view(), TensorView<const float, 3>(nullptr, {8, hkv, d}), {});
       },
       {"values is null"}},
      {"prefill: queries without out",
       [&] { attn.prefill(2, 0, q8.view(), k8.view(), v8.view(), {}); },
       {"queries and out"}},
      {"prefill: queries for fewer tokens",
       [&] { attn.prefill(2, 0, q1.view(), k8.view(), v8.view(), out1.mut()); },
       {"queries has shape [1, 4, 64]"}},
      {"prefill: out of the wrong shape",
       [&] {
         attn.prefill(2, 0, q8.view(), k8.view(), v8.view(), TensorView<float, 3>(out8.data.data(), {8, 2, 128}));
       },
       {"out has shape [8, 2, 128]"}},
      {"prefill: after finish_prefill",
       [&] { attn.prefill(1, 0, {}, k8.view(), v8.view(), {}); },
       {"sequence id=1 is already prefilled"}},
      {"finish_prefill: unknown id", [&] { attn.finish_prefill(99); }, {"unknown sequence id=99"}},
      {"finish_prefill: twice", [&] { attn.finish_prefill(1); }, {"sequence id=1 is already prefilled"}},
      {"finish_prefill: layers of different lengths",
       [&] { attn.finish_prefill(3); },
       {"sequence id=3", "layer 1 has 0 prompt tokens", "layer 0 has 16"}},
      {"finish_prefill: empty prompt", [&] { attn.finish_prefill(5); }, {"sequence id=5", "context_length=0"}},
      {"decode: negative layer",
       [&] { attn.decode(-1, one, q1.view(), k1.view(), k1.view(), out1.mut()); },
       {"layer=-1"}},
      {"decode: layer out of range",
       [&] { attn.decode(2, one, q1.view(), k1.view(), k1.view(), out1.mut()); },
       {"layer=2"}},
      {"decode: unknown id",
       [&] { attn.decode(0, unknown, q2.view(), k2.view(), k2.view(), out2.mut()); },
       {"unknown sequence id=99"}},
      {"decode: duplicate id",
       [&] { attn.decode(0, twice, q2.view(), k2.view(), k2.view(), out2.mut()); },
       {"sequence id=1 appears twice"}},
      {"decode: not prefilled",
       [&] { attn.decode(1, staged, q1.view(), k1.view(), k1.view(), out1.mut()); },
       {"sequence id=2 is not prefilled"}},
      {"decode: one prefilled, one not",
       [&] { attn.decode(0, ones_pair, q2.view(), k2.view(), k2.view(), out2.mut()); },
       {"sequence id=2 is not prefilled"}},
      {"decode: queries for another batch size",
       [&] { attn.decode(0, one, q2.view(), k1.view(), k1.view(), out1.mut()); },
       {"queries has shape [2, 4, 64]"}},
      {"decode: keys with the wrong heads",
       [&] {
         attn.decode(0, one, q1.view(), TensorView<const float, 3>(k2.data.data(), {1, 4, d}), k1.view(), out1.mut());
       },
       {"keys_pre_rope has shape [1, 4, 64]"}},
      {"decode: null values",
       [&] {
         attn.decode(0, one, q1.view(), k1.view(), TensorView<const float, 3>(nullptr, {1, hkv, d}), out1.mut());
       },
       {"values is null"}},
      {"decode: out of the wrong shape",
       [&] {
         attn.decode(0, one, q1.view(), k1.view(), k1.view(), TensorView<float, 3>(out2.data.data(), {1, 2, 128}));
       },
       {"out has shape [1, 2, 128]"}},
      {"decode: strided out",
       [&] { attn.decode(0, one, q1.view(), k1.view(), k1.view(), out1_strided); },
       {"out must be contiguous"}},
      {"length: layer out of range", [&] { (void)attn.length(1, 5); }, {"layer=5"}},
      {"length: unknown id", [&] { (void)attn.length(99); }, {"unknown sequence id=99"}},
      {"prompt_length: unknown id", [&] { (void)attn.prompt_length(99); }, {"unknown sequence id=99"}},
      {"is_prefilled: unknown id", [&] { (void)attn.is_prefilled(99); }, {"unknown sequence id=99"}},
      {"memory: unknown id", [&] { (void)attn.memory(99); }, {"unknown sequence id=99"}},
      {"last_selection: head out of range", [&] { (void)attn.last_selection(1, 0, 7); }, {"kv_head=7"}},
      {"last_selection: layer out of range", [&] { (void)attn.last_selection(1, 9, 0); }, {"layer=9"}},
      {"key_store: negative layer", [&] { (void)attn.key_store(1, -1); }, {"layer=-1"}},
      {"value_pool: unknown id", [&] { (void)attn.value_pool(99, 0); }, {"unknown sequence id=99"}},
  };
  if constexpr (kSparse)
    rows.push_back({"finish_prefill: context shorter than the static set",
                    [&] { attn.finish_prefill(4); },
                    {"context_length=8", "sequence id=4", "16 tokens"}});
  t.probe();
  const int cases =
      run_table(std::string("SparseAttention<") + std::string(Policy::name) + ">", rows, [&] { t.probe(); });
  // The staged sequences still finish and decode like their twins.
  t.prefill(3, 1, 16);
  t.prefill(4, 0, 16);
  t.prefill(4, 1, 16);
  for (SeqId id : {2, 3, 4}) {
    t.both([&](auto& a) { a.finish_prefill(id); });
    t.probe(id);
  }
  return cases;
}

}  // namespace

TEST_CASE("invalid_input: SparseAttention with each policy") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  int cases = sparse_attention_table<ShadowKVPolicy>(seed);
  cases += sparse_attention_table<DensePolicy>(seed + 1);
  cases += sparse_attention_table<OracleTopKPolicy>(seed + 2);
  MESSAGE("SparseAttention: ", cases, " invalid calls over the three policies");
}

TEST_CASE("invalid_input: the largest sizes a Config accepts compute without overflow") {
  // Valid, if absurd: resolved outliers and the static set are computed in 64 bits (UBSan
  // checks the arithmetic in the sanitizer build).
  Config cfg;
  cfg.chunk_size = 1;
  cfg.sparse_budget = kIntMax;
  cfg.local_chunks = kIntMax;
  CHECK_NOTHROW(cfg.validate());
  CHECK(cfg.resolved_outlier_chunks() == static_cast<int>(24LL * kIntMax / 1024));
  CHECK(cfg.min_context() == index_t{kIntMax} + cfg.resolved_outlier_chunks());
  // A plan that large is refused naming the context, not wrapped around.
  CHECK_NOTHROW(plan_sequence<DensePolicy>(cfg, 1, 1 << 20, 0, DType::fp32));
  skv_test::check_error([&] { plan_sequence<ShadowKVPolicy>(cfg, 1, 1 << 20, 0, DType::fp32); },
                        {"context_length=1048576", "shorter than the static set"});
}

TEST_SUITE_END();
