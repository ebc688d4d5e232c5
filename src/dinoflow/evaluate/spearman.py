"""Spearman correlation between two similarity matrices over the pairs i < j, exact or from sampled pairs.

Exact, memory-bounded (`exact_pair_spearman`): the ~N^2/2 pair similarities are never stored. Each pass streams
row blocks of the upper triangle (recomputed by matrix products, identical in every pass). Average ranks (ties
share their mean rank, as `scipy.stats.rankdata`) come from a counting structure over the order-preserving uint32
key of every float32 value:

1. pass 1 counts values per coarse bin (the key's top 16 bits: 65,536 bins);
2. the most populated bins (within `table_budget_bytes`) get a dense table of counts per exact key (65,536
   uint32 each, turned into cumulative counts); values of the other, sparse bins are kept as sorted keys;
3. pass 2 fills the tables, pass 3 looks every value up: rank = #values below + (#equal + 1) / 2, and accumulates
   sum((ra - m)(rb - m)), sum((ra - m)^2), sum((rb - m)^2) in float64 with m = (M + 1) / 2 the mean rank.

Memory: two tables of at most `table_budget_bytes`, the sparse keys, and a few block-sized temporaries.
`benchmarks/bench_spearman.py` measures time and peak memory at N = 47,000 (1.1 billion pairs).

Sampled (`sampled_pair_spearman`): uniform pairs i < j (with replacement), Spearman of the sample, and a
percentile bootstrap over the sampled pairs. Each bootstrap replicate re-ranks exactly, in O(n) per replicate:
the sample is sorted once, and a replicate's average ranks follow from its multiplicities (see `_TieGroups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from dinoflow.errors import DinoflowError

COARSE_SHIFT = 16
N_COARSE = 1 << (32 - COARSE_SHIFT)
FINE = 1 << COARSE_SHIFT
FINE_MASK = np.uint32(FINE - 1)


def float_keys(v: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 -> uint32 (a < b  <=>  key(a) < key(b); -0.0 and 0.0 share a key)."""
    v = np.asarray(v, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0: one key for zero
    if not np.isfinite(v).all():
        raise DinoflowError("similarities contain NaN or infinity (an embedding with NaN or zero norm?)")
    u = v.view(np.uint32)
    neg = (u >> np.uint32(31)).astype(bool)
    return np.where(neg, ~u, u | np.uint32(0x80000000))


def pair_blocks(xa: np.ndarray, xb: np.ndarray, block_elements: int = 1 << 22,
                desc: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (a, b): the dot products xa_i.xa_j and xb_i.xb_j of the pairs i < j, one row block at a time.

    Every call yields the same values in the same order (same block shapes, same BLAS calls).
    """
    n = xa.shape[0]
    rows = max(1, block_elements // max(n, 1))
    starts = range(0, n - 1, rows)
    for i0 in tqdm(starts, desc=desc, unit="block", disable=desc is None, leave=False):
        i1 = min(i0 + rows, n - 1)
        b = i1 - i0
        out = []
        for x in (xa, xb):
            s = x[i0:i1] @ x[i0:].T  # (b, n - i0): the triangle part is its first b columns
            tri = s[:, :b][np.triu_indices(b, k=1)]
            out.append(np.concatenate([tri, s[:, b:].ravel()]))
        yield out[0], out[1]


class _RankTable:
    """Exact average ranks of a multiset of float32 values, built from streamed blocks (see module doc)."""

    def __init__(self, total: int, table_budget_bytes: int, dense_min_count: int = FINE // 4):
        self.total = total
        self.budget = table_budget_bytes
        self.dense_min_count = dense_min_count
        self.coarse = np.zeros(N_COARSE, dtype=np.int64)
        self.dtype = np.uint32 if total < 2**32 else np.uint64
        self.tables: np.ndarray | None = None
        self._tail_parts: list[np.ndarray] = []

    def count_coarse(self, keys: np.ndarray) -> None:
        self.coarse += np.bincount(keys >> np.uint32(COARSE_SHIFT), minlength=N_COARSE)

    def plan(self) -> None:
        """Choose the dense bins: the fullest ones, while their tables fit the budget and beat sorted keys."""
        if int(self.coarse.sum()) != self.total:
            raise DinoflowError(f"internal: counted {int(self.coarse.sum())} values, expected {self.total}")
        per_table = FINE * np.dtype(self.dtype).itemsize
        max_tables = int(self.budget // per_table)
        by_count = np.argsort(-self.coarse, kind="stable")
        # a dense table costs as much memory as FINE / 4 stored keys would; below that, keep keys
        dense = [int(h) for h in by_count[:max_tables] if self.coarse[h] >= max(1, self.dense_min_count)]
        self.slot = np.full(N_COARSE, -1, dtype=np.int32)
        self.slot[dense] = np.arange(len(dense))
        self.below = np.cumsum(self.coarse) - self.coarse  # values in all lower coarse bins
        is_dense = self.slot >= 0
        dense_counts = np.where(is_dense, self.coarse, 0)
        self.dense_below = np.cumsum(dense_counts) - dense_counts  # dense values in lower bins
        self.tables = np.zeros((len(dense), FINE), dtype=self.dtype)
        self.n_tail = int(self.total - dense_counts.sum())

    def fill(self, keys: np.ndarray) -> None:
        hi = (keys >> np.uint32(COARSE_SHIFT)).astype(np.int64)
        slot = self.slot[hi]
        d = slot >= 0
        if d.any():
            # slot * FINE + low < 2**32 always: uint32 sorts faster (SIMD) and halves the memory traffic
            flat = np.sort((slot[d].astype(np.uint32) << np.uint32(COARSE_SHIFT)) | (keys[d] & FINE_MASK))
            starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
            counts = np.diff(np.r_[starts, flat.size])
            self.tables.reshape(-1)[flat[starts]] += counts.astype(self.dtype)
        if not d.all():
            self._tail_parts.append(keys[~d])

    def finish(self) -> None:
        np.cumsum(self.tables, axis=1, out=self.tables)  # inclusive cumulative counts within each bin
        self.tail = np.sort(np.concatenate(self._tail_parts)) if self._tail_parts else np.zeros(0, np.uint32)
        self._tail_parts = []
        if self.tail.size != self.n_tail:
            raise DinoflowError("internal: similarity passes disagree (non-deterministic matrix products?)")

    def ranks(self, keys: np.ndarray) -> np.ndarray:
        """1-based average ranks (float64) of `keys`, each of which must be in the multiset."""
        hi = (keys >> np.uint32(COARSE_SHIFT)).astype(np.int64)
        slot = self.slot[hi]
        out = np.empty(keys.shape, dtype=np.float64)
        d = slot >= 0
        if d.any():
            flat = slot[d].astype(np.int64) * FINE + (keys[d] & FINE_MASK)
            tab = self.tables.reshape(-1)
            incl = tab[flat].astype(np.int64)
            first = (flat % FINE) == 0
            excl = np.where(first, 0, tab[np.maximum(flat - 1, 0)].astype(np.int64))
            self._check(incl - excl)
            out[d] = self.below[hi[d]] + excl + (incl - excl + 1) / 2.0
        if not d.all():
            q = keys[~d]
            order = np.argsort(q, kind="stable")  # sorted queries make searchsorted cache-friendly
            qs = q[order]
            left = np.empty(q.size, np.int64)
            right = np.empty(q.size, np.int64)
            left[order] = np.searchsorted(self.tail, qs, side="left")
            right[order] = np.searchsorted(self.tail, qs, side="right")
            self._check(right - left)
            out[~d] = left + self.dense_below[hi[~d]] + (right - left + 1) / 2.0
        return out

    @staticmethod
    def _check(counts: np.ndarray) -> None:
        if counts.size and counts.min() < 1:
            raise DinoflowError("internal: a similarity value was not counted (non-deterministic products?)")


@dataclass
class ExactResult:
    spearman: float
    n_pairs: int
    n_tail_a: int
    n_tail_b: int
    table_bytes: int


def exact_pair_spearman(xa: np.ndarray, xb: np.ndarray, block_elements: int = 1 << 22,
                        table_budget_bytes: int = 512 << 20, progress: bool = False,
                        dense_min_count: int = FINE // 4) -> ExactResult:
    """Exact Spearman between {xa_i.xa_j} and {xb_i.xb_j} over all pairs i < j (rows given, not normalised here).

    dense_min_count: a coarse bin gets a dense table from this many values on (tests lower it to 1).
    """
    xa = np.ascontiguousarray(xa, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n = xa.shape[0]
    if xb.shape[0] != n:
        raise DinoflowError(f"align: {n} image rows but {xb.shape[0]} text rows")
    if n < 3:
        raise DinoflowError(f"align: need at least 3 items for a rank correlation, got {n}")
    m = n * (n - 1) // 2
    ta = _RankTable(m, table_budget_bytes, dense_min_count)
    tb = _RankTable(m, table_budget_bytes, dense_min_count)

    def blocks(stage: str):
        return pair_blocks(xa, xb, block_elements, desc=f"spearman {stage}" if progress else None)

    for a, b in blocks("1/3 count"):
        ta.count_coarse(float_keys(a))
        tb.count_coarse(float_keys(b))
    ta.plan()
    tb.plan()
    for a, b in blocks("2/3 tables"):
        ta.fill(float_keys(a))
        tb.fill(float_keys(b))
    ta.finish()
    tb.finish()
    mean = (m + 1) / 2.0
    sab = saa = sbb = 0.0
    for a, b in blocks("3/3 ranks"):
        ra = ta.ranks(float_keys(a)) - mean
        rb = tb.ranks(float_keys(b)) - mean
        sab += float(ra @ rb)
        saa += float(ra @ ra)
        sbb += float(rb @ rb)
    rho = sab / np.sqrt(saa * sbb) if saa > 0 and sbb > 0 else float("nan")
    return ExactResult(float(rho), m, ta.n_tail, tb.n_tail, int(ta.tables.nbytes + tb.tables.nbytes))


# ----------------------------------------------------------------------------------------------- sampled pairs


def sample_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n_pairs` pairs (i, j), i < j, uniform over the n(n-1)/2 pairs, drawn with replacement."""
    if n < 2:
        raise DinoflowError(f"align: need at least 2 items to sample pairs, got {n}")
    i_out, j_out, have = [], [], 0
    while have < n_pairs:
        need = n_pairs - have
        i = rng.integers(0, n, size=need + need // max(n - 1, 1) + 16)
        j = rng.integers(0, n, size=i.size)
        keep = i != j
        i, j = i[keep][:need], j[keep][:need]
        i_out.append(np.minimum(i, j))
        j_out.append(np.maximum(i, j))
        have += i.size
    return np.concatenate(i_out), np.concatenate(j_out)


def pair_dots(x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """x_i . x_j for each pair, in chunks (never materialises len(i) x D gathered rows at once)."""
    out = np.empty(i.size, dtype=np.float32)
    for s in range(0, i.size, chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", x[i[s:s + chunk]], x[j[s:s + chunk]])
    return out


class _TieGroups:
    """A sample sorted once, so that average ranks under any multiplicities (bootstrap) cost O(n)."""

    def __init__(self, v: np.ndarray):
        order = np.argsort(v, kind="stable")
        sv = v[order]
        new = np.r_[True, sv[1:] != sv[:-1]]
        self.gid = np.empty(v.size, dtype=np.int64)
        self.gid[order] = np.cumsum(new) - 1
        self.n_groups = int(new.sum())

    def ranks(self, weights: np.ndarray | None) -> np.ndarray:
        """Average ranks (1-based) of each element in the multiset where element i appears weights[i] times."""
        w = np.bincount(self.gid, weights=weights, minlength=self.n_groups)
        below = np.cumsum(w) - w
        return (below + (w + 1) / 2.0)[self.gid]


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> float:
    if w is None:
        w = np.ones_like(x)
    sw = w.sum()
    mx, my = (w @ x) / sw, (w @ y) / sw
    dx, dy = x - mx, y - my
    sxy, sxx, syy = w @ (dx * dy), w @ (dx * dx), w @ (dy * dy)
    return float(sxy / np.sqrt(sxx * syy)) if sxx > 0 and syy > 0 else float("nan")


def spearman_with_bootstrap(a: np.ndarray, b: np.ndarray, n_bootstrap: int, rng: np.random.Generator,
                            alpha: float = 0.05) -> tuple[float, float, float]:
    """Spearman of paired samples and its percentile bootstrap (1 - alpha) interval (exact re-ranking)."""
    ga, gb = _TieGroups(np.asarray(a)), _TieGroups(np.asarray(b))
    rho = _weighted_pearson(ga.ranks(None), gb.ranks(None), None)
    n = len(a)
    reps = np.empty(n_bootstrap)
    for r in range(n_bootstrap):
        w = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        reps[r] = _weighted_pearson(ga.ranks(w), gb.ranks(w), w)
    if n_bootstrap == 0:
        return rho, float("nan"), float("nan")
    lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2])
    return rho, float(lo), float(hi)


@dataclass
class SampledResult:
    spearman: float
    ci_low: float
    ci_high: float
    n_pairs: int


def sampled_pair_spearman(xa: np.ndarray, xb: np.ndarray, n_pairs: int, n_bootstrap: int,
                          rng: np.random.Generator) -> SampledResult:
    """Spearman over uniformly sampled pairs i < j with a bootstrap 95% interval for the all-pairs value."""
    i, j = sample_pairs(xa.shape[0], n_pairs, rng)
    rho, lo, hi = spearman_with_bootstrap(pair_dots(xa, i, j), pair_dots(xb, i, j), n_bootstrap, rng)
    return SampledResult(rho, lo, hi, int(n_pairs))
