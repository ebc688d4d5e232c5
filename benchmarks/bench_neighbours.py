"""Recall@10 of the FAISS neighbour path against exact search, and their time ratio, on synthetic vectors.

    OMP_NUM_THREADS=2 python benchmarks/bench_neighbours.py [--quick] [--n N] [--index ivf|hnsw|flat]
        [--n-queries Q] [--nprobe 1,4,16,...] [--centres C] [--search-all] [--name SUFFIX]

Data: N unit vectors (d = 384, seeded) drawn around --centres random centres (default 2,000) with noise
(clustered like real embeddings; uniform random vectors have no meaningful neighbours). The index is built
exactly as the neighbours stage builds it above `neighbours.exact_max_n`
(`dinoflow.evaluate.neighbours.build_faiss_index`, IVF by default: nlist ~ 4 sqrt(N) spherical k-means lists trained on a seeded sample) over all N vectors.

Recall is measured on a seeded random sample of Q queries (rows of the data, default 2,000; each query itself is
excluded from its own neighbours, as in the stage) against exact blocked search (`exact_topk`) for the same
queries, which is also the time baseline: exact and approximate search times are for the same Q queries, in the
same run. Exact search of all N at 1M would take hours on 2 cores, so the stage-level figures (all N queries)
are extrapolated linearly from the sampled queries unless --search-all runs the FAISS all-vs-all search for real.
For IVF the recall/throughput trade-off is swept over nprobe on the same built index (the stage's nprobe is
`neighbours.faiss_nprobe`). Full: N = 1,000,000; --quick: N = 50,000 and 500 queries.
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
import yaml

from dinoflow.evaluate.neighbours import _drop_self, build_faiss_index, exact_topk, ivf_nlist, search_blocked
from dinoflow.evaluate.vectors import l2_normalize

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def clustered(n: int, d: int, n_centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(n_centres, d)))
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunked: the float64 noise of 1M x 384 would be 3 GiB
        m = min(100_000, n - s)
        x[s:s + m] = centres[rng.integers(0, n_centres, m)] + 0.06 * rng.normal(size=(m, d)).astype(np.float32)
    return l2_normalize(x)


def approx_search(index, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Top-k of rows q (self excluded, as `faiss_topk` does) and the seconds the search took."""
    t0 = time.perf_counter()
    scores, ids = search_blocked(index, x[q], k + 1)
    t = time.perf_counter() - t0
    kept, _ = _drop_self(ids, scores, k, self_ids=q)
    return kept, t

def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(approx, exact)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 50,000, 500 queries")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index", default=None, choices=["ivf", "hnsw", "flat"],
                    help="default: neighbours.faiss_index of params.yaml")
    ap.add_argument("--n-queries", type=int, default=None, help="sampled queries (default 2000, quick 500)")
    ap.add_argument("--nprobe", default="1,4,8,16,32,64", help="IVF nprobe values swept on the same index")
    ap.add_argument("--search-all", action="store_true", help="also time the all-vs-all FAISS search (stage)")
    ap.add_argument("--centres", type=int, default=2000, help="cluster centres of the synthetic data (more = "
                    "fewer vectors per cluster, a harder search)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="", help="suffix of the result files (neighbours_<name>.json)")
    args = ap.parse_args()
    cfg = yaml.safe_load((REPO / "params.yaml").read_text())["neighbours"]
    index_name = args.index or cfg.get("faiss_index", "ivf")
    stage_nprobe = int(cfg.get("faiss_nprobe", 16))
    n = args.n or (50_000 if args.quick else 1_000_000)
    nq = min(args.n_queries or (500 if args.quick else 2000), n)
    k = args.k

    t0 = time.perf_counter()
    x = clustered(n, args.d, args.centres, args.seed)
    print(f"data: {n:,} x {args.d} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    q = np.sort(np.random.default_rng(args.seed + 1).choice(n, size=nq, replace=False))

    t0 = time.perf_counter()
    exact_idx, _ = exact_topk(x, k + 1, queries=x[q], exclude_self=False)
    t_exact = time.perf_counter() - t0
    # drop each query itself (normally its own best match) to compare with the self-excluding search
    exact_idx = np.array([[j for j in row if j != qi][:k] for row, qi in zip(exact_idx, q)])
    print(f"exact: {nq} queries in {t_exact:.1f} s", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    index = build_faiss_index(x, index_name, seed=args.seed, nprobe=stage_nprobe, k=k + 1)
    t_build = time.perf_counter() - t0
    print(f"build {index_name}: {t_build:.1f} s", file=sys.stderr, flush=True)

    sweep = []
    settings = [int(v) for v in args.nprobe.split(",")] if index_name == "ivf" else [None]
    if index_name == "ivf" and stage_nprobe not in settings:
        settings = sorted(settings + [stage_nprobe])
    for nprobe in settings:
        if nprobe is not None:
            index.nprobe = nprobe
        ids, t = approx_search(index, x, q, k)
        row = {"nprobe": nprobe, "recall_at_k": recall_at_k(ids, exact_idx), "search_seconds": t,
               "queries_per_s": nq / t, "exact_over_approx_time_ratio": t_exact / t}
        sweep.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    stage = next(r for r in sweep if r["nprobe"] in (stage_nprobe, None))

    t_all = None
    if args.search_all:
        if index_name == "ivf":
            index.nprobe = stage_nprobe
        t0 = time.perf_counter()
        search_blocked(index, x, k + 1, progress=True)
        t_all = time.perf_counter() - t0
    t_all_est = t_all if t_all is not None else stage["search_seconds"] * n / nq
    t_exact_all_est = t_exact * n / nq

    res = {"n": n, "d": args.d, "centres": args.centres, "k": k, "index": index_name, "quick": args.quick,
           "seed": args.seed,
           "n_queries": nq, "query_sampling": "seeded uniform sample of data rows, each excluding itself",
           "nlist": int(index.nlist) if index_name == "ivf" else None,
           "ivf_nlist_rule": "min(4 sqrt(N), N/39)" if index_name == "ivf" else None,
           "stage_nprobe": stage_nprobe if index_name == "ivf" else None,
           "build_seconds": t_build, "exact_seconds_sampled_queries": t_exact,
           "exact_queries_per_s": nq / t_exact, "stage_setting": stage, "sweep": sweep,
           "all_vs_all_faiss_search_seconds": t_all_est, "all_vs_all_measured": t_all is not None,
           "all_vs_all_exact_seconds_extrapolated": t_exact_all_est,
           "stage_faiss_build_plus_search_seconds": t_build + t_all_est,
           "stage_exact_over_faiss_time_ratio": t_exact_all_est / (t_build + t_all_est),
           "cpu_count": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "loadavg_at_end": os.getloadavg()}
    name = ("neighbours_quick" if args.quick else "neighbours") + (f"_{args.name}" if args.name else "")
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    label = {"ivf": f"IVFFlat, nlist {res['nlist']}", "hnsw": "HNSWFlat", "flat": "FlatIP"}[index_name]
    rows = "\n".join(
        f"| {r['nprobe'] if r['nprobe'] is not None else '-'}{' (stage)' if r is stage else ''} "
        f"| {r['recall_at_k']:.4f} | {r['queries_per_s']:,.0f} | {r['exact_over_approx_time_ratio']:.1f} |"
        for r in sweep)
    all_how = "measured" if t_all is not None else f"extrapolated from the {nq} queries"
    md = f"""# FAISS neighbour search vs exact ({'quick' if args.quick else 'full'})

`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/bench_neighbours.py {' '.join(sys.argv[1:])}`
({os.cpu_count()} shared CPU cores, load average at the end {os.getloadavg()[0]:.1f})

{n:,} x {args.d} clustered unit vectors ({args.centres:,} centres, seed {args.seed}); FAISS {label} over all of them,
built as the neighbours stage builds it. Recall@{k} and times are on a seeded random sample of {nq} data rows
as queries (each excluding itself), against exact blocked search of the same {nq} queries in the same run.

| | value |
|---|---|
| index build (k-means training on a sample + adding {n:,}) | {t_build:.1f} s |
| exact blocked search, {nq} queries | {t_exact:.1f} s ({nq / t_exact:,.0f} queries/s) |

| nprobe | recall@{k} | FAISS queries/s | exact / FAISS time, same queries |
|---|---|---|---|
{rows}

Stage level (all {n:,} rows as queries, nprobe {stage['nprobe']}): FAISS build + search
{t_build + t_all_est:,.0f} s (search {all_how}) vs exact blocked search {t_exact_all_est:,.0f} s (extrapolated):
ratio exact / FAISS {t_exact_all_est / (t_build + t_all_est):.1f}.
"""
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
