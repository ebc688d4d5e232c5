"""Time and peak extra memory of the embedding-health computation (`dinoflow.evaluate.health.embedding_health`,
run by the neighbours stage) against the embeddings it reads, at collection scale.

    OMP_NUM_THREADS=2 python benchmarks/bench_health.py [--quick] [--n N] [--dim D]

Data: N seeded float32 rows of dimension D (default 384, ViT-S) = one big common vector + 1e-5 noise (what a random
ViT with LayerScale 1e-5 gives; the work does not depend on the values). The health parameters are params.yaml's
`health` section (sampled pairs and RankMe rows), so the cost is O(n_pairs x D + rankme_rows x D), not O(N^2).
Baseline, in the same run: the size of the embedding matrix itself (peak extra memory is reported as a ratio to
it) and one pass over it (`x.mean(axis=0, dtype=float64)`, the collection mean the health needs anyway).
Peak memory is measured with tracemalloc (NumPy reports its buffers to it). Full: N = 1,000,000; --quick:
N = 100,000. Results: benchmarks/results/health.json and health.md (health_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import yaml

from dinoflow.evaluate.health import HealthConfig, embedding_health

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # chunked: a float64 copy of 1M x 384 would be 3 GiB
        m = min(100_000, n - s)
        x[s:s + m] = common + 1e-5 * rng.normal(size=(m, d))
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = HealthConfig.from_params(params)
    x = data(n, args.dim)

    t0 = time.perf_counter()
    x.mean(axis=0, dtype=np.float64)
    t_pass = time.perf_counter() - t0

    tracemalloc.start()
    t0 = time.perf_counter()
    h = embedding_health(x, center=True, similarity="centred cosine, float64", cfg=cfg, seed=0, model="bench")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    result = {"n": n, "dim": args.dim, "health": {k: getattr(cfg, k) for k in ("n_pairs", "rankme_rows", "min_rankme")},
              "seconds": round(seconds, 3), "one_pass_seconds": round(t_pass, 3),
              "time_ratio_to_one_pass": round(seconds / max(t_pass, 1e-9), 2),
              "embeddings_mib": round(x.nbytes / 2**20, 1), "peak_extra_mib": round(peak / 2**20, 1),
              "peak_extra_ratio_to_embeddings": round(peak / x.nbytes, 4), "degenerate": h["degenerate"],
              "rankme": h["rankme"], "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "command": " ".join(sys.argv)}
    name = "health_quick" if args.quick else "health"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(
        f"# embedding health at N = {n:,}, D = {args.dim}\n\n`{result['command']}` "
        f"(OMP_NUM_THREADS={result['omp_num_threads']}, {result['cpu_count']} cores, load average "
        f"{', '.join(f'{v:.1f}' for v in result['load_average'])})\n\n"
        f"| quantity | value |\n|---|---|\n"
        f"| health parameters | n_pairs {cfg.n_pairs:,}, rankme_rows {cfg.rankme_rows:,} |\n"
        f"| time | {seconds:.2f} s ({result['time_ratio_to_one_pass']}x one pass over the embeddings) |\n"
        f"| peak extra memory | {result['peak_extra_mib']} MiB ({result['peak_extra_ratio_to_embeddings']}x the "
        f"{result['embeddings_mib']} MiB embeddings) |\n"
        f"| flagged degenerate (common vector + 1e-5 noise) | {h['degenerate']} |\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
