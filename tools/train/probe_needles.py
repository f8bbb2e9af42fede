#!/usr/bin/env python3
"""How does mk-niah accuracy fall with the number of needles? (issue 7 diagnosis)

Scores the first answer digit (argmax after the prompt) of mk-niah cases with 1, 2, 4 and 8
needles at one prompt length, and prints the share right for each count. A model that matches
keys perfectly stays at 100%; one whose match between the asked key and another needle's key
is wrong with probability p drops towards (1 - p)^(n - 1) with n needles.
Example (CPU is enough):  python3 tools/train/probe_needles.py models/retrieval-6l --length 1024
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_retrieval as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an exported model folder (config.json, model.safetensors)")
    ap.add_argument("--cases", type=int, default=64, help="cases per needle count (a multiple of 8)")
    ap.add_argument("--length", type=int, default=1024, help="tokens per prompt")
    ap.add_argument("--needles", default="1,2,4,8", help="needle counts to try")
    a = ap.parse_args()
    ck = T.load_exported(a.model)
    model = T.Model(ck["config"])
    model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
    model.eval()
    tasks = T.Tasks(T.load_words())
    for n in (int(x) for x in a.needles.split(",")):
        rng, good = random.Random(7 + n), 0
        try:
            for _ in range(0, a.cases, 8):
                rows = [tasks.sample(rng, "mk-niah", a.length, n)[:2] for _ in range(8)]
                with torch.no_grad():
                    logits = model(torch.tensor([p for p, _ in rows]))[:, -1]
                good += sum(int(logits[j].argmax()) == ans[0] for j, (_, ans) in enumerate(rows))
        except ValueError as e:  # the needles do not fit the length
            print(f"needles {n}: {e}", flush=True)
            continue
        print(f"length {a.length}, needles {n}: first digit right in {good}/{a.cases} = {good / a.cases:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
