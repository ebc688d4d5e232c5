"""Recall@10 of the FAISS neighbour path against exact search, and their time ratio, on synthetic vectors.

    OMP_NUM_THREADS=2 python benchmarks/bench_neighbours.py [--quick] [--n N] [--index hnsw|ivf|flat]

Data: N unit vectors (d = 384) drawn around 2,000 random centres (clustered like real embeddings; uniform random
vectors have no meaningful neighbours). The FAISS path (`dinoflow.evaluate.neighbours.faiss_topk`, as the stage runs
it above `neighbours.exact_max_n`) indexes and searches all N vectors. Exact search (`exact_topk`, the blocked
matrix products) is the baseline in the same run: it is run for a seeded sample of queries (exact for all N would
take hours at 1M on 2 cores) and its full cost is extrapolated linearly from that sample (each query costs the
same). Recall@10 is measured on the same sampled queries. Full: N = 1,000,000; --quick: N = 50,000.
Results: benchmarks/results/neighbours.json and neighbours.md (neighbours_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from dinoflow.evaluate.neighbours import exact_topk, faiss_topk
from dinoflow.evaluate.vectors import l2_normalize

HERE = Path(__file__).resolve().parent


def clustered(n: int, d: int, n_centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(n_centres, d)))
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunked: the float64 noise of 1M x 384 would be 3 GiB
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, n_centres, m)] + 0.06 * rng.normal(size=(m, d)).astype(np.float32)
    return l2_normalize(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index", default="hnsw", choices=["hnsw", "ivf", "flat"])
    ap.add_argument("--n-queries", type=int, default=1000, help="sampled queries for recall and exact timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (50_000 if args.quick else 1_000_000)
    x = clustered(n, args.d, 2000, args.seed)
    q = np.sort(np.random.default_rng(args.seed + 1).choice(n, size=min(args.n_queries, n), replace=False))

    t0 = time.perf_counter()
    exact_idx, _ = exact_topk(x, args.k + 1, queries=x[q], exclude_self=False)
    t_exact_sample = time.perf_counter() - t0
    # drop each query itself (it is its own best match) to compare with the self-excluding search
    exact_idx = np.array([[j for j in row if j != qi][:args.k] for row, qi in zip(exact_idx, q)])
    t_exact_all = t_exact_sample * n / len(q)

    t0 = time.perf_counter()
    f_idx, _ = faiss_topk(x, args.k, index=args.index, seed=args.seed)
    t_faiss = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(f_idx[q], exact_idx)]))

    res = {"n": n, "d": args.d, "k": args.k, "index": args.index, "quick": args.quick, "n_queries": len(q),
           "recall_at_k": recall, "faiss_seconds_build_and_search_all": t_faiss,
           "exact_seconds_sampled_queries": t_exact_sample, "exact_seconds_all_extrapolated": t_exact_all,
           "faiss_over_exact_time_ratio": t_faiss / t_exact_all, "cpu_count": os.cpu_count(),
           "omp_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_at_end": os.getloadavg()}
    name = "neighbours_quick" if args.quick else "neighbours"
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = f"""# FAISS neighbour search vs exact ({'quick' if args.quick else 'full'})

`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/bench_neighbours.py {' '.join(sys.argv[1:])}`
({os.cpu_count()} shared CPU cores, load average at the end {os.getloadavg()[0]:.1f})

| | value |
|---|---|
| vectors | {n:,} x {args.d} (clustered, unit norm) |
| recall@{args.k} of FAISS {args.index} vs exact ({len(q)} sampled queries) | {recall:.4f} |
| FAISS build + search of all {n:,} | {t_faiss:.1f} s |
| exact blocked search, all {n:,} (extrapolated from {len(q)} queries: {t_exact_sample:.1f} s) | {t_exact_all:.1f} s |
| time ratio FAISS / exact | {t_faiss / t_exact_all:.3f} |
"""
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
