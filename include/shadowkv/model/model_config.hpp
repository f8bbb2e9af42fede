#pragma once
/// \file model/model_config.hpp
/// \brief A Hugging Face `config.json` as the example decoders need it (`ModelConfig`), for the
/// Llama family (Llama 2 / 3 / 3.1, Yi), Qwen2 and GLM-4 (both the original `ChatGLMModel`
/// checkpoints and transformers' `GlmForCausalLM`), and where each architecture keeps its
/// weights (`layer_weights`, `model_weights`): names, expected shapes, and the row ranges of
/// fused tensors.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/rope.hpp"
#include "../core/tensor.hpp"
#include "json_reader.hpp"

namespace shadowkv::model {

/// Weight layouts the loader knows. Several config.json `architectures` share one.
enum class Architecture {
  llama,    ///< LlamaForCausalLM (Llama 2, 3, 3.1, Yi converted to Llama naming)
  yi,       ///< YiForCausalLM: Llama with the norms named `ln1` / `ln2`
  qwen2,    ///< Qwen2ForCausalLM: Llama naming, q/k/v biases
  chatglm,  ///< ChatGLMModel / ChatGLMForConditionalGeneration (GLM-4 as THUDM ships it)
  glm,      ///< GlmForCausalLM (GLM-4 converted to transformers naming, `-hf` checkpoints)
};

inline constexpr std::string_view to_string(Architecture a) {
  switch (a) {
    case Architecture::llama: return "llama";
    case Architecture::yi: return "yi";
    case Architecture::qwen2: return "qwen2";
    case Architecture::chatglm: return "chatglm";
    case Architecture::glm: return "glm";
  }
  return "unknown";
}

/// The config.json `architectures` entries accepted, for messages.
inline constexpr std::string_view kSupportedArchitectures =
    "LlamaForCausalLM, YiForCausalLM, Qwen2ForCausalLM, ChatGLMModel, ChatGLMForConditionalGeneration, "
    "GlmForCausalLM";

/// The shapes and constants of one checkpoint, in one naming whatever the architecture.
struct ModelConfig {
  Architecture architecture = Architecture::llama;
  std::string architecture_name;  ///< as config.json names it, e.g. "Qwen2ForCausalLM"
  std::string source;             ///< the file it was read from (named in errors)

  int hidden_size = 0;
  int num_layers = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int intermediate_size = 0;  ///< per branch of the gated MLP (gate and up each have this many rows)
  index_t vocab_size = 0;     ///< rows of the embedding and of the LM head (GLM: padded_vocab_size)
  double rms_norm_eps = 1e-6;
  index_t max_position_embeddings = 0;  ///< 0 when the config does not say

  RopeConfig rope{};
  /// config.json asked for transformers' "dynamic" NTK scaling. `rope` then holds the static
  /// NTK-aware base at `rope.factor`, which is what dynamic NTK uses at a context of factor ×
  /// the trained length; below that, transformers keeps the unscaled base. One fixed table
  /// cannot follow the sequence length, so shorter contexts see slightly different angles.
  bool rope_dynamic = false;

  bool tie_word_embeddings = false;  ///< the LM head is the embedding matrix
  bool qkv_bias = false;             ///< q/k/v projections have biases (Qwen2, GLM-4)
  bool o_bias = false;               ///< the output projection has a bias
  bool mlp_bias = false;             ///< gate/up/down have biases
  bool final_norm = true;            ///< a norm before the LM head (ChatGLM `post_layer_norm`)

  std::vector<std::int64_t> bos_token_ids;  ///< config.json `bos_token_id` (int or list; may be empty)
  std::vector<std::int64_t> eos_token_ids;  ///< config.json `eos_token_id` (int or list; may be empty)
  /// The project's own small models set `"shadowkv_tokenizer": "bytes"` in config.json: the
  /// byte tokenizer of tokenizer.hpp. Empty otherwise.
  std::string tokenizer;

  int group_size() const { return num_q_heads / num_kv_heads; }
  index_t q_dim() const { return static_cast<index_t>(num_q_heads) * head_dim; }
  index_t kv_dim() const { return static_cast<index_t>(num_kv_heads) * head_dim; }

  /// The attention shapes and RoPE of this model with every ShadowKV knob at its default
  /// (rank 160, chunk 8, budget 2048, ...). Small models need a smaller rank (at most
  /// `kv_dim()`) before `Config::validate` accepts them.
  Config attention_config() const {
    Config cfg;
    cfg.num_q_heads = num_q_heads;
    cfg.num_kv_heads = num_kv_heads;
    cfg.head_dim = head_dim;
    cfg.rope = rope;
    return cfg;
  }

  /// Throws naming `source` and the field when a size is not positive, the query heads are not
  /// a multiple of the KV heads, the RoPE parameters are invalid for head_dim, or a bos/eos id
  /// lies outside the vocabulary.
  void validate() const;
};

namespace detail {

template <class... Args>
[[noreturn]] void config_fail(const std::string& source, const Args&... message) {
  SHADOWKV_FAIL(source, ": ", message...);
}

}  // namespace detail

inline void ModelConfig::validate() const {
  auto positive = [&](const char* field, long long v) {
    if (v <= 0) detail::config_fail(source, field, "=", v, " must be positive");
  };
  positive("hidden_size", hidden_size);
  positive("num_layers", num_layers);
  positive("num_q_heads", num_q_heads);
  positive("num_kv_heads", num_kv_heads);
  positive("head_dim", head_dim);
  positive("intermediate_size", intermediate_size);
  positive("vocab_size", vocab_size);
  if (!(rms_norm_eps > 0.0))
    detail::config_fail(source, "rms_norm_eps=", rms_norm_eps, " must be positive");
  if (num_q_heads % num_kv_heads != 0)
    detail::config_fail(source, "inconsistent head counts: num_q_heads=", num_q_heads,
                        " is not a multiple of num_kv_heads=", num_kv_heads);
  try {
    shadowkv::validate(rope, head_dim);
  } catch (const Error& e) {
    detail::config_fail(source, "RoPE parameters: ", e.message());
  }
  for (const auto* ids : {&bos_token_ids, &eos_token_ids})
    for (std::int64_t id : *ids)
      if (id < 0 || id >= vocab_size)
        detail::config_fail(source, ids == &bos_token_ids ? "bos_token_id=" : "eos_token_id=", id,
                            " is outside the vocabulary [0, ", vocab_size, ")");
}

namespace detail {

inline std::optional<Architecture> architecture_from_name(std::string_view name) {
  if (name == "LlamaForCausalLM") return Architecture::llama;
  if (name == "YiForCausalLM") return Architecture::yi;
  if (name == "Qwen2ForCausalLM") return Architecture::qwen2;
  if (name == "ChatGLMModel" || name == "ChatGLMForConditionalGeneration") return Architecture::chatglm;
  if (name == "GlmForCausalLM") return Architecture::glm;
  return std::nullopt;
}

inline std::optional<Architecture> architecture_from_model_type(std::string_view type) {
  if (type == "llama") return Architecture::llama;
  if (type == "Yi" || type == "yi") return Architecture::yi;
  if (type == "qwen2") return Architecture::qwen2;
  if (type == "chatglm") return Architecture::chatglm;
  if (type == "glm") return Architecture::glm;
  return std::nullopt;
}

/// `bos_token_id` / `eos_token_id`: an integer, a list of integers, or absent.
inline std::vector<std::int64_t> token_ids(const JsonObject& cfg, std::string_view key) {
  const nlohmann::json* v = cfg.find(key);
  if (!v) return {};
  if (json_is_integral(*v)) return {cfg.integer(key, 0)};
  if (!v->is_array()) cfg.fail(key, "is ", json_kind(*v), ", expected an integer or a list of integers");
  std::vector<std::int64_t> ids;
  for (std::size_t i = 0; i < v->size(); ++i) {
    const nlohmann::json& e = (*v)[i];
    if (!json_is_integral(e) || json_to_int64(e) < 0)
      cfg.fail(std::string(key) + "[" + std::to_string(i) + "]", "is ", e.dump(), ", expected a non-negative integer");
    ids.push_back(json_to_int64(e));
  }
  return ids;
}

/// `rope_scaling` (transformers' keys) into `rope`; `rope.theta` and `rotary_dim` are set.
inline void parse_rope_scaling(const JsonObject& scaling, index_t max_position_embeddings, RopeConfig& rope,
                               bool& dynamic) {
  std::string type;
  std::string type_key = "rope_type";
  if (auto t = scaling.optional_string("rope_type")) {
    type = *t;
  } else if (auto legacy = scaling.optional_string("type")) {
    type = *legacy;
    type_key = "type";
  } else {
    scaling.fail("rope_type", "is missing (neither 'rope_type' nor 'type' is given)");
  }
  constexpr int kMaxInt = 1 << 30;
  if (type == "default") return;
  if (type == "dynamic") {
    dynamic = true;
    type = "ntk";
  }
  if (type != "linear" && type != "ntk" && type != "yarn" && type != "llama3")
    scaling.fail(type_key, "='", type, "' is not supported (supported: default, linear, dynamic, ntk, yarn, llama3)");
  rope.scaling = shadowkv::parse_rope_scaling(type);
  rope.factor = scaling.number("factor");
  if (rope.scaling == RopeScaling::llama3) {
    rope.low_freq_factor = scaling.number("low_freq_factor");
    rope.high_freq_factor = scaling.number("high_freq_factor");
    rope.original_max_position =
        static_cast<int>(scaling.integer("original_max_position_embeddings", 1, kMaxInt));
  } else if (rope.scaling == RopeScaling::yarn) {
    // transformers: the original length is the rope_scaling entry, else max_position_embeddings.
    if (auto orig = scaling.optional_integer("original_max_position_embeddings", 1, kMaxInt)) {
      rope.original_max_position = static_cast<int>(*orig);
    } else {
      if (max_position_embeddings <= 0)
        scaling.fail("original_max_position_embeddings",
                     "is missing and config.json has no max_position_embeddings to fall back on");
      rope.original_max_position = static_cast<int>(std::min<index_t>(max_position_embeddings, kMaxInt));
    }
    rope.beta_fast = scaling.optional_number("beta_fast").value_or(32.0);
    rope.beta_slow = scaling.optional_number("beta_slow").value_or(1.0);
    if (auto af = scaling.optional_number("attention_factor")) {
      rope.attention_factor = *af;
    } else if (scaling.has("mscale") && scaling.has("mscale_all_dim")) {
      // transformers: get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim).
      auto mscale = [&](double m) { return rope.factor <= 1.0 ? 1.0 : 0.1 * m * std::log(rope.factor) + 1.0; };
      rope.attention_factor = mscale(scaling.number("mscale")) / mscale(scaling.number("mscale_all_dim"));
    }
  }
}

}  // namespace detail

/// Parses a config.json already read as JSON; `source` names it in errors. Throws naming the
/// source and the field for: an unsupported architecture (listing the supported ones), a
/// missing required field, a field of the wrong JSON type or out of range, an unsupported
/// `rope_scaling`, features the decoder does not implement (ChatGLM LayerNorm instead of
/// RMSNorm, Qwen2 sliding-window attention), and everything `ModelConfig::validate` checks.
inline ModelConfig parse_model_config(const nlohmann::json& json, std::string source) {
  const JsonObject cfg(json, source);
  ModelConfig m;
  m.source = source;

  // The architecture: the first entry of `architectures` we know, else `model_type`.
  std::string listed;
  bool found = false;
  if (const nlohmann::json* archs = cfg.find("architectures")) {
    if (!archs->is_array()) cfg.fail("architectures", "is ", detail::json_kind(*archs), ", expected a list");
    for (const auto& a : *archs) {
      if (!a.is_string()) cfg.fail("architectures", "holds ", a.dump(), ", expected strings");
      const std::string name = a.get<std::string>();
      listed += (listed.empty() ? "" : ", ") + name;
      if (auto arch = detail::architecture_from_name(name); arch && !found) {
        m.architecture = *arch;
        m.architecture_name = name;
        found = true;
      }
    }
  }
  if (!found) {
    const auto model_type = cfg.optional_string("model_type");
    if (auto arch = model_type ? detail::architecture_from_model_type(*model_type) : std::nullopt) {
      m.architecture = *arch;
      m.architecture_name = *model_type;
    } else {
      detail::config_fail(source, "unsupported architecture (architectures=[", listed, "], model_type='",
                          model_type.value_or(""), "'); supported: ", kSupportedArchitectures);
    }
  }

  constexpr std::int64_t kMaxInt = 1 << 30;
  auto size = [&](std::string_view key) { return static_cast<int>(cfg.integer(key, 1, kMaxInt)); };
  // The head dim: the field `key` when present, else hidden_size / num_attention_heads (both
  // read into `m` first).
  auto head_dim_from = [&](std::string_view key) {
    if (cfg.has(key)) return size(key);
    if (m.hidden_size % m.num_q_heads != 0)
      detail::config_fail(source, "no ", key, " and hidden_size=", m.hidden_size,
                          " is not a multiple of num_attention_heads=", m.num_q_heads);
    return m.hidden_size / m.num_q_heads;
  };
  m.max_position_embeddings = cfg.optional_integer("max_position_embeddings", 1).value_or(0);
  m.tie_word_embeddings = cfg.boolean("tie_word_embeddings", false);
  m.bos_token_ids = detail::token_ids(cfg, "bos_token_id");
  m.eos_token_ids = detail::token_ids(cfg, "eos_token_id");
  m.tokenizer = cfg.optional_string("shadowkv_tokenizer").value_or("");
  if (!m.tokenizer.empty() && m.tokenizer != "bytes")
    cfg.fail("shadowkv_tokenizer", "='", m.tokenizer, "' is not supported (supported: bytes)");

  if (m.architecture == Architecture::chatglm) {
    // THUDM's naming (modeling_chatglm.py).
    m.hidden_size = size("hidden_size");
    m.num_layers = cfg.has("num_layers") ? size("num_layers") : size("num_hidden_layers");
    m.num_q_heads = size("num_attention_heads");
    m.num_kv_heads = cfg.boolean("multi_query_attention", false) ? size("multi_query_group_num") : m.num_q_heads;
    m.head_dim = head_dim_from("kv_channels");
    m.intermediate_size = size("ffn_hidden_size");
    m.vocab_size = cfg.integer("padded_vocab_size", 1, kMaxInt);
    m.rms_norm_eps = cfg.optional_number("layernorm_epsilon").value_or(1e-5);
    if (!cfg.boolean("rmsnorm", true))
      cfg.fail("rmsnorm", "is false: LayerNorm checkpoints are not supported (only RMSNorm)");
    if (cfg.boolean("apply_residual_connection_post_layernorm", false))
      cfg.fail("apply_residual_connection_post_layernorm", "is true, which is not supported");
    m.final_norm = cfg.boolean("post_layer_norm", true);
    m.qkv_bias = cfg.boolean("add_qkv_bias", false);
    m.o_bias = m.mlp_bias = cfg.boolean("add_bias_linear", false);
    if (!m.max_position_embeddings) m.max_position_embeddings = cfg.optional_integer("seq_length", 1).value_or(0);
    // GLM-4 rotates the first half of each head, pairs interleaved, base 10000 * rope_ratio.
    m.rope.layout = RopeLayout::interleaved;
    m.rope.rotary_dim = m.head_dim / 2;
    m.rope.theta = 10000.0 * cfg.optional_number("rope_ratio").value_or(1.0);
  } else {
    m.hidden_size = size("hidden_size");
    m.num_layers = size("num_hidden_layers");
    m.num_q_heads = size("num_attention_heads");
    m.num_kv_heads = cfg.has("num_key_value_heads") ? size("num_key_value_heads") : m.num_q_heads;
    m.head_dim = head_dim_from("head_dim");
    m.intermediate_size = size("intermediate_size");
    m.vocab_size = cfg.integer("vocab_size", 1, kMaxInt);
    m.rms_norm_eps = cfg.optional_number("rms_norm_eps").value_or(1e-6);
    m.rope.theta = cfg.optional_number("rope_theta").value_or(10000.0);

    switch (m.architecture) {
      case Architecture::qwen2:
        m.qkv_bias = true;  // Qwen2 always has them; config.json does not say
        if (cfg.boolean("use_sliding_window", false))
          cfg.fail("use_sliding_window", "is true: sliding-window attention is not supported");
        break;
      case Architecture::glm:
        m.qkv_bias = cfg.boolean("attention_bias", true);  // transformers' GlmConfig default
        m.rope.layout = RopeLayout::interleaved;
        break;
      default:  // Llama, Yi
        m.qkv_bias = m.o_bias = cfg.boolean("attention_bias", false);
        m.mlp_bias = cfg.boolean("mlp_bias", false);
        break;
    }

    const double partial = cfg.optional_number("partial_rotary_factor")
                               .value_or(m.architecture == Architecture::glm ? 0.5 : 1.0);
    if (!(partial > 0.0 && partial <= 1.0))
      cfg.fail("partial_rotary_factor", "=", partial, " must be in (0, 1]");
    if (partial < 1.0) m.rope.rotary_dim = static_cast<int>(m.head_dim * partial);

    if (auto scaling = cfg.optional_object("rope_scaling"))
      detail::parse_rope_scaling(*scaling, m.max_position_embeddings, m.rope, m.rope_dynamic);
  }

  m.validate();
  return m;
}

/// Reads `path`: a config.json, or a folder holding one.
inline ModelConfig load_model_config(const std::filesystem::path& path) {
  const std::filesystem::path file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  return parse_model_config(detail::read_json_file(file), file.string());
}

// --- where the weights are --------------------------------------------------------------------

/// One weight of the common naming, located in a checkpoint: tensor `tensor`, rows
/// `[row_begin, row_begin + shape[0])` of it. `tensor_shape` is the whole tensor's shape, which
/// differs from `shape` for fused tensors (GLM-4's `query_key_value`, `dense_h_to_4h`,
/// `gate_up_proj`). Weights are PyTorch `Linear` layout `[out_features, in_features]`; biases
/// and norms are `[n]`. An empty `tensor` means the model has no such weight.
struct WeightRef {
  std::string tensor;
  index_t row_begin = 0;
  std::vector<index_t> shape;         ///< this weight
  std::vector<index_t> tensor_shape;  ///< the tensor that holds it
  std::string shape_names;            ///< `tensor_shape` in config terms, for messages

  bool empty() const { return tensor.empty(); }
  bool is_slice() const { return shape != tensor_shape; }
  index_t numel() const {
    index_t n = 1;
    for (index_t s : shape) n *= s;
    return n;
  }
};

/// The weights of one decoder layer in the common naming. Bias fields are empty when the
/// model has none.
struct LayerWeights {
  WeightRef input_norm;           ///< [hidden]
  WeightRef q_proj, k_proj, v_proj;  ///< [H_q d, hidden], [H_kv d, hidden], [H_kv d, hidden]
  WeightRef q_bias, k_bias, v_bias;  ///< [H_q d], [H_kv d], [H_kv d]
  WeightRef o_proj, o_bias;          ///< [hidden, H_q d], [hidden]
  WeightRef post_attention_norm;     ///< [hidden]
  WeightRef gate_proj, up_proj;      ///< [intermediate, hidden] each
  WeightRef gate_bias, up_bias;      ///< [intermediate]
  WeightRef down_proj, down_bias;    ///< [hidden, intermediate], [hidden]

  /// Every non-empty weight (copies, so `for (auto& w : layer_weights(cfg, l).all())` is safe).
  std::vector<WeightRef> all() const {
    std::vector<WeightRef> out;
    for (const WeightRef* w : {&input_norm, &q_proj, &k_proj, &v_proj, &q_bias, &k_bias, &v_bias, &o_proj,
                               &o_bias, &post_attention_norm, &gate_proj, &up_proj, &gate_bias, &up_bias,
                               &down_proj, &down_bias})
      if (!w->empty()) out.push_back(*w);
    return out;
  }
};

/// The weights outside the layers. `lm_head` names the embedding tensor when the model ties
/// them; `final_norm` is empty when the model has none.
struct ModelWeights {
  WeightRef embed_tokens;  ///< [vocab, hidden]
  WeightRef final_norm;    ///< [hidden]
  WeightRef lm_head;       ///< [vocab, hidden]

  /// Every non-empty weight (copies, as `LayerWeights::all`).
  std::vector<WeightRef> all() const {
    std::vector<WeightRef> out;
    for (const WeightRef* w : {&embed_tokens, &final_norm, &lm_head})
      if (!w->empty()) out.push_back(*w);
    return out;
  }
};

namespace detail {

/// A whole tensor.
inline WeightRef whole(std::string tensor, std::vector<index_t> shape, std::string names) {
  WeightRef w;
  w.tensor = std::move(tensor);
  w.shape = shape;
  w.tensor_shape = std::move(shape);
  w.shape_names = std::move(names);
  return w;
}

/// Rows `[row_begin, row_begin + rows)` of a tensor of shape `tensor_shape`.
inline WeightRef rows_of(std::string tensor, std::vector<index_t> tensor_shape, std::string names,
                         index_t row_begin, index_t rows) {
  WeightRef w;
  w.tensor = std::move(tensor);
  w.row_begin = row_begin;
  w.shape = tensor_shape;
  w.shape[0] = rows;
  w.tensor_shape = std::move(tensor_shape);
  w.shape_names = std::move(names);
  return w;
}

}  // namespace detail

/// Where layer `layer` (in [0, num_layers)) of `cfg`'s architecture keeps each weight, with the
/// shapes `cfg` implies. Llama/Qwen2/Glm: `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
/// `mlp.{gate,up,down}_proj` (Glm: `mlp.gate_up_proj` = gate ‖ up), `input_layernorm`,
/// `post_attention_layernorm` (Yi: `ln1`, `ln2`). ChatGLM:
/// `transformer.encoder.layers.{i}.self_attention.query_key_value` = q ‖ k ‖ v (rows),
/// `self_attention.dense`, `mlp.dense_h_to_4h` = gate ‖ up, `mlp.dense_4h_to_h`.
inline LayerWeights layer_weights(const ModelConfig& cfg, int layer) {
  SHADOWKV_CHECK(layer >= 0 && layer < cfg.num_layers, "layer=", layer, " is outside [0, num_layers=",
                 cfg.num_layers, ")");
  using detail::rows_of;
  using detail::whole;
  const index_t hidden = cfg.hidden_size, q = cfg.q_dim(), kv = cfg.kv_dim(), inter = cfg.intermediate_size;
  LayerWeights w;

  if (cfg.architecture == Architecture::chatglm) {
    const std::string p = "transformer.encoder.layers." + std::to_string(layer) + ".";
    w.input_norm = whole(p + "input_layernorm.weight", {hidden}, "[hidden_size]");
    w.post_attention_norm = whole(p + "post_attention_layernorm.weight", {hidden}, "[hidden_size]");
    const std::string qkv = p + "self_attention.query_key_value.";
    const std::vector<index_t> qkv_shape{q + 2 * kv, hidden};
    const std::string qkv_names = "[(num_q_heads + 2*num_kv_heads)*head_dim, hidden_size]";
    w.q_proj = rows_of(qkv + "weight", qkv_shape, qkv_names, 0, q);
    w.k_proj = rows_of(qkv + "weight", qkv_shape, qkv_names, q, kv);
    w.v_proj = rows_of(qkv + "weight", qkv_shape, qkv_names, q + kv, kv);
    if (cfg.qkv_bias) {
      const std::vector<index_t> bias_shape{q + 2 * kv};
      const std::string bias_names = "[(num_q_heads + 2*num_kv_heads)*head_dim]";
      w.q_bias = rows_of(qkv + "bias", bias_shape, bias_names, 0, q);
      w.k_bias = rows_of(qkv + "bias", bias_shape, bias_names, q, kv);
      w.v_bias = rows_of(qkv + "bias", bias_shape, bias_names, q + kv, kv);
    }
    w.o_proj = whole(p + "self_attention.dense.weight", {hidden, q}, "[hidden_size, num_q_heads*head_dim]");
    if (cfg.o_bias) w.o_bias = whole(p + "self_attention.dense.bias", {hidden}, "[hidden_size]");
    const std::vector<index_t> h4h{2 * inter, hidden};
    const std::string h4h_names = "[2*ffn_hidden_size, hidden_size]";
    w.gate_proj = rows_of(p + "mlp.dense_h_to_4h.weight", h4h, h4h_names, 0, inter);
    w.up_proj = rows_of(p + "mlp.dense_h_to_4h.weight", h4h, h4h_names, inter, inter);
    w.down_proj = whole(p + "mlp.dense_4h_to_h.weight", {hidden, inter}, "[hidden_size, ffn_hidden_size]");
    if (cfg.mlp_bias) {
      w.gate_bias = rows_of(p + "mlp.dense_h_to_4h.bias", {2 * inter}, "[2*ffn_hidden_size]", 0, inter);
      w.up_bias = rows_of(p + "mlp.dense_h_to_4h.bias", {2 * inter}, "[2*ffn_hidden_size]", inter, inter);
      w.down_bias = whole(p + "mlp.dense_4h_to_h.bias", {hidden}, "[hidden_size]");
    }
    return w;
  }

  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const bool yi = cfg.architecture == Architecture::yi;
  w.input_norm = whole(p + (yi ? "ln1.weight" : "input_layernorm.weight"), {hidden}, "[hidden_size]");
  w.post_attention_norm = whole(p + (yi ? "ln2.weight" : "post_attention_layernorm.weight"), {hidden},
                                "[hidden_size]");
  const std::string a = p + "self_attn.";
  w.q_proj = whole(a + "q_proj.weight", {q, hidden}, "[num_q_heads*head_dim, hidden_size]");
  w.k_proj = whole(a + "k_proj.weight", {kv, hidden}, "[num_kv_heads*head_dim, hidden_size]");
  w.v_proj = whole(a + "v_proj.weight", {kv, hidden}, "[num_kv_heads*head_dim, hidden_size]");
  if (cfg.qkv_bias) {
    w.q_bias = whole(a + "q_proj.bias", {q}, "[num_q_heads*head_dim]");
    w.k_bias = whole(a + "k_proj.bias", {kv}, "[num_kv_heads*head_dim]");
    w.v_bias = whole(a + "v_proj.bias", {kv}, "[num_kv_heads*head_dim]");
  }
  w.o_proj = whole(a + "o_proj.weight", {hidden, q}, "[hidden_size, num_q_heads*head_dim]");
  if (cfg.o_bias) w.o_bias = whole(a + "o_proj.bias", {hidden}, "[hidden_size]");
  const std::string m = p + "mlp.";
  if (cfg.architecture == Architecture::glm) {
    const std::vector<index_t> gu{2 * inter, hidden};
    w.gate_proj = rows_of(m + "gate_up_proj.weight", gu, "[2*intermediate_size, hidden_size]", 0, inter);
    w.up_proj = rows_of(m + "gate_up_proj.weight", gu, "[2*intermediate_size, hidden_size]", inter, inter);
    if (cfg.mlp_bias) {
      w.gate_bias = rows_of(m + "gate_up_proj.bias", {2 * inter}, "[2*intermediate_size]", 0, inter);
      w.up_bias = rows_of(m + "gate_up_proj.bias", {2 * inter}, "[2*intermediate_size]", inter, inter);
    }
  } else {
    w.gate_proj = whole(m + "gate_proj.weight", {inter, hidden}, "[intermediate_size, hidden_size]");
    w.up_proj = whole(m + "up_proj.weight", {inter, hidden}, "[intermediate_size, hidden_size]");
    if (cfg.mlp_bias) {
      w.gate_bias = whole(m + "gate_proj.bias", {inter}, "[intermediate_size]");
      w.up_bias = whole(m + "up_proj.bias", {inter}, "[intermediate_size]");
    }
  }
  w.down_proj = whole(m + "down_proj.weight", {hidden, inter}, "[hidden_size, intermediate_size]");
  if (cfg.mlp_bias) w.down_bias = whole(m + "down_proj.bias", {hidden}, "[hidden_size]");
  return w;
}

/// Embedding, final norm and LM head of `cfg`'s architecture.
inline ModelWeights model_weights(const ModelConfig& cfg) {
  using detail::whole;
  const index_t hidden = cfg.hidden_size, vocab = cfg.vocab_size;
  const bool glm = cfg.architecture == Architecture::chatglm;
  const char* vocab_name = glm ? "[padded_vocab_size, hidden_size]" : "[vocab_size, hidden_size]";
  ModelWeights w;
  w.embed_tokens =
      whole(glm ? "transformer.embedding.word_embeddings.weight" : "model.embed_tokens.weight", {vocab, hidden},
            vocab_name);
  if (cfg.final_norm)
    w.final_norm = whole(glm ? "transformer.encoder.final_layernorm.weight" : "model.norm.weight", {hidden},
                         "[hidden_size]");
  w.lm_head = cfg.tie_word_embeddings
                  ? w.embed_tokens
                  : whole(glm ? "transformer.output_layer.weight" : "lm_head.weight", {vocab, hidden}, vocab_name);
  return w;
}

}  // namespace shadowkv::model
