// Tokenizers: GPT-2's byte alphabet, the code point classes, the three pre-tokenizer splits on
// hand-checked strings, a hand-written byte-level BPE tokenizer.json whose ids are worked out
// by hand in the comments, round trips of random UTF-8 (emoji, CJK, special tokens, invalid
// bytes), errors naming the file and field, the byte tokenizer and the folder factory.

#include <algorithm>

#include <shadowkv/model/model.hpp>

#include "safetensors_writer.hpp"
#include "test_util.hpp"

using namespace shadowkv;
using namespace shadowkv::model;
using skv_test::error_message;
using skv_test::TempDir;
using skv_test::write_file;

TEST_SUITE_BEGIN("tokenizer");

namespace {

using Ids = std::vector<token_id>;

using skv_test::check_error;
using skv_test::contains;

/// GPT-2's byte alphabet, written here from its definition (independently of unicode.hpp):
/// printable Latin-1 bytes stand for themselves, the others take U+0100, U+0101, ... in order.
std::string spell(unsigned char byte) {
  int next = 0x100;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const int cp = printable ? b : next++;
    if (b == byte) {
      std::string out;
      if (cp < 0x80) {
        out += static_cast<char>(cp);
      } else {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      }
      return out;
    }
  }
  return {};
}

std::string spell(std::string_view bytes) {
  std::string out;
  for (char c : bytes) out += spell(static_cast<unsigned char>(c));
  return out;
}

const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

/// The hand-written tokenizer: ids 0..255 are the bytes (id = byte value, spelled in GPT-2's
/// alphabet: ' ' is "Ġ"), then 14 merges making ids 256..269 in rank order, a vocabulary-only
/// token "lower" (270, reachable only through ignore_merges), and three added tokens.
nlohmann::json hand_tokenizer(const char* regex = kLlama3Regex) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[spell(static_cast<unsigned char>(b))] = b;
  const char* merged[] = {"Ġt", "he", "Ġthe", "lo", "low", "er", "Ġlow", "Ġlower", "in", "ing", "12"};
  for (int i = 0; i < 11; ++i) vocab[merged[i]] = 256 + i;
  vocab[spell("\xE4\xB8")] = 267;      // "ä¸": the first two bytes of 中 (E4 B8 AD)
  vocab[spell("\xE4\xB8\xAD")] = 268;  // "ä¸Ń": 中
  vocab["ĠĠ"] = 269;
  vocab["lower"] = 270;
  nlohmann::json merges = {"Ġ t", "h e", "Ġt he", "l o", "lo w", "e r", "Ġ low", "Ġlow er", "i n", "in g", "1 2",
                           spell("\xE4") + " " + spell("\xB8"), spell("\xE4\xB8") + " " + spell("\xAD"),
                           nlohmann::json::array({"Ġ", "Ġ"})};  // the newer [a, b] form
  nlohmann::json t = {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 300}, {"content", "<|begin|>"}, {"special", true}, {"lstrip", false}, {"rstrip", false},
         {"single_word", false}, {"normalized", false}},
        {{"id", 301}, {"content", "<|end|>"}, {"special", true}},
        {{"id", 302}, {"content", "<tool>"}, {"special", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"byte_fallback", false},
        {"ignore_merges", false}, {"vocab", vocab}, {"merges", merges}}},
  };
  return t;
}

BpeTokenizer hand_bpe(const nlohmann::json& json) { return BpeTokenizer::from_json(json, "tokenizer.json"); }

std::vector<std::string> pieces(std::string_view text, SplitPattern p) {
  std::vector<std::string> out;
  for (std::string_view s : model::detail::split_pieces(text, p)) out.emplace_back(s);
  return out;
}

/// Random text from fragments that exercise every branch: ASCII words and digits,
/// contractions, whitespace runs with newlines, punctuation, accented Latin, Cyrillic, CJK,
/// emoji (with modifiers and ZWJ sequences), combining marks, the special tokens themselves.
std::string random_text(std::mt19937_64& rng) {
  static const char* fragments[] = {
      "the", "lower", "The", "singing", "12345", "7", " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "don't",
      "!", "?!", "...", "(x)", "é", "ß", "Ωμέγα", "Привет", "中文", "日本語", "한국어", "😀", "👍🏽",
      "👨‍👩‍👧", "e\u0301", "\u00a0", "\u3000", "١٢٣", "１２", "½", "<|begin|>", "<|end|>", "<tool>", "<|",
      "|>", "<", "中", "ä¸", "\xE4",
  };
  std::uniform_int_distribution<int> len(0, 24), pick(0, static_cast<int>(std::size(fragments)) - 1);
  std::string s;
  for (int i = len(rng); i > 0; --i) s += fragments[pick(rng)];
  return s;
}

}  // namespace

TEST_CASE("tokenizer: GPT-2's byte alphabet") {
  const auto& table = unicode::byte_to_unicode();
  CHECK(table[' '] == U'\u0120');   // 'Ġ'
  CHECK(table['\n'] == U'\u010A');  // 'Ċ'
  CHECK(table[0] == U'\u0100');
  CHECK(table[0x7F] == U'\u0121');  // after the 33 bytes 0x00..0x20
  CHECK(table[0xAD] == U'\u0143');  // soft hyphen: the last one remapped, 'Ń'
  CHECK(table['A'] == U'A');
  CHECK(table[0xE4] == U'\u00E4');
  for (int b = 0; b < 256; ++b) {
    CAPTURE(b);
    CHECK(unicode::unicode_to_byte(table[b]) == b);
    CHECK(unicode::bytes_to_byte_level(std::string(1, static_cast<char>(b))) == spell(static_cast<unsigned char>(b)));
  }
  CHECK(unicode::unicode_to_byte(U'\u0144') == -1);
  CHECK(unicode::unicode_to_byte(U' ') == -1);
}

TEST_CASE("tokenizer: code point classes and UTF-8 decoding") {
  using unicode::CharClass;
  using unicode::classify;
  CHECK(classify(U'a') == CharClass::letter);
  CHECK(classify(U'é') == CharClass::letter);
  CHECK(classify(U'Ж') == CharClass::letter);
  CHECK(classify(U'中') == CharClass::letter);
  CHECK(classify(U'ー') == CharClass::letter);  // katakana prolonged sound mark (Lm)
  CHECK(classify(U'7') == CharClass::number);
  CHECK(classify(U'٣') == CharClass::number);
  CHECK(classify(U'１') == CharClass::number);
  CHECK(classify(U'½') == CharClass::number);
  CHECK(classify(U'Ⅻ') == CharClass::number);
  CHECK(classify(U'①') == CharClass::number);
  CHECK(classify(U' ') == CharClass::whitespace);
  CHECK(classify(U'\u00A0') == CharClass::whitespace);
  CHECK(classify(U'\u3000') == CharClass::whitespace);
  CHECK(classify(U'\u2028') == CharClass::whitespace);
  CHECK(classify(U'!') == CharClass::other);
  CHECK(classify(U'，') == CharClass::other);
  CHECK(classify(U'。') == CharClass::other);
  CHECK(classify(U'€') == CharClass::other);
  CHECK(classify(U'\u0301') == CharClass::other);  // combining acute
  CHECK(classify(U'\u200D') == CharClass::other);  // zero-width joiner
  CHECK(classify(U'😀') == CharClass::other);
  CHECK(classify(U'\uFE0F') == CharClass::other);  // variation selector
  CHECK(classify(U'\u094D') == CharClass::other);  // Devanagari virama
  CHECK(classify(U'क') == CharClass::letter);

  const std::string text = "a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80\xC3(\xE4\xB8";
  const std::pair<char32_t, int> expected[] = {{U'a', 1}, {U'é', 2}, {U'中', 3}, {U'😀', 4},
                                               {0xC3, 1},  {U'(', 1}, {0xE4, 1},  {0xB8, 1}};
  std::size_t pos = 0;
  for (const auto& [cp, len] : expected) {
    const auto u = unicode::decode_utf8(text, pos);
    CHECK(u.cp == cp);
    CHECK(u.length == len);
    pos += u.length;
  }
  CHECK(pos == text.size());
  CHECK(!unicode::decode_utf8("\xC0\xAF", 0).valid);      // overlong '/'
  CHECK(!unicode::decode_utf8("\xED\xA0\x80", 0).valid);  // surrogate
}

TEST_CASE("tokenizer: the Llama-3, Qwen2 and GPT-2 splits on hand-checked strings") {
  const std::string s = "Hello world's 12345 foo!!\n\n  bar\tbaz  ";
  CHECK(pieces(s, SplitPattern::llama3) == std::vector<std::string>{"Hello", " world", "'s", " ", "123", "45", " foo",
                                                                     "!!\n\n", " ", " bar", "\tbaz", "  "});
  CHECK(pieces(s, SplitPattern::qwen2) == std::vector<std::string>{"Hello", " world", "'s", " ", "1", "2", "3", "4",
                                                                    "5", " foo", "!!\n\n", " ", " bar", "\tbaz", "  "});
  CHECK(pieces(s, SplitPattern::gpt2) == std::vector<std::string>{"Hello", " world", "'s", " 12345", " foo", "!!",
                                                                   "\n\n ", " bar", "\t", "baz", "  "});
  const std::string t = "你好😀😀 ok DON'T";
  CHECK(pieces(t, SplitPattern::llama3) == std::vector<std::string>{"你好", "😀😀", " ok", " DON", "'T"});
  CHECK(pieces(t, SplitPattern::gpt2) == std::vector<std::string>{"你好", "😀😀", " ok", " DON", "'", "T"});
  CHECK(pieces(t, SplitPattern::none) == std::vector<std::string>{t});
  CHECK(pieces("", SplitPattern::llama3).empty());
  // Invalid UTF-8 bytes are "other" characters of one byte.
  CHECK(pieces("ab\xFF\xFE cd", SplitPattern::llama3) == std::vector<std::string>{"ab", "\xFF\xFE", " cd"});
}

TEST_CASE("tokenizer: byte-level BPE ids worked out by hand") {
  const BpeTokenizer tok = hand_bpe(hand_tokenizer());
  CHECK(tok.split_pattern() == SplitPattern::llama3);
  CHECK(tok.vocab_size() == 303);
  CHECK(tok.num_merges() == 14);
  CHECK(tok.kind() == "byte-level BPE");

  // "the" | " lower". "the": t h e -> (h,e) rank 1 -> [t, he] = [116, 257].
  // " lower": Ġ l o w e r -> (l,o) r3 -> lo; (lo,w) r4 -> low; (e,r) r5 -> er; (Ġ,low) r6 -> Ġlow;
  // (Ġlow,er) r7 -> Ġlower = 263.
  CHECK(tok.encode("the lower") == Ids{116, 257, 263});
  // " the": (Ġ,t) r0 -> Ġt; (h,e) r1 -> he; (Ġt,he) r2 -> Ġthe = 258.
  CHECK(tok.encode(" the") == Ids{258});
  // "singing" | " " | "123" | "45". singing: (i,n) r8 at both places, leftmost first, then
  // (in,g) r9 twice: [s, ing, ing]. " " before a digit stays alone. "123": (1,2) r10 -> [12, 3].
  CHECK(tok.encode("singing 12345") == Ids{115, 265, 265, 32, 266, 51, 52, 53});
  // Added tokens first, then "中文" (中 = E4 B8 AD merges to 268 through ä¸ = 267; 文 = E6 96 87
  // has no merges) and " lower".
  CHECK(tok.encode("<|begin|>中文 lower<|end|>") == Ids{300, 268, 0xE6, 0x96, 0x87, 263, 301});
  // Three spaces before a letter: "  " (merged by the [a, b] rule 13 to 269) then " y".
  CHECK(tok.encode("x   y") == Ids{120, 269, 32, 121});
  // Contractions, case-insensitive in the Llama-3 pattern: "DON" | "'T".
  CHECK(tok.encode("don't") == Ids{100, 111, 110, 39, 116});
  CHECK(tok.encode("DON'T") == Ids{68, 79, 78, 39, 84});
  // "lower" without the space: l o w e r -> lo, low, er: [260, 261] (no merge makes 270).
  CHECK(tok.encode("lower") == Ids{260, 261});
  // A non-special added token in the middle of a word.
  CHECK(tok.encode("a<tool>b") == Ids{97, 302, 98});
  CHECK(tok.encode("").empty());

  CHECK(tok.decode(Ids{300, 268, 0xE6, 0x96, 0x87, 263, 301}) == "<|begin|>中文 lower<|end|>");
  CHECK(tok.decode(Ids{300, 268, 263, 301}, /*skip_special=*/true) == "中 lower");
  CHECK(tok.decode(Ids{302}, true) == "<tool>");  // not special: kept
  CHECK(tok.is_special(300));
  CHECK(!tok.is_special(302));
  CHECK(!tok.is_special(263));
  CHECK(tok.token_to_id("Ġlower") == 263);
  CHECK(tok.token_to_id("<|end|>") == 301);
  CHECK(!tok.token_to_id("nope").has_value());
  CHECK(tok.token_bytes(258) == " the");
  check_error([&] { (void)tok.decode(Ids{280}); }, {"token id 280", "not assigned"});
  check_error([&] { (void)tok.decode(Ids{-1}); }, {"token id -1"});
  check_error([&] { (void)tok.decode(Ids{303}); }, {"token id 303"});

  // Qwen2: digits one by one, so (1,2) never applies.
  const BpeTokenizer qwen = hand_bpe(hand_tokenizer(kQwen2Regex));
  CHECK(qwen.split_pattern() == SplitPattern::qwen2);
  CHECK(qwen.encode("singing 12345") == Ids{115, 265, 265, 32, 49, 50, 51, 52, 53});

  // ignore_merges: a piece that is a vocabulary token is taken whole.
  nlohmann::json j = hand_tokenizer();
  j["model"]["ignore_merges"] = true;
  CHECK(hand_bpe(j).encode("lower") == Ids{270});
  CHECK(hand_bpe(j).encode("the lower") == Ids{116, 257, 263});  // "the" is not a token: merged
}

TEST_CASE("tokenizer: GPT-2 style ByteLevel (use_regex, add_prefix_space) and lstrip/rstrip added tokens") {
  nlohmann::json j = hand_tokenizer();
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  j["added_tokens"].push_back({{"id", 303}, {"content", "<pad>"}, {"special", true}, {"lstrip", true}, {"rstrip", true}});
  const BpeTokenizer tok = hand_bpe(j);
  CHECK(tok.split_pattern() == SplitPattern::gpt2);
  CHECK(tok.add_prefix_space());
  // " the lower" after the prefix space: " the" | " lower".
  CHECK(tok.encode("the lower") == Ids{258, 263});
  CHECK(tok.pre_tokenize("the 12") == std::vector<std::string>{" the", " 12"});
  // lstrip/rstrip: the spaces around <pad> belong to it; each side is its own segment (and
  // gets its prefix space).
  CHECK(tok.encode("the  <pad>  the") == Ids{258, 303, 258});
  CHECK(tok.decode(tok.encode("the  <pad>  the")) == " the<pad> the");  // stripped spaces are gone
}

TEST_CASE("tokenizer: decode(encode(s)) == s for random UTF-8 with emoji, CJK and special tokens") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const BpeTokenizer llama = hand_bpe(hand_tokenizer());
  const BpeTokenizer qwen = hand_bpe(hand_tokenizer(kQwen2Regex));
  nlohmann::json gpt2_json = hand_tokenizer();
  gpt2_json["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  const BpeTokenizer gpt2 = hand_bpe(gpt2_json);
  for (int i = 0; i < 300; ++i) {
    const std::string s = random_text(rng);
    CAPTURE(s);
    for (const BpeTokenizer* tok : {&llama, &qwen, &gpt2}) {
      const Ids ids = tok->encode(s);
      CHECK(tok->decode(ids) == s);
      // Special tokens in the text come out as their ids, never as pieces of text.
      const bool has_begin = s.find("<|begin|>") != std::string::npos;
      CHECK(has_begin == (std::find(ids.begin(), ids.end(), 300) != ids.end()));
    }
    // The pre-tokenizer pieces cover the text exactly.
    std::string joined;
    for (const std::string& p : llama.pre_tokenize(s)) joined += p;
    CHECK(joined == s);
  }
  // Arbitrary bytes (invalid UTF-8 included) round-trip too.
  std::uniform_int_distribution<int> byte(0, 255);
  for (int i = 0; i < 100; ++i) {
    std::string s(static_cast<std::size_t>(byte(rng) % 40), '\0');
    for (char& c : s) c = static_cast<char>(byte(rng));
    CHECK(llama.decode(llama.encode(s)) == s);
  }
}

TEST_CASE("tokenizer: malformed tokenizer.json errors name the file and the field") {
  struct Case {
    const char* what;
    void (*mutate)(nlohmann::json&);
    std::vector<std::string> needles;
  };
  const Case cases[] = {
      {"model type", [](nlohmann::json& j) { j["model"]["type"] = "WordPiece"; },
       {"field 'model.type'", "WordPiece"}},
      {"sentencepiece bpe", [](nlohmann::json& j) { j["model"]["byte_fallback"] = true; },
       {"field 'model.byte_fallback'", "SentencePiece"}},
      {"no model", [](nlohmann::json& j) { j.erase("model"); }, {"field 'model' is missing"}},
      {"no vocab", [](nlohmann::json& j) { j["model"].erase("vocab"); }, {"field 'model.vocab' is missing"}},
      {"vocab id not an integer", [](nlohmann::json& j) { j["model"]["vocab"]["he"] = "x"; },
       {"field 'model.vocab.he'", "has id \"x\""}},
      {"duplicate id", [](nlohmann::json& j) { j["model"]["vocab"]["he"] = 256; }, {"field 'model.vocab.", "256"}},
      {"token outside the byte alphabet", [](nlohmann::json& j) { j["model"]["vocab"]["a b"] = 290; },
       {"field 'model.vocab.a b'", "byte-level alphabet"}},
      {"missing byte", [](nlohmann::json& j) { j["model"]["vocab"].erase("A"); },
       {"model.vocab", "no token for byte 65"}},
      {"merge of an unknown token", [](nlohmann::json& j) { j["model"]["merges"][3] = "l zz"; },
       {"field 'model.merges[3]'", "'zz'"}},
      {"merge making an unknown token", [](nlohmann::json& j) { j["model"]["merges"][3] = "l q"; },
       {"field 'model.merges[3]'", "makes 'lq'"}},
      {"malformed merge", [](nlohmann::json& j) { j["model"]["merges"][0] = "Ġt"; },
       {"field 'model.merges[0]'", "two tokens"}},
      {"merge of the wrong type", [](nlohmann::json& j) { j["model"]["merges"][0] = 5; },
       {"field 'model.merges[0]'", "expected"}},
      {"added token without id", [](nlohmann::json& j) { j["added_tokens"][1].erase("id"); },
       {"field 'added_tokens[1].id' is missing"}},
      {"added token content", [](nlohmann::json& j) { j["added_tokens"][0]["content"] = 3; },
       {"field 'added_tokens[0].content' is an integer"}},
      {"normalizer", [](nlohmann::json& j) { j["normalizer"] = {{"type", "Lowercase"}}; },
       {"field 'normalizer.type'", "Lowercase"}},
      {"unknown regex",
       [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+"; },
       {"field 'pre_tokenizer.pretokenizers[0].pattern.Regex'", "\\w+"}},
      {"split behaviour", [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
       {"field 'pre_tokenizer.pretokenizers[0].behavior'", "Removed"}},
      {"other pre-tokenizer", [](nlohmann::json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; },
       {"field 'pre_tokenizer.type'", "Metaspace"}},
      {"no byte level", [](nlohmann::json& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); },
       {"pre_tokenizer", "no ByteLevel"}},
      {"no pre-tokenizer", [](nlohmann::json& j) { j["pre_tokenizer"] = nullptr; }, {"field 'pre_tokenizer' is missing"}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    nlohmann::json j = hand_tokenizer();
    c.mutate(j);
    const std::string what = error_message([&] { hand_bpe(j); });
    CAPTURE(what);
    CHECK(contains(what, "tokenizer.json"));
    for (const std::string& n : c.needles) {
      CAPTURE(n);
      CHECK(contains(what, n));
    }
  }
  // An NFC normalizer is accepted (the text is taken as given).
  nlohmann::json nfc = hand_tokenizer();
  nfc["normalizer"] = {{"type", "NFC"}};
  CHECK_NOTHROW(hand_bpe(nfc));
  // Files: missing, invalid JSON.
  TempDir dir;
  check_error([&] { BpeTokenizer::from_file(dir / "tokenizer.json"); }, {(dir / "tokenizer.json").string(), "cannot open"});
  write_file(dir / "tokenizer.json", "{\"model\": {");
  check_error([&] { BpeTokenizer::from_file(dir / "tokenizer.json"); }, {(dir / "tokenizer.json").string(), "invalid JSON"});
}

TEST_CASE("tokenizer: the byte tokenizer and the folder factory") {
  const std::uint64_t seed = skv_test::test_seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const ByteTokenizer bytes;
  CHECK(bytes.vocab_size() == 258);
  CHECK(bytes.encode("A\xC3\xA9") == Ids{65, 0xC3, 0xA9});
  CHECK(bytes.decode(Ids{256, 104, 105, 257}) == "hi");  // bos/eos have no text
  CHECK(bytes.is_special(256));
  check_error([&] { (void)bytes.decode(Ids{258}); }, {"token id 258"});
  check_error([&] { ByteTokenizer bad(255, 300); }, {"bos=255"});
  for (int i = 0; i < 100; ++i) {
    const std::string s = random_text(rng);
    CHECK(bytes.decode(bytes.encode(s)) == s);
  }

  const std::string tiny_config = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 260,
    "bos_token_id": 258, "eos_token_id": 259)";
  {
    TempDir dir;  // the project's own small model: config says bytes, no tokenizer.json
    write_file(dir / "config.json", tiny_config + R"(, "shadowkv_tokenizer": "bytes"})");
    const auto tok = load_tokenizer(dir.path());
    CHECK(tok->kind() == "bytes");
    CHECK(tok->vocab_size() == 260);
    CHECK(tok->is_special(258));
    CHECK(tok->is_special(259));
    CHECK(tok->decode(tok->encode("héllo 中")) == "héllo 中");
  }
  {
    TempDir dir;  // tokenizer.json wins
    write_file(dir / "config.json", tiny_config + "}");
    write_file(dir / "tokenizer.json", hand_tokenizer().dump());
    const auto tok = load_tokenizer(dir.path());
    CHECK(tok->kind() == "byte-level BPE");
    CHECK(tok->encode("the lower") == Ids{116, 257, 263});
  }
  {
    TempDir dir;  // neither
    write_file(dir / "config.json", tiny_config + "}");
    check_error([&] { load_tokenizer(dir.path()); }, {dir.path().string(), "no tokenizer.json", "shadowkv_tokenizer"});
    write_file(dir / "config.json", tiny_config + R"(, "shadowkv_tokenizer": "sentencepiece"})");
    check_error([&] { load_tokenizer(dir.path()); }, {"config.json", "field 'shadowkv_tokenizer'", "sentencepiece"});
    std::filesystem::remove(dir / "config.json");
    check_error([&] { load_tokenizer(dir.path()); }, {dir.path().string(), "neither tokenizer.json nor config.json"});
  }
  {
    TempDir dir;  // byte tokenizer with a bos inside the byte range
    write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 260,
      "bos_token_id": 1, "eos_token_id": 259, "shadowkv_tokenizer": "bytes"})");
    check_error([&] { load_tokenizer(dir.path()); }, {"config.json", "bos_token_id=1", "byte tokenizer"});
  }
}

TEST_SUITE_END();
