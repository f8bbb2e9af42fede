#pragma once
// What both translation units of shadowkv-decode share: the options, the output helpers and the
// run itself as a template over the backend. shadowkv_decode.cpp (the command line, the CPU
// run) instantiates it for CpuBackend; shadowkv_decode_cuda.cu, compiled by nvcc when the build
// has CUDA, for CudaBackend (after including model/decoder_cuda.cuh).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

#include <shadowkv/model/decoder.hpp>
#include <shadowkv/model/model.hpp>
#include <shadowkv/shadowkv.hpp>

namespace shadowkv_examples::decode {

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
  std::string device = "auto";  ///< auto, cpu or cuda
  std::string rank = "auto", budget = "auto", outliers = "auto";
  int chunk_size = 8;
  int local_chunks = 4;
  index_t prefill_chunk = 512;
  double temperature = 0.0, top_p = 1.0;
  std::uint64_t seed = 0;
  bool no_bos = false;
  std::string task = "passkey";  ///< default retrieval prompt (a model folder with tasks.json)
  index_t context = 4096;
  std::uint64_t case_seed = 1;
  std::string expected;  ///< the retrieval prompt's answer; empty for other prompts
};

/// Bytes of generated text for a terminal: valid UTF-8 as is, newlines and tabs as is, other
/// control bytes and bytes of invalid sequences as \xNN (a random model emits any byte).
inline std::string printable(const std::string& s) {
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

inline std::string mib(std::size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return buf;
}

/// "auto" or a whole number >= `min`; throws UsageError naming `flag`.
inline int parse_knob(const std::string& flag, const std::string& value, int fallback, int min) {
  if (value == "auto") return fallback;
  try {
    std::size_t used = 0;
    const long v = std::stol(value, &used);
    if (used == value.size() && v >= min && v <= (1 << 30)) return static_cast<int>(v);
  } catch (const std::exception&) {
  }
  throw UsageError{flag, "'" + value + "' is not 'auto' or a whole number >= " + std::to_string(min)};
}


/// Builds `Decoder<Policy, B>` with the knobs of `o` fitted to the model and the prompt,
/// generates, and prints the figures. Throws `UsageError` for knobs the model or the prompt
/// rule out (before anything is loaded onto the device).
template <AttentionPolicy Policy, Backend B>
int run(const Options& o, const fs::path& dir, const ModelConfig& cfg, const WeightStore& store,
        const Tokenizer& tok, const std::vector<token_id>& prompt, const char* policy_name) {
  // Knobs: "auto" fits the model and the prompt (see --help).
  Config attn = cfg.attention_config();
  attn.chunk_size = o.chunk_size;
  attn.local_chunks = o.local_chunks;
  // auto: the paper's 160 of 1024 (15.6%) of num_kv_heads * head_dim, at most 160.
  attn.rank = parse_knob("--rank", o.rank, std::clamp((attn.kv_dim() * 160 + 512) / 1024, 1, 160), 1);
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

  constexpr bool on_gpu = std::is_same_v<B, CudaBackend>;
  const char* device = on_gpu ? "cuda" : "cpu";
  Decoder<Policy, B> decoder(cfg, store, attn);
  std::printf("model:   %s (%s, %d layers, hidden %d, %d q / %d kv heads, head_dim %d, vocab %lld, %s tokenizer)\n",
              dir.string().c_str(), std::string(to_string(cfg.architecture)).c_str(), cfg.num_layers,
              cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim,
              static_cast<long long>(cfg.vocab_size), std::string(tok.kind()).c_str());
  if (sparse)
    std::printf("policy:  %s (rank %d, chunk %d, budget %d tokens, %d outlier + %d local chunks), device %s\n",
                policy_name, Policy::keys == KeyStorage::low_rank ? attn.rank : attn.kv_dim(), attn.chunk_size,
                attn.sparse_budget, attn.resolved_outlier_chunks(), attn.local_chunks, device);
  else
    std::printf("policy:  %s (full KV cache), device %s\n", policy_name, device);
  std::printf("prompt:  %lld tokens; weights %s (float%s)\n", static_cast<long long>(n),
              mib(decoder.weight_bytes()).c_str(), on_gpu ? ", on the device" : "");
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
  if (!o.expected.empty()) {
    const std::string text = tok.decode(r.tokens, /*skip_special=*/true);
    std::printf("answer:  %s (expected %s)\n", text == o.expected ? "found" : "NOT found", o.expected.c_str());
  }
  std::printf("prefill: %lld tokens in %.3f s = %.1f tokens/s\n", static_cast<long long>(r.prompt_tokens),
              r.prefill_seconds, r.prefill_tokens_per_second());
  std::printf("decode:  %lld steps in %.3f s = %.1f tokens/s\n", static_cast<long long>(r.decode_steps),
              r.decode_seconds, r.decode_tokens_per_second());
  std::printf("memory:  device %s, host %s (attention state of the sequence, all layers%s)\n",
              mib(r.memory.device_bytes).c_str(), mib(r.memory.host_bytes).c_str(),
              on_gpu ? "" : ", as the CUDA backend would place it");
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


/// The policy named by `o.policy` on backend `B`.
template <Backend B>
int run_policy(const Options& o, const fs::path& dir, const ModelConfig& cfg, const WeightStore& store,
               const Tokenizer& tok, const std::vector<token_id>& prompt) {
  if (o.policy == "dense") return run<DensePolicy, B>(o, dir, cfg, store, tok, prompt, "dense");
  if (o.policy == "oracle") return run<OracleTopKPolicy, B>(o, dir, cfg, store, tok, prompt, "oracle");
  return run<ShadowKVPolicy, B>(o, dir, cfg, store, tok, prompt, "shadowkv");
}

/// `run_policy<CudaBackend>`, defined in shadowkv_decode_cuda.cu (builds with CUDA only).
int run_cuda(const Options& o, const fs::path& dir, const ModelConfig& cfg, const WeightStore& store,
             const Tokenizer& tok, const std::vector<token_id>& prompt);

/// CUDA devices this process sees: 0 when there are none or the runtime fails (then `why`
/// says what it reported). Defined in shadowkv_decode_cuda.cu.
int cuda_device_count(std::string& why);

}  // namespace shadowkv_examples::decode
