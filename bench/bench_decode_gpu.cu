// One layer's decode attention on the GPU, Llama-3.1-8B attention shapes (32 q / 8 KV heads,
// head dim 128, bf16): the dense kernel over the whole cache, and the ShadowKV attention over
// its static set + 256 selected chunks + generated tokens (the selection and miss path are
// measured separately once they are composed). CUDA-event timing (UseManualTime); counters:
// HBM bytes per step, the floor bytes / 4.0 TB/s, and the achieved bandwidth.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include <shadowkv/shadowkv.cuh>

using namespace shadowkv;
namespace skc = shadowkv::cuda;  // libcu++ (pulled in by CUB) has a global ::cuda too

namespace {

constexpr int kHq = 32, kHkv = 8, kD = 128;
constexpr double kHbmBytesPerSecond = 4.0e12;  // GPU.md: ~3970-4240 GB/s measured on the H200

using D = __nv_bfloat16;

/// RAII CUDA event pair timing one region on a stream.
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t s) : stream_(s) {
    SHADOWKV_CUDA_CHECK(cudaEventCreate(&start_));
    SHADOWKV_CUDA_CHECK(cudaEventCreate(&stop_));
    SHADOWKV_CUDA_CHECK(cudaEventRecord(start_, stream_));
  }
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  double seconds() {
    SHADOWKV_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    SHADOWKV_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    SHADOWKV_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms / 1e3;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_, stop_;
};

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

/// ShadowKV's attention at budget 2048: static 48 outlier chunks + 32 local rows, 256 selected
/// chunks of 8, and `range(1)` generated rows.
void bm_shadowkv_attention(benchmark::State& state) {
  Workload w;
  setup(w, static_cast<int>(state.range(0)), 48 * 8 + 32, 256, static_cast<int>(state.range(1)));
  run(state, w);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(w.stream));
}

}  // namespace

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
BENCHMARK(bm_shadowkv_attention)
    ->ArgNames({"batch", "generated"})
    ->Args({1, 0})
    ->Args({8, 0})
    ->Args({8, 1024})
    ->Args({64, 0})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.2);

BENCHMARK_MAIN();
