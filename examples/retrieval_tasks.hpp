#pragma once
// The synthetic long-context retrieval tasks of the project's trained model (models/README.md):
// passkey and multi-key needle-in-a-haystack prompts of an exact token length, built from the
// model folder's `tasks.json` (the templates the training script wrote) and `words.txt` (the
// filler vocabulary). The training script (tools/train/train_retrieval.py) draws its prompts
// the same way with Python's random module; these use SplitMix64, so test prompts are fresh.
//
// A prompt is bos + the bytes of prefix + haystack + query; the answer is the value's digits
// followed by eos. The haystack is filler sentences of random words with the needles placed
// before uniformly drawn sentences; the last sentence is cut to make the length exact.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <shadowkv/core/error.hpp>
#include <shadowkv/model/tokenizer.hpp>

#include "synthetic_rng.hpp"

namespace shadowkv_examples {

struct RetrievalCase {
  std::string task;
  std::vector<shadowkv::model::token_id> prompt;  ///< bos + bytes, exactly the length asked for
  std::vector<shadowkv::model::token_id> answer;  ///< digits + eos
  std::string value;                       ///< the digits asked for
  double depth = 0;                        ///< where the asked needle starts, as a fraction of the prompt
};

/// The tasks of a model folder (`tasks.json` + the word list it names).
class RetrievalTasks {
 public:
  /// Throws `shadowkv::Error` naming the file and the field when something is missing or wrong.
  explicit RetrievalTasks(const std::filesystem::path& model_dir) {
    const std::filesystem::path file = model_dir / "tasks.json";
    std::ifstream in(file);
    SHADOWKV_CHECK(in.good(), "cannot read '", file.string(), "' (the model folder has no retrieval tasks)");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
      bos_ = j.at("bos").get<int>();
      eos_ = j.at("eos").get<int>();
      const auto range = j.at("sentence_words");
      min_words_ = range.at(0).get<int>();
      max_words_ = range.at(1).get<int>();
      for (const auto& [name, t] : j.at("tasks").items())
        specs_[name] = Spec{t.at("prefix").get<std::string>(), t.at("needle").get<std::string>(),
                            t.at("query").get<std::string>(), t.value("key", std::string("words")),
                            t.at("value_digits").get<int>(), t.at("needles").get<int>()};
      const std::filesystem::path words = model_dir / j.at("words").get<std::string>();
      std::ifstream w(words);
      SHADOWKV_CHECK(w.good(), "cannot read '", words.string(), "' named by ", file.string());
      for (std::string word; w >> word;) words_.push_back(word);
    } catch (const nlohmann::json::exception& e) {
      SHADOWKV_FAIL(file.string(), ": ", e.what());
    }
    SHADOWKV_CHECK(!words_.empty() && !specs_.empty() && min_words_ >= 1 && max_words_ >= min_words_, file.string(),
                   ": needs tasks, a word list and sentence_words [min, max] with 1 <= min <= max");
    for (const auto& [name, s] : specs_) {
      SHADOWKV_CHECK(s.value_digits >= 1 && s.value_digits <= 18 && s.needles >= 1, file.string(), ": task '", name,
                     "' needs value_digits in [1, 18] and needles >= 1");
      SHADOWKV_CHECK(s.key == "words" || s.key == "letter", file.string(), ": task '", name, "' has key '", s.key,
                     "' (known: 'words', two words joined by '-'; 'letter', one capital letter)");
      SHADOWKV_CHECK(s.key != "letter" || s.needles <= 26, file.string(), ": task '", name, "' asks for ",
                     s.needles, " needles with one-letter keys (at most 26)");
    }
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : specs_) out.push_back(kv.first);
    return out;
  }
  bool has(const std::string& task) const { return specs_.count(task) != 0; }
  shadowkv::model::token_id eos() const { return eos_; }

  /// Fixed text of a prompt (bos, prefix, needles, query) for `task`: the shortest length minus
  /// a little filler.
  std::int64_t fixed_tokens(const std::string& task) const {
    const Spec& s = spec(task);
    const std::size_t key = s.key == "letter" ? 1 : 2 * longest_word() + 1;
    const std::size_t value = static_cast<std::size_t>(s.value_digits);
    return static_cast<std::int64_t>(1 + s.prefix.size() + fill(s.query, key, value).size() +
                                     s.needles * (fill(s.needle, key, value).size() + 1));
  }

  /// One case of `task` with a prompt of exactly `length` tokens, drawn from `seed`.
  RetrievalCase make(const std::string& task, std::int64_t length, std::uint64_t seed) const {
    const Spec& s = spec(task);
    Rng rng(seed);
    std::vector<std::string> keys, values, needles;
    while (static_cast<int>(keys.size()) < s.needles) {
      std::string k = s.key == "letter" ? std::string(1, static_cast<char>('A' + rng.below(26)))
                                        : word(rng) + "-" + word(rng);
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(std::move(k));
    }
    std::int64_t needle_bytes = 0;
    for (const std::string& k : keys) {
      std::string v = std::to_string(1 + rng.below(9));  // no leading zero
      while (static_cast<int>(v.size()) < s.value_digits) v += static_cast<char>('0' + rng.below(10));
      needles.push_back(fill(s.needle, k, v));
      needle_bytes += static_cast<std::int64_t>(needles.back().size()) + 1;
      values.push_back(std::move(v));
    }
    const std::size_t asked = rng.below(keys.size());
    const std::string query = fill(s.query, keys[asked], values[asked]);
    const std::int64_t fixed = 1 + static_cast<std::int64_t>(s.prefix.size() + query.size()) + needle_bytes;
    const std::int64_t room = length - fixed;
    SHADOWKV_CHECK(room >= 16, "length=", length, " is too short for task '", task, "' (", fixed,
                   " tokens of fixed text; at least ", fixed + 16, ")");
    std::vector<std::string> sentences;
    std::int64_t total = -1;
    while (total < room) {
      sentences.push_back(sentence(rng));
      total += static_cast<std::int64_t>(sentences.back().size()) + 1;
    }
    sentences.back().resize(sentences.back().size() - static_cast<std::size_t>(total - room));
    std::vector<std::size_t> slots(needles.size());
    for (auto& slot : slots) slot = rng.below(sentences.size());
    std::sort(slots.begin(), slots.end());
    std::vector<std::size_t> order(needles.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);

    std::string text = s.prefix;
    std::size_t asked_at = 0;
    for (std::size_t i = 0, j = 0; i < sentences.size(); ++i) {
      for (; j < slots.size() && slots[j] == i; ++j) {
        if (order[j] == asked) asked_at = text.size();
        text += needles[order[j]] + " ";
      }
      text += sentences[i];
      if (i + 1 < sentences.size()) text += ' ';
    }
    text += query;
    RetrievalCase c;
    c.task = task;
    c.value = values[asked];
    c.prompt.reserve(static_cast<std::size_t>(length));
    c.prompt.push_back(bos_);
    for (unsigned char ch : text) c.prompt.push_back(ch);
    SHADOWKV_CHECK(static_cast<std::int64_t>(c.prompt.size()) == length, "internal: built a prompt of ",
                   c.prompt.size(), " tokens for length=", length);
    for (unsigned char ch : c.value) c.answer.push_back(ch);
    c.answer.push_back(eos_);
    c.depth = static_cast<double>(asked_at + 1) / static_cast<double>(length);
    return c;
  }

 private:
  struct Spec {
    std::string prefix, needle, query;
    std::string key;  ///< "words" (two words joined by '-'; the default) or "letter" (one capital letter)
    int value_digits = 0, needles = 0;
  };

  const Spec& spec(const std::string& task) const {
    const auto it = specs_.find(task);
    SHADOWKV_CHECK(it != specs_.end(), "unknown task '", task, "'");
    return it->second;
  }

  /// `pattern` with every {k} and {v} replaced.
  static std::string fill(const std::string& pattern, const std::string& key, const std::string& value) {
    std::string out;
    for (std::size_t i = 0; i < pattern.size(); ++i) {
      if (pattern.compare(i, 3, "{k}") == 0) {
        out += key;
        i += 2;
      } else if (pattern.compare(i, 3, "{v}") == 0) {
        out += value;
        i += 2;
      } else {
        out += pattern[i];
      }
    }
    return out;
  }
  static std::string fill(const std::string& pattern, std::size_t key_len, std::size_t value_len) {
    return fill(pattern, std::string(key_len, 'k'), std::string(value_len, '0'));
  }

  std::size_t longest_word() const {
    std::size_t n = 0;
    for (const std::string& w : words_) n = std::max(n, w.size());
    return n;
  }
  const std::string& word(Rng& rng) const { return words_[rng.below(words_.size())]; }

  std::string sentence(Rng& rng) const {
    const int n = min_words_ + static_cast<int>(rng.below(static_cast<std::uint64_t>(max_words_ - min_words_ + 1)));
    std::string s;
    for (int i = 0; i < n; ++i) {
      std::string w = word(rng);
      if (i == 0 && !w.empty() && w[0] >= 'a' && w[0] <= 'z') w[0] = static_cast<char>(w[0] - 'a' + 'A');
      if (i) s += ' ';
      s += w;
    }
    return s + ".";
  }

  int bos_ = 0, eos_ = 0, min_words_ = 0, max_words_ = 0;
  std::map<std::string, Spec> specs_;
  std::vector<std::string> words_;
};

}  // namespace shadowkv_examples
