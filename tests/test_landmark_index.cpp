// LandmarkIndex: landmarks, cosine-min outliers, scoring and top-k against brute force.

#include <algorithm>
#include <numeric>

#include "test_util.hpp"

using namespace shadowkv;

TEST_SUITE_BEGIN("landmark_index");

namespace {

struct BruteForce {
  std::vector<std::vector<double>> means;  // [chunk][d]
  std::vector<double> min_cos;             // [chunk]
};

template <class T>
BruteForce brute_force(const std::vector<T>& keys, int h, int heads, int d, int c, index_t chunks) {
  BruteForce bf;
  for (index_t ch = 0; ch < chunks; ++ch) {
    std::vector<double> m(d, 0.0);
    for (int t = 0; t < c; ++t)
      for (int x = 0; x < d; ++x) m[x] += static_cast<float>(keys[((ch * c + t) * heads + h) * d + x]) / double(c);
    double lo = 2;
    for (int t = 0; t < c; ++t) {
      double dot = 0, nk = 0, nm = 0;
      for (int x = 0; x < d; ++x) {
        const double k = static_cast<float>(keys[((ch * c + t) * heads + h) * d + x]);
        dot += k * m[x];
        nk += k * k;
        nm += m[x] * m[x];
      }
      lo = std::min(lo, dot / std::sqrt(nk * nm));
    }
    bf.means.push_back(m);
    bf.min_cos.push_back(lo);
  }
  return bf;
}

template <class T>
void check_build(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int heads = 1 + static_cast<int>(rng() % 3), d = 64, c = 1 + static_cast<int>(rng() % 8);
  const index_t chunks = 3 + static_cast<index_t>(rng() % 40);
  const int outliers = static_cast<int>(rng() % chunks);
  CAPTURE(seed);
  CAPTURE(heads);
  CAPTURE(c);
  CAPTURE(chunks);
  CAPTURE(outliers);
  auto keys = skv_test::random_vector<T>(rng, chunks * c * heads * d);
  // Make a few chunks clearly coherent so the outlier order is not decided by rounding.
  for (index_t ch = 0; ch < chunks; ch += 3)
    for (int t = 1; t < c; ++t)
      for (int h = 0; h < heads; ++h)
        for (int x = 0; x < d; ++x)
          keys[((ch * c + t) * heads + h) * d + x] = keys[((ch * c) * heads + h) * d + x];
  LandmarkIndex<CpuBackend, T> index(heads, d, c);
  index.build(TensorView<const T, 3>(keys.data(), {chunks * c, heads, d}), outliers);
  CHECK(index.num_chunks() == chunks);
  CHECK(index.num_landmarks() == chunks - outliers);
  for (int h = 0; h < heads; ++h) {
    const BruteForce bf = brute_force(keys, h, heads, d, c, chunks);
    std::vector<int> order(chunks);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bf.min_cos[a] < bf.min_cos[b]; });
    // Compare as sets of scores (equal min-cosines may swap between float and double).
    const auto got = index.outlier_chunk_ids(h);
    CHECK(std::is_sorted(got.begin(), got.end()));
    std::vector<double> want_scores, got_scores;
    for (int o = 0; o < outliers; ++o) {
      want_scores.push_back(bf.min_cos[order[o]]);
      got_scores.push_back(bf.min_cos[got[o]]);
    }
    std::sort(want_scores.begin(), want_scores.end());
    std::sort(got_scores.begin(), got_scores.end());
    for (int o = 0; o < outliers; ++o) CHECK(got_scores[o] == doctest::Approx(want_scores[o]).epsilon(1e-4));
    // Landmarks: every non-outlier chunk, ascending, with its mean.
    const auto ids = index.landmark_chunk_ids(h);
    CHECK(static_cast<index_t>(ids.size()) == chunks - outliers);
    CHECK(std::is_sorted(ids.begin(), ids.end()));
    for (std::int32_t o : got) CHECK(!std::binary_search(ids.begin(), ids.end(), o));
    const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-2;
    for (std::size_t m = 0; m < ids.size(); ++m) {
      std::vector<double> lm(d);
      for (int x = 0; x < d; ++x) lm[x] = static_cast<float>(index.landmarks(h)[m * d + x]);
      CHECK(skv_test::rel_error(lm, bf.means[ids[m]]) < tol);
    }
  }
}

}  // namespace

TEST_CASE("landmark_index: landmarks and cosine-min outliers equal brute force") {
  const auto base = skv_test::test_seed();
  for (int trial = 0; trial < 10; ++trial) check_build<float>(base + trial);
  for (int trial = 0; trial < 3; ++trial) check_build<bf16>(base + 50 + trial);
}

TEST_CASE("landmark_index: scores are softmax per query head, max over the group") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const int heads = 2, g = 3, d = 96, c = 4;
  const index_t chunks = 25;
  const auto keys = skv_test::random_vector<float>(rng, chunks * c * heads * d);
  LandmarkIndex<CpuBackend, float> index(heads, d, c);
  index.build(TensorView<const float, 3>(keys.data(), {chunks * c, heads, d}), 2);
  const auto q = skv_test::random_vector<float>(rng, heads * g * d);
  const index_t m = index.num_landmarks();
  std::vector<float> scores(heads * m, NAN);
  const float scale = 1.0f / std::sqrt(float(d));
  index.score(TensorView<const float, 2>(q.data(), {heads * g, d}), scale,
              TensorView<float, 2>(scores.data(), {heads, m}));
  for (int h = 0; h < heads; ++h) {
    std::vector<double> want(m, 0.0);
    for (int j = h * g; j < (h + 1) * g; ++j) {
      std::vector<double> s(m);
      for (index_t i = 0; i < m; ++i) {
        double dot = 0;
        for (int x = 0; x < d; ++x) dot += double(q[j * d + x]) * double(index.landmarks(h)[i * d + x]);
        s[i] = dot * scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (index_t i = 0; i < m; ++i) want[i] = std::max(want[i], s[i] / sum);
    }
    for (index_t i = 0; i < m; ++i) CHECK(scores[h * m + i] == doctest::Approx(want[i]).epsilon(1e-5));
  }
}

TEST_CASE("landmark_index: top-k equals a full sort; ties to the lower index; NaN last; k > M") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const index_t heads = 1 + rng() % 4, m = 1 + rng() % 60;
    const int k = static_cast<int>(rng() % (m + 5));
    std::vector<float> s(heads * m);
    for (auto& x : s) x = static_cast<float>(rng() % 7);  // many ties
    if (m > 2) s[rng() % s.size()] = NAN;
    const index_t kk = std::min<index_t>(k, m);
    std::vector<std::int32_t> sel(heads * kk, -1);
    LandmarkIndex<CpuBackend, float>::select_top_k(TensorView<const float, 2>(s.data(), {heads, m}), k,
                                                    TensorView<std::int32_t, 2>(sel.data(), {heads, kk}));
    for (index_t h = 0; h < heads; ++h) {
      std::vector<int> idx(m);
      std::iota(idx.begin(), idx.end(), 0);
      auto key = [&](int i) { return std::isnan(s[h * m + i]) ? -INFINITY : s[h * m + i]; };
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) > key(b); });
      std::vector<int> want(idx.begin(), idx.begin() + kk);
      std::sort(want.begin(), want.end());
      CHECK(std::vector<int>(sel.begin() + h * kk, sel.begin() + (h + 1) * kk) == want);
    }
  }
}

TEST_CASE("landmark_index: invalid arguments throw naming them") {
  std::vector<float> keys(12 * 2 * 64, 0.5f);
  LandmarkIndex<CpuBackend, float> index(2, 64, 4);
  auto what = [](auto&& fn) { return skv_test::error_message(fn); };
  CHECK(what([&] { index.build(TensorView<const float, 3>(keys.data(), {10, 2, 64}), 0); })
            .find("not a multiple of chunk_size=4") != std::string::npos);
  CHECK(what([&] { index.build(TensorView<const float, 3>(keys.data(), {12, 2, 64}), 4); })
            .find("num_outlier_chunks=4") != std::string::npos);
  CHECK(what([&] { index.build(TensorView<const float, 3>(keys.data(), {12, 3, 64}), 0); })
            .find("keys_post_rope has shape") != std::string::npos);
  index.build(TensorView<const float, 3>(keys.data(), {12, 2, 64}), 1);
  std::vector<float> q(3 * 64), scores(2 * 2);
  CHECK(what([&] {
    index.score(TensorView<const float, 2>(q.data(), {3, 64}), 1.0f, TensorView<float, 2>(scores.data(), {2, 2}));
  }).find("not a positive multiple of num_kv_heads=2") != std::string::npos);
  CHECK(what([&] { (void)index.outlier_chunk_ids(2); }).find("kv_head=2") != std::string::npos);
  std::vector<std::int32_t> sel(4);
  CHECK(what([&] {
    LandmarkIndex<CpuBackend, float>::select_top_k(TensorView<const float, 2>(scores.data(), {2, 2}), -1,
                                                    TensorView<std::int32_t, 2>(sel.data(), {2, 0}));
  }).find("k=-1") != std::string::npos);
}

TEST_SUITE_END();
