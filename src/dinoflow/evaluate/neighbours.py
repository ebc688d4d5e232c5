"""Top-k neighbours of every image (itself excluded) under the similarity the evaluation uses, per model.

The similarity is the cosine of `similarity_features` rows (the `similarity` params section: with `center`, the
collection mean is subtracted first), so that a model whose embeddings share one large common vector (a random ViT
with LayerScale 1e-5) is ranked by what differs between images, not by float32 rounding of cosines near 1.
Up to `neighbours.exact_max_n` images: exact search in float64 by blocked matrix products (a block of query rows
against all vectors, `np.argpartition` per row), so memory stays O(block x N), never N x N. Above it: a FAISS
index with inner-product metric: IVF by default (`neighbours.faiss_index`: `ivf`, `hnsw` or `flat`), the one whose
build stays practical at 1M vectors on a CPU. FAISS works in float32 only: the rows are centred and normalised in
float64 first and only then cast, so the float32 inner products are of well-spread values (no cancellation).
`benchmarks/bench_neighbours.py` measures its recall@10 against exact search at 1M synthetic vectors.

The stage also writes metrics/health/<model>.json (`dinoflow.evaluate.health.embedding_health`, contract 3).
"""


from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dinoflow import paths
from dinoflow.checks import require_finite, require_index_range
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.health import HealthConfig, embedding_health
from dinoflow.evaluate.vectors import SimilarityConfig, collection_mean, read_vectors, read_vectors_metadata, \
    similarity_features
from dinoflow.utils import get_logger, write_json

log = get_logger(__name__)

# A block of similarities is at most this many values (128 MiB of float64, plus 128 MiB of int64 argpartition
# indices), whatever block_size says, so that block_size x N never outgrows memory for large N.
MAX_BLOCK_ELEMENTS = 1 << 24
FAISS_INDEXES = ("ivf", "hnsw", "flat")
# Arithmetic of each search path, recorded in the neighbours metadata (the report shows it).
PRECISION = {"exact": "float64", "faiss": "float32 inner products of rows centred and normalised in float64"}


def _block_rows(n: int, block_size: int) -> int:
    return int(max(1, min(block_size, MAX_BLOCK_ELEMENTS // max(n, 1))))


def _topk_rows(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k column indices and values per row, sorted by score descending (ties: lower index first)."""
    if k < sims.shape[1]:
        n = sims.shape[1]
        part = np.argpartition(sims, n - k, axis=1)[:, n - k:]  # the k largest, unordered (no negated copy)
    else:
        part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
    vals = np.take_along_axis(sims, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # last key is primary: score descending, then index
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def exact_topk(x: np.ndarray, k: int, block_size: int = 4096, queries: np.ndarray | None = None,
               exclude_self: bool = True, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each row of `x` (or of `queries`) among the rows of `x`.

    `x` holds similarity rows already (`similarity_features`: L2-normalised, so scores are cosines). Computed in
    float64 when `x` is float64 (the stage's case), else in float32. Returns (indices (Q, k) int64, scores
    (Q, k) in that dtype), sorted by score descending (ties: lower index first). With `exclude_self` (only when
    queries is None) row i never lists itself.
    """
    dtype = np.float64 if np.asarray(x).dtype == np.float64 else np.float32
    x = np.ascontiguousarray(x, dtype=dtype)
    q = x if queries is None else np.ascontiguousarray(queries, dtype=dtype)
    self_mode = queries is None and exclude_self
    n = x.shape[0]
    k = _check_k(k, n - (1 if self_mode else 0))
    rows = _block_rows(n, block_size)
    out_idx = np.empty((q.shape[0], k), dtype=np.int64)
    out_val = np.empty((q.shape[0], k), dtype=dtype)
    starts = range(0, q.shape[0], rows)
    for start in tqdm(starts, desc="exact top-k", unit="block", disable=not progress):
        stop = min(start + rows, q.shape[0])
        sims = q[start:stop] @ x.T
        if self_mode:
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        idx, val = _topk_rows(sims, k)
        out_idx[start:stop], out_val[start:stop] = idx, val
    return out_idx, out_val


def ivf_nlist(n: int) -> int:
    """IVF list count: about 4 sqrt(N) (FAISS's guideline), at most N / 39 so k-means has data per centroid."""
    return int(max(1, min(4 * np.sqrt(n), n // 39)))


def build_faiss_index(x: np.ndarray, index: str = "ivf", seed: int = 0, hnsw_m: int = 32,
                      ef_construction: int | None = None, ef_search: int | None = None, nlist: int | None = None,
                      nprobe: int | None = None, train_size: int | None = None, k: int = 10):
    """A FAISS inner-product index holding the rows of `x` (L2-normalised, so scores are cosines).

    ivf: IndexIVFFlat, `nlist` spherical k-means lists trained on a seeded sample of `train_size` rows
    (default 64 per list: k-means on all 1M rows would dominate the build), `nprobe` lists searched per query.
    hnsw: IndexHNSWFlat (best recall per query, but building it at 1M takes hours on 2 cores). flat: exact.
    """
    import faiss

    if index not in FAISS_INDEXES:
        raise DinoflowError(f"neighbours.faiss_index: {index!r} is not one of {', '.join(FAISS_INDEXES)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction or max(40, 2 * hnsw_m)
        idx.hnsw.efSearch = ef_search or max(64, 4 * (k + 1))
    else:
        nlist = min(int(nlist or ivf_nlist(n)), n)
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = seed
        idx.cp.spherical = True  # centroids on the unit sphere, like the data (cosine k-means)
        m = min(n, int(train_size or 64 * nlist))
        # our own seeded sample: FAISS would otherwise subsample to 256 per list with its own (warned) sampling
        idx.cp.max_points_per_centroid = max(256, -(-m // nlist))
        sample = x if m == n else x[np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))]
        idx.train(sample)
        idx.nprobe = min(nlist, int(nprobe or 16))
    idx.add(x)
    return idx


def faiss_topk(x: np.ndarray, k: int, index: str = "ivf", seed: int = 0, **index_kwargs: Any,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate cosine top-k of every row of `x` among the others with a FAISS index (x L2-normalised).

    `index_kwargs` go to `build_faiss_index` (nlist, nprobe, hnsw_m, ef_search, ...). Searches k + 1 and drops
    the row itself (or, if the index missed it, the last hit), so the result has the same shape and order as
    `exact_topk`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k = _check_k(k, n - 1)
    kk = min(k + 1, n)
    idx = build_faiss_index(x, index, seed=seed, k=kk, **index_kwargs)
    log.info("FAISS %s index on %d x %d vectors: searching top-%d", index, n, d, k)
    scores, ids = search_blocked(idx, x, kk)
    return _drop_self(ids, scores, k)


def search_blocked(idx, q: np.ndarray, k: int, block: int = 65536,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Search `q` in blocks of rows (bounded temporary memory, a progress bar); (scores, ids) like FAISS."""
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    ids = np.empty((q.shape[0], k), dtype=np.int64)
    for s in tqdm(range(0, q.shape[0], block), desc="faiss search", unit="block", disable=not progress):
        scores[s:s + block], ids[s:s + block] = idx.search(q[s:s + block], k)
    return scores, ids


def _drop_self(ids: np.ndarray, scores: np.ndarray, k: int,
               self_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove row i's own id (i, or self_ids[i] for a subset of queries) from its hits, keeping k.

    FAISS marks missing hits with -1, kept as such.
    """
    n = ids.shape[0]
    self_ids = np.arange(n) if self_ids is None else np.asarray(self_ids)
    is_self = ids == self_ids[:, None]
    # Rows where the index did not return the query itself drop their last (weakest) hit instead.
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # If several hits equal the query id (cannot happen in FAISS, but be safe) keep only the first as "self".
    first = np.argmax(is_self, axis=1)
    keep = np.ones_like(is_self)
    keep[np.arange(n), first] = False
    ids = ids[keep].reshape(n, -1)[:, :k]
    scores = scores[keep].reshape(n, -1)[:, :k]
    return ids, scores


def _check_k(k: int, available: int) -> int:
    if k < 1:
        raise DinoflowError(f"neighbours.k: must be >= 1, got {k}")
    if available < 1:
        raise DinoflowError("neighbours: need at least 2 images to search neighbours")
    if k > available:
        log.warning("neighbours.k=%d but only %d other images: using k=%d", k, available, available)
    return min(k, available)


def similarity_rows(x: np.ndarray, center: bool, dtype: type = np.float64, block: int = 65536) -> np.ndarray:
    """`similarity_features` of every row of `x` (N, D), centred on the collection mean (float64), computed
    `block` rows at a time and stored as `dtype`: float32 for FAISS keeps 1M x 384 rows at 1.5 GB instead of a
    3 GB float64 copy, with the centring (the step that cancels a large common vector) done in float64."""
    mean = collection_mean(x) if center else None
    out = np.empty(x.shape, dtype=dtype)
    for s in range(0, x.shape[0], block):
        out[s:s + block] = similarity_features(x[s:s + block], center=center, mean=mean)
    return out


def topk_neighbours(x: np.ndarray, k: int, cfg: dict[str, Any], seed: int = 0, progress: bool = False,
                    center: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k of every row of the raw embeddings `x` (N, D) among the others under the used similarity (cosine
    of `similarity_features` rows, centred when `center`), exact or FAISS as `cfg` (the `neighbours` params)
    decides. Stages pass `center=SimilarityConfig.from_params(params).center`; the default (plain cosine) is
    for callers that hand in rows of their own, e.g. text embeddings. Returns (indices (N, k), scores (N, k)
    float64, method) with method "exact" (float64 arithmetic) or "faiss-<index>" (float32 inner products of
    rows centred and normalised in float64: `PRECISION`).
    """
    if x.shape[0] <= int(cfg["exact_max_n"]):
        rows = similarity_rows(x, center, np.float64)
        idx, val = exact_topk(rows, k, block_size=int(cfg["block_size"]), progress=progress)
        return idx, val, "exact"
    index = cfg.get("faiss_index", "ivf")
    rows = similarity_rows(x, center, np.float32)  # FAISS is float32: centre and normalise in float64 first
    idx, val = faiss_topk(rows, k, index=index, seed=seed, nprobe=cfg.get("faiss_nprobe"))
    return idx, val.astype(np.float64), f"faiss-{index}"


COSINE_TOLERANCE = 1e-3  # float32 dot products of unit vectors stay far inside this margin around [-1, 1]


def neighbours_table(ids: np.ndarray, idx: np.ndarray, scores: np.ndarray, what: str = "neighbours") -> pa.Table:
    """Long table: query_id, rank (1 = nearest), neighbour_id, score (float64, the used similarity). FAISS
    misses (-1) are left out.

    Raises: DinoflowError (`what` names the output and model) when an index is outside [0, N) other than the
    FAISS miss marker -1, a kept score is NaN / infinite, or a score is not a cosine (outside [-1, 1]).
    """
    n, k = idx.shape
    require_index_range(idx, len(ids), f"{what}: neighbour indices", missing=-1)
    valid = idx >= 0
    require_finite(scores[valid], f"{what}: neighbour scores")
    outside = np.abs(scores[valid]) > 1 + COSINE_TOLERANCE
    if outside.any():
        raise DinoflowError(f"{what}: {int(outside.sum())} of {int(valid.sum())} neighbour scores are outside "
                            f"[-1, 1] (max |score| {float(np.abs(scores[valid]).max()):.4g}): not cosine "
                            "similarities of unit vectors")
    ids = np.asarray(ids, dtype=object)
    query = np.repeat(ids, k).reshape(n, k)[valid]
    rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int16), (n, k))[valid]
    neigh = ids[np.where(valid, idx, 0)][valid]
    return pa.table({"query_id": pa.array(query, type=pa.string()), "rank": pa.array(rank),
                     "neighbour_id": pa.array(neigh, type=pa.string()),
                     "score": pa.array(scores[valid].astype(np.float64))})


def main(params: dict[str, Any], model: str) -> None:
    """`dinoflow neighbours --model M`: embeddings/M.parquet (CLS) -> neighbours/M.parquet and
    metrics/health/M.json (embedding health under the `similarity` and `health` params)."""
    cfg = params["neighbours"]
    similarity = SimilarityConfig.from_params(params)
    health_cfg = HealthConfig.from_params(params)
    seed = int(params["seed"])
    src = paths.embeddings(model)
    ids, x = read_vectors(src, "cls")
    health = embedding_health(x, center=similarity.center, similarity=similarity.describe(), cfg=health_cfg,
                              seed=seed, model=model, source=src)
    write_json(paths.health_metrics(model), health)
    log.info("%s: embedding health (%s, RankMe %.3g, raw cosine median %.10f) -> %s", model,
             "DEGENERATE: " + health["reason"] if health["degenerate"] else "healthy", health["rankme"],
             health["cosine_raw"]["median"], paths.health_metrics(model))
    idx, scores, method = topk_neighbours(x, int(cfg["k"]), cfg, center=similarity.center, seed=seed,
                                          progress=True)
    out = paths.neighbours(model)
    table = neighbours_table(ids, idx, scores, what=f"{out} (model {model})")
    meta = read_vectors_metadata(src)
    meta.update({"neighbours_method": method, "k": int(idx.shape[1]), "embedding_column": "cls",
                 "similarity": similarity.describe(), "neighbours_precision": PRECISION[method.split("-")[0]]})
    table = table.replace_schema_metadata({b"dinoflow": json.dumps(meta, sort_keys=True, default=str).encode()})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    log.info("%s: top-%d neighbours of %d images (%s, %s) -> %s", model, idx.shape[1], len(ids),
             similarity.describe(), method, out)
