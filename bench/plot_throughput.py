#!/usr/bin/env python3
"""Plots decode tokens/s against batch, one panel per context, one line per policy and value
cache, from the JSON written by `throughput --json` (several files may be given: one run per
context, say; their rows are merged).

    python3 bench/plot_throughput.py bench/results/throughput.json [more.json ...] \
        [--out docs/throughput.png]

Needs matplotlib (present on the GPU machine). Rows with a "mode" other than "seen" (what-if
replays) are drawn dashed and labelled with their mode.
"""
import argparse
import json
import sys
from collections import defaultdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="throughput --json output(s)")
    ap.add_argument("--out", default="docs/throughput.png", help="image to write (default docs/throughput.png)")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is not installed (pip install matplotlib, or run this on the GPU machine, "
              "which has it)", file=sys.stderr)
        return 1

    rows, devices = [], set()
    for path in a.json:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 1
        if "rows" not in doc:
            print(f"error: {path} has no \"rows\" (is it throughput --json output?)", file=sys.stderr)
            return 1
        rows += doc["rows"]
        devices.add(doc.get("device", "?"))
    if not rows:
        print("error: no rows to plot", file=sys.stderr)
        return 1

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.8), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        lines = defaultdict(list)
        for r in rows:
            if r["context"] != ctx:
                continue
            if r["policy"] == "dense":
                label = "dense"
            else:
                vc = r.get("value_cache_mode") or ""
                label = f"ShadowKV, value cache {vc} ({r['value_cache_chunks']} chunks)"
            if r.get("mode", "seen") != "seen":
                label += f", {r['mode']}"
            lines[label].append((r["batch"], r["tokens_per_s"], r.get("mode", "seen") != "seen"))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if pts[0][2] else "-", marker="o", label=label)
        ax.set_title(f"context {ctx // 1024}K")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("decode tokens/s")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Llama-3.1-8B-shaped decode throughput: " + ", ".join(sorted(devices)), fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
