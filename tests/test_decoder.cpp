// The Llama-family decoder (model/decoder.hpp): small random models written with the test
// safetensors writer, a two-layer forward against an independent float64 reference (plain
// loops, RoPE from test_util.hpp), dense vs ShadowKV at full rank and budget >= context,
// chunked vs one-shot prefill, sampling, errors, and the examples' tiny default model.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <shadowkv/model/decoder.hpp>
#include <shadowkv/model/model.hpp>

#include "../examples/retrieval_tasks.hpp"
#include "../examples/tiny_model.hpp"
#include "safetensors_writer.hpp"
#include "test_util.hpp"

namespace {

using namespace shadowkv;
using namespace shadowkv::model;
using skv_test::TempDir;

/// Shapes of the test models (head_dim 64: the smallest the kernels support).
struct Shape {
  int layers = 2, hidden = 96, q_heads = 4, kv_heads = 2, head_dim = 64, inter = 128, vocab = 300;
  bool bias = true;   // attention_bias: q/k/v/o biases
  bool tied = false;  // tie_word_embeddings
  double theta = 10000.0, eps = 1e-5;
};

/// A random model's float weights by tensor name, as written to the folder.
struct RandomModel {
  Shape s;
  std::map<std::string, std::vector<float>> w;
  const std::vector<float>& at(const std::string& name) const { return w.at(name); }
};

RandomModel write_random_model(const std::filesystem::path& dir, const Shape& s, std::uint64_t seed) {
  RandomModel m{s, {}};
  std::mt19937_64 rng(seed);
  skv_test::SafetensorsWriter writer;
  auto add = [&](const std::string& name, std::vector<std::int64_t> shape, float scale, float mean = 0.0f) {
    std::size_t n = 1;
    for (auto e : shape) n *= static_cast<std::size_t>(e);
    std::vector<float> v = skv_test::random_vector<float>(rng, n, scale);
    for (float& x : v) x += mean;
    writer.add(name, shape, v);
    m.w[name] = std::move(v);
  };
  const int q = s.q_heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  const float in_h = 1.0f / std::sqrt(static_cast<float>(s.hidden));
  add("model.embed_tokens.weight", {s.vocab, s.hidden}, 1.0f);
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {s.hidden}, 0.1f, 1.0f);
    add(p + "self_attn.q_proj.weight", {q, s.hidden}, in_h);
    add(p + "self_attn.k_proj.weight", {kv, s.hidden}, in_h);
    add(p + "self_attn.v_proj.weight", {kv, s.hidden}, in_h);
    add(p + "self_attn.o_proj.weight", {s.hidden, q}, 1.0f / std::sqrt(static_cast<float>(q)));
    if (s.bias) {
      add(p + "self_attn.q_proj.bias", {q}, 0.1f);
      add(p + "self_attn.k_proj.bias", {kv}, 0.1f);
      add(p + "self_attn.v_proj.bias", {kv}, 0.1f);
      add(p + "self_attn.o_proj.bias", {s.hidden}, 0.1f);
    }
    add(p + "post_attention_layernorm.weight", {s.hidden}, 0.1f, 1.0f);
    add(p + "mlp.gate_proj.weight", {s.inter, s.hidden}, in_h);
    add(p + "mlp.up_proj.weight", {s.inter, s.hidden}, in_h);
    add(p + "mlp.down_proj.weight", {s.hidden, s.inter}, 1.0f / std::sqrt(static_cast<float>(s.inter)));
  }
  add("model.norm.weight", {s.hidden}, 0.1f, 1.0f);
  if (!s.tied) add("lm_head.weight", {s.vocab, s.hidden}, 2.0f * in_h);
  writer.write(dir / "model.safetensors");
  std::string cfg = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": )" + std::to_string(s.hidden) +
                    R"(, "num_hidden_layers": )" + std::to_string(s.layers) +
                    R"(, "num_attention_heads": )" + std::to_string(s.q_heads) +
                    R"(, "num_key_value_heads": )" + std::to_string(s.kv_heads) +
                    R"(, "head_dim": )" + std::to_string(s.head_dim) +
                    R"(, "intermediate_size": )" + std::to_string(s.inter) +
                    R"(, "vocab_size": )" + std::to_string(s.vocab) + R"(, "rms_norm_eps": 1e-05)" +
                    R"(, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2)" +
                    R"(, "attention_bias": )" + (s.bias ? "true" : "false") +
                    R"(, "tie_word_embeddings": )" + (s.tied ? "true" : "false") + "}";
  skv_test::write_file(dir / "config.json", cfg);
  return m;
}

/// A random model written to a temporary folder and loaded back (config + weights).
struct LoadedModel {
  TempDir dir;
  Shape s;
  ModelConfig cfg;
  WeightStore store;
  LoadedModel(std::uint64_t seed, const Shape& shape)
      : s(shape), cfg((write_random_model(dir.path(), s, seed), load_model_config(dir.path()))),
        store(dir.path()) {}
};

// --- the float64 reference forward -------------------------------------------------------------

/// y [n, out] = x [n, in] Wᵀ (+ b), W [out, in] as stored.
std::vector<double> ref_linear(const std::vector<double>& x, int n, int in, const std::vector<float>& w, int out,
                               const std::vector<float>* b) {
  std::vector<double> y(static_cast<std::size_t>(n) * out);
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) {
      double acc = b ? (*b)[o] : 0.0;
      for (int i = 0; i < in; ++i) acc += x[t * in + i] * static_cast<double>(w[static_cast<std::size_t>(o) * in + i]);
      y[t * out + o] = acc;
    }
  return y;
}

std::vector<double> ref_rms_norm(const std::vector<double>& x, int n, int hidden, const std::vector<float>& w,
                                 double eps) {
  std::vector<double> y(x.size());
  for (int t = 0; t < n; ++t) {
    double ss = 0;
    for (int i = 0; i < hidden; ++i) ss += x[t * hidden + i] * x[t * hidden + i];
    const double inv = 1.0 / std::sqrt(ss / hidden + eps);
    for (int i = 0; i < hidden; ++i) y[t * hidden + i] = x[t * hidden + i] * inv * w[i];
  }
  return y;
}

/// Logits `[n, vocab]` of every position of `tokens` (causal), in float64.
std::vector<double> reference_logits(const RandomModel& m, const std::vector<token_id>& tokens) {
  const Shape& s = m.s;
  const int n = static_cast<int>(tokens.size()), H = s.hidden;
  const int q = s.q_heads * s.head_dim, kv = s.kv_heads * s.head_dim;
  std::vector<double> x(static_cast<std::size_t>(n) * H);
  const auto& emb = m.at("model.embed_tokens.weight");
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < H; ++i) x[t * H + i] = emb[static_cast<std::size_t>(tokens[t]) * H + i];
  for (int l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto bias = [&](const std::string& name) { return s.bias ? &m.at(p + name) : nullptr; };
    std::vector<double> h = ref_rms_norm(x, n, H, m.at(p + "input_layernorm.weight"), s.eps);
    const auto qv = ref_linear(h, n, H, m.at(p + "self_attn.q_proj.weight"), q, bias("self_attn.q_proj.bias"));
    const auto kvv = ref_linear(h, n, H, m.at(p + "self_attn.k_proj.weight"), kv, bias("self_attn.k_proj.bias"));
    const auto vv = ref_linear(h, n, H, m.at(p + "self_attn.v_proj.weight"), kv, bias("self_attn.v_proj.bias"));
    const auto attn = skv_test::attention_ref(qv, kvv, vv, n, s.q_heads, s.kv_heads, s.head_dim, s.theta, 0);
    const auto o = ref_linear(attn, n, q, m.at(p + "self_attn.o_proj.weight"), H, bias("self_attn.o_proj.bias"));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = ref_rms_norm(x, n, H, m.at(p + "post_attention_layernorm.weight"), s.eps);
    auto gate = ref_linear(h, n, H, m.at(p + "mlp.gate_proj.weight"), s.inter, nullptr);
    const auto up = ref_linear(h, n, H, m.at(p + "mlp.up_proj.weight"), s.inter, nullptr);
    for (std::size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
    const auto down = ref_linear(gate, n, s.inter, m.at(p + "mlp.down_proj.weight"), H, nullptr);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  const auto h = ref_rms_norm(x, n, H, m.at("model.norm.weight"), s.eps);
  return ref_linear(h, n, H, m.at(s.tied ? "model.embed_tokens.weight" : "lm_head.weight"), s.vocab, nullptr);
}

std::vector<double> last_row(const std::vector<double>& all, int vocab) {
  return {all.end() - vocab, all.end()};
}

std::vector<token_id> random_tokens(std::mt19937_64& rng, int n, int vocab) {
  std::uniform_int_distribution<int> dist(0, vocab - 1);
  std::vector<token_id> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

/// Exact-equivalence knobs: full rank, every chunk selectable, no outliers or local window.
Config full_config(const ModelConfig& cfg, index_t context) {
  Config a = cfg.attention_config();
  a.rank = a.kv_dim();
  a.chunk_size = 8;
  a.sparse_budget = static_cast<int>((context + 64) / 8 * 8);
  a.outlier_chunks = 0;
  a.local_chunks = 0;
  return a;
}

/// The model's attention with a rank it accepts (DensePolicy ignores the rank, validation does not).
Config dense_config(const ModelConfig& cfg) {
  Config a = cfg.attention_config();
  a.rank = a.kv_dim();
  return a;
}

constexpr double kLogitTolerance = 1e-4;  // float forward vs float64 reference, relative norm

}  // namespace

TEST_SUITE("decoder") {

TEST_CASE("decoder: a two-layer forward (prefill and decode) matches a float64 reference") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  for (const bool tied : {false, true}) {
    CAPTURE(tied);
    TempDir dir;
    Shape s;
    s.tied = tied;
    s.bias = !tied;  // both with and without q/k/v/o biases
    const RandomModel m = write_random_model(dir.path(), s, seed);
    const ModelConfig cfg = load_model_config(dir.path());
    REQUIRE(cfg.qkv_bias == s.bias);
    const WeightStore store(dir.path());
    std::mt19937_64 rng(seed + 1);
    std::vector<token_id> tokens = random_tokens(rng, 37, s.vocab);

    auto check_policy = [&](auto policy_tag) {
      using Policy = decltype(policy_tag);
      Decoder<Policy> dec(cfg, store, full_config(cfg, 64));
      dec.add_sequence(5);
      std::vector<float> all;
      const std::vector<float> last = dec.prefill(5, tokens, 512, {}, &all);
      std::vector<double> ref = reference_logits(m, tokens);
      CHECK(skv_test::rel_error(skv_test::to_double(all), ref) < kLogitTolerance);
      CHECK(skv_test::rel_error(skv_test::to_double(last), last_row(ref, s.vocab)) < kLogitTolerance);
      // Decode steps: feed back the reference's argmax; compare the new position's logits.
      std::vector<token_id> seq = tokens;
      for (int step = 0; step < 4; ++step) {
        CAPTURE(step);
        const auto ref_last = last_row(reference_logits(m, seq), s.vocab);
        const token_id next =
            static_cast<token_id>(std::max_element(ref_last.begin(), ref_last.end()) - ref_last.begin());
        seq.push_back(next);
        const SeqId ids[1] = {5};
        const token_id toks[1] = {next};
        const std::vector<float> logits = dec.decode(ids, toks);
        CHECK(skv_test::rel_error(skv_test::to_double(logits), last_row(reference_logits(m, seq), s.vocab)) <
              kLogitTolerance);
      }
    };
    check_policy(DensePolicy{});
    check_policy(ShadowKVPolicy{});  // at full rank, budget >= context: exact to rounding
  }
}

TEST_CASE("decoder: dense, ShadowKV and oracle at full rank with budget >= context give the same greedy tokens") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  Shape shape;
  shape.tied = true;
  const LoadedModel m(seed, shape);
  const Shape& s = m.s;
  const ModelConfig& cfg = m.cfg;
  const WeightStore& store = m.store;
  std::mt19937_64 rng(seed + 2);
  const std::vector<token_id> prompt = random_tokens(rng, 61, s.vocab);
  GenerationOptions opt;
  opt.max_new_tokens = 12;
  opt.stop_at_eos = false;
  opt.prefill_chunk = 16;
  const Config knobs = full_config(cfg, 61 + 12);
  Decoder<DensePolicy> dense(cfg, store, knobs);
  Decoder<ShadowKVPolicy> shadow(cfg, store, knobs);
  Decoder<OracleTopKPolicy> oracle(cfg, store, knobs);
  const GenerationResult rd = dense.generate(prompt, opt);
  const GenerationResult rs = shadow.generate(prompt, opt);
  const GenerationResult ro = oracle.generate(prompt, opt);
  CHECK(rd.tokens.size() == 12);
  CHECK(rs.tokens == rd.tokens);
  CHECK(ro.tokens == rd.tokens);
  CHECK(rd.decode_steps == 11);
  CHECK(rs.attention.pool.requested > 0);  // ShadowKV went through its value pool
  CHECK(rs.memory.host_bytes > 0);         // with the values offloaded
  CHECK(rd.memory.host_bytes == 0);
  CHECK(rd.memory.device_bytes > 0);
  // The sequence is removed at the end: the decoder can run the next prompt.
  CHECK(shadow.attention().num_sequences() == 0);
  CHECK(shadow.generate(prompt, opt).tokens == rd.tokens);
}

TEST_CASE("decoder: chunked prefill equals one-shot prefill") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  const LoadedModel m(seed, Shape{});
  const Shape& s = m.s;
  const ModelConfig& cfg = m.cfg;
  const WeightStore& store = m.store;
  std::mt19937_64 rng(seed + 3);
  const std::vector<token_id> prompt = random_tokens(rng, 83, s.vocab);
  Config knobs = cfg.attention_config();  // real sparsity: rank 32, budget 32, 1 outlier, 2 local
  knobs.rank = 32;
  knobs.chunk_size = 8;
  knobs.sparse_budget = 32;
  knobs.outlier_chunks = 1;
  knobs.local_chunks = 2;
  Decoder<ShadowKVPolicy> dec(cfg, store, knobs);
  std::vector<float> one_shot;
  std::vector<std::vector<float>> logits;
  std::vector<std::vector<token_id>> tokens;
  for (const index_t chunk : {index_t{512}, index_t{83}, index_t{1}, index_t{7}, index_t{32}}) {
    CAPTURE(chunk);
    std::vector<std::pair<index_t, index_t>> progress;
    dec.add_sequence(1);
    logits.push_back(dec.prefill(1, prompt, chunk, [&](index_t done, index_t total) {
      progress.emplace_back(done, total);
    }));
    dec.remove_sequence(1);
    REQUIRE(!progress.empty());
    CHECK(progress.size() == static_cast<std::size_t>((83 + chunk - 1) / chunk));
    CHECK(progress.back() == std::pair<index_t, index_t>{83, 83});
    CHECK(skv_test::rel_error(skv_test::to_double(logits.back()), skv_test::to_double(logits.front())) < 1e-5);
    GenerationOptions opt;
    opt.max_new_tokens = 8;
    opt.prefill_chunk = chunk;
    opt.stop_at_eos = false;
    tokens.push_back(dec.generate(prompt, opt).tokens);
    CHECK(tokens.back() == tokens.front());
  }
}

TEST_CASE("decoder: batched decode equals one sequence at a time") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  const LoadedModel m(seed, Shape{});
  const Shape& s = m.s;
  const ModelConfig& cfg = m.cfg;
  const WeightStore& store = m.store;
  std::mt19937_64 rng(seed + 4);
  const auto a = random_tokens(rng, 20, s.vocab), b = random_tokens(rng, 33, s.vocab);
  Decoder<DensePolicy> dec(cfg, store, dense_config(cfg));
  dec.add_sequence(1);
  dec.add_sequence(2);
  dec.prefill(1, a);
  dec.prefill(2, b);
  const SeqId ids[2] = {1, 2};
  const token_id next[2] = {3, 4};
  const std::vector<float> both = dec.decode(ids, next);
  Decoder<DensePolicy> single(cfg, store, dense_config(cfg));
  single.add_sequence(2);
  single.prefill(2, b);
  const SeqId id2[1] = {2};
  const token_id n2[1] = {4};
  const std::vector<float> only = single.decode(id2, n2);
  const std::vector<float> second(both.begin() + s.vocab, both.end());
  CHECK(skv_test::rel_error(skv_test::to_double(second), skv_test::to_double(only)) < 1e-6);
}

TEST_CASE("decoder: the observer sees every attention call; its keys and values prefill another policy") {
  // One prompt pass (dense) hands each layer's keys and values to a ShadowKV attention state
  // (prefill with empty queries); that state then decodes exactly like a ShadowKV decoder that
  // ran the prompt itself. This is how the accuracy harness shares one prefill among policies.
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  const LoadedModel m(seed, Shape{});
  const ModelConfig& cfg = m.cfg;
  std::mt19937_64 rng(seed + 5);
  const std::vector<token_id> prompt = random_tokens(rng, 75, m.s.vocab);
  Config knobs = cfg.attention_config();
  knobs.rank = 40;
  knobs.chunk_size = 8;
  knobs.sparse_budget = 24;
  knobs.outlier_chunks = 1;
  knobs.local_chunks = 2;
  Decoder<DensePolicy> lead(cfg, m.store, dense_config(cfg));
  Decoder<ShadowKVPolicy> fed(cfg, m.store, knobs), alone(cfg, m.store, knobs);
  std::vector<std::pair<bool, int>> calls;
  index_t prefill_rows = 0;
  lead.set_observer([&](const AttentionEvent& e) {
    calls.emplace_back(e.prefill, e.layer);
    REQUIRE(e.ids.size() == 1);
    CHECK(e.ids[0] == 4);
    CHECK(e.keys.shape[1] == cfg.num_kv_heads);
    CHECK(e.queries.shape[1] == cfg.num_q_heads);
    CHECK(e.out.shape[0] == e.queries.shape[0]);
    if (!e.prefill) return;
    if (e.layer == 0) prefill_rows += e.keys.shape[0];
    std::apply([&](auto... a) { fed.attention().prefill(4, e.layer, {}, e.keys, e.values, {}, a...); },
               lead.attention_args());
  });
  lead.add_sequence(4);
  fed.add_sequence(4);
  alone.add_sequence(4);
  const std::vector<float> lead_logits = lead.prefill(4, prompt, 32);
  fed.attention().finish_prefill(4);
  const std::vector<float> alone_logits = alone.prefill(4, prompt, 32);
  CHECK(prefill_rows == 75);
  CHECK(calls.size() == 3u * static_cast<std::size_t>(cfg.num_layers));  // 3 chunks of 32
  CHECK(skv_test::rel_error(skv_test::to_double(lead_logits), skv_test::to_double(alone_logits)) < 1e-5);
  const SeqId ids[1] = {4};
  for (int step = 0; step < 6; ++step) {
    const token_id t[1] = {static_cast<token_id>(rng() % static_cast<std::uint64_t>(m.s.vocab))};
    const std::vector<float> a = fed.decode(ids, t), b = alone.decode(ids, t);
    CHECK(a == b);  // bit-identical: the same keys and values in the same order
    calls.clear();
    lead.decode(ids, t);
    REQUIRE(calls.size() == static_cast<std::size_t>(cfg.num_layers));
    for (int l = 0; l < cfg.num_layers; ++l) CHECK(calls[l] == std::pair<bool, int>{false, l});
  }
}

TEST_CASE("decoder: sampling is greedy at temperature 0 and reproducible with a seed") {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f, 2.0f};
  std::mt19937_64 rng(1);
  CHECK(sample_token(logits, 0.0, 1.0, rng) == 1);  // the first of equal maxima
  std::mt19937_64 a(42), b(42);
  for (int i = 0; i < 20; ++i) CHECK(sample_token(logits, 1.0, 0.9, a) == sample_token(logits, 1.0, 0.9, b));
  // A tiny nucleus keeps only the most likely token.
  for (int i = 0; i < 20; ++i) CHECK(sample_token(logits, 1.0, 1e-6, a) == 1);
  std::vector<int> counts(5, 0);
  for (int i = 0; i < 2000; ++i) ++counts[sample_token(logits, 1.0, 1.0, a)];
  CHECK(counts[2] > 0);  // every token can come up at top_p = 1
  CHECK(counts[1] > counts[0]);
}

TEST_CASE("decoder: errors name what is wrong") {
  const LoadedModel m(11, Shape{});
  const ModelConfig& cfg = m.cfg;
  const WeightStore& store = m.store;
  Config knobs = cfg.attention_config();
  knobs.rank = 64;
  knobs.sparse_budget = 64;  // 1 outlier chunk + 4 local chunks of 8: 40 tokens at least
  Decoder<ShadowKVPolicy> dec(cfg, store, knobs);
  dec.add_sequence(1);
  const std::vector<token_id> short_prompt(10, 3);
  skv_test::check_error([&] { dec.prefill(1, short_prompt); }, {"prompt of 10 tokens", "40 tokens", "DensePolicy"});
  const std::vector<token_id> bad = {1, 2, 300};
  Decoder<DensePolicy> dense(cfg, store, dense_config(cfg));
  dense.add_sequence(1);
  skv_test::check_error([&] { dense.prefill(1, bad); }, {"token id 300", "position 2", "vocab_size=300"});
  skv_test::check_error([&] { dense.prefill(1, short_prompt, 0); }, {"chunk=0"});
  Config wrong = dense_config(cfg);
  wrong.num_q_heads = 8;
  skv_test::check_error([&] { (void)Decoder<DensePolicy>(cfg, store, wrong); }, {"num_q_heads=8", "config.json"});
  GenerationOptions opt;
  opt.max_new_tokens = -1;
  skv_test::check_error([&] { dense.generate(short_prompt, opt, 9); }, {"max_new_tokens=-1"});
}

TEST_CASE("decoder: the examples' tiny default model is deterministic, loads and decodes") {
  TempDir a, b;
  shadowkv_examples::write_tiny_model(a.path(), 7);
  shadowkv_examples::write_tiny_model(b.path(), 7);
  auto bytes = [](const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  CHECK(bytes(a / "model.safetensors") == bytes(b / "model.safetensors"));
  CHECK(bytes(a / "config.json") == bytes(b / "config.json"));
  const ModelConfig cfg = load_model_config(a.path());
  CHECK(cfg.tokenizer == "bytes");
  CHECK(cfg.head_dim == 64);
  CHECK(cfg.vocab_size == 258);
  const WeightStore store(a.path());
  check_weights(store, cfg);
  const auto tok = load_tokenizer(a.path(), cfg);
  std::vector<token_id> prompt = {256};
  const auto text = tok->encode(std::string(400, 'a') + "the end");
  prompt.insert(prompt.end(), text.begin(), text.end());
  Config knobs = cfg.attention_config();
  knobs.rank = 128;
  knobs.sparse_budget = 96;
  Decoder<ShadowKVPolicy> dec(cfg, store, knobs);
  GenerationOptions opt;
  opt.max_new_tokens = 5;
  const GenerationResult r = dec.generate(prompt, opt);
  CHECK(!r.tokens.empty());
  CHECK(r.prompt_tokens == static_cast<index_t>(prompt.size()));
  CHECK(r.memory.device_bytes > 0);
}

TEST_CASE("retrieval tasks: exact lengths, the answer is in the prompt once, fresh cases per seed, errors") {
  // The generator of the accuracy harness and of shadowkv-decode's default prompt, on a
  // tasks.json written here (the trained model's own is checked by the harness's smoke run).
  const TempDir dir;
  {
    std::ofstream t(dir.path() / "tasks.json");
    t << R"({"bos": 256, "eos": 257, "words": "words.txt", "sentence_words": [3, 5], "tasks": {
      "passkey": {"prefix": "Find the key. ", "needle": "The key is {v}.", "query": " The key is ",
                  "value_digits": 5, "needles": 1},
      "mk": {"prefix": "Numbers. ", "needle": "Number for {k}: {v}.", "query": " Number for {k}: ",
             "value_digits": 7, "needles": 3}}})";
    std::ofstream w(dir.path() / "words.txt");
    w << "red\ngreen\nblue\nsky\nstone\nriver\n";
  }
  const shadowkv_examples::RetrievalTasks tasks(dir.path());
  CHECK(tasks.names() == std::vector<std::string>{"mk", "passkey"});
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  for (const std::string task : {"passkey", "mk"})
    for (const std::int64_t length : {std::int64_t{200}, std::int64_t{333}, std::int64_t{2048}}) {
      CAPTURE(task);
      CAPTURE(length);
      const auto c = tasks.make(task, length, seed + static_cast<std::uint64_t>(length));
      REQUIRE(static_cast<std::int64_t>(c.prompt.size()) == length);
      CHECK(c.prompt[0] == 256);
      CHECK(c.value.size() == (task == "mk" ? 7u : 5u));
      CHECK(c.value[0] != '0');
      REQUIRE(c.answer.size() == c.value.size() + 1);
      CHECK(c.answer.back() == 257);
      const std::string text(c.prompt.begin() + 1, c.prompt.end());
      for (std::size_t i = 1; i < text.size(); ++i) CHECK(static_cast<unsigned char>(text[i]) < 128);
      // The asked value is stated once, right after its key, and the query ends the prompt.
      const std::string needle = task == "mk" ? ": " + c.value + "." : "is " + c.value + ".";
      const std::size_t at = text.find(needle);
      REQUIRE(at != std::string::npos);
      CHECK(text.find(needle, at + 1) == std::string::npos);
      const std::string tail = task == "mk" ? ": " : " The key is ";
      CHECK(text.compare(text.size() - tail.size(), tail.size(), tail) == 0);
      if (task == "mk") {
        const std::string asked = text.substr(text.rfind(" Number for ") + 12);  // "<key>: "
        CHECK(text.find("for " + asked + c.value + ".") != std::string::npos);
      }
      CHECK(c.depth > 0.0);
      CHECK(c.depth < 1.0);
      // Same seed, same case; another seed, another case.
      CHECK(tasks.make(task, length, seed + static_cast<std::uint64_t>(length)).prompt == c.prompt);
      CHECK(tasks.make(task, length, seed + static_cast<std::uint64_t>(length) + 1).prompt != c.prompt);
    }
  CHECK_THROWS_WITH_AS(tasks.make("mk", 60, 1), doctest::Contains("too short for task 'mk'"), Error);
  CHECK_THROWS_WITH_AS(tasks.make("nope", 500, 1), doctest::Contains("unknown task 'nope'"), Error);
  CHECK(tasks.fixed_tokens("mk") < 200);
  // One-letter keys ("key": "letter", tools/train/train_retrieval.py --mk-key letter).
  const auto write_mk = [&](const std::string& key, int needles) {
    std::ofstream(dir.path() / "tasks.json")
        << R"({"bos": 256, "eos": 257, "words": "words.txt", "sentence_words": [3, 5], "tasks": {
      "mk": {"prefix": "Numbers. ", "needle": "Number for {k}: {v}.", "query": " Number for {k}: ",
             "key": ")" << key << R"(", "value_digits": 7, "needles": )" << needles << "}}}";
  };
  write_mk("letter", 26);
  const shadowkv_examples::RetrievalTasks letters(dir.path());
  CHECK(letters.fixed_tokens("mk") == 1 + 9 + 15 + 26 * 23);  // bos, prefix, query, 26 needles + spaces
  for (std::uint64_t i = 0; i < 4; ++i) {
    const auto c = letters.make("mk", 1024, seed + i);
    REQUIRE(c.prompt.size() == 1024u);
    const std::string text(c.prompt.begin() + 1, c.prompt.end());
    const std::string asked = text.substr(text.rfind(" Number for ") + 12);  // "<key>: "
    REQUIRE(asked.size() == 3u);
    CHECK(asked[0] >= 'A');
    CHECK(asked[0] <= 'Z');
    CHECK(text.find("for " + asked + c.value + ".") != std::string::npos);
    for (char k = 'A'; k <= 'Z'; ++k)  // 26 needles: every letter is a key once
      CHECK(text.find(std::string("Number for ") + k + ": ") != std::string::npos);
  }
  write_mk("letter", 27);
  CHECK_THROWS_WITH_AS(shadowkv_examples::RetrievalTasks{dir.path()}, doctest::Contains("at most 26"), Error);
  write_mk("uuid", 3);
  CHECK_THROWS_WITH_AS(shadowkv_examples::RetrievalTasks{dir.path()}, doctest::Contains("has key 'uuid'"), Error);
  std::ofstream(dir.path() / "tasks.json") << R"({"bos": 256})";
  CHECK_THROWS_WITH_AS(shadowkv_examples::RetrievalTasks{dir.path()}, doctest::Contains("tasks.json"), Error);
}

}  // TEST_SUITE
