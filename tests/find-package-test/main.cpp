// Uses the installed shadowkv: a config, the memory planner, and a small dense prefill + decode
// whose results are checked against properties that need no reference. Exits non-zero (with a
// message) when anything is off.

#include <shadowkv/shadowkv.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  using namespace shadowkv;
  try {
    // The memory planner on the paper's defaults (Llama-3.1-8B shapes, 32 layers, 128K, bf16).
    const Config llama;
    llama.validate();
    const MemoryPlan shadow = plan_sequence<ShadowKVPolicy>(llama, 32, 131072, 0, DType::bf16);
    const MemoryPlan dense = plan_sequence<DensePolicy>(llama, 32, 131072, 0, DType::bf16);
    // Dense: 2 (K, V) * 8 heads * 131072 tokens * 128 * 2 bytes * 32 layers = 16 GiB.
    expect(dense.device_bytes == std::size_t{2} * 8 * 131072 * 128 * 2 * 32 &&
               dense.host_bytes == 0,
           "dense plan is the full KV cache on the device");
    expect(shadow.device_bytes > 0 && shadow.device_bytes < dense.device_bytes / 4,
           "ShadowKV keeps well under a quarter of the dense bytes on the device");
    expect(shadow.host_bytes > 0, "ShadowKV offloads values to the host");
    expect(max_batch(shadow, std::size_t{100} << 30, std::size_t{100} << 30) >= 1,
           "one ShadowKV sequence fits 100 GiB");

    // Invalid arguments throw shadowkv::Error naming the field.
    Config bad = llama;
    bad.head_dim = 100;
    bool threw = false;
    try {
      bad.validate();
    } catch (const Error& e) {
      threw = std::string(e.what()).find("head_dim=100") != std::string::npos;
    }
    expect(threw, "head_dim=100 is rejected with a message naming it");

    // A tiny dense attention: 1 layer, H_q=4, H_kv=2, d=64, a 9-token prompt, one decode step.
    Config cfg;
    cfg.num_q_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 64;
    cfg.rank = 16;
    const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, d = cfg.head_dim;
    const index_t prompt = 9;
    std::mt19937 rng(42);
    std::normal_distribution<float> normal;
    auto random = [&](std::size_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = normal(rng);
      return v;
    };
    const std::vector<float> q = random(prompt * hq * d), k = random(prompt * hkv * d),
                             v = random(prompt * hkv * d);
    std::vector<float> out(prompt * hq * d, NAN);
    SparseAttention<DensePolicy> attn(cfg, 1);
    attn.add_sequence(1);
    attn.prefill(1, 0, TensorView<const float, 3>(q.data(), {prompt, hq, d}),
                 TensorView<const float, 3>(k.data(), {prompt, hkv, d}),
                 TensorView<const float, 3>(v.data(), {prompt, hkv, d}),
                 TensorView<float, 3>(out.data(), {prompt, hq, d}));
    attn.finish_prefill(1);
    // Token 0 attends to itself only: its output is its kv head's value, exactly.
    bool first_is_value = true;
    for (int h = 0; h < hq; ++h)
      for (int x = 0; x < d; ++x)
        first_is_value = first_is_value && out[h * d + x] == v[(h / (hq / hkv)) * d + x];
    expect(first_is_value, "prefill output of token 0 equals its value row");

    const std::vector<float> q1 = random(hq * d), k1 = random(hkv * d), v1 = random(hkv * d);
    std::vector<float> out1(hq * d, NAN);
    const SeqId ids[] = {1};
    attn.decode(0, ids, TensorView<const float, 3>(q1.data(), {1, hq, d}),
                TensorView<const float, 3>(k1.data(), {1, hkv, d}),
                TensorView<const float, 3>(v1.data(), {1, hkv, d}),
                TensorView<float, 3>(out1.data(), {1, hq, d}));
    // The decode output is a convex combination of the 10 values of its kv head: each element
    // lies within their range.
    bool in_hull = true;
    for (int h = 0; h < hq; ++h)
      for (int x = 0; x < d; ++x) {
        const int kv = h / (hq / hkv);
        float lo = v1[kv * d + x], hi = lo;
        for (index_t t = 0; t < prompt; ++t) {
          lo = std::min(lo, v[(t * hkv + kv) * d + x]);
          hi = std::max(hi, v[(t * hkv + kv) * d + x]);
        }
        const float o = out1[h * d + x];
        in_hull = in_hull && std::isfinite(o) && o >= lo - 1e-5f && o <= hi + 1e-5f;
      }
    expect(in_hull, "decode output lies within the range of the attended values");
    expect(attn.length(1) == prompt + 1, "the sequence holds prompt + 1 tokens after a decode");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (failures != 0) return 1;
  std::puts("consumer: shadowkv works from the installed package");
  return 0;
}
