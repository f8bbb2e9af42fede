#pragma once
// What the reliability suites share: invalid-input tables (a bad call, what its error must
// name, and a valid call that must still work after it) and random pre-RoPE inputs fed to
// several SparseAttention objects alike.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../test_util.hpp"

namespace skv_test {

/// A small valid configuration: 4 query heads over 2 KV heads of 64, rank 16, chunks of 8,
/// budget 16 (2 chunks), 1 outlier and 1 local chunk (static set: 16 tokens).
inline shadowkv::Config small_config() {
  shadowkv::Config cfg;
  cfg.num_q_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.rank = 16;
  cfg.chunk_size = 8;
  cfg.sparse_budget = 16;
  cfg.outlier_chunks = 1;
  cfg.local_chunks = 1;
  return cfg;
}

/// A positive count from the environment variable `name`, else `fallback` (operation counts that
/// the sanitizer runs lower).
inline int env_count(const char* name, int fallback) {
  if (const char* env = std::getenv(name)) return std::max(1, std::atoi(env));
  return fallback;
}

/// A random small configuration (any group size, chunk size, budget, static set, rank and value
/// cache), valid for every policy and both backends: the churn tests' draw.
inline shadowkv::Config random_small_config(std::mt19937_64& rng) {
  shadowkv::Config cfg;
  cfg.head_dim = 64;
  cfg.num_kv_heads = 1 + static_cast<int>(rng() % 2);
  cfg.num_q_heads = cfg.num_kv_heads * (1 + static_cast<int>(rng() % 3));
  cfg.chunk_size = 1 + static_cast<int>(rng() % 8);
  cfg.sparse_budget = cfg.chunk_size * (1 + static_cast<int>(rng() % 6));
  cfg.outlier_chunks = static_cast<int>(rng() % 3);
  cfg.local_chunks = static_cast<int>(rng() % 3);
  cfg.rank = 1 + static_cast<int>(rng() % cfg.kv_dim());
  cfg.value_cache_chunks = rng() % 2 ? 0 : cfg.budget_chunks() + static_cast<int>(rng() % 4);
  return cfg;
}

/// One row of an invalid-input table: a call with one bad argument, and what the
/// `shadowkv::Error` it throws must name (the argument, and its value where it has one).
struct BadCall {
  std::string what;
  std::function<void()> call;
  std::vector<std::string> needles;
};

/// Runs every row of `rows` (the bad calls to `entry`) and `probe` after each: a valid call that
/// checks the object still works as before. Returns the number of rows.
inline int run_table(const std::string& entry, const std::vector<BadCall>& rows,
                     const std::function<void()>& probe = {}) {
  for (const BadCall& row : rows) {
    CAPTURE(entry);
    CAPTURE(row.what);
    std::string what = "(no throw)";
    try {
      row.call();
    } catch (const shadowkv::Error& e) {
      what = e.what();
    } catch (const std::exception& e) {
      what = std::string("(not a shadowkv::Error) ") + e.what();
    }
    CAPTURE(what);
    CHECK(contains(what, "shadowkv: "));
    for (const std::string& n : row.needles) {
      CAPTURE(n);
      CHECK(contains(what, n));
    }
    if (probe) probe();
  }
  return static_cast<int>(rows.size());
}

/// Random pre-RoPE rows `[n, heads, d]` in T, one buffer per call.
template <class T>
struct RandomRows {
  std::vector<T> data;
  shadowkv::TensorView<const T, 3> view() const { return {data.data(), {rows, heads, dim}}; }
  shadowkv::TensorView<T, 3> mut() { return {data.data(), {rows, heads, dim}}; }
  index_t rows = 0, heads = 0, dim = 0;
};

template <class T>
RandomRows<T> random_rows(std::mt19937_64& rng, index_t n, int heads, int d) {
  RandomRows<T> r;
  r.data = random_vector<T>(rng, static_cast<std::size_t>(n * heads * d));
  r.rows = n;
  r.heads = heads;
  r.dim = d;
  return r;
}

/// Output rows `[n, heads, d]` filled with NaN (so a row nobody wrote shows).
template <class T>
RandomRows<T> output_rows(index_t n, int heads, int d) {
  RandomRows<T> r;
  r.data.assign(static_cast<std::size_t>(n * heads * d), static_cast<T>(NAN));
  r.rows = n;
  r.heads = heads;
  r.dim = d;
  return r;
}

/// Bitwise equality of two outputs (NaN included, which `==` would not see as equal).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace skv_test
