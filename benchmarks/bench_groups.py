"""Near-duplicate search of `dinoflow groups`: multi-index (pigeonhole) Hamming search vs all pairs.

    OMP_NUM_THREADS=1 python benchmarks/bench_groups.py [--quick] [--n N] [--max-distance D]

Data: N random 64-bit hashes (real phashes are less uniform: buckets fill more unevenly, so treat the large-N
time as a lower bound) with 5% planted near-duplicates (1 to D bits flipped) and 1% exact duplicates.
Baseline, same run: every pair compared by vectorised XOR + popcount (numpy), on a subset of `--brute-n` hashes
(all pairs at N = 1M would be 5e11 comparisons), where both methods must find the same components; its time is
extrapolated quadratically to N. Results: benchmarks/results/groups.json and groups.md (groups_quick.* with
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from dinoflow.evaluate.groups import components, hamming_distance, hamming_pairs

HERE = Path(__file__).resolve().parent


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.uint64) ^ (rng.integers(0, 2, size=n, dtype=np.uint64) << np.uint64(63))
    near = rng.choice(n, size=n // 20, replace=False)
    src = rng.integers(0, n, size=near.size)
    flips = np.zeros(near.size, dtype=np.uint64)
    for k in range(near.size):
        for b in rng.choice(64, size=int(rng.integers(1, d + 1)), replace=False):
            flips[k] |= np.uint64(1) << np.uint64(int(b))
    h[near] = h[src] ^ flips
    dup = rng.choice(n, size=n // 100, replace=False)
    h[dup] = h[rng.integers(0, n, size=dup.size)]
    return h


def brute_components(h: np.ndarray, d: int, block: int = 2048) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    ii, jj = [], []
    for s in range(0, h.size, block):
        x = hamming_distance(h[s:s + block, None], h[None, :])
        a, b = np.nonzero(x <= d)
        keep = a + s < b
        ii.append(a[keep] + s)
        jj.append(b[keep])
    labels = components(h.size, np.concatenate(ii), np.concatenate(jj))
    return labels, time.perf_counter() - t


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--brute-n", type=int, default=None)
    ap.add_argument("--max-distance", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (47_000 if args.quick else 1_000_000)
    brute_n = args.brute_n or (10_000 if args.quick else 30_000)
    d = args.max_distance
    h = synthetic(n, d, args.seed)

    sub = h[:brute_n]
    ref, t_brute = brute_components(sub, d)
    t = time.perf_counter()
    fast = components(sub.size, *hamming_pairs(sub, d))
    t_fast_sub = time.perf_counter() - t
    assert same_partition(ref, fast), "multi-index search and all pairs disagree"

    t = time.perf_counter()
    i, j = hamming_pairs(h, d)
    t_pairs = time.perf_counter() - t
    labels = components(h.size, i, j)
    t_all = time.perf_counter() - t
    sizes = np.bincount(labels)
    result = {
        "n": n, "max_distance": d, "seed": args.seed, "brute_n": brute_n,
        "brute_seconds_at_brute_n": t_brute, "fast_seconds_at_brute_n": t_fast_sub,
        "same_components_at_brute_n": True,
        "fast_seconds": t_all, "pair_search_seconds": t_pairs, "n_edges": int(i.size),
        "n_groups": int(sizes.size), "n_near_duplicate_groups": int((sizes >= 2).sum()),
        "brute_seconds_extrapolated_to_n": t_brute * (n / brute_n) ** 2,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    name = "groups_quick" if args.quick else "groups"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python benchmarks/bench_groups.py"
    command += " --quick" if args.quick else ""
    md = f"""# Near-duplicate groups: multi-index Hamming search vs all pairs

`{command}`
({platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})

| | N | max distance | seconds |
|---|---|---|---|
| all pairs (numpy XOR + popcount) | {brute_n:,} | {d} | {t_brute:.2f} |
| dinoflow `hamming_pairs` + components, same hashes (same components: yes) | {brute_n:,} | {d} | {t_fast_sub:.2f} |
| dinoflow, full set | {n:,} | {d} | {t_all:.1f} ({i.size:,} edges, {int((sizes >= 2).sum()):,} near-duplicate groups) |
| all pairs, extrapolated (N^2) | {n:,} | {d} | {t_brute * (n / brute_n) ** 2:,.0f} |
"""
    (HERE / "results" / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
