"""`dinoflow groups`: which images are near-duplicates of each other, so that evaluation never splits them.

A probe whose test image has a resized copy, a recompressed copy or a skin-tone sibling in the training split
measures memory, not representation quality. Every ok image of the processed index gets a group:

- `collection.group_column` set: the value of that column in the manifest (ingest keeps it, like the label
  columns). Images without a value are groups of one.
- otherwise: connected components of the graph joining two images whose perceptual hashes (`imagehash.phash`
  of the processed 256 px image, 64 bits, the `phash` column of `paths.PROCESSED_INDEX`) differ in at most
  `groups.max_distance` bits (Hamming distance). Components are transitive: a chain of near-duplicates is one
  group.

Near pairs are found without comparing all pairs (`hamming_pairs`): identical hashes collapse first; then, by
the pigeonhole principle, two 64-bit hashes within distance d agree exactly on at least one of d + 1 disjoint
bit chunks (multi-index hashing, Norouzi, Punjani & Fleet, CVPR 2012), so only hashes sharing a chunk value are
compared (vectorised, in bounded batches). The cost is the number of such candidates, about
(d + 1) N^2 / 2^(64 / (d + 1) + 1) for uniformly spread hashes: `benchmarks/bench_groups.py` measures it at 1M.

Writes `paths.GROUPS` (id, group) and `paths.GROUPS_SUMMARY` (how groups were formed, how many have two or more
images).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger, write_json

log = get_logger(__name__)

HASH_BITS = 64
BATCH_PAIRS = 1 << 22  # candidate pairs verified per batch (memory: a few x 8 bytes each)


def parse_hashes(hex_hashes: pd.Series | list[str]) -> np.ndarray:
    """(N,) uint64 from 16-digit hex strings (str(imagehash.phash(...))). DinoflowError names a bad row."""
    values = list(hex_hashes)
    out = np.empty(len(values), dtype=np.uint64)
    for i, h in enumerate(values):
        try:
            if h is None or len(h) != HASH_BITS // 4:
                raise ValueError
            out[i] = np.uint64(int(h, 16))
        except (TypeError, ValueError):
            raise DinoflowError(f"{paths.PROCESSED_INDEX}: row {i}: phash {h!r} is not a 16-digit hex string "
                                "(rerun `dinoflow preprocess`)") from None
    return out


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (elementwise)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def chunk_bounds(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the d + 1 disjoint bit chunks (widths differ by at most one)."""
    n = max_distance + 1
    widths = [HASH_BITS // n + (1 if i < HASH_BITS % n else 0) for i in range(n)]
    shifts = np.cumsum([0] + widths[:-1])
    return [(int(s), int(w)) for s, w in zip(shifts, widths)]


def _pairs_in_runs(order: np.ndarray, sorted_keys: np.ndarray):
    """Yield batches (i, j) of all pairs of positions sharing a key (i < j in sorted order), mapped by `order`."""
    m = sorted_keys.size
    if m < 2:
        return
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, m])
    run_of = np.repeat(np.arange(starts.size), sizes)
    offset = np.arange(m) - starts[run_of]
    partners = sizes[run_of] - 1 - offset  # later elements of the same run
    cum = np.cumsum(partners)
    lo = 0
    while lo < m:
        base = cum[lo - 1] if lo else 0
        hi = int(np.searchsorted(cum, base + BATCH_PAIRS, side="right"))
        hi = max(hi, lo + 1)
        cnt = partners[lo:hi]
        total = int(cnt.sum())
        if total:
            left = np.repeat(np.arange(lo, hi), cnt)
            step = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            yield order[left], order[left + 1 + step]
        lo = hi


def hamming_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j), i != j, of `hashes` (uint64) with Hamming distance <= max_distance.

    Each pair at most once per shared chunk (duplicates possible across chunks; harmless for components).
    Identical hashes are joined to their first occurrence (a star, not all pairs). Raises ValueError for a
    distance outside [0, 63].
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    dup = np.flatnonzero(first[inverse] != np.arange(hashes.size))
    out_i, out_j = [first[inverse[dup]]], [dup]
    if max_distance > 0:
        for shift, width in chunk_bounds(max_distance):
            key = (uniq >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(key, kind="stable")
            for a, b in _pairs_in_runs(order, key[order]):
                near = hamming_distance(uniq[a], uniq[b]) <= max_distance
                out_i.append(first[a[near]])
                out_j.append(first[b[near]])
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(n,) component label of each node of the undirected graph with edges (i, j) (scipy.sparse.csgraph)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def phash_groups(ids: np.ndarray, hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group name of each image: the id of the first image (in the given order) of its near-duplicate component."""
    labels = components(len(ids), *hamming_pairs(hashes, max_distance))
    _, first = np.unique(labels, return_index=True)
    first_of = np.empty(labels.max() + 1 if labels.size else 0, dtype=np.int64)
    first_of[np.unique(labels)] = first
    return np.asarray(ids, dtype=object)[first_of[labels]].astype(str)


def column_groups(params: dict[str, Any], ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(group of each id from collection.group_column, number of images without a value: groups of one).

    Ingest keeps the group column in the manifest (like the label columns). Raises DinoflowError when the
    manifest is missing or lacks the column (ingest ran with another `collection.group_column`)."""
    column = params["collection"]["group_column"]
    if not os.path.exists(paths.MANIFEST):
        raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
    names = pq.read_schema(paths.MANIFEST).names
    if column not in names:
        raise DinoflowError(f"collection.group_column {column!r}: not a column of {paths.MANIFEST} (columns: "
                            f"{', '.join(names)}); re-run `dinoflow ingest` after changing collection.group_column")
    manifest = pd.read_parquet(paths.MANIFEST, columns=["id", column])
    by_id = pd.Series(manifest[column].to_numpy(dtype=object), index=manifest["id"].astype(str).to_numpy())
    by_id = by_id[~by_id.index.duplicated()]
    group = by_id.reindex(ids).to_numpy(dtype=object)
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
                        for v in group], dtype=bool)
    group = np.where(missing, np.array([f"<no {column}> {i}" for i in ids], dtype=object), group)
    return group.astype(str), int(missing.sum())


def summarise(groups: np.ndarray, source: str, column: str | None, max_distance: int | None) -> dict[str, Any]:
    """The `paths.GROUPS_SUMMARY` record (contract 1)."""
    _, sizes = np.unique(groups, return_counts=True)
    return {"source": source, "column": column, "hash": "phash", "max_distance": max_distance,
            "n_images": int(groups.size), "n_groups": int(sizes.size),
            "n_near_duplicate_groups": int((sizes >= 2).sum()),
            "n_images_in_near_duplicate_groups": int(sizes[sizes >= 2].sum())}


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    if not os.path.exists(paths.PROCESSED_INDEX):
        raise DinoflowError(f"{paths.PROCESSED_INDEX}: not found (run `dinoflow preprocess` first)")
    index = pq.read_table(paths.PROCESSED_INDEX).to_pandas()
    ids = index["id"].astype(str).to_numpy()
    column = params["collection"].get("group_column")
    max_distance = int(params["groups"]["max_distance"])
    if column:
        groups, n_missing = column_groups(params, ids)
        summary = summarise(groups, "group_column", column, None)
        summary["n_images_without_group_value"] = n_missing
        log.info("groups: from collection.group_column %r: %d images in %d groups (%d images have no value: "
                 "groups of one)", column, ids.size, summary["n_groups"], n_missing)
    else:
        if "phash" not in index.columns:
            raise DinoflowError(f"{paths.PROCESSED_INDEX}: no `phash` column (written by an older preprocess: "
                                "rerun `dinoflow preprocess`)")
        groups = phash_groups(ids, parse_hashes(index["phash"]), max_distance)
        summary = summarise(groups, "phash", None, max_distance)
    log.info("groups: %d images, %d groups, %d near-duplicate groups holding %d images", summary["n_images"],
             summary["n_groups"], summary["n_near_duplicate_groups"], summary["n_images_in_near_duplicate_groups"])
    os.makedirs(os.path.dirname(paths.GROUPS), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "group": pa.array(groups, pa.string())}),
                   paths.GROUPS)
    write_json(paths.GROUPS_SUMMARY, summary)
    log.info("groups -> %s, summary -> %s", paths.GROUPS, paths.GROUPS_SUMMARY)
    return summary
