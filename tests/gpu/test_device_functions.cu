// The __host__ __device__ functions of shadowkv/device/ run in CUDA kernels and are compared
// with the host path: RoPE at (large) positions for every variant, and the online-softmax merge.
// Without a CUDA device every test case prints "SKIPPED: no CUDA device (...)" and passes (ctest
// then reports the test as skipped). The last test case makes a CUDA call fail on purpose, which
// compute-sanitizer reports as an API error: run the suite under it with
// `--report-api-errors no`, or leave that case out with `-tce='*SHADOWKV_CUDA_CHECK*'`.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;

TEST_SUITE_BEGIN("gpu_device_functions");

namespace {

using skv_gpu_test::DeviceBuffer;
using skv_gpu_test::cuda_device_available;

// ------------------------------------------------------------------------------------------
// RoPE

/// out[v] = in[v] rotated to positions[v]: `in`, `out` [num_vectors, head_dim], one thread per
/// vector.
__global__ void rope_kernel(const float* in, float* out, const long long* positions,
                            int num_vectors, int head_dim, const float* inv_freq, int rotary_dim,
                            bool interleaved, float attention_scale) {
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= num_vectors) return;
  float* x = out + static_cast<std::size_t>(v) * head_dim;
  for (int i = 0; i < head_dim; ++i) x[i] = in[static_cast<std::size_t>(v) * head_dim + i];
  device::apply_rope(x, positions[v], inv_freq, rotary_dim, interleaved, attention_scale);
}

struct RopeCase {
  const char* name;
  RopeConfig cfg;
  int head_dim;
};

/// The variants of core/rope.hpp with the parameters of the checkpoints that use them.
std::vector<RopeCase> rope_cases() {
  std::vector<RopeCase> cases;
  RopeConfig c;
  c.theta = 10000.0;
  cases.push_back({"none (Llama 2)", c, 128});
  c.theta = 5000000.0;
  cases.push_back({"none theta=5e6 (Yi-200K)", c, 128});
  c = {};
  c.scaling = RopeScaling::linear;
  c.factor = 4.0;
  cases.push_back({"linear x4", c, 128});
  c = {};
  c.scaling = RopeScaling::ntk;
  c.factor = 4.0;
  cases.push_back({"ntk x4, d=64", c, 64});
  c = {};
  c.theta = 1000000.0;
  c.scaling = RopeScaling::yarn;
  c.factor = 4.0;
  c.original_max_position = 32768;
  cases.push_back({"yarn x4 (Qwen2.5)", c, 128});
  c = {};
  c.theta = 500000.0;
  c.scaling = RopeScaling::llama3;
  c.factor = 8.0;
  c.original_max_position = 8192;
  cases.push_back({"llama3 x8 (Llama 3.1)", c, 128});
  c = {};
  c.layout = RopeLayout::interleaved;
  c.rotary_dim = 64;
  cases.push_back({"interleaved, rotary_dim=64 of 128 (GLM-4)", c, 128});
  c = {};
  c.rotary_dim = 32;
  cases.push_back({"half_split, rotary_dim=32 of 96", c, 96});
  return cases;
}

/// Largest position tested: 2^23 - 1. Every table here has inv_freq[0] <= 1, so all angles
/// stay below the 2^24 rad for which device/rope.hpp states its device accuracy.
constexpr long long kMaxPosition = (1LL << 23) - 1;

/// Tolerance of one rotated element, relative to `attention_scale * (|x0| + |x1|)` of its pair.
/// Both paths use the same float inv_freq, so what differs is the cosine and sine: the host
/// takes them of the exact (double) angle; the device's angle is off by up to ~4e-7 rad
/// (device/rope.hpp: float Cody-Waite reduction), `sincosf` adds up to 2 ulp (1.2e-7), and
/// rounding cos/sin and the rotation (FMA-contracted or not) a few ulp of the pair's size:
/// ~8e-7 in all, doubled for margin. A float angle without the reduction would be off by
/// ~0.03 rad at position 500000, i.e. 1e4 times this tolerance.
constexpr double kRopeTolerance = 2e-6;

void check_rope_case(const RopeCase& rc, std::mt19937_64& rng) {
  CAPTURE(rc.name);
  const RopeTable table = make_rope_table(rc.cfg, rc.head_dim);
  const int d = table.head_dim;

  std::vector<long long> positions = {0,      1,      2,       7,       4095,    8191,
                                      8192,   32767,  131071,  131072,  500000,  524287,
                                      1000000, 1048575, 2097152, 4194303, kMaxPosition};
  std::uniform_int_distribution<long long> any_position(0, kMaxPosition);
  std::uniform_int_distribution<long long> short_position(0, 16384);
  while (positions.size() < 1000) {
    positions.push_back(any_position(rng));
    positions.push_back(short_position(rng));
  }
  const int n = static_cast<int>(positions.size());
  const std::vector<float> in =
      skv_test::random_vector<float>(rng, static_cast<std::size_t>(n) * d);

  DeviceBuffer<float> d_in(in.size()), d_out(in.size()), d_inv_freq(table.inv_freq.size());
  DeviceBuffer<long long> d_positions(positions.size());
  d_in.upload(in);
  d_inv_freq.upload(table.inv_freq);
  d_positions.upload(positions);
  d_out.poison();
  const int block = 128;
  rope_kernel<<<(n + block - 1) / block, block>>>(
      d_in.get(), d_out.get(), d_positions.get(), n, d, d_inv_freq.get(), table.rotary_dim,
      table.layout == RopeLayout::interleaved, table.attention_scale);
  SHADOWKV_CUDA_CHECK_LAUNCH();
  const std::vector<float> out = d_out.download();

  const int half = table.rotary_dim / 2;
  const bool interleaved = table.layout == RopeLayout::interleaved;
  double worst = 0.0;  // largest error / tolerance-scale seen, for the log
  int failures = 0;
  std::vector<float> expected(d);
  for (int v = 0; v < n; ++v) {
    const float* x = &in[static_cast<std::size_t>(v) * d];
    const float* got = &out[static_cast<std::size_t>(v) * d];
    std::copy_n(x, d, expected.begin());
    table.apply(expected.data(), positions[v]);
    for (int i = 0; i < half; ++i) {
      const int i0 = interleaved ? 2 * i : i;
      const int i1 = interleaved ? 2 * i + 1 : i + half;
      const double size = static_cast<double>(table.attention_scale) *
                          (std::fabs(static_cast<double>(x[i0])) +
                           std::fabs(static_cast<double>(x[i1])));
      for (int j : {i0, i1}) {
        const double err =
            std::fabs(static_cast<double>(got[j]) - static_cast<double>(expected[j]));
        const double ratio = err / std::max(size, 1e-30);
        if (!(err <= kRopeTolerance * size) && failures++ < 5) {
          CAPTURE(positions[v]);
          CAPTURE(j);
          CAPTURE(got[j]);
          CAPTURE(expected[j]);
          CAPTURE(size);
          FAIL_CHECK("device RoPE differs from the host beyond tolerance");
        }
        if (std::isfinite(ratio)) worst = std::max(worst, ratio);
      }
    }
    // Dimensions past rotary_dim pass through bit for bit.
    for (int j = table.rotary_dim; j < d; ++j)
      if (!(got[j] == x[j]) && failures++ < 5) {
        CAPTURE(positions[v]);
        CAPTURE(j);
        FAIL_CHECK("a dimension past rotary_dim was changed: ", got[j], " != ", x[j]);
      }
  }
  CHECK(failures == 0);
  MESSAGE(std::string(rc.name), ": worst |device - host| / (scale*(|x0|+|x1|)) = ", worst,
          " (tolerance ", kRopeTolerance, ")");
}

// ------------------------------------------------------------------------------------------
// Online-softmax merge

/// Partial states of `num_problems` problems, `num_segments` segments each, `n` outputs:
/// `m`, `l` [num_problems, num_segments], `o` [num_problems, num_segments, n].
/// One thread per problem folds segments 1.. into segment 0 with `device::merge_partial`,
/// writing `out_m`, `out_l` [num_problems] and `out_o` [num_problems, n].
__global__ void merge_kernel(const float* m, const float* l, const float* o, int num_problems,
                             int num_segments, int n, float* out_m, float* out_l, float* out_o) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= num_problems) return;
  const std::size_t base = static_cast<std::size_t>(p) * num_segments;
  float* acc = out_o + static_cast<std::size_t>(p) * n;
  for (int i = 0; i < n; ++i) acc[i] = o[base * n + i];
  device::SoftmaxState state{m[base], l[base]};
  for (int s = 1; s < num_segments; ++s)
    device::merge_partial(state, acc, device::SoftmaxState{m[base + s], l[base + s]},
                          o + (base + s) * n, n);
  out_m[p] = state.m;
  out_l[p] = state.l;
}

}  // namespace

TEST_CASE("gpu: device::apply_rope matches RopeTable::apply, every variant, positions to 2^23") {
  if (!cuda_device_available()) return;
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (const RopeCase& rc : rope_cases()) check_rope_case(rc, rng);
}

TEST_CASE("gpu: device::merge_partial matches the host merge and a float64 softmax") {
  if (!cuda_device_available()) return;
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);

  for (const int n : {1, 7, 64, 128}) {
    for (const int num_segments : {1, 2, 5}) {
      CAPTURE(n);
      CAPTURE(num_segments);
      const int num_problems = 300;
      const std::size_t num_states = static_cast<std::size_t>(num_problems) * num_segments;
      std::vector<float> m(num_states), l(num_states), o(num_states * n);
      // Float64 reference over the same (float) logits and values: max, normaliser, output, and
      // the output with |v| (the scale each output's rounding error is relative to).
      std::vector<double> ref_m(num_problems, -INFINITY), ref_l(num_problems),
          ref_o(static_cast<std::size_t>(num_problems) * n), ref_abs(ref_o.size());
      std::vector<std::vector<float>> logits(num_states);
      std::vector<std::vector<float>> values(num_states);
      std::uniform_int_distribution<int> tokens(1, 24);
      std::uniform_real_distribution<float> offset(-120.0f, 120.0f);
      std::normal_distribution<float> normal(0.0f, 3.0f);
      std::bernoulli_distribution empty(0.2), near(0.5);
      for (int p = 0; p < num_problems; ++p) {
        // Half the problems keep their segments' maxima close (every segment contributes);
        // the others spread them over +-120, so some rescale factors underflow to 0.
        const bool spread = !near(rng);
        for (int s = 0; s < num_segments; ++s) {
          const std::size_t k = static_cast<std::size_t>(p) * num_segments + s;
          float* ok = &o[k * n];
          if (empty(rng)) {  // a segment without tokens: the identity of the merge
            const device::SoftmaxState e = device::empty_softmax_state();
            m[k] = e.m;
            l[k] = e.l;
            std::fill_n(ok, n, 0.0f);
            continue;
          }
          const int t = tokens(rng);
          const float shift = spread ? offset(rng) : 0.0f;
          for (int j = 0; j < t; ++j) logits[k].push_back(shift + normal(rng));
          values[k] = skv_test::random_vector<float>(rng, static_cast<std::size_t>(t) * n);
          const float mx = *std::max_element(logits[k].begin(), logits[k].end());
          double sum = 0.0;
          std::vector<double> acc(n, 0.0);
          for (int j = 0; j < t; ++j) {
            const double w = std::exp(static_cast<double>(logits[k][j]) - mx);
            sum += w;
            for (int i = 0; i < n; ++i)
              acc[i] += w * values[k][static_cast<std::size_t>(j) * n + i];
          }
          m[k] = mx;
          l[k] = static_cast<float>(sum);
          for (int i = 0; i < n; ++i) ok[i] = static_cast<float>(acc[i]);
          ref_m[p] = std::max(ref_m[p], static_cast<double>(mx));
        }
        for (int s = 0; s < num_segments; ++s) {
          const std::size_t k = static_cast<std::size_t>(p) * num_segments + s;
          for (std::size_t j = 0; j < logits[k].size(); ++j) {
            const double w = std::exp(static_cast<double>(logits[k][j]) - ref_m[p]);
            ref_l[p] += w;
            for (int i = 0; i < n; ++i) {
              const double v = values[k][j * n + i];
              ref_o[static_cast<std::size_t>(p) * n + i] += w * v;
              ref_abs[static_cast<std::size_t>(p) * n + i] += w * std::fabs(v);
            }
          }
        }
      }
      // All segments of problem 0 empty: the merge must stay empty (m = -inf, l = 0, o = 0).
      for (int s = 0; s < num_segments; ++s) {
        m[s] = -INFINITY;
        l[s] = 0.0f;
        std::fill_n(&o[static_cast<std::size_t>(s) * n], n, 0.0f);
      }
      ref_m[0] = -INFINITY;
      ref_l[0] = 0.0;
      std::fill_n(ref_o.begin(), n, 0.0);
      std::fill_n(ref_abs.begin(), n, 0.0);

      DeviceBuffer<float> d_m(m.size()), d_l(l.size()), d_o(o.size());
      DeviceBuffer<float> d_out_m(num_problems), d_out_l(num_problems),
          d_out_o(static_cast<std::size_t>(num_problems) * n);
      d_m.upload(m);
      d_l.upload(l);
      d_o.upload(o);
      d_out_m.poison();
      d_out_l.poison();
      d_out_o.poison();
      const int block = 64;
      merge_kernel<<<(num_problems + block - 1) / block, block>>>(
          d_m.get(), d_l.get(), d_o.get(), num_problems, num_segments, n, d_out_m.get(),
          d_out_l.get(), d_out_o.get());
      SHADOWKV_CUDA_CHECK_LAUNCH();
      const std::vector<float> got_m = d_out_m.download(), got_l = d_out_l.download(),
                               got_o = d_out_o.download();

      // Host: the same function, same inputs, same order. The device's `expf` is within 2 ulp
      // (the host's within 1), each merge rescales once and adds once, so after at most 4
      // merges l and o agree to ~6 * 4 ulp of their size (|o| measured by the |v| output).
      // Against float64: the partials were rounded to float once more, so allow 1e-5.
      constexpr double kHostTolerance = 4e-6;
      constexpr double kRefTolerance = 1e-5;
      int failures = 0;
      for (int p = 0; p < num_problems; ++p) {
        const std::size_t base = static_cast<std::size_t>(p) * num_segments;
        device::SoftmaxState host{m[base], l[base]};
        std::vector<float> host_o(o.begin() + base * n, o.begin() + (base + 1) * n);
        for (int s = 1; s < num_segments; ++s)
          device::merge_partial(host, host_o.data(), device::SoftmaxState{m[base + s], l[base + s]},
                                &o[(base + s) * n], n);
        const float gm = got_m[p], gl = got_l[p];
        const bool empty_result = ref_l[p] == 0.0;
        bool ok = gm == host.m && (empty_result ? gm == -INFINITY && gl == 0.0f
                                                : gm == static_cast<float>(ref_m[p]));
        ok = ok && std::fabs(gl - host.l) <= kHostTolerance * host.l &&
             std::fabs(gl - ref_l[p]) <= kRefTolerance * ref_l[p];
        for (int i = 0; i < n && ok; ++i) {
          const std::size_t j = static_cast<std::size_t>(p) * n + i;
          // Unnormalised scale: l times the |v| average, i.e. ref_abs, rescaled to the max.
          const double size = ref_abs[j];
          ok = std::fabs(static_cast<double>(got_o[j]) - host_o[i]) <= kHostTolerance * size &&
               std::fabs(static_cast<double>(got_o[j]) - ref_o[j]) <= kRefTolerance * size;
          if (empty_result) ok = ok && got_o[j] == 0.0f;
        }
        if (!ok && failures++ < 5) {
          CAPTURE(p);
          CAPTURE(gm);
          CAPTURE(host.m);
          CAPTURE(ref_m[p]);
          CAPTURE(gl);
          CAPTURE(host.l);
          CAPTURE(ref_l[p]);
          FAIL_CHECK("device merge differs from the host merge or the float64 softmax");
        }
      }
      CHECK(failures == 0);
    }
  }
}

TEST_CASE("gpu: SHADOWKV_CUDA_CHECK throws shadowkv::Error naming the call and clears the error") {
  if (!cuda_device_available()) return;
  void* p = nullptr;
  // An absurd allocation fails without touching the context (cudaErrorMemoryAllocation).
  const std::size_t too_much = std::numeric_limits<std::size_t>::max() / 2;
  try {
    SHADOWKV_CUDA_CHECK(cudaMalloc(&p, too_much));
    FAIL("cudaMalloc of 2^63 bytes succeeded");
  } catch (const Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("cudaMalloc(&p, too_much)") != std::string::npos);
    CHECK(what.find("cudaErrorMemoryAllocation") != std::string::npos);
    CHECK(what.find("test_device_functions.cu") != std::string::npos);
  }
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK_NOTHROW(SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize()));
}

namespace {
/// Counts the blocks it hands out and takes back (plain heap memory: no CUDA involved).
class CountingHostAllocator final : public skc::HostAllocator {
 public:
  void* allocate(std::size_t bytes) override {
    if (live_bytes + bytes > limit) SHADOWKV_FAIL("counting allocator: out of memory for ", bytes, " bytes");
    ++allocations;
    live_bytes += bytes;
    return ::operator new(bytes);
  }
  void deallocate(void* ptr, std::size_t bytes) noexcept override {
    ++deallocations;
    live_bytes -= bytes;
    ::operator delete(ptr);
  }
  int allocations = 0, deallocations = 0;
  std::size_t live_bytes = 0, limit = SIZE_MAX;
};
}  // namespace

TEST_CASE("gpu: PoolAllocator keeps freed memory until trim() and names itself when an allocation fails") {
  SKV_REQUIRE_GPU();
  skv_gpu_test::Stream ts;
  const cudaStream_t stream = ts.get();
  skc::PoolAllocator pool;
  CHECK(pool.reserved_bytes() == 0);
  CHECK(pool.allocate(0, stream) == nullptr);
  {
    skc::DeviceBuffer<float> a(1 << 20, stream, pool), b(3 << 20, stream, pool);
    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(a.data(), 0, a.bytes(), stream));
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    CHECK(pool.used_bytes() >= a.bytes() + b.bytes());
  }
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  CHECK(pool.used_bytes() == 0);
  const std::size_t kept = pool.reserved_bytes();
  CHECK(kept >= (4u << 20) * sizeof(float));
  std::size_t free_before = 0, free_after = 0, total = 0;
  SHADOWKV_CUDA_CHECK(cudaMemGetInfo(&free_before, &total));
  pool.trim();
  SHADOWKV_CUDA_CHECK(cudaMemGetInfo(&free_after, &total));
  CHECK(pool.reserved_bytes() == 0);
  CHECK(free_after >= free_before + kept);  // back to the device
  const std::string msg = skv_test::error_message([&] { (void)pool.allocate(std::size_t{1} << 50, stream); });
  CHECK(msg.find("PoolAllocator") != std::string::npos);
  CHECK(msg.find(std::to_string(std::size_t{1} << 50)) != std::string::npos);
}

TEST_CASE("gpu: CachingHostAllocator reuses blocks of the same size, honours its limit, releases upstream") {
  CountingHostAllocator upstream;
  {
    skc::CachingHostAllocator cache(upstream, /*max_cached_bytes=*/3000);
    void* a = cache.allocate(1000);
    void* b = cache.allocate(2000);
    CHECK(upstream.allocations == 2);
    cache.deallocate(a, 1000);
    CHECK(cache.cached_bytes() == 1000);
    CHECK(cache.allocate(1000) == a);  // the same size: the cached block, nothing new
    CHECK(upstream.allocations == 2);
    void* c = cache.allocate(1000);  // none cached any more: upstream
    CHECK(upstream.allocations == 3);
    cache.deallocate(a, 1000);
    cache.deallocate(b, 2000);
    CHECK(cache.cached_bytes() == 3000);
    cache.deallocate(c, 1000);  // over the limit: straight back upstream
    CHECK(upstream.deallocations == 1);
    CHECK(cache.cached_bytes() == 3000);
    CHECK(cache.allocate(0) == nullptr);
    cache.release();
    CHECK(upstream.deallocations == 3);
    CHECK(cache.cached_bytes() == 0);
    cache.deallocate(cache.allocate(500), 500);  // left cached: the destructor releases it
  }
  CHECK(upstream.allocations == upstream.deallocations);
  {
    // Upstream full, blocks of another size cached: they are released and the allocation retried.
    upstream.limit = 4000;
    skc::CachingHostAllocator cache(upstream);
    cache.deallocate(cache.allocate(3000), 3000);
    void* p = cache.allocate(2000);
    CHECK(p != nullptr);
    CHECK(cache.cached_bytes() == 0);
    CHECK(upstream.live_bytes == 2000);
    // Nothing cached to give back: the upstream error comes through.
    CHECK(skv_test::error_message([&] { (void)cache.allocate(3000); }).find("out of memory for 3000 bytes") !=
          std::string::npos);
    cache.deallocate(p, 2000);
  }
  CHECK(upstream.allocations == upstream.deallocations);
  // Pinned buffers through it: the memory is mapped (a kernel-visible address exists).
  if (!cuda_device_available()) return;
  skc::CachingHostAllocator pinned;
  const float* first = nullptr;
  {
    skc::PinnedBuffer<float> buf(1024, pinned);
    first = buf.data();
    CHECK(buf.device_data() != nullptr);
  }
  skc::PinnedBuffer<float> again(1024, pinned);
  CHECK(again.data() == first);
  CHECK(pinned.cached_bytes() == 0);
}

TEST_SUITE_END();
