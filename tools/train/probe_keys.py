#!/usr/bin/env python3
"""Which part of an mk-niah key does a trained model match on? (issue 7 diagnosis)

Scores the first answer digit (teacher-forced argmax) on 4-needle mk-niah cases whose keys are
built four ways, and prints the accuracy of each:
  random   the task's own keys (two independent words)
  same2nd  the 4 keys share their second word and differ in the first ("red-cloud", "blue-cloud")
  same1st  the 4 keys share their first word and differ in the second
  suffix2  the second words all end in the same two letters ("...er")
A model that matches only part of the key drops towards 25% where that part is shared.
Example (CPU is enough):  python3 tools/train/probe_keys.py CKPT.pt --cases 96 --length 1024
"""
import argparse
import collections
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_retrieval as T  # noqa: E402

MODES = ("random", "same2nd", "same1st", "suffix2")


class Keyed(T.Tasks):
    """The task's prompts, with the keys of each prompt drawn as `mode` says."""

    def __init__(self, words, mode):
        super().__init__(words)
        self.mode = mode
        by_suffix = collections.defaultdict(list)
        for w in words:
            if len(w) >= 4:
                by_suffix[w[-2:]].append(w)
        self.suffix_pools = [ws for ws in by_suffix.values() if len(ws) >= 4]

    def sample(self, rng, task, length, needles=None, queries=1):
        words = self.words
        if self.mode == "same2nd":
            w2 = rng.choice(words)
            self.key = lambda r: r.choice(words) + "-" + w2
        elif self.mode == "same1st":
            w1 = rng.choice(words)
            self.key = lambda r: w1 + "-" + r.choice(words)
        elif self.mode == "suffix2":
            pool = rng.choice(self.suffix_pools)
            self.key = lambda r: r.choice(words) + "-" + r.choice(pool)
        return super().sample(rng, task, length, needles, queries)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="ckpt_model.pt of train_retrieval.py (fp32 or bf16 weights)")
    ap.add_argument("--cases", type=int, default=96, help="cases per mode (a multiple of 8)")
    ap.add_argument("--length", type=int, default=1024, help="tokens per prompt")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = torch.load(a.checkpoint, map_location=dev)
    model = T.Model(ck["config"]).to(dev)
    model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
    model.eval()
    words = T.load_words()
    for mode in MODES:
        tasks, rng, good = Keyed(words, mode), random.Random(99), 0
        for _ in range(0, a.cases, 8):
            rows = [tasks.sample(rng, "mk-niah", a.length, 4)[:2] for _ in range(8)]
            with torch.no_grad():
                logits = model(torch.tensor([p for p, _ in rows], device=dev))[:, -1]
            good += sum(int(logits[j].argmax()) == ans[0] for j, (_, ans) in enumerate(rows))
        print(f"{mode:8s} first digit right in {good}/{a.cases} = {good / a.cases:.3f}", flush=True)


if __name__ == "__main__":
    main()
