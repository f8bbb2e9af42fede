#pragma once
/// \file model/tokenizer.hpp
/// \brief Tokenizers of the example decoders: byte-level BPE from a Hugging Face
/// `tokenizer.json` (as Llama 3 and Qwen2 ship it) and a plain byte vocabulary for the
/// project's own small models, behind one interface, and `load_tokenizer(folder)` choosing
/// between them.
///
/// Byte-level BPE, as Hugging Face tokenizers runs it:
///   1. added tokens (`added_tokens`, special or not) are matched in the raw text first,
///      leftmost and longest, and become their ids;
///   2. the text between them is split into pieces by the pre-tokenizer's regex: the Llama-3
///      pattern (digits in groups of up to three), the Qwen2 pattern (digits one by one) or the
///      GPT-2 pattern (`ByteLevel` with `use_regex`), written out by hand below over the code
///      point classes of unicode.hpp (an approximation of `\p{L}` / `\p{N}` documented there);
///   3. each piece's bytes are spelled in GPT-2's byte alphabet and merged by `model.merges`
///      rank (lowest first, leftmost among equals) into vocabulary ids.
/// `decode` maps ids back to bytes exactly, so `decode(encode(s)) == s` for every string.
/// Added tokens honour `lstrip` / `rstrip` (Unicode whitespace) and `single_word` (letters and
/// digits count as word characters). Text that is not valid UTF-8 (Hugging Face refuses it)
/// is encoded too: each invalid byte is an "other" character of its own.
///
/// Not interpreted: the `post_processor` (no bos is added: the decoder adds what its
/// config.json says), the `decoder` (byte-level decoding is implied), an `NFC` normalizer
/// (accepted; the text is taken as given, so it should already be NFC). Refused with an error
/// naming the field: other model types (WordPiece, Unigram), SentencePiece-style BPE
/// (`byte_fallback`, as Llama 2 and Yi ship it), other normalizers and pre-tokenizers, and
/// split regexes other than the three above.

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "json_reader.hpp"
#include "model_config.hpp"
#include "unicode.hpp"

namespace shadowkv::model {

using token_id = std::int32_t;

/// Text to ids and back. Implementations are immutable after construction: `encode` and
/// `decode` may be called from several threads.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// UTF-8 text (any bytes are accepted) to token ids. Adds no bos/eos.
  virtual std::vector<token_id> encode(std::string_view text) const = 0;

  /// Token ids to text (the raw bytes, which may end in the middle of a UTF-8 sequence when
  /// the ids do). Special tokens are spelled out unless `skip_special`. Throws naming the id
  /// for an id the vocabulary does not assign.
  std::string decode(std::span<const token_id> ids, bool skip_special = false) const {
    std::string out;
    for (token_id id : ids) append_token(id, skip_special, out);
    return out;
  }

  /// One past the largest id this tokenizer assigns.
  virtual token_id vocab_size() const = 0;
  virtual bool is_special(token_id id) const = 0;
  /// "byte-level BPE" or "bytes", for reports.
  virtual std::string_view kind() const = 0;

 protected:
  virtual void append_token(token_id id, bool skip_special, std::string& out) const = 0;
};

// --- the byte tokenizer -----------------------------------------------------------------------

/// Ids 0..255 are the bytes themselves; `bos` and `eos` (>= 256, distinct) are special tokens
/// without text. The project's own small models use it (`"shadowkv_tokenizer": "bytes"`).
class ByteTokenizer final : public Tokenizer {
 public:
  explicit ByteTokenizer(token_id bos = 256, token_id eos = 257) : bos_(bos), eos_(eos) {
    SHADOWKV_CHECK(bos >= 256 && eos >= 256 && bos != eos, "ByteTokenizer: bos=", bos, " and eos=", eos,
                   " must be distinct ids >= 256 (0..255 are the bytes)");
  }

  std::vector<token_id> encode(std::string_view text) const override {
    std::vector<token_id> ids(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  token_id vocab_size() const override { return std::max(bos_, eos_) + 1; }
  bool is_special(token_id id) const override { return id == bos_ || id == eos_; }
  std::string_view kind() const override { return "bytes"; }
  token_id bos_id() const { return bos_; }
  token_id eos_id() const { return eos_; }

 protected:
  void append_token(token_id id, bool, std::string& out) const override {
    if (id >= 0 && id < 256) {
      out += static_cast<char>(id);
      return;
    }
    SHADOWKV_CHECK(is_special(id), "token id ", id, " is not assigned by the byte tokenizer (0..255 bytes, bos=",
                   bos_, ", eos=", eos_, ")");
  }

 private:
  token_id bos_, eos_;
};

// --- byte-level BPE ---------------------------------------------------------------------------

/// The pre-tokenizer splits a byte-level BPE knows.
enum class SplitPattern {
  none,    ///< the whole text is one piece (`ByteLevel` with `use_regex: false`, no Split)
  gpt2,    ///< `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
  llama3,  ///< `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
  qwen2,   ///< the Llama-3 pattern with `\p{N}` (one digit per piece)
};

inline constexpr std::string_view to_string(SplitPattern p) {
  switch (p) {
    case SplitPattern::none: return "none";
    case SplitPattern::gpt2: return "gpt2";
    case SplitPattern::llama3: return "llama3";
    case SplitPattern::qwen2: return "qwen2";
  }
  return "unknown";
}

namespace detail {

/// The pattern a `Split` regex of tokenizer.json spells, or nullopt. Accepts the spellings
/// seen in released files (the contractions written `(?i:'s|...)` or `(?:'[sS]|...)`).
inline std::optional<SplitPattern> recognise_split_regex(std::string_view regex) {
  const std::string tail_words = R"([^\r\n\p{L}\p{N}]?\p{L}+|)";
  const std::string tail_rest = R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  for (const std::string_view contractions :
       {std::string_view(R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|)"),
        std::string_view(R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|)")}) {
    const std::string head = std::string(contractions) + tail_words;
    if (regex == head + R"(\p{N}{1,3})" + tail_rest) return SplitPattern::llama3;
    if (regex == head + R"(\p{N})" + tail_rest) return SplitPattern::qwen2;
  }
  const std::string gpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
  if (regex == gpt2 || regex == gpt2 + R"(|\s+)") return SplitPattern::gpt2;
  return std::nullopt;
}

struct TextUnit {
  std::size_t pos;
  std::uint8_t length;
  unicode::CharClass cls;
  char32_t cp;
};

inline std::vector<TextUnit> text_units(std::string_view text) {
  std::vector<TextUnit> units;
  units.reserve(text.size());
  for (std::size_t pos = 0; pos < text.size();) {
    const unicode::Utf8Unit u = unicode::decode_utf8(text, pos);
    const unicode::CharClass cls = u.valid ? unicode::classify(u.cp) : unicode::CharClass::other;
    units.push_back({pos, u.length, cls, u.valid ? u.cp : 0xFFFD});
    pos += u.length;
  }
  return units;
}

/// Length in units of a contraction ('s 't 're 've 'm 'll 'd) at `i`, or 0.
inline std::size_t contraction_at(const std::vector<TextUnit>& u, std::size_t i, bool ignore_case) {
  if (u[i].cp != U'\'' || i + 1 >= u.size()) return 0;
  auto letter = [&](std::size_t k) -> char32_t {
    if (k >= u.size()) return 0;
    const char32_t c = u[k].cp;
    return ignore_case && c >= U'A' && c <= U'Z' ? c - U'A' + U'a' : c;
  };
  const char32_t a = letter(i + 1), b = letter(i + 2);
  if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return 3;
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return 2;
  return 0;
}

/// Splits `text` into the pieces the regex of `pattern` matches, in order; the pieces cover
/// the text exactly. Each branch below is one alternative of the regex, tried in the regex's
/// order at the current position (the alternatives are written with their backtracking
/// resolved: e.g. `\s+(?!\S)` takes a whitespace run but its last character when a
/// non-space follows).
inline std::vector<std::string_view> split_pieces(std::string_view text, SplitPattern pattern) {
  using unicode::CharClass;
  std::vector<std::string_view> pieces;
  if (text.empty()) return pieces;
  if (pattern == SplitPattern::none) {
    pieces.push_back(text);
    return pieces;
  }
  const std::vector<TextUnit> u = text_units(text);
  const std::size_t n = u.size();
  auto is = [&](std::size_t k, CharClass c) { return k < n && u[k].cls == c; };
  auto is_newline = [&](std::size_t k) { return k < n && (u[k].cp == U'\r' || u[k].cp == U'\n'); };
  auto run = [&](std::size_t k, CharClass c) {
    while (k < n && u[k].cls == c) ++k;
    return k;
  };
  auto emit = [&](std::size_t begin, std::size_t end) {
    const std::size_t b = u[begin].pos;
    const std::size_t e = end < n ? u[end].pos : text.size();
    pieces.push_back(text.substr(b, e - b));
  };
  /// `\s+(?!\S)|\s+` (and, for Llama 3 / Qwen2, `\s*[\r\n]+` before them) at a whitespace `i`.
  auto whitespace = [&](std::size_t i, bool newline_rule) {
    const std::size_t end = run(i, CharClass::whitespace);
    if (newline_rule) {
      std::size_t last_newline = n;
      for (std::size_t k = i; k < end; ++k)
        if (is_newline(k)) last_newline = k;
      if (last_newline != n) return last_newline + 1;
    }
    if (end == n || end - i == 1) return end;
    return end - 1;
  };

  const bool gpt2 = pattern == SplitPattern::gpt2;
  const std::size_t max_digits = pattern == SplitPattern::llama3 ? 3 : 1;
  std::size_t i = 0;
  while (i < n) {
    std::size_t end = 0;
    if (const std::size_t c = contraction_at(u, i, !gpt2)) {
      end = i + c;
    } else if (gpt2) {
      // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`, then whitespace.
      const std::size_t s = u[i].cp == U' ' && i + 1 < n && u[i + 1].cls != CharClass::whitespace ? i + 1 : i;
      if (u[s].cls != CharClass::whitespace)
        end = run(s, u[s].cls);
      else
        end = whitespace(i, false);
    } else if (is(i, CharClass::letter)) {  // `[^\r\n\p{L}\p{N}]?\p{L}+` without the prefix
      end = run(i, CharClass::letter);
    } else if (!is(i, CharClass::number) && !is_newline(i) && is(i + 1, CharClass::letter)) {  // with it
      end = run(i + 1, CharClass::letter);
    } else if (is(i, CharClass::number)) {  // `\p{N}{1,3}` or `\p{N}`
      end = i;
      while (end < n && end - i < max_digits && u[end].cls == CharClass::number) ++end;
    } else if (is(i, CharClass::other) || (u[i].cp == U' ' && is(i + 1, CharClass::other))) {
      // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
      end = run(u[i].cp == U' ' ? i + 1 : i, CharClass::other);
      while (is_newline(end)) ++end;
    } else {  // `\s*[\r\n]+|\s+(?!\S)|\s+`
      end = whitespace(i, true);
    }
    emit(i, end);
    i = end;
  }
  return pieces;
}

/// Whitespace (Unicode White_Space) ending at byte `pos` of `text`, not before `floor`: the
/// byte length of the run, decoding backwards.
inline std::size_t whitespace_before(std::string_view text, std::size_t floor, std::size_t pos) {
  std::size_t start = pos;
  while (start > floor) {
    bool found = false;
    for (std::size_t len = 1; len <= 3 && len <= start - floor && !found; ++len) {
      const unicode::Utf8Unit u = unicode::decode_utf8(text, start - len);
      if (u.valid && u.length == len && unicode::is_whitespace(u.cp)) {
        start -= len;
        found = true;
      }
    }
    if (!found) break;
  }
  return pos - start;
}

inline std::size_t whitespace_after(std::string_view text, std::size_t pos) {
  std::size_t end = pos;
  while (end < text.size()) {
    const unicode::Utf8Unit u = unicode::decode_utf8(text, end);
    if (!u.valid || !unicode::is_whitespace(u.cp)) break;
    end += u.length;
  }
  return end - pos;
}

}  // namespace detail

/// Byte-level BPE from a Hugging Face tokenizer.json (see the file comment).
class BpeTokenizer final : public Tokenizer {
 public:
  /// An entry of tokenizer.json `added_tokens`.
  struct AddedToken {
    std::string content;
    token_id id = 0;
    bool special = false;
    bool lstrip = false;       ///< swallows the whitespace on its left
    bool rstrip = false;       ///< swallows the whitespace on its right
    bool single_word = false;  ///< matches only between non-word characters
  };

  /// Reads and validates `path`; errors name the file and the field.
  static BpeTokenizer from_file(const std::filesystem::path& path) {
    return from_json(detail::read_json_file(path), path.string());
  }

  /// Builds from a parsed tokenizer.json; `source` names it in errors. Throws for a model
  /// that is not byte-level BPE, a vocab entry outside the byte alphabet or with a bad id, a
  /// byte without a token, a merge naming a token (or producing one) not in the vocab, a
  /// malformed added token (or one whose id another token of a different text has), and
  /// unsupported normalizers / pre-tokenizers / split regexes.
  static BpeTokenizer from_json(const nlohmann::json& json, const std::string& source) {
    BpeTokenizer t;
    const JsonObject top(json, source);
    t.parse_model(top.object("model"));
    t.parse_added_tokens(top);
    t.parse_normalizer(top);
    t.parse_pre_tokenizer(top);
    return t;
  }

  std::vector<token_id> encode(std::string_view text) const override {
    std::vector<token_id> ids;
    std::size_t plain_begin = 0;  // start of the text not yet encoded
    std::size_t pos = 0;
    while (pos < text.size()) {
      const AddedMatch m = match_added(text, plain_begin, pos);
      if (!m.token) {
        ++pos;
        continue;
      }
      encode_plain(text.substr(plain_begin, m.begin - plain_begin), ids);
      ids.push_back(m.token->id);
      plain_begin = pos = m.end;
    }
    encode_plain(text.substr(plain_begin), ids);
    return ids;
  }

  /// The pieces the pre-tokenizer cuts `text` into (added tokens are not looked for), as
  /// `encode` sees them: with the prefix space when `add_prefix_space` is set.
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> out;
    const std::string with_prefix = prefixed(text);
    for (std::string_view piece : detail::split_pieces(with_prefix, pattern_)) out.emplace_back(piece);
    return out;
  }

  token_id vocab_size() const override { return static_cast<token_id>(id_bytes_.size()); }
  bool is_special(token_id id) const override {
    return id >= 0 && id < vocab_size() && id_kind_[id] == kSpecial;
  }
  std::string_view kind() const override { return "byte-level BPE"; }

  /// The id of a vocabulary token (in its byte-level spelling, "Ġthe") or of an added token
  /// (its content, "<|eot_id|>"), or nullopt.
  std::optional<token_id> token_to_id(std::string_view token) const {
    for (const AddedToken& a : added_)
      if (a.content == token) return a.id;
    const auto it = vocab_.find(std::string(token));
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

  /// The bytes token `id` stands for.
  const std::string& token_bytes(token_id id) const {
    SHADOWKV_CHECK(id >= 0 && id < vocab_size() && id_kind_[id] != kUnassigned, "token id ", id,
                   " is not assigned by this tokenizer (vocab_size ", vocab_size(), ")");
    return id_bytes_[id];
  }

  SplitPattern split_pattern() const { return pattern_; }
  bool add_prefix_space() const { return add_prefix_space_; }
  std::size_t num_merges() const { return merges_.size(); }
  const std::vector<AddedToken>& added_tokens() const { return added_; }

 protected:
  void append_token(token_id id, bool skip_special, std::string& out) const override {
    const std::string& bytes = token_bytes(id);
    if (skip_special && id_kind_[id] == kSpecial) return;
    out += bytes;
  }

 private:
  static constexpr std::uint8_t kUnassigned = 0, kVocab = 1, kAdded = 2, kSpecial = 3;

  struct Merge {
    std::int32_t rank;
    token_id merged;
  };
  static std::uint64_t pair_key(token_id a, token_id b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  struct AddedMatch {
    const AddedToken* token = nullptr;
    std::size_t begin = 0, end = 0;  ///< bytes consumed, with stripped whitespace
  };

  BpeTokenizer() = default;

  void assign(token_id id, std::string bytes, std::uint8_t kind) {
    if (static_cast<std::size_t>(id) >= id_bytes_.size()) {
      id_bytes_.resize(static_cast<std::size_t>(id) + 1);
      id_kind_.resize(static_cast<std::size_t>(id) + 1, kUnassigned);
    }
    id_bytes_[id] = std::move(bytes);
    id_kind_[id] = kind;
  }

  void parse_model(const JsonObject& model) {
    if (auto type = model.optional_string("type"); type && *type != "BPE")
      model.fail("type", "='", *type, "' is not supported (only byte-level BPE)");
    if (model.boolean("byte_fallback", false))
      model.fail("byte_fallback",
                 "is true: SentencePiece-style BPE (Llama 2, Yi) is not supported, only byte-level BPE "
                 "(Llama 3, Qwen2)");
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (auto v = model.optional_string(key); v && !v->empty())
        model.fail(key, "='", *v, "' is not supported by byte-level BPE");
    if (auto dropout = model.optional_number("dropout"); dropout && *dropout != 0.0)
      model.fail("dropout", "=", *dropout, " is not supported (BPE dropout is for training)");
    ignore_merges_ = model.boolean("ignore_merges", false);

    // Vocabulary: every token must spell bytes in GPT-2's alphabet.
    const JsonObject vocab = model.object("vocab");
    constexpr std::int64_t kMaxId = (1 << 24);
    for (const auto& [token, id_json] : vocab.json().items()) {
      if (!detail::json_is_integral(id_json) || detail::json_to_int64(id_json) < 0 ||
          detail::json_to_int64(id_json) >= kMaxId)
        vocab.fail(token, "has id ", id_json.dump(), ", expected an integer in [0, ", kMaxId, ")");
      const auto id = static_cast<token_id>(detail::json_to_int64(id_json));
      std::string bytes;
      for (std::size_t pos = 0; pos < token.size();) {
        const unicode::Utf8Unit u = unicode::decode_utf8(token, pos);
        const int b = u.valid ? unicode::unicode_to_byte(u.cp) : -1;
        if (b < 0)
          vocab.fail(token, "(id ", id, ") is not spelled in the byte-level alphabet (is this a byte-level BPE?)");
        bytes += static_cast<char>(b);
        pos += u.length;
      }
      if (static_cast<std::size_t>(id) < id_kind_.size() && id_kind_[id] != kUnassigned)
        vocab.fail(token, "has id ", id, ", which another token has too");
      assign(id, std::move(bytes), kVocab);
      vocab_.emplace(token, id);
    }
    for (int b = 0; b < 256; ++b) {
      const std::string spelled = unicode::bytes_to_byte_level(std::string(1, static_cast<char>(b)));
      const auto it = vocab_.find(spelled);
      if (it == vocab_.end())
        SHADOWKV_FAIL(vocab.file(), ": field 'model.vocab' has no token for byte ", b, " ('", spelled,
                      "'): a byte-level BPE needs all 256");
      byte_ids_[b] = it->second;
    }

    // Merges: "a b" strings or ["a", "b"] pairs; the rank is the position.
    const nlohmann::json& merges = model.array("merges");
    merges_.reserve(merges.size());
    for (std::size_t i = 0; i < merges.size(); ++i) {
      const nlohmann::json& m = merges[i];
      const std::string key = "merges[" + std::to_string(i) + "]";
      std::string left, right;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const std::size_t space = s.find(' ');
        if (space == std::string::npos || space == 0 || space + 1 == s.size() ||
            s.find(' ', space + 1) != std::string::npos)
          model.fail(key, "is '", s, "', expected two tokens separated by one space");
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        model.fail(key, "is ", m.dump(), ", expected \"a b\" or [\"a\", \"b\"]");
      }
      const auto a = vocab_.find(left), b = vocab_.find(right), ab = vocab_.find(left + right);
      if (a == vocab_.end()) model.fail(key, "names '", left, "', which is not in model.vocab");
      if (b == vocab_.end()) model.fail(key, "names '", right, "', which is not in model.vocab");
      if (ab == vocab_.end()) model.fail(key, "makes '", left + right, "', which is not in model.vocab");
      merges_.emplace(pair_key(a->second, b->second), Merge{static_cast<std::int32_t>(i), ab->second});
    }
  }

  void parse_added_tokens(const JsonObject& top) {
    const nlohmann::json* list = top.find("added_tokens");
    if (!list) return;
    if (!list->is_array()) top.fail("added_tokens", "is ", detail::json_kind(*list), ", expected an array");
    for (std::size_t i = 0; i < list->size(); ++i) {
      const JsonObject entry((*list)[i], top.file(), "added_tokens[" + std::to_string(i) + "]");
      AddedToken a;
      a.id = static_cast<token_id>(entry.integer("id", 0, (1 << 24) - 1));
      a.content = entry.string("content");
      if (a.content.empty()) entry.fail("content", "is empty");
      a.special = entry.boolean("special", false);
      a.lstrip = entry.boolean("lstrip", false);
      a.rstrip = entry.boolean("rstrip", false);
      a.single_word = entry.boolean("single_word", false);
      for (const AddedToken& other : added_)
        if (other.content == a.content && other.id != a.id)
          entry.fail("content", "'", a.content, "' is already added token ", other.id);
      // An id may be shared only by tokens of the same text (GPT-2's <|endoftext|> is in the
      // vocabulary too): otherwise decode(encode(s)) would not give s back.
      if (static_cast<std::size_t>(a.id) < id_kind_.size() && id_kind_[a.id] != kUnassigned &&
          id_bytes_[a.id] != a.content)
        entry.fail("id", "=", a.id,
                   " already stands for another token (added tokens may share an id only with a token "
                   "of the same text)");
      assign(a.id, a.content, a.special ? kSpecial : kAdded);
      added_.push_back(std::move(a));
    }
    // Longest first, so that the first match at a position is the longest.
    std::stable_sort(added_.begin(), added_.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
    for (std::size_t i = 0; i < added_.size(); ++i)
      added_by_first_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);
  }

  void parse_normalizer(const JsonObject& top) {
    const auto norm = top.optional_object("normalizer");
    if (!norm) return;
    const std::string type = norm->string("type");
    if (type != "NFC") norm->fail("type", "='", type, "' is not supported (null or NFC)");
  }

  void parse_pre_tokenizer(const JsonObject& top) {
    const auto pre = top.optional_object("pre_tokenizer");
    if (!pre) top.fail("pre_tokenizer", "is missing: a byte-level BPE needs a ByteLevel pre-tokenizer");
    std::vector<JsonObject> steps;
    if (pre->string("type") == "Sequence") {
      const nlohmann::json& list = pre->array("pretokenizers");
      for (std::size_t i = 0; i < list.size(); ++i)
        steps.emplace_back(list[i], top.file(), pre->field("pretokenizers[" + std::to_string(i) + "]"));
    } else {
      steps.push_back(*pre);
    }
    bool byte_level = false;
    std::optional<SplitPattern> split;
    for (const JsonObject& step : steps) {
      const std::string type = step.string("type");
      if (type == "ByteLevel") {
        if (byte_level) step.fail("type", "ByteLevel appears twice");
        byte_level = true;
        add_prefix_space_ = step.boolean("add_prefix_space", false);
        if (step.boolean("use_regex", true)) {
          if (split) step.fail("use_regex", "is true after a Split step, which is not supported");
          split = SplitPattern::gpt2;
        }
      } else if (type == "Split") {
        if (split) step.fail("type", "a second split (Split, or ByteLevel with use_regex) is not supported");
        if (byte_level) step.fail("type", "Split after ByteLevel is not supported");
        const JsonObject pattern = step.object("pattern");
        const std::string regex = pattern.string("Regex");
        split = detail::recognise_split_regex(regex);
        if (!split)
          pattern.fail("Regex", "'", regex,
                       "' is not a split this tokenizer implements (the Llama-3, Qwen2 and GPT-2 patterns)");
        if (auto behavior = step.optional_string("behavior"); behavior && *behavior != "Isolated")
          step.fail("behavior", "='", *behavior, "' is not supported (Isolated)");
        if (step.boolean("invert", false)) step.fail("invert", "is true, which is not supported");
      } else {
        step.fail("type", "='", type, "' is not supported (ByteLevel, Split, Sequence of them)");
      }
    }
    if (!byte_level) pre->fail("type", "has no ByteLevel step: not a byte-level BPE");
    pattern_ = split.value_or(SplitPattern::none);
  }

  std::string prefixed(std::string_view text) const {
    if (add_prefix_space_ && !text.empty() && text.front() != ' ') return " " + std::string(text);
    return std::string(text);
  }

  /// The longest added token at `pos` (with its stripped whitespace, which may reach back to
  /// `floor`), or none.
  AddedMatch match_added(std::string_view text, std::size_t floor, std::size_t pos) const {
    for (std::size_t i : added_by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& a = added_[i];
      if (text.compare(pos, a.content.size(), a.content) != 0) continue;
      std::size_t end = pos + a.content.size();
      if (a.single_word && (word_char_before(text, pos) || word_char_at(text, end))) continue;
      std::size_t begin = pos;
      if (a.lstrip) begin -= detail::whitespace_before(text, floor, pos);
      if (a.rstrip) end += detail::whitespace_after(text, end);
      return {&a, begin, end};
    }
    return {};
  }

  static bool is_word(char32_t cp) {
    const auto c = unicode::classify(cp);
    return c == unicode::CharClass::letter || c == unicode::CharClass::number;
  }
  static bool word_char_at(std::string_view text, std::size_t pos) {
    if (pos >= text.size()) return false;
    const auto u = unicode::decode_utf8(text, pos);
    return u.valid && is_word(u.cp);
  }
  static bool word_char_before(std::string_view text, std::size_t pos) {
    for (std::size_t len = 1; len <= 4 && len <= pos; ++len) {
      const auto u = unicode::decode_utf8(text, pos - len);
      if (u.valid && u.length == len) return is_word(u.cp);
    }
    return false;
  }

  void encode_plain(std::string_view text, std::vector<token_id>& ids) const {
    if (text.empty()) return;
    const std::string with_prefix = prefixed(text);
    for (std::string_view piece : detail::split_pieces(with_prefix, pattern_)) encode_piece(piece, ids);
  }

  /// BPE over the bytes of one piece: repeatedly merge the adjacent pair of lowest rank
  /// (leftmost among equal ranks), as a heap of candidate pairs over a linked list of symbols.
  void encode_piece(std::string_view piece, std::vector<token_id>& ids) const {
    if (ignore_merges_) {
      if (const auto it = vocab_.find(unicode::bytes_to_byte_level(piece)); it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    const int n = static_cast<int>(piece.size());
    std::vector<token_id> sym(n);
    std::vector<int> prev(n), next(n);
    std::vector<char> alive(n, 1);
    for (int i = 0; i < n; ++i) {
      sym[i] = byte_ids_[static_cast<unsigned char>(piece[i])];
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    struct Candidate {
      std::int32_t rank;
      int pos;
      token_id merged;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
    auto push = [&](int left) {
      if (left < 0 || next[left] < 0) return;
      const auto it = merges_.find(pair_key(sym[left], sym[next[left]]));
      if (it != merges_.end()) heap.push({it->second.rank, left, it->second.merged});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      if (!alive[c.pos] || next[c.pos] < 0) continue;
      const int right = next[c.pos];
      const auto it = merges_.find(pair_key(sym[c.pos], sym[right]));
      if (it == merges_.end() || it->second.merged != c.merged) continue;  // stale candidate
      sym[c.pos] = c.merged;
      alive[right] = 0;
      next[c.pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = c.pos;
      push(prev[c.pos]);
      push(c.pos);
    }
    for (int i = 0; i >= 0 && i < n; i = next[i]) ids.push_back(sym[i]);
  }

  std::unordered_map<std::string, token_id> vocab_;  ///< byte-level spelling -> id
  std::vector<std::string> id_bytes_;                ///< id -> the bytes it stands for
  std::vector<std::uint8_t> id_kind_;                ///< id -> kUnassigned / kVocab / kAdded / kSpecial
  std::unordered_map<std::uint64_t, Merge> merges_;  ///< (left id, right id) -> rank, merged id
  std::array<token_id, 256> byte_ids_{};
  std::vector<AddedToken> added_;  ///< longest content first
  std::array<std::vector<std::size_t>, 256> added_by_first_byte_{};
  SplitPattern pattern_ = SplitPattern::none;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
};

// --- choosing one -----------------------------------------------------------------------------

/// The tokenizer of a model folder: `tokenizer.json` when present (byte-level BPE), else the
/// byte tokenizer when `cfg` says `"shadowkv_tokenizer": "bytes"` (bos / eos: the config's
/// first `bos_token_id` / `eos_token_id`, 256 / 257 when absent). Throws naming the folder
/// otherwise, and naming config.json when its bos / eos ids do not suit the byte tokenizer.
inline std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& folder, const ModelConfig& cfg) {
  const std::filesystem::path json = folder / "tokenizer.json";
  if (std::filesystem::exists(json)) return std::make_unique<BpeTokenizer>(BpeTokenizer::from_file(json));
  SHADOWKV_CHECK(cfg.tokenizer == "bytes", "model folder '", folder.string(),
                 "' has no tokenizer.json, and ", cfg.source.empty() ? "config.json" : cfg.source,
                 " does not set \"shadowkv_tokenizer\": \"bytes\"");
  const std::int64_t bos = cfg.bos_token_ids.empty() ? 256 : cfg.bos_token_ids.front();
  const std::int64_t eos = cfg.eos_token_ids.empty() ? 257 : cfg.eos_token_ids.front();
  SHADOWKV_CHECK(bos >= 256 && eos >= 256 && bos != eos && bos < (1 << 24) && eos < (1 << 24), cfg.source,
                 ": bos_token_id=", bos, " and eos_token_id=", eos,
                 " must be distinct ids >= 256 for the byte tokenizer (0..255 are the bytes)");
  SHADOWKV_CHECK(cfg.vocab_size >= 258 && std::max(bos, eos) < cfg.vocab_size, cfg.source, ": vocab_size=",
                 cfg.vocab_size, " must cover the 256 bytes, bos_token_id=", bos, " and eos_token_id=", eos);
  return std::make_unique<ByteTokenizer>(static_cast<token_id>(bos), static_cast<token_id>(eos));
}

/// `load_tokenizer(folder, load_model_config(folder))`, except that config.json is only read
/// when the folder has no tokenizer.json.
inline std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& folder) {
  const std::filesystem::path json = folder / "tokenizer.json";
  if (std::filesystem::exists(json)) return std::make_unique<BpeTokenizer>(BpeTokenizer::from_file(json));
  SHADOWKV_CHECK(std::filesystem::exists(folder / "config.json"), "model folder '", folder.string(),
                 "' has neither tokenizer.json nor config.json");
  return load_tokenizer(folder, load_model_config(folder));
}

}  // namespace shadowkv::model
