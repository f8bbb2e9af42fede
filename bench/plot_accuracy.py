#!/usr/bin/env python3
"""Tables and a plot of `accuracy --json` output (docs/accuracy.md is drawn from it).

    python3 bench/plot_accuracy.py bench/results/accuracy.json --markdown   # the tables
    python3 bench/plot_accuracy.py bench/results/accuracy.json --out docs/accuracy.png
    python3 bench/plot_accuracy.py bench/results/accuracy.json bench/results/accuracy_seed2.json \
        --markdown --policies dense,shadowkv,oracle --budget 6.25   # runs side by side, pooled

With more than one file (runs on other cases, e.g. other --seed), --markdown prints one table per
task: each cell is every run's accuracy, then all runs pooled (correct answers over all cases).

The plot shows accuracy against context length, one panel per task, one line per policy and
budget (the main grid: rank at its default, outliers on). It needs matplotlib; --markdown needs
nothing beyond Python.
"""
import argparse
import json
import sys
from collections import defaultdict


def label_budget(r):
    """The row's budget, percent of the context."""
    return r["budget_tokens"] * 100.0 / r["context"]


def label(r):
    p = r["policy"]
    if p == "dense":
        return "dense"
    return f"{p} {label_budget(r):.2f}%"


def markdown(d):
    rows = d["rows"]
    print(f"Run: `{d['command']}` on {d['device']}, {d['date']}, {d['cases']} cases per cell, "
          f"{d['seconds']:.0f} s.\n")
    for task in sorted({r["task"] for r in rows}):
        grid = [r for r in rows if r["task"] == task and r["group"] == "grid"]
        lengths = sorted({r["context"] for r in grid})
        labels = []
        for r in grid:
            if label(r) not in labels:
                labels.append(label(r))
        cell = {(label(r), r["context"]): r for r in grid}
        print(f"**{task}**: accuracy (%) by context length (budget as % of the context; ShadowKV rank "
              f"{next((r['rank'] for r in grid if r['policy'] == 'shadowkv'), '-')})\n")
        print("| policy | " + " | ".join(str(l) for l in lengths) + " |")
        print("|---|" + "---|" * len(lengths))
        for lab in labels:
            vals = []
            for l in lengths:
                r = cell.get((lab, l))
                vals.append("-" if r is None else f"{100 * r['accuracy']:.0f} (b {r['budget_tokens']})"
                            if r["policy"] != "dense" else f"{100 * r['accuracy']:.0f}")
            print(f"| {lab} | " + " | ".join(vals) + " |")
        print()
        other = [r for r in rows if r["task"] == task and r["group"] != "grid"]
        if other:
            ctx = other[0]["context"]
            print(f"**{task}** at {ctx} tokens, budget {other[0]['budget_tokens']} tokens: rank sweep and outliers\n")
            print("| configuration | accuracy (%) |")
            print("|---|---|")
            base = [r for r in grid if r["context"] == ctx and r["budget_tokens"] == other[0]["budget_tokens"]]
            for r in sorted(base + other, key=lambda r: (r["policy"], not r["outliers"], r["rank"])):
                what = f"{r['policy']}" + (f", rank {r['rank']}" if r["policy"] == "shadowkv" else "")
                what += ", outliers " + ("on" if r["outliers"] else "off")
                print(f"| {what} | {100 * r['accuracy']:.0f} |")
            print()
    att = d.get("attention", [])
    if att:
        ctx = att[0]["context"]
        print(f"Attention per layer at {ctx} tokens (teacher-forced answer steps): ShadowKV's output error "
              "against dense, its chunk recall against the oracle's selection at the same budget, the hit "
              "rate of its selections between consecutive steps; the oracle's output error for comparison.\n")
        print("| budget | layer | ShadowKV rel. error | oracle rel. error | chunk recall | hit rate |")
        print("|---|---|---|---|---|---|")
        oracle = {(r["budget_tokens"], r["layer"]): r for r in att if r["policy"] == "oracle"}
        for r in att:
            if r["policy"] != "shadowkv":
                continue
            o = oracle.get((r["budget_tokens"], r["layer"]))
            print(f"| {r['budget_tokens']} | {r['layer']} | {r['output_rel_error']:.4f} | "
                  f"{o['output_rel_error']:.4f} | {r['chunk_recall']:.3f} | {r['hit_rate']:.3f} |")
        print()


def plot(d, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: matplotlib is not installed (apt-get install python3-matplotlib)", file=sys.stderr)
        return 1
    rows = [r for r in d["rows"] if r["group"] == "grid"]
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                lines[label(r)].append((r["context"], 100 * r["accuracy"]))
        for lab, pts in lines.items():
            pts.sort()
            style = "-" if lab == "dense" else ("--" if lab.startswith("oracle") else "-.")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{task} ({d['cases']} cases per point)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"retrieval-6l on {d['device']}, {d['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def pooled_markdown(runs, names, policies, budget):
    """Per task, the grid cells of every run side by side and pooled over the runs."""
    cells = []
    for d in runs:
        cells.append({(r["task"], label(r), r["context"]): r for r in d["rows"] if r["group"] == "grid"})
    for name, c in zip(names[1:], cells[1:]):
        if set(c) != set(cells[0]):
            raise SystemExit(f"error: {name} does not measure the same cells (task, policy, budget, length) "
                             f"as {names[0]}")
    print("Runs: " + "; ".join(f"`{d['command']}` on {d['device']}, {d['date']}, seed {d.get('seed', '?')}, "
                               f"{d['cases']} cases per cell" for d in runs) + ".\n")
    for task in sorted({k[0] for k in cells[0]}):
        keys = [k for k in cells[0] if k[0] == task]
        lengths = sorted({k[2] for k in keys})
        labels = []
        for k in keys:  # the order of the first run's rows
            r = cells[0][k]
            if policies and r["policy"] not in policies:
                continue
            if budget is not None and r["policy"] != "dense" and abs(label_budget(r) - budget) > 0.01:
                continue
            if k[1] not in labels:
                labels.append(k[1])
        print(f"**{task}**: accuracy (%) of each run, then pooled over the {len(runs)} runs\n")
        print("| policy | " + " | ".join(str(l) for l in lengths) + " |")
        print("|---|" + "---|" * len(lengths))
        for lab in labels:
            vals = []
            for l in lengths:
                rs = [c.get((task, lab, l)) for c in cells]
                if rs[0] is None:
                    vals.append("-")
                    continue
                right = sum(round(r["accuracy"] * r["n"]) for r in rs)
                n = sum(r["n"] for r in rs)
                vals.append(" / ".join(f"{100 * r['accuracy']:.0f}" for r in rs) + f" / {100 * right / n:.1f}")
            print(f"| {lab} | " + " | ".join(vals) + " |")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="accuracy --json output (more than one: runs compared, --markdown only)")
    ap.add_argument("--out", default="docs/accuracy.png", help="image to write (default docs/accuracy.png)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown instead of plotting")
    ap.add_argument("--policies", help="with several files: comma-separated policies to show (default all)")
    ap.add_argument("--budget", type=float, help="with several files: only this budget, percent (dense always)")
    a = ap.parse_args()
    runs = []
    for path in a.json:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"json {path}: {e}")
    if len(runs) > 1:
        if not a.markdown:
            ap.error("several json files: only --markdown compares runs")
        policies = set(a.policies.split(",")) if a.policies else None
        pooled_markdown(runs, a.json, policies, a.budget)
        return 0
    if a.policies or a.budget is not None:
        ap.error("--policies and --budget apply when several json files are compared")
    if a.markdown:
        markdown(runs[0])
        return 0
    return plot(runs[0], a.out)


if __name__ == "__main__":
    sys.exit(main())
