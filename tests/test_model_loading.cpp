// Model-folder loading: safetensors files and sharded folders written by the tests' own writer
// and read back bit-exact, every malformed-file case named in its error, config.json of each
// supported architecture, and the weight naming (fused GLM-4 tensors split by rows).

#include <cmath>
#include <map>

#include <shadowkv/model/model.hpp>

#include "safetensors_writer.hpp"
#include "test_util.hpp"

using namespace shadowkv;
using namespace shadowkv::model;
using skv_test::error_message;
using skv_test::SafetensorsWriter;
using skv_test::TempDir;
using skv_test::write_file;

TEST_SUITE_BEGIN("model_loading");

namespace {

using skv_test::check_error;
using skv_test::contains;

template <class T>
std::vector<T> random_values(std::mt19937_64& rng, std::size_t n) {
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(rng));
  return v;
}

/// Bit equality of two buffers of the same element type (NaN-safe, and exact for bf16/fp16).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// `values` converted to U through float: what the reader must produce.
template <class U, class T>
std::vector<U> converted(const std::vector<T>& values) {
  std::vector<U> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = static_cast<U>(static_cast<float>(values[i]));
  return out;
}

/// One tensor of the random checkpoints: its values in the three storage types it may be
/// written in; `dtype` says which one is in the file.
struct RandomTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  DType dtype;
  std::vector<float> f32;
  std::vector<bf16> b16;
  std::vector<fp16> f16;

  std::string bytes() const {
    switch (dtype) {
      case DType::fp32: return skv_test::raw_bytes(f32);
      case DType::bf16: return skv_test::raw_bytes(b16);
      case DType::fp16: return skv_test::raw_bytes(f16);
    }
    return {};
  }
  const char* st_dtype() const { return dtype == DType::fp32 ? "F32" : dtype == DType::bf16 ? "BF16" : "F16"; }
};

std::vector<RandomTensor> random_tensors(std::mt19937_64& rng, int count) {
  std::vector<RandomTensor> out;
  std::uniform_int_distribution<int> extent(0, 9), rank(0, 3), kind(0, 2);
  for (int i = 0; i < count; ++i) {
    RandomTensor t;
    t.name = "layers." + std::to_string(i) + ".weight";
    const int r = rank(rng);
    std::size_t n = 1;
    for (int d = 0; d < r; ++d) {
      t.shape.push_back(extent(rng) + (i % 5 == 0 ? 0 : 1));  // some tensors have a zero extent
      n *= static_cast<std::size_t>(t.shape.back());
    }
    t.dtype = static_cast<DType>(kind(rng));
    // The file holds values of the written dtype; the other two are what conversion gives.
    if (t.dtype == DType::fp32) {
      t.f32 = random_values<float>(rng, n);
      t.b16 = converted<bf16>(t.f32);
      t.f16 = converted<fp16>(t.f32);
    } else if (t.dtype == DType::bf16) {
      t.b16 = random_values<bf16>(rng, n);
      t.f32 = converted<float>(t.b16);
      t.f16 = converted<fp16>(t.b16);
    } else {
      t.f16 = random_values<fp16>(rng, n);
      t.f32 = converted<float>(t.f16);
      t.b16 = converted<bf16>(t.f16);
    }
    out.push_back(std::move(t));
  }
  return out;
}

/// Every tensor of `tensors` is in `store` with its dtype, shape and bytes, and converts to
/// each storage type as `static_cast` through float does.
template <class Store>
void check_loaded(const Store& store, const std::vector<RandomTensor>& tensors) {
  for (const RandomTensor& t : tensors) {
    CAPTURE(t.name);
    REQUIRE(store.contains(t.name));
    const TensorInfo& info = store.info(t.name);
    CHECK(to_string(info.dtype) == t.st_dtype());
    CHECK(info.shape == std::vector<index_t>(t.shape.begin(), t.shape.end()));
    const auto bytes = store.bytes(t.name);
    const std::string expected = t.bytes();
    CHECK(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()) == expected);
    CHECK(same_bits(store.template load<float>(t.name), t.f32));
    CHECK(same_bits(store.template load<bf16>(t.name), t.b16));
    CHECK(same_bits(store.template load<fp16>(t.name), t.f16));
  }
}

SafetensorsWriter writer_of(const std::vector<RandomTensor>& tensors, std::size_t begin, std::size_t end) {
  SafetensorsWriter w;
  for (std::size_t i = begin; i < end; ++i)
    w.add_raw(tensors[i].name, tensors[i].st_dtype(), tensors[i].shape, tensors[i].bytes());
  return w;
}

/// A file holding one header and data given verbatim.
std::filesystem::path raw_file(const TempDir& dir, const std::string& header, const std::string& data,
                               const char* name = "bad.safetensors") {
  const auto path = dir / name;
  write_file(path, SafetensorsWriter::file_bytes(header, data));
  return path;
}

}  // namespace

// --- safetensors ------------------------------------------------------------------------------

TEST_CASE("model_loading: a single file of random bf16/fp16/fp32 tensors loads back bit-exact") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TempDir dir;
  const auto tensors = random_tensors(rng, 24);
  writer_of(tensors, 0, tensors.size()).write(dir / "model.safetensors");

  const SafetensorsFile file(dir / "model.safetensors");
  CHECK(file.num_tensors() == tensors.size());
  check_loaded(file, tensors);
  // Through the folder: a single model.safetensors.
  const WeightStore store(dir.path());
  CHECK(store.num_files() == 1);
  CHECK(store.index_path().empty());
  CHECK(store.num_tensors() == tensors.size());
  check_loaded(store, tensors);
}

TEST_CASE("model_loading: scalars, empty tensors, other dtypes, row slices") {
  TempDir dir;
  SafetensorsWriter w;
  const std::vector<float> scalar{3.5f};
  const std::vector<std::int64_t> ints{1, -2, 3};
  std::vector<float> matrix(4 * 3);
  for (std::size_t i = 0; i < matrix.size(); ++i) matrix[i] = 0.25f * static_cast<float>(i);
  w.add("scalar", {}, scalar);
  w.add("empty", {0, 4}, std::vector<bf16>{});
  w.add("ints", {3}, ints);
  w.add("matrix", {4, 3}, matrix);
  w.write(dir / "a.safetensors");

  const SafetensorsFile f(dir / "a.safetensors");
  CHECK(f.info("scalar").shape.empty());
  CHECK(f.info("scalar").numel() == 1);
  CHECK(f.load<float>("scalar") == scalar);
  CHECK(f.info("empty").numel() == 0);
  CHECK(f.load<float>("empty").empty());
  CHECK(f.info("ints").dtype == TensorDType::i64);
  CHECK(f.bytes("ints").size() == 24);
  CHECK(std::memcmp(f.bytes("ints").data(), ints.data(), 24) == 0);
  check_error([&] { (void)f.load<float>("ints"); }, {"a.safetensors", "tensor 'ints'", "dtype I64"});
  // Rows 1..2 of a [4, 3] matrix.
  std::vector<float> rows(6);
  f.read_rows<float>("matrix", 1, 2, rows);
  CHECK(rows == std::vector<float>(matrix.begin() + 3, matrix.begin() + 9));
  check_error([&] { f.read_rows<float>("matrix", 3, 2, rows); }, {"tensor 'matrix'", "no rows [3, 5)"});
  std::vector<float> small(5);
  check_error([&] { f.read<float>("matrix", small); }, {"tensor 'matrix'", "12 elements", "holds 5"});
  check_error([&] { (void)f.info("nope"); }, {"a.safetensors", "tensor 'nope'"});
}

TEST_CASE("model_loading: a sharded folder with model.safetensors.index.json") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  TempDir dir;
  const auto tensors = random_tensors(rng, 30);
  // Three shards of 10 tensors, named as Hugging Face names them.
  std::string weight_map;
  for (int s = 0; s < 3; ++s) {
    const std::string shard = "model-0000" + std::to_string(s + 1) + "-of-00003.safetensors";
    writer_of(tensors, 10 * s, 10 * s + 10).write(dir / shard);
    for (int i = 10 * s; i < 10 * s + 10; ++i)
      weight_map += std::string(weight_map.empty() ? "" : ",") + "\"" + tensors[i].name + "\":\"" + shard + "\"";
  }
  write_file(dir / "model.safetensors.index.json",
             R"({"metadata": {"total_size": 123}, "weight_map": {)" + weight_map + "}}");
  // A stray single file is ignored when the index exists.
  SafetensorsWriter stray;
  stray.add("stray", {1}, std::vector<float>{1.0f});
  stray.write(dir / "model.safetensors");

  const WeightStore store(dir.path());
  CHECK(store.num_files() == 3);
  CHECK(store.num_tensors() == tensors.size());
  CHECK(!store.index_path().empty());
  CHECK(!store.contains("stray"));
  check_loaded(store, tensors);
  CHECK(contains(store.file_of(tensors[25].name).path().string(), "model-00003-of-00003.safetensors"));
  check_error([&] { (void)store.info("lm_head.weight"); },
              {"tensor 'lm_head.weight'", dir.path().string(), "model.safetensors.index.json", "3 shards"});
}

TEST_CASE("model_loading: every malformed safetensors file throws naming the file and the tensor or field") {
  TempDir dir;
  const std::string data16(16, '\0');
  struct Case {
    const char* what;
    std::string header;
    std::string data;
    std::vector<std::string> needles;
  };
  const Case cases[] = {
      {"header is not JSON", "{\"w\": {\"dtype\": ", data16, {"not valid JSON"}},
      {"header is an array", "[1, 2]", data16, {"expected a JSON object"}},
      {"entry is not an object", R"({"w": 5})", data16, {"tensor 'w'", "expected an object"}},
      {"no dtype", R"({"w": {"shape": [4], "data_offsets": [0, 16]}})", data16, {"tensor 'w'", "'dtype' is missing"}},
      {"no shape", R"({"w": {"dtype": "F32", "data_offsets": [0, 16]}})", data16, {"tensor 'w'", "'shape' is missing"}},
      {"no data_offsets", R"({"w": {"dtype": "F32", "shape": [4]}})", data16,
       {"tensor 'w'", "'data_offsets' is missing"}},
      {"dtype not a string", R"({"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}})", data16,
       {"tensor 'w'", "'dtype' is an integer"}},
      {"unknown dtype", R"({"w": {"dtype": "F17", "shape": [4], "data_offsets": [0, 16]}})", data16,
       {"tensor 'w'", "unknown dtype 'F17'"}},
      {"negative extent", R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", data16,
       {"tensor 'w'", "'shape' holds -4"}},
      {"shape not a list", R"({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}})", data16,
       {"tensor 'w'", "'shape' is a string"}},
      {"offsets not a pair", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16]}})", data16,
       {"tensor 'w'", "'data_offsets' is [16]"}},
      {"offsets past the data", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})", data16,
       {"tensor 'w'", "run past the data section (16 bytes)"}},
      {"begin after end", R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", data16,
       {"tensor 'w'", "begin after end"}},
      {"offsets disagree with the shape", R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})",
       data16, {"tensor 'w'", "span 12 bytes", "needs 16"}},
      {"more elements than bytes", R"({"w": {"dtype": "BF16", "shape": [65536, 65536, 65536, 65536], "data_offsets": [0, 16]}})",
       data16, {"tensor 'w'", "more elements"}},
      {"overlapping tensors",
       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       data16, {"'a'", "'b'", "overlap"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    const auto path = raw_file(dir, c.header, c.data);
    auto needles = c.needles;
    needles.push_back(path.string());
    const std::string what = error_message([&] { SafetensorsFile f(path); });
    CAPTURE(what);
    for (const std::string& n : needles) {
      CAPTURE(n);
      CHECK(contains(what, n));
    }
  }

  // Shorter than the length field, and a length past the end of the file.
  const auto tiny = dir / "tiny.safetensors";
  write_file(tiny, "abcde");
  check_error([&] { SafetensorsFile f(tiny); }, {tiny.string(), "5 bytes", "shorter than the 8-byte header length"});
  const auto empty = dir / "empty.safetensors";
  write_file(empty, "");
  check_error([&] { SafetensorsFile f(empty); }, {empty.string(), "0 bytes"});
  std::string truncated = SafetensorsWriter::file_bytes(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", data16);
  truncated.resize(30);  // cuts the header itself
  const auto cut = dir / "cut.safetensors";
  write_file(cut, truncated);
  check_error([&] { SafetensorsFile f(cut); }, {cut.string(), "header length", "past the end of the file"});
  const auto missing = dir / "missing.safetensors";
  check_error([&] { SafetensorsFile f(missing); }, {missing.string(), "cannot open"});

  // Valid edge cases next to those: gaps between tensors, and trailing bytes, are accepted.
  const auto gap = raw_file(dir,
                            R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
                            data16, "gap.safetensors");
  CHECK_NOTHROW(SafetensorsFile{gap});
}

TEST_CASE("model_loading: malformed folders and indexes throw naming the index, the shard and the tensor") {
  SafetensorsWriter w;
  w.add("a", {2}, std::vector<float>{1.0f, 2.0f});
  w.add("b", {1}, std::vector<float>{3.0f});

  {
    TempDir dir;
    check_error([&] { WeightStore s(dir.path()); },
                {dir.path().string(), "neither model.safetensors.index.json nor model.safetensors"});
    check_error([&] { WeightStore s(dir / "nowhere"); }, {"nowhere", "is not a directory"});
  }
  {
    TempDir dir;  // the index names a shard that does not exist
    w.write(dir / "model-00001-of-00002.safetensors");
    write_file(dir / "model.safetensors.index.json",
               R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
    check_error([&] { WeightStore s(dir.path()); },
                {"model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors'", "tensor 'b'",
                 "does not exist"});
  }
  {
    TempDir dir;  // the index maps a tensor to a shard that does not hold it
    w.write(dir / "one.safetensors");
    write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "one.safetensors", "c": "one.safetensors"}})");
    check_error([&] { WeightStore s(dir.path()); },
                {"model.safetensors.index.json", "tensor 'c'", "one.safetensors", "does not hold it"});
  }
  {
    TempDir dir;
    write_file(dir / "model.safetensors.index.json", R"({"metadata": {}})");
    check_error([&] { WeightStore s(dir.path()); }, {"model.safetensors.index.json", "field 'weight_map' is missing"});
    write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
    check_error([&] { WeightStore s(dir.path()); }, {"model.safetensors.index.json", "field 'weight_map.a'", "an integer"});
    write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "../x.safetensors"}})");
    check_error([&] { WeightStore s(dir.path()); }, {"model.safetensors.index.json", "weight_map.a", "not a file inside"});
    write_file(dir / "model.safetensors.index.json", R"({"weight_map": )");
    check_error([&] { WeightStore s(dir.path()); }, {"model.safetensors.index.json", "invalid JSON"});
  }
  {
    TempDir dir;  // a bad shard is named by the shard's own error
    write_file(dir / "s.safetensors", "xyz");
    write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "s.safetensors"}})");
    check_error([&] { WeightStore s(dir.path()); }, {"s.safetensors", "shorter than the 8-byte"});
  }
}

// --- config.json ------------------------------------------------------------------------------

namespace {

ModelConfig parse(const std::string& text) {
  return parse_model_config(nlohmann::json::parse(text), "config.json");
}

const char* kLlama2 = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
  "rms_norm_eps": 1e-05, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
  "max_position_embeddings": 4096, "rope_scaling": null, "tie_word_embeddings": false,
  "torch_dtype": "float16"})";

const char* kLlama3 = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
  "bos_token_id": 128000, "eos_token_id": 128001, "max_position_embeddings": 8192,
  "attention_bias": false, "mlp_bias": false})";

const char* kLlama31 = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
  "max_position_embeddings": 131072, "head_dim": 128,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";

const char* kQwen2 = R"({
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
  "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
  "num_hidden_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
  "bos_token_id": 151643, "eos_token_id": 151645, "max_position_embeddings": 32768,
  "sliding_window": 131072, "use_sliding_window": false, "tie_word_embeddings": false,
  "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}})";

const char* kYi = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
  "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 4,
  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0, "vocab_size": 64000,
  "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 200000})";

const char* kGlm4 = R"({
  "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm",
  "architectures": ["ChatGLMModel"], "add_bias_linear": false, "add_qkv_bias": true,
  "apply_residual_connection_post_layernorm": false, "ffn_hidden_size": 13696,
  "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1.5625e-07,
  "multi_query_attention": true, "multi_query_group_num": 2, "num_attention_heads": 32,
  "num_hidden_layers": 40, "num_layers": 40, "rope_ratio": 500, "original_rope": true,
  "padded_vocab_size": 151552, "post_layer_norm": true, "rmsnorm": true, "seq_length": 131072,
  "tie_word_embeddings": false, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329})";

const char* kGlmHf = R"({
  "architectures": ["GlmForCausalLM"], "model_type": "glm", "attention_bias": true,
  "head_dim": 128, "hidden_size": 4096, "intermediate_size": 13696, "num_attention_heads": 32,
  "num_hidden_layers": 40, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
  "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "vocab_size": 151552,
  "max_position_embeddings": 131072, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329})";

}  // namespace

TEST_CASE("model_loading: config.json of Llama 2, 3, 3.1, Qwen2, Yi and GLM-4 parse to their values") {
  {
    const ModelConfig m = parse(kLlama2);
    CHECK(m.architecture == Architecture::llama);
    CHECK(m.architecture_name == "LlamaForCausalLM");
    CHECK(m.num_q_heads == 32);
    CHECK(m.num_kv_heads == 32);  // no num_key_value_heads: multi-head attention
    CHECK(m.head_dim == 128);     // hidden / heads
    CHECK(m.num_layers == 32);
    CHECK(m.intermediate_size == 11008);
    CHECK(m.vocab_size == 32000);
    CHECK(m.rms_norm_eps == 1e-5);
    CHECK(m.rope.theta == 10000.0);
    CHECK(m.rope.scaling == RopeScaling::none);
    CHECK(m.rope.layout == RopeLayout::half_split);
    CHECK(m.bos_token_ids == std::vector<std::int64_t>{1});
    CHECK(m.eos_token_ids == std::vector<std::int64_t>{2});
    CHECK(!m.qkv_bias);
    CHECK(!m.tie_word_embeddings);
  }
  {
    const ModelConfig m = parse(kLlama3);
    CHECK(m.num_kv_heads == 8);
    CHECK(m.rope.theta == 500000.0);
    CHECK(m.vocab_size == 128256);
    const Config cfg = m.attention_config();
    CHECK(cfg.num_q_heads == 32);
    CHECK(cfg.num_kv_heads == 8);
    CHECK(cfg.head_dim == 128);
    CHECK(cfg.rank == Config{}.rank);  // ShadowKV knobs at their defaults
    CHECK(cfg.sparse_budget == Config{}.sparse_budget);
    CHECK_NOTHROW(cfg.validate());
  }
  {
    const ModelConfig m = parse(kLlama31);
    CHECK(m.rope.scaling == RopeScaling::llama3);
    CHECK(m.rope.factor == 8.0);
    CHECK(m.rope.low_freq_factor == 1.0);
    CHECK(m.rope.high_freq_factor == 4.0);
    CHECK(m.rope.original_max_position == 8192);
    CHECK(m.rope.theta == 500000.0);
    CHECK(m.eos_token_ids == std::vector<std::int64_t>{128001, 128008, 128009});
    CHECK(m.max_position_embeddings == 131072);
    // The same RoPE as the library's Llama 3.1 preset.
    const RopeConfig preset = llama31_rope();
    const RopeTable a = make_rope_table(m.rope, 128), b = make_rope_table(preset, 128);
    CHECK(a.inv_freq == b.inv_freq);
    CHECK_NOTHROW(m.attention_config().validate());
  }
  {
    const ModelConfig m = parse(kQwen2);
    CHECK(m.architecture == Architecture::qwen2);
    CHECK(m.qkv_bias);  // implied by the architecture
    CHECK(!m.o_bias);
    CHECK(m.num_q_heads == 28);
    CHECK(m.num_kv_heads == 4);
    CHECK(m.head_dim == 128);
    CHECK(m.rope.theta == 1e6);
    CHECK(m.rope.scaling == RopeScaling::yarn);  // legacy "type" key
    CHECK(m.rope.factor == 4.0);
    CHECK(m.rope.original_max_position == 32768);
    CHECK_NOTHROW(m.attention_config().validate());
  }
  {
    const ModelConfig m = parse(kYi);
    CHECK(m.architecture == Architecture::llama);
    CHECK(m.num_kv_heads == 4);
    CHECK(m.rope.theta == 5e6);
    CHECK(m.vocab_size == 64000);
  }
  {
    const ModelConfig m = parse(kGlm4);
    CHECK(m.architecture == Architecture::chatglm);
    CHECK(m.num_layers == 40);
    CHECK(m.num_q_heads == 32);
    CHECK(m.num_kv_heads == 2);  // multi_query_group_num
    CHECK(m.head_dim == 128);    // kv_channels
    CHECK(m.intermediate_size == 13696);
    CHECK(m.vocab_size == 151552);  // padded_vocab_size
    CHECK(m.rms_norm_eps == 1.5625e-07);
    CHECK(m.qkv_bias);
    CHECK(!m.o_bias);
    CHECK(!m.mlp_bias);
    CHECK(m.final_norm);
    CHECK(m.max_position_embeddings == 131072);  // seq_length
    CHECK(m.eos_token_ids == std::vector<std::int64_t>{151329, 151336, 151338});
    CHECK(m.bos_token_ids.empty());
    // Partial interleaved RoPE: the first half of each head, base 10000 * rope_ratio.
    CHECK(m.rope.layout == RopeLayout::interleaved);
    CHECK(m.rope.rotary_dim == 64);
    CHECK(m.rope.theta == 5e6);
    const RopeTable table = make_rope_table(m.rope, m.head_dim);
    REQUIRE(table.inv_freq.size() == 32);
    for (int i = 0; i < 32; ++i)
      CHECK(table.inv_freq[i] == doctest::Approx(std::pow(5e6, -2.0 * i / 64.0)).epsilon(1e-6));
    CHECK_NOTHROW(m.attention_config().validate());
  }
  {
    const ModelConfig m = parse(kGlmHf);
    CHECK(m.architecture == Architecture::glm);
    CHECK(m.num_kv_heads == 2);
    CHECK(m.qkv_bias);
    CHECK(!m.o_bias);
    CHECK(m.rope.layout == RopeLayout::interleaved);
    CHECK(m.rope.rotary_dim == 64);  // partial_rotary_factor 0.5
    CHECK(m.rope.theta == 10000.0);
  }
}

TEST_CASE("model_loading: rope_scaling variants and token id forms") {
  auto with_scaling = [](const std::string& scaling) {
    return parse(std::string(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
      "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
      "max_position_embeddings": 4096, "rope_scaling": )") + scaling + "}");
  };
  ModelConfig m = with_scaling(R"({"type": "linear", "factor": 2.0})");
  CHECK(m.rope.scaling == RopeScaling::linear);
  CHECK(m.rope.factor == 2.0);
  m = with_scaling(R"({"type": "dynamic", "factor": 4.0})");
  CHECK(m.rope.scaling == RopeScaling::ntk);
  CHECK(m.rope_dynamic);
  m = with_scaling(R"({"rope_type": "default"})");
  CHECK(m.rope.scaling == RopeScaling::none);
  m = with_scaling(R"({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.5})");
  CHECK(m.rope.original_max_position == 4096);  // max_position_embeddings
  CHECK(m.rope.beta_fast == 16.0);
  CHECK(m.rope.beta_slow == 2.0);
  CHECK(m.rope.attention_factor == 1.5);
  m = with_scaling(R"({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0})");
  CHECK(m.rope.attention_factor == doctest::Approx(1.0));
  CHECK(m.head_dim == 64);
}

TEST_CASE("model_loading: config.json errors name the file and the field") {
  const std::string base = R"("architectures": ["LlamaForCausalLM"], "intermediate_size": 512,
      "num_hidden_layers": 2, "vocab_size": 1000)";
  struct Case {
    const char* what;
    std::string json;
    std::vector<std::string> needles;
  };
  const Case cases[] = {
      {"missing field", "{" + base + R"(, "num_attention_heads": 4})", {"field 'hidden_size' is missing"}},
      {"wrong type", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": "4"})",
       {"field 'num_attention_heads' is a string, expected an integer"}},
      {"non-positive size", "{" + base + R"(, "hidden_size": 0, "num_attention_heads": 4})",
       {"field 'hidden_size'=0 is out of range"}},
      {"inconsistent heads", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 3})",
       {"inconsistent head counts", "num_q_heads=4", "num_kv_heads=3"}},
      {"hidden not a multiple of heads", "{" + base + R"(, "hidden_size": 250, "num_attention_heads": 4})",
       {"no head_dim", "hidden_size=250"}},
      {"unsupported architecture",
       R"({"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 256})",
       {"unsupported architecture", "MambaForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "ChatGLMModel",
        "GlmForCausalLM"}},
      {"unknown rope type", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "rope_scaling": {"rope_type": "longrope", "factor": 2}})",
       {"field 'rope_scaling.rope_type'", "longrope"}},
      {"llama3 without low_freq_factor",
       "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "rope_scaling": {"rope_type": "llama3", "factor": 8, "high_freq_factor": 4, "original_max_position_embeddings": 8192}})",
       {"field 'rope_scaling.low_freq_factor' is missing"}},
      {"rope_scaling without a type", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "rope_scaling": {"factor": 2}})",
       {"rope_scaling.rope_type", "is missing"}},
      {"invalid rope factor", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 0.5}})",
       {"RoPE parameters", "rope.factor=0.5"}},
      {"eos outside the vocab", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "eos_token_id": [2, 1000]})",
       {"eos_token_id=1000", "outside the vocabulary"}},
      {"bad eos list", "{" + base + R"(, "hidden_size": 256, "num_attention_heads": 4, "eos_token_id": [2, "x"]})",
       {"field 'eos_token_id[1]' is \"x\""}},
      {"chatglm layernorm", R"({"architectures": ["ChatGLMModel"], "hidden_size": 256, "num_layers": 2,
        "num_attention_heads": 4, "ffn_hidden_size": 512, "padded_vocab_size": 1000, "rmsnorm": false})",
       {"field 'rmsnorm'", "LayerNorm"}},
      {"qwen2 sliding window", R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 1000, "use_sliding_window": true})",
       {"field 'use_sliding_window'"}},
      {"top level not an object", "[1]", {"expected an object"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    const std::string what = error_message([&] { parse(c.json); });
    CAPTURE(what);
    CHECK(contains(what, "config.json"));
    for (const std::string& n : c.needles) {
      CAPTURE(n);
      CHECK(contains(what, n));
    }
  }
  // From a folder: a missing file and invalid JSON name the path.
  TempDir dir;
  check_error([&] { load_model_config(dir.path()); }, {(dir / "config.json").string(), "cannot open"});
  write_file(dir / "config.json", "{\"hidden_size\": ");
  check_error([&] { load_model_config(dir.path()); }, {(dir / "config.json").string(), "invalid JSON"});
}

// --- weight naming ----------------------------------------------------------------------------

namespace {

/// Tiny shapes shared by the weight-naming tests: hidden 32, 4 query heads and 2 KV heads of
/// 8, intermediate 48, vocab 40, 2 layers.
constexpr int kHidden = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8, kInter = 48, kVocab = 40, kLayers = 2;

std::string tiny_llama_config(const char* arch, const std::string& extra = "") {
  return std::string(R"({"architectures": [")") + arch + R"("], "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 40)" + extra + "}";
}

/// Random float values for a tensor of `shape`, recorded by name so the test can compare.
struct Checkpoint {
  std::mt19937_64 rng;
  SafetensorsWriter writer;
  std::map<std::string, std::vector<float>> values;

  explicit Checkpoint(std::uint64_t seed) : rng(seed) {}
  void add(const std::string& name, std::vector<std::int64_t> shape) {
    std::size_t n = 1;
    for (auto s : shape) n *= static_cast<std::size_t>(s);
    // bf16 in the file, to exercise conversion; the expectation is the widened bf16.
    const auto v = random_values<bf16>(rng, n);
    writer.add(name, shape, v);
    values[name] = converted<float>(v);
  }
  std::vector<float> rows(const std::string& name, std::size_t row_begin, std::size_t rows, std::size_t cols) const {
    const auto& v = values.at(name);
    return std::vector<float>(v.begin() + row_begin * cols, v.begin() + (row_begin + rows) * cols);
  }
};

}  // namespace

TEST_CASE("model_loading: Llama and Yi weight names, tied embeddings, shape checks against the config") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  for (const char* arch : {"LlamaForCausalLM", "YiForCausalLM"}) {
    CAPTURE(arch);
    const bool yi = std::string(arch) == "YiForCausalLM";
    TempDir dir;
    write_file(dir / "config.json", tiny_llama_config(arch, R"(, "tie_word_embeddings": true)"));
    const ModelConfig cfg = load_model_config(dir.path());
    CHECK(cfg.source == (dir / "config.json").string());
    Checkpoint ck(seed);
    ck.add("model.embed_tokens.weight", {kVocab, kHidden});
    ck.add("model.norm.weight", {kHidden});
    for (int l = 0; l < kLayers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      ck.add(p + (yi ? "ln1.weight" : "input_layernorm.weight"), {kHidden});
      ck.add(p + (yi ? "ln2.weight" : "post_attention_layernorm.weight"), {kHidden});
      ck.add(p + "self_attn.q_proj.weight", {kHeads * kHeadDim, kHidden});
      ck.add(p + "self_attn.k_proj.weight", {kKvHeads * kHeadDim, kHidden});
      ck.add(p + "self_attn.v_proj.weight", {kKvHeads * kHeadDim, kHidden});
      ck.add(p + "self_attn.o_proj.weight", {kHidden, kHeads * kHeadDim});
      ck.add(p + "mlp.gate_proj.weight", {kInter, kHidden});
      ck.add(p + "mlp.up_proj.weight", {kInter, kHidden});
      ck.add(p + "mlp.down_proj.weight", {kHidden, kInter});
    }
    ck.writer.write(dir / "model.safetensors");
    const WeightStore store(dir.path());
    CHECK_NOTHROW(check_weights(store, cfg));

    const ModelWeights mw = model_weights(cfg);
    CHECK(mw.lm_head.tensor == "model.embed_tokens.weight");  // tied
    CHECK(load_weight<float>(store, mw.lm_head) == ck.values["model.embed_tokens.weight"]);
    for (int l = 0; l < kLayers; ++l) {
      const LayerWeights lw = layer_weights(cfg, l);
      CHECK(lw.q_bias.empty());
      CHECK(lw.all().size() == 9);
      for (const WeightRef& w : lw.all()) {
        CAPTURE(w.tensor);
        CHECK(!w.is_slice());
        CHECK(load_weight<float>(store, w) == ck.values.at(w.tensor));
      }
    }
    check_error([&] { layer_weights(cfg, kLayers); }, {"layer=2", "num_layers=2"});
  }

  // A k_proj that disagrees with num_key_value_heads, and a missing tensor.
  TempDir dir;
  write_file(dir / "config.json", tiny_llama_config("LlamaForCausalLM"));
  const ModelConfig cfg = load_model_config(dir.path());
  Checkpoint ck(seed);
  for (const WeightRef& w : model_weights(cfg).all()) ck.add(w.tensor, {w.tensor_shape.begin(), w.tensor_shape.end()});
  for (int l = 0; l < kLayers; ++l)
    for (const WeightRef& w : layer_weights(cfg, l).all()) {
      std::vector<std::int64_t> shape(w.tensor_shape.begin(), w.tensor_shape.end());
      if (w.tensor == "model.layers.1.self_attn.k_proj.weight") shape[0] = kHeads * kHeadDim;
      if (w.tensor != "model.layers.1.mlp.down_proj.weight") ck.add(w.tensor, shape);
    }
  ck.writer.write(dir / "model.safetensors");
  const WeightStore store(dir.path());
  check_error([&] { check_weights(store, cfg); },
              {"model.safetensors", "tensor 'model.layers.1.self_attn.k_proj.weight'", "shape [32, 32]",
               "config.json", "[num_kv_heads*head_dim, hidden_size] = [16, 32]"});
  check_error([&] { check_weight(store, cfg, layer_weights(cfg, 1).down_proj); },
              {"tensor 'model.layers.1.mlp.down_proj.weight' not found", dir.path().string()});
}

TEST_CASE("model_loading: GLM-4 fused query_key_value and dense_h_to_4h are split by rows") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  TempDir dir;
  write_file(dir / "config.json", R"({"architectures": ["ChatGLMModel"], "model_type": "chatglm",
    "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "multi_query_attention": true,
    "multi_query_group_num": 2, "kv_channels": 8, "ffn_hidden_size": 48, "padded_vocab_size": 40,
    "add_qkv_bias": true, "add_bias_linear": false, "rmsnorm": true, "post_layer_norm": true,
    "layernorm_epsilon": 1e-5, "rope_ratio": 1})");
  const ModelConfig cfg = load_model_config(dir.path());
  CHECK(cfg.rope.rotary_dim == 4);
  Checkpoint ck(seed);
  const int qkv_rows = (kHeads + 2 * kKvHeads) * kHeadDim;
  ck.add("transformer.embedding.word_embeddings.weight", {kVocab, kHidden});
  ck.add("transformer.encoder.final_layernorm.weight", {kHidden});
  ck.add("transformer.output_layer.weight", {kVocab, kHidden});
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = "transformer.encoder.layers." + std::to_string(l) + ".";
    ck.add(p + "input_layernorm.weight", {kHidden});
    ck.add(p + "post_attention_layernorm.weight", {kHidden});
    ck.add(p + "self_attention.query_key_value.weight", {qkv_rows, kHidden});
    ck.add(p + "self_attention.query_key_value.bias", {qkv_rows});
    ck.add(p + "self_attention.dense.weight", {kHidden, kHeads * kHeadDim});
    ck.add(p + "mlp.dense_h_to_4h.weight", {2 * kInter, kHidden});
    ck.add(p + "mlp.dense_4h_to_h.weight", {kHidden, kInter});
  }
  // Two shards with an index, as THUDM ships GLM-4.
  SafetensorsWriter first, second;
  for (const auto& e : ck.writer.entries())
    (e.name.find("layers.1.") == std::string::npos ? first : second).add_raw(e.name, e.dtype, e.shape, e.bytes);
  first.write(dir / "model-00001-of-00002.safetensors");
  second.write(dir / "model-00002-of-00002.safetensors");
  std::string map;
  for (const auto& e : first.entries()) map += (map.empty() ? "\"" : ",\"") + e.name + "\":\"model-00001-of-00002.safetensors\"";
  for (const auto& e : second.entries()) map += ",\"" + e.name + "\":\"model-00002-of-00002.safetensors\"";
  write_file(dir / "model.safetensors.index.json", "{\"weight_map\":{" + map + "}}");

  const WeightStore store(dir.path());
  CHECK(store.num_files() == 2);
  CHECK_NOTHROW(check_weights(store, cfg));
  const ModelWeights mw = model_weights(cfg);
  CHECK(load_weight<float>(store, mw.lm_head) == ck.values["transformer.output_layer.weight"]);
  CHECK(load_weight<float>(store, mw.final_norm) == ck.values["transformer.encoder.final_layernorm.weight"]);
  for (int l = 0; l < kLayers; ++l) {
    CAPTURE(l);
    const LayerWeights lw = layer_weights(cfg, l);
    const std::string p = "transformer.encoder.layers." + std::to_string(l) + ".";
    const std::string qkv = p + "self_attention.query_key_value.weight", qkv_bias = p + "self_attention.query_key_value.bias";
    const std::size_t q = kHeads * kHeadDim, kv = kKvHeads * kHeadDim;
    // q | k | v by rows of the fused weight and bias.
    CHECK(lw.q_proj.is_slice());
    CHECK(load_weight<float>(store, lw.q_proj) == ck.rows(qkv, 0, q, kHidden));
    CHECK(load_weight<float>(store, lw.k_proj) == ck.rows(qkv, q, kv, kHidden));
    CHECK(load_weight<float>(store, lw.v_proj) == ck.rows(qkv, q + kv, kv, kHidden));
    CHECK(load_weight<float>(store, lw.q_bias) == ck.rows(qkv_bias, 0, q, 1));
    CHECK(load_weight<float>(store, lw.k_bias) == ck.rows(qkv_bias, q, kv, 1));
    CHECK(load_weight<float>(store, lw.v_bias) == ck.rows(qkv_bias, q + kv, kv, 1));
    // gate | up by rows of dense_h_to_4h (GLM-4's SwiGLU: silu(first half) * second half).
    const std::string h4h = p + "mlp.dense_h_to_4h.weight";
    CHECK(load_weight<float>(store, lw.gate_proj) == ck.rows(h4h, 0, kInter, kHidden));
    CHECK(load_weight<float>(store, lw.up_proj) == ck.rows(h4h, kInter, kInter, kHidden));
    CHECK(load_weight<float>(store, lw.down_proj) == ck.values[p + "mlp.dense_4h_to_h.weight"]);
    CHECK(load_weight<float>(store, lw.o_proj) == ck.values[p + "self_attention.dense.weight"]);
    CHECK(lw.o_bias.empty());
    // A buffer of the wrong size is refused.
    std::vector<float> small(3);
    check_error([&] { load_weight<float>(store, lw.k_proj, std::span<float>(small)); }, {"out holds 3", "query_key_value"});
  }
}

TEST_CASE("model_loading: transformers' GlmForCausalLM and Qwen2 naming") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  {
    const ModelConfig cfg = parse(tiny_llama_config("GlmForCausalLM", R"(, "head_dim": 8)"));
    const LayerWeights lw = layer_weights(cfg, 1);
    CHECK(lw.gate_proj.tensor == "model.layers.1.mlp.gate_up_proj.weight");
    CHECK(lw.up_proj.tensor == "model.layers.1.mlp.gate_up_proj.weight");
    CHECK(lw.gate_proj.row_begin == 0);
    CHECK(lw.up_proj.row_begin == kInter);
    CHECK(lw.up_proj.tensor_shape == std::vector<index_t>{2 * kInter, kHidden});
    CHECK(lw.q_bias.tensor == "model.layers.1.self_attn.q_proj.bias");
    CHECK(lw.o_bias.empty());
    CHECK(model_weights(cfg).lm_head.tensor == "lm_head.weight");

    TempDir dir;
    Checkpoint ck(seed);
    ck.add("model.layers.1.mlp.gate_up_proj.weight", {2 * kInter, kHidden});
    ck.writer.write(dir / "model.safetensors");
    const WeightStore store(dir.path());
    CHECK(load_weight<float>(store, lw.up_proj) == ck.rows("model.layers.1.mlp.gate_up_proj.weight", kInter, kInter, kHidden));
  }
  {
    const ModelConfig cfg = parse(tiny_llama_config("Qwen2ForCausalLM"));
    const LayerWeights lw = layer_weights(cfg, 0);
    CHECK(lw.q_bias.tensor == "model.layers.0.self_attn.q_proj.bias");
    CHECK(lw.k_bias.shape == std::vector<index_t>{kKvHeads * kHeadDim});
    CHECK(lw.v_bias.tensor == "model.layers.0.self_attn.v_proj.bias");
    CHECK(lw.o_bias.empty());
    CHECK(lw.all().size() == 12);
  }
}

TEST_SUITE_END();
