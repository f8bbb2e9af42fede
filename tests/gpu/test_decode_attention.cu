// The split-K decode attention kernels against the CPU backend's attention (cpu::SegmentAttention)
// on fresh random inputs: ragged batches, every head dim, G from 1 to 16, all three segment kinds,
// empty segments, and sizes that need many splits. float runs the CUDA-core kernel; bf16 and
// fp16 run the tensor-core kernel (16-row tiles per warp, 16 MMA rows of query heads), so its
// cases also cover G that is not a power of two, chunk sizes that straddle tiles and splits,
// and rows that are not multiples of the tile.

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include <shadowkv/cpu/attention.hpp>

#include "gpu_test_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;  // libcu++ (pulled in by CUB) has a global ::cuda too
using skv_gpu_test::DeviceBuffer;

TEST_SUITE_BEGIN("gpu_decode_attention");

namespace {

/// One (sequence, KV head)'s rows on the host, as offsets into one arena of T.
struct HostSegments {
  std::size_t static_off = 0;
  int static_rows = 0;
  std::size_t slot_off = 0;  // [capacity, c, d] keys; values at + arena half
  std::vector<int> slots;
  std::size_t gen_off = 0;   // token-major [gen_rows, H_kv, d]: this head's row i at gen_off + i*stride
  int gen_rows = 0;
};

template <class T>
struct Problem {
  int batch, hq, hkv, d, c;
  std::vector<T> k_arena, v_arena;  // keys and values at the same offsets
  std::vector<HostSegments> segs;   // [batch * hkv]
  std::vector<float> q;             // [batch, hq, d]
  long long max_rows = 0;
};

/// `chunk_size` 0 draws one from 1..8.
template <class T>
Problem<T> make_problem(std::mt19937_64& rng, int batch, int hq, int hkv, int d, int max_static, int max_gen,
                        int max_selected, int chunk_size = 0) {
  Problem<T> p{batch, hq, hkv, d, chunk_size > 0 ? chunk_size : 1 + static_cast<int>(rng() % 8), {}, {}, {}, {}, 0};
  auto reserve = [&](std::size_t n) {
    const std::size_t off = p.k_arena.size();
    const auto k = skv_test::random_vector<T>(rng, n), v = skv_test::random_vector<T>(rng, n);
    p.k_arena.insert(p.k_arena.end(), k.begin(), k.end());
    p.v_arena.insert(p.v_arena.end(), v.begin(), v.end());
    // Keep every segment 16-byte aligned, as device allocations are.
    const std::size_t pad = (16 / sizeof(T) - p.k_arena.size() % (16 / sizeof(T))) % (16 / sizeof(T));
    p.k_arena.resize(p.k_arena.size() + pad);
    p.v_arena.resize(p.v_arena.size() + pad);
    return off;
  };
  for (int b = 0; b < batch; ++b) {
    const int gen_rows = max_gen ? static_cast<int>(rng() % (max_gen + 1)) : 0;
    const std::size_t gen_off = reserve(static_cast<std::size_t>(gen_rows) * hkv * d);
    const int capacity = max_selected + static_cast<int>(rng() % 4);
    for (int h = 0; h < hkv; ++h) {
      HostSegments s;
      s.static_rows = max_static ? static_cast<int>(rng() % (max_static + 1)) : 0;
      s.static_off = reserve(static_cast<std::size_t>(s.static_rows) * d);
      s.slot_off = reserve(static_cast<std::size_t>(capacity) * p.c * d);
      std::vector<int> all(capacity);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      const int k = max_selected ? static_cast<int>(rng() % (max_selected + 1)) : 0;
      s.slots.assign(all.begin(), all.begin() + k);
      s.gen_off = gen_off + static_cast<std::size_t>(h) * d;
      s.gen_rows = gen_rows;
      p.max_rows = std::max<long long>(p.max_rows, s.static_rows + static_cast<long long>(k) * p.c + gen_rows);
      p.segs.push_back(s);
    }
  }
  p.q = skv_test::random_vector<float>(rng, static_cast<std::size_t>(batch) * hq * d);
  return p;
}

/// The CPU backend's attention over the same rows, rounded to T.
template <class T>
std::vector<T> reference(const Problem<T>& p, float scale) {
  std::vector<T> out(static_cast<std::size_t>(p.batch) * p.hq * p.d);
  const int g = p.hq / p.hkv;
  cpu::SegmentAttention<T> attn;
  std::vector<float> o(static_cast<std::size_t>(g) * p.d);
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.hkv; ++h) {
      const HostSegments& s = p.segs[b * p.hkv + h];
      attn.begin(p.q.data() + (static_cast<std::size_t>(b) * p.hq + h * g) * p.d, g, p.d, scale);
      attn.add(p.k_arena.data() + s.static_off, p.v_arena.data() + s.static_off, s.static_rows);
      for (int slot : s.slots) {
        const std::size_t off = s.slot_off + static_cast<std::size_t>(slot) * p.c * p.d;
        attn.add(p.k_arena.data() + off, p.v_arena.data() + off, p.c);
      }
      for (int i = 0; i < s.gen_rows; ++i) {
        const std::size_t off = s.gen_off + static_cast<std::size_t>(i) * p.hkv * p.d;
        attn.add(p.k_arena.data() + off, p.v_arena.data() + off, 1);
      }
      attn.finish(o.data());
      for (std::size_t i = 0; i < o.size(); ++i)
        out[(static_cast<std::size_t>(b) * p.hq + h * g) * p.d + i] = static_cast<T>(o[i]);
    }
  return out;
}

/// `splits` 0: the planner's split; else that many splits.
template <class T>
std::vector<T> run_gpu(const Problem<T>& p, float scale, int splits = 0) {
  using D = skc::device_t<T>;
  DeviceBuffer<T> k(p.k_arena.size()), v(p.v_arena.size());
  k.upload(p.k_arena);
  v.upload(p.v_arena);
  std::vector<int> slot_ids;
  std::vector<std::size_t> slot_first;
  for (const auto& s : p.segs) {
    slot_first.push_back(slot_ids.size());
    slot_ids.insert(slot_ids.end(), s.slots.begin(), s.slots.end());
  }
  DeviceBuffer<int> slots(std::max<std::size_t>(slot_ids.size(), 1));
  if (!slot_ids.empty()) {
    slot_ids.resize(slots.size());
    slots.upload(slot_ids);
  }
  const D* kd = skc::as_device(k.get());
  const D* vd = skc::as_device(v.get());
  std::vector<skc::KVSegments<D>> segs;
  for (std::size_t i = 0; i < p.segs.size(); ++i) {
    const HostSegments& s = p.segs[i];
    skc::KVSegments<D> g;
    g.static_k = kd + s.static_off;
    g.static_v = vd + s.static_off;
    g.static_rows = s.static_rows;
    g.slot_k = kd + s.slot_off;
    g.slot_v = vd + s.slot_off;
    g.slots = slots.get() + slot_first[i];
    g.num_slots = static_cast<int>(s.slots.size());
    g.chunk_size = p.c;
    g.gen_k = kd + s.gen_off;
    g.gen_v = vd + s.gen_off;
    g.gen_rows = s.gen_rows;
    g.gen_stride = static_cast<long long>(p.hkv) * p.d;
    segs.push_back(g);
  }
  DeviceBuffer<skc::KVSegments<D>> d_segs(segs.size());
  d_segs.upload(segs);
  DeviceBuffer<float> q(p.q.size());
  q.upload(p.q);
  DeviceBuffer<T> out(static_cast<std::size_t>(p.batch) * p.hq * p.d);
  out.poison();
  const auto plan = splits > 0 ? skc::plan_decode_attention_with_splits(p.batch, p.hq, p.hkv, p.d, p.max_rows, splits)
                               : skc::plan_decode_attention(p.batch, p.hq, p.hkv, p.d, p.max_rows);
  DeviceBuffer<unsigned char> ws(plan.workspace_bytes);
  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  skc::decode_attention<D>(q.get(), d_segs.get(), skc::as_device(out.get()), p.batch, p.hq, p.hkv, p.d, scale,
                            p.max_rows, plan, ws.get(), ws.size(), stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  SHADOWKV_CUDA_CHECK(cudaStreamDestroy(stream));
  return out.download();
}

/// `chunk_size` 0 draws one from 1..8; `splits` 0 takes the planner's split.
template <class T>
void check_case(std::uint64_t seed, int batch, int hq, int hkv, int d, int max_static, int max_gen, int max_selected,
                int chunk_size = 0, int splits = 0) {
  CAPTURE(seed);
  CAPTURE(batch);
  CAPTURE(hq);
  CAPTURE(hkv);
  CAPTURE(d);
  CAPTURE(dtype_name<T>());
  std::mt19937_64 rng(seed);
  const Problem<T> p = make_problem<T>(rng, batch, hq, hkv, d, max_static, max_gen, max_selected, chunk_size);
  CAPTURE(p.c);
  CAPTURE(p.max_rows);
  CAPTURE(splits);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const std::vector<T> want = reference(p, scale), got = run_gpu(p, scale, splits);
  // Per query head: relative norm error against the CPU result, both rounded to T. The 16-bit
  // kernel also rounds the scaled queries and the softmax weights to T (as FlashAttention does):
  // simulated on the CPU for these inputs (N(0, 1) logits), that gives up to ~6e-3 for bf16 and
  // ~7e-4 for fp16 over thousands of heads, inside these bounds.
  const double tol = std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, bf16> ? 1e-2 : 2e-3);
  for (std::size_t h = 0; h < want.size() / d; ++h) {
    std::vector<double> a(d), b(d);
    for (int x = 0; x < d; ++x) {
      a[x] = static_cast<float>(got[h * d + x]);
      b[x] = static_cast<float>(want[h * d + x]);
    }
    CAPTURE(h);
    CHECK(skv_test::rel_error(a, b, 1e-3) < tol);
  }
}

}  // namespace

TEST_CASE("gpu_decode_attention: random ragged batches, every head dim, G from 1 to 16") {
  SKV_REQUIRE_GPU();
  const auto base = skv_test::test_seed();
  const int dims[] = {64, 96, 128, 256};
  const int shapes[][2] = {{8, 8}, {8, 2}, {32, 8}, {12, 2}, {16, 1}, {28, 4}};  // (H_q, H_kv)
  int trial = 0;
  for (int d : dims)
    for (const auto& s : shapes) {
      const auto seed = base + trial++;
      check_case<float>(seed, 3, s[0], s[1], d, 300, 20, 12);
      check_case<bf16>(seed, 3, s[0], s[1], d, 300, 20, 12);
      check_case<fp16>(seed, 2, s[0], s[1], d, 300, 20, 12);
    }
}

TEST_CASE("gpu_decode_attention: 16-bit tensor-core path, every head dim, G in {1, 2, 3, 4, 8, 12, 16}") {
  SKV_REQUIRE_GPU();
  const auto base = skv_test::test_seed();
  const int dims[] = {64, 96, 128, 256};
  const int groups[] = {1, 2, 3, 4, 8, 12, 16};
  // Chunk sizes below, at and above the 16-row tile (0 draws one from 1..8).
  const int chunks[] = {0, 1, 5, 16, 23, 40};
  int trial = 0;
  for (int d : dims)
    for (int g : groups) {
      const auto seed = base + 1000 + trial;
      const int hkv = 1 + trial % 3;  // 1, 2 or 3 KV heads
      const int c = chunks[trial % 6];
      ++trial;
      // Ragged: static 0..300 rows, 0..12 chunks, 0..20 generated rows per (sequence, head).
      check_case<bf16>(seed, 3, g * hkv, hkv, d, 300, 20, 12, c);
      check_case<fp16>(seed, 2, g * hkv, hkv, d, 300, 20, 12, c);
      // One segment kind at a time.
      check_case<bf16>(seed + 1, 2, g * hkv, hkv, d, 200, 0, 0);
      check_case<fp16>(seed + 2, 2, g * hkv, hkv, d, 0, 0, 20, c);
      check_case<bf16>(seed + 3, 2, g * hkv, hkv, d, 0, 40, 0);
    }
}

TEST_CASE("gpu_decode_attention: 16-bit tiny and edge row counts (1, tile - 1, tile + 1)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  for (int rows : {1, 15, 16, 17, 63, 64, 65}) {
    CAPTURE(rows);
    // Only static rows: max_static draws 0..rows, so batches mix these with shorter ones.
    check_case<bf16>(seed + rows, 4, 8, 2, 128, rows, 0, 0);
    check_case<fp16>(seed + rows, 4, 12, 1, 64, 0, rows, 0);
    check_case<bf16>(seed + rows, 4, 6, 2, 96, 0, 0, 1, rows);  // one selected chunk of `rows` rows
  }
  check_case<fp16>(seed, 5, 16, 4, 256, 3, 1, 1, 1);  // tiny, often all-empty (writes zeros)
}

TEST_CASE("gpu_decode_attention: empty segments and a sequence with no rows") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  check_case<float>(seed, 4, 8, 2, 128, 0, 5, 0);   // generated rows only
  check_case<float>(seed, 4, 8, 2, 128, 0, 0, 6);   // selected chunks only
  check_case<bf16>(seed, 5, 4, 4, 64, 3, 1, 1);     // tiny, often all-empty (writes zeros)
}

TEST_CASE("gpu_decode_attention: long rows need many splits (dense-like)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  check_case<bf16>(seed, 2, 32, 8, 128, 40000, 300, 0);
  check_case<float>(seed, 1, 8, 1, 256, 70000, 0, 0);
  check_case<bf16>(seed, 3, 32, 8, 128, 3000, 200, 256);  // ShadowKV-like: static + 256 chunks + generated
  check_case<fp16>(seed, 2, 32, 8, 128, 40000, 300, 0);
  check_case<bf16>(seed, 1, 8, 2, 256, 50000, 100, 0);
  check_case<fp16>(seed, 2, 24, 2, 96, 20000, 50, 64, 37);  // G = 12, chunks of 37 across splits
  check_case<bf16>(seed, 1, 3, 1, 64, 1000, 100, 700, 48);  // G = 3, mostly long chunks
}

TEST_CASE("gpu_decode_attention: every split count from 1 to 12 (the 16-bit kernel merges up to 8 in its cluster)") {
  SKV_REQUIRE_GPU();
  const auto seed = skv_test::test_seed();
  // Rows 0..1500 per (sequence, head): with 10-12 splits some splits of short rows are empty.
  // The tensor-core kernel merges 1 split, and 2..8 in a cluster on sm_90+; more, float, and
  // devices without clusters go through the combine kernel: the same results either way.
  for (int splits = 1; splits <= 12; ++splits) {
    check_case<bf16>(seed + splits, 3, 32, 8, 128, 1200, 40, 20, 8, splits);
    check_case<fp16>(seed + 100 + splits, 2, 12, 1, 64, 900, 30, 30, 0, splits);
    check_case<bf16>(seed + 200 + splits, 2, 6, 2, 256, 700, 20, 10, 16, splits);
    check_case<bf16>(seed + 300 + splits, 2, 9, 3, 96, 1000, 0, 0, 0, splits);
  }
  check_case<float>(seed, 3, 32, 8, 128, 1200, 40, 20, 8, 4);
}

TEST_CASE("gpu_decode_attention: the split planner takes the cheapest plan of its wave cost model") {
  // No SKV_REQUIRE_GPU: planning makes no CUDA call. The planner searches only the largest
  // split count of each wave count (or, for many groups, stops early); every split count from
  // 1 to max_rows / 256 is tried here and none may cost less than the plan.
  namespace d = skc::detail;
  auto cost = [](long long groups, long long max_rows, long long rows) {
    const long long splits = std::max<long long>(1, (max_rows + rows - 1) / rows);
    return (groups * splits + d::kResidentCtas - 1) / d::kResidentCtas * (rows + d::kSplitOverheadRows);
  };
  std::mt19937_64 rng(skv_test::test_seed());
  std::uniform_int_distribution<int> pick_batch(1, 80), pick_heads(1, 8);
  std::uniform_int_distribution<long long> pick_rows(0, 600000);
  for (int trial = 0; trial < 300; ++trial) {
    const int batch = pick_batch(rng), hkv = pick_heads(rng);
    const long long max_rows = trial < 4 ? std::vector<long long>{0, 1, 257, 1048576}[trial] : pick_rows(rng);
    CAPTURE(batch);
    CAPTURE(hkv);
    CAPTURE(max_rows);
    const auto plan = skc::plan_decode_attention(batch, 2 * hkv, hkv, 128, max_rows);
    REQUIRE(plan.num_splits >= 1);
    CHECK(plan.rows_per_split * plan.num_splits >= max_rows);
    const long long groups = static_cast<long long>(batch) * hkv;
    const long long chosen = cost(groups, max_rows, plan.rows_per_split);
    const long long most = std::max<long long>(1, (max_rows + d::kMinRowsPerSplit - 1) / d::kMinRowsPerSplit);
    long long cheapest = chosen;
    for (long long s = 1; s <= most; ++s) cheapest = std::min(cheapest, cost(groups, max_rows, d::rows_for_splits(max_rows, s)));
    CHECK(chosen == cheapest);
  }
  // The shapes measured on the H200 (docs/benchmarks.md): one full wave of CTAs.
  CHECK(skc::plan_decode_attention(1, 32, 8, 128, 131072).num_splits == 33);  // dense, B = 1, 128K
  CHECK(skc::plan_decode_attention(8, 32, 8, 128, 131072).num_splits == 4);   // dense, B = 8, 128K
  CHECK(skc::plan_decode_attention(8, 32, 8, 128, 2496).num_splits == 4);     // ShadowKV's selection, B = 8
  CHECK(skc::plan_decode_attention(1, 32, 8, 128, 256).num_splits == 1);      // never splits 256 rows
}

TEST_CASE("gpu_decode_attention: invalid shapes throw naming them, before any CUDA call") {
  auto what = [](auto&& fn) { return skv_test::error_message(fn); };
  CHECK(what([] { skc::plan_decode_attention(1, 8, 2, 80, 10); }).find("head_dim=80") != std::string::npos);
  CHECK(what([] { skc::plan_decode_attention(1, 6, 4, 128, 10); }).find("num_q_heads=6") != std::string::npos);
  CHECK(what([] { skc::plan_decode_attention(1, 64, 2, 128, 10); }).find("exceeds 16") != std::string::npos);
  CHECK(what([] { skc::plan_decode_attention(0, 8, 2, 128, 10); }).find("batch=0") != std::string::npos);
  CHECK(what([] { skc::plan_decode_attention(1, 8, 2, 128, -1); }).find("max_rows=-1") != std::string::npos);
  const auto plan = skc::plan_decode_attention(2, 8, 2, 128, 5000);
  CHECK(plan.num_splits >= 1);
  CHECK(plan.rows_per_split * plan.num_splits >= 5000);
  CHECK(what([&] {
    skc::decode_attention<float>(nullptr, nullptr, nullptr, 2, 8, 2, 128, 0.1f, 5000, plan, nullptr, 0, nullptr);
  }).find("workspace_bytes=0") != std::string::npos);
}

TEST_SUITE_END();
