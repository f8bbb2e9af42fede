// LowRankKeyStore: exact at full rank, optimal (Eckart-Young) at low rank, streaming build equal
// to the one-shot build, RoPE after reconstruction, errors.

#include <Eigen/SVD>

#include "test_util.hpp"

using namespace shadowkv;
using Store = LowRankKeyStore<CpuBackend, float>;

TEST_SUITE_BEGIN("low_rank_key_store");

namespace {

/// Reconstructs every row of every head: [L, H, d] token-major, as double.
template <class S>
std::vector<double> reconstruct_all(const S& store) {
  const index_t n = store.size();
  const int h = store.num_kv_heads(), d = store.head_dim();
  std::vector<index_t> pos(n);
  for (index_t i = 0; i < n; ++i) pos[i] = i;
  std::vector<float> head(n * d);
  std::vector<double> out(n * h * d);
  for (int k = 0; k < h; ++k) {
    store.reconstruct(k, pos, head.data());
    for (index_t i = 0; i < n; ++i)
      for (int x = 0; x < d; ++x) out[(i * h + k) * d + x] = head[i * d + x];
  }
  return out;
}

/// Keys of true rank `true_rank` plus `noise`: [L, H*d].
std::vector<float> structured_keys(std::mt19937_64& rng, index_t l, int n, int true_rank, float noise) {
  const auto u = skv_test::random_vector<float>(rng, l * true_rank);
  const auto w = skv_test::random_vector<float>(rng, true_rank * n);
  const auto e = skv_test::random_vector<float>(rng, l * n, noise);
  std::vector<float> k(l * n);
  for (index_t i = 0; i < l; ++i)
    for (int j = 0; j < n; ++j) {
      float s = e[i * n + j];
      for (int t = 0; t < true_rank; ++t) s += u[i * true_rank + t] * w[t * n + j];
      k[i * n + j] = s;
    }
  return k;
}

}  // namespace

TEST_CASE("low_rank_key_store: full rank reconstructs the keys (one-shot and streaming)") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 4; ++trial) {
    const int h = 1 + static_cast<int>(rng() % 3), d = (trial % 2) ? 64 : 96;
    const index_t l = 5 + static_cast<index_t>(rng() % 300);
    CAPTURE(h);
    CAPTURE(d);
    CAPTURE(l);
    const auto keys = skv_test::random_vector<float>(rng, l * h * d);
    TensorView<const float, 3> view(keys.data(), {l, h, d});
    Store one(h, d, h * d);
    one.build(view);
    CHECK(one.size() == l);
    CHECK(skv_test::rel_error(reconstruct_all(one), skv_test::to_double(keys)) < 1e-5);
    Store streamed(h, d, h * d);
    for (index_t b = 0; b < l; b += 37)
      streamed.accumulate(TensorView<const float, 3>(keys.data() + b * h * d, {std::min<index_t>(37, l - b), h, d}));
    CHECK(streamed.accumulated_rows() == l);
    streamed.finalize_basis();
    streamed.append(view);
    CHECK(skv_test::rel_error(reconstruct_all(streamed), skv_test::to_double(keys)) < 1e-5);
  }
}

TEST_CASE("low_rank_key_store: the rank-r error is the tail of the singular values (Eckart-Young)") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const int h = 2, d = 64, n = h * d;
  const index_t l = 400;
  const auto keys = structured_keys(rng, l, n, 24, 0.05f);
  Eigen::MatrixXd k(l, n);
  for (index_t i = 0; i < l; ++i)
    for (int j = 0; j < n; ++j) k(i, j) = keys[i * n + j];
  const Eigen::VectorXd sigma = Eigen::JacobiSVD<Eigen::MatrixXd>(k).singularValues();
  for (int r : {1, 8, 24, 40}) {
    CAPTURE(r);
    double tail = 0;
    for (int i = r; i < sigma.size(); ++i) tail += sigma[i] * sigma[i];
    for (bool streaming : {false, true}) {
      Store store(h, d, r);
      TensorView<const float, 3> view(keys.data(), {l, h, d});
      if (streaming) {
        store.accumulate(TensorView<const float, 3>(keys.data(), {150, h, d}));
        store.accumulate(TensorView<const float, 3>(keys.data() + 150 * n, {l - 150, h, d}));
        store.finalize_basis();
        store.append(view);
      } else {
        store.build(view);
      }
      const auto rec = reconstruct_all(store);
      double err = 0;
      for (std::size_t i = 0; i < rec.size(); ++i) err += (rec[i] - keys[i]) * (rec[i] - keys[i]);
      CAPTURE(streaming);
      // Float storage of A and B adds a relative ~1e-7 of the total energy.
      CHECK(err == doctest::Approx(tail).epsilon(1e-3).scale(k.squaredNorm() * 1e-6));
    }
  }
}

TEST_CASE("low_rank_key_store: streaming build equals the one-shot build") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const int h = 4, d = 64, r = 48;
  const index_t l = 777;
  const auto keys = structured_keys(rng, l, h * d, 64, 0.1f);
  TensorView<const float, 3> view(keys.data(), {l, h, d});
  Store one(h, d, r), streamed(h, d, r);
  one.build(view);
  // Uneven chunks, projected in different chunks than accumulated.
  const index_t cuts[] = {0, 1, 100, 513, 777};
  for (int i = 0; i + 1 < 5; ++i)
    streamed.accumulate(TensorView<const float, 3>(keys.data() + cuts[i] * h * d, {cuts[i + 1] - cuts[i], h, d}));
  streamed.finalize_basis();
  streamed.append(TensorView<const float, 3>(keys.data(), {300, h, d}));
  streamed.append(TensorView<const float, 3>(keys.data() + 300 * h * d, {l - 300, h, d}));
  CHECK(streamed.size() == l);
  CHECK(skv_test::rel_error(reconstruct_all(streamed), reconstruct_all(one)) < 1e-4);
}

TEST_CASE("low_rank_key_store: reconstruct with RoPE rotates each row at its position") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const int h = 2, d = 128;
  const index_t l = 60;
  const auto keys = skv_test::random_vector<float>(rng, l * h * d);
  LowRankKeyStore<CpuBackend, bf16> store(h, d, 32);
  std::vector<bf16> kb(keys.begin(), keys.end());
  store.build(TensorView<const bf16, 3>(kb.data(), {l, h, d}));
  const RopeTable rope = make_rope_table(RopeConfig{}, d);
  const std::vector<index_t> pos = {59, 0, 17, 17, 33};
  std::vector<float> plain(pos.size() * d), rotated(pos.size() * d);
  store.reconstruct(1, pos, plain.data());
  store.reconstruct(1, pos, rotated.data(), &rope);
  for (std::size_t i = 0; i < pos.size(); ++i) {
    std::vector<double> expect(plain.begin() + i * d, plain.begin() + (i + 1) * d);
    skv_test::rope_ref(expect.data(), d, static_cast<double>(pos[i]), 10000.0);
    std::vector<double> got(rotated.begin() + i * d, rotated.begin() + (i + 1) * d);
    CHECK(skv_test::rel_error(got, expect) < 1e-5);
  }
}

TEST_CASE("low_rank_key_store: fewer rows than the rank") {
  const auto seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const auto keys = skv_test::random_vector<float>(rng, 3 * 64);
  Store store(1, 64, 16);
  store.build(TensorView<const float, 3>(keys.data(), {3, 1, 64}));
  CHECK(skv_test::rel_error(reconstruct_all(store), skv_test::to_double(keys)) < 1e-5);
}

TEST_CASE("low_rank_key_store: invalid arguments throw naming them") {
  auto what = [](auto&& fn) { return skv_test::error_message(fn); };
  CHECK(what([] { Store(2, 64, 129); }).find("rank=129") != std::string::npos);
  CHECK(what([] { Store(0, 64, 1); }).find("num_kv_heads=0") != std::string::npos);
  Store store(2, 64, 8);
  CHECK(what([&] { store.finalize_basis(); }).find("finalize_basis") != std::string::npos);
  std::vector<float> keys(10 * 2 * 64, 1.0f);
  CHECK(what([&] { store.append(TensorView<const float, 3>(keys.data(), {10, 2, 64})); }).find("needs a basis") !=
        std::string::npos);
  CHECK(what([&] { store.build(TensorView<const float, 3>(keys.data(), {10, 1, 128})); })
            .find("keys_pre_rope has shape [10, 1, 128]") != std::string::npos);
  store.build(TensorView<const float, 3>(keys.data(), {10, 2, 64}));
  std::vector<float> out(64);
  const index_t bad[] = {10};
  CHECK(what([&] { store.reconstruct(0, bad, out.data()); }).find("position 10 out of range") != std::string::npos);
  const index_t ok[] = {9};
  CHECK(what([&] { store.reconstruct(2, ok, out.data()); }).find("kv_head=2") != std::string::npos);
  CHECK_NOTHROW(store.reconstruct(1, ok, out.data()));
}

TEST_SUITE_END();
