"""Embedding-health statistics shared by training monitors, the evaluation stages and the report.

`embedding_health` writes the metrics/health/<model>.json object (docs/architecture.md, contract 3): the spread
of pairwise cosines of the raw embeddings and of the similarity the evaluation uses, RankMe, and a `degenerate`
flag with its reason. The `neighbours` stage computes it (it has the embeddings loaded).

RankMe: Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank", ICML 2023, eq. (1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from dinoflow.errors import DinoflowError


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    """Effective rank of a set of embeddings: exp of the Shannon entropy of the normalised singular values.

    x: (N, D) embeddings (any float dtype; computed in float64). p_k = sigma_k / sum(sigma) + eps over the
    min(N, D) singular values; RankMe = exp(-sum_k p_k log p_k), between 1 (all rows on one line) and min(N, D)
    (a flat spectrum). Returns 0.0 for an all-zero or empty matrix. Raises ValueError when x is not 2-D or holds
    a non-finite value.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"rankme: expected a 2-D (N, D) matrix, got shape {x.shape}")
    if x.size == 0:
        return 0.0
    if not np.isfinite(x).all():
        raise ValueError("rankme: the embeddings hold NaN or infinite values")
    s = np.linalg.svd(x, compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------------------- embedding health
# Unit roundoff of float32: a D-term dot product of unit vectors computed in float32 can be off by up to about
# D * 2^-24 (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5, gamma_D).
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
PAIR_BLOCK = 16384  # pairs whose rows are gathered at once: 2 x 16384 x D float64 at most


def float32_cosine_resolution(dim: int) -> float:
    """Worst-case float32 rounding error of a cosine of two unit `dim`-vectors, dim * 2^-24 (Higham's gamma_D)."""
    return float(dim) * FLOAT32_UNIT_ROUNDOFF


@dataclass(frozen=True)
class HealthConfig:
    """The `health` params section: how metrics/health/<model>.json is estimated, and when it says degenerate.

    n_pairs: image pairs sampled for the cosine spread (all N(N-1)/2 pairs when there are no more than that);
    rankme_rows: rows sampled for RankMe (all rows when N is smaller); min_rankme: RankMe below this bound flags
    the embeddings as degenerate (they span fewer effective dimensions than that).
    """

    n_pairs: int
    rankme_rows: int
    min_rankme: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "HealthConfig":
        section = params.get("health")
        if not isinstance(section, Mapping):
            raise DinoflowError("params.yaml: the `health` section is missing "
                                "(e.g. `health: {n_pairs: 200000, rankme_rows: 10000, min_rankme: 2.0}`)")
        for key in ("n_pairs", "rankme_rows"):
            if not isinstance(section.get(key), int) or isinstance(section.get(key), bool) or section[key] < 1:
                raise DinoflowError(f"health.{key}: expected an integer >= 1, got {section.get(key)!r}")
        value = section.get("min_rankme")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 1:
            raise DinoflowError(f"health.min_rankme: expected a number >= 1, got {value!r}")
        return cls(n_pairs=int(section["n_pairs"]), rankme_rows=int(section["rankme_rows"]),
                   min_rankme=float(value))


def sample_pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j: every pair i < j when N(N-1)/2 <= n_pairs, else `n_pairs` pairs drawn
    uniformly (with replacement) with a seeded generator. Returns two int64 arrays of equal length."""
    total = n * (n - 1) // 2
    if total <= n_pairs:
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs, dtype=np.int64)
    j = (i + rng.integers(1, n, size=n_pairs, dtype=np.int64)) % n  # uniform over the other n - 1 rows
    return i, j


def pair_cosines(x: np.ndarray, i: np.ndarray, j: np.ndarray, center: bool,
                 mean: np.ndarray | None = None) -> np.ndarray:
    """float64 cosines of the row pairs (x[i], x[j]), of `similarity_features` rows (centred on `mean`, the
    collection mean, when `center`). Rows are gathered PAIR_BLOCK pairs at a time, so memory is O(block x D)."""
    from dinoflow.evaluate.vectors import collection_mean, similarity_features

    if center and mean is None:
        mean = collection_mean(x)
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), PAIR_BLOCK):
        a = similarity_features(x[i[s:s + PAIR_BLOCK]], center=center, mean=mean)
        b = similarity_features(x[j[s:s + PAIR_BLOCK]], center=center, mean=mean)
        out[s:s + PAIR_BLOCK] = np.einsum("ij,ij->i", a, b)
    return out


def cosine_summary(c: np.ndarray) -> dict[str, float | None]:
    """{"median", "p01", "p99", "std"} of pair cosines (float64; None for each when there is no pair)."""
    if len(c) == 0:
        return {"median": None, "p01": None, "p99": None, "std": None}
    p01, median, p99 = np.quantile(c, [0.01, 0.5, 0.99])
    return {"median": float(median), "p01": float(p01), "p99": float(p99), "std": float(np.std(c))}


def embedding_health(x: np.ndarray, *, center: bool, similarity: str, cfg: HealthConfig, seed: int,
                     model: str, source: str = "embeddings") -> dict[str, Any]:
    """The metrics/health/<model>.json object (contract 3) of (N, D) embeddings `x`.

    cosine_raw: float64 cosines of the raw embeddings over sampled pairs; cosine_used: the same pairs under the
    similarity actually used (`similarity_features` with `center`); rankme: RankMe of the raw embeddings (a
    seeded sample of `cfg.rankme_rows` rows). `degenerate` is true, with the reasons, when
    - the raw cosines spread (p99 - p01) no wider than float32 can resolve (`float32_cosine_resolution(D)`):
      float32 cosine rankings of these embeddings would be rounding noise (a random ViT with LayerScale 1e-5);
    - RankMe < cfg.min_rankme: the embeddings span fewer effective dimensions than that (uniform collapse);
    - the used similarity is 0 for every pair (identical embeddings: nothing to rank).
    Memory: O(block x D) for the pairs and O(rankme_rows x D) for RankMe, so it runs on 1M images.
    Raises DinoflowError naming `source` when x is not a 2-D finite matrix with at least 2 rows.
    """
    from dinoflow.evaluate.vectors import collection_mean

    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DinoflowError(f"{source}: embedding health needs at least 2 embeddings, got shape {x.shape}")
    n, dim = x.shape
    mean = collection_mean(x)
    if not np.isfinite(mean).all():
        raise DinoflowError(f"{source}: the embeddings hold NaN or infinite values")
    i, j = sample_pairs(n, cfg.n_pairs, seed)
    raw = cosine_summary(pair_cosines(x, i, j, center=False))
    used = cosine_summary(pair_cosines(x, i, j, center=center, mean=mean))
    rows = x if n <= cfg.rankme_rows else x[np.sort(np.random.default_rng(seed).choice(n, cfg.rankme_rows,
                                                                                        replace=False))]
    rank = rankme(rows)
    reasons = []
    resolution = float32_cosine_resolution(dim)
    spread = raw["p99"] - raw["p01"]
    if spread <= resolution:
        reasons.append(f"raw cosines spread over {spread:.3g} (p01 {raw['p01']:.12f}, p99 {raw['p99']:.12f}), "
                       f"within float32 resolution {resolution:.3g} for {dim}-d vectors: every image embeds to "
                       f"nearly the same vector and float32 cosine rankings would be rounding noise")
    if rank < cfg.min_rankme:
        reasons.append(f"RankMe {rank:.3f} < {cfg.min_rankme:g}: the embeddings span fewer than "
                       f"{cfg.min_rankme:g} effective dimensions")
    if len(i) > 1 and used["std"] == 0.0:
        reasons.append(f"the {similarity} is the same for every sampled pair: the embeddings are identical")
    return {"model": model, "n": int(n), "dim": int(dim), "n_pairs": int(len(i)), "n_rankme_rows": int(len(rows)),
            "cosine_raw": raw, "cosine_used": used, "rankme": rank, "degenerate": bool(reasons),
            "reason": "; ".join(reasons) if reasons else None, "similarity": similarity,
            "float32_resolution": resolution}
