#!/usr/bin/env python3
"""Short probes of what makes the retrieval model learn mk-niah (issue 7 experiments).

Each variant trains at 1024 tokens (mk-niah with --needles needles, --passkey of the prompts
passkey) for --minutes, from scratch or from --init (a ckpt_model.pt of train_retrieval.py), and
prints its exact-match accuracy on 256 fixed cases with 4 needles every --every steps ("first":
the first digit alone). Several run side by side on one GPU; the results of 2026-11-25 are in
models/README.md. Example:
    python3 tools/train/probe_mk.py --name two --init OUT/r3/ckpt_model.pt --lr 1e-3 --minutes 5
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_retrieval as T  # noqa: E402

ANSWER = 8  # positions scored after the prompt: an mk-niah answer (7 digits + eos)
EVAL_CASES = 256


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="label of the variant in the output")
    ap.add_argument("--key", default="two", choices=["two", "one", "code"],
                    help="keys: two words (the task's own), one word, or 4 capital letters")
    ap.add_argument("--needles", default="4", help="needles of a training prompt: N or LO-HI (evaluation: 4)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--lmw", type=float, default=0.1, help="weight of the next-byte loss on every byte")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="constant after 200 warmup steps")
    ap.add_argument("--len", type=int, default=1024, help="tokens per prompt")
    ap.add_argument("--batch", type=int, default=32, help="prompts per step")
    ap.add_argument("--passkey", type=float, default=0.2, help="share of passkey prompts in training")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--every", type=int, default=250, help="steps between evaluations")
    ap.add_argument("--init", help="ckpt_model.pt to start from (fp32 or bf16 weights)")
    return ap.parse_args()


def main():
    a = parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    words = T.load_words()
    tasks = T.Tasks(words)
    if a.key == "one":
        tasks.key = lambda rng: rng.choice(words)
    elif a.key == "code":
        tasks.key = lambda rng: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
    lo, hi = (int(x) for x in (a.needles.split("-") if "-" in a.needles else (a.needles, a.needles)))
    cfg = {"hidden_size": a.hidden, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
           "num_key_value_heads": a.kv, "head_dim": 64, "intermediate_size": a.hidden * 5 // 2,
           "vocab_size": T.VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 32768}
    model = T.Model(cfg).to(dev)
    if a.init:
        state = torch.load(a.init, map_location=dev)["model"]
        model.load_state_dict({k: v.float() for k, v in state.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def batch(rng, n, passkey_share, train=True):
        """n prompts + answers, EOS-padded, and the prompt lengths."""
        rows, lengths = [], []
        for _ in range(n):
            task = "passkey" if rng.random() < passkey_share else "mk-niah"
            needles = (rng.randint(lo, hi) if train else 4) if task == "mk-niah" else 1
            prompt, answer, _ = tasks.sample(rng, task, a.len, needles, 1)
            rows.append(prompt + answer)
            lengths.append(len(prompt))
        ids = torch.full((n, max(map(len, rows))), T.EOS, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(dev), lengths

    @torch.no_grad()
    def evaluate():
        """Exact match of the whole answer, and of its first digit, on fixed mk-niah cases."""
        ids, lengths = batch(random.Random(999), EVAL_CASES, 0.0, False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        good = first = 0
        for i, p in enumerate(lengths):
            good += logits[i, p - 1 : p - 1 + ANSWER].argmax(-1).tolist() == ids[i, p : p + ANSWER].tolist()
            first += logits[i, p - 1].argmax().item() == ids[i, p].item()
        return good / EVAL_CASES, first / EVAL_CASES

    rng, t0, step = random.Random(1), time.time(), 0
    while time.time() - t0 < a.minutes * 60:
        step += 1
        ids, lengths = batch(rng, a.batch, a.passkey)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1, step / 200)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        ce = F.cross_entropy(logits.float().reshape(-1, T.VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        ce = ce.view(ids.shape[0], -1)
        # The ANSWER positions after each prompt (for a passkey prompt: its 6 answer tokens and
        # two of padding).
        mask = torch.zeros_like(ce, dtype=torch.bool)
        for i, p in enumerate(lengths):
            mask[i, p - 1 : p - 1 + ANSWER] = True
        loss = ce[mask].mean() + a.lmw * ce.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.every == 0:
            acc, first = evaluate()
            print(json.dumps({"v": a.name, "step": step, "ans": round(ce[mask].mean().item(), 3), "acc": acc,
                              "first": first, "t": round(time.time() - t0)}), flush=True)
    acc, first = evaluate()
    print(json.dumps({"v": a.name, "final_step": step, "acc": acc, "first": first}), flush=True)


if __name__ == "__main__":
    main()
