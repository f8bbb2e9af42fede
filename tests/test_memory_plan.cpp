// The memory planner predicts exactly the bytes the components allocate.

#include "test_util.hpp"

using namespace shadowkv;

TEST_SUITE_BEGIN("memory_plan");

namespace {

template <class Policy, class T>
void check_plan(std::mt19937_64& rng, const Config& cfg, int layers, index_t prompt, index_t steps) {
  SparseAttention<Policy, CpuBackend, T> attn(cfg, layers);
  const int d = cfg.head_dim, hq = cfg.num_q_heads, hkv = cfg.num_kv_heads;
  const auto k = skv_test::random_vector<T>(rng, (prompt + steps) * hkv * d);
  const auto v = skv_test::random_vector<T>(rng, (prompt + steps) * hkv * d);
  const auto q = skv_test::random_vector<T>(rng, hq * d);
  attn.add_sequence(1);
  for (int l = 0; l < layers; ++l)
    attn.prefill(1, l, {}, TensorView<const T, 3>(k.data(), {prompt, hkv, d}),
                 TensorView<const T, 3>(v.data(), {prompt, hkv, d}), {});
  attn.finish_prefill(1);
  std::vector<T> out(hq * d);
  const SeqId ids[] = {1};
  for (index_t s = 0; s < steps; ++s)
    for (int l = 0; l < layers; ++l)
      attn.decode(l, ids, TensorView<const T, 3>(q.data(), {1, hq, d}),
                  TensorView<const T, 3>(k.data() + (prompt + s) * hkv * d, {1, hkv, d}),
                  TensorView<const T, 3>(v.data() + (prompt + s) * hkv * d, {1, hkv, d}),
                  TensorView<T, 3>(out.data(), {1, hq, d}));
  const MemoryUsage used = attn.memory(1);
  const MemoryPlan plan = plan_sequence<Policy>(cfg, layers, prompt, steps, dtype_of<T>());
  CAPTURE(Policy::name);
  CAPTURE(dtype_name<T>());
  CAPTURE(prompt);
  CAPTURE(steps);
  CHECK(used.device_bytes == plan.device_bytes);
  CHECK(used.host_bytes == plan.host_bytes);
  CHECK(used.device_bytes > 0);
}

}  // namespace

TEST_CASE("memory_plan: predicted bytes equal what every policy allocates") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 6; ++trial) {
    Config cfg;
    cfg.num_kv_heads = 1 + static_cast<int>(rng() % 2);
    cfg.num_q_heads = cfg.num_kv_heads * (1 + static_cast<int>(rng() % 3));
    cfg.head_dim = trial % 2 ? 64 : 128;
    cfg.rank = 8 + static_cast<int>(rng() % 32);
    cfg.chunk_size = 1 + static_cast<int>(rng() % 8);
    cfg.sparse_budget = cfg.chunk_size * (1 + static_cast<int>(rng() % 6));
    cfg.outlier_chunks = static_cast<int>(rng() % 3);
    cfg.local_chunks = static_cast<int>(rng() % 3);
    cfg.value_cache_chunks = rng() % 2 ? 0 : cfg.budget_chunks() + static_cast<int>(rng() % 5);
    const index_t prompt = cfg.min_context() + 1 + static_cast<index_t>(rng() % 150);
    const index_t steps = static_cast<index_t>(rng() % 5);
    const int layers = 1 + static_cast<int>(rng() % 2);
    CAPTURE(trial);
    check_plan<ShadowKVPolicy, float>(rng, cfg, layers, prompt, steps);
    check_plan<ShadowKVPolicy, bf16>(rng, cfg, layers, prompt, steps);
    check_plan<DensePolicy, fp16>(rng, cfg, layers, prompt, steps);
    check_plan<OracleTopKPolicy, float>(rng, cfg, layers, prompt, steps);
  }
}

TEST_CASE("memory_plan: Llama-3.1-8B at 128K: ShadowKV needs far less device memory than dense") {
  const Config cfg;  // 32 q / 8 kv heads, d 128, rank 160, budget 2048
  const MemoryPlan dense = plan_sequence<DensePolicy>(cfg, 32, 131072, 0, DType::bf16);
  const MemoryPlan shadow = plan_sequence<ShadowKVPolicy>(cfg, 32, 131072, 0, DType::bf16);
  CHECK(dense.device_bytes == std::size_t{2} * 8 * 131072 * 128 * 2 * 32);  // 16 GiB
  CHECK(dense.host_bytes == 0);
  CHECK(shadow.device_bytes * 5 < dense.device_bytes);
  // Values of every non-static chunk live on the host: about half of the dense cache.
  CHECK(shadow.host_bytes > dense.device_bytes * 45 / 100);
  CHECK(shadow.host_bytes < dense.device_bytes / 2);
}

TEST_CASE("memory_plan: max_batch is bounded by the tighter budget") {
  const MemoryPlan p{100, 1000};
  CHECK(max_batch(p, 10'000, 1'000'000) == 100);
  CHECK(max_batch(p, 1'000'000, 10'000) == 10);
  CHECK(max_batch(p, 99, 1'000'000) == 0);
  CHECK(max_batch(MemoryPlan{100, 0}, 1'000, 0) == 10);  // no host memory needed
  CHECK_THROWS_AS(max_batch(MemoryPlan{0, 0}, 1, 1), Error);
}

TEST_CASE("memory_plan: invalid arguments throw naming them") {
  const Config cfg;
  auto what = [](auto&& fn) { return skv_test::error_message(fn); };
  CHECK(what([&] { plan_sequence<ShadowKVPolicy>(cfg, 32, 100, 0, DType::bf16); }).find("context_length=100") !=
        std::string::npos);
  CHECK(what([&] { plan_sequence<DensePolicy>(cfg, 0, 100, 0, DType::bf16); }).find("num_layers=0") !=
        std::string::npos);
  CHECK(what([&] { plan_sequence<DensePolicy>(cfg, 1, 100, -1, DType::bf16); }).find("generated_tokens=-1") !=
        std::string::npos);
  Config bad = cfg;
  bad.rank = 5000;
  CHECK(what([&] { plan_sequence<DensePolicy>(bad, 1, 100, 0, DType::bf16); }).find("rank=5000") !=
        std::string::npos);
  CHECK_NOTHROW(plan_sequence<DensePolicy>(cfg, 1, 100, 0, DType::bf16));  // dense has no static set
}

TEST_SUITE_END();
