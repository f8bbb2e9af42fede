// The decode-step landmark scoring and top-k selection on the GPU (cuda/landmark_ops.cuh)
// against the CPU backend: scores within float rounding of `LandmarkIndex<CpuBackend, T>::score`
// on the same landmarks (relative 1e-5 for unit-scale queries, d <= 128; see run_score_case) —
// for bf16/fp16, whose logits the tensor cores compute from the queries pre-scaled and rounded
// to T, against the CPU scores of those rounded queries (twice that tolerance), and against
// the CPU scores of the float queries within the bound that rounding implies —
// selections exactly equal to `select_top_k` on the same float scores.
// Ragged batches (M_b = 0, M_b < k, up to 17000 and past the shared-memory cache), every head
// dim, G in {1, 2, 3, 4, 8, 12, 16, 20}, fp32/bf16/fp16; outputs poisoned before each launch
// and the score elements between sequences checked untouched. Without a CUDA device the GPU
// cases print "SKIPPED" and pass; the argument checks run everywhere (they make no CUDA call).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <shadowkv/shadowkv.cuh>

#include "gpu_test_util.cuh"

using namespace shadowkv;

TEST_SUITE_BEGIN("gpu_landmark_ops");

namespace {

using skv_gpu_test::DeviceBuffer;

/// A non-blocking stream (no implicit sync with the legacy default stream), destroyed on exit.
class TestStream {
 public:
  TestStream() { SHADOWKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  ~TestStream() { (void)cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Places each sequence's `[H_kv, M_b]` scores with a random gap before it (and after the last),
/// so that writes outside a sequence's range show up as changed gap elements.
std::vector<long long> make_offsets(const std::vector<int>& m, int num_kv_heads, std::mt19937_64& rng,
                                    long long& capacity) {
  std::uniform_int_distribution<int> gap(0, 37);
  std::vector<long long> offsets(m.size());
  long long at = 0;
  for (std::size_t b = 0; b < m.size(); ++b) {
    at += gap(rng);
    offsets[b] = at;
    at += static_cast<long long>(num_kv_heads) * m[b];
  }
  capacity = at + gap(rng);
  return offsets;
}

/// True where element `i` of the score buffer belongs to no sequence.
std::vector<char> gap_mask(const std::vector<int>& m, const std::vector<long long>& offsets, int num_kv_heads,
                           long long capacity) {
  std::vector<char> gap(static_cast<std::size_t>(capacity), 1);
  for (std::size_t b = 0; b < m.size(); ++b)
    std::fill_n(gap.begin() + offsets[b], static_cast<long long>(num_kv_heads) * m[b], 0);
  return gap;
}

/// Compares the GPU selection `[batch, H_kv, k]` with the CPU `select_top_k` of each row of
/// `scores` (exact: same indices, then -1 up to k).
int check_selection(const std::vector<float>& scores, const std::vector<int>& m, const std::vector<long long>& offsets,
                    int num_kv_heads, int k, const std::vector<std::int32_t>& got) {
  int failures = 0;
  for (std::size_t b = 0; b < m.size(); ++b) {
    const index_t kk = std::min<index_t>(k, m[b]);
    std::vector<std::int32_t> want(static_cast<std::size_t>(num_kv_heads) * kk);
    LandmarkIndex<CpuBackend, float>::select_top_k(
        TensorView<const float, 2>(scores.data() + offsets[b], {num_kv_heads, m[b]}), k,
        TensorView<std::int32_t, 2>(want.data(), {num_kv_heads, kk}));
    for (int h = 0; h < num_kv_heads; ++h) {
      const std::int32_t* row = &got[(b * num_kv_heads + h) * static_cast<std::size_t>(k)];
      bool ok = true;
      for (index_t i = 0; i < kk; ++i) ok = ok && row[i] == want[h * kk + i];
      for (index_t i = kk; i < k; ++i) ok = ok && row[i] == -1;
      if (!ok && failures++ < 5) {
        CAPTURE(b);
        CAPTURE(h);
        CAPTURE(m[b]);
        CAPTURE(k);
        index_t first = 0;
        while (first < kk && row[first] == want[h * kk + first]) ++first;
        CAPTURE(first);
        if (first < k) CAPTURE(row[first]);
        if (first < kk) CAPTURE(want[h * kk + first]);
        FAIL_CHECK("GPU top-k differs from LandmarkIndex::select_top_k");
      }
    }
  }
  return failures;
}

/// `select_top_k`'s parameters for rows laid out as the scoring cases lay them out.
shadowkv::cuda::TopKParams top_k_params(const float* d_scores, long long capacity, const int* d_m,
                                        const long long* d_offsets, int batch, int num_kv_heads, int k,
                                        int max_landmarks, std::int32_t* d_selected) {
  shadowkv::cuda::TopKParams p;
  p.scores = d_scores;
  p.num_landmarks = d_m;
  p.score_offsets = d_offsets;
  p.scores_capacity = capacity;
  p.selected = d_selected;
  p.batch = batch;
  p.num_kv_heads = num_kv_heads;
  p.k = k;
  p.max_landmarks = max_landmarks;
  return p;
}

/// Runs `select_top_k` on the device copy of `scores` and returns the selection; `selected`
/// is filled with -7 first, so that an unwritten slot cannot pass.
std::vector<std::int32_t> gpu_top_k(const float* d_scores, long long capacity, const std::vector<int>& m,
                                    const std::vector<long long>& offsets, int num_kv_heads, int k,
                                    cudaStream_t stream, int max_ctas_per_row = 8) {
  const int batch = static_cast<int>(m.size());
  DeviceBuffer<int> d_m(m.size());
  DeviceBuffer<long long> d_offsets(offsets.size());
  DeviceBuffer<std::int32_t> d_selected(static_cast<std::size_t>(batch) * num_kv_heads * k);
  d_m.upload(m);
  d_offsets.upload(offsets);
  d_selected.upload(std::vector<std::int32_t>(d_selected.size(), -7));
  SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
  const int max_m = m.empty() ? 0 : *std::max_element(m.begin(), m.end());
  shadowkv::cuda::TopKParams p =
      top_k_params(d_scores, capacity, d_m.get(), d_offsets.get(), batch, num_kv_heads, k, max_m, d_selected.get());
  p.max_ctas_per_row = max_ctas_per_row;
  shadowkv::cuda::select_top_k(p, stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return d_selected.download();
}

struct ScoreCase {
  int num_kv_heads;
  int group;
  int head_dim;
  std::vector<int> m;       // M_b per sequence
  int k;                    // for the top-k on the resulting scores
  float query_scale = 1.0f; // larger: peakier softmax
  bool own_workspace = true;
  int top_k_ctas = 8;       // max_ctas_per_row of the unfused top-k (1: one CTA per row)
};

/// Scores a random ragged batch on the GPU, compares with the CPU backend (relative error per
/// score), checks the gaps between sequences untouched, then selects top-k on the GPU scores
/// and compares with the CPU selection of the same scores.
template <class T>
void run_score_case(const ScoreCase& c, std::mt19937_64& rng, cudaStream_t stream) {
  const int batch = static_cast<int>(c.m.size());
  const int hkv = c.num_kv_heads, hq = c.num_kv_heads * c.group, d = c.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int max_m = *std::max_element(c.m.begin(), c.m.end());
  INFO("dtype=", dtype_name<T>(), " d=", d, " H_kv=", hkv, " G=", c.group, " batch=", batch, " max_M=", max_m,
       " k=", c.k, " own_workspace=", c.own_workspace);

  // The tensor-core path (16-bit landmarks) rounds the scaled queries to T before the
  // products (score_landmarks); these are the queries it actually multiplies, scale folded in.
  constexpr bool kRoundsQueries = !std::is_same_v<T, float>;

  // Landmarks as the CPU index stores them: chunk size 1, so landmark m of head h is key m.
  std::vector<std::unique_ptr<LandmarkIndex<CpuBackend, T>>> index;
  const std::vector<float> queries =
      skv_test::random_vector<float>(rng, static_cast<std::size_t>(batch) * hq * d, c.query_scale);
  std::vector<float> rounded_queries(queries.size());
  for (std::size_t i = 0; i < queries.size(); ++i)
    rounded_queries[i] = static_cast<float>(static_cast<T>(queries[i] * scale));
  long long capacity = 0;
  const std::vector<long long> offsets = make_offsets(c.m, hkv, rng, capacity);
  std::vector<float> want(static_cast<std::size_t>(capacity), 0.0f);  // CPU scores of the float queries
  std::vector<float> want_rounded = want;                             // ... of the rounded ones (16-bit)
  // 16-bit only, per score: E_m = max_j (Delta_jm + max_m' Delta_jm'), Delta_jm = sum_i
  // |rounded_i - q_i * scale| |landmark_mi|, the most rounding the queries can move logit (j, m).
  std::vector<double> rounding_bound(kRoundsQueries ? static_cast<std::size_t>(capacity) : 0, 0.0);
  std::vector<std::unique_ptr<DeviceBuffer<T>>> d_landmarks;
  std::vector<const T*> landmark_ptrs;
  for (int b = 0; b < batch; ++b) {
    const std::vector<T> keys = skv_test::random_vector<T>(rng, static_cast<std::size_t>(c.m[b]) * hkv * d);
    index.push_back(std::make_unique<LandmarkIndex<CpuBackend, T>>(hkv, d, 1));
    index.back()->build(TensorView<const T, 3>(keys.data(), {c.m[b], hkv, d}), 0);
    REQUIRE(index.back()->num_landmarks() == c.m[b]);
    const std::size_t q0 = static_cast<std::size_t>(b) * hq * d;
    index.back()->score(TensorView<const float, 2>(queries.data() + q0, {hq, d}), scale,
                        TensorView<float, 2>(want.data() + offsets[b], {hkv, c.m[b]}));
    if constexpr (kRoundsQueries) {
      index.back()->score(TensorView<const float, 2>(rounded_queries.data() + q0, {hq, d}), 1.0f,
                          TensorView<float, 2>(want_rounded.data() + offsets[b], {hkv, c.m[b]}));
      std::vector<double> delta(c.m[b]);
      for (int h = 0; h < hkv; ++h) {
        double* bound = rounding_bound.data() + offsets[b] + static_cast<long long>(h) * c.m[b];
        const T* lm = index.back()->landmarks(h);
        for (int j = 0; j < c.group; ++j) {
          const std::size_t qh = q0 + (static_cast<std::size_t>(h) * c.group + j) * d;
          double row_max = 0.0;
          for (int m = 0; m < c.m[b]; ++m) {
            double s = 0.0;
            for (int e = 0; e < d; ++e)
              s += std::fabs(static_cast<double>(rounded_queries[qh + e]) - static_cast<double>(queries[qh + e] * scale)) *
                   std::fabs(static_cast<double>(static_cast<float>(lm[static_cast<std::size_t>(m) * d + e])));
            delta[m] = s;
            row_max = std::max(row_max, s);
          }
          for (int m = 0; m < c.m[b]; ++m) bound[m] = std::max(bound[m], delta[m] + row_max);
        }
      }
    }
    const std::size_t n = static_cast<std::size_t>(c.m[b]) * hkv * d;
    std::vector<T> lm(n);
    if (n) std::copy_n(index.back()->landmarks(0), n, lm.begin());
    d_landmarks.push_back(std::make_unique<DeviceBuffer<T>>(n));
    d_landmarks.back()->upload(lm);
    landmark_ptrs.push_back(d_landmarks.back()->get());
  }

  DeviceBuffer<float> d_queries(queries.size()), d_scores(static_cast<std::size_t>(capacity));
  DeviceBuffer<const T*> d_ptrs(landmark_ptrs.size());
  DeviceBuffer<int> d_m(c.m.size());
  DeviceBuffer<long long> d_offsets(offsets.size());
  d_queries.upload(queries);
  d_ptrs.upload(landmark_ptrs);
  d_m.upload(c.m);
  d_offsets.upload(offsets);
  d_scores.poison();
  const std::size_t ws_bytes = shadowkv::cuda::landmark_score_workspace_bytes(batch, hq, hkv, max_m, capacity);
  DeviceBuffer<unsigned char> d_ws(ws_bytes);
  d_ws.poison();
  SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());

  shadowkv::cuda::LandmarkScoreParams<T> p;
  p.queries = d_queries.get();
  p.landmarks = d_ptrs.get();
  p.num_landmarks = d_m.get();
  p.score_offsets = d_offsets.get();
  p.scores = d_scores.get();
  p.scores_capacity = capacity;
  p.workspace = c.own_workspace ? static_cast<void*>(d_ws.get()) : nullptr;
  p.workspace_bytes = c.own_workspace ? ws_bytes : 0;
  p.batch = batch;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.max_landmarks = max_m;
  p.scale = scale;
  shadowkv::cuda::score_landmarks(p, stream);
  SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  const std::vector<float> got = d_scores.download();

  // Softmax over float logits: the two backends sum the dot products in different orders, so
  // a logit differs by a few ulp of sum_i |q_i k_i| * scale, and a score by as much, relatively.
  // With unit-scale queries and d <= 128 that stays below ~4e-6 (1e-5 allowed); it grows with
  // the queries' scale (measured up to 9.2e-6 at scale 2) and with d (up to 5.8e-6 at d = 256),
  // hence the factors. These figures are the CUDA-core kernel's (fp32 landmarks; 16-bit ones
  // before the tensor-core path).
  //
  // 16-bit landmarks (tensor cores), against the CPU scores of the same rounded queries: the
  // products are exact in fp32 on both sides, so only the summation differs, but the tensor
  // cores' fp32 accumulation truncates when it aligns and adds a k-step's products to the
  // accumulator (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores",
  // PeerJ CS 2021): up to ~1 ulp of the running logit per k16 step and of one sign, where an
  // FMA chain errs by ~0.5 ulp of random sign. d / 16 such steps move a logit of |x| < 8 by
  // < d / 16 * 2^-21 (3.8e-6 at d = 128), a score by at most twice that: hence twice the float
  // tolerance. Against the CPU scores of the float queries the rounding itself dominates: a
  // logit moves by at most Delta_jm (see rounding_bound), so a softmax value by a factor in
  // [e^-(Delta_jm + max_m Delta_jm), e^+(...)], and so does the max over j: the score is
  // allowed expm1(E_m) relative plus the tolerance above. Measured with the CPU backend at
  // these shapes (unit-variance queries): bf16 scores move by up to ~7e-3 (1.6e-2 at query
  // scale 2) where ~3e-2 (7e-2) is allowed, fp16 by ~1e-3 where ~4e-3 is allowed; the worst
  // change is 0.17-0.30 of its bound.
  const double q_size = std::max(1.0f, c.query_scale);
  const double tolerance = (kRoundsQueries ? 2.0 : 1.0) * 1e-5 * q_size * q_size * std::max(1.0, d / 128.0);
  const std::vector<char> gap = gap_mask(c.m, offsets, hkv, capacity);
  int failures = 0;
  double worst = 0.0, worst_vs_float = 0.0;
  for (long long i = 0; i < capacity; ++i) {
    if (gap[i]) {
      if (!std::isnan(got[i]) && failures++ < 5) {
        CAPTURE(i);
        CAPTURE(got[i]);
        FAIL_CHECK("a score element outside every sequence was written");
      }
      continue;
    }
    const double g = got[i], w = kRoundsQueries ? want_rounded[i] : want[i];
    const double err = std::fabs(g - w);
    if (!(err <= tolerance * std::fabs(w) + 1e-30) && failures++ < 5) {
      CAPTURE(i);
      CAPTURE(g);
      CAPTURE(w);
      CAPTURE(tolerance);
      FAIL_CHECK("GPU score differs from LandmarkIndex::score beyond the relative tolerance");
    }
    if (w > 0.0) worst = std::max(worst, err / w);
    if constexpr (kRoundsQueries) {
      const double wf = want[i], err_f = std::fabs(g - wf);
      const double rounding = std::expm1(rounding_bound[i]);
      const double allowed = (rounding + tolerance * (1.0 + rounding)) * std::fabs(wf) + 1e-30;
      if (!(err_f <= allowed) && failures++ < 5) {
        CAPTURE(i);
        CAPTURE(g);
        CAPTURE(wf);
        CAPTURE(rounding_bound[i]);
        FAIL_CHECK("GPU score differs from LandmarkIndex::score on the float queries beyond the query-rounding bound");
      }
      if (wf > 0.0) worst_vs_float = std::max(worst_vs_float, err_f / wf);
    }
  }
  CHECK(failures == 0);
  if constexpr (kRoundsQueries)
    MESSAGE("dtype=", dtype_name<T>(), " d=", d, " G=", c.group, " query_scale=", c.query_scale,
            ": worst relative score error ", worst, " (tolerance ", tolerance, ") on the rounded queries, ",
            worst_vs_float, " on the float queries");
  else
    MESSAGE("dtype=", dtype_name<T>(), " d=", d, " G=", c.group, " query_scale=", c.query_scale,
            ": worst relative score error ", worst, " (tolerance ", tolerance, ")");

  const std::vector<std::int32_t> selected =
      gpu_top_k(d_scores.get(), capacity, c.m, offsets, hkv, c.k, stream, c.top_k_ctas);
  CHECK(check_selection(got, c.m, offsets, hkv, c.k, selected) == 0);

  // score_and_select_top_k with the normalisation fused into the top-k kernel (forced: the
  // automatic choice fuses only large batches), one CTA per row and clusters of up to 8: the
  // same scores bit for bit, gaps untouched, and the same selection, on fresh poisoned buffers.
  for (const int ctas : {1, 8}) {
    CAPTURE(ctas);
    DeviceBuffer<float> f_scores(static_cast<std::size_t>(capacity));
    DeviceBuffer<std::int32_t> f_selected(static_cast<std::size_t>(batch) * hkv * c.k);
    f_scores.poison();
    d_ws.poison();
    f_selected.upload(std::vector<std::int32_t>(f_selected.size(), -7));
    SHADOWKV_CUDA_CHECK(cudaDeviceSynchronize());
    p.scores = f_scores.get();
    shadowkv::cuda::TopKParams tp =
        top_k_params(f_scores.get(), capacity, d_m.get(), d_offsets.get(), batch, hkv, c.k, max_m, f_selected.get());
    tp.max_ctas_per_row = ctas;
    shadowkv::cuda::score_and_select_top_k(p, tp, stream, shadowkv::cuda::default_allocator(),
                                           shadowkv::cuda::TopKFusion::fused);
    SHADOWKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> fused = f_scores.download();
    REQUIRE(fused.size() == got.size());
    long long differing = 0, first = -1;
    for (std::size_t i = 0; i < got.size(); ++i)
      if (std::memcmp(&fused[i], &got[i], sizeof(float)) != 0 && differing++ == 0) first = static_cast<long long>(i);
    CAPTURE(first);
    CHECK_MESSAGE(differing == 0, "score_and_select_top_k's scores differ from score_landmarks' in ", differing,
                  " elements");
    CHECK_MESSAGE(f_selected.download() == selected,
                  "score_and_select_top_k's selection differs from select_top_k's");
  }
}

/// A ragged batch: M_b = 0, 1, a few below 300, and one up to 2500 (several tiles).
std::vector<int> ragged_lengths(std::mt19937_64& rng, int batch) {
  std::uniform_int_distribution<int> small(2, 300), large(1000, 2500);
  std::vector<int> m;
  for (int b = 0; b < batch; ++b) m.push_back(b == 0 ? 0 : b == 1 ? 1 : b == 2 ? large(rng) : small(rng));
  std::shuffle(m.begin(), m.end(), rng);
  return m;
}

template <class T>
void check_all_shapes(std::mt19937_64& rng) {
  TestStream stream;
  std::uniform_int_distribution<int> heads(1, 3), batch(3, 6), pick_k(0, 3);
  const int ks[] = {1, 7, 64, 256};
  for (const int d : {64, 96, 128, 256})
    for (const int g : {1, 2, 3, 4, 8, 12, 16, 20}) {  // 20: two blocks of query heads on every path
      ScoreCase c;
      c.num_kv_heads = heads(rng);
      c.group = g;
      c.head_dim = d;
      c.m = ragged_lengths(rng, batch(rng));
      c.k = ks[pick_k(rng)];
      c.own_workspace = (d + g) % 2 == 0;
      run_score_case<T>(c, rng, stream.get());
    }
}

}  // namespace

TEST_CASE("gpu: score_landmarks + select_top_k match the CPU backend, fp32, every head dim and group") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<float>(rng);
}

TEST_CASE("gpu: score_landmarks + select_top_k match the CPU backend, bf16, every head dim and group") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<bf16>(rng);
}

TEST_CASE("gpu: score_landmarks + select_top_k match the CPU backend, fp16, every head dim and group") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  check_all_shapes<fp16>(rng);
}

TEST_CASE("gpu: score_landmarks at 128K-context sizes (M_b ~ 17000, H_kv = 8), a batch of 64, rows past the top-k cache") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TestStream stream;
  {
    ScoreCase c;  // Llama-3.1-8B: 32 query heads, 8 KV heads, d = 128; 128K context, chunk 8
    c.num_kv_heads = 8;
    c.group = 4;
    c.head_dim = 128;
    c.m = {16384, 0, 17000, 999};
    c.k = 256;
    c.query_scale = 2.0f;
    run_score_case<bf16>(c, rng, stream.get());
  }
  {
    ScoreCase c;
    c.num_kv_heads = 2;
    c.group = 8;
    c.head_dim = 64;
    std::uniform_int_distribution<int> len(0, 700);
    for (int b = 0; b < 64; ++b) c.m.push_back(len(rng));
    c.k = 128;
    c.own_workspace = false;
    run_score_case<fp16>(c, rng, stream.get());
  }
  {
    ScoreCase c;
    c.num_kv_heads = 4;
    c.group = 1;
    c.head_dim = 256;
    c.m = {12000, 3};
    c.k = 1024;
    run_score_case<float>(c, rng, stream.get());
  }
  {
    ScoreCase c;  // rows longer than the top-k kernel's shared-memory cache (32768 keys)
    c.num_kv_heads = 1;
    c.group = 4;
    c.head_dim = 64;
    c.m = {40000, 5000};
    c.k = 300;
    c.top_k_ctas = 1;  // one CTA per row: the row does not fit (a cluster splits it into slices that do)
    run_score_case<bf16>(c, rng, stream.get());
  }
}

TEST_CASE("gpu: select_top_k equals the CPU selection on ties, NaN, +-inf, +-0 and denormals") {
  SKV_REQUIRE_GPU();
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TestStream stream;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float denorm = std::numeric_limits<float>::denorm_min();
  const std::vector<float> palette = {nan,   -nan, -inf, inf,  -0.0f, 0.0f,       denorm, -denorm, 1e-38f,
                                      0.25f, 0.5f, 1.0f, -1.0f, 3e-5f, 3.0001e-5f, 2.9999e-5f};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<std::size_t> pick(0, palette.size() - 1);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  // Row lengths: empty, tiny, around k, a 128K-context row, and rows past the shared-memory
  // cache (32768 keys), which take the global-memory path.
  for (const int k : {1, 3, 256, 1024, 4096}) {
    CAPTURE(k);
    const std::vector<int> m = {0, 1, 2, 5, k - 1, k, k + 1, 3000, 17000, 40000, 70001};
    const int hkv = 5;
    long long capacity = 0;
    const std::vector<long long> offsets = make_offsets(m, hkv, rng, capacity);
    std::vector<float> scores(static_cast<std::size_t>(capacity), nan);
    for (std::size_t b = 0; b < m.size(); ++b)
      for (int h = 0; h < hkv; ++h) {
        float* row = &scores[offsets[b] + static_cast<long long>(h) * m[b]];
        const int pattern = static_cast<int>((b + h) % 5);
        for (int i = 0; i < m[b]; ++i) {
          switch (pattern) {
            case 0: row[i] = palette[pick(rng)]; break;                        // specials, heavy ties
            case 1: row[i] = std::round(normal(rng) * 8.0f) / 8.0f; break;     // quantised: ties
            case 2: row[i] = 0.5f; break;                                      // all equal
            case 3: row[i] = unit(rng) < 0.3f ? nan : unit(rng) * 1e-4f; break; // softmax-like + NaN
            default: row[i] = normal(rng); break;                              // distinct
          }
        }
      }
    DeviceBuffer<float> d_scores(scores.size());
    d_scores.upload(scores);
    for (const int ctas : {1, 8}) {  // one CTA per row; clusters (2 CTAs per row for these 55 rows)
      CAPTURE(ctas);
      const std::vector<std::int32_t> got =
          gpu_top_k(d_scores.get(), capacity, m, offsets, hkv, k, stream.get(), ctas);
      CHECK(check_selection(scores, m, offsets, hkv, k, got) == 0);
    }
  }
}

TEST_CASE("landmark ops: invalid arguments throw shadowkv::Error naming the argument, before any CUDA call") {
  // No SKV_REQUIRE_GPU: validation precedes every CUDA call, so this runs without a device.
  // The pointers are never dereferenced (each call fails validation first).
  static float dummy[16];
  static const bf16* dummy_ptrs[1] = {nullptr};
  static int dummy_int[1];
  static long long dummy_ll[1];
  auto valid_score = [&] {
    shadowkv::cuda::LandmarkScoreParams<bf16> p;
    p.queries = dummy;
    p.landmarks = dummy_ptrs;
    p.num_landmarks = dummy_int;
    p.score_offsets = dummy_ll;
    p.scores = dummy;
    p.scores_capacity = 16;
    p.batch = 1;
    p.num_q_heads = 8;
    p.num_kv_heads = 2;
    p.head_dim = 128;
    p.max_landmarks = 8;
    p.scale = 0.125f;
    p.workspace = dummy;
    p.workspace_bytes = 0;  // too small: each case below fails before this is checked
    return p;
  };
  auto score_error = [&](auto&& edit) {
    auto p = valid_score();
    edit(p);
    return skv_test::error_message([&] { shadowkv::cuda::score_landmarks(p, nullptr); });
  };
  using P = shadowkv::cuda::LandmarkScoreParams<bf16>;
  CHECK(score_error([](P& p) { p.head_dim = 80; }).find("head_dim=80") != std::string::npos);
  CHECK(score_error([](P& p) { p.num_q_heads = 7; }).find("num_q_heads=7") != std::string::npos);
  CHECK(score_error([](P& p) { p.num_kv_heads = 0; }).find("num_kv_heads=0") != std::string::npos);
  CHECK(score_error([](P& p) { p.max_landmarks = -1; }).find("max_landmarks=-1") != std::string::npos);
  CHECK(score_error([](P& p) { p.batch = -2; }).find("batch=-2") != std::string::npos);
  CHECK(score_error([](P& p) { p.scale = INFINITY; }).find("scale=") != std::string::npos);
  CHECK(score_error([](P&) {}).find("workspace_bytes=0") != std::string::npos);
  CHECK(score_error([](P& p) {
          p.workspace = nullptr;
          p.scores = nullptr;
        }).find("scores must be non-null") != std::string::npos);
  CHECK(score_error([](P& p) {
          p.workspace = nullptr;
          p.landmarks = nullptr;
        }).find("landmarks must be non-null") != std::string::npos);
  CHECK(skv_test::error_message([] { (void)shadowkv::cuda::landmark_score_workspace_bytes(1, 6, 4, 10, 40); })
            .find("num_q_heads=6") != std::string::npos);

  auto valid_top_k = [&] {  // the same rows as valid_score()'s
    shadowkv::cuda::TopKParams p;
    p.scores = dummy;
    p.num_landmarks = dummy_int;
    p.score_offsets = dummy_ll;
    p.scores_capacity = 16;
    p.selected = reinterpret_cast<std::int32_t*>(dummy);
    p.batch = 1;
    p.num_kv_heads = 2;
    p.k = 4;
    p.max_landmarks = 8;
    return p;
  };
  auto top_k_error = [&](auto&& edit) {
    auto p = valid_top_k();
    edit(p);
    return skv_test::error_message([&] { shadowkv::cuda::select_top_k(p, nullptr); });
  };
  using K = shadowkv::cuda::TopKParams;
  CHECK(top_k_error([](K& p) { p.k = 0; }).find("k=0") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.k = -3; }).find("k=-3") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.k = 4097; }).find("k=4097") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.num_kv_heads = 0; }).find("num_kv_heads=0") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.max_landmarks = -1; }).find("max_landmarks=-1") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.selected = nullptr; }).find("selected must be non-null") != std::string::npos);
  CHECK(top_k_error([](K& p) { p.max_ctas_per_row = 3; }).find("max_ctas_per_row=3") != std::string::npos);

  // score_and_select_top_k: both parameter sets checked, and they must describe the same rows.
  auto fused_error = [&](auto&& edit_score, auto&& edit_top_k) {
    auto sp = valid_score();
    sp.workspace = nullptr;
    auto tp = valid_top_k();
    edit_score(sp);
    edit_top_k(tp);
    return skv_test::error_message([&] { shadowkv::cuda::score_and_select_top_k(sp, tp, nullptr); });
  };
  auto same_p = [](P&) {};
  auto same_k = [](K&) {};
  CHECK(fused_error(same_p, [](K& p) { p.k = 0; }).find("k=0") != std::string::npos);
  CHECK(fused_error([](P& p) { p.head_dim = 80; }, same_k).find("head_dim=80") != std::string::npos);
  CHECK(fused_error(same_p, [](K& p) { p.max_landmarks = 9; }).find("must equal the scoring parameters") !=
        std::string::npos);
  CHECK(fused_error(same_p, [](K& p) { p.scores = dummy + 4; }).find("must equal the scoring parameters") !=
        std::string::npos);

  // An empty batch is a no-op (and makes no CUDA call either).
  CHECK(score_error([](P& p) {
          p.batch = 0;
          p.workspace = nullptr;
        }) == "(no throw)");
  CHECK(top_k_error([](K& p) { p.batch = 0; }) == "(no throw)");
  CHECK(fused_error([](P& p) { p.batch = 0; }, [](K& p) { p.batch = 0; }) == "(no throw)");
}

TEST_SUITE_END();
