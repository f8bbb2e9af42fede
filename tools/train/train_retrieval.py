#!/usr/bin/env python3
"""Trains shadowkv's small retrieval model (issue 7) and exports it for the C++ decoder.

A Llama-architecture decoder (RMSNorm, RoPE in the Hugging Face `rotate_half` layout, GQA,
SwiGLU, untied LM head) over bytes (ids 0..255, bos 256, eos 257), trained on two synthetic
long-context retrieval tasks in the spirit of RULER, hidden in filler sentences drawn from
`words.txt`:

- passkey: one 5-digit pass key stated once somewhere in the filler, asked for at the end;
- mk-niah: several "special magic numbers" (7 digits) each tied to a key made of two words,
  one key asked for at the end (the other needles are distractors).

The loss is cross-entropy on the answer (digits + eos), plus a small weight on predicting every
byte. A curriculum raises the longest context from 512 to 16384 tokens. Each run stops at
`--minutes`, writes a checkpoint that the next run can resume (`--resume`), and exports
`config.json`, `model.safetensors` (BF16), `tasks.json` and `words.txt` into `--out`, the folder
the C++ decoder and accuracy harness load. `--init CKPT` (a checkpoint, or an exported folder such
as models/retrieval-6l) starts from an earlier run's weights and step with fresh optimizer
moments (runs 4-6 started from run 3 this way); with `--grow` it also
inserts fresh layers that start as the identity (run 7 grew run 6 from 4 to 6 layers).
`--mk-key letter` swaps the two-word keys for one capital letter (tried, not shipped). The
`--focus-*` options set what the focus phase's short prompts hold (defaults: runs 6-9's mix);
`--focus-from 0` starts a run from scratch in that phase, and `--first-digit-weight` weighs the
first token of each answer (the digit that decides which needle is copied) above the rest.
`--rope-factor` turns on Llama 3.1 RoPE scaling (more dimensions that barely rotate over a long
prompt, for matching keys at any distance) and `--reinit-qk` gives chosen heads fresh query and
key projections: runs 12-14, which made the shipped model from run 9's, used both.

The task texts live in TASKS below and are written into tasks.json: the C++ accuracy harness
builds its test prompts from that file, so training and testing use one definition.

Runs on a GPU with PyTorch >= 2.0 (flash attention through scaled_dot_product_attention);
`--smoke` runs a few steps of a tiny model on the CPU to check the script itself;
tools/train/test_train.py (run by scripts/test) does that and more.
"""

import argparse
import json
import math
import os
import random
import string
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS, EOS, VOCAB = 256, 257, 258
HERE = os.path.dirname(os.path.abspath(__file__))

# The two tasks. {v} is the value, {k} the key; the prompt is bos + prefix + haystack + query
# and the answer is the value's digits + eos.
TASKS = {
    "passkey": {
        "prefix": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. ",
        "needle": "The pass key is {v}. Remember it. {v} is the pass key.",
        "query": " What is the pass key? The pass key is ",
        "value_digits": 5,
        "needles": 1,
    },
    "mk-niah": {
        "prefix": "Some special magic numbers are hidden inside a lot of irrelevant text. "
                  "Find them and memorize them. ",
        # The key sits right before its value ("{k}: {v}"), as the query ends ("{k}: "): the
        # first version had " is: " in between, and 8 minutes of training stayed at 1-in-4
        # (it copied some needle's value, not the asked one's).
        "needle": "One of the special magic numbers is for {k}: {v}.",
        "query": " What is the special magic number for {k}? The special magic number for {k}: ",
        "value_digits": 7,
        "needles": 4,  # at test time; training draws 2..6
    },
}
MIN_WORDS, MAX_WORDS = 6, 14  # words per filler sentence
MULTI_QUERY_FROM = 11177  # step from which mk-niah prompts may ask several keys (run 3 on)
# Step from which every step is short prompts (run 6's recipe; runs 4 and 5 tried mixes, see
# models/README.md): 1024 tokens each (32 a step at --tokens-per-step 32768), one in five
# passkey, the rest mk-niah with exactly 4 needles and one question. Runs 1-3 spent most steps at long
# contexts with 2-16 needles and stayed at 1-in-N on mk-niah. Probes from run 3's weights
# (tools/train/probe_mk.py, H200, 2026-11-25) went from 29% to 67% in 2200 such steps, while two
# runs that mixed in 20-25% of long steps (2-16K tokens, 2-8 prompts each) stayed near 30%.
# Run 6, this phase for 10845 steps, reached 47% at 2-8K but lost the passkey beyond 2K (0% at
# 8K). Runs 7-9 (the first retrieval-6l) grew run 6 to 6 layers (--grow 1,3) and brought long
# prompts back from the start (--long-from, 25% of the steps): passkey 100% to 16K again, mk-niah
# 62-68% at 2-16K, a plateau. Runs 12-14 (the shipped model) kept this phase, with RoPE scaling
# and fresh key-matching heads: mk-niah 77-91% (models/README.md).
FOCUS_FROM = 16864
FOCUS_LENGTH = 1024


def load_words(path=None):
    """The filler vocabulary: words.txt beside this script (or `path`), one word per whitespace."""
    with open(path or os.path.join(HERE, "words.txt")) as f:
        return [w for w in f.read().split() if w]


KEY_KINDS = ("words", "letter")  # mk-niah keys: "sparkling-cloud" or one capital letter ("Q")


class Tasks:
    """Builds prompts of an exact token length (1 bos + bytes); mk-niah keys of `key_kind`."""

    def __init__(self, words, key_kind="words"):
        if key_kind not in KEY_KINDS:
            raise ValueError(f"key kind {key_kind!r} is not one of {KEY_KINDS}")
        self.words = words
        self.key_kind = key_kind

    def sentence(self, rng):
        n = rng.randint(MIN_WORDS, MAX_WORDS)
        ws = [rng.choice(self.words) for _ in range(n)]
        ws[0] = ws[0].capitalize()
        return " ".join(ws) + "."

    def value(self, rng, digits):
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))

    def key(self, rng):
        if self.key_kind == "letter":
            return rng.choice(string.ascii_uppercase)
        return rng.choice(self.words) + "-" + rng.choice(self.words)

    def sample(self, rng, task, length, needles=None, queries=1):
        """Returns (prompt ids, answer ids, inner) with len(prompt ids) == length.

        With queries > 1 (training only: more answers per prompt, so more signal per step) the
        prompt holds queries - 1 questions already answered (digits + eos) before the last one;
        `inner` lists the prompt positions of those answer tokens. Otherwise `inner` is empty."""
        spec = TASKS[task]
        count = needles if needles is not None else spec["needles"]
        if self.key_kind == "letter" and count > 26 and "{k}" in spec["needle"]:
            raise ValueError(f"{count} needles need more than the 26 one-letter keys")
        keys = []
        while len(keys) < count:
            k = self.key(rng)
            if k not in keys:
                keys.append(k)
        values = [self.value(rng, spec["value_digits"]) for _ in keys]
        texts = [spec["needle"].format(k=k, v=v) for k, v in zip(keys, values)]
        asked = rng.sample(range(count), queries) if queries > 1 else [rng.randrange(count)]
        answered = [spec["query"].format(k=keys[a]) for a in asked[:-1]]
        query = spec["query"].format(k=keys[asked[-1]])
        fixed = (1 + len(spec["prefix"]) + len(query) + sum(len(t) + 1 for t in texts) +
                 sum(len(q) + len(values[a]) + 1 for q, a in zip(answered, asked)))
        room = length - fixed
        if room < 16:
            raise ValueError(f"length {length} is too short for task {task} ({fixed} tokens of text)")
        sents, total = [], -1
        while total < room:
            s = self.sentence(rng)
            sents.append(s)
            total += len(s) + 1
        # Needles go before a random filler sentence (never after the last one, which is cut
        # to make the length exact), at independent uniform depths.
        slots = sorted(rng.randrange(len(sents)) for _ in texts)
        order = list(range(count))
        rng.shuffle(order)
        cut = total - room
        sents[-1] = sents[-1][: len(sents[-1]) - cut] if cut else sents[-1]
        parts, j = [], 0
        for i, s in enumerate(sents):
            while j < count and slots[j] == i:
                parts.append(texts[order[j]])
                j += 1
            parts.append(s)
        prompt = [BOS] + list((spec["prefix"] + " ".join(parts)).encode("ascii"))
        inner = []
        for q, a in zip(answered, asked):
            prompt += list(q.encode("ascii"))
            inner += range(len(prompt), len(prompt) + len(values[a]) + 1)
            prompt += list(values[a].encode("ascii")) + [EOS]
        prompt += list(query.encode("ascii"))
        assert len(prompt) == length, (len(prompt), length)
        answer = list(values[asked[-1]].encode("ascii")) + [EOS]
        return prompt, answer, inner


# ----------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim, theta, scaling=None, device=None):
    """RoPE's inverse frequencies, float64: `theta^(-2i/d)`, and with a Llama 3.1 `scaling`
    (config.json's `rope_scaling`, rope_type "llama3") the low frequencies divided by its factor,
    a smooth band between, the high ones kept: transformers' formula, which the C++ decoder
    (core/rope.hpp) implements too."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    if scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling {scaling!r}: only rope_type 'llama3' is supported here")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def rope_tables(length, head_dim, theta, device, scaling=None):
    inv = rope_inv_freq(head_dim, theta, scaling, device)
    ang = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):  # x [B, H, L, d]; rotate_half layout
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def attention(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # PyTorch < 2.0 (the --smoke check on a CPU): plain causal attention.
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, d = c["hidden_size"], c["head_dim"]
        self.hq, self.hkv, self.d = c["num_attention_heads"], c["num_key_value_heads"], d
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.q_proj = nn.Linear(h, self.hq * d, bias=False)
        self.k_proj = nn.Linear(h, self.hkv * d, bias=False)
        self.v_proj = nn.Linear(h, self.hkv * d, bias=False)
        self.o_proj = nn.Linear(self.hq * d, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, n, self.hq, self.d).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.hkv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = self.hq // self.hkv  # query head i reads KV head i // g
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        a = attention(q, k, v).transpose(1, 2).reshape(b, n, self.hq * self.d)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1.0 / math.sqrt(2 * c["num_hidden_layers"]) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def forward(self, ids):
        n = ids.shape[1]
        cos, sin = rope_tables(n, self.c["head_dim"], self.c["rope_theta"], ids.device, self.c.get("rope_scaling"))
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def hf_state(self):
        """Parameters under the Hugging Face Llama names the C++ loader expects."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight,
               "lm_head.weight": self.lm_head.weight}
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = L.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(L, n).weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(L, n).weight
        return out


def grow_model(model, before):
    """A copy of `model` with a fresh layer inserted before each index in `before` (indices of the
    old model). The new layers' o_proj and down_proj are zero, so each adds nothing to the
    residual stream at first: the grown model computes exactly what the old one did, and
    training then finds a use for the new capacity."""
    c = dict(model.c)
    old = list(model.layers)
    c["num_hidden_layers"] = len(old) + len(before)
    grown = Model(c).to(next(model.parameters()).device)
    grown.embed_tokens.load_state_dict(model.embed_tokens.state_dict())
    grown.norm.load_state_dict(model.norm.state_dict())
    grown.lm_head.load_state_dict(model.lm_head.state_dict())
    j = 0
    for i in range(len(old) + 1):
        for _ in range(before.count(i)):
            with torch.no_grad():
                grown.layers[j].o_proj.weight.zero_()
                grown.layers[j].down_proj.weight.zero_()
            j += 1
        if i < len(old):
            grown.layers[j].load_state_dict(old[i].state_dict())
            j += 1
    return grown


def reinit_qk(model, heads):
    """Fresh query and key projections (the init's N(0, 0.02)) for each (layer, KV head) in
    `heads` and the query heads of its group; every other weight stays. A trained model's
    attention heads that match keys can then be learned again, e.g. after a change of RoPE."""
    g, d = model.c["num_attention_heads"] // model.c["num_key_value_heads"], model.c["head_dim"]
    with torch.no_grad():
        for layer, kv in heads:
            L = model.layers[layer]
            nn.init.normal_(L.k_proj.weight[kv * d:(kv + 1) * d], std=0.02)
            nn.init.normal_(L.q_proj.weight[kv * g * d:(kv + 1) * g * d], std=0.02)


# ------------------------------------------------------------------------------------- training


def schedule_length(step, total_steps, max_len):
    """Longest context of a step: 512 doubling up to max_len over the first 60% of training."""
    levels = []
    n = 512
    while n <= max_len:
        levels.append(n)
        n *= 2
    frac = min(1.0, step / max(1, 0.6 * total_steps))
    return levels[min(len(levels) - 1, int(frac * len(levels)))], levels


def long_share(step, long_from, share, ramp):
    """Share of long steps in the focus phase: 0 before long_from, then rising linearly to
    `share` over `ramp` steps (long_from None: never)."""
    if long_from is None or step < long_from:
        return 0.0
    return share * min(1.0, (step - long_from + 1) / max(1, ramp))


class FocusMix:
    """What a focus-phase prompt holds: its length, the share of passkey prompts, and for
    mk-niah the needle and question counts (inclusive ranges). The defaults are runs 6-9's."""

    def __init__(self, length=FOCUS_LENGTH, passkey=0.2, needles=(4, 4), queries=(1, 1)):
        self.length, self.passkey, self.needles, self.queries = length, passkey, needles, queries

    def draw(self, rng):
        if rng.random() < self.passkey:
            return "passkey", 1, 1
        # randint only for a real range, so that the default mix draws what runs 6-9 drew.
        n = self.needles[0] if self.needles[0] == self.needles[1] else rng.randint(*self.needles)
        q = self.queries[0] if self.queries[0] == self.queries[1] else rng.randint(*self.queries)
        return "mk-niah", n, min(q, n)


def make_batch(tasks, step, seed, total_steps, max_len, tokens_per_step, long_from=None, share=0.0, ramp=1,
               mix=None, focus_from=FOCUS_FROM):
    """Batch of one step (a pure function of seed, step and the options: re-runs and resumes
    repeat it). From `focus_from` on, the focus phase's short prompts (runs 6-9 began it at
    FOCUS_FROM; 0 starts a run from scratch with it)."""
    rng = random.Random(seed * 1_000_003 + step)
    if step >= focus_from:
        mix = mix or FocusMix()
        length = mix.length
        p_long = long_share(step, long_from, share, ramp)
        if p_long > 0 and rng.random() < p_long:
            # Long prompts come back after the key matching is learned at 1K (--long-from):
            # mixed in from the start (run 5) they kept it from being learned.
            length = rng.choice([n for n in (2048, 4096, 8192, 16384) if n <= max_len] or [max_len])

        return collate(tasks, rng, max(1, tokens_per_step // length), length, lambda: mix.draw(rng))
    top, levels = schedule_length(step, total_steps, max_len)
    # Half the steps at the current top length, the rest spread over the shorter levels.
    cands = [l for l in levels if l <= top]
    length = top if rng.random() < 0.5 else rng.choice(cands)
    length = max(512, int(length * rng.uniform(0.75, 1.0)) // 64 * 64) if rng.random() < 0.5 else length

    def draw():
        task = "passkey" if rng.random() < 0.35 else "mk-niah"
        if task == "passkey":
            return task, 1, 1
        if step >= MULTI_QUERY_FROM and rng.random() < 0.8:
            # Many needles, several of them asked in turn (run 3 on): with one question per
            # prompt the key-matching signal was too sparse to leave the 1-in-N plateau.
            needles = rng.randint(2, max(2, min(16, length // 150)))
            return task, needles, rng.randint(2, max(2, min(needles, length // 250)))
        return task, rng.randint(2, min(6, 2 + length // 1024)), 1
    return collate(tasks, rng, max(1, tokens_per_step // length), length, draw)


def collate(tasks, rng, batch, length, draw):
    """`batch` prompts of `length` tokens, each from `draw()` -> (task, needles, questions) (drawn
    right before its prompt, so the random sequence is the one runs 1-3 used), as padded
    tensors: ids, the answer-token mask and the valid-token mask of the targets ids[:, 1:]."""
    rows, masks = [], []
    for _ in range(batch):
        task, needles, queries = draw()
        try:
            prompt, answer, inner = tasks.sample(rng, task, length, needles, queries)
        except ValueError:  # too many questions for a short prompt
            prompt, answer, inner = tasks.sample(rng, task, length, 2, 1)
        rows.append(prompt + answer)
        masks.append((len(prompt), inner))
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), EOS, dtype=torch.long)
    ans = torch.zeros((batch, width - 1), dtype=torch.bool)
    valid = torch.zeros((batch, width - 1), dtype=torch.bool)
    for i, (r, (p, inner)) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        ans[i, p - 1 : len(r) - 1] = True  # targets r[p..]: the answer
        for j in inner:
            ans[i, j - 1] = True
        valid[i, : len(r) - 1] = True
    return ids, ans, valid, length


def answer_weights(ans, first_weight):
    """Per-target weights of the answer loss: 1 on answer tokens, `first_weight` on the first
    token of each answer (the digit that decides which needle is copied; the rest follow by
    copying), 0 elsewhere. `ans` is the [B, T] answer-target mask of `collate`."""
    first = ans.clone()
    first[:, 1:] &= ~ans[:, :-1]
    return ans.float() + (first_weight - 1.0) * first.float()


class Batches(torch.utils.data.IterableDataset):
    """Steps start, start+1, ... of make_batch; worker w of n makes steps start+w, start+w+n, ...
    and the DataLoader takes them round robin, so the order is the same with any worker count."""

    def __init__(self, tasks, start, a):
        super().__init__()
        self.tasks, self.start, self.a = tasks, start, a

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + w
        while True:
            yield make_batch(self.tasks, step, self.a.seed, self.a.total_steps, self.a.max_len, self.a.tokens_per_step,
                             self.a.long_from, self.a.long_share, self.a.long_ramp, self.a.mix, self.a.focus_from)
            step += n


@torch.no_grad()
def evaluate(model, tasks, device, lengths, n, seed, dtype):
    """Exact-match accuracy (teacher-forced argmax of every answer token == greedy decode)."""
    model.eval()
    res = {}
    for task in TASKS:
        for length in lengths:
            rng = random.Random(seed * 7919 + length + (0 if task == "passkey" else 1))
            good = 0
            per = max(1, min(n, 65536 // length))
            done = 0
            while done < n:
                m = min(per, n - done)
                rows = [tasks.sample(rng, task, length)[:2] for _ in range(m)]
                ids = torch.tensor([p + a for p, a in rows], device=device)
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    logits = model(ids[:, :-1])
                for i, (p, a) in enumerate(rows):
                    pred = logits[i, len(p) - 1 : len(p) - 1 + len(a)].argmax(-1).tolist()
                    good += pred == a
                done += m
            res[f"{task}@{length}"] = good / n
    model.train()
    return res


def write_safetensors(path, tensors):
    """BF16 safetensors (the format's header: u64 length + JSON, 8-byte padded, then data)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_exported(folder):
    """An exported model folder as a checkpoint dict: {"model": Model's state dict (float32),
    "config", "step"}; the step is the last one its train_log.jsonl records (0 without a log)."""
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    cfg = {k: c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                             "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
                             "max_position_embeddings")}
    if c.get("rope_scaling"):
        cfg["rope_scaling"] = c["rope_scaling"]
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    hf = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "BF16":
            raise ValueError(f"{folder}/model.safetensors: {name} is {meta['dtype']}, expected BF16")
        b, e = meta["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:e]), dtype=torch.int16).view(torch.bfloat16)
        hf[name] = t.float().reshape(meta["shape"])
    # Model's own names from the Hugging Face ones that hf_state() writes.
    state = {"embed_tokens.weight": hf.pop("model.embed_tokens.weight"), "norm.weight": hf.pop("model.norm.weight"),
             "lm_head.weight": hf.pop("lm_head.weight")}
    for name, t in hf.items():
        name = name.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")
        state[name] = t
    step = 0
    log = os.path.join(folder, "train_log.jsonl")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                if line.strip():
                    step = json.loads(line).get("step", step)
    return {"model": state, "config": cfg, "step": step}


def export(model, out, words_path, info, key_kind):
    os.makedirs(out, exist_ok=True)
    c = dict(model.c)
    c.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": BOS,
              "eos_token_id": EOS, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "shadowkv_tokenizer": "bytes", "shadowkv_note": info})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out, "model.safetensors"), model.hf_state())
    with open(os.path.join(out, "tasks.json"), "w") as f:
        json.dump({"bos": BOS, "eos": EOS, "words": "words.txt", "sentence_words": [MIN_WORDS, MAX_WORDS],
                   "tasks": {name: dict(spec, key=key_kind) if "{k}" in spec["needle"] else spec
                             for name, spec in TASKS.items()}}, f, indent=2)
        f.write("\n")
    with open(words_path) as src, open(os.path.join(out, "words.txt"), "w") as dst:
        dst.write(src.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the exported model, checkpoint and log")
    ap.add_argument("--resume", help="checkpoint folder of an earlier run (ckpt_model.pt, ckpt_opt.pt)")
    ap.add_argument("--init", help="ckpt_model.pt of an earlier run, or an exported model folder (config.json, "
                    "model.safetensors, train_log.jsonl for the step): its weights and step, fresh optimizer moments")
    ap.add_argument("--minutes", type=float, default=9.0, help="stop training after this many minutes")
    ap.add_argument("--total-steps", type=int, default=10000, help="steps of the whole schedule (all runs)")
    ap.add_argument("--tokens-per-step", type=int, default=131072)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-cases", type=int, default=32,
                    help="cases per task and length in the evaluations during training (32: about +-8 points)")
    ap.add_argument("--final-eval", type=int, default=100, help="cases per task and length in the last eval")
    ap.add_argument("--long-from", type=int, help="focus phase: step from which long prompts (2K to --max-len) come back")
    ap.add_argument("--long-share", type=float, default=0.2, help="focus phase: share of long steps after the ramp")
    ap.add_argument("--long-ramp", type=int, default=2000, help="focus phase: steps over which that share rises from 0")
    ap.add_argument("--grow", help="with --init: insert fresh layers before these indices of the loaded model "
                    "(comma-separated, e.g. 1,3 turns 4 layers into 6); their output projections start at zero, "
                    "so the grown model computes what the loaded one did")
    ap.add_argument("--mk-key", choices=KEY_KINDS, default="words",
                    help="mk-niah keys: two words joined by '-' (runs 1-6) or one capital letter")
    ap.add_argument("--focus-length", type=int, default=FOCUS_LENGTH, help="focus phase: tokens per short prompt")
    ap.add_argument("--focus-passkey", type=float, default=0.2, help="focus phase: share of passkey prompts")
    ap.add_argument("--focus-needles", default="4,4", help="focus phase: MIN,MAX needles of an mk-niah prompt")
    ap.add_argument("--focus-queries", default="1,1",
                    help="focus phase: MIN,MAX questions of an mk-niah prompt (all but the last answered in the "
                         "prompt, every answer trained on)")
    ap.add_argument("--cosine-from", type=int,
                    help="step where the cosine learning-rate schedule restarts (default: the focus phase's start)")
    ap.add_argument("--workers", type=int, help="data-loader processes (default: min(10, CPUs - 2))")
    ap.add_argument("--focus-from", type=int, default=FOCUS_FROM,
                    help=f"step from which every step is the focus phase's short prompts (default {FOCUS_FROM}, "
                         "where runs 6-9 began it; 0: from the first step)")
    ap.add_argument("--first-digit-weight", type=float, default=1.0,
                    help="weight of each answer's first token in the answer loss (the others weigh 1)")
    ap.add_argument("--rope-factor", type=float,
                    help="Llama 3.1 RoPE scaling (rope_type llama3) with this factor: frequencies whose wavelength "
                         "exceeds --rope-original tokens turn this much slower, the fast ones stay, a band between "
                         "blends. More dimensions then barely rotate over a long prompt, and key matching can use "
                         "them (run 9's model matched keys only in RoPE's slowest 7 of 32 pairs)")
    ap.add_argument("--rope-original", type=int, default=1024,
                    help="with --rope-factor: original_max_position_embeddings (low/high frequency factors 1 and 4)")
    ap.add_argument("--reinit-qk",
                    help="with --init: draw fresh query and key projections for these KV heads, LAYER:KV_HEAD "
                         "comma-separated (e.g. 2:2,2:3), and the query heads of their groups; the rest of the "
                         "model keeps its weights")
    ap.add_argument("--smoke", action="store_true", help="a tiny model for a few steps on the CPU")
    a = ap.parse_args()
    if a.resume and a.init:
        ap.error("--resume and --init exclude each other (--resume keeps the optimizer moments, --init does not)")
    if a.focus_from < 0:
        ap.error(f"--focus-from={a.focus_from} must be >= 0")
    if a.first_digit_weight <= 0:
        ap.error(f"--first-digit-weight={a.first_digit_weight} must be positive")
    if a.long_from is not None and a.long_from < a.focus_from:
        ap.error(f"--long-from={a.long_from} is before the focus phase (step {a.focus_from})")
    if not 0.0 <= a.long_share <= 1.0:
        ap.error(f"--long-share={a.long_share} is not in [0, 1]")
    if a.eval_cases < 1:
        ap.error(f"--eval-cases={a.eval_cases} must be >= 1")
    if a.long_ramp < 1:
        ap.error(f"--long-ramp={a.long_ramp} must be >= 1")
    def int_range(name, text, lo):
        try:
            r = tuple(int(x) for x in text.split(","))
        except ValueError:
            r = ()
        if len(r) != 2 or not lo <= r[0] <= r[1]:
            ap.error(f"--{name}={text!r} is not MIN,MAX with {lo} <= MIN <= MAX")
        return r
    if not 0.0 <= a.focus_passkey <= 1.0:
        ap.error(f"--focus-passkey={a.focus_passkey} is not in [0, 1]")
    if a.focus_length < 256:
        ap.error(f"--focus-length={a.focus_length} is below 256 tokens")
    a.mix = FocusMix(a.focus_length, a.focus_passkey, int_range("focus-needles", a.focus_needles, 1),
                     int_range("focus-queries", a.focus_queries, 1))
    grow = []
    if a.grow:
        if not a.init:
            ap.error("--grow needs --init (it grows a trained model)")
        try:
            grow = sorted(int(x) for x in a.grow.split(","))
        except ValueError:
            ap.error(f"--grow={a.grow!r} is not a comma-separated list of layer indices")

    torch.manual_seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    cfg = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 64, "intermediate_size": 640, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
           "rope_theta": 100000.0, "max_position_embeddings": 32768}
    if a.smoke:
        cfg.update({"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128})
        a.total_steps, a.tokens_per_step, a.max_len, a.eval_every, a.final_eval = 6, 2048, 1024, 3, 2
    words_path = os.path.join(HERE, "words.txt")
    tasks = Tasks(load_words(words_path), a.mk_key)
    ck = None
    if a.init and os.path.isdir(a.init):
        ck = load_exported(a.init)
        cfg = ck["config"]
    elif a.resume or a.init:  # the checkpoint's own shapes (a grown model has more layers)
        ck = torch.load(os.path.join(a.resume, "ckpt_model.pt") if a.resume else a.init, map_location=device)
        cfg = dict(ck.get("config", cfg))
    if a.rope_factor is not None:
        if not (math.isfinite(a.rope_factor) and a.rope_factor >= 1.0):
            ap.error(f"--rope-factor={a.rope_factor} must be finite and >= 1")
        if a.rope_original < 2:
            ap.error(f"--rope-original={a.rope_original} must be >= 2")
        cfg = dict(cfg, rope_scaling={"rope_type": "llama3", "factor": a.rope_factor, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": a.rope_original})
        print(f"RoPE: llama3 scaling {cfg['rope_scaling']}", flush=True)
    if grow and not all(0 <= g <= cfg["num_hidden_layers"] for g in grow):
        ap.error(f"--grow={a.grow}: indices must lie in [0, {cfg['num_hidden_layers']}]")
    model = Model(cfg).to(device)
    if ck is not None:
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})  # fp32 or bf16 weights
    if grow:
        model = grow_model(model, grow).to(device)
        cfg = model.c
        print(f"grew to {cfg['num_hidden_layers']} layers (fresh layers before {grow})", flush=True)
    if a.reinit_qk:
        if not a.init:
            ap.error("--reinit-qk needs --init (it changes a trained model)")
        try:
            heads = [tuple(int(x) for x in item.split(":")) for item in a.reinit_qk.split(",")]
        except ValueError:
            heads = [()]
        for h in heads:
            if len(h) != 2 or not (0 <= h[0] < cfg["num_hidden_layers"] and 0 <= h[1] < cfg["num_key_value_heads"]):
                ap.error(f"--reinit-qk={a.reinit_qk!r}: each item must be LAYER:KV_HEAD within the model's "
                         f"{cfg['num_hidden_layers']} layers and {cfg['num_key_value_heads']} KV heads")
        reinit_qk(model, heads)
        print(f"fresh query/key projections for (layer, KV head) {heads}", flush=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    step = ck["step"] if ck is not None else 0
    log_path = os.path.join(a.out, "train_log.jsonl")
    os.makedirs(a.out, exist_ok=True)
    if a.resume:
        op = torch.load(os.path.join(a.resume, "ckpt_opt.pt"), map_location=device)
        for p, (m, v) in zip(model.parameters(), op["moments"]):
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.float().to(device),
                            "exp_avg_sq": v.float().to(device)}
        print(f"resumed from {a.resume} at step {step}", flush=True)
    elif a.init:
        print(f"weights of {a.init} at step {step}; fresh optimizer moments", flush=True)
    if a.resume or a.init:  # the log goes on from the earlier run's (beside its checkpoint)
        old = os.path.join(a.resume or (a.init if os.path.isdir(a.init) else os.path.dirname(os.path.abspath(a.init))),
                           "train_log.jsonl")
        if os.path.exists(old) and os.path.abspath(old) != os.path.abspath(log_path):
            with open(old) as src, open(log_path, "w") as dst:
                dst.write(src.read())
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams / 1e6:.2f} M parameters, {cfg}", flush=True)
    log = open(log_path, "a")
    dtype = torch.bfloat16

    def save():
        torch.save({"model": model.state_dict(), "step": step, "config": cfg}, os.path.join(a.out, "ckpt_model.pt"))
        moments = [(opt.state[p]["exp_avg"].to(torch.bfloat16), opt.state[p]["exp_avg_sq"].to(torch.bfloat16))
                   if p in opt.state else (torch.zeros_like(p, dtype=torch.bfloat16),) * 2
                   for p in model.parameters()]
        torch.save({"moments": moments, "step": step}, os.path.join(a.out, "ckpt_opt.pt"))

    t0 = time.time()
    last_save = t0
    warmup = 50 if a.resume else 200  # --init: fresh moments, a full warmup
    first = step
    tokens = 0
    workers = 0 if a.smoke else (a.workers if a.workers is not None else min(10, max(1, (os.cpu_count() or 2) - 2)))
    extra = {"prefetch_factor": 4} if workers else {}
    loader = iter(torch.utils.data.DataLoader(Batches(tasks, step, a), batch_size=None, num_workers=workers,
                                              pin_memory=device.type == "cuda", **extra))
    while step < a.total_steps and time.time() - t0 < a.minutes * 60:
        ids, ans, valid, length = next(loader)
        length = int(length)
        ids, ans, valid = ids.to(device, non_blocking=True), ans.to(device), valid.to(device)
        # Cosine to 10% of --lr over the schedule; the focus phase (--focus-from on) restarts it.
        start = a.cosine_from if a.cosine_from is not None else (a.focus_from if step >= a.focus_from else 0)
        frac = (step - start) / max(1, a.total_steps - start)
        lr = a.lr * min(1.0, (step - first + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(ids[:, :-1])
        ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none").view_as(ans)
        w = answer_weights(ans, a.first_digit_weight)
        answer_loss = (ce * w)[ans].sum() / w[ans].sum()
        lm_loss = ce[valid].mean()
        loss = answer_loss + 0.1 * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        if step % 50 == 0 or step == first + 1:
            el = time.time() - t0
            rec = {"step": step, "len": length, "batch": ids.shape[0], "answer_loss": round(answer_loss.item(), 4),
                   "lm_loss": round(lm_loss.item(), 4), "lr": lr, "elapsed_s": round(el, 1),
                   "tokens_per_s": round(tokens / max(el, 1e-9))}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
        if step % a.eval_every == 0:
            top, _ = schedule_length(step, a.total_steps, a.max_len)
            acc = evaluate(model, tasks, device, sorted({1024, top}), a.eval_cases if not a.smoke else 2, 12345, dtype)
            rec = {"step": step, "eval": acc, "elapsed_s": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if time.time() - last_save > 120:
            save()
            last_save = time.time()
    save()
    print(f"trained to step {step} of {a.total_steps} in {time.time() - t0:.0f} s", flush=True)
    lengths = [a.max_len] if a.smoke else [2048, 4096, 8192, 16384]
    # The exported weights are BF16: evaluate those, as the C++ decoder will see them.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    acc = evaluate(model, tasks, device, lengths, a.final_eval, 424242, dtype)
    rec = {"step": step, "final_eval": acc, "cases": a.final_eval, "elapsed_s": round(time.time() - t0, 1)}
    print(json.dumps(rec), flush=True)
    log.write(json.dumps(rec) + "\n")
    log.close()
    info = (f"trained by tools/train/train_retrieval.py (seed {a.seed}, {step} steps) on synthetic passkey and "
            f"multi-key needle retrieval up to {a.max_len} tokens; see models/README.md")
    export(model, a.out, words_path, info, a.mk_key)
    print(f"exported to {a.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
