// One layer's decode attention on the GPU, Llama-3.1-8B attention shapes (32 q / 8 KV heads,
// head dim 128, bf16): the dense kernel over the whole cache, and the ShadowKV attention over
// its static set + 256 selected chunks + generated tokens (the selection and miss path are
// measured separately once they are composed). CUDA-event timing (UseManualTime); counters:
// HBM bytes per step, the floor bytes / 4.0 TB/s, and the achieved bandwidth.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "event_timer.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;  // libcu++ (pulled in by CUB) has a global ::cuda too

namespace {

constexpr int kHq = 32, kHkv = 8, kD = 128;
constexpr double kHbmBytesPerSecond = 4.0e12;  // GPU.md: ~3970-4240 GB/s measured on the H200

using D = __nv_bfloat16;

using shadowkv_bench::EventTimer;

__global__ void fill_random(D* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    unsigned x = static_cast<unsigned>(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = __float2bfloat16((static_cast<float>(x & 0xffff) / 32768.0f) - 1.0f);
  }
}

struct Workload {
  cudaStream_t stream;
  skc::DeviceBuffer<D> k, v;
  skc::DeviceBuffer<int> slots;
  skc::DeviceBuffer<float> q;
  skc::DeviceBuffer<D> out;
  skc::DeviceBuffer<skc::KVSegments<D>> segs;
  skc::DecodeAttentionPlan plan;
  skc::DeviceBuffer<unsigned char> ws;
  long long max_rows = 0;
  int batch = 0;
  double bytes = 0;
};

/// `static_rows` + `num_slots` chunks of 8 (of a slot pool of `num_slots`) + `gen_rows` per
/// (sequence, KV head), all distinct memory.
void setup(Workload& w, int batch, long long static_rows, int num_slots, int gen_rows) {
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking));
  const long long c = 8;
  const long long per_head = static_rows + num_slots * c + gen_rows;
  const std::size_t n = static_cast<std::size_t>(batch) * kHkv * per_head * kD;
  w.k = skc::DeviceBuffer<D>(n, w.stream);
  w.v = skc::DeviceBuffer<D>(n, w.stream);
  fill_random<<<1024, 256, 0, w.stream>>>(w.k.data(), n, 1u);
  fill_random<<<1024, 256, 0, w.stream>>>(w.v.data(), n, 2u);
  SHADOWKV_CUDA_CHECK_LAUNCH();
  std::vector<int> slot_ids(std::max(num_slots, 1));
  std::mt19937 rng(7);
  for (int i = 0; i < num_slots; ++i) slot_ids[i] = i;
  std::shuffle(slot_ids.begin(), slot_ids.begin() + num_slots, rng);
  w.slots = skc::DeviceBuffer<int>(slot_ids.size(), w.stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(w.slots.data(), slot_ids.data(), slot_ids.size() * sizeof(int),
                                      cudaMemcpyHostToDevice, w.stream));
  std::vector<skc::KVSegments<D>> segs;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < kHkv; ++h) {
      const std::size_t base = (static_cast<std::size_t>(b) * kHkv + h) * per_head * kD;
      skc::KVSegments<D> s;
      s.static_k = w.k.data() + base;
      s.static_v = w.v.data() + base;
      s.static_rows = static_cast<int>(static_rows);
      s.slot_k = s.static_k + static_rows * kD;
      s.slot_v = s.static_v + static_rows * kD;
      s.slots = w.slots.data();
      s.num_slots = num_slots;
      s.chunk_size = static_cast<int>(c);
      s.gen_k = s.slot_k + num_slots * c * kD;
      s.gen_v = s.slot_v + num_slots * c * kD;
      s.gen_rows = gen_rows;
      s.gen_stride = kD;
      segs.push_back(s);
    }
  w.segs = skc::DeviceBuffer<skc::KVSegments<D>>(segs.size(), w.stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(w.segs.data(), segs.data(), segs.size() * sizeof(segs[0]),
                                      cudaMemcpyHostToDevice, w.stream));
  std::vector<float> q(static_cast<std::size_t>(batch) * kHq * kD);
  std::normal_distribution<float> dist;
  for (auto& x : q) x = dist(rng);
  w.q = skc::DeviceBuffer<float>(q.size(), w.stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(w.q.data(), q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice, w.stream));
  w.out = skc::DeviceBuffer<D>(q.size(), w.stream);
  w.max_rows = per_head;
  w.batch = batch;
  w.plan = skc::plan_decode_attention(batch, kHq, kHkv, kD, per_head);
  w.ws = skc::DeviceBuffer<unsigned char>(w.plan.workspace_bytes, w.stream);
  w.bytes = 2.0 * n * sizeof(D);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

void run(benchmark::State& state, Workload& w) {
  auto step = [&] {
    skc::decode_attention<D>(w.q.data(), w.segs.data(), w.out.data(), w.batch, kHq, kHkv, kD, 0.0883883f,
                              w.max_rows, w.plan, w.ws.data(), w.ws.size(), w.stream);
  };
  step();  // warm-up
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
  for (auto _ : state) {
    EventTimer t(w.stream);
    step();
    state.SetIterationTime(t.seconds());
  }
  state.counters["hbm_bytes"] = w.bytes;
  state.counters["floor_ms"] = w.bytes / kHbmBytesPerSecond * 1e3;
  state.counters["GBps"] = benchmark::Counter(w.bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["splits"] = w.plan.num_splits;
}

void bm_dense(benchmark::State& state) {
  Workload w;
  setup(w, static_cast<int>(state.range(0)), state.range(1), 0, 0);
  run(state, w);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

/// The dense kernel with a forced split count (`range(2)`), for tuning `plan_decode_attention`.
void bm_dense_splits(benchmark::State& state) {
  Workload w;
  setup(w, static_cast<int>(state.range(0)), state.range(1), 0, 0);
  w.plan = skc::plan_decode_attention_with_splits(w.batch, kHq, kHkv, kD, w.max_rows, static_cast<int>(state.range(2)));
  w.ws = skc::DeviceBuffer<unsigned char>(w.plan.workspace_bytes, w.stream);
  run(state, w);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

/// ShadowKV's attention at budget 2048: static 48 outlier chunks + 32 local rows, 256 selected
/// chunks of 8, and `range(1)` generated rows.
void bm_shadowkv_attention(benchmark::State& state) {
  Workload w;
  setup(w, static_cast<int>(state.range(0)), 48 * 8 + 32, 256, static_cast<int>(state.range(1)));
  run(state, w);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

/// ShadowKV's attention (as `bm_shadowkv_attention`, no generated rows) with a forced split
/// count (`range(1)`), for tuning `plan_decode_attention` on short rows.
void bm_shadowkv_attention_splits(benchmark::State& state) {
  Workload w;
  setup(w, static_cast<int>(state.range(0)), 48 * 8 + 32, 256, 0);
  w.plan = skc::plan_decode_attention_with_splits(w.batch, kHq, kHkv, kD, w.max_rows, static_cast<int>(state.range(1)));
  w.ws = skc::DeviceBuffer<unsigned char>(w.plan.workspace_bytes, w.stream);
  run(state, w);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

/// A whole ShadowKV decode step of one layer from the ops, B sequences of `context` tokens
/// (budget 2048 = 256 chunks of 8, 48 outlier + 4 local chunks, rank 160): landmark scoring,
/// top-k, then
///   mode 0 (all hits: every chunk's keys and values already resident — the value cache
///          holds every chunk, the planner's largest capacity): attention straight away;
///   mode 1 (all misses: a fresh query every step with capacity = budget): the keys of all
///          256 selected chunks per head rebuilt with RoPE while their values are gathered
///          from pinned host memory on a second stream, then attention.
/// Not yet included: the device slot-table update that turns a selection into a miss list
/// (mode 1 uses a precomputed list of 256 chunks per head), RoPE of q/k and the new token.
void bm_shadowkv_step(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const long long context = state.range(1);
  const bool all_miss = state.range(2) != 0;
  constexpr int c = 8, k_sel = 256, rank = 160, outliers = 48, local = 4;
  const long long indexed_chunks = context / c - local;
  const int m = static_cast<int>(indexed_chunks - outliers);  // landmarks per head
  const long long static_rows = outliers * c + (context - indexed_chunks * c);
  cudaStream_t stream, side;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  cudaEvent_t fork, join;
  SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  SHADOWKV_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  auto fill = [&](D* p, std::size_t n, unsigned seed) {
    fill_random<<<1024, 256, 0, stream>>>(p, n, seed);
    SHADOWKV_CUDA_CHECK_LAUNCH();
  };
  const std::size_t heads = static_cast<std::size_t>(batch) * kHkv;
  // Landmarks [B][H_kv, M, d] and the scoring/selection buffers.
  skc::DeviceBuffer<D> landmarks(heads * m * kD, stream);
  fill(landmarks.data(), landmarks.size(), 3u);
  std::vector<const D*> lm_ptrs(batch);
  std::vector<int> lm_counts(batch, m);
  std::vector<long long> offsets(batch);
  for (int b = 0; b < batch; ++b) {
    lm_ptrs[b] = landmarks.data() + static_cast<std::size_t>(b) * kHkv * m * kD;
    offsets[b] = static_cast<long long>(b) * kHkv * m;
  }
  skc::DeviceBuffer<const D*> d_lm_ptrs(batch, stream);
  skc::DeviceBuffer<int> d_counts(batch, stream);
  skc::DeviceBuffer<long long> d_offsets(batch, stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_lm_ptrs.data(), lm_ptrs.data(), batch * sizeof(D*), cudaMemcpyHostToDevice, stream));
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_counts.data(), lm_counts.data(), batch * sizeof(int), cudaMemcpyHostToDevice, stream));
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_offsets.data(), offsets.data(), batch * sizeof(long long), cudaMemcpyHostToDevice, stream));
  skc::DeviceBuffer<float> scores(heads * m, stream);
  skc::DeviceBuffer<std::int32_t> selected(heads * k_sel, stream);
  std::vector<float> hq(static_cast<std::size_t>(batch) * kHq * kD);
  std::mt19937 rng(11);
  std::normal_distribution<float> dist;
  for (auto& x : hq) x = dist(rng);
  skc::DeviceBuffer<float> q(hq.size(), stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(q.data(), hq.data(), hq.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  skc::LandmarkScoreParams<bf16> sp;
  sp.queries = q.data();
  sp.landmarks = reinterpret_cast<const bf16* const*>(d_lm_ptrs.data());
  sp.num_landmarks = d_counts.data();
  sp.score_offsets = d_offsets.data();
  sp.scores = scores.data();
  sp.scores_capacity = static_cast<long long>(scores.size());
  sp.batch = batch;
  sp.num_q_heads = kHq;
  sp.num_kv_heads = kHkv;
  sp.head_dim = kD;
  sp.max_landmarks = m;
  sp.scale = 0.0883883f;
  skc::DeviceBuffer<unsigned char> score_ws(
      skc::landmark_score_workspace_bytes(batch, kHq, kHkv, m, sp.scores_capacity), stream);
  sp.workspace = score_ws.data();
  sp.workspace_bytes = score_ws.size();
  skc::TopKParams tp;
  tp.scores = scores.data();
  tp.num_landmarks = d_counts.data();
  tp.score_offsets = d_offsets.data();
  tp.scores_capacity = sp.scores_capacity;
  tp.selected = selected.data();
  tp.batch = batch;
  tp.num_kv_heads = kHkv;
  tp.k = k_sel;
  tp.max_landmarks = m;

  // Static rows and the slot pools (all hits: every chunk; all misses: 256 slots).
  const long long pool_chunks = all_miss ? k_sel : m;
  skc::DeviceBuffer<D> static_k(heads * static_rows * kD, stream), static_v(heads * static_rows * kD, stream);
  skc::DeviceBuffer<D> slot_k(heads * pool_chunks * c * kD, stream), slot_v(heads * pool_chunks * c * kD, stream);
  fill(static_k.data(), static_k.size(), 4u);
  fill(static_v.data(), static_v.size(), 5u);
  fill(slot_k.data(), slot_k.size(), 6u);
  fill(slot_v.data(), slot_v.size(), 7u);
  std::vector<int> iota(k_sel);
  for (int i = 0; i < k_sel; ++i) iota[i] = i;
  skc::DeviceBuffer<int> d_iota(k_sel, stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_iota.data(), iota.data(), k_sel * sizeof(int), cudaMemcpyHostToDevice, stream));
  std::vector<skc::KVSegments<D>> segs(heads);
  for (std::size_t i = 0; i < heads; ++i) {
    skc::KVSegments<D>& sg = segs[i];
    sg.static_k = static_k.data() + i * static_rows * kD;
    sg.static_v = static_v.data() + i * static_rows * kD;
    sg.static_rows = static_cast<int>(static_rows);
    sg.slot_k = slot_k.data() + i * pool_chunks * c * kD;
    sg.slot_v = slot_v.data() + i * pool_chunks * c * kD;
    sg.slots = all_miss ? d_iota.data() : reinterpret_cast<const int*>(selected.data()) + i * k_sel;
    sg.num_slots = k_sel;
    sg.chunk_size = c;
  }
  skc::DeviceBuffer<skc::KVSegments<D>> d_segs(heads, stream);
  SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_segs.data(), segs.data(), heads * sizeof(segs[0]), cudaMemcpyHostToDevice, stream));
  const long long max_rows = static_rows + static_cast<long long>(k_sel) * c;
  const auto plan = skc::plan_decode_attention(batch, kHq, kHkv, kD, max_rows);
  skc::DeviceBuffer<unsigned char> attn_ws(plan.workspace_bytes, stream);
  skc::DeviceBuffer<D> out(hq.size(), stream);

  // The miss path (all misses): A and basis per sequence, host values, the miss list.
  const long long a_rows = indexed_chunks * c;
  skc::DeviceBuffer<D> a, basis;
  skc::PinnedBuffer<D> host_values;
  skc::DeviceBuffer<skc::RebuildKeysSequence<D>> rk_seqs;
  skc::DeviceBuffer<skc::GatherValuesSequence<D>> gv_seqs;
  skc::DeviceBuffer<skc::ChunkMiss> misses;
  skc::DeviceBuffer<float> inv_freq;
  skc::RebuildKeysParams<D> rk;
  skc::GatherValuesParams<D> gv;
  if (all_miss) {
    a = skc::DeviceBuffer<D>(static_cast<std::size_t>(batch) * a_rows * rank, stream);
    basis = skc::DeviceBuffer<D>(static_cast<std::size_t>(batch) * kHkv * rank * kD, stream);
    fill(a.data(), a.size(), 8u);
    fill(basis.data(), basis.size(), 9u);
    host_values = skc::PinnedBuffer<D>(heads * static_cast<std::size_t>(m) * c * kD, skc::default_host_allocator());
    std::memset(static_cast<void*>(host_values.data()), 0x3c, host_values.size() * sizeof(D));
    std::vector<skc::RebuildKeysSequence<D>> rs(batch);
    std::vector<skc::GatherValuesSequence<D>> gs(batch);
    for (int b = 0; b < batch; ++b) {
      rs[b] = {a.data() + static_cast<std::size_t>(b) * a_rows * rank, basis.data() + static_cast<std::size_t>(b) * kHkv * rank * kD,
               slot_k.data() + static_cast<std::size_t>(b) * kHkv * k_sel * c * kD, a_rows, k_sel};
      gs[b] = {host_values.device_data() + static_cast<std::size_t>(b) * kHkv * m * c * kD,
               slot_v.data() + static_cast<std::size_t>(b) * kHkv * k_sel * c * kD, m, k_sel};
    }
    rk_seqs = skc::DeviceBuffer<skc::RebuildKeysSequence<D>>(batch, stream);
    gv_seqs = skc::DeviceBuffer<skc::GatherValuesSequence<D>>(batch, stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(rk_seqs.data(), rs.data(), batch * sizeof(rs[0]), cudaMemcpyHostToDevice, stream));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(gv_seqs.data(), gs.data(), batch * sizeof(gs[0]), cudaMemcpyHostToDevice, stream));
    std::vector<skc::ChunkMiss> ml;
    std::uniform_int_distribution<int> chunk(0, m - 1);
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < kHkv; ++h)
        for (int i = 0; i < k_sel; ++i) ml.push_back({b, h, chunk(rng), i});
    misses = skc::DeviceBuffer<skc::ChunkMiss>(ml.size(), stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(misses.data(), ml.data(), ml.size() * sizeof(ml[0]), cudaMemcpyHostToDevice, stream));
    const RopeTable table = make_rope_table(llama31_rope(), kD);
    inv_freq = skc::DeviceBuffer<float>(table.inv_freq.size(), stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(inv_freq.data(), table.inv_freq.data(), table.inv_freq.size() * sizeof(float),
                                        cudaMemcpyHostToDevice, stream));
    rk.sequences = rk_seqs.data();
    rk.num_sequences = batch;
    rk.misses = misses.data();
    rk.num_misses = static_cast<int>(ml.size());
    rk.num_kv_heads = kHkv;
    rk.head_dim = kD;
    rk.rank = rank;
    rk.chunk_size = c;
    rk.rope = skc::make_rebuild_rope(table, inv_freq.data());
    gv.sequences = gv_seqs.data();
    gv.num_sequences = batch;
    gv.misses = misses.data();
    gv.num_misses = static_cast<int>(ml.size());
    gv.num_kv_heads = kHkv;
    gv.head_dim = kD;
    gv.chunk_size = c;
  }
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));

  auto step = [&] {
    skc::score_and_select_top_k(sp, tp, stream);  // as SparseAttention scores and selects
    if (all_miss) {
      SHADOWKV_CUDA_CHECK(cudaEventRecord(fork, stream));
      SHADOWKV_CUDA_CHECK(cudaStreamWaitEvent(side, fork));
      skc::gather_values(gv, side);
      skc::rebuild_keys(rk, stream);
      SHADOWKV_CUDA_CHECK(cudaEventRecord(join, side));
      SHADOWKV_CUDA_CHECK(cudaStreamWaitEvent(stream, join));
    }
    skc::decode_attention<D>(q.data(), d_segs.data(), out.data(), batch, kHq, kHkv, kD, 0.0883883f, max_rows, plan,
                             attn_ws.data(), attn_ws.size(), stream);
  };
  step();
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    EventTimer t(stream);
    step();
    state.SetIterationTime(t.seconds());
  }
  const double misses_n = all_miss ? static_cast<double>(heads) * k_sel : 0.0;
  const double hbm = static_cast<double>(heads) * m * kD * 2                         // landmarks
                     + 2.0 * heads * max_rows * kD * 2                                 // attention K, V
                     + misses_n * c * (rank + 2.0 * kD) * 2 + (all_miss ? batch * kHkv * rank * kD * 2.0 : 0.0);
  const double pcie = misses_n * c * kD * 2;
  state.counters["hbm_bytes"] = hbm;
  state.counters["pcie_bytes"] = pcie;
  state.counters["hit_rate"] = all_miss ? 0.0 : 1.0;
  state.counters["floor_ms"] = std::max(hbm / kHbmBytesPerSecond, pcie / 51.0e9) * 1e3;
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  (void)cudaEventDestroy(fork);
  (void)cudaEventDestroy(join);
  (void)cudaStreamDestroy(side);
}

/// The composed `SparseAttention<Policy, CudaBackend, bf16>::decode` of one layer — the whole
/// step an engine calls: RoPE of q/k, append, scoring, top-k, the device slot-table update,
/// value gather ∥ key rebuild for the misses, attention — for B sequences of `context` tokens
/// prefilled with random pre-RoPE keys and values through the real build path (Gram +
/// eigensolve, landmarks, outliers, offload). mode 0: the same query every step with the
/// paper's value pool (capacity = budget); the query still rotates with its position, so the
/// selection drifts and some chunks miss; mode 1: a fresh random query every step (hits near
/// 0: the PCIe-bound case); mode 2: the same query with a value cache of 4x the budget (the
/// drifted chunks stay resident, but each step's newly selected ones still miss); mode 3: the
/// same query with every element outside RoPE's four slowest pairs zero (pairs 60-63 of 64,
/// which turn by at most 5.6e-7 rad per position under Llama-3.1 scaling: ~6e-5 rad over the
/// run, a small fraction of a bf16 ulp), so the post-RoPE query, hence the selection, repeats:
/// every chunk a hit with the paper's pool, the HBM-bound case of the whole step; mode 4: mode 3
/// with the throughput harness's value cache at 128K (5726 chunks per head), what a large cache
/// costs an all-hit step. Counters from
/// the object's own byte accounting (`totals()` over the timed steps).
template <class Policy>
void bm_sparse_attention_decode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const long long context = state.range(1);
  const bool fresh = state.range(2) == 1;
  Config cfg;  // Llama-3.1-8B attention shapes, the paper's ShadowKV defaults
  cfg.rope = llama31_rope();
  if (state.range(2) == 2) cfg.value_cache_chunks = 4 * cfg.budget_chunks();
  if (state.range(2) == 4) cfg.value_cache_chunks = 5726;  // the throughput harness's auto cache at 128K
  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    SparseAttention<Policy, CudaBackend, bf16> attn(cfg, 1);
    const long long kv = static_cast<long long>(kHkv) * kD;
    constexpr long long kPrefillChunk = 16384;
    skc::DeviceBuffer<D> pk(kPrefillChunk * kv, stream), pv(kPrefillChunk * kv, stream);
    std::vector<SeqId> ids;
    unsigned seed = 100;
    for (int b = 0; b < batch; ++b) {
      attn.add_sequence(b);
      ids.push_back(b);
      for (long long t0 = 0; t0 < context; t0 += kPrefillChunk) {
        const long long n = std::min(kPrefillChunk, context - t0);
        fill_random<<<1024, 256, 0, stream>>>(pk.data(), n * kv, seed++);
        fill_random<<<1024, 256, 0, stream>>>(pv.data(), n * kv, seed++);
        SHADOWKV_CUDA_CHECK_LAUNCH();
        attn.prefill(b, 0, {}, TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(pk.data()), {n, kHkv, kD}),
                     TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(pv.data()), {n, kHkv, kD}), {}, stream);
      }
      attn.finish_prefill(b, stream);
    }
    constexpr int kQueries = 32;  // fresh: cycled through, never two alike in a row
    const std::size_t q_elems = static_cast<std::size_t>(batch) * kHq * kD;
    const std::size_t kv_elems = static_cast<std::size_t>(batch) * kHkv * kD;
    skc::DeviceBuffer<D> qs(q_elems * kQueries, stream), k_new(kv_elems, stream), v_new(kv_elems, stream),
        out(q_elems, stream);
    fill_random<<<1024, 256, 0, stream>>>(qs.data(), qs.size(), 7u);
    if (state.range(2) >= 3) {  // the first query: nonzero only in RoPE's four slowest pairs
      std::vector<bf16> hq(q_elems, bf16(0.0f));
      std::mt19937 rng(17);
      std::normal_distribution<float> dist;
      for (std::size_t row = 0; row < q_elems / kD; ++row)
        for (int i = kD / 2 - 4; i < kD / 2; ++i) {
          hq[row * kD + i] = bf16(4.0f * dist(rng));
          hq[row * kD + i + kD / 2] = bf16(4.0f * dist(rng));
        }
      SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(qs.data(), hq.data(), q_elems * sizeof(bf16), cudaMemcpyHostToDevice, stream));
    }
    fill_random<<<1024, 256, 0, stream>>>(k_new.data(), kv_elems, 8u);
    fill_random<<<1024, 256, 0, stream>>>(v_new.data(), kv_elems, 9u);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    int step_no = 0;
    auto step = [&] {
      const D* q = qs.data() + (fresh ? (step_no++ % kQueries) * q_elems : 0);
      attn.decode(0, ids, TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(q), {batch, kHq, kD}),
                  TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(k_new.data()), {batch, kHkv, kD}),
                  TensorView<const bf16, 3>(reinterpret_cast<const bf16*>(v_new.data()), {batch, kHkv, kD}),
                  TensorView<bf16, 3>(reinterpret_cast<bf16*>(out.data()), {batch, kHq, kD}), stream);
    };
    for (int i = 0; i < 8; ++i) step();  // warm-up: the first step misses everything
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    attn.reset_stats();
    double host_seconds = 0;
    for (auto _ : state) {
      EventTimer t(stream);
      const auto h0 = std::chrono::steady_clock::now();
      step();
      host_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - h0).count();
      state.SetIterationTime(t.seconds());
    }
    const StepStats s = attn.totals();
    // Host time to enqueue one step (the timed step above starts on an idle stream, so a host
    // slower than the GPU shows in its time), and the step with the host running ahead: 20
    // steps back to back between one pair of events, as a decoder's layers would issue them.
    state.counters["host_ms"] = host_seconds * 1e3 / static_cast<double>(state.iterations());
    {
      constexpr int kRunAhead = 20;
      EventTimer t(stream);
      for (int i = 0; i < kRunAhead; ++i) step();
      state.counters["run_ahead_ms"] = t.ms() / kRunAhead;
    }
    const double steps = static_cast<double>(std::max<std::int64_t>(1, s.tokens / batch));
    const double hbm = s.hbm_bytes / steps, pcie = s.pcie_bytes / steps;
    state.counters["hbm_bytes"] = hbm;
    state.counters["pcie_bytes"] = pcie;
    state.counters["hit_rate"] = s.pool.requested ? s.pool.hit_rate() : 1.0;
    state.counters["floor_ms"] = std::max(hbm / kHbmBytesPerSecond, pcie / 51.0e9) * 1e3;
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  (void)cudaStreamDestroy(stream);
}

/// The decode step's landmark scoring and selection alone: `score_landmarks` + `select_top_k`
/// (fused = 0) or `score_and_select_top_k` forced to fuse (fused = 1), k = 256, at most `ctas`
/// CTAs per row of the top-k (TopKParams::max_ctas_per_row),
/// for B sequences of `context` tokens, Llama-3.1-8B attention shapes, bf16, with
/// M = context / 8 - 4 - 48 landmarks per KV head (as `bm_shadowkv_step`: chunks of 8, 4 local
/// and 48 outlier chunks not indexed). The landmarks are rotated over enough copies (3x the L2
/// size in all) that every step reads them from HBM: at B = 1 they are 33 MB, under the 60 MB
/// L2. Counters: hbm_bytes = the landmarks read, the scores written and read back by the top-k,
/// the selection written; l2_bytes = the logits' round trip between the two scoring kernels
/// (H_q floats per landmark written, then read, usually inside L2); floor_ms = hbm_bytes at
/// 4.0 TB/s.
void bm_score_landmarks(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const long long context = state.range(1);
  const bool fused = state.range(2) != 0;
  const int ctas = static_cast<int>(state.range(3));  // TopKParams::max_ctas_per_row
  constexpr int c = 8, k_sel = 256, outliers = 48, local = 4;
  const int m = static_cast<int>(context / c - local - outliers);  // landmarks per head
  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    int device = 0, l2_bytes = 0;
    SHADOWKV_CUDA_CHECK(cudaGetDevice(&device));
    SHADOWKV_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    const std::size_t heads = static_cast<std::size_t>(batch) * kHkv;
    const std::size_t per_copy = heads * m * kD;  // elements of one set of landmarks
    const int copies = static_cast<int>(
        std::max<std::size_t>(1, (3 * static_cast<std::size_t>(l2_bytes) + per_copy * sizeof(D) - 1) / (per_copy * sizeof(D))));
    skc::DeviceBuffer<D> landmarks(per_copy * copies, stream);
    fill_random<<<1024, 256, 0, stream>>>(landmarks.data(), landmarks.size(), 3u);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    std::vector<const D*> lm_ptrs(static_cast<std::size_t>(copies) * batch);  // [copy][batch]
    for (int cp = 0; cp < copies; ++cp)
      for (int b = 0; b < batch; ++b)
        lm_ptrs[static_cast<std::size_t>(cp) * batch + b] =
            landmarks.data() + static_cast<std::size_t>(cp) * per_copy + static_cast<std::size_t>(b) * kHkv * m * kD;
    std::vector<int> counts(batch, m);
    std::vector<long long> offsets(batch);
    for (int b = 0; b < batch; ++b) offsets[b] = static_cast<long long>(b) * kHkv * m;
    skc::DeviceBuffer<const D*> d_lm_ptrs(lm_ptrs.size(), stream);
    skc::DeviceBuffer<int> d_counts(batch, stream);
    skc::DeviceBuffer<long long> d_offsets(batch, stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_lm_ptrs.data(), lm_ptrs.data(), lm_ptrs.size() * sizeof(D*),
                                        cudaMemcpyHostToDevice, stream));
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(d_counts.data(), counts.data(), batch * sizeof(int), cudaMemcpyHostToDevice, stream));
    SHADOWKV_CUDA_CHECK(
        cudaMemcpyAsync(d_offsets.data(), offsets.data(), batch * sizeof(long long), cudaMemcpyHostToDevice, stream));
    std::vector<float> hq(static_cast<std::size_t>(batch) * kHq * kD);
    std::mt19937 rng(13);
    std::normal_distribution<float> dist;
    for (auto& x : hq) x = dist(rng);
    skc::DeviceBuffer<float> q(hq.size(), stream);
    SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(q.data(), hq.data(), hq.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
    skc::DeviceBuffer<float> scores(heads * m, stream);
    skc::DeviceBuffer<std::int32_t> selected(heads * k_sel, stream);

    skc::LandmarkScoreParams<bf16> sp;
    sp.queries = q.data();
    sp.num_landmarks = d_counts.data();
    sp.score_offsets = d_offsets.data();
    sp.scores = scores.data();
    sp.scores_capacity = static_cast<long long>(scores.size());
    sp.batch = batch;
    sp.num_q_heads = kHq;
    sp.num_kv_heads = kHkv;
    sp.head_dim = kD;
    sp.max_landmarks = m;
    sp.scale = 0.0883883f;
    skc::DeviceBuffer<unsigned char> ws(skc::landmark_score_workspace_bytes(batch, kHq, kHkv, m, sp.scores_capacity),
                                        stream);
    sp.workspace = ws.data();
    sp.workspace_bytes = ws.size();
    skc::TopKParams tp;
    tp.scores = scores.data();
    tp.num_landmarks = d_counts.data();
    tp.score_offsets = d_offsets.data();
    tp.scores_capacity = sp.scores_capacity;
    tp.selected = selected.data();
    tp.batch = batch;
    tp.num_kv_heads = kHkv;
    tp.k = k_sel;
    tp.max_landmarks = m;
    tp.max_ctas_per_row = ctas;

    int copy = 0;
    auto step = [&] {
      sp.landmarks = reinterpret_cast<const bf16* const*>(d_lm_ptrs.data() + static_cast<std::size_t>(copy) * batch);
      copy = copy + 1 == copies ? 0 : copy + 1;
      if (fused) {
        skc::score_and_select_top_k(sp, tp, stream, skc::default_allocator(), skc::TopKFusion::fused);
      } else {
        skc::score_landmarks(sp, stream);
        skc::select_top_k(tp, stream);
      }
    };
    for (int i = 0; i < copies; ++i) step();  // warm-up: first calls configure the kernels
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (auto _ : state) {
      EventTimer t(stream);
      step();
      state.SetIterationTime(t.seconds());
    }
    const double landmark_bytes = static_cast<double>(per_copy) * sizeof(D);
    const double score_bytes = static_cast<double>(heads) * m * sizeof(float);
    const double hbm = landmark_bytes + 2.0 * score_bytes + static_cast<double>(heads) * k_sel * sizeof(std::int32_t);
    state.counters["hbm_bytes"] = hbm;
    state.counters["l2_bytes"] = 2.0 * batch * kHq * static_cast<double>(m) * sizeof(float);
    state.counters["floor_ms"] = hbm / kHbmBytesPerSecond * 1e3;
    state.counters["GBps"] = benchmark::Counter(hbm, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["copies"] = copies;
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  (void)cudaStreamDestroy(stream);
}

/// Where the ShadowKV build of one layer of one sequence spends its time (Llama-3.1-8B shapes,
/// bf16, `context` prompt tokens, wall clock after a device sync, so host work counts too):
///   part 0: the whole path, add_sequence + prefill (16K-token calls) + finish_prefill + remove
///   part 1: finish_prefill alone (the prefill calls are untimed)
///   part 2: LowRankKeyStore::build alone (Gram by cuBLAS, syevd, A = K·V_r)
///   part 3: the eigensolve alone: finalize_basis() after one untimed accumulate()
///   part 4: LandmarkIndex::build alone (means, min-cosine, outlier select)
///   part 5: a PinnedBuffer of the layer's offloaded values (cudaHostAlloc + cudaFreeHost)
/// The issue's reference is dense prefill attention of the same layer (bench/prefill_sdpa.py).
void bm_prefill_build(benchmark::State& state) {
  const long long context = state.range(0);
  const int part = static_cast<int>(state.range(1));
  Config cfg;
  cfg.rope = llama31_rope();
  const long long kv = static_cast<long long>(kHkv) * kD;
  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    skc::DeviceBuffer<D> keys(context * kv, stream), values(context * kv, stream);
    fill_random<<<1024, 256, 0, stream>>>(keys.data(), keys.size(), 11u);
    fill_random<<<1024, 256, 0, stream>>>(values.data(), values.size(), 12u);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto* k = reinterpret_cast<const bf16*>(keys.data());
    const auto* v = reinterpret_cast<const bf16*>(values.data());
    SparseAttention<ShadowKVPolicy, CudaBackend, bf16> attn(cfg, 1);
    SeqId next_id = 0;
    auto prefill = [&](SeqId id) {
      attn.add_sequence(id);
      constexpr long long kChunk = 16384;
      for (long long t0 = 0; t0 < context; t0 += kChunk) {
        const long long n = std::min(kChunk, context - t0);
        attn.prefill(id, 0, {}, TensorView<const bf16, 3>(k + t0 * kv, {n, kHkv, kD}),
                     TensorView<const bf16, 3>(v + t0 * kv, {n, kHkv, kD}), {}, stream);
      }
    };
    for (auto _ : state) {
      double seconds = 0;
      if (part == 0 || part == 1) {
        const SeqId id = next_id++;
        const auto t0 = std::chrono::steady_clock::now();
        if (part == 1) {
          prefill(id);
          SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
        const auto t1 = std::chrono::steady_clock::now();
        if (part == 0) prefill(id);
        attn.finish_prefill(id, stream);
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        if (part == 0) attn.remove_sequence(id);
        SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - (part == 1 ? t1 : t0)).count();
        if (part == 1) attn.remove_sequence(id);
      } else if (part == 2 || part == 3) {
        LowRankKeyStore<CudaBackend, bf16> store(kHkv, kD, cfg.rank);
        if (part == 3) store.accumulate(k, context, kv, stream);
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        const auto t0 = std::chrono::steady_clock::now();
        if (part == 2)
          store.build(k, context, kv, stream);
        else
          store.finalize_basis(stream);
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } else if (part == 4) {
        LandmarkIndex<CudaBackend, bf16> index(kHkv, kD, cfg.chunk_size);
        const long long indexed = (context / cfg.chunk_size - cfg.local_chunks) * cfg.chunk_size;
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        const auto t0 = std::chrono::steady_clock::now();
        index.build(k, indexed, kv, cfg.resolved_outlier_chunks(), stream);
        SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } else {
        const auto t0 = std::chrono::steady_clock::now();
        { skc::PinnedBuffer<D> host(static_cast<std::size_t>(context * kv), skc::default_host_allocator()); }
        seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      state.SetIterationTime(seconds);
    }
  }
  (void)cudaStreamDestroy(stream);
}

__global__ void gram_to_kernel(const float* g, float* f, double* d, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    f[i] = g[i];
    d[i] = g[i];
  }
}

/// Candidates for the build's eigensolve of the key Gram `KᵀK` (n = H_kv·d = 1024, r = 160):
///   solver 0: cusolverDnXsyevd, float64 (what LowRankKeyStore runs now)
///   solver 1: cusolverDnXsyevd, float32
///   solver 2: cusolverDnXsyevdx, float64, only the top r eigenpairs
///   solver 3: cusolverDnXsyevdx, float32, only the top r eigenpairs
///   solver 4: cusolverDnXsyevBatched, float64, `batch` matrices in one call
///   solver 5: cusolverDnXsyevBatched, float32, `batch` matrices in one call
/// Time per matrix (a batch's time / batch), CUDA events, the Gram copied in each iteration.
/// The Gram comes from 16384 random bf16 key rows through cuBLAS, as the build makes it.
void bm_eigensolve(benchmark::State& state) {
  const int solver = static_cast<int>(state.range(0));
  const int batch = static_cast<int>(state.range(1));
  constexpr int n = kHkv * kD, r = 160;
  constexpr long long rows = 16384;
  const bool dbl = solver % 2 == 0;
  const cudaDataType type = dbl ? CUDA_R_64F : CUDA_R_32F;
  const std::size_t esz = dbl ? sizeof(double) : sizeof(float);
  cudaStream_t stream;
  SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    skc::DeviceBuffer<D> keys(static_cast<std::size_t>(rows) * n, stream);
    fill_random<<<1024, 256, 0, stream>>>(keys.data(), keys.size(), 21u);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    const std::size_t elems = static_cast<std::size_t>(n) * n;
    skc::DeviceBuffer<float> gram(elems, stream), gram_f(elems, stream);
    skc::DeviceBuffer<double> gram_d(elems, stream);
    cublasHandle_t blas = skc::thread_library_handles().blas;
    cusolverDnHandle_t solver_h = skc::thread_library_handles().solver;
    SHADOWKV_CUBLAS_CHECK(cublasSetStream(blas, stream));
    SHADOWKV_CUSOLVER_CHECK(cusolverDnSetStream(solver_h, stream));
    const float one = 1.0f, zero = 0.0f;
    SHADOWKV_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, static_cast<int>(rows), &one, keys.data(),
                                       CUDA_R_16BF, n, keys.data(), CUDA_R_16BF, n, &zero, gram.data(), CUDA_R_32F, n,
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    gram_to_kernel<<<1024, 256, 0, stream>>>(gram.data(), gram_f.data(), gram_d.data(), elems);
    SHADOWKV_CUDA_CHECK_LAUNCH();
    const void* src = dbl ? static_cast<const void*>(gram_d.data()) : static_cast<const void*>(gram_f.data());
    const int mats = solver >= 4 ? batch : 1;
    skc::DeviceBuffer<std::byte> a(esz * elems * mats, stream), w(esz * n * mats, stream);
    skc::DeviceBuffer<int> info(static_cast<std::size_t>(mats), stream);
    cusolverDnParams_t params;
    SHADOWKV_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
    std::size_t dev_bytes = 0, host_bytes = 0;
    double vl = 0, vu = 0;
    float vlf = 0, vuf = 0;
    void* pvl = dbl ? static_cast<void*>(&vl) : static_cast<void*>(&vlf);
    void* pvu = dbl ? static_cast<void*>(&vu) : static_cast<void*>(&vuf);
    std::int64_t meig = 0;
    const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
    const auto lower = CUBLAS_FILL_MODE_LOWER;
    if (solver <= 1)
      SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(solver_h, params, jobz, lower, n, type, a.data(), n, type,
                                                          w.data(), type, &dev_bytes, &host_bytes));
    else if (solver <= 3)
      SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevdx_bufferSize(solver_h, params, jobz, CUSOLVER_EIG_RANGE_I, lower, n, type,
                                                           a.data(), n, pvl, pvu, n - r + 1, n, &meig, type, w.data(),
                                                           type, &dev_bytes, &host_bytes));
    else
      SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(solver_h, params, jobz, lower, n, type, a.data(), n,
                                                                type, w.data(), type, &dev_bytes, &host_bytes, mats));
    skc::DeviceBuffer<std::byte> work(std::max<std::size_t>(dev_bytes, 1), stream);
    std::vector<std::byte> host_work(std::max<std::size_t>(host_bytes, 1));
    for (auto _ : state) {
      for (int m = 0; m < mats; ++m)
        SHADOWKV_CUDA_CHECK(cudaMemcpyAsync(a.data() + m * esz * elems, src, esz * elems, cudaMemcpyDeviceToDevice, stream));
      EventTimer t(stream);
      if (solver <= 1)
        SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevd(solver_h, params, jobz, lower, n, type, a.data(), n, type, w.data(),
                                                 type, work.data(), dev_bytes, host_work.data(), host_bytes, info.data()));
      else if (solver <= 3)
        SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevdx(solver_h, params, jobz, CUSOLVER_EIG_RANGE_I, lower, n, type, a.data(),
                                                  n, pvl, pvu, n - r + 1, n, &meig, type, w.data(), type, work.data(),
                                                  dev_bytes, host_work.data(), host_bytes, info.data()));
      else
        SHADOWKV_CUSOLVER_CHECK(cusolverDnXsyevBatched(solver_h, params, jobz, lower, n, type, a.data(), n, type,
                                                       w.data(), type, work.data(), dev_bytes, host_work.data(),
                                                       host_bytes, info.data(), mats));
      state.SetIterationTime(t.seconds() / mats);
    }
    int h_info = 0;
    SHADOWKV_CUDA_CHECK(cudaMemcpy(&h_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost));
    state.counters["info"] = h_info;
    (void)cusolverDnDestroyParams(params);
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  (void)cudaStreamDestroy(stream);
}

}  // namespace

BENCHMARK(bm_shadowkv_step)
    ->ArgNames({"batch", "context", "all_miss"})
    ->Args({8, 131072, 0})
    ->Args({8, 131072, 1})
    ->Args({1, 131072, 0})
    ->Args({1, 131072, 1})
    ->Args({14, 131072, 0})  // the throughput harness's ShadowKV batch at 128K
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);
BENCHMARK(bm_sparse_attention_decode<ShadowKVPolicy>)
    ->Name("bm_decode_step/shadowkv")
    ->ArgNames({"batch", "context", "mode"})
    ->Args({8, 131072, 0})
    ->Args({8, 131072, 1})
    ->Args({8, 131072, 2})
    ->Args({8, 131072, 3})
    ->Args({8, 131072, 4})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(100);  // one call: the prefill of the batch is not repeated
BENCHMARK(bm_sparse_attention_decode<DensePolicy>)
    ->Name("bm_decode_step/dense")
    ->ArgNames({"batch", "context", "mode"})
    ->Args({8, 131072, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(100);  // one call: the prefill of the batch is not repeated
BENCHMARK(bm_dense)
    ->ArgNames({"batch", "context"})
    ->Args({1, 131072})
    ->Args({4, 131072})
    ->Args({8, 65536})
    ->Args({8, 131072})
    ->Args({1, 524288})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);
BENCHMARK(bm_dense_splits)
    ->ArgNames({"batch", "context", "splits"})
    ->ArgsProduct({{8}, {131072}, {2, 4, 8, 12, 16, 17, 24, 33, 40, 48, 66}})
    ->ArgsProduct({{1}, {131072}, {16, 24, 32, 33, 64, 99, 128, 192, 256}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.1);
BENCHMARK(bm_shadowkv_attention)
    ->ArgNames({"batch", "generated"})
    ->Args({1, 0})
    ->Args({8, 0})
    ->Args({8, 1024})
    ->Args({64, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

BENCHMARK(bm_shadowkv_attention_splits)
    ->ArgNames({"batch", "splits"})
    ->ArgsProduct({{8}, {2, 4, 6, 8, 10, 14, 20}})
    ->ArgsProduct({{64}, {1, 2, 3}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.1);
BENCHMARK(bm_score_landmarks)
    ->ArgNames({"batch", "context", "fused", "ctas"})
    ->ArgsProduct({{1, 2, 4, 8, 14}, {131072}, {0, 1}, {1, 8}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

BENCHMARK(bm_prefill_build)
    ->ArgNames({"context", "part"})
    ->ArgsProduct({{65536, 131072}, {0, 1, 2, 3, 4, 5}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

BENCHMARK(bm_eigensolve)
    ->ArgNames({"solver", "batch"})
    ->Args({0, 1})
    ->Args({1, 1})
    ->Args({2, 1})
    ->Args({3, 1})
    ->Args({4, 32})
    ->Args({5, 32})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

BENCHMARK_MAIN();
