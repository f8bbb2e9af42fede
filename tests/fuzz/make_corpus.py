#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into tests/fuzz/corpus/<target>/ (run it from
anywhere; it replaces the files it writes and leaves others alone). The seeds are small valid
files of each kind, so that the fuzzers start deep in the parsers, plus a few malformed ones
(named malformed_*: the reliability suite checks that exactly those are rejected).
Standard library only."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


# --- safetensors ---------------------------------------------------------------------------

def safetensors(tensors, metadata=True, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes) -> the file's bytes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = {"format": "pt"}
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":"))
    if pad:
        text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data


def f32(*values):
    return struct.pack("<%df" % len(values), *values)


def bf16(*values):
    return b"".join(struct.pack("<f", v)[2:] for v in values)


write("safetensors", "small_f32_bf16.safetensors",
      safetensors([("model.embed_tokens.weight", "F32", [2, 3], f32(1, -2, 3.5, 0, 8, -0.25)),
                   ("model.norm.weight", "BF16", [4], bf16(1, 1, 0.5, 2))]))
write("safetensors", "other_dtypes.safetensors",
      safetensors([("ids", "I64", [3], struct.pack("<3q", 7, 8, 9)),
                   ("scalar", "F16", [], struct.pack("<e", 1.5)),
                   ("empty", "F32", [0, 4], b""),
                   ("mask", "BOOL", [2, 2], bytes([1, 0, 0, 1])),
                   ("f8", "F8_E4M3", [2], bytes([0x38, 0xB8]))], metadata=False, pad=False))
write("safetensors", "rows.safetensors",
      safetensors([("layers.0.self_attn.q_proj.weight", "F32", [4, 2], f32(*range(8))),
                   ("layers.0.self_attn.k_proj.weight", "BF16", [2, 2], bf16(1, 2, 3, 4))]))
write("safetensors", "malformed_header_past_end.safetensors", struct.pack("<Q", 1 << 20) + b"{}")
overlap = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
write("safetensors", "malformed_overlap.safetensors", struct.pack("<Q", len(overlap)) + overlap + bytes(12))

# --- config.json ---------------------------------------------------------------------------

llama31 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
write("config_json", "llama31.json", json.dumps(llama31, indent=1))
write("config_json", "llama2_linear.json", json.dumps({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000, "rms_norm_eps": 1e-6,
    "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": {"type": "linear", "factor": 2.0}}))
write("config_json", "qwen2_yarn.json", json.dumps({
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
    "rope_theta": 1000000.0, "use_sliding_window": False, "max_position_embeddings": 32768,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}))
write("config_json", "yi_dynamic.json", json.dumps({
    "architectures": ["YiForCausalLM"], "model_type": "Yi", "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 32, "vocab_size": 64000,
    "rope_theta": 5000000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
write("config_json", "glm4_chatglm.json", json.dumps({
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": 4096, "ffn_hidden_size": 13696,
    "num_layers": 40, "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
    "kv_channels": 128, "padded_vocab_size": 151552, "layernorm_epsilon": 1.5625e-07, "rmsnorm": True,
    "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "seq_length": 131072,
    "rope_ratio": 500, "eos_token_id": [151329, 151336, 151338]}))
write("config_json", "glm_transformers.json", json.dumps({
    "architectures": ["GlmForCausalLM"], "hidden_size": 4096, "intermediate_size": 13696,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 40,
    "vocab_size": 151552, "partial_rotary_factor": 0.5, "attention_bias": True, "rope_theta": 10000.0}))
write("config_json", "tiny_bytes.json", json.dumps({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 258,
    "bos_token_id": 256, "eos_token_id": 257, "shadowkv_tokenizer": "bytes"}))
write("config_json", "malformed_heads.json", '{"architectures": ["LlamaForCausalLM"], "hidden_size": 100, '
      '"intermediate_size": 8, "num_attention_heads": 3, "num_key_value_heads": 2, "num_hidden_layers": 1, '
      '"vocab_size": 10}')

# --- tokenizer.json ------------------------------------------------------------------------

def byte_level(b):
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the others take
    U+0100, U+0101, ... in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [x for x in range(256) if x not in printable]
    return chr(b) if b in printable else chr(0x100 + extra.index(b))


def spell(text):
    return "".join(byte_level(b) for b in text.encode("utf-8"))


CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
WORDS = r"[^\r\n\p{L}\p{N}]?\p{L}+|"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3 = CONTRACTIONS + WORDS + r"\p{N}{1,3}" + REST
QWEN2 = CONTRACTIONS + WORDS + r"\p{N}" + REST


def tokenizer(pre_tokenizer, merges, added, add_prefix_space=False):
    vocab = {byte_level(b): b for b in range(256)}
    for pair in merges:
        left, right = pair.split(" ")
        vocab.setdefault(left + right, len(vocab))
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


MERGES = [spell(" ") + " t", "h e", spell(" t") + " he", "l l", "ll o", spell(" ") + " w", "o r", "1 2", "12 3"]
SPECIAL = [{"id": 300, "content": "<|begin|>", "special": True, "lstrip": False, "rstrip": False,
            "single_word": False, "normalized": False},
           {"id": 301, "content": "<|end|>", "special": True}]


def split_then_byte_level(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


llama3_tok = tokenizer(split_then_byte_level(LLAMA3), MERGES, SPECIAL)
write("tokenizer_json", "llama3.json", json.dumps(llama3_tok, ensure_ascii=False))
write("tokenizer_json", "llama3_with_text.json",
      json.dumps(llama3_tok, ensure_ascii=False) + "\0the 12345 hello world<|end|>\n\n  x")
qwen2_tok = tokenizer(split_then_byte_level(QWEN2), MERGES, SPECIAL[1:])
qwen2_tok["model"]["merges"] = [m.split(" ") for m in MERGES]  # the newer [a, b] form
write("tokenizer_json", "qwen2_pair_merges.json", json.dumps(qwen2_tok, ensure_ascii=False))
gpt2_tok = tokenizer({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                     MERGES, [{"id": 310, "content": "<mask>", "special": True, "lstrip": True, "rstrip": False},
                              {"id": 311, "content": "[tool]", "special": False, "single_word": True}],
                     add_prefix_space=True)
write("tokenizer_json", "gpt2_style.json", json.dumps(gpt2_tok, ensure_ascii=False) + "\0 hello <mask> [tool]x")
