#pragma once
// Shared test helpers: seeded random inputs (seed printed, overridable with
// SHADOWKV_TEST_SEED), a float64 attention reference, and the tolerance table per dtype.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include <shadowkv/shadowkv.hpp>

namespace skv_test {

using shadowkv::index_t;

/// A fresh seed per test (or SHADOWKV_TEST_SEED), printed on failure through INFO.
inline std::uint64_t test_seed() {
  if (const char* env = std::getenv("SHADOWKV_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  return std::random_device{}();
}

/// Relative norm error `|a - b| / max(|b|, floor)` over two vectors.
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-6) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), floor);
}

/// Tolerance on the relative norm error of an attention output, per storage type: the inputs
/// are rounded to T before the reference runs, so what remains is float accumulation and the
/// rounding of outputs (and of reconstructed keys) to T.
template <class T>
constexpr double attention_tolerance() {
  if constexpr (std::is_same_v<T, float>) return 2e-5;
  else if constexpr (std::is_same_v<T, shadowkv::bf16>) return 2e-2;
  else return 4e-3;
}

/// What `fn` throws as `shadowkv::Error`, or "(no throw)".
template <class F>
std::string error_message(F&& fn) {
  try {
    fn();
  } catch (const shadowkv::Error& e) {
    return e.what();
  }
  return "(no throw)";
}

inline bool contains(const std::string& what, const std::string& needle) {
  return what.find(needle) != std::string::npos;
}

/// Checks that `fn` throws a `shadowkv::Error` whose message holds every needle.
template <class F>
void check_error(F&& fn, std::initializer_list<std::string> needles) {
  const std::string what = error_message(fn);
  CAPTURE(what);
  for (const std::string& n : needles) {
    CAPTURE(n);
    CHECK(contains(what, n));
  }
}

template <class T>
std::vector<T> random_vector(std::mt19937_64& rng, std::size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<float>(v[i]));
  return out;
}

/// Float64 RoPE (half-split, full rotary dim, theta), written independently of the library.
inline void rope_ref(double* x, int d, double pos, double theta) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    const double a = pos * std::pow(theta, -2.0 * i / d);
    const double x0 = x[i], x1 = x[i + half];
    x[i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
  }
}

/// Float64 causal GQA attention with half-split RoPE on q and k. Inputs token-major:
/// q [n, Hq, d], k [n, Hkv, d] (pre-RoPE), v [n, Hkv, d]; output for query tokens
/// [q_begin, n) attending keys [0, t] each: [(n - q_begin), Hq, d].
inline std::vector<double> attention_ref(const std::vector<double>& q, const std::vector<double>& k,
                                         const std::vector<double>& v, index_t n, int hq, int hkv,
                                         int d, double theta, index_t q_begin) {
  std::vector<double> kr(k), qr(q);
  for (index_t t = 0; t < n; ++t) {
    for (int h = 0; h < hkv; ++h) rope_ref(&kr[(t * hkv + h) * d], d, static_cast<double>(t), theta);
    for (int h = 0; h < hq; ++h) rope_ref(&qr[(t * hq + h) * d], d, static_cast<double>(t), theta);
  }
  const int g = hq / hkv;
  std::vector<double> out((n - q_begin) * hq * d, 0.0), logits(n);
  for (index_t t = q_begin; t < n; ++t)
    for (int j = 0; j < hq; ++j) {
      const int h = j / g;
      double mx = -INFINITY;
      for (index_t s = 0; s <= t; ++s) {
        double dot = 0;
        for (int x = 0; x < d; ++x) dot += qr[(t * hq + j) * d + x] * kr[(s * hkv + h) * d + x];
        logits[s] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, logits[s]);
      }
      double sum = 0;
      for (index_t s = 0; s <= t; ++s) sum += (logits[s] = std::exp(logits[s] - mx));
      double* o = &out[((t - q_begin) * hq + j) * d];
      for (index_t s = 0; s <= t; ++s)
        for (int x = 0; x < d; ++x) o[x] += logits[s] / sum * v[(s * hkv + h) * d + x];
    }
  return out;
}

}  // namespace skv_test
