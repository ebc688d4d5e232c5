"""kNN-based metrics that are defined when similarities tie (identical captions, duplicate or collapsed embeddings).

A top-k list over tied similarities is otherwise decided by index order: sixteen images all captioned
"holiday photo" have text neighbour lists that are just the first k other rows, and any overlap with the image
neighbours is an artefact of that order. Here every top-k statistic is its expectation under uniformly random
tie-breaking (equivalently: the average over all orderings of the tied items):

- `inclusion_probabilities(sims, k)`: P(item j is among the k nearest of row i). Items strictly above the k-th
  largest value v are in (1); of the m items equal to v, r = k - #above are drawn at random, so each is in with
  r / m; the rest are out (0). Each row sums to k.
- `expected_topk_hit(scores, y, k)`: P(the true class is among the k highest scores): with a classes strictly
  above the true class's score and m classes (itself included) tied with it, min(1, max(0, (k - a) / m)).
- `mutual_knn_overlap(fa, fb, k)`: per item, E|kNN_a(i) & kNN_b(i)| / k with independent tie-breaking in the two
  spaces, = sum_j p_a(i, j) p_b(i, j) / k (Huh et al. 2024, "The Platonic Representation Hypothesis", mutual
  k-NN, made tie-aware). With a constant text space it equals the chance level k / (n - 1) exactly.

Ties are exact: similarities are computed once per distinct embedding row (`UniqueRows`) and copied to every
duplicate, so two images with the same caption get bit-identical similarities (a plain matrix product does not
guarantee that: duplicate rows may differ in the last bit depending on their position).
"""

from __future__ import annotations

import numpy as np


def inclusion_probabilities(sims: np.ndarray, k: int) -> np.ndarray:
    """(B, M) float64: P(column j is among the k largest entries of row b) under random tie-breaking.

    sims: (B, M) similarities; -inf marks an excluded entry (e.g. the query itself), which gets 0. When a row has
    fewer than k finite entries, all of them get 1. Raises ValueError for k < 1 or NaN input.
    """
    sims = np.asarray(sims, dtype=np.float64)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if np.isnan(sims).any():
        raise ValueError("similarities contain NaN")
    b, m = sims.shape
    if m == 0:
        return np.zeros((b, 0))
    kk = min(k, m)
    kth = -np.partition(-sims, kk - 1, axis=1)[:, kk - 1]
    above = sims > kth[:, None]
    equal = (sims == kth[:, None]) & np.isfinite(sims)
    n_above = above.sum(axis=1)
    n_equal = equal.sum(axis=1)
    share = np.divide(kk - n_above, n_equal, out=np.zeros(b), where=n_equal > 0)
    return above.astype(np.float64) + equal * share[:, None]


def expected_topk_hit(scores: np.ndarray, y: np.ndarray, k: int, rtol: float = 1e-9) -> np.ndarray:
    """(N,) float64: P(class y[i] is among the k highest scores of row i) under random tie-breaking of classes.

    scores: (N, C) class scores (probabilities, vote sums; -inf for classes a model cannot predict); scores within
    `rtol` (relative) of the true class's score count as tied with it (sums of the same tied votes may differ in
    the last bits).
    """
    scores = np.asarray(scores, dtype=np.float64)
    true = scores[np.arange(len(y)), y][:, None]
    tol = rtol * np.maximum(np.abs(true), np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore"):  # -inf - -inf
        diff = scores - true
        tied = np.where(np.isinf(true), scores == true, np.abs(diff) <= tol)
        above = np.where(np.isinf(true), scores > true, diff > tol)
    a, m = above.sum(axis=1), tied.sum(axis=1)
    return np.clip((min(k, scores.shape[1]) - a) / m, 0.0, 1.0)


class UniqueRows:
    """Distinct rows of a feature matrix (float64), so that duplicates get bit-identical similarities.

    x: (N, D). `unique`: (U, D), `inverse`: (N,) row -> distinct row. `sims(rows, other)`: (len(rows), N_other)
    dot products of the given rows with every row of `other` (a UniqueRows), each computed once per distinct pair.
    """

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64) + 0.0  # -0.0 -> 0.0 so that equal rows compare equal bytewise
        self.unique, inverse = np.unique(x, axis=0, return_inverse=True)
        self.inverse = np.asarray(inverse).reshape(-1)
        self.n = x.shape[0]

    @property
    def n_unique(self) -> int:
        return int(self.unique.shape[0])

    def modal_share(self) -> float:
        """Share of rows equal to the most frequent row (1.0: all rows identical)."""
        return float(np.bincount(self.inverse).max() / self.n) if self.n else 0.0

    def sims(self, rows: np.ndarray, other: "UniqueRows") -> np.ndarray:
        q = self.unique[self.inverse[rows]]
        return (q @ other.unique.T)[:, other.inverse]


def mutual_knn_overlap(fa: np.ndarray, fb: np.ndarray, k: int, queries: np.ndarray | None = None,
                       block_elements: int = 1 << 23) -> np.ndarray:
    """(Q,) float64: tie-aware mutual-kNN overlap E|kNN_a(i) & kNN_b(i)| / k of each query item i.

    fa, fb: (N, Da), (N, Db) rows ready for cosine similarity by dot product (`vectors.similarity_features`),
    same items in the same order; queries: item indices (default: all N). Neighbours are searched among all N
    items, the query itself excluded; k is capped at N - 1. Memory: blocks of `block_elements` similarities per
    space. Time O(Q N (Da + Db)).
    """
    n = fa.shape[0]
    if fb.shape[0] != n:
        raise ValueError(f"row counts differ: {n} vs {fb.shape[0]}")
    if n < 2:
        raise ValueError(f"mutual kNN needs at least 2 items, got {n}")
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    kk = min(k, n - 1)
    ua, ub = UniqueRows(fa), UniqueRows(fb)
    out = np.empty(queries.size)
    rows = max(1, block_elements // n)
    for s in range(0, queries.size, rows):
        idx = queries[s:s + rows]
        probs = []
        for u in (ua, ub):
            sims = u.sims(idx, u)
            sims[np.arange(idx.size), idx] = -np.inf
            probs.append(inclusion_probabilities(sims, kk))
        out[s:s + idx.size] = (probs[0] * probs[1]).sum(axis=1) / kk
    return out
