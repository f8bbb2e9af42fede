// The landmark build on the GPU (`LandmarkIndex<CudaBackend, T>`, `cuda::chunk_min_cosine`;
// cuda/landmark_index.cuh) against `LandmarkIndex<CpuBackend, T>` on the same keys.
//
// Two kinds of keys:
//  - "exact": small integers in [-4, 4] with chunk sizes that are powers of two, so that every
//    sum, dot product and mean both backends form is exact in float whatever the summation
//    order; the minimum cosines then come out of the same IEEE operations on both sides and
//    must be bit-equal, and so must the outlier and landmark ids for ANY O, ties included.
//    Chunks are drawn to tie a lot: all-zero chunks (cosine 0 through the 1e-30 floor),
//    chunks of +k/-k pairs (mean 0), copies of the previous chunk, and c = 1 (all ~1).
//  - "planted": Gaussian keys around a per-chunk direction (min cosine ~0.9), with exactly O
//    planted outlier chunks holding one key that points away (~ -0.9), so that the split does
//    not hinge on float rounding; the minimum cosines are compared with a tolerance.
// Landmarks are compared bit for bit in both: the kernel sums each element over the chunk's
// tokens in token order, in float, as the CPU class does, and divides the same way.
//
// Every head dim (64, 96, 128, 256), fp32/bf16/fp16, H_kv in {1, 2, 8}, c in {1, 8, 32},
// O = 0 / some / all, token strides wider than H_kv*d (aligned: 16-byte path; odd, or a
// misaligned base with 4-byte aligned index buffers: the scalar and 4-byte-copy paths; c = 32
// re-reads keys for the cosines, c <= 8 keeps them in registers), a rebuild, and 128K-context
// sizes (16384 chunks per head, O = 9000 with heavy ties; 20000 chunks: past one split tile).
// The index allocates from a test allocator that poisons every allocation (0xff: NaN / -1)
// and keeps a guard after it, checked when freed and after the build; live bytes must equal
// device_bytes(). Without a CUDA device the GPU cases print "SKIPPED" and pass; the argument
// checks run everywhere.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

using namespace shadowkv;

TEST_SUITE_BEGIN("gpu_landmark_build");

namespace {

using skv_gpu_test::DeviceBuffer;

using TestStream = skv_gpu_test::Stream;

/// An allocator that fills each allocation with 0xff bytes (NaN for every float type, -1 for
/// the ids) on the allocating stream, so that an element the build fails to write cannot pass,
/// and keeps a 256-byte guard after it, checked when the allocation is freed (after a sync of
/// the freeing stream) and by `guards_intact()`. Counts live bytes. With `misalign_bytes` = 4
/// its pointers are only 4-byte aligned (the build's scalar and 4-byte-copy paths).
class PoisonAllocator final : public cuda::DeviceAllocator {
 public:
  static constexpr std::size_t kGuard = 256;

  explicit PoisonAllocator(std::size_t misalign_bytes = 0) : misalign_(misalign_bytes) {}
  ~PoisonAllocator() override {
    for (auto& [ptr, bytes] : live_) (void)cudaFree(static_cast<unsigned char*>(ptr) - misalign_);
  }
  void* allocate(std::size_t bytes, cudaStream_t stream) override {
    void* base = nullptr;
    SHADOWKV_CUDA_CHECK(cudaMalloc(&base, misalign_ + bytes + kGuard));
    SHADOWKV_CUDA_CHECK(cudaMemsetAsync(base, 0xff, misalign_ + bytes + kGuard, stream));
    void* p = static_cast<unsigned char*>(base) + misalign_;
    live_[p] = bytes;
    live_bytes_ += bytes;
    return p;
  }
  void deallocate(void* ptr, std::size_t bytes, cudaStream_t stream) noexcept override {
    if (!ptr) return;
    (void)cudaStreamSynchronize(stream);
    const auto it = live_.find(ptr);
    if (it == live_.end() || it->second != bytes) {
      ++violations_;
    } else {
      if (!guard_intact(ptr, bytes)) ++violations_;
      live_bytes_ -= bytes;
      live_.erase(it);
    }
    (void)cudaFree(static_cast<unsigned char*>(ptr) - misalign_);
  }
  /// Every live allocation's guard still all 0xff (synchronises the device).
  bool guards_intact() const {
    SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
    for (const auto& [ptr, bytes] : live_)
      if (!guard_intact(ptr, bytes)) return false;
    return true;
  }
  std::size_t live_bytes() const { return live_bytes_; }
  int violations() const { return violations_; }

 private:
  static bool guard_intact(void* ptr, std::size_t bytes) {
    unsigned char guard[kGuard];
    if (cudaMemcpy(guard, static_cast<unsigned char*>(ptr) + bytes, kGuard, cudaMemcpyDeviceToHost) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return std::all_of(guard, guard + kGuard, [](unsigned char b) { return b == 0xff; });
  }

  std::size_t misalign_;
  std::map<void*, std::size_t> live_;
  std::size_t live_bytes_ = 0;
  int violations_ = 0;
};

enum class KeyKind { exact, planted };

struct BuildCase {
  int num_kv_heads;
  int head_dim;
  int chunk_size;
  index_t num_chunks;
  int num_outliers;
  KeyKind kind;
  long long pad = 0;  ///< token_stride = H_kv * d + pad
  int misalign = 0;   ///< elements the device keys start past a 256-byte boundary (and, if
                      ///< not 0, the index's buffers are only 4-byte aligned)
};

/// Keys `[n, H_kv, d]` of small integers (see the file comment): every chunk is all zeros,
/// +k/-k pairs (c even), a copy of the previous chunk of its head, or uniform in [-4, 4].
template <class T>
std::vector<T> exact_keys(std::mt19937_64& rng, const BuildCase& c) {
  const int hkv = c.num_kv_heads, d = c.head_dim, cs = c.chunk_size;
  std::vector<T> keys(static_cast<std::size_t>(c.num_chunks) * cs * hkv * d);
  auto at = [&](index_t ch, int t, int h) { return &keys[((ch * cs + t) * hkv + h) * static_cast<std::size_t>(d)]; };
  std::uniform_int_distribution<int> pattern(0, 9), value(-4, 4);
  for (int h = 0; h < hkv; ++h)
    for (index_t ch = 0; ch < c.num_chunks; ++ch) {
      const int p = pattern(rng);
      const bool zeros = p == 0, pairs = p == 1 && cs % 2 == 0, copy = (p == 2 || p == 3) && ch > 0;
      for (int t = 0; t < cs; ++t)
        for (int x = 0; x < d; ++x) {
          float v = static_cast<float>(value(rng));
          if (zeros) v = 0.0f;
          else if (pairs && t % 2 == 1) v = -static_cast<float>(at(ch, t - 1, h)[x]);
          else if (copy) v = static_cast<float>(at(ch - 1, t, h)[x]);
          at(ch, t, h)[x] = static_cast<T>(v);
        }
    }
  return keys;
}

/// Gaussian keys around a per-(head, chunk) direction b: `b + 0.3 * noise`; in exactly
/// `num_outliers` random chunks per head (when 0 < O < N and c >= 2) one key is
/// `-b + 0.3 * noise`. Returns the keys; `planted` gets the planted chunks per head (empty
/// when none are planted).
template <class T>
std::vector<T> planted_keys(std::mt19937_64& rng, const BuildCase& c, std::vector<std::vector<char>>& planted) {
  const int hkv = c.num_kv_heads, d = c.head_dim, cs = c.chunk_size;
  const index_t n_chunks = c.num_chunks;
  std::vector<T> keys(static_cast<std::size_t>(n_chunks) * cs * hkv * d);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> token(0, cs - 1);
  const bool plant = c.num_outliers > 0 && c.num_outliers < n_chunks && cs >= 2;
  planted.assign(plant ? hkv : 0, std::vector<char>(n_chunks, 0));
  std::vector<float> b(d);
  for (int h = 0; h < hkv; ++h) {
    std::vector<index_t> order(n_chunks);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    if (plant)
      for (int o = 0; o < c.num_outliers; ++o) planted[h][order[o]] = 1;
    for (index_t ch = 0; ch < n_chunks; ++ch) {
      for (auto& v : b) v = normal(rng);
      const int away = plant && planted[h][ch] ? token(rng) : -1;
      for (int t = 0; t < cs; ++t) {
        T* k = &keys[((ch * cs + t) * hkv + h) * static_cast<std::size_t>(d)];
        for (int x = 0; x < d; ++x) k[x] = static_cast<T>((t == away ? -b[x] : b[x]) + 0.3f * normal(rng));
      }
    }
  }
  return keys;
}

bool same_bits(const void* a, const void* b, std::size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

/// The keys as the device sees them: `[n, H_kv, d]` rows `token_stride` apart (the padding
/// NaN, so that a read of it would show), starting `misalign` elements into the buffer.
template <class T>
struct DeviceKeys {
  long long token_stride;
  std::unique_ptr<DeviceBuffer<T>> buffer;
  const T* data() const { return buffer->get() + misalign; }
  int misalign;
};

template <class T>
DeviceKeys<T> upload_keys(const std::vector<T>& keys, const BuildCase& c) {
  const long long row = static_cast<long long>(c.num_kv_heads) * c.head_dim;
  const index_t n = c.num_chunks * c.chunk_size;
  DeviceKeys<T> dk{row + c.pad, nullptr, c.misalign};
  std::vector<T> host(static_cast<std::size_t>(c.misalign + n * dk.token_stride + 1),
                      static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  for (index_t t = 0; t < n; ++t)
    std::copy_n(keys.begin() + t * row, row, host.begin() + c.misalign + t * dk.token_stride);
  dk.buffer = std::make_unique<DeviceBuffer<T>>(host.size());
  dk.buffer->upload(host);
  return dk;
}

/// Runs `chunk_min_cosine` and the build on the device and compares with the CPU class.
template <class T>
void run_build_case(const BuildCase& c, std::mt19937_64& rng, cudaStream_t stream, double& worst_cos_error) {
  const int hkv = c.num_kv_heads, d = c.head_dim, cs = c.chunk_size;
  const index_t n_chunks = c.num_chunks, n = n_chunks * cs;
  const bool exact = c.kind == KeyKind::exact;
  INFO("dtype=", dtype_name<T>(), " kind=", std::string(exact ? "exact" : "planted"), " d=", d, " H_kv=", hkv, " c=", cs,
       " N=", n_chunks, " O=", c.num_outliers, " pad=", c.pad, " misalign=", c.misalign);

  std::vector<std::vector<char>> planted;
  const std::vector<T> keys = exact ? exact_keys<T>(rng, c) : planted_keys<T>(rng, c, planted);
  const TensorView<const T, 3> view(keys.data(), {n, hkv, d});
  LandmarkIndex<CpuBackend, T> cpu(hkv, d, cs);
  cpu.build(view, c.num_outliers);
  const std::vector<float> cpu_cos = LandmarkIndex<CpuBackend, T>::chunk_min_cosine(view, cs);
  if (!exact && !planted.empty()) {
    // The test's premise: planted chunks score far below the others (checked on the CPU).
    float planted_max = -INFINITY, normal_min = INFINITY;
    for (int h = 0; h < hkv; ++h)
      for (index_t ch = 0; ch < n_chunks; ++ch) {
        const float s = cpu_cos[h * n_chunks + ch];
        if (planted[h][ch]) planted_max = std::max(planted_max, s);
        else normal_min = std::min(normal_min, s);
      }
    REQUIRE(planted_max < normal_min - 0.1f);
  }

  const DeviceKeys<T> dk = upload_keys(keys, c);

  // chunk_min_cosine, into a NaN-poisoned buffer with 64 guard elements past the end.
  const std::size_t n_scores = static_cast<std::size_t>(hkv) * n_chunks;
  DeviceBuffer<float> d_cos(n_scores + 64);
  d_cos.poison();
  SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
  cuda::chunk_min_cosine(dk.data(), n, dk.token_stride, hkv, d, cs, d_cos.get(), stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<float> gpu_cos = d_cos.download();
  // Planted keys: float rounding of dot products of d terms summed in other orders; the
  // cosines are ~0.9 in magnitude, the error a few ulp of the terms' sum (measured <= 1.2e-6 over every case).
  const double cos_tolerance = 4e-6;
  int failures = 0;
  for (std::size_t i = 0; i < n_scores; ++i) {
    const double err = std::fabs(static_cast<double>(gpu_cos[i]) - cpu_cos[i]);
    const bool ok = exact ? gpu_cos[i] == cpu_cos[i] : err <= cos_tolerance;
    if (!exact && std::isfinite(err)) worst_cos_error = std::max(worst_cos_error, err);
    if (!ok && failures++ < 5) {
      CAPTURE(i);
      CAPTURE(gpu_cos[i]);
      CAPTURE(cpu_cos[i]);
      FAIL_CHECK("GPU chunk_min_cosine differs from the CPU class");
    }
  }
  for (std::size_t i = n_scores; i < n_scores + 64; ++i)
    if (!std::isnan(gpu_cos[i]) && failures++ < 5) FAIL_CHECK("chunk_min_cosine wrote past [H_kv, num_chunks]");
  CHECK(failures == 0);

  // The build, with the poisoning allocator (4-byte aligned buffers with misaligned keys).
  PoisonAllocator allocator(c.misalign ? 4 : 0);
  {
    LandmarkIndex<CudaBackend, T> gpu(hkv, d, cs, allocator);
    gpu.build(dk.data(), n, dk.token_stride, c.num_outliers, stream);
    CHECK(gpu.num_chunks() == n_chunks);
    CHECK(gpu.num_outliers() == c.num_outliers);
    CHECK(gpu.num_landmarks() == cpu.num_landmarks());
    CHECK(gpu.device_bytes() == cpu.device_bytes());
    const index_t m = cpu.num_landmarks();
    CHECK((gpu.landmarks_data() != nullptr) == (m > 0));
    CHECK((gpu.landmark_chunk_ids_data() != nullptr) == (m > 0));
    CHECK((gpu.outlier_chunk_ids_data() != nullptr) == (c.num_outliers > 0));
    for (int h = 0; h < hkv; ++h) {
      CAPTURE(h);
      const std::vector<std::int32_t> lm_ids = gpu.landmark_chunk_ids(h, stream);
      const std::vector<std::int32_t> out_ids = gpu.outlier_chunk_ids(h, stream);
      const std::vector<T> lm = gpu.landmarks(h, stream);
      const auto want_lm_ids = cpu.landmark_chunk_ids(h);
      const auto want_out_ids = cpu.outlier_chunk_ids(h);
      CHECK(std::equal(lm_ids.begin(), lm_ids.end(), want_lm_ids.begin(), want_lm_ids.end()));
      CHECK(std::equal(out_ids.begin(), out_ids.end(), want_out_ids.begin(), want_out_ids.end()));
      if (!planted.empty() && static_cast<index_t>(out_ids.size()) == c.num_outliers)
        CHECK(std::all_of(out_ids.begin(), out_ids.end(), [&](std::int32_t id) { return planted[h][id] != 0; }));
      REQUIRE(lm.size() == static_cast<std::size_t>(m) * d);
      for (index_t j = 0; j < m; ++j)
        if (!same_bits(&lm[j * d], cpu.landmarks(h) + j * d, d * sizeof(T)) && failures++ < 5) {
          CAPTURE(j);
          int x = 0;
          while (x < d && same_bits(&lm[j * d + x], cpu.landmarks(h) + j * d + x, sizeof(T))) ++x;
          CAPTURE(x);
          CAPTURE(static_cast<float>(lm[j * d + x]));
          CAPTURE(static_cast<float>(cpu.landmarks(h)[j * d + x]));
          FAIL_CHECK("GPU landmark differs from the CPU class's");
        }
    }
    CHECK(failures == 0);
    CHECK(allocator.live_bytes() == gpu.device_bytes());  // the build's scratch is gone
    CHECK(allocator.guards_intact());
  }
  CHECK(allocator.live_bytes() == 0);
  CHECK(allocator.violations() == 0);
}

/// Every head dim x H_kv x chunk size x O (0 / some / all) for storage type T, both key kinds;
/// the token stride and alignment rotate over aligned, wider aligned, odd, misaligned base.
template <class T>
void check_all_shapes(std::mt19937_64& rng) {
  TestStream stream;
  std::uniform_int_distribution<int> chunks(2, 40);
  double worst = 0.0;
  int variant = 0;
  for (const KeyKind kind : {KeyKind::exact, KeyKind::planted})
    for (const int d : {64, 96, 128, 256})
      for (const int hkv : {1, 2, 8})
        for (const int cs : {1, 8, 32})
          for (const int outliers : {0, 1, 2}) {
            BuildCase c{hkv, d, cs, chunks(rng), 0, kind};
            if (outliers == 1) {
              // c = 1 chunks all score ~1: a partial split is exact only with exact keys.
              if (kind == KeyKind::planted && cs == 1) continue;
              c.num_outliers = std::uniform_int_distribution<int>(1, static_cast<int>(c.num_chunks) - 1)(rng);
            } else if (outliers == 2) {
              c.num_outliers = static_cast<int>(c.num_chunks);
            }
            switch (variant++ % 4) {
              case 0: break;
              case 1: c.pad = 16; break;
              case 2: c.pad = 3; break;  // odd stride: the scalar path
              default:
                c.pad = 8;
                c.misalign = 1;  // misaligned base: the scalar path
                break;
            }
            run_build_case<T>(c, rng, stream.get(), worst);
          }
  MESSAGE("dtype=", dtype_name<T>(), ": worst |GPU - CPU| min cosine on planted keys ", worst);
}

}  // namespace

TEST_CASE("gpu: landmark build matches the CPU class, fp32, every head dim, H_kv, chunk size and O") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<float>(rng);
}

TEST_CASE("gpu: landmark build matches the CPU class, bf16, every head dim, H_kv, chunk size and O") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<bf16>(rng);
}

TEST_CASE("gpu: landmark build matches the CPU class, fp16, every head dim, H_kv, chunk size and O") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<fp16>(rng);
}

TEST_CASE("gpu: landmark build at 128K-context sizes (16K chunks per head), heavy ties past one scan tile") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TestStream stream;
  double worst = 0.0;
  // Llama-3.1-8B at 128K: H_kv = 8, d = 128, c = 8; the paper's 48 outliers, then many.
  run_build_case<bf16>({8, 128, 8, 16384, 48, KeyKind::planted, 64}, rng, stream.get(), worst);
  run_build_case<bf16>({8, 128, 8, 16384, 48, KeyKind::exact}, rng, stream.get(), worst);
  run_build_case<bf16>({8, 128, 8, 16384, 9000, KeyKind::exact, 0, 8}, rng, stream.get(), worst);
  // c = 1: every score is a function of |k|^2 alone, so ties run across every tile.
  run_build_case<float>({2, 256, 1, 20000, 12345, KeyKind::exact, 4}, rng, stream.get(), worst);
  run_build_case<fp16>({1, 64, 32, 5000, 4999, KeyKind::exact}, rng, stream.get(), worst);
  MESSAGE("worst |GPU - CPU| min cosine on planted keys ", worst);
}

TEST_CASE("gpu: rebuilding an index replaces its contents and frees the previous buffers") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TestStream stream;
  PoisonAllocator allocator;
  const int hkv = 2, d = 64, cs = 8;
  LandmarkIndex<CudaBackend, bf16> gpu(hkv, d, cs, allocator);
  for (const auto& [n_chunks, outliers] : std::vector<std::pair<index_t, int>>{{30, 5}, {7, 0}, {12, 12}, {0, 0}, {50, 3}}) {
    CAPTURE(n_chunks);
    CAPTURE(outliers);
    BuildCase c{hkv, d, cs, n_chunks, outliers, KeyKind::exact};
    const std::vector<bf16> keys = exact_keys<bf16>(rng, c);
    const index_t n = n_chunks * cs;
    LandmarkIndex<CpuBackend, bf16> cpu(hkv, d, cs);
    cpu.build(TensorView<const bf16, 3>(keys.data(), {n, hkv, d}), outliers);
    DeviceBuffer<bf16> d_keys(keys.size());
    if (!keys.empty()) d_keys.upload(keys);
    gpu.build(n ? d_keys.get() : nullptr, n, hkv * d, outliers, stream.get());
    CHECK(gpu.num_chunks() == n_chunks);
    CHECK(gpu.device_bytes() == cpu.device_bytes());
    CHECK(allocator.live_bytes() == gpu.device_bytes());
    for (int h = 0; h < hkv; ++h) {
      const auto ids = gpu.landmark_chunk_ids(h, stream.get());
      const auto want = cpu.landmark_chunk_ids(h);
      CHECK(std::equal(ids.begin(), ids.end(), want.begin(), want.end()));
      const auto out = gpu.outlier_chunk_ids(h, stream.get());
      const auto want_out = cpu.outlier_chunk_ids(h);
      CHECK(std::equal(out.begin(), out.end(), want_out.begin(), want_out.end()));
      const auto lm = gpu.landmarks(h, stream.get());
      REQUIRE(lm.size() == static_cast<std::size_t>(cpu.num_landmarks()) * d);
      CHECK(same_bits(lm.data(), cpu.landmarks(h), lm.size() * sizeof(bf16)));
    }
  }
  CHECK(allocator.guards_intact());
  CHECK(allocator.violations() == 0);
}

TEST_CASE("landmark build: invalid arguments throw shadowkv::Error naming the argument, before any CUDA call") {
  // No SKV_REQUIRE_GPU: validation precedes every CUDA call, so this runs without a device.
  // The pointers are never dereferenced (each call fails validation first).
  static bf16 dummy[16];
  static float dummy_out[16];
  using skv_test::error_message;
  auto has = [](const std::string& message, const char* what) {
    INFO(message);
    return message.find(what) != std::string::npos;
  };
  CHECK(has(error_message([] { (void)LandmarkIndex<CudaBackend, bf16>(0, 128, 8); }), "num_kv_heads=0"));
  CHECK(has(error_message([] { (void)LandmarkIndex<CudaBackend, bf16>(2, 80, 8); }), "head_dim=80"));
  CHECK(has(error_message([] { (void)LandmarkIndex<CudaBackend, float>(2, 0, 8); }), "head_dim=0"));
  CHECK(has(error_message([] { (void)LandmarkIndex<CudaBackend, fp16>(2, 128, 0); }), "chunk_size=0"));

  LandmarkIndex<CudaBackend, bf16> index(2, 64, 8);
  const long long row = 2 * 64;
  auto build_error = [&](const bf16* keys, index_t n, long long stride, int outliers) {
    return error_message([&] { index.build(keys, n, stride, outliers, nullptr); });
  };
  CHECK(has(build_error(dummy, 20, row, 0), "num_tokens=20"));  // not a multiple of 8
  CHECK(has(build_error(dummy, -8, row, 0), "num_tokens=-8"));
  CHECK(has(build_error(dummy, 16, row - 1, 0), "token_stride=127"));
  CHECK(has(build_error(dummy, 16, row, 3), "num_outlier_chunks=3"));
  CHECK(has(build_error(dummy, 16, row, -1), "num_outlier_chunks=-1"));
  CHECK(has(build_error(nullptr, 16, row, 1), "keys_post_rope must be non-null"));
  CHECK(has(build_error(nullptr, 0, row, 1), "num_outlier_chunks=1"));
  // An empty region is valid and makes no CUDA call.
  CHECK(build_error(nullptr, 0, row, 0) == "(no throw)");
  CHECK(index.num_chunks() == 0);
  CHECK(index.num_landmarks() == 0);
  CHECK(index.device_bytes() == 0);
  CHECK(index.landmarks_data() == nullptr);
  // Downloads check the head first; empty lists make no CUDA call.
  CHECK(has(error_message([&] { (void)index.landmark_chunk_ids(2, nullptr); }), "kv_head=2"));
  CHECK(has(error_message([&] { (void)index.outlier_chunk_ids(-1, nullptr); }), "kv_head=-1"));
  CHECK(has(error_message([&] { (void)index.landmarks(5, nullptr); }), "kv_head=5"));
  CHECK(index.landmark_chunk_ids(1, nullptr).empty());
  CHECK(index.landmarks(0, nullptr).empty());

  auto cos_error = [&](const bf16* keys, index_t n, long long stride, int hkv, int d, int cs, float* out) {
    return error_message([&] { cuda::chunk_min_cosine(keys, n, stride, hkv, d, cs, out, nullptr); });
  };
  CHECK(has(cos_error(dummy, 16, row, 0, 64, 8, dummy_out), "num_kv_heads=0"));
  CHECK(has(cos_error(dummy, 16, row, 2, 100, 8, dummy_out), "head_dim=100"));
  CHECK(has(cos_error(dummy, 16, row, 2, 64, -1, dummy_out), "chunk_size=-1"));
  CHECK(has(cos_error(dummy, 12, row, 2, 64, 8, dummy_out), "num_tokens=12"));
  CHECK(has(cos_error(dummy, 16, 100, 2, 64, 8, dummy_out), "token_stride=100"));
  CHECK(has(cos_error(nullptr, 16, row, 2, 64, 8, dummy_out), "keys must be non-null"));
  CHECK(has(cos_error(dummy, 16, row, 2, 64, 8, nullptr), "out must be non-null"));
  CHECK(cos_error(nullptr, 0, row, 2, 64, 8, nullptr) == "(no throw)");
}

TEST_SUITE_END();
