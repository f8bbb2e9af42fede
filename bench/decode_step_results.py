#!/usr/bin/env python3
"""Writes bench/results/decode_step.json from one scripts/gpu-check output folder.

Usage: bench/decode_step_results.py OUT_DIR [--command "how the run was made"] > decode_step.json

Reads OUT_DIR/bench_decode_gpu.json (Google Benchmark), OUT_DIR/sdpa.jsonl (bench/sdpa_baseline.py),
OUT_DIR/gpu.txt and OUT_DIR/date.txt; prints one JSON document with the device, date, command
and one row per measurement: {policy, batch, context, head_dim, ms, floor_ms, hbm_bytes,
pcie_bytes, hit_rate, ...}. Each row also names its benchmark and carries the same-run time of
our dense step at that batch and context where one was measured, with the speed-up over it.
"""
import argparse
import json
import pathlib
import re
import sys

HEAD_DIM = 128  # the benchmarks' Llama-3.1-8B attention shapes
HBM_BYTES_PER_S = 4.0e12
PCIE_BYTES_PER_S = 51.0e9

# benchmark family -> (policy, what it measures)
FAMILIES = {
    "bm_decode_step/shadowkv": ("shadowkv", "SparseAttention<ShadowKVPolicy, CudaBackend, bf16>::decode, one layer"),
    "bm_decode_step/dense": ("dense", "SparseAttention<DensePolicy, CudaBackend, bf16>::decode, one layer"),
    "bm_dense": ("dense_kernel", "cuda::decode_attention over the whole cache (kernel only)"),
    "bm_shadowkv_step": ("shadowkv_step_ops", "score + top-k + (misses: rebuild || gather) + attention, from the ops"),
    "bm_shadowkv_attention": ("shadowkv_attention_kernel", "cuda::decode_attention over a ShadowKV selection (kernel only)"),
}
MODES = {0: "same query, value pool = budget", 1: "fresh random query per step",
         2: "same query, value cache 4x budget",
         3: "same query in RoPE's slowest pairs (selection repeats), value pool = budget",
         4: "same query in RoPE's slowest pairs (selection repeats), value cache 5726 chunks (the harness's 128K auto)"}


def parse_args(name):
    args = {}
    for part in name.split("/"):
        m = re.fullmatch(r"([a-z_]+):(\d+)", part)
        if m:
            args[m.group(1)] = int(m.group(2))
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--command", default="scripts/gpu-check OUT_DIR")
    opts = ap.parse_args()
    bench = json.loads((opts.out_dir / "bench_decode_gpu.json").read_text())
    rows = []
    for b in bench["benchmarks"]:
        family = next((f for f in sorted(FAMILIES, key=len, reverse=True) if b["name"].startswith(f + "/")), None)
        if family is None or b.get("run_type") != "iteration":
            continue
        policy, what = FAMILIES[family]
        a = parse_args(b["name"])
        hbm = float(b.get("hbm_bytes", 0.0))
        pcie = float(b.get("pcie_bytes", 0.0))
        row = {
            "benchmark": b["name"],
            "policy": policy,
            "batch": a.get("batch"),
            "context": a.get("context"),
            "head_dim": HEAD_DIM,
            "ms": round(float(b["real_time"]), 4),
            "floor_ms": round(max(hbm / HBM_BYTES_PER_S, pcie / PCIE_BYTES_PER_S) * 1e3, 4),
            "hbm_bytes": int(hbm),
            "pcie_bytes": int(pcie),
            "hit_rate": round(float(b["hit_rate"]), 4) if "hit_rate" in b else None,
            "what": what,
        }
        if "mode" in a:
            row["mode"] = MODES.get(a["mode"], str(a["mode"]))
        if "all_miss" in a:
            row["mode"] = "all misses" if a["all_miss"] else "all hits"
        if "generated" in a:
            row["generated"] = a["generated"]
        for counter in ("host_ms", "run_ahead_ms"):  # bm_decode_step: enqueue time, steps back to back
            if counter in b:
                row[counter] = round(float(b[counter]), 4)
        rows.append(row)
    dense = {(r["batch"], r["context"]): r["ms"] for r in rows if r["policy"] == "dense"}
    kernel = {(r["batch"], r["context"]): r["ms"] for r in rows if r["policy"] == "dense_kernel"}
    for r in rows:
        ref = dense.get((r["batch"], r["context"])) or kernel.get((r["batch"], r["context"]))
        if ref and r["policy"] not in ("dense", "dense_kernel"):
            r["dense_ms_same_run"] = ref
            r["speedup_vs_dense"] = round(ref / r["ms"], 2)
        r["x_floor"] = round(r["ms"] / r["floor_ms"], 2) if r["floor_ms"] else None
    for line in (opts.out_dir / "sdpa.jsonl").read_text().splitlines():
        s = json.loads(line)
        ours = kernel.get((s["batch"], s["context"]))
        rows.append({
            "policy": "sdpa", "batch": s["batch"], "context": s["context"], "head_dim": s["head_dim"],
            "ms": round(s["ms"], 4), "floor_ms": round(s["hbm_bytes"] / HBM_BYTES_PER_S * 1e3, 4),
            "hbm_bytes": s["hbm_bytes"], "pcie_bytes": 0, "hit_rate": None,
            "what": "torch.nn.functional.scaled_dot_product_attention, bf16, same run",
            "our_dense_kernel_ms": ours,
            "our_bandwidth_vs_sdpa": round(s["ms"] / ours, 3) if ours else None,
        })
    doc = {
        "device": (opts.out_dir / "gpu.txt").read_text().splitlines()[-1].strip(),
        "date": (opts.out_dir / "date.txt").read_text().strip(),
        "command": opts.command,
        "shapes": "one layer, Llama-3.1-8B attention: 32 q / 8 KV heads, head_dim 128, bf16; ShadowKV: "
                  "rank 160, chunk 8, budget 2048, 48 outlier + 4 local chunks",
        "floors": f"max(hbm_bytes / {HBM_BYTES_PER_S / 1e12} TB/s, pcie_bytes / {PCIE_BYTES_PER_S / 1e9} GB/s)",
        "rows": rows,
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
