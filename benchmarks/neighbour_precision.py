"""Do a workflow run's neighbours depend on float rounding? For each model's embeddings (embeddings/<model>.parquet
in the current workflow root), the top-10 neighbours under the used similarity (centred cosine,
`vectors.similarity_features`) computed in float64 and in float32, and the same for the raw cosine; prints the
mean overlap per model (1.0 = identical lists). Exact all-pairs: meant for the demo (N of a few thousand).

    python benchmarks/neighbour_precision.py [model ...]     # default: every embeddings/*.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from dinoflow.evaluate.vectors import read_vectors, similarity_features


def topk(x: np.ndarray, k: int = 10) -> np.ndarray:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(q)) / a.shape[1] for r, q in zip(a, b)]))


def main(models: list[str]) -> None:
    models = models or sorted(p.stem for p in Path("embeddings").glob("*.parquet"))
    for m in models:
        _, x = read_vectors(f"embeddings/{m}.parquet", "cls")
        used = similarity_features(x, center=True)
        raw = similarity_features(x, center=False)
        print(f"{m}: top-10 overlap float32 vs float64: used similarity (centred cosine) "
              f"{overlap(topk(used), topk(used.astype(np.float32))):.4f}, raw cosine "
              f"{overlap(topk(raw), topk(raw.astype(np.float32))):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
