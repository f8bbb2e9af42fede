#!/usr/bin/env python3
"""How close a randomized range finder comes to the exact top-r eigenvectors of the key Gram.

The ShadowKV build's eigensolve (cuSOLVER syevBatched of the [H_kv*d]^2 Gram) is half of the
64K prefill overhead (docs/benchmarks.md). A randomized range finder (a random [n, p] block,
q power steps on the Gram with re-orthonormalisation, Rayleigh-Ritz on the p x p projection)
needs only GEMMs and a small eigensolve. This measures, on keys with a power-law spectrum
(singular values i^-alpha in a random basis), the reconstruction error ||K - K V V^T|| / ||K||
of its rank-r basis over that of the exact one.

    /usr/bin/python3 bench/randomized_basis_study.py               # n 1024, L 16384, r 160
    /usr/bin/python3 bench/randomized_basis_study.py --alphas 1.0 --q 0,1,2

It needs numpy (python3-numpy).
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402  (after the thread count)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024, help="H_kv * d (default 1024: Llama-3.1-8B)")
    ap.add_argument("--rows", type=int, default=16384, help="keys (tokens)")
    ap.add_argument("--rank", type=int, default=160)
    ap.add_argument("--alphas", default="0.5,1.0,1.5", help="spectra: singular value i^-alpha")
    ap.add_argument("--oversample", default="32,64", help="p - r values")
    ap.add_argument("--q", default="0,1,2,3", help="power steps after the first product")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not 1 <= a.rank <= a.dim:
        ap.error(f"--rank={a.rank} must be in [1, --dim={a.dim}]")
    if a.rows < a.dim:
        ap.error(f"--rows={a.rows} must be >= --dim={a.dim}")
    rng = np.random.default_rng(a.seed)
    n, r = a.dim, a.rank
    for alpha in (float(x) for x in a.alphas.split(",")):
        basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
        keys = (rng.standard_normal((a.rows, n)) * np.arange(1, n + 1) ** (-alpha)) @ basis.T
        gram = keys.T @ keys

        def error(v):
            return np.linalg.norm(keys - (keys @ v) @ v.T) / np.linalg.norm(keys)

        exact = error(np.linalg.eigh(gram)[1][:, ::-1][:, :r])
        cells = [f"alpha {alpha}: exact error {exact:.4f}"]
        for extra in (int(x) for x in a.oversample.split(",")):
            p = min(n, r + extra)
            for q in (int(x) for x in a.q.split(",")):
                omega = rng.choice([-1.0, 1.0], size=(n, p))
                block, _ = np.linalg.qr(gram @ omega)
                for _ in range(q):
                    block, _ = np.linalg.qr(gram @ block)
                _, w = np.linalg.eigh(block.T @ gram @ block)
                cells.append(f"p {p} q {q}: {error(block @ w[:, ::-1][:, :r]) / exact:.4f}x")
        print(", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
