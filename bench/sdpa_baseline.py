#!/usr/bin/env python3
"""Same-run dense baseline: PyTorch scaled_dot_product_attention(enable_gqa=True) on one decode
token, Llama-3.1-8B attention shapes (32 q / 8 KV heads, head dim 128, bf16). Prints one JSON
object per (batch, context) with ms per call and the bandwidth of reading K and V."""
import json
import sys

import torch
import torch.nn.functional as F


def measure(batch, context, iters=50):
    dev = torch.device("cuda")
    q = torch.randn(batch, 32, 1, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, context, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / iters
    hbm = 2 * k.numel() * k.element_size()
    return {"policy": "sdpa", "batch": batch, "context": context, "head_dim": 128, "ms": ms,
            "hbm_bytes": hbm, "GBps": hbm / ms / 1e6, "floor_ms": hbm / 4.0e12 * 1e3}


def main():
    cases = [(1, 131072), (4, 131072), (8, 65536), (8, 131072), (1, 524288)]
    for batch, context in cases:
        print(json.dumps(measure(batch, context)), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
