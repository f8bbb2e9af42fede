"""Tests of bench/plot_accuracy.py's tables (the figures docs/accuracy.md is drawn from).

    python3 -m unittest discover -s bench -p 'test_*.py' -v
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot_accuracy.py")


def run_json(seed, dense, shadowkv, n=100, contexts=(2048, 4096)):
    """An `accuracy --json`-shaped run: dense and ShadowKV at 6.25% on mk-niah."""
    rows = []
    for ctx, a_dense, a_skv in zip(contexts, dense, shadowkv):
        rows.append({"task": "mk-niah", "policy": "dense", "context": ctx, "budget_tokens": 0, "rank": 0,
                     "outliers": True, "group": "grid", "accuracy": a_dense, "n": n})
        rows.append({"task": "mk-niah", "policy": "shadowkv", "context": ctx, "budget_tokens": ctx // 16,
                     "rank": 40, "outliers": True, "group": "grid", "accuracy": a_skv, "n": n})
    return {"command": f"accuracy --seed {seed}", "device": "test", "date": "2026-11-26T00:00:00Z",
            "cases": n, "seconds": 1.0, "seed": seed, "rows": rows}


class PooledTablesTest(unittest.TestCase):
    def run_script(self, *runs, extra=()):
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, d in enumerate(runs):
                paths.append(os.path.join(tmp, f"run{i}.json"))
                with open(paths[-1], "w") as f:
                    json.dump(d, f)
            return subprocess.run([sys.executable, SCRIPT, *paths, "--markdown", *extra],
                                  capture_output=True, text=True)

    def test_cells_show_each_run_then_the_pooled_share(self):
        # Pooled over the cases, not the mean of the runs: dense at 4096 is (96 + 98 + 45) / 250 =
        # 95.6%, where the mean of 96, 98 and 90 would be 94.7.
        out = self.run_script(run_json(1, [0.98, 0.96], [0.93, 0.96]),
                              run_json(2, [0.93, 0.98], [0.90, 0.97]),
                              run_json(3, [0.98, 0.90], [0.98, 0.90], n=50)).stdout
        self.assertIn("| dense | 98 / 93 / 98 / 96.0 | 96 / 98 / 90 / 95.6 |", out)
        self.assertIn("| shadowkv 6.25% | 93 / 90 / 98 / 92.8 | 96 / 97 / 90 / 95.2 |", out)
        self.assertIn("seed 1", out)
        self.assertIn("seed 3", out)

    def test_policies_and_budget_filter_the_rows(self):
        out = self.run_script(run_json(1, [1.0, 1.0], [0.5, 0.5]), run_json(2, [1.0, 1.0], [0.5, 0.5]),
                              extra=("--policies", "shadowkv")).stdout
        self.assertNotIn("| dense |", out)
        self.assertIn("| shadowkv 6.25% | 50 / 50 / 50.0 |", out)
        out = self.run_script(run_json(1, [1.0, 1.0], [0.5, 0.5]), run_json(2, [1.0, 1.0], [0.5, 0.5]),
                              extra=("--budget", "3.125")).stdout
        self.assertIn("| dense |", out)
        self.assertNotIn("shadowkv", out)

    def test_runs_of_other_cells_are_refused(self):
        r = self.run_script(run_json(1, [1.0, 1.0], [1.0, 1.0]),
                            run_json(2, [1.0], [1.0], contexts=(2048,)))
        self.assertEqual(r.returncode, 1)
        self.assertIn("does not measure the same cells", r.stderr)

    def test_filters_need_several_runs(self):
        r = self.run_script(run_json(1, [1.0, 1.0], [1.0, 1.0]), extra=("--budget", "6.25"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("--policies and --budget", r.stderr)


if __name__ == "__main__":
    unittest.main()
