// `Decoder<Policy, CudaBackend>` (cuBLAS LinearOps + CUDA SparseAttention) against
// `Decoder<Policy, CpuBackend>` on the examples' tiny default model: the logits of every prompt
// token and of each decode step within a relative tolerance, and the same greedy tokens, for
// the dense policy and ShadowKV at full rank with a budget >= context (where it is exact).

#include <algorithm>
#include <string>
#include <vector>

#include <shadowkv/model/decoder_cuda.cuh>
#include <shadowkv/model/model.hpp>

#include "../../examples/tiny_model.hpp"
#include "../safetensors_writer.hpp"
#include "gpu_test_util.cuh"

using namespace shadowkv;
using namespace shadowkv::model;

TEST_SUITE_BEGIN("gpu_decoder");

namespace {

// Both paths run float weights and activations; they differ in summation order only (cuBLAS vs
// Eigen, tree vs serial reductions, the attention kernels), through 4 layers.
constexpr double kLogitTolerance = 1e-3;  // relative norm error of a logits block

double logit_error(const std::vector<float>& gpu, const std::vector<float>& cpu) {
  REQUIRE(gpu.size() == cpu.size());
  return skv_test::rel_error(std::vector<double>(gpu.begin(), gpu.end()), std::vector<double>(cpu.begin(), cpu.end()));
}

token_id argmax(const std::vector<float>& logits) {
  return static_cast<token_id>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

/// bos + the bytes of a short sentence (49 tokens).
std::vector<token_id> tiny_prompt(const ModelConfig& cfg, const Tokenizer& tok) {
  std::vector<token_id> prompt = {static_cast<token_id>(cfg.bos_token_ids.at(0))};
  const auto text = tok.encode("ShadowKV keeps low-rank keys and offloads values");
  prompt.insert(prompt.end(), text.begin(), text.end());
  return prompt;
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

/// Prefill (every prompt token's logits), then `steps` greedy decode steps, both backends fed
/// the CPU's tokens; then `generate` end to end on both.
template <AttentionPolicy Policy>
void check_against_cpu(const ModelConfig& cfg, const WeightStore& store, const std::vector<token_id>& prompt,
                       int steps) {
  const Config knobs = full_config(cfg, static_cast<index_t>(prompt.size()) + steps);
  Decoder<Policy, CpuBackend> cpu(cfg, store, knobs);
  Decoder<Policy, CudaBackend> gpu(cfg, store, knobs);
  CHECK(gpu.weight_bytes() == cpu.weight_bytes());

  const SeqId id = 3;
  const SeqId ids[1] = {id};
  cpu.add_sequence(id);
  gpu.add_sequence(id);
  std::vector<float> cpu_all, gpu_all;
  std::vector<float> cpu_logits = cpu.prefill(id, prompt, 16, {}, &cpu_all);
  std::vector<float> gpu_logits = gpu.prefill(id, prompt, 16, {}, &gpu_all);
  CHECK(gpu.attention().length(id) == static_cast<index_t>(prompt.size()));
  CHECK(logit_error(gpu_all, cpu_all) < kLogitTolerance);
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    CHECK(logit_error(gpu_logits, cpu_logits) < kLogitTolerance);
    const token_id next[1] = {argmax(cpu_logits)};
    CHECK(argmax(gpu_logits) == next[0]);
    cpu_logits = cpu.decode(ids, next);
    gpu_logits = gpu.decode(ids, next);
  }
  CHECK(logit_error(gpu_logits, cpu_logits) < kLogitTolerance);
  cpu.remove_sequence(id);
  gpu.remove_sequence(id);

  GenerationOptions opt;
  opt.max_new_tokens = steps;
  opt.stop_at_eos = false;
  opt.prefill_chunk = 16;
  const GenerationResult rc = cpu.generate(prompt, opt);
  const GenerationResult rg = gpu.generate(prompt, opt);
  CHECK(rc.tokens.size() == static_cast<std::size_t>(steps));
  CHECK(rg.tokens == rc.tokens);
  CHECK(rg.decode_steps == rc.decode_steps);
  CHECK(rg.memory.device_bytes == rc.memory.device_bytes);
  CHECK(rg.memory.host_bytes == rc.memory.host_bytes);
  CHECK(gpu.attention().num_sequences() == 0);
}

}  // namespace

TEST_CASE("gpu decoder: the tiny default model gives the CPU decoder's logits and greedy tokens (dense)") {
  SKV_REQUIRE_GPU();
  skv_test::TempDir dir;
  shadowkv_examples::write_tiny_model(dir.path(), 7);
  const ModelConfig cfg = load_model_config(dir.path());
  const WeightStore store(dir.path());
  const auto tok = load_tokenizer(dir.path(), cfg);
  check_against_cpu<DensePolicy>(cfg, store, tiny_prompt(cfg, *tok), 12);
}

TEST_CASE("gpu decoder: ShadowKV at full rank with budget >= context gives the CPU decoder's greedy tokens") {
  SKV_REQUIRE_GPU();
  skv_test::TempDir dir;
  shadowkv_examples::write_tiny_model(dir.path(), 7);
  const ModelConfig cfg = load_model_config(dir.path());
  const WeightStore store(dir.path());
  const auto tok = load_tokenizer(dir.path(), cfg);
  check_against_cpu<ShadowKVPolicy>(cfg, store, tiny_prompt(cfg, *tok), 12);
}

TEST_CASE("gpu decoder: batched decode of two sequences equals one at a time") {
  SKV_REQUIRE_GPU();
  skv_test::TempDir dir;
  shadowkv_examples::write_tiny_model(dir.path(), 7);
  const ModelConfig cfg = load_model_config(dir.path());
  const WeightStore store(dir.path());
  const auto tok = load_tokenizer(dir.path(), cfg);
  const std::vector<token_id> a = tiny_prompt(cfg, *tok);
  const std::vector<token_id> b(a.begin(), a.begin() + 29);
  const Config knobs = full_config(cfg, static_cast<index_t>(a.size()) + 4);
  Decoder<DensePolicy, CudaBackend> batched(cfg, store, knobs), single(cfg, store, knobs);
  for (SeqId id : {0, 1}) batched.add_sequence(id);
  const std::vector<float> la = batched.prefill(0, a), lb = batched.prefill(1, b);
  const SeqId ids[2] = {0, 1};
  const token_id next[2] = {argmax(la), argmax(lb)};
  const std::vector<float> both = batched.decode(ids, next);
  const auto vocab = static_cast<std::ptrdiff_t>(cfg.vocab_size);
  REQUIRE(both.size() == static_cast<std::size_t>(2 * vocab));
  for (SeqId id : {0, 1}) {
    CAPTURE(id);
    single.add_sequence(id);
    (void)single.prefill(id, id == 0 ? a : b);
    const SeqId one[1] = {id};
    const token_id tok1[1] = {next[id]};
    const std::vector<float> l = single.decode(one, tok1);
    const std::vector<float> row(both.begin() + id * vocab, both.begin() + (id + 1) * vocab);
    CHECK(logit_error(row, l) < kLogitTolerance);
    single.remove_sequence(id);
  }
}

TEST_SUITE_END();
