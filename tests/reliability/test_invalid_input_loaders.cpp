// Invalid-input tables of the model loaders, on live objects: a SafetensorsFile, a WeightStore
// and a tokenizer are asked for what they do not hold (an unknown tensor, a mismatched dtype,
// rows out of range, a buffer of the wrong size, an unassigned token id) and must answer with
// a shadowkv::Error naming it, then serve the next valid call as before. Files that are
// missing or of the wrong kind are here too; the field-by-field tables of malformed
// safetensors headers, config.json and tokenizer.json are in the cpu.model_loading and
// cpu.tokenizer suites (also labelled `reliability`), and the fuzzers cover the parsers.

#include <shadowkv/model/decoder.hpp>
#include <shadowkv/model/model.hpp>

#include "../safetensors_writer.hpp"
#include "reliability_util.hpp"

using namespace shadowkv;
using namespace shadowkv::model;
using skv_test::BadCall;
using skv_test::run_table;
using skv_test::same_bits;
using skv_test::TempDir;
using skv_test::write_file;

TEST_SUITE_BEGIN("invalid_input");

namespace {

/// A byte-level BPE tokenizer.json: the 256 byte tokens, one merge ("h e" -> "he", id 256) and
/// one special token (id 300).
nlohmann::json small_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[unicode::bytes_to_byte_level(std::string(1, static_cast<char>(b)))] = b;
  vocab["he"] = 256;
  return {
      {"added_tokens", {{{"id", 300}, {"content", "<|end|>"}, {"special", true}}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"h e"}}}},
  };
}

/// A call parsing the small tokenizer.json after `mutate`.
template <class F>
std::function<void()> tokenizer_with(F mutate) {
  return [mutate] {
    nlohmann::json j = small_tokenizer();
    mutate(j);
    (void)BpeTokenizer::from_json(j, "tokenizer.json");
  };
}

const char* kLlamaConfig = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 128,
  "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
  "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2})";

/// A call parsing kLlamaConfig after `mutate`.
template <class F>
std::function<void()> config_with(F mutate) {
  return [mutate] {
    nlohmann::json j = nlohmann::json::parse(kLlamaConfig);
    mutate(j);
    (void)parse_model_config(j, "config.json");
  };
}

}  // namespace

TEST_CASE("invalid_input: safetensors files and folders") {
  TempDir dir;
  const std::vector<float> w = {1.5f, -2.0f, 3.25f, 0.0f, 8.0f, -0.5f};
  const std::vector<std::int64_t> ids = {7, 8, 9};
  skv_test::SafetensorsWriter writer;
  writer.add("w", {2, 3}, w);
  writer.add("ids", {3}, ids);
  writer.add("scalar", {}, std::vector<float>{4.0f});
  writer.write(dir / "model.safetensors");
  const std::string file = (dir / "model.safetensors").string();

  int cases = run_table(
      "SafetensorsFile(path) / WeightStore(folder)",
      {
          {"missing file", [&] { SafetensorsFile f(dir / "nope.safetensors"); }, {"nope.safetensors", "cannot open"}},
          {"a folder", [&] { SafetensorsFile f(dir.path()); }, {dir.path().string(), "not a regular file"}},
          {"missing folder", [&] { WeightStore s(dir / "nope"); }, {"nope", "is not a directory"}},
          {"a file as the folder",
           [&] { WeightStore s(dir / "model.safetensors"); },
           {"model.safetensors", "is not a directory"}},
      });

  const SafetensorsFile f(dir / "model.safetensors");
  const WeightStore store(dir.path());
  auto probe = [&] {
    CHECK(same_bits(f.load<float>("w"), w));
    CHECK(same_bits(store.load<float>("w"), w));
    std::vector<float> row(3);
    store.read_rows<float>("w", 1, 1, row);
    CHECK(row == std::vector<float>{0.0f, 8.0f, -0.5f});
  };
  std::vector<float> five(5), six(6), three(3), one(1);
  std::vector<bf16> three16(3);
  const WeightRef ref = {"w", 0, {2, 3}, {2, 3}, "[2, 3]"};
  cases += run_table(
      "SafetensorsFile / WeightStore / load_weight methods",
      {
          {"info: unknown tensor", [&] { (void)f.info("nope"); }, {file, "tensor 'nope'"}},
          {"bytes: unknown tensor", [&] { (void)f.bytes("nope"); }, {"tensor 'nope'"}},
          {"read: buffer of the wrong size", [&] { f.read<float>("w", five); }, {"tensor 'w'", "holds 5"}},
          {"read: mismatched dtype (I64 into float)",
           [&] { f.read<float>("ids", three); },
           {"tensor 'ids'", "has dtype I64"}},
          {"load: mismatched dtype (I64 into bf16)", [&] { (void)f.load<bf16>("ids"); }, {"tensor 'ids'", "I64"}},
          {"read_rows: past the last row",
           [&] { f.read_rows<float>("w", 1, 2, six); },
           {"tensor 'w'", "no rows [1, 3)"}},
          {"read_rows: negative row", [&] { f.read_rows<float>("w", -1, 1, three); }, {"no rows [-1, 0)"}},
          {"read_rows: negative count", [&] { f.read_rows<float>("w", 1, -1, three); }, {"no rows [1, 0)"}},
          {"read_rows: buffer of the wrong size",
           [&] { f.read_rows<float>("w", 0, 1, five); },
           {"rows [0, 1)", "hold 3 elements", "holds 5"}},
          {"read_rows: a scalar", [&] { f.read_rows<float>("scalar", 0, 1, one); }, {"tensor 'scalar' is a scalar"}},
          {"store: unknown tensor", [&] { (void)store.file_of("nope"); }, {"tensor 'nope' not found"}},
          {"store: mismatched dtype", [&] { store.read<bf16>("ids", three16); }, {"tensor 'ids'", "I64"}},
          {"load_weight: wrong shape",
           [&] {
             (void)load_weight<float>(store, WeightRef{"w", 0, {3, 2}, {3, 2}, "[3, 2]"});
           },
           {"tensor 'w' has shape [2, 3]", "expected [3, 2]"}},
          {"load_weight: buffer of the wrong size",
           [&] { load_weight<float>(store, ref, std::span(five)); },
           {"load_weight: out holds 5"}},
          {"load_weight: empty reference",
           [&] { (void)load_weight<float>(store, WeightRef{}); },
           {"weight reference is empty"}},
      },
      probe);
  MESSAGE("safetensors: ", cases, " invalid calls");
}

TEST_CASE("invalid_input: config.json and tokenizers") {
  TempDir dir;
  int cases = run_table(
      "load_model_config / load_tokenizer / BpeTokenizer::from_file",
      {
          {"missing config.json", [&] { (void)load_model_config(dir.path()); }, {"config.json", "cannot open"}},
          {"config.json not JSON",
           [&] {
             write_file(dir / "config.json", "{\"hidden_size\": ");
             (void)load_model_config(dir / "config.json");
           },
           {"config.json", "invalid JSON"}},
          {"config.json with a number past double (found by fuzzing)",
           [&] {
             write_file(dir / "config.json", "{\"hidden_size\": 1e309}");
             (void)load_model_config(dir / "config.json");
           },
           {"config.json", "invalid JSON", "number overflow"}},
          {"config.json not an object",
           [&] {
             (void)parse_model_config(nlohmann::json::array({1, 2}), "config.json");
           },
           {"config.json", "the top level is an array"}},
          {"a required field missing",
           config_with([](nlohmann::json& j) { j.erase("hidden_size"); }),
           {"field 'hidden_size' is missing"}},
          {"zero heads",
           config_with([](nlohmann::json& j) { j["num_attention_heads"] = 0; }),
           {"field 'num_attention_heads'=0"}},
          {"heads not a multiple of the kv heads",
           config_with([](nlohmann::json& j) {
             j["num_key_value_heads"] = 3;
             j["num_attention_heads"] = 4;
           }),
           {"num_q_heads=4", "num_kv_heads=3"}},
          {"bos outside the vocabulary",
           config_with([](nlohmann::json& j) { j["bos_token_id"] = 300; }),
           {"bos_token_id=300"}},
          {"no tokenizer at all",
           [&] { (void)load_tokenizer(dir / "nowhere"); },
           {"nowhere", "neither tokenizer.json"}},
          {"missing tokenizer.json",
           [&] { (void)BpeTokenizer::from_file(dir / "tokenizer.json"); },
           {"tokenizer.json", "cannot open"}},
          {"tokenizer.json of another model type",
           tokenizer_with([](nlohmann::json& j) { j["model"]["type"] = "Unigram"; }),
           {"field 'model.type'", "Unigram"}},
          {"added token with a negative id",
           tokenizer_with([](nlohmann::json& j) { j["added_tokens"][0]["id"] = -3; }),
           {"field 'added_tokens[0].id'=-3"}},
          {"added token with the id of another token (found by fuzzing)",
           tokenizer_with([](nlohmann::json& j) { j["added_tokens"][0]["id"] = 150; }),  // byte 0x96's id
           {"field 'added_tokens[0].id'=150", "another token"}},
          {"byte tokenizer with a bos among the bytes", [] { ByteTokenizer t(65, 300); }, {"bos=65"}},
          {"byte tokenizer with bos == eos", [] { ByteTokenizer t(300, 300); }, {"bos=300", "eos=300"}},
      });

  const BpeTokenizer bpe = BpeTokenizer::from_json(small_tokenizer(), "tokenizer.json");
  const ByteTokenizer bytes;
  const std::vector<token_id> hello = bpe.encode("hello<|end|>");
  CHECK(hello == std::vector<token_id>{256, 'l', 'l', 'o', 300});
  auto probe = [&] {
    CHECK(bpe.encode("hello<|end|>") == hello);
    CHECK(bpe.decode(hello) == "hello<|end|>");
    CHECK(bytes.decode(bytes.encode("hi")) == "hi");
  };
  const std::vector<token_id> negative = {104, -1}, unassigned = {299}, past = {301}, byte_past = {258};
  cases += run_table(
      "Tokenizer::decode / token_bytes",
      {
          {"bpe: negative id", [&] { (void)bpe.decode(negative); }, {"token id -1"}},
          {"bpe: unassigned id", [&] { (void)bpe.decode(unassigned); }, {"token id 299"}},
          {"bpe: id past the vocabulary", [&] { (void)bpe.decode(past); }, {"token id 301", "vocab_size 301"}},
          {"bpe: token_bytes of a negative id", [&] { (void)bpe.token_bytes(-7); }, {"token id -7"}},
          {"bytes: id past eos", [&] { (void)bytes.decode(byte_past); }, {"token id 258"}},
      },
      probe);
  MESSAGE("config.json and tokenizers: ", cases, " invalid calls");
}

TEST_CASE("invalid_input: the decoder's sampler") {
  std::mt19937_64 rng(7);
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f}, with_nan = {0.5f, NAN, 1.0f},
                           with_inf = {0.5f, INFINITY, 1.0f}, none;
  auto probe = [&] {
    CHECK(sample_token(logits, 0.0, 1.0, rng) == 1);
    const token_id t = sample_token(logits, 0.7, 0.9, rng);
    CHECK((t >= 0 && t < 4));
  };
  const int cases = run_table(
      "sample_token",
      {
          {"NaN temperature", [&] { (void)sample_token(logits, NAN, 1.0, rng); }, {"temperature=nan"}},
          {"infinite temperature", [&] { (void)sample_token(logits, INFINITY, 1.0, rng); }, {"temperature=inf"}},
          {"negative temperature", [&] { (void)sample_token(logits, -1.0, 1.0, rng); }, {"temperature=-1"}},
          {"top_p 0", [&] { (void)sample_token(logits, 1.0, 0.0, rng); }, {"top_p=0"}},
          {"top_p NaN", [&] { (void)sample_token(logits, 1.0, NAN, rng); }, {"top_p=nan"}},
          {"NaN logits", [&] { (void)sample_token(with_nan, 1.0, 1.0, rng); }, {"logits are not finite"}},
          {"infinite logits", [&] { (void)sample_token(with_inf, 1.0, 1.0, rng); }, {"logits are not finite"}},
          {"no logits", [&] { (void)sample_token(none, 1.0, 1.0, rng); }, {"empty logits"}},
      },
      probe);
  MESSAGE("sampler: ", cases, " invalid calls");
}

TEST_SUITE_END();
