// The miss path of a decode step on the GPU (cuda/miss_ops.cuh): the fused key rebuild + RoPE
// into key slots and the zero-copy value gather into value slots, for ragged batches, checked
// against the CPU backend (`LowRankKeyStore<CpuBackend, T>::reconstruct` with the same
// `RopeTable`; host chunks bit for bit). Every slot starts as a finite sentinel, the slots of
// the misses as NaN: a miss the kernels skip cannot pass, a slot they should not touch must
// keep its sentinel bytes. Without a CUDA device the GPU cases print "SKIPPED: no CUDA device
// (...)"; the argument checks run everywhere (they make no CUDA call).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// Eigen 3.4 marks some members __host__ __device__ that call host-only code; the CPU store
// (the reference) instantiates them here, in a .cu file. They never run on the device.
#pragma nv_diag_suppress 20011
#pragma nv_diag_suppress 20014
#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

using namespace shadowkv;
namespace skc = shadowkv::cuda;

TEST_SUITE_BEGIN("gpu_miss_ops");

namespace {

using skc::ChunkMiss;
using skv_gpu_test::DeviceBuffer;

template <class T>
using kernel_t = skc::device_t<T>;

/// Sleeps ~`ns` nanoseconds, then stores `value`: a writer that finishes late.
__global__ void store_after_delay(int* dst, int value, unsigned ns) {
  for (unsigned slept = 0; slept < ns; slept += 1000) __nanosleep(1000);
  *dst = value;
}

/// Launched with a programmatic dependency (`skc::launch_kernel`): waits for the grid before it,
/// then copies `n` elements.
template <class T>
__global__ void copy_after_wait(const T* src, T* dst, std::size_t n) {
  skc::kernels::wait_for_previous_grids();
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

/// Bytes of the sentinel every slot starts with (finite in each dtype: 0x3C3C is ~0.0115 in
/// bf16 and ~1.06 in fp16, 0x3C3C3C3C ~0.0115 in fp32).
constexpr unsigned char kSentinelByte = 0x3C;

template <class T>
void fill_bytes(std::vector<T>& v, std::size_t begin, std::size_t count, unsigned char byte) {
  std::memset(static_cast<void*>(v.data() + begin), byte, count * sizeof(T));
}

template <class T>
bool all_bytes(const T* p, std::size_t count, unsigned char byte) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  return std::all_of(b, b + count * sizeof(T), [byte](unsigned char x) { return x == byte; });
}

using Stream = skv_gpu_test::Stream;

template <class T>
std::unique_ptr<DeviceBuffer<T>> upload(const std::vector<T>& h) {
  auto d = std::make_unique<DeviceBuffer<T>>(h.size());
  d->upload(h);
  return d;
}

int download_int(const DeviceBuffer<int>& d) { return d.download().at(0); }

// ------------------------------------------------------------------------------------------
// Batches

/// One sequence of a key batch: its low-rank store (CPU, the reference) and the device copies
/// of A, the basis and its key slots `[H, capacity, c, d]`.
template <class T>
struct KeySequence {
  index_t rows = 0;
  int capacity = 0;
  std::unique_ptr<LowRankKeyStore<CpuBackend, T>> store;
  std::vector<T> initial_slots;
  std::unique_ptr<DeviceBuffer<T>> a, basis, slots;
  index_t num_chunks(int c) const { return rows / c; }
};

/// Builds a store per sequence from random pre-RoPE keys: `build()` on the first
/// `min(rows, build_rows)` rows, `append()` for the rest (both paths of the CPU store).
template <class T>
std::vector<KeySequence<T>> make_key_batch(std::mt19937_64& rng, int h, int d, int r, const std::vector<index_t>& rows,
                                           const std::vector<int>& capacities, index_t build_rows = 1 << 30) {
  std::vector<KeySequence<T>> batch(rows.size());
  for (std::size_t s = 0; s < rows.size(); ++s) {
    KeySequence<T>& seq = batch[s];
    seq.rows = rows[s];
    seq.capacity = capacities[s];
    seq.store = std::make_unique<LowRankKeyStore<CpuBackend, T>>(h, d, r);
    const std::vector<T> keys = skv_test::random_vector<T>(rng, static_cast<std::size_t>(seq.rows) * h * d);
    const index_t first = std::min(seq.rows, build_rows);
    seq.store->build(TensorView<const T, 3>(keys.data(), {first, h, d}));
    if (first < seq.rows)
      seq.store->append(TensorView<const T, 3>(keys.data() + first * h * d, {seq.rows - first, h, d}));
    REQUIRE(seq.store->size() == seq.rows);
    seq.a = upload(std::vector<T>(seq.store->a_data(), seq.store->a_data() + seq.rows * r));
    const T* basis = seq.store->basis_data();
    seq.basis = upload(std::vector<T>(basis, basis + static_cast<index_t>(h) * r * d));
  }
  return batch;
}

/// Random misses for every (sequence, head): a random number (possibly 0) of distinct chunks
/// in `[0, num_chunks)` into distinct slots, sorted by (sequence, head) as a per-head fetch
/// produces them, or shuffled. `extra_chunks[s]`, when given, are forced into head 0's list.
std::vector<ChunkMiss> make_misses(std::mt19937_64& rng, const std::vector<index_t>& num_chunks,
                                   const std::vector<int>& capacities, int h, bool shuffle,
                                   const std::vector<std::vector<int>>& extra_chunks = {}) {
  std::vector<ChunkMiss> misses;
  for (std::size_t s = 0; s < num_chunks.size(); ++s)
    for (int head = 0; head < h; ++head) {
      const int most = static_cast<int>(std::min<index_t>(num_chunks[s], capacities[s]));
      std::vector<int> chunks(static_cast<std::size_t>(num_chunks[s]));
      std::iota(chunks.begin(), chunks.end(), 0);
      std::shuffle(chunks.begin(), chunks.end(), rng);
      if (head == 0 && s < extra_chunks.size())
        for (std::size_t i = 0; i < extra_chunks[s].size(); ++i) {
          auto it = std::find(chunks.begin(), chunks.end(), extra_chunks[s][i]);
          REQUIRE(it != chunks.end());
          std::iter_swap(chunks.begin() + static_cast<std::ptrdiff_t>(i), it);
        }
      int k = std::uniform_int_distribution<int>(0, most)(rng);
      if (head == 0 && s < extra_chunks.size()) k = std::max<int>(k, static_cast<int>(extra_chunks[s].size()));
      std::vector<int> slots(static_cast<std::size_t>(capacities[s]));
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      for (int i = 0; i < k; ++i) misses.push_back({static_cast<std::int32_t>(s), head, chunks[i], slots[i]});
    }
  if (misses.empty()) misses.push_back({0, 0, 0, 0});  // num_chunks[0] >= 1 and capacity >= 1
  if (shuffle) std::shuffle(misses.begin(), misses.end(), rng);
  return misses;
}

/// Sentinel everywhere, NaN in the slots of `misses` (those of sequence `s` only).
template <class T>
std::vector<T> initial_slots(std::size_t s, int h, int capacity, std::size_t chunk_elems,
                             const std::vector<ChunkMiss>& misses, std::size_t offset = 0) {
  std::vector<T> v(offset + static_cast<std::size_t>(h) * capacity * chunk_elems);
  fill_bytes(v, 0, v.size(), kSentinelByte);
  for (const ChunkMiss& m : misses)
    if (m.seq == static_cast<std::int32_t>(s))
      fill_bytes(v, offset + (static_cast<std::size_t>(m.kv_head) * capacity + m.slot) * chunk_elems, chunk_elems,
                 0xFF);
  return v;
}

// ------------------------------------------------------------------------------------------
// Key rebuild: launch and check

/// Spacing of T's values at |x| (bf16: 8 significant bits, fp16: 11, subnormals included).
template <class T>
double ulp_of(double x) {
  constexpr int mantissa = std::is_same_v<T, bf16> ? 7 : 10;
  constexpr int min_exponent = std::is_same_v<T, bf16> ? -126 : -14;
  const int e = x == 0.0 ? min_exponent : std::max(std::ilogb(std::fabs(x)), min_exponent);
  return std::ldexp(1.0, e - mantissa);
}

struct KeyTally {
  int failures = 0;
  int chunks = 0;
  double worst_rel = 0.0;  ///< worst relative norm error of a chunk
};

/// Launches `rebuild_keys` over `batch` (fresh slots: sentinel, NaN at the misses) and checks
/// every slot: a missed one against the CPU reconstruction rounded to T, the others unchanged.
template <class T>
void rebuild_and_check(std::vector<KeySequence<T>>& batch, const std::vector<ChunkMiss>& misses, int h, int d, int r,
                       int c, const RopeTable* table, const Stream& stream, KeyTally& tally) {
  using D = kernel_t<T>;
  const std::size_t chunk_elems = static_cast<std::size_t>(c) * d;
  std::vector<skc::RebuildKeysSequence<D>> descriptors(batch.size());
  for (std::size_t s = 0; s < batch.size(); ++s) {
    KeySequence<T>& seq = batch[s];
    seq.initial_slots = initial_slots<T>(s, h, seq.capacity, chunk_elems, misses);
    seq.slots = upload(seq.initial_slots);
    descriptors[s] = {skc::as_device<T>(seq.a->get()), skc::as_device<T>(seq.basis->get()),
                      skc::as_device<T>(seq.slots->get()), seq.rows, seq.capacity};
  }
  const auto d_descriptors = upload(descriptors);
  const auto d_misses = upload(misses);
  const auto d_invalid = upload(std::vector<int>{0});
  std::unique_ptr<DeviceBuffer<float>> d_inv_freq;

  skc::RebuildKeysParams<D> p;
  p.sequences = d_descriptors->get();
  p.num_sequences = static_cast<int>(batch.size());
  p.misses = d_misses->get();
  p.num_misses = static_cast<int>(misses.size());
  p.num_kv_heads = h;
  p.head_dim = d;
  p.rank = r;
  p.chunk_size = c;
  p.maybe_num_invalid = d_invalid->get();
  if (table) {
    d_inv_freq = upload(table->inv_freq);
    p.rope = skc::make_rebuild_rope(*table, d_inv_freq->get());
  }
  skc::rebuild_keys(p, stream.get());
  SHADOWKV_CUDA_CHECK(cudaGetLastError());
  stream.sync();
  CHECK(download_int(*d_invalid) == 0);

  std::vector<std::vector<T>> got(batch.size());
  std::vector<std::vector<char>> missed(batch.size());
  for (std::size_t s = 0; s < batch.size(); ++s) {
    got[s] = batch[s].slots->download();
    missed[s].assign(static_cast<std::size_t>(h) * batch[s].capacity, 0);
  }
  std::vector<float> ref(chunk_elems);
  std::vector<index_t> positions(static_cast<std::size_t>(c));
  for (const ChunkMiss& m : misses) {
    const KeySequence<T>& seq = batch[static_cast<std::size_t>(m.seq)];
    missed[static_cast<std::size_t>(m.seq)][static_cast<std::size_t>(m.kv_head) * seq.capacity + m.slot] = 1;
    std::iota(positions.begin(), positions.end(), static_cast<index_t>(m.chunk) * c);
    seq.store->reconstruct(m.kv_head, positions, ref.data(), table);
    const T* out = got[static_cast<std::size_t>(m.seq)].data() +
                   (static_cast<std::size_t>(m.kv_head) * seq.capacity + m.slot) * chunk_elems;
    double err2 = 0.0;
    double ref2 = 0.0;
    bool elements_ok = true;
    for (int t = 0; t < c; ++t) {
      // Float noise floor of a row: the products run over r terms of A[p] times orthonormal
      // basis rows, so the float results differ by a few 1e-7 of |A[p]|.
      const T* a_row = seq.store->a_data() + (positions[static_cast<std::size_t>(t)]) * r;
      double a_norm2 = 0.0;
      for (int k = 0; k < r; ++k) a_norm2 += std::pow(static_cast<double>(static_cast<float>(a_row[k])), 2);
      const double floor = 2e-5 * std::sqrt(a_norm2) * (table ? table->attention_scale : 1.0);
      for (int x = 0; x < d; ++x) {
        const double want = ref[static_cast<std::size_t>(t) * d + x];
        const double have = static_cast<double>(static_cast<float>(out[static_cast<std::size_t>(t) * d + x]));
        err2 += (have - want) * (have - want);
        ref2 += want * want;
        if constexpr (!std::is_same_v<T, float>) {
          if (!(std::fabs(have - want) <= ulp_of<T>(want) + floor) && elements_ok) {
            elements_ok = false;
            CAPTURE(t);
            CAPTURE(x);
            CAPTURE(have);
            CAPTURE(want);
            CAPTURE(floor);
            FAIL_CHECK("rebuilt key element differs from the CPU float result by more than 1 ulp of the storage type");
          }
        }
      }
    }
    const double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), 1e-30);
    const double tolerance = std::is_same_v<T, float> ? 1e-5 : (std::is_same_v<T, bf16> ? 1e-2 : 1e-3);
    ++tally.chunks;
    if (std::isfinite(rel)) tally.worst_rel = std::max(tally.worst_rel, rel);
    if (!(rel <= tolerance) || !elements_ok) {
      if (tally.failures++ < 5) {
        CAPTURE(m.seq);
        CAPTURE(m.kv_head);
        CAPTURE(m.chunk);
        CAPTURE(m.slot);
        CAPTURE(rel);
        CAPTURE(tolerance);
        FAIL_CHECK("rebuilt keys of a missed chunk differ from LowRankKeyStore::reconstruct");
      }
    }
  }
  for (std::size_t s = 0; s < batch.size(); ++s)
    for (std::size_t hs = 0; hs < missed[s].size(); ++hs)
      if (!missed[s][hs] && !all_bytes(got[s].data() + hs * chunk_elems, chunk_elems, kSentinelByte) &&
          tally.failures++ < 5) {
        CAPTURE(s);
        CAPTURE(hs);
        FAIL_CHECK("a key slot outside the miss list was written");
      }
}

struct RopeVariant {
  std::string name;
  std::optional<RopeConfig> cfg;  ///< nullopt: no RoPE (keys stay pre-RoPE)
};

std::vector<RopeVariant> rope_variants(int d) {
  std::vector<RopeVariant> v;
  v.push_back({"none (pre-RoPE)", std::nullopt});
  v.push_back({"half_split theta=1e4", RopeConfig{}});
  RopeConfig glm;
  glm.layout = RopeLayout::interleaved;
  glm.rotary_dim = d / 2;
  v.push_back({"interleaved rotary_dim=d/2 (GLM-4)", glm});
  v.push_back({"llama3 x8 (Llama 3.1)", llama31_rope()});
  RopeConfig yarn;
  yarn.theta = 1000000.0;
  yarn.scaling = RopeScaling::yarn;
  yarn.factor = 4.0;
  yarn.original_max_position = 32768;
  v.push_back({"yarn x4 (attention_scale != 1)", yarn});
  return v;
}

template <class T>
void rebuild_grid(std::mt19937_64& rng) {
  const std::string dtype(dtype_name<T>());
  CAPTURE(dtype);
  const Stream stream;
  const int chunk_sizes[] = {8, 5, 40, 1};
  int variant = 0;
  for (const int d : {64, 96, 128, 256}) {
    const int h = d == 256 ? 1 : 2;  // keeps the CPU SVDs small; H_kv = 8 has its own case
    const int n = h * d;
    std::vector<int> ranks = {1, 16};
    if (160 < n) ranks.push_back(160);
    ranks.push_back(n);
    for (const int r : ranks) {
      const int c = chunk_sizes[variant++ % 4];
      const bool shuffle = c == 5;
      CAPTURE(d);
      CAPTURE(h);
      CAPTURE(r);
      CAPTURE(c);
      CAPTURE(shuffle);
      const std::vector<index_t> rows = {static_cast<index_t>(c) * 30 + 3, static_cast<index_t>(c) * 11,
                                         static_cast<index_t>(c) * 45 + c - 1};
      const std::vector<int> capacities = {7, 16, 25};
      auto batch = make_key_batch<T>(rng, h, d, r, rows, capacities);
      std::vector<index_t> num_chunks;
      for (const auto& s : batch) num_chunks.push_back(s.num_chunks(c));
      for (const RopeVariant& rv : rope_variants(d)) {
        CAPTURE(rv.name);
        const auto misses = make_misses(rng, num_chunks, capacities, h, shuffle);
        std::optional<RopeTable> table;
        if (rv.cfg) table = make_rope_table(*rv.cfg, d);
        KeyTally tally;
        rebuild_and_check<T>(batch, misses, h, d, r, c, table ? &*table : nullptr, stream, tally);
        CHECK(tally.failures == 0);
        MESSAGE(dtype_name<T>(), " d=", d, " H=", h, " r=", r, " c=", c, " ", rv.name, ": ", tally.chunks,
                " chunks, worst relative norm error ", tally.worst_rel);
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------

TEST_CASE("miss ops: arguments are checked before any CUDA call") {
  // No GPU needed: every call below throws (or returns) before touching CUDA.
  const ChunkMiss miss{0, 0, 0, 0};
  const skc::RebuildKeysSequence<__nv_bfloat16> key_seq{};
  const skc::GatherValuesSequence<__nv_bfloat16> value_seq{};
  skc::RebuildKeysParams<__nv_bfloat16> k;
  k.sequences = &key_seq;
  k.num_sequences = 1;
  k.misses = &miss;
  k.num_misses = 1;
  k.num_kv_heads = 2;
  k.head_dim = 128;
  k.rank = 160;
  k.chunk_size = 8;
  auto rebuild_error = [](skc::RebuildKeysParams<__nv_bfloat16> p) {
    return skv_test::error_message([&] { skc::rebuild_keys(p, nullptr); });
  };
  auto with = [&](auto change) {
    auto p = k;
    change(p);
    return rebuild_error(p);
  };
  using KP = skc::RebuildKeysParams<__nv_bfloat16>&;
  CHECK(with([](KP p) { p.head_dim = 80; }).find("head_dim=80") != std::string::npos);
  CHECK(with([](KP p) { p.head_dim = 80; }).find("supported: 64, 96, 128, 256") != std::string::npos);
  CHECK(with([](KP p) { p.rank = 0; }).find("rank=0") != std::string::npos);
  CHECK(with([](KP p) { p.rank = -3; }).find("rank=-3") != std::string::npos);
  CHECK(with([](KP p) { p.rank = 257; }).find("rank=257 must be in [1, num_kv_heads*head_dim=256]") !=
        std::string::npos);
  CHECK(with([](KP p) { p.chunk_size = 0; }).find("chunk_size=0") != std::string::npos);
  CHECK(with([](KP p) { p.chunk_size = -8; }).find("chunk_size=-8") != std::string::npos);
  CHECK(with([](KP p) { p.num_kv_heads = 0; }).find("num_kv_heads=0") != std::string::npos);
  CHECK(with([](KP p) { p.num_misses = -1; }).find("num_misses=-1") != std::string::npos);
  CHECK(with([](KP p) { p.misses = nullptr; }).find("misses is null") != std::string::npos);
  CHECK(with([](KP p) { p.sequences = nullptr; }).find("sequences is null") != std::string::npos);
  CHECK(with([](KP p) { p.num_sequences = 0; }).find("num_sequences=0") != std::string::npos);
  const float inv_freq = 1.0f;
  CHECK(with([&](KP p) {
          p.rope.inv_freq = &inv_freq;
          p.rope.rotary_dim = 3;
        }).find("rope.rotary_dim=3") != std::string::npos);
  CHECK(with([&](KP p) {
          p.rope.inv_freq = &inv_freq;
          p.rope.rotary_dim = 130;
        }).find("rope.rotary_dim=130") != std::string::npos);
  // Nothing to do: no launch, no CUDA call, no error even with null lists.
  CHECK_NOTHROW(skc::rebuild_keys(skc::RebuildKeysParams<float>{.num_kv_heads = 1, .head_dim = 64, .rank = 1,
                                                                 .chunk_size = 8},
                                  nullptr));

  skc::GatherValuesParams<__nv_bfloat16> v;
  v.sequences = &value_seq;
  v.num_sequences = 1;
  v.misses = &miss;
  v.num_misses = 1;
  v.num_kv_heads = 2;
  v.head_dim = 128;
  v.chunk_size = 8;
  using VP = skc::GatherValuesParams<__nv_bfloat16>&;
  auto vwith = [&](auto change) {
    auto p = v;
    change(p);
    return skv_test::error_message([&] { skc::gather_values(p, nullptr); });
  };
  CHECK(vwith([](VP p) { p.head_dim = 0; }).find("head_dim=0") != std::string::npos);
  CHECK(vwith([](VP p) { p.chunk_size = 0; }).find("chunk_size=0") != std::string::npos);
  CHECK(vwith([](VP p) { p.num_kv_heads = -1; }).find("num_kv_heads=-1") != std::string::npos);
  CHECK(vwith([](VP p) { p.num_misses = -2; }).find("num_misses=-2") != std::string::npos);
  CHECK(vwith([](VP p) { p.misses = nullptr; }).find("misses is null") != std::string::npos);
  CHECK(vwith([](VP p) { p.sequences = nullptr; }).find("sequences is null") != std::string::npos);
  CHECK_NOTHROW(skc::gather_values(skc::GatherValuesParams<float>{.num_kv_heads = 1, .head_dim = 64, .chunk_size = 8},
                                   nullptr));

  // make_rebuild_rope takes the table's layout, rotary dim and scale.
  RopeConfig glm;
  glm.layout = RopeLayout::interleaved;
  glm.rotary_dim = 64;
  const RopeTable table = make_rope_table(glm, 128);
  const skc::RebuildRope rope = skc::make_rebuild_rope(table, &inv_freq);
  CHECK(rope.inv_freq == &inv_freq);
  CHECK(rope.rotary_dim == 64);
  CHECK(rope.interleaved);
  CHECK(rope.attention_scale == table.attention_scale);
  CHECK(skv_test::error_message([&] { (void)skc::make_rebuild_rope(table, nullptr); }).find("inv_freq_device") !=
        std::string::npos);
}

TEST_CASE("miss ops: rebuild_keys matches LowRankKeyStore::reconstruct (every head dim, ranks, RoPE, fp32)") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  rebuild_grid<float>(rng);
}

TEST_CASE("miss ops: rebuild_keys matches LowRankKeyStore::reconstruct (every head dim, ranks, RoPE, bf16)") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  rebuild_grid<bf16>(rng);
}

TEST_CASE("miss ops: rebuild_keys matches LowRankKeyStore::reconstruct (every head dim, ranks, RoPE, fp16)") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  rebuild_grid<fp16>(rng);
}

TEST_CASE("miss ops: rebuild_keys at Llama-3.1-8B shapes, r = 160 and full rank H_kv*d = 1024") {
  // H_kv = 8, d = 128: r = 160 keeps the basis in shared memory (40 KiB bf16, 80 KiB fp32),
  // r = 1024 streams it (256 KiB); fewer rows than the rank exercise the basis completion.
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Stream stream;
  const int h = 8, d = 128, c = 8;
  const RopeTable table = make_rope_table(llama31_rope(), d);
  auto run = [&]<class T>(int r) {
    const std::string dtype(dtype_name<T>());
    CAPTURE(dtype);
    CAPTURE(r);
    const std::vector<index_t> rows = {8 * 40 + 5, 8 * 97};
    const std::vector<int> capacities = {32, 64};
    auto batch = make_key_batch<T>(rng, h, d, r, rows, capacities);
    const auto misses = make_misses(rng, {40, 97}, capacities, h, false);
    KeyTally tally;
    rebuild_and_check<T>(batch, misses, h, d, r, c, &table, stream, tally);
    CHECK(tally.failures == 0);
    MESSAGE(dtype_name<T>(), " H=8 d=128 r=", r, ": ", tally.chunks, " chunks, worst relative norm error ",
            tally.worst_rel);
  };
  run.template operator()<bf16>(160);
  run.template operator()<float>(160);
  run.template operator()<bf16>(1024);
  run.template operator()<fp16>(1024);
}

TEST_CASE("miss ops: rebuild_keys at positions up to 128K, ragged with a short sequence") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Stream stream;
  const int h = 1, d = 128, r = 96, c = 8;
  const index_t long_rows = 131072 + 8 * 3 + 5;  // the last 5 rows do not fill a chunk
  const std::vector<index_t> rows = {long_rows, 8 * 20};
  const std::vector<int> capacities = {48, 12};
  const std::vector<index_t> num_chunks = {long_rows / c, 20};
  const int last = static_cast<int>(long_rows / c) - 1;
  // The last chunks (positions just past 2^17), the first, and one at 2^16.
  const std::vector<std::vector<int>> forced = {{last, last - 1, 0, 8192, 16383, 16384}};
  auto run = [&]<class T>() {
    const std::string dtype(dtype_name<T>());
    CAPTURE(dtype);
    auto batch = make_key_batch<T>(rng, h, d, r, rows, capacities, 4096);
    for (const RopeConfig& cfg : {llama31_rope(), RopeConfig{.layout = RopeLayout::interleaved, .rotary_dim = 64}}) {
      const RopeTable table = make_rope_table(cfg, d);
      const std::string layout = to_string(table.layout);
      CAPTURE(layout);
      const auto misses = make_misses(rng, num_chunks, capacities, h, false, forced);
      KeyTally tally;
      rebuild_and_check<T>(batch, misses, h, d, r, c, &table, stream, tally);
      CHECK(tally.failures == 0);
      MESSAGE(dtype_name<T>(), " positions to ", long_rows - 6, " ", layout, ": ", tally.chunks,
              " chunks, worst relative norm error ", tally.worst_rel);
    }
  };
  run.template operator()<float>();
  run.template operator()<bf16>();
}

// ------------------------------------------------------------------------------------------
// Value gather

namespace {

/// One ragged batch of values: host chunks in mapped pinned memory, device slots; with
/// `misalign`, sequence 1 reads and writes one element past 16-byte boundaries and sequence 2
/// reads one past (the element-wise path).
template <class T>
void gather_case(std::mt19937_64& rng, const Stream& stream, int h, int d, int c, bool misalign) {
  using D = kernel_t<T>;
  const std::string dtype(dtype_name<T>());
  CAPTURE(dtype);
  CAPTURE(d);
  CAPTURE(c);
  CAPTURE(misalign);
  const std::vector<index_t> num_chunks = {37, 5, 21};
  const std::vector<int> capacities = {9, 4, 24};
  const std::size_t chunk_elems = static_cast<std::size_t>(c) * d;
  const auto misses = make_misses(rng, num_chunks, capacities, h, /*shuffle=*/true);

  std::vector<skc::PinnedBuffer<T>> host;
  std::vector<std::size_t> src_offset, dst_offset;
  std::vector<std::unique_ptr<DeviceBuffer<T>>> slots;
  std::vector<std::vector<T>> initial;
  std::vector<skc::GatherValuesSequence<D>> descriptors;
  for (std::size_t s = 0; s < num_chunks.size(); ++s) {
    src_offset.push_back(misalign && s >= 1 ? 1 : 0);
    dst_offset.push_back(misalign && s == 1 ? 1 : 0);
    const std::size_t n = static_cast<std::size_t>(h) * num_chunks[s] * chunk_elems;
    host.emplace_back(src_offset[s] + n, skc::default_host_allocator());
    const std::vector<T> values = skv_test::random_vector<T>(rng, src_offset[s] + n);
    std::copy(values.begin(), values.end(), host.back().data());
    initial.push_back(initial_slots<T>(s, h, capacities[s], chunk_elems, misses, dst_offset[s]));
    slots.push_back(upload(initial.back()));
    descriptors.push_back({skc::as_device<T>(host.back().device_data() + src_offset[s]),
                           skc::as_device<T>(slots.back()->get() + dst_offset[s]), num_chunks[s], capacities[s]});
  }
  const auto d_descriptors = upload(descriptors);
  const auto d_misses = upload(misses);
  const auto d_invalid = upload(std::vector<int>{0});
  skc::GatherValuesParams<D> p;
  p.sequences = d_descriptors->get();
  p.num_sequences = static_cast<int>(descriptors.size());
  p.misses = d_misses->get();
  p.num_misses = static_cast<int>(misses.size());
  p.num_kv_heads = h;
  p.head_dim = d;
  p.chunk_size = c;
  p.maybe_num_invalid = d_invalid->get();
  skc::gather_values(p, stream.get());
  stream.sync();
  CHECK(download_int(*d_invalid) == 0);

  int failures = 0;
  for (std::size_t s = 0; s < num_chunks.size(); ++s) {
    const std::vector<T> got = slots[s]->download();
    std::vector<char> missed(static_cast<std::size_t>(h) * capacities[s], 0);
    for (const ChunkMiss& m : misses) {
      if (m.seq != static_cast<std::int32_t>(s)) continue;
      const std::size_t hs = static_cast<std::size_t>(m.kv_head) * capacities[s] + m.slot;
      missed[hs] = 1;
      const T* want = host[s].data() + src_offset[s] +
                      (static_cast<std::size_t>(m.kv_head) * num_chunks[s] + m.chunk) * chunk_elems;
      if (std::memcmp(got.data() + dst_offset[s] + hs * chunk_elems, want, chunk_elems * sizeof(T)) != 0 &&
          failures++ < 5) {
        CAPTURE(s);
        CAPTURE(m.kv_head);
        CAPTURE(m.chunk);
        CAPTURE(m.slot);
        FAIL_CHECK("value slot differs from its host chunk");
      }
    }
    for (std::size_t hs = 0; hs < missed.size(); ++hs)
      if (!missed[hs] && !all_bytes(got.data() + dst_offset[s] + hs * chunk_elems, chunk_elems, kSentinelByte) &&
          failures++ < 5) {
        CAPTURE(s);
        CAPTURE(hs);
        FAIL_CHECK("a value slot outside the miss list was written");
      }
    if (dst_offset[s] && !all_bytes(got.data(), dst_offset[s], kSentinelByte) && failures++ < 5)
      FAIL_CHECK("the element before a misaligned slot array was written");
  }
  CHECK(failures == 0);
}

}  // namespace

TEST_CASE("miss ops: gather_values copies missed chunks from mapped host memory bit for bit") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Stream stream;
  // d = 80 too: the gather is bytewise and takes any head dim.
  for (const int d : {64, 80, 96, 128, 256})
    for (const int c : {8, 1, 16, 3})
      for (const bool misalign : {false, true}) {
        gather_case<float>(rng, stream, 2, d, c, misalign);
        gather_case<bf16>(rng, stream, 2, d, c, misalign);
        gather_case<fp16>(rng, stream, 2, d, c, misalign);
      }
}

TEST_CASE("miss ops: a device miss count and out-of-range misses (skipped, counted, nothing written)") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const Stream stream;
  using T = bf16;
  using D = kernel_t<T>;
  const int h = 2, d = 128, r = 32, c = 8;
  const std::size_t chunk_elems = static_cast<std::size_t>(c) * d;
  const RopeTable table = make_rope_table(RopeConfig{}, d);
  const std::vector<index_t> rows = {8 * 12 + 3, 8 * 6};  // 12 and 6 whole chunks
  const std::vector<int> capacities = {5, 3};
  auto batch = make_key_batch<T>(rng, h, d, r, rows, capacities);
  // 12 entries: 6 invalid among the first 10, entries 10 and 11 valid and beyond the count.
  const std::vector<ChunkMiss> misses = {
      {0, 0, 3, 1},  {2, 0, 0, 0},   // sequence out of range
      {1, 1, 5, 2},  {0, 2, 0, 0},   // head out of range
      {0, 1, 12, 0},                 // chunk 12 of sequence 0: past its rows (and its values)
      {1, 0, 0, 3},                  // slot == capacity
      {0, 1, 11, 4}, {-1, 0, 0, 0},  // negative sequence
      {0, 0, -1, 2},                 // negative chunk
      {1, 0, 2, 0},  {0, 0, 7, 0},  {1, 1, 0, 1}};
  const std::vector<char> valid = {1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1};
  std::vector<ChunkMiss> valid_misses;
  for (std::size_t i = 0; i < misses.size(); ++i)
    if (valid[i]) valid_misses.push_back(misses[i]);

  // Values: host chunk m of head h of sequence s holds random bits.
  std::vector<skc::PinnedBuffer<T>> host;
  std::vector<skc::GatherValuesSequence<D>> value_descriptors;
  std::vector<skc::RebuildKeysSequence<D>> key_descriptors;
  std::vector<std::unique_ptr<DeviceBuffer<T>>> value_slots;
  for (std::size_t s = 0; s < batch.size(); ++s) {
    const index_t m = batch[s].num_chunks(c);
    host.emplace_back(static_cast<std::size_t>(h) * m * chunk_elems, skc::default_host_allocator());
    const auto values = skv_test::random_vector<T>(rng, host.back().size());
    std::copy(values.begin(), values.end(), host.back().data());
    value_slots.push_back(upload(initial_slots<T>(s, h, capacities[s], chunk_elems, valid_misses)));
    batch[s].initial_slots = initial_slots<T>(s, h, capacities[s], chunk_elems, valid_misses);
    batch[s].slots = upload(batch[s].initial_slots);
    value_descriptors.push_back({skc::as_device<T>(host.back().device_data()),
                                 skc::as_device<T>(value_slots.back()->get()), m, capacities[s]});
    key_descriptors.push_back({skc::as_device<T>(batch[s].a->get()), skc::as_device<T>(batch[s].basis->get()),
                               skc::as_device<T>(batch[s].slots->get()), batch[s].rows, capacities[s]});
  }
  const auto d_values = upload(value_descriptors);
  const auto d_keys = upload(key_descriptors);
  const auto d_misses = upload(misses);
  const auto d_inv_freq = upload(table.inv_freq);
  const auto d_count = upload(std::vector<int>{10});
  const auto d_key_invalid = upload(std::vector<int>{0});
  const auto d_value_invalid = upload(std::vector<int>{0});

  skc::RebuildKeysParams<D> kp;
  kp.sequences = d_keys->get();
  kp.num_sequences = 2;
  kp.misses = d_misses->get();
  kp.num_misses = 12;
  kp.maybe_num_misses = d_count->get();
  kp.num_kv_heads = h;
  kp.head_dim = d;
  kp.rank = r;
  kp.chunk_size = c;
  kp.rope = skc::make_rebuild_rope(table, d_inv_freq->get());
  kp.maybe_num_invalid = d_key_invalid->get();
  skc::GatherValuesParams<D> vp;
  vp.sequences = d_values->get();
  vp.num_sequences = 2;
  vp.misses = d_misses->get();
  vp.num_misses = 12;
  vp.maybe_num_misses = d_count->get();
  vp.num_kv_heads = h;
  vp.head_dim = d;
  vp.chunk_size = c;
  vp.maybe_num_invalid = d_value_invalid->get();

  // The two halves of the miss path on two streams, as a decode step runs them.
  const Stream value_stream;
  skc::rebuild_keys(kp, stream.get());
  skc::gather_values(vp, value_stream.get());
  stream.sync();
  value_stream.sync();
  CHECK(download_int(*d_key_invalid) == 6);
  CHECK(download_int(*d_value_invalid) == 6);

  auto check_slots = [&](std::size_t processed) {
    int failures = 0;
    std::vector<float> ref(chunk_elems);
    std::vector<index_t> positions(c);
    for (std::size_t s = 0; s < batch.size(); ++s) {
      const auto keys = batch[s].slots->download();
      const auto values = value_slots[s]->download();
      for (int head = 0; head < h; ++head)
        for (int slot = 0; slot < capacities[s]; ++slot) {
          const std::size_t off = (static_cast<std::size_t>(head) * capacities[s] + slot) * chunk_elems;
          const ChunkMiss* hit = nullptr;
          for (std::size_t i = 0; i < processed; ++i)
            if (valid[i] && misses[i].seq == static_cast<int>(s) && misses[i].kv_head == head && misses[i].slot == slot)
              hit = &misses[i];
          if (!hit) {
            // Untouched: sentinel, or NaN for a valid miss beyond the count.
            const bool later = std::any_of(valid_misses.begin(), valid_misses.end(), [&](const ChunkMiss& m) {
              return m.seq == static_cast<int>(s) && m.kv_head == head && m.slot == slot;
            });
            const unsigned char byte = later ? 0xFF : kSentinelByte;
            const bool kept =
                all_bytes(keys.data() + off, chunk_elems, byte) && all_bytes(values.data() + off, chunk_elems, byte);
            if (!kept && failures++ < 5) {
              CAPTURE(s);
              CAPTURE(head);
              CAPTURE(slot);
              FAIL_CHECK("a slot that no processed valid miss targets was written");
            }
            continue;
          }
          const T* want =
              host[s].data() + (static_cast<std::size_t>(head) * batch[s].num_chunks(c) + hit->chunk) * chunk_elems;
          if (std::memcmp(values.data() + off, want, chunk_elems * sizeof(T)) != 0 && failures++ < 5)
            FAIL_CHECK("value slot differs from its host chunk");
          std::iota(positions.begin(), positions.end(), static_cast<index_t>(hit->chunk) * c);
          batch[s].store->reconstruct(head, positions, ref.data(), &table);
          double err2 = 0.0, ref2 = 0.0;
          for (std::size_t i = 0; i < chunk_elems; ++i) {
            const double e = static_cast<double>(static_cast<float>(keys[off + i])) - ref[i];
            err2 += e * e;
            ref2 += static_cast<double>(ref[i]) * ref[i];
          }
          if (!(std::sqrt(err2) <= 1e-2 * std::sqrt(ref2)) && failures++ < 5)
            FAIL_CHECK("rebuilt keys differ from LowRankKeyStore::reconstruct");
        }
    }
    CHECK(failures == 0);
  };
  check_slots(10);

  // A count above the list's size: all 12 entries, the 2 beyond it counted as invalid.
  d_count->upload(std::vector<int>{14});
  d_key_invalid->upload(std::vector<int>{0});
  d_value_invalid->upload(std::vector<int>{0});
  skc::rebuild_keys(kp, stream.get());
  skc::gather_values(vp, value_stream.get());
  stream.sync();
  value_stream.sync();
  CHECK(download_int(*d_key_invalid) == 6 + 2);
  CHECK(download_int(*d_value_invalid) == 6 + 2);
  check_slots(12);

  // Side by side in one launch, into fresh slots: the miss count is written by a kernel that
  // finishes late, right before, and what follows is a kernel launched with a programmatic
  // dependency too (copies of the slots), as the decode step's attention is: it must see both
  // halves done.
  for (std::size_t s = 0; s < batch.size(); ++s) {
    value_slots[s]->upload(initial_slots<T>(s, h, capacities[s], chunk_elems, valid_misses));
    batch[s].slots->upload(batch[s].initial_slots);
  }
  d_count->upload(std::vector<int>{0});
  d_key_invalid->upload(std::vector<int>{0});
  d_value_invalid->upload(std::vector<int>{0});
  store_after_delay<<<1, 1, 0, stream.get()>>>(d_count->get(), 10, 200000);
  SHADOWKV_CUDA_CHECK_LAUNCH();
  skc::rebuild_keys_beside_gather(kp, vp, stream.get());
  std::vector<std::unique_ptr<DeviceBuffer<T>>> key_copies, value_copies;
  for (std::size_t s = 0; s < batch.size(); ++s) {
    key_copies.push_back(std::make_unique<DeviceBuffer<T>>(batch[s].slots->size()));
    value_copies.push_back(std::make_unique<DeviceBuffer<T>>(value_slots[s]->size()));
    // The key copy right after the gather (one wait on it), the value copy after that.
    skc::launch_kernel<copy_after_wait<D>>(dim3(64), dim3(256), 0, stream.get(), 1u,
                                           skc::as_device<T>(batch[s].slots->get()),
                                           skc::as_device<T>(key_copies[s]->get()), batch[s].slots->size());
    skc::launch_kernel<copy_after_wait<D>>(dim3(64), dim3(256), 0, stream.get(), 1u,
                                           skc::as_device<T>(value_slots[s]->get()),
                                           skc::as_device<T>(value_copies[s]->get()), value_slots[s]->size());
  }
  stream.sync();
  CHECK(download_int(*d_key_invalid) == 6);
  CHECK(download_int(*d_value_invalid) == 6);
  for (std::size_t s = 0; s < batch.size(); ++s) {  // the copies are what the slots hold at the end
    std::swap(batch[s].slots, key_copies[s]);
    std::swap(value_slots[s], value_copies[s]);
  }
  check_slots(10);
}

TEST_SUITE_END();
