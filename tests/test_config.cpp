// Config validation, tensor views and the error type.

#include "test_util.hpp"

using namespace shadowkv;

TEST_SUITE_BEGIN("config");

namespace {
std::string error_of(const Config& cfg) {
  try {
    cfg.validate();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
bool names(const std::string& what, const std::string& needle) {
  return what.find(needle) != std::string::npos;
}
}  // namespace

TEST_CASE("config: defaults are the paper's and valid") {
  const Config cfg;
  CHECK_NOTHROW(cfg.validate());
  CHECK(cfg.rank == 160);
  CHECK(cfg.chunk_size == 8);
  CHECK(cfg.sparse_budget == 2048);
  CHECK(cfg.resolved_outlier_chunks() == 48);  // 24 per 1024 budget tokens
  CHECK(cfg.local_chunks == 4);
  CHECK(cfg.budget_chunks() == 256);
  CHECK(cfg.resolved_value_cache_chunks() == 256);
  CHECK(cfg.group_size() == 4);
  CHECK(cfg.min_context() == (4 + 48) * 8);
}

TEST_CASE("config: every invalid field is named with its value") {
  struct Case {
    const char* needle;
    void (*mutate)(Config&);
  };
  const Case cases[] = {
      {"num_q_heads=0", [](Config& c) { c.num_q_heads = 0; }},
      {"num_kv_heads=-1", [](Config& c) { c.num_kv_heads = -1; }},
      {"num_q_heads=12 must be a multiple of num_kv_heads=8", [](Config& c) { c.num_q_heads = 12; }},
      {"head_dim=100", [](Config& c) { c.head_dim = 100; }},
      {"rank=0", [](Config& c) { c.rank = 0; }},
      {"rank=1025", [](Config& c) { c.rank = 1025; }},
      {"chunk_size=0", [](Config& c) { c.chunk_size = 0; }},
      {"sparse_budget=0", [](Config& c) { c.sparse_budget = 0; }},
      {"sparse_budget=2050 is not a multiple of chunk_size=8", [](Config& c) { c.sparse_budget = 2050; }},
      {"outlier_chunks=-5", [](Config& c) { c.outlier_chunks = -5; }},
      {"local_chunks=-1", [](Config& c) { c.local_chunks = -1; }},
      {"value_cache_chunks=100", [](Config& c) { c.value_cache_chunks = 100; }},
      {"rope.rotary_dim", [](Config& c) { c.rope.rotary_dim = 7; }},
      {"rope.theta", [](Config& c) { c.rope.theta = -1; }},
      {"rope.scaling", [](Config& c) { c.rope.scaling = static_cast<RopeScaling>(99); }},
      {"rope.layout", [](Config& c) { c.rope.layout = static_cast<RopeLayout>(5); }},
  };
  for (const Case& c : cases) {
    Config cfg;
    c.mutate(cfg);
    const std::string what = error_of(cfg);
    CAPTURE(c.needle);
    CAPTURE(what);
    CHECK(names(what, c.needle));
  }
}

TEST_CASE("config: the Llama 3.1 RoPE preset is valid and is Llama 3.1's") {
  Config cfg;
  cfg.rope = llama31_rope();
  CHECK_NOTHROW(cfg.validate());
  CHECK(cfg.rope.theta == 500000.0);
  CHECK(cfg.rope.scaling == RopeScaling::llama3);
  CHECK(cfg.rope.factor == 8.0);
  CHECK(cfg.rope.original_max_position == 8192);
}

TEST_CASE("config: accepted edges") {
  Config cfg;
  cfg.num_q_heads = cfg.num_kv_heads = 8;  // G = 1
  cfg.rank = cfg.kv_dim();                 // full rank
  cfg.chunk_size = 1;
  cfg.sparse_budget = 1;
  cfg.outlier_chunks = 0;
  cfg.local_chunks = 0;
  CHECK_NOTHROW(cfg.validate());
  for (int d : kSupportedHeadDims) {
    cfg.head_dim = d;
    cfg.rank = 1;
    CHECK_NOTHROW(cfg.validate());
  }
  cfg.value_cache_chunks = 5;  // >= budget chunks (1)
  CHECK_NOTHROW(cfg.validate());
}

TEST_CASE("config: tensor views check shape, null and layout, naming the argument") {
  std::vector<float> buf(2 * 3 * 4);
  TensorView<const float, 3> v(buf.data(), {2, 3, 4});
  CHECK(v.numel() == 24);
  CHECK(v.is_contiguous());
  CHECK(&v(1, 2, 3) == buf.data() + 23);
  CHECK_NOTHROW(check_view(v, "x", {Extent{"a", 2}, Extent{"b", -1}, Extent{"c", 4}}));
  try {
    check_view(v, "keys", {Extent{"n", 2}, Extent{"num_kv_heads", 8}, Extent{"head_dim", 4}});
    FAIL("no throw");
  } catch (const Error& e) {
    CHECK(names(e.what(), "keys has shape [2, 3, 4], expected [n=2, num_kv_heads=8, head_dim=4]"));
  }
  TensorView<const float, 3> null_view(nullptr, {2, 3, 4});
  CHECK_THROWS_AS(check_view(null_view, "q", {Extent{"a", 2}, Extent{"b", 3}, Extent{"c", 4}}), Error);
  TensorView<const float, 2> strided(buf.data(), {2, 4}, {8, 1});
  try {
    check_view(strided, "values", {Extent{"a", 2}, Extent{"b", 4}});
    FAIL("no throw");
  } catch (const Error& e) {
    CHECK(names(e.what(), "values must be contiguous"));
  }
}

TEST_CASE("config: Error carries message and location; the check macro streams values") {
  try {
    const int r = 2000, n = 1024;
    SHADOWKV_CHECK(r <= n, "rank=", r, " exceeds H_kv*d=", n);
    FAIL("no throw");
  } catch (const Error& e) {
    CHECK(e.message() == "rank=2000 exceeds H_kv*d=1024");
    CHECK(names(e.what(), "shadowkv: rank=2000 exceeds H_kv*d=1024"));
    CHECK(names(e.file(), "test_config.cpp"));
    CHECK(e.line() > 0);
    CHECK(dynamic_cast<const std::runtime_error*>(&e) != nullptr);
  }
}

TEST_SUITE_END();
