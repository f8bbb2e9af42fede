// shadowkv-decode: load a Hugging Face model folder (config.json + *.safetensors + tokenizer),
// run a prompt through it with DensePolicy, ShadowKVPolicy or OracleTopKPolicy attention, and
// generate. Reports prefill and decode tokens/s, the attention state's device and host bytes
// and the value-cache hit rate. See --help.
//
// Exit status: 0 on success, 2 for a bad command line (the message names the flag), 1 for
// anything that fails later (an unreadable model folder, a malformed checkpoint, ...).
//
// The run itself is decode_run.hpp, a template over the backend; with CUDA in the build
// (SHADOWKV_DECODE_CUDA), shadowkv_decode_cuda.cu (nvcc) instantiates it for the GPU and
// `--device` defaults to cuda when a GPU is there.

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

#include "decode_run.hpp"
#include "retrieval_tasks.hpp"
#include "tiny_model.hpp"

#ifndef SHADOWKV_DECODE_CUDA
#define SHADOWKV_DECODE_CUDA 0
#endif

namespace {

using namespace shadowkv_examples::decode;

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

/// Resolves `--device auto` and checks `--device cuda` against the build and the machine.
void resolve_device(Options& o) {
  std::string why;
#if SHADOWKV_DECODE_CUDA
  const int gpus = cuda_device_count(why);
#else
  const int gpus = 0;
#endif
  if (o.device == "auto") o.device = gpus > 0 ? "cuda" : "cpu";
  if (o.device != "cuda") return;
  if (!SHADOWKV_DECODE_CUDA)
    throw UsageError{"--device", "cuda: this shadowkv-decode was built without CUDA (no nvcc when the build was "
                                 "configured); use --device cpu"};
  if (gpus == 0) throw UsageError{"--device", "cuda: no CUDA device here (" + why + "); use --device cpu"};
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  const fs::path exe_dir = executable_dir(argv[0]);
  const fs::path tiny_dir = exe_dir / "tiny-model";
#ifdef SHADOWKV_DEFAULT_MODEL_DIR
  const fs::path trained_dir = SHADOWKV_DEFAULT_MODEL_DIR;
#else
  const fs::path trained_dir;
#endif
  const bool have_trained = !trained_dir.empty() && fs::exists(trained_dir / "config.json");
  CLI::App app{
      "shadowkv-decode: generate text with a Llama-family model (Llama 2/3/3.1, Yi, Qwen2, GLM-4) whose "
      "attention runs through shadowkv::SparseAttention.\n\n"
      "It loads a Hugging Face model folder (config.json, model.safetensors or a sharded "
      "model.safetensors.index.json, tokenizer.json or the byte tokenizer of the project's own models), "
      "runs the prompt in chunks (--prefill-chunk tokens per forward pass; no [L, L] buffer), then "
      "generates greedily (or samples with --temperature/--top-p) until the model's eos or "
      "--max-new-tokens. It prints a prefill progress line, the generated text (bytes that are not "
      "printable UTF-8 as \\xNN), prefill and decode tokens/s, the bytes the sequence's attention state "
      "holds on the device and on the host (with --device cpu: as the CUDA backend would place them) and, "
      "for ShadowKV, the hit rate of the device value cache.\n\n"
      "Without --model it uses the project's trained retrieval model (" +
      (trained_dir.empty() ? std::string("models/retrieval-6l") : trained_dir.string()) +
      ": 6 layers, byte vocabulary, trained on passkey and multi-key needle retrieval up to 16K tokens; see "
      "models/README.md) when the source tree is there, else (or with --model tiny) a tiny model with random "
      "weights written on first use to " +
      tiny_dir.string() +
      " (its output is gibberish by design). For a model folder with a tasks.json (the trained model) and no "
      "prompt given, the prompt is a retrieval case of --task, --context tokens and --case: the run prints the "
      "expected answer and whether the model found it.\n\n"
      "Policies: dense (full KV cache, exact), shadowkv (low-rank keys, offloaded values, landmark "
      "selection; the paper), oracle (exact attention scores choose the chunks: the ceiling of chunk "
      "selection). The sparse policies need a prompt at least as long as their static set, "
      "(--local-chunks + outliers) * --chunk-size tokens.\n\n"
      "Exit status: 0 success, 2 bad command line (the message names the flag), 1 other errors.",
      "shadowkv-decode"};
  app.get_formatter()->column_width(34);
  app.add_option("--model", o.model,
                 "model folder, or tiny (default: the trained retrieval model, else the tiny random model)");
  auto* p_text = app.add_option("--prompt", o.prompt,
                                "prompt text (default: a retrieval case for a model with tasks.json, else a "
                                "built-in ~2K-byte paragraph)");
  auto* p_file = app.add_option("--prompt-file", o.prompt_file, "read the prompt text from this file")
                     ->check(CLI::ExistingFile);
  auto* p_ids = app.add_option("--prompt-ids", o.prompt_ids,
                               "the prompt as token ids, comma-separated (e.g. 256,72,105); no bos is added");
  p_text->excludes(p_file)->excludes(p_ids);
  p_file->excludes(p_ids);
  app.add_option("--task", o.task, "task of the default retrieval prompt (a task of the model's tasks.json)")
      ->capture_default_str();
  app.add_option("--context", o.context, "length in tokens of the default retrieval prompt")
      ->check(CLI::Range(index_t{64}, index_t{1} << 24))->capture_default_str();
  app.add_option("--case", o.case_seed, "seed of the default retrieval prompt")->capture_default_str();
  app.add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate at most")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  app.add_option("--policy", o.policy, "attention policy: shadowkv, dense or oracle")
      ->check(CLI::IsMember({"shadowkv", "dense", "oracle"}))->capture_default_str();
  app.add_option("--device", o.device,
                 "cpu, cuda, or auto = cuda when this build has CUDA and a GPU is there, else cpu (the weights "
                 "go to the device as float; logits come back to the host for sampling)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))->capture_default_str();
  app.add_option("--rank", o.rank, "ShadowKV key rank, or auto = 15.6% (the paper's 160/1024) of num_kv_heads*head_dim, at most 160")
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
    resolve_device(o);
    fs::path dir = o.model;
    if (o.model.empty() && have_trained) {
      dir = trained_dir;
    } else if (o.model.empty() || o.model == "tiny") {
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
    const bool retrieval = o.prompt.empty() && o.prompt_file.empty() && o.prompt_ids.empty() &&
                           fs::exists(dir / "tasks.json");
    if (retrieval) {
      const shadowkv_examples::RetrievalTasks tasks(dir);
      if (!tasks.has(o.task)) throw UsageError{"--task", "'" + o.task + "' is not a task of " + (dir / "tasks.json").string()};
      if (o.context < tasks.fixed_tokens(o.task) + 16)
        throw UsageError{"--context", std::to_string(o.context) + " is too short for task " + o.task + " (at least " +
                                          std::to_string(tasks.fixed_tokens(o.task) + 16) + ")"};
      const shadowkv_examples::RetrievalCase c = tasks.make(o.task, o.context, o.case_seed);
      prompt = c.prompt;
      o.expected = c.value;
      std::printf("task:    %s, %lld-token prompt (case %llu); the asked needle is at %.0f%% of it; expected answer %s\n",
                  o.task.c_str(), static_cast<long long>(o.context), static_cast<unsigned long long>(o.case_seed),
                  100.0 * c.depth, c.value.c_str());
    } else if (!o.prompt_ids.empty()) {
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

#if SHADOWKV_DECODE_CUDA
    if (o.device == "cuda") return run_cuda(o, dir, cfg, store, *tok, prompt);
#endif
    return run_policy<CpuBackend>(o, dir, cfg, store, *tok, prompt);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s: %s\nRun with --help for more information.\n", e.flag.c_str(), e.message.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
