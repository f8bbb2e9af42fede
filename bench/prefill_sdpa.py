#!/usr/bin/env python3
"""Dense prefill attention time of one sequence, the reference for ShadowKV's prefill overhead
(issue 5: the ShadowKV build against dense prefill attention of the same 64K sequence).

Times PyTorch `scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` of one
Llama-3.1-8B layer (32 q / 8 KV heads, head dim 128, bf16) over a whole prompt, with CUDA events,
and multiplies by the layer count. This is the attention an engine runs at prefill (FlashAttention
kernels through SDPA), so it is the fair denominator; the library's own prefill attention path is a
correctness path (the decode kernel re-reading each query's prefix) and would make the overhead
look smaller than it is. Only attention is timed: the linear layers of prefill are not included,
so the ratio is the overhead against attention alone, as the issue asks.

    python3 bench/prefill_sdpa.py --context 65536 [--layers 32] [--update bench/results/throughput.json]

With --update, the dense time and the overhead (the "prefill" object `throughput --json` wrote,
shadowkv_build_ms / dense_ms) are added to that file's "prefill" object.
"""
import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=65536, help="prompt tokens (default 65536)")
    ap.add_argument("--layers", type=int, default=32, help="layers to multiply one layer's time by (default 32)")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions; the median is reported")
    ap.add_argument("--update", metavar="JSON", help="throughput --json output to add the dense time and overhead to")
    a = ap.parse_args()
    if a.context < 1 or a.layers < 1 or a.repeats < 1:
        print("error: --context, --layers and --repeats must be positive", file=sys.stderr)
        return 2
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("error: PyTorch is not installed (python3 -c 'import torch' fails); run this on the GPU machine",
              file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    shape_q = (1, a.q_heads, a.context, a.head_dim)
    shape_kv = (1, a.kv_heads, a.context, a.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, generator=g)

    def layer():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    layer()  # warm-up: kernel selection
    torch.cuda.synchronize()
    times = []
    for _ in range(a.repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    per_layer = times[len(times) // 2]
    flops = 4.0 * a.q_heads * a.head_dim * a.context * a.context / 2  # causal: half the score matrix
    result = {
        "context": a.context,
        "layers": a.layers,
        "dense_prefill_attention_ms_per_layer": per_layer,
        "dense_prefill_attention_ms": per_layer * a.layers,
        "tflops": flops / (per_layer / 1e3) / 1e12,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    print(json.dumps(result))

    if a.update:
        with open(a.update) as f:
            doc = json.load(f)
        p = doc.get("prefill")
        if not p:
            print(f"error: {a.update} has no \"prefill\" object (run throughput with --prefill-overhead-context)",
                  file=sys.stderr)
            return 1
        if p["context"] != a.context or p["layers"] != a.layers:
            print(f"error: {a.update} measured context {p['context']} x {p['layers']} layers, "
                  f"not {a.context} x {a.layers}", file=sys.stderr)
            return 1
        p["dense_prefill_attention_ms"] = result["dense_prefill_attention_ms"]
        p["dense_reference"] = "PyTorch SDPA causal, enable_gqa, bf16 (bench/prefill_sdpa.py)"
        p["overhead"] = p["shadowkv_build_ms"] / result["dense_prefill_attention_ms"]
        with open(a.update, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"prefill overhead at {a.context}: ShadowKV build {p['shadowkv_build_ms']:.1f} ms / dense attention "
              f"{result['dense_prefill_attention_ms']:.1f} ms = {100 * p['overhead']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
