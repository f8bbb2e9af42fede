#!/usr/bin/env python3
"""Which attention heads match mk-niah keys, and in which RoPE frequency pairs? (issue 7 diagnosis)

For 4-needle mk-niah cases, takes every head's attention logit from the prompt's last position
(the one that must pick the asked needle) to the first value digit of each needle, and splits it
into the contributions of RoPE's d/2 frequency pairs (in the rotate_half layout, pair i is dims
i and i + d/2: its contribution is (qa ka + qb kb) cos(angle) + (qa kb - qb ka) sin(angle), the
angle being the pair's frequency times the distance). The margin of a case is the asked needle's
logit minus another needle's. Prints, for the heads that most rarely prefer a wrong needle (the
share of negative margins), the margin's mean and standard deviation and the part of it in the
slowest 12 pairs, then per pair the mean margin of the first three.

A head that matches keys shows a margin carried by pairs that barely turn over the prompt: the
first retrieval-6l matched in its slowest 7 of 32 pairs only (models/README.md, runs 11-14).
Example (CPU is enough, ~1 minute):
  python3 tools/train/probe_rope_pairs.py models/retrieval-6l --cases 32 --length 512
"""
import argparse
import math
import os
import random
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_retrieval as T  # noqa: E402

NEEDLE = re.compile(r"is for ([a-z]+-[a-z]+): (\d+)\.")


def capture_pre_rope(model):
    """Replaces each layer's forward with one that also keeps the pre-RoPE query of the last
    position and all pre-RoPE keys; returns the dict they go to, keyed by layer index."""
    kept = {}

    def forward_of(L, index):
        def forward(x, cos, sin):
            b, n, _ = x.shape
            h = L.input_layernorm(x)
            q = L.q_proj(h).view(b, n, L.hq, L.d).transpose(1, 2)
            k = L.k_proj(h).view(b, n, L.hkv, L.d).transpose(1, 2)
            v = L.v_proj(h).view(b, n, L.hkv, L.d).transpose(1, 2)
            kept[index] = (q[0, :, -1].double(), k[0].double())
            q, k = T.apply_rope(q, cos, sin), T.apply_rope(k, cos, sin)
            g = L.hq // L.hkv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            a = T.attention(q, k, v).transpose(1, 2).reshape(b, n, L.hq * L.d)
            x = x + L.o_proj(a)
            h = L.post_attention_layernorm(x)
            return x + L.down_proj(T.F.silu(L.gate_proj(h)) * L.up_proj(h))
        return forward

    for i, L in enumerate(model.layers):
        L.forward = forward_of(L, i)
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an exported model folder (config.json, model.safetensors)")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--length", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--top", type=int, default=8, help="heads to list")
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    if a.cases < 1 or a.top < 1:
        ap.error("--cases and --top must be >= 1")
    ck = T.load_exported(a.model)
    cfg = ck["config"]
    model = T.Model(cfg)
    model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
    model.eval()
    kept = capture_pre_rope(model)
    d = cfg["head_dim"]
    inv = T.rope_inv_freq(d, cfg["rope_theta"], cfg.get("rope_scaling"))
    tasks = T.Tasks(T.load_words())
    rng = random.Random(a.seed)
    margins = {}  # (layer, head) -> list of per-pair margin vectors
    right = 0
    for _ in range(a.cases):
        prompt, answer, _ = tasks.sample(rng, "mk-niah", a.length, 4)
        text = bytes(prompt[1:]).decode("ascii")
        asked = bytes(answer[:-1]).decode("ascii")
        digits = [(m.start(2) + 1, m.group(2) == asked) for m in NEEDLE.finditer(text)]  # +1: bos
        with torch.no_grad():
            right += int(model(torch.tensor([prompt]))[0, -1].argmax()) == answer[0]
        last = len(prompt) - 1
        for li, L in enumerate(model.layers):
            q, k = kept[li]
            g = L.hq // L.hkv
            for h in range(L.hq):
                qa, qb = q[h, : d // 2], q[h, d // 2:]
                per = {}
                for pos, is_asked in digits:
                    ka, kb = k[h // g, pos, : d // 2], k[h // g, pos, d // 2:]
                    angle = (last - pos) * inv
                    per.setdefault(is_asked, []).append(
                        ((qa * ka + qb * kb) * torch.cos(angle) + (qa * kb - qb * ka) * torch.sin(angle)) / math.sqrt(d))
                for wrong in per.get(False, []):
                    margins.setdefault((li, h), []).append(per[True][0] - wrong)
    print(f"{a.model}: first answer digit right in {right}/{a.cases} ({a.length} tokens, 4 needles)")
    pairs = d // 2
    slow = slice(max(0, pairs - 12), pairs)  # all pairs when there are no more than 12
    rows = []
    for (li, h), ms in margins.items():
        m = torch.stack(ms)
        total = m.sum(1)
        rows.append((total.mean().item(), li, h, total.std().item(), m[:, slow].sum(1).mean().item(),
                     (total < 0).double().mean().item(), m.mean(0)))
    rows.sort(key=lambda r: (r[5], -r[0]))  # the heads that most rarely prefer a wrong needle first
    print("layer.head  margin mean (sd)  in the slowest 12 pairs  P(margin < 0)")
    for mean, li, h, sd, in_slow, neg, _ in rows[: a.top]:
        print(f"  {li}.{h:<6} {mean:7.2f} ({sd:5.2f})  {in_slow:7.2f}               {neg:.2f}")
    first = max(0, pairs - 16)
    print(f"mean margin per pair {first}..{pairs - 1} (slowest last), top {min(3, len(rows))} heads:")
    for mean, li, h, *_, per_pair in rows[:3]:
        print(f"  {li}.{h}: " + " ".join(f"{x:.2f}" for x in per_pair[first:].tolist()))


if __name__ == "__main__":
    main()
