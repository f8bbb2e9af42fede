// shadowkv-decode: load a Hugging Face model folder (config.json + *.safetensors + tokenizer),
// run a prompt through it with DensePolicy, ShadowKVPolicy or OracleTopKPolicy attention, and
// generate. Reports prefill and decode tokens/s, the attention state's device and host bytes
// and the value-cache hit rate. See --help.
//
// Exit status: 0 on success, 2 for a bad command line (the message names the flag), 1 for
// anything that fails later (an unreadable model folder, a malformed checkpoint, ...).

#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <shadowkv/model/decoder.hpp>
#include <shadowkv/model/model.hpp>
#include <shadowkv/shadowkv.hpp>

#include "tiny_model.hpp"

namespace {

namespace fs = std::filesystem;
using namespace shadowkv;
using namespace shadowkv::model;

/// A bad command line: printed as "error: <flag>: <message>", exit status 2.
struct UsageError {
  std::string flag, message;
};

struct Options {
  std::string model;
  std::string prompt, prompt_file, prompt_ids;
  int max_new_tokens = 64;
  std::string policy = "shadowkv";
  std::string device = "cpu";
  std::string rank = "auto", budget = "auto", outliers = "auto";
  int chunk_size = 8;
  int local_chunks = 4;
  index_t prefill_chunk = 512;
  double temperature = 0.0, top_p = 1.0;
  std::uint64_t seed = 0;
  bool no_bos = false;
};

// The prompt used when none is given: long enough (about 2K byte tokens) that ShadowKV's
// sparse selection has something to select from with the fitted budget.
std::string default_prompt() {
  const std::string paragraph =
      "ShadowKV keeps the keys of a long prompt as a low-rank factorisation of their pre-RoPE "
      "values and moves the values to host memory. At every decode step it scores the query "
      "against one landmark per chunk, rebuilds only the keys of the chunks it selects and "
      "fetches only their values, so that a long context costs a fraction of the memory and "
      "bandwidth of dense attention. ";
  std::string text;
  for (int i = 0; i < 5; ++i) text += paragraph;
  return text;
}

/// Bytes of generated text for a terminal: valid UTF-8 as is, newlines and tabs as is, other
/// control bytes and bytes of invalid sequences as \xNN (a random model emits any byte).
std::string printable(const std::string& s) {
  std::string out;
  char buf[8];
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool valid = len > 0 && i + len <= s.size();
    for (int j = 1; valid && j < len; ++j) valid = (static_cast<unsigned char>(s[i + j]) & 0xC0) == 0x80;
    if (valid && len > 1) {
      out.append(s, i, len);
      i += len;
    } else if (valid && (c >= 0x20 || c == '\n' || c == '\t') && c != 0x7F) {
      out += static_cast<char>(c);
      ++i;
    } else {
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
      ++i;
    }
  }
  return out;
}

std::string mib(std::size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

/// "auto" or a whole number >= `min`; throws UsageError naming `flag`.
int parse_knob(const std::string& flag, const std::string& value, int fallback, int min) {
  if (value == "auto") return fallback;
  try {
    std::size_t used = 0;
    const long v = std::stol(value, &used);
    if (used == value.size() && v >= min && v <= (1 << 30)) return static_cast<int>(v);
  } catch (const std::exception&) {
  }
  throw UsageError{flag, "'" + value + "' is not 'auto' or a whole number >= " + std::to_string(min)};
}

std::vector<token_id> parse_ids(const std::string& text, index_t vocab) {
  std::vector<token_id> ids;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, ',')) {
    std::istringstream one(item);
    long long v = 0;
    std::string rest;
    if (!(one >> v) || (one >> rest))
      throw UsageError{"--prompt-ids", "'" + item + "' is not a token id (expected e.g. 1,2,3)"};
    if (v < 0 || v >= vocab)
      throw UsageError{"--prompt-ids", "token id " + std::to_string(v) + " is outside the vocabulary [0, " +
                                           std::to_string(vocab) + ")"};
    ids.push_back(static_cast<token_id>(v));
  }
  if (ids.empty()) throw UsageError{"--prompt-ids", "no token ids given"};
  return ids;
}

fs::path executable_dir(const char* argv0) {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) exe = fs::absolute(argv0, ec);
  return exe.parent_path();
}

template <AttentionPolicy Policy>
int run(const Options& o, const fs::path& dir, const ModelConfig& cfg, const WeightStore& store,
        const Tokenizer& tok, const std::vector<token_id>& prompt, const char* policy_name) {
  // Knobs: "auto" fits the model and the prompt (see --help).
  Config attn = cfg.attention_config();
  attn.chunk_size = o.chunk_size;
  attn.local_chunks = o.local_chunks;
  attn.rank = parse_knob("--rank", o.rank, std::min(160, attn.kv_dim()), 1);
  if (attn.rank > attn.kv_dim())
    throw UsageError{"--rank", std::to_string(attn.rank) + " exceeds num_kv_heads*head_dim=" +
                                   std::to_string(attn.kv_dim()) + " of this model"};
  const index_t n = static_cast<index_t>(prompt.size());
  const int fitted_budget =
      static_cast<int>(std::max<index_t>(o.chunk_size, std::min<index_t>(2048, n / 4) / o.chunk_size * o.chunk_size));
  attn.sparse_budget = parse_knob("--budget", o.budget, fitted_budget, 1);
  if (attn.sparse_budget % attn.chunk_size != 0)
    throw UsageError{"--budget", std::to_string(attn.sparse_budget) + " is not a multiple of --chunk-size=" +
                                     std::to_string(attn.chunk_size)};
  attn.outlier_chunks = parse_knob("--outliers", o.outliers, kAutoOutlierChunks, 0);
  constexpr bool sparse = Policy::selection != ChunkSelection::all;
  if (sparse && n < attn.min_context())
    throw UsageError{"--policy", std::string(policy_name) + " needs a prompt of at least " +
                                     std::to_string(attn.min_context()) + " tokens for its static set ((" +
                                     "--local-chunks=" + std::to_string(attn.local_chunks) + " + outlier chunks=" +
                                     std::to_string(attn.resolved_outlier_chunks()) + ") * --chunk-size=" +
                                     std::to_string(attn.chunk_size) + "), the prompt has " + std::to_string(n) +
                                     ": give a longer prompt, lower --budget/--outliers/--local-chunks, or use "
                                     "--policy dense"};

  Decoder<Policy> decoder(cfg, store, attn);
  std::printf("model:   %s (%s, %d layers, hidden %d, %d q / %d kv heads, head_dim %d, vocab %lld, %s tokenizer)\n",
              dir.string().c_str(), std::string(to_string(cfg.architecture)).c_str(), cfg.num_layers,
              cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim,
              static_cast<long long>(cfg.vocab_size), std::string(tok.kind()).c_str());
  if (sparse)
    std::printf("policy:  %s (rank %d, chunk %d, budget %d tokens, %d outlier + %d local chunks), device cpu\n",
                policy_name, Policy::keys == KeyStorage::low_rank ? attn.rank : attn.kv_dim(), attn.chunk_size,
                attn.sparse_budget, attn.resolved_outlier_chunks(), attn.local_chunks);
  else
    std::printf("policy:  %s (full KV cache), device cpu\n", policy_name);
  std::printf("prompt:  %lld tokens; weights %s (float)\n", static_cast<long long>(n), mib(decoder.weight_bytes()).c_str());
  std::fflush(stdout);

  GenerationOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.prefill_chunk = o.prefill_chunk;
  g.temperature = o.temperature;
  g.top_p = o.top_p;
  g.seed = o.seed;
  const auto t0 = std::chrono::steady_clock::now();
  g.on_prefill = [&](index_t done, index_t total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "\rprefill %3d%% (%lld/%lld tokens, %.0f tok/s)", static_cast<int>(100 * done / total),
                 static_cast<long long>(done), static_cast<long long>(total), s > 0 ? done / s : 0.0);
    if (done == total) std::fprintf(stderr, "\n");
  };
  const GenerationResult r = decoder.generate(prompt, g);

  std::printf("--- generated: %zu tokens (%s) ---\n%s\n---\n", r.tokens.size(),
              r.stopped_at_eos ? "stopped at eos" : "max-new-tokens reached",
              printable(tok.decode(r.tokens, /*skip_special=*/true)).c_str());
  std::printf("prefill: %lld tokens in %.3f s = %.1f tokens/s\n", static_cast<long long>(r.prompt_tokens),
              r.prefill_seconds, r.prefill_tokens_per_second());
  std::printf("decode:  %lld steps in %.3f s = %.1f tokens/s\n", static_cast<long long>(r.decode_steps),
              r.decode_seconds, r.decode_tokens_per_second());
  std::printf("memory:  device %s, host %s (attention state of the sequence, all layers, as the CUDA backend "
              "would place it)\n",
              mib(r.memory.device_bytes).c_str(), mib(r.memory.host_bytes).c_str());
  if (Policy::offload_values) {
    const PoolStats& p = r.attention.pool;
    std::printf("hit rate: %.1f%% (%lld of %lld selected value chunks already resident; %s copied host->device)\n",
                100.0 * p.hit_rate(), static_cast<long long>(p.hits), static_cast<long long>(p.requested),
                mib(static_cast<std::size_t>(r.attention.pcie_bytes)).c_str());
  } else {
    std::printf("hit rate: n/a (%s keeps every value on the device)\n", policy_name);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const fs::path exe_dir = executable_dir(argv[0]);
  const fs::path tiny_dir = exe_dir / "tiny-model";
  CLI::App app{
      "shadowkv-decode: generate text with a Llama-family model (Llama 2/3/3.1, Yi, Qwen2, GLM-4) whose "
      "attention runs through shadowkv::SparseAttention.\n\n"
      "It loads a Hugging Face model folder (config.json, model.safetensors or a sharded "
      "model.safetensors.index.json, tokenizer.json or the byte tokenizer of the project's own models), "
      "runs the prompt in chunks (--prefill-chunk tokens per forward pass; no [L, L] buffer), then "
      "generates greedily (or samples with --temperature/--top-p) until the model's eos or "
      "--max-new-tokens. It prints a prefill progress line, the generated text (bytes that are not "
      "printable UTF-8 as \\xNN), prefill and decode tokens/s, the bytes the sequence's attention state "
      "holds on the device and on the host (as the CUDA backend would place them) and, for ShadowKV, "
      "the hit rate of the device value cache.\n\n"
      "Without --model it uses a tiny model with random weights (4 layers, hidden 256, 4/2 heads of "
      "dim 64, byte vocabulary), written on first use to " +
      tiny_dir.string() +
      ". Its output is gibberish by design: it shows the machinery, not language, until the project's "
      "trained model replaces it.\n\n"
      "Policies: dense (full KV cache, exact), shadowkv (low-rank keys, offloaded values, landmark "
      "selection; the paper), oracle (exact attention scores choose the chunks: the ceiling of chunk "
      "selection). The sparse policies need a prompt at least as long as their static set, "
      "(--local-chunks + outliers) * --chunk-size tokens.\n\n"
      "Exit status: 0 success, 2 bad command line (the message names the flag), 1 other errors.",
      "shadowkv-decode"};
  app.get_formatter()->column_width(34);
  app.add_option("--model", o.model, "model folder (default: the tiny random model, generated on first use)");
  auto* p_text = app.add_option("--prompt", o.prompt, "prompt text (default: a built-in ~2K-byte paragraph)");
  auto* p_file = app.add_option("--prompt-file", o.prompt_file, "read the prompt text from this file")
                     ->check(CLI::ExistingFile);
  auto* p_ids = app.add_option("--prompt-ids", o.prompt_ids,
                               "the prompt as token ids, comma-separated (e.g. 256,72,105); no bos is added");
  p_text->excludes(p_file)->excludes(p_ids);
  p_file->excludes(p_ids);
  app.add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate at most")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--policy", o.policy, "attention policy: shadowkv, dense or oracle")
      ->check(CLI::IsMember({"shadowkv", "dense", "oracle"}))->capture_default_str();
  app.add_option("--device", o.device, "cpu, or cuda (the CUDA decoder is not built yet)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--rank", o.rank, "ShadowKV key rank, or auto = min(160, num_kv_heads*head_dim)")
      ->capture_default_str();
  app.add_option("--budget", o.budget,
                 "selected tokens per KV head and step (a multiple of --chunk-size), or auto = the largest "
                 "multiple of the chunk size <= min(2048, prompt/4)")
      ->capture_default_str();
  app.add_option("--chunk-size", o.chunk_size, "tokens per chunk of the sparse policies")
      ->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--outliers", o.outliers, "exact outlier chunks per KV head, or auto = 24 per 1024 budget tokens")
      ->capture_default_str();
  app.add_option("--local-chunks", o.local_chunks, "exact chunks at the end of the prompt")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--prefill-chunk", o.prefill_chunk, "prompt tokens per forward pass during prefill")
      ->check(CLI::Range(index_t{1}, index_t{1} << 30))->capture_default_str();
  app.add_option("--temperature", o.temperature, "0: greedy; otherwise sample from softmax(logits/temperature)")
      ->check(CLI::Range(0.0, 100.0))->capture_default_str();
  app.add_option("--top-p", o.top_p, "nucleus sampling mass, in (0, 1]")
      ->check(CLI::Range(1e-9, 1.0))->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the sampler")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_flag("--no-bos", o.no_bos, "do not put the model's bos token before a text prompt");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints the help, or the error naming the option
    return rc == 0 ? 0 : 2;
  }

  try {
    // CLI11's ranges let NaN through (every comparison with it is false).
    if (std::isnan(o.temperature)) throw UsageError{"--temperature", "nan is not a number in [0, 100]"};
    if (std::isnan(o.top_p)) throw UsageError{"--top-p", "nan is not a number in (0, 1]"};
    if (o.device == "cuda") {
      std::fprintf(stderr,
                   "error: --device cuda: the CUDA decoder is not built yet (the CUDA attention backend exists; "
                   "its cuBLAS LinearOps do not). Use --device cpu.\n");
      return 2;
    }
    fs::path dir = o.model;
    if (o.model.empty()) {
      dir = tiny_dir;
      if (!fs::exists(dir / "config.json") || !fs::exists(dir / "model.safetensors")) {
        // Written aside and renamed, so that a concurrent run never sees half a model.
        const fs::path tmp = dir.string() + ".tmp-" + std::to_string(::getpid());
        shadowkv_examples::write_tiny_model(tmp);
        std::error_code ec;
        fs::rename(tmp, dir, ec);
        if (ec) fs::remove_all(tmp, ec);  // another run finished first: use its copy
        std::printf("wrote the tiny default model (random weights: gibberish by design) to %s\n",
                    dir.string().c_str());
      }
    } else if (!fs::is_directory(dir)) {
      throw UsageError{"--model", "'" + o.model + "' is not a directory"};
    }
    const ModelConfig cfg = load_model_config(dir);
    const WeightStore store(dir);
    const auto tok = load_tokenizer(dir, cfg);

    std::vector<token_id> prompt;
    if (!o.prompt_ids.empty()) {
      prompt = parse_ids(o.prompt_ids, cfg.vocab_size);
    } else {
      std::string text = o.prompt;
      if (!o.prompt_file.empty()) {
        std::ifstream in(o.prompt_file, std::ios::binary);
        text.assign(std::istreambuf_iterator<char>(in), {});
        if (!in.good() && !in.eof()) throw UsageError{"--prompt-file", "cannot read '" + o.prompt_file + "'"};
      } else if (text.empty()) {
        text = default_prompt();
      }
      if (!o.no_bos && !cfg.bos_token_ids.empty()) prompt.push_back(static_cast<token_id>(cfg.bos_token_ids[0]));
      const auto ids = tok->encode(text);
      prompt.insert(prompt.end(), ids.begin(), ids.end());
      if (prompt.empty()) throw UsageError{o.prompt_file.empty() ? "--prompt" : "--prompt-file", "the prompt is empty"};
    }

    if (o.policy == "dense") return run<DensePolicy>(o, dir, cfg, store, *tok, prompt, "dense");
    if (o.policy == "oracle") return run<OracleTopKPolicy>(o, dir, cfg, store, *tok, prompt, "oracle");
    return run<ShadowKVPolicy>(o, dir, cfg, store, *tok, prompt, "shadowkv");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s: %s\nRun with --help for more information.\n", e.flag.c_str(), e.message.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
