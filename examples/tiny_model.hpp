#pragma once
// The default model of shadowkv-decode until the trained model of issue 7 replaces it: a tiny
// Llama-architecture checkpoint with seeded random weights, written by code (nothing is
// downloaded). Its output is gibberish by design — it exercises loading, the decoder and the
// attention policies end to end, not language.
//
// Shapes: 4 layers, hidden 256, 4 query / 2 KV heads of dim 64 (GQA group 2), SwiGLU 512,
// byte vocabulary 256 + bos (256) + eos (257), untied LM head, RoPE theta 10000, BF16 weights
// (as real checkpoints ship them). About 2.9 M parameters, 5.8 MB on disk.
//
// The bytes written depend only on the seed: a SplitMix64 stream with a hand-written
// Box-Muller transform (std::normal_distribution differs between standard libraries), the
// safetensors header written by hand in a fixed order.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <shadowkv/core/dtype.hpp>
#include <shadowkv/core/error.hpp>

#include "synthetic_rng.hpp"

namespace shadowkv_examples {

struct TinyModelShape {
  int num_layers = 4;
  int hidden = 256;
  int q_heads = 4;
  int kv_heads = 2;
  int head_dim = 64;
  int intermediate = 512;
  int vocab = 258;  // bytes + bos + eos
};

/// Writes `dir/config.json` and `dir/model.safetensors` (creating `dir`). Throws
/// `shadowkv::Error` naming the file when it cannot be written.
inline void write_tiny_model(const std::filesystem::path& dir, std::uint64_t seed = 7,
                             const TinyModelShape& s = {}) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  SHADOWKV_CHECK(fs::is_directory(dir), "cannot create the tiny model folder '", dir.string(), "'");

  struct Tensor {
    std::string name;
    std::vector<std::int64_t> shape;
    std::vector<shadowkv::bf16> data;
  };
  std::vector<Tensor> tensors;
  Rng rng(seed);
  // Weights ~ N(0, 1/in) keep activations O(1) through the layers; the embedding is larger so
  // that the logits of different tokens differ clearly; norms are 1 with a little noise.
  auto matrix = [&](std::string name, int out, int in, float scale) {
    Tensor t{std::move(name), {out, in}, std::vector<shadowkv::bf16>(static_cast<std::size_t>(out) * in)};
    for (auto& x : t.data) x = static_cast<shadowkv::bf16>(scale * rng.normal());
    tensors.push_back(std::move(t));
  };
  auto norm = [&](std::string name, int n) {
    Tensor t{std::move(name), {n}, std::vector<shadowkv::bf16>(static_cast<std::size_t>(n))};
    for (auto& x : t.data) x = static_cast<shadowkv::bf16>(1.0f + 0.1f * rng.normal());
    tensors.push_back(std::move(t));
  };
  const int q_dim = s.q_heads * s.head_dim, kv_dim = s.kv_heads * s.head_dim;
  const auto inv_sqrt = [](int n) { return 1.0f / std::sqrt(static_cast<float>(n)); };
  matrix("model.embed_tokens.weight", s.vocab, s.hidden, 1.0f);
  for (int l = 0; l < s.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    norm(p + "input_layernorm.weight", s.hidden);
    matrix(p + "self_attn.q_proj.weight", q_dim, s.hidden, inv_sqrt(s.hidden));
    matrix(p + "self_attn.k_proj.weight", kv_dim, s.hidden, inv_sqrt(s.hidden));
    matrix(p + "self_attn.v_proj.weight", kv_dim, s.hidden, inv_sqrt(s.hidden));
    matrix(p + "self_attn.o_proj.weight", s.hidden, q_dim, inv_sqrt(q_dim));
    norm(p + "post_attention_layernorm.weight", s.hidden);
    matrix(p + "mlp.gate_proj.weight", s.intermediate, s.hidden, inv_sqrt(s.hidden));
    matrix(p + "mlp.up_proj.weight", s.intermediate, s.hidden, inv_sqrt(s.hidden));
    matrix(p + "mlp.down_proj.weight", s.hidden, s.intermediate, inv_sqrt(s.intermediate));
  }
  norm("model.norm.weight", s.hidden);
  matrix("lm_head.weight", s.vocab, s.hidden, 2.0f * inv_sqrt(s.hidden));

  // safetensors: u64 little-endian header length, JSON header (padded to 8), data.
  std::string header = R"({"__metadata__":{"format":"pt","shadowkv":"tiny random model, seed )" +
                       std::to_string(seed) + "\"}";
  std::uint64_t offset = 0;
  for (const Tensor& t : tensors) {
    const std::uint64_t bytes = t.data.size() * sizeof(shadowkv::bf16);
    header += ",\"" + t.name + "\":{\"dtype\":\"BF16\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';

  const fs::path weights = dir / "model.safetensors";
  {
    std::ofstream out(weights, std::ios::binary | std::ios::trunc);
    char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
    out.write(len, 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const Tensor& t : tensors)
      out.write(reinterpret_cast<const char*>(t.data.data()),
                static_cast<std::streamsize>(t.data.size() * sizeof(shadowkv::bf16)));
    SHADOWKV_CHECK(out.good(), "cannot write '", weights.string(), "'");
  }
  const fs::path config = dir / "config.json";
  std::ofstream out(config, std::ios::trunc);
  out << "{\n"
      << "  \"architectures\": [\"LlamaForCausalLM\"],\n"
      << "  \"model_type\": \"llama\",\n"
      << "  \"hidden_size\": " << s.hidden << ",\n"
      << "  \"num_hidden_layers\": " << s.num_layers << ",\n"
      << "  \"num_attention_heads\": " << s.q_heads << ",\n"
      << "  \"num_key_value_heads\": " << s.kv_heads << ",\n"
      << "  \"head_dim\": " << s.head_dim << ",\n"
      << "  \"intermediate_size\": " << s.intermediate << ",\n"
      << "  \"vocab_size\": " << s.vocab << ",\n"
      << "  \"rms_norm_eps\": 1e-05,\n"
      << "  \"rope_theta\": 10000.0,\n"
      << "  \"max_position_embeddings\": 131072,\n"
      << "  \"tie_word_embeddings\": false,\n"
      << "  \"bos_token_id\": 256,\n"
      << "  \"eos_token_id\": 257,\n"
      << "  \"torch_dtype\": \"bfloat16\",\n"
      << "  \"shadowkv_tokenizer\": \"bytes\",\n"
      << "  \"shadowkv_note\": \"tiny random model (seed " << seed
      << "): output is gibberish by design until the trained model replaces it\"\n"
      << "}\n";
  SHADOWKV_CHECK(out.good(), "cannot write '", config.string(), "'");
}

}  // namespace shadowkv_examples
