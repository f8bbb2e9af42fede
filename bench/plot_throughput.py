#!/usr/bin/env python3
"""Plots decode tokens/s against batch, one panel per context, one line per policy and value
cache, from the JSON written by `throughput --json` (several files may be given: one run per
context, say; their rows are merged).

    python3 bench/plot_throughput.py bench/results/throughput.json [more.json ...] \
        [--out docs/throughput.png]
    python3 bench/plot_throughput.py bench/results/throughput.json --markdown   # the tables

The plot needs matplotlib (present on the GPU machine); --markdown prints docs/benchmarks.md's
throughput tables instead (rows, and per context ShadowKV's largest batch against dense's largest
batch and against dense's "unlimited memory" line t(B) = a + c*B fitted to the dense rows). Rows with a "mode" other than "seen" (what-if
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
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown instead of plotting")
    a = ap.parse_args()
    if a.markdown:
        rows = load_rows(a.json)
        if rows is None:
            return 1
        print_markdown(rows)
        return 0
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
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.6 * len(contexts), 6.2), squeeze=False)
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
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.suptitle("Llama-3.1-8B-shaped decode throughput: " + ", ".join(sorted(devices)), fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=130)
    print(f"wrote {a.out}")
    return 0


def load_rows(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return None
        if "rows" not in doc:
            print(f"error: {path} has no \"rows\" (is it throughput --json output?)", file=sys.stderr)
            return None
        rows += doc["rows"]
    return rows


def fmt_hit(r):
    return "–" if r.get("hit_rate") is None else f"{100 * r['hit_rate']:.1f}%"


def print_markdown(rows):
    """The rows per context, then ShadowKV's largest batch per (value cache, mode) against dense."""
    for ctx in sorted({r["context"] for r in rows}):
        sub = [r for r in rows if r["context"] == ctx]
        print(f"\n**{ctx // 1024}K**\n")
        print("| policy | value cache (chunks/head) | mode | batch | tokens/s | ms/step | hit rate | PCIe MB/step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sub:
            vc = "–" if r["policy"] == "dense" else f"{r['value_cache_chunks']} ({r['value_cache_mode']})"
            print(f"| {r['policy']} | {vc} | {r.get('mode', 'seen')} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                  f"{r['ms_per_step']:.2f} | {fmt_hit(r)} | {r['pcie_mb_per_step']:.0f} |")
        dense = [r for r in sub if r["policy"] == "dense"]
        if not dense:
            continue
        dmax = max(dense, key=lambda r: r["batch"])
        fit = None
        if len({r["batch"] for r in dense}) >= 2:
            n = len(dense)
            sx = sum(r["batch"] for r in dense)
            sy = sum(r["ms_per_step"] for r in dense)
            sxx = sum(r["batch"] ** 2 for r in dense)
            sxy = sum(r["batch"] * r["ms_per_step"] for r in dense)
            c = (n * sxy - sx * sy) / (n * sxx - sx * sx)
            fit = ((sy - c * sx) / n, c)
        print(f"\n| value cache | mode | ShadowKV batch | tokens/s | vs dense at B={dmax['batch']} | vs dense unlimited |")
        print("|---|---|---|---|---|---|")
        best = {}
        for r in sub:
            if r["policy"] == "dense":
                continue
            key = (r["value_cache_mode"], r.get("mode", "seen"))
            if key not in best or r["batch"] > best[key]["batch"]:
                best[key] = r
        for (vc, mode), r in best.items():
            unl = "–"
            if fit:
                t = fit[0] + fit[1] * r["batch"]
                if t > 0:
                    unl = f"{r['tokens_per_s'] / (r['batch'] / (t / 1e3)):.2f}×"
            print(f"| {vc} | {mode} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_s'] / dmax['tokens_per_s']:.2f}× | {unl} |")


if __name__ == "__main__":
    sys.exit(main())
