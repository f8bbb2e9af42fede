// `SparseAttention<Policy, CudaBackend, T>` against `SparseAttention<Policy, CpuBackend, T>` on
// the same fresh random inputs: a ragged batch of sequences, several layers, chunked prefill with
// and without queries, decode steps with every sequence in one call; every head dim, G = 1 and
// larger groups, fp32/bf16/fp16, the three policies. Outputs are poisoned before each call.
//
// - Exact configurations (full rank, every chunk selected): outputs within the dtype tolerance of
//   the CPU backend, the same hit/miss counts, memory() equal to the CPU backend and the planner.
// - Partial budgets (misses and hits across steps, LRU evictions): the selections equal the CPU
//   backend's for at least 95% of (sequence, layer, head) and every output row whose selection
//   matches is within tolerance (float rounding can flip a near-tie in the top-k).
// - The low-rank store on a planted low-rank spectrum: the GPU's A·B equals the CPU's, and the
//   streaming build equals the one-shot build.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;
using skv_test::rel_error;
using skv_test::to_double;

TEST_SUITE_BEGIN("gpu_sparse_attention");

namespace {

using TestStream = skv_gpu_test::Stream;

/// Device copy of a host vector, uploaded on `stream` (the host vector must outlive the copy:
/// callers synchronise before it goes).
template <class T>
class Device {
 public:
  Device(const std::vector<T>& h, cudaStream_t stream) : buf_(h.size()) {
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(buf_.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  explicit Device(std::size_t n) : buf_(n) {}
  T* get() const { return buf_.get(); }
  std::vector<T> download(cudaStream_t stream) const {
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<T> h(buf_.size());
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(h.data(), buf_.get(), h.size() * sizeof(T), cudaMemcpyDeviceToHost, stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    return h;
  }
  void poison(cudaStream_t stream) {
    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(buf_.get(), 0xff, buf_.size() * sizeof(T), stream));
  }

 private:
  skv_gpu_test::DeviceBuffer<T> buf_;
};

/// One sequence's inputs: per layer, q `[n, H_q, d]`, k and v `[n, H_kv, d]` for n = prompt +
/// steps tokens.
template <class T>
struct SequenceInputs {
  index_t prompt = 0;
  std::vector<std::vector<T>> q, k, v;
};

template <class T>
SequenceInputs<T> make_inputs(std::mt19937_64& rng, const Config& cfg, int layers, index_t prompt, index_t steps) {
  SequenceInputs<T> in;
  in.prompt = prompt;
  const std::size_t n = static_cast<std::size_t>(prompt + steps);
  for (int l = 0; l < layers; ++l) {
    in.q.push_back(skv_test::random_vector<T>(rng, n * cfg.num_q_heads * cfg.head_dim));
    in.k.push_back(skv_test::random_vector<T>(rng, n * cfg.num_kv_heads * cfg.head_dim));
    in.v.push_back(skv_test::random_vector<T>(rng, n * cfg.num_kv_heads * cfg.head_dim));
  }
  return in;
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, index_t first, index_t n, index_t row) {
  return {v.begin() + first * row, v.begin() + (first + n) * row};
}

struct CaseResult {
  int compared_heads = 0;
  int matching_heads = 0;
  double worst_error = 0.0;  ///< over output rows of matching selections
};

/// Runs the same prompts and decode steps through both backends and compares.
/// \param prefill_chunk prompt tokens per prefill call   \param queries prefill with queries
/// \param host_allocator the GPU object's (default: the library's default)
/// \param staging when given, the GPU object's staging allocator; each finish_prefill must
///        leave nothing of it in use
template <class Policy, class T>
CaseResult run_case(const Config& cfg, const std::vector<index_t>& prompts, int layers, index_t steps,
                    index_t prefill_chunk, bool queries, std::mt19937_64& rng, bool expect_exact,
                    skc::HostAllocator& host_allocator = skc::default_host_allocator(),
                    skc::PoolAllocator* staging = nullptr) {
  TestStream ts;
  const cudaStream_t stream = ts.get();
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
  const index_t qrow = static_cast<index_t>(hq) * d, kvrow = static_cast<index_t>(hkv) * d;
  SparseAttention<Policy, CpuBackend, T> cpu(cfg, layers);
  SparseAttention<Policy, CudaBackend, T> gpu(cfg, layers, skc::default_allocator(), host_allocator);
  if (staging) gpu.set_staging_allocator(*staging);
  std::vector<SequenceInputs<T>> ins;
  std::vector<SeqId> ids;
  const double tol = 2 * skv_test::attention_tolerance<T>();
  CaseResult result;

  // Prefill, chunk by chunk, layer by layer; prefill outputs compared when queries are given.
  for (std::size_t s = 0; s < prompts.size(); ++s) {
    ins.push_back(make_inputs<T>(rng, cfg, layers, prompts[s], steps));
    const SeqId id = 100 + static_cast<SeqId>(s) * 7;
    ids.push_back(id);
    cpu.add_sequence(id);
    gpu.add_sequence(id);
    const SequenceInputs<T>& in = ins.back();
    if (s % 2 == 1) {  // every other sequence reserves its staging first (a shorter guess grows)
      cpu.reserve_prompt(id, in.prompt);
      gpu.reserve_prompt(id, s % 4 == 1 ? in.prompt : in.prompt / 2, stream);
    }
    for (index_t t0 = 0; t0 < in.prompt; t0 += prefill_chunk) {
      const index_t n = std::min(prefill_chunk, in.prompt - t0);
      for (int l = 0; l < layers; ++l) {
        const auto q = slice(in.q[l], t0, n, qrow), k = slice(in.k[l], t0, n, kvrow), v = slice(in.v[l], t0, n, kvrow);
        std::vector<T> out_cpu(queries ? q.size() : 0);
        cpu.prefill(id, l, queries ? TensorView<const T, 3>(q.data(), {n, hq, d}) : TensorView<const T, 3>{},
                    TensorView<const T, 3>(k.data(), {n, hkv, d}), TensorView<const T, 3>(v.data(), {n, hkv, d}),
                    queries ? TensorView<T, 3>(out_cpu.data(), {n, hq, d}) : TensorView<T, 3>{});
        Device<T> dq(q, stream), dk(k, stream), dv(v, stream);
        Device<T> dout(queries ? q.size() : 1);
        dout.poison(stream);
        gpu.prefill(id, l, queries ? TensorView<const T, 3>(dq.get(), {n, hq, d}) : TensorView<const T, 3>{},
                    TensorView<const T, 3>(dk.get(), {n, hkv, d}), TensorView<const T, 3>(dv.get(), {n, hkv, d}),
                    queries ? TensorView<T, 3>(dout.get(), {n, hq, d}) : TensorView<T, 3>{}, stream);
        if (queries) {
          const auto got = dout.download(stream);
          CAPTURE(t0);
          CAPTURE(l);
          CHECK(rel_error(to_double(got), to_double(out_cpu)) < tol);
        }
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      }
    }
    cpu.finish_prefill(id);
    if (staging) {
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      CHECK(staging->used_bytes() >= static_cast<std::size_t>(in.prompt) * kvrow * layers * 2 * sizeof(T));
    }
    gpu.finish_prefill(id, stream);
    if (staging) {  // the staged prompt and the eigensolver's work space are gone, the pool keeps them
      SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      CHECK(staging->used_bytes() == 0);
      CHECK(staging->reserved_bytes() > 0);
      staging->trim();
      CHECK(staging->reserved_bytes() == 0);
    }
    const MemoryUsage mc = cpu.memory(id), mg = gpu.memory(id);
    CHECK(mg.device_bytes == mc.device_bytes);
    CHECK(mg.host_bytes == mc.host_bytes);
    const MemoryPlan plan = plan_sequence<Policy>(cfg, layers, in.prompt, 0, dtype_of<T>());
    CHECK(mg.device_bytes == plan.device_bytes);
    CHECK(mg.host_bytes == plan.host_bytes);
  }

  // Decode: every sequence in each call, in a shuffled order.
  std::vector<SeqId> order = ids;
  for (index_t step = 0; step < steps; ++step) {
    std::shuffle(order.begin(), order.end(), rng);
    const index_t b = static_cast<index_t>(order.size());
    for (int l = 0; l < layers; ++l) {
      std::vector<T> q, k, v;
      for (SeqId id : order) {
        const SequenceInputs<T>& in = ins[(id - 100) / 7];
        const index_t t = in.prompt + step;
        for (auto [dst, src, row] : {std::tuple{&q, &in.q[l], qrow}, std::tuple{&k, &in.k[l], kvrow},
                                     std::tuple{&v, &in.v[l], kvrow}})
          dst->insert(dst->end(), src->begin() + t * row, src->begin() + (t + 1) * row);
      }
      std::vector<T> out_cpu(q.size());
      cpu.decode(l, order, TensorView<const T, 3>(q.data(), {b, hq, d}), TensorView<const T, 3>(k.data(), {b, hkv, d}),
                 TensorView<const T, 3>(v.data(), {b, hkv, d}), TensorView<T, 3>(out_cpu.data(), {b, hq, d}));
      Device<T> dq(q, stream), dk(k, stream), dv(v, stream), dout(q.size());
      dout.poison(stream);
      gpu.decode(l, order, TensorView<const T, 3>(dq.get(), {b, hq, d}), TensorView<const T, 3>(dk.get(), {b, hkv, d}),
                 TensorView<const T, 3>(dv.get(), {b, hkv, d}), TensorView<T, 3>(dout.get(), {b, hq, d}), stream);
      const auto got = dout.download(stream);
      if constexpr (Policy::selection == ChunkSelection::all) {
        CHECK(gpu.last_step().hbm_bytes == cpu.last_step().hbm_bytes);
      }
      for (index_t i = 0; i < b; ++i)
        for (int h = 0; h < hkv; ++h) {
          bool same = true;
          if constexpr (Policy::selection != ChunkSelection::all) {
            const auto sc = cpu.last_selection(order[i], l, h);
            const auto sg = gpu.last_selection(order[i], l, h, stream);
            same = std::vector<std::int32_t>(sc.begin(), sc.end()) == sg;
          }
          ++result.compared_heads;
          if (!same) continue;
          ++result.matching_heads;
          const std::size_t first = (static_cast<std::size_t>(i) * hq + h * cfg.group_size()) * d;
          const std::size_t len = static_cast<std::size_t>(cfg.group_size()) * d;
          const std::vector<T> a(got.begin() + first, got.begin() + first + len);
          const std::vector<T> e(out_cpu.begin() + first, out_cpu.begin() + first + len);
          const double err = rel_error(to_double(a), to_double(e));
          result.worst_error = std::max(result.worst_error, err);
          CAPTURE(step);
          CAPTURE(l);
          CAPTURE(i);
          CAPTURE(h);
          CHECK(err < tol);
        }
      if (expect_exact) {
        const StepStats sc = cpu.last_step(), sg = gpu.last_step();
        CHECK(sg.pool.requested == sc.pool.requested);
        CHECK(sg.pool.hits == sc.pool.hits);
        CHECK(sg.pool.misses == sc.pool.misses);
        CHECK(sg.pcie_bytes == sc.pcie_bytes);
        CHECK(sg.hbm_bytes == sc.hbm_bytes);
      }
    }
  }
  if (expect_exact) {
    CHECK(result.matching_heads == result.compared_heads);
    const StepStats tc = cpu.totals(), tg = gpu.totals();
    CHECK(tg.tokens == tc.tokens);
    CHECK(tg.pool.hits == tc.pool.hits);
    CHECK(tg.pool.misses == tc.pool.misses);
    CHECK(tg.hbm_bytes == tc.hbm_bytes);
  }
  for (SeqId id : ids) {
    const MemoryUsage mc = cpu.memory(id), mg = gpu.memory(id);
    CHECK(mg.device_bytes == mc.device_bytes);
    CHECK(mg.host_bytes == mc.host_bytes);
  }
  gpu.remove_sequence(ids.front());
  CHECK_FALSE(gpu.contains(ids.front()));
  return result;
}

/// Full rank, every landmark selected, value cache = the selection: ShadowKV is exact.
Config exact_config(int head_dim, int hkv, int group, int chunk, index_t longest) {
  Config cfg;
  cfg.head_dim = head_dim;
  cfg.num_kv_heads = hkv;
  cfg.num_q_heads = hkv * group;
  cfg.chunk_size = chunk;
  cfg.rank = cfg.kv_dim();
  cfg.sparse_budget = static_cast<int>((longest / chunk + 1) * chunk);
  cfg.outlier_chunks = 2;
  cfg.local_chunks = 1;
  return cfg;
}

template <class Policy, class T>
void exact_cases(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  CAPTURE(seed);
  const int dims[] = {64, 96, 128, 256};
  for (int d : dims) {
    const int group = d == 96 ? 1 : (d == 128 ? 4 : 2);
    const int hkv = d == 256 ? 1 : 2;
    const std::vector<index_t> prompts = {40 + static_cast<index_t>(rng() % 30), 97, 64 + static_cast<index_t>(rng() % 50)};
    const Config cfg = exact_config(d, hkv, group, 8, 200);
    CAPTURE(d);
    CAPTURE(group);
    run_case<Policy, T>(cfg, prompts, 2, 3, 32, d != 256, rng, true);
  }
}

}  // namespace

TEST_CASE("gpu sparse_attention: exact configurations equal the CPU backend (fp32, every policy)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  exact_cases<DensePolicy, float>(seed);
  exact_cases<OracleTopKPolicy, float>(seed);
  exact_cases<ShadowKVPolicy, float>(seed);
}

TEST_CASE("gpu sparse_attention: exact configurations equal the CPU backend (bf16, fp16)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  exact_cases<ShadowKVPolicy, bf16>(seed);
  exact_cases<DensePolicy, bf16>(seed);
  exact_cases<ShadowKVPolicy, fp16>(seed);
  exact_cases<OracleTopKPolicy, fp16>(seed);
}

TEST_CASE("gpu sparse_attention: partial budgets select as the CPU backend, with misses and LRU evictions") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  std::mt19937_64 rng(seed);
  CAPTURE(seed);
  for (int d : {64, 128}) {
    Config cfg;
    cfg.head_dim = d;
    cfg.num_kv_heads = 2;
    cfg.num_q_heads = d == 64 ? 2 : 8;
    cfg.chunk_size = 8;
    cfg.rank = cfg.kv_dim();  // exact keys: what differs is the selection and the slot path
    cfg.sparse_budget = 8 * 12;
    cfg.outlier_chunks = 3;
    cfg.local_chunks = 2;
    cfg.value_cache_chunks = d == 64 ? 0 : 20;  // the paper's pool, and a larger cache
    CAPTURE(d);
    const std::vector<index_t> prompts = {300, 517, 400};
    const CaseResult shadow = run_case<ShadowKVPolicy, float>(cfg, prompts, 2, 6, 128, false, rng, false);
    CHECK(shadow.matching_heads >= 0.95 * shadow.compared_heads);
    const CaseResult oracle = run_case<OracleTopKPolicy, bf16>(cfg, prompts, 2, 4, 200, false, rng, false);
    CHECK(oracle.matching_heads >= 0.95 * oracle.compared_heads);
    const CaseResult shadow16 = run_case<ShadowKVPolicy, fp16>(cfg, prompts, 1, 5, 517, false, rng, false);
    CHECK(shadow16.matching_heads >= 0.95 * shadow16.compared_heads);
    // Offloaded values from a caching host allocator, twice: the second run's pools reuse the
    // first's blocks (same prompt lengths), whose old contents must not leak into the result.
    skc::CachingHostAllocator cache;
    for (int round = 0; round < 2; ++round) {
      CAPTURE(round);
      const CaseResult cached = run_case<ShadowKVPolicy, float>(cfg, prompts, 2, 6, 128, false, rng, false, cache);
      CHECK(cached.matching_heads >= 0.95 * cached.compared_heads);
      CHECK(cache.cached_bytes() > 0);
    }
    // Staged prompts through a pool of their own, which every finish_prefill leaves unused.
    skc::PoolAllocator staging;
    const CaseResult pooled = run_case<ShadowKVPolicy, bf16>(cfg, prompts, 2, 4, 128, false, rng, false,
                                                             skc::default_host_allocator(), &staging);
    CHECK(pooled.matching_heads >= 0.95 * pooled.compared_heads);
  }
}

TEST_CASE("gpu LowRankKeyStore: planted low-rank keys; A·B equals the CPU store, streaming equals one shot") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  std::mt19937_64 rng(seed);
  CAPTURE(seed);
  TestStream ts;
  const cudaStream_t stream = ts.get();
  const int hkv = 2, d = 64, dim = hkv * d, r = 12;
  const index_t n = 700;
  // K = U · diag(s) · Wᵀ with a decaying, well separated spectrum plus a small noise floor.
  std::normal_distribution<float> normal;
  std::vector<float> u(n * r), w(static_cast<std::size_t>(dim) * r);
  for (auto& x : u) x = normal(rng);
  for (auto& x : w) x = normal(rng);
  std::vector<float> keys(n * dim);
  for (index_t i = 0; i < n; ++i)
    for (int c = 0; c < dim; ++c) {
      float acc = 0.01f * normal(rng);
      for (int j = 0; j < r; ++j) acc += u[i * r + j] * (8.0f / (1 + j)) * w[c * r + j] / std::sqrt(float(dim));
      keys[i * dim + c] = acc;
    }
  LowRankKeyStore<CpuBackend, float> cpu(hkv, d, r);
  cpu.build(TensorView<const float, 3>(keys.data(), {n, hkv, d}));
  Device<float> dk(keys, stream);
  LowRankKeyStore<CudaBackend, float> one(hkv, d, r), streaming(hkv, d, r);
  one.build(dk.get(), n, dim, stream);
  for (index_t t0 = 0; t0 < n; t0 += 256) streaming.accumulate(dk.get() + t0 * dim, std::min<index_t>(256, n - t0), dim, stream);
  streaming.finalize_basis(stream);
  streaming.append(dk.get(), 300, dim, stream);
  streaming.append(dk.get() + 300 * dim, n - 300, dim, stream);
  CHECK(one.size() == n);
  CHECK(streaming.size() == n);
  CHECK(one.device_bytes() == cpu.device_bytes());
  auto product = [&](const std::vector<float>& a, const std::vector<float>& basis) {
    std::vector<double> k(n * dim);
    for (index_t i = 0; i < n; ++i)
      for (int h = 0; h < hkv; ++h)
        for (int x = 0; x < d; ++x) {
          double acc = 0;
          for (int j = 0; j < r; ++j) acc += double(a[i * r + j]) * basis[(h * r + j) * d + x];
          k[i * dim + h * d + x] = acc;
        }
    return k;
  };
  const std::vector<float> cpu_a(cpu.a_data(), cpu.a_data() + n * r);
  const std::vector<float> cpu_b(cpu.basis_data(), cpu.basis_data() + dim * r);
  const auto k_cpu = product(cpu_a, cpu_b);
  const auto k_one = product(one.download_a(stream), one.download_basis(stream));
  const auto k_stream = product(streaming.download_a(stream), streaming.download_basis(stream));
  CHECK(rel_error(k_one, k_cpu) < 1e-4);
  CHECK(rel_error(k_stream, k_one) < 1e-5);
  // The planted rank captures the keys up to the 1% noise floor (signal std ≈ 0.9 per element).
  CHECK(rel_error(k_cpu, to_double(keys)) < 2e-2);
  // Orthonormal basis columns.
  const auto b = one.download_basis(stream);
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < r; ++j) {
      double dot = 0;
      for (int c = 0; c < dim; ++c) dot += double(b[(c / d * r + i) * d + c % d]) * b[(c / d * r + j) * d + c % d];
      CHECK(dot == doctest::Approx(i == j ? 1.0 : 0.0).epsilon(1e-5).scale(1.0));
    }
  // finalize_bases: three stores (the second over a different half of the keys) solved in one
  // batched call give what each gives alone.
  LowRankKeyStore<CudaBackend, float> s0(hkv, d, r), s1(hkv, d, r), s2(hkv, d, r), alone1(hkv, d, r);
  s0.accumulate(dk.get(), n, dim, stream);
  s1.accumulate(dk.get(), n / 2, dim, stream);
  alone1.accumulate(dk.get(), n / 2, dim, stream);
  s2.accumulate(dk.get(), n, dim, stream);
  LowRankKeyStore<CudaBackend, float>* stores[] = {&s0, &s1, &s2};
  LowRankKeyStore<CudaBackend, float>::finalize_bases(stores, stream);
  alone1.finalize_basis(stream);
  for (auto* s : {&s0, &s1, &s2, &alone1}) {
    CHECK(s->has_basis());
    CHECK(s->accumulated_rows() == 0);
    s->append(dk.get(), n, dim, stream);
  }
  const auto k0 = product(s0.download_a(stream), s0.download_basis(stream));
  CHECK(rel_error(k0, k_one) < 1e-5);
  const auto k2 = product(s2.download_a(stream), s2.download_basis(stream));
  CHECK(rel_error(k2, k_one) < 1e-5);
  const auto k1 = product(s1.download_a(stream), s1.download_basis(stream));
  CHECK(rel_error(k1, product(alone1.download_a(stream), alone1.download_basis(stream))) < 1e-5);
  // Mismatched shapes and empty stores are refused before any CUDA call.
  LowRankKeyStore<CudaBackend, float> other(hkv, d, r + 1), empty(hkv, d, r);
  other.accumulate(dk.get(), n, dim, stream);
  LowRankKeyStore<CudaBackend, float>* mixed[] = {&s0, &other};
  s0.accumulate(dk.get(), n, dim, stream);
  CHECK(skv_test::error_message([&] { LowRankKeyStore<CudaBackend, float>::finalize_bases(mixed, stream); })
            .find("stores[1] has num_kv_heads=2, head_dim=64, rank=13") != std::string::npos);
  LowRankKeyStore<CudaBackend, float>* with_empty[] = {&s0, &empty};
  CHECK(skv_test::error_message([&] { LowRankKeyStore<CudaBackend, float>::finalize_bases(with_empty, stream); })
            .find("stores[1] has no accumulate()d rows") != std::string::npos);
}

TEST_CASE("gpu sparse_attention: invalid arguments throw shadowkv::Error naming them") {
  // No CUDA call happens before these checks, except the object's stream and events: skip
  // without a GPU.
  SKV_REQUIRE_GPU();
  Config cfg;
  cfg.rank = 16;
  cfg.head_dim = 80;
  CHECK(skv_test::error_message([&] { SparseAttention<DensePolicy, CudaBackend, bf16>(cfg, 1); }).find("head_dim=80") !=
        std::string::npos);
  cfg.head_dim = 64;
  cfg.num_kv_heads = 1;
  cfg.num_q_heads = 32;
  CHECK(skv_test::error_message([&] { SparseAttention<DensePolicy, CudaBackend, bf16>(cfg, 1); })
            .find("num_q_heads/num_kv_heads=32") != std::string::npos);
  cfg.num_q_heads = 4;
  CHECK(skv_test::error_message([&] { SparseAttention<DensePolicy, CudaBackend, bf16>(cfg, 0); })
            .find("num_layers=0") != std::string::npos);
  SparseAttention<ShadowKVPolicy, CudaBackend, bf16> attn(cfg, 2);
  TestStream ts;
  CHECK(skv_test::error_message([&] { attn.finish_prefill(3, ts.get()); }).find("unknown sequence id=3") !=
        std::string::npos);
  attn.add_sequence(3);
  CHECK(skv_test::error_message([&] { attn.add_sequence(3); }).find("already exists") != std::string::npos);
  std::vector<bf16> k(10 * 4 * 64);
  CHECK(skv_test::error_message([&] {
          attn.prefill(3, 0, {}, TensorView<const bf16, 3>(k.data(), {10, 4, 64}),
                       TensorView<const bf16, 3>(k.data(), {10, 4, 64}), {}, ts.get());
        }).find("keys_pre_rope has shape") != std::string::npos);
  CHECK(skv_test::error_message([&] { attn.prefill(3, 2, {}, {}, {}, {}, ts.get()); }).find("layer=2") !=
        std::string::npos);
  const SeqId ids[] = {3};
  CHECK(skv_test::error_message([&] {
          attn.decode(0, ids, TensorView<const bf16, 3>(k.data(), {1, 4, 64}), TensorView<const bf16, 3>(k.data(), {1, 1, 64}),
                      TensorView<const bf16, 3>(k.data(), {1, 1, 64}), TensorView<bf16, 3>(k.data(), {1, 4, 64}), ts.get());
        }).find("not prefilled") != std::string::npos);
}

TEST_SUITE_END();
