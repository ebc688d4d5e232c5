"""Exact all-pairs Spearman at N = 47,000 items (~1.1 billion pairs): time, peak memory, and the sampled estimate's
error against it.

    OMP_NUM_THREADS=2 python benchmarks/bench_spearman.py [--quick] [--n N]

Data: synthetic image / text embeddings (d = 384 each) sharing a 16-dimensional latent factor, so the two
similarity matrices are correlated and their values are spread like real cosine similarities.
Exact method: `dinoflow.evaluate.spearman.exact_pair_spearman` (three streamed passes over row blocks of the upper
triangle, exact average ranks from a two-level counting table; never stores the pairs). Baseline measured in the
same run: one pass of the two similarity matrix products alone (the irreducible cost of looking at every pair);
memory is compared with materialising the pairs for `scipy.stats.spearmanr` (2 float32 values + 2 float64 ranks per
pair). Sampled estimate: `align.n_sampled_pairs` uniform pairs with `align.n_bootstrap` bootstrap replicates.
Results: benchmarks/results/spearman.json and spearman.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from dinoflow.evaluate.spearman import exact_pair_spearman, pair_blocks, sampled_pair_spearman
from dinoflow.evaluate.vectors import l2_normalize

HERE = Path(__file__).resolve().parent


def synthetic(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 16)).astype(np.float32)
    a = z @ rng.normal(size=(16, d)).astype(np.float32) + 5.0 * rng.normal(size=(n, d)).astype(np.float32)
    b = z @ rng.normal(size=(16, d)).astype(np.float32) + 5.0 * rng.normal(size=(n, d)).astype(np.float32)
    return l2_normalize(a), l2_normalize(b)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 6,000 (18 million pairs), well under a minute")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n-sampled-pairs", type=int, default=2_000_000)
    ap.add_argument("--n-bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (6000 if args.quick else 47000)
    xa, xb = synthetic(n, args.d, args.seed)
    m = n * (n - 1) // 2

    t0 = time.perf_counter()
    for _a, _b in pair_blocks(xa, xb):
        pass
    t_products = time.perf_counter() - t0

    rss_before = rss_peak_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    exact = exact_pair_spearman(xa, xb, progress=True)
    t_exact = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = rss_peak_bytes()

    t0 = time.perf_counter()
    sampled = sampled_pair_spearman(xa, xb, args.n_sampled_pairs, args.n_bootstrap, np.random.default_rng(args.seed))
    t_sampled = time.perf_counter() - t0

    naive_bytes = m * (4 + 4 + 8 + 8)
    res = {
        "n_items": n, "dim": args.d, "n_pairs": m, "quick": args.quick,
        "machine": {"cpu_count": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                    "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_at_end": os.getloadavg()},
        "exact": {"spearman": exact.spearman, "seconds": t_exact,
                  "peak_traced_bytes": traced_peak, "peak_rss_bytes": rss_after,
                  "rss_peak_increase_bytes": max(0, rss_after - rss_before),
                  "dense_table_bytes": exact.table_bytes, "sparse_values": [exact.n_tail_a, exact.n_tail_b]},
        "baseline_products_seconds": t_products,
        "exact_over_products_time_ratio": t_exact / t_products,
        "naive_materialised_bytes": naive_bytes,
        "exact_peak_over_naive_memory_ratio": traced_peak / naive_bytes,
        "sampled": {"spearman": sampled.spearman, "ci_low": sampled.ci_low, "ci_high": sampled.ci_high,
                    "n_pairs": sampled.n_pairs, "n_bootstrap": args.n_bootstrap, "seconds": t_sampled,
                    "abs_error": abs(sampled.spearman - exact.spearman),
                    "ci_covers_exact": bool(sampled.ci_low <= exact.spearman <= sampled.ci_high)},
        "sampled_over_exact_time_ratio": t_sampled / t_exact,
    }
    name = "spearman_quick" if args.quick else "spearman"
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    gib = 1 << 30
    md = f"""# Exact all-pairs Spearman ({'quick' if args.quick else 'full'})

`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/bench_spearman.py {' '.join(sys.argv[1:])}`
on {os.cpu_count()} CPU cores (shared machine; load average at the end {os.getloadavg()[0]:.1f}).

| | value |
|---|---|
| items / pairs | {n:,} / {m:,} |
| exact Spearman | {exact.spearman:.6f} |
| exact time | {t_exact:.1f} s ({t_exact / t_products:.2f} x one pass of the similarity products, {t_products:.1f} s) |
| exact peak memory (numpy, tracemalloc) | {traced_peak / gib:.2f} GiB ({traced_peak / naive_bytes:.3f} x materialising pairs for scipy, {naive_bytes / gib:.1f} GiB) |
| process peak RSS | {rss_after / gib:.2f} GiB |
| sampled estimate ({sampled.n_pairs:,} pairs, {args.n_bootstrap} bootstrap) | {sampled.spearman:.6f} [{sampled.ci_low:.6f}, {sampled.ci_high:.6f}] in {t_sampled:.1f} s |
| sampled abs. error / CI covers exact | {abs(sampled.spearman - exact.spearman):.2e} / {res['sampled']['ci_covers_exact']} |
"""
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
