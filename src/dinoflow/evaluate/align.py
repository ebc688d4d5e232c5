"""Image-text alignment of one model: does the image embedding see what captions / keyword descriptors say?

Similarities are cosines of `vectors.similarity_features` rows (centred on the field's images, float64), for
images and texts alike. For each text field (caption, keywords), over the images that have that text:
- `spearman`: rank correlation between image similarity and text similarity over all pairs i < j, exact
  (`spearman.exact_pair_spearman`) up to `align.exact_max_n` items, above it estimated from
  `align.n_sampled_pairs` uniform pairs (`method`: exact / sampled). Its 95% interval over images (bootstrap
  of images, pairs among the resampled images) and the paired differences between models are computed by
  `dinoflow compare`, from the same embeddings;
- `mantel_p`: one-sided permutation (Mantel) p-value: item labels of the text matrix permuted
  `align.n_permutations` times, (1 + #{rho_perm >= rho}) / (1 + n_permutations). Computed on the full triangle of
  all items, or of a seeded random subset of items when that triangle has more than `align.n_sampled_pairs` pairs
  (a valid test of the same null hypothesis; ranks of a full triangle do not change under permutation, so each
  permutation costs one gather);
- `mean_query_spearman`: mean over query items of the Spearman between their image and text similarities to
  all other items (all queries up to exact_max_n, a seeded sample of exact_max_n queries above);
- `mutual_knn`: mean over query items (the same queries) of the tie-aware overlap E|kNN_image(i) & kNN_text(i)| / k,
  k = `align.mutual_knn_k` (Huh et al. 2024, "The Platonic Representation Hypothesis"; expectation under random
  tie-breaking, `ties.mutual_knn_overlap`), with its chance level k / (n - 1) as `mutual_knn_chance`. The
  per-image overlaps go to `paths.align_items(M)` for the bootstrap of `dinoflow compare`.

Undefined statistics are explained, never NaN: when all texts of a field are identical, or more than
`align.near_constant_share` of the images share one text (or one image embedding), the field's statistics are
null and `reason` says why (e.g. "all 16 captions are identical: text similarity is constant"); otherwise
`reason` is null.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import rankdata, spearmanr
from tqdm.auto import tqdm

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.spearman import exact_pair_spearman, pair_dots, sample_pairs
from dinoflow.evaluate.ties import UniqueRows, mutual_knn_overlap
from dinoflow.evaluate.vectors import read_vectors, read_vectors_metadata, similarity_features
from dinoflow.evaluate.text import text_warnings
from dinoflow.utils import get_logger, write_json

log = get_logger(__name__)

TEXT_FIELDS = ("caption", "keywords")
EMBEDDING_COLUMN = "cls"
MIN_ITEMS = 4


def mantel_test(xa: np.ndarray, xb: np.ndarray, n_permutations: int, max_pairs: int,
                rng: np.random.Generator) -> tuple[float, float, int]:
    """(p-value, Spearman on the tested items, number of items tested). Rows of xa/xb are L2-normalised."""
    n = xa.shape[0]
    s = n
    if n * (n - 1) // 2 > max_pairs:
        s = int((1 + np.sqrt(1 + 8 * max_pairs)) // 2)
    items = np.sort(rng.choice(n, size=s, replace=False)) if s < n else np.arange(n)
    iu = np.triu_indices(s, k=1)
    mats = []
    for x in (xa[items], xb[items]):
        r = rankdata((x @ x.T)[iu])
        r -= r.mean()
        full = np.zeros((s, s))
        full[iu] = r
        mats.append(full + full.T)  # symmetric, zero diagonal: sum over i<j = half the full sum
    ra, rb = mats
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denom == 0:
        return float("nan"), float("nan"), s
    observed = float((ra * rb).sum() / denom)
    exceed = 0
    for _ in range(n_permutations):
        p = rng.permutation(s)
        exceed += float((ra * rb[np.ix_(p, p)]).sum() / denom) >= observed - 1e-12
    return (1 + exceed) / (1 + n_permutations), observed, s


def query_spearman(xa: np.ndarray, xb: np.ndarray, queries: np.ndarray,
                   block_elements: int = 1 << 22) -> np.ndarray:
    """Spearman, for each query item, between its image and its text similarities to every other item."""
    n = xa.shape[0]
    rows = max(1, block_elements // n)
    out = np.empty(len(queries))
    for start in range(0, len(queries), rows):
        q = queries[start:start + rows]
        keep = np.ones((len(q), n), dtype=bool)
        keep[np.arange(len(q)), q] = False  # drop the query itself
        ranks = [rankdata((x[q] @ x.T)[keep].reshape(len(q), n - 1), axis=1) for x in (xa, xb)]
        da, db = (r - r.mean(axis=1, keepdims=True) for r in ranks)
        num = (da * db).sum(axis=1)
        den = np.sqrt((da * da).sum(axis=1) * (db * db).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + rows] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out


FIELD_WORDS = {"caption": "captions", "keywords": "keyword descriptors"}
STATISTICS = ("spearman", "mantel_p", "mantel_spearman", "mean_query_spearman", "mutual_knn")


def mutual_knn(idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Mean over rows of |set(idx_a[i]) & set(idx_b[i])| / k (both (N, k) neighbour index arrays, no ties)."""
    k = idx_a.shape[1]
    shared = (idx_a[:, :, None] == idx_b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def field_features(img: np.ndarray, txt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-ready float64 rows (`similarity_features`) of the images and texts of one field (same items)."""
    return similarity_features(img), similarity_features(txt)


def degenerate_reason(fa: np.ndarray, fb: np.ndarray, field: str, near_constant_share: float) -> str | None:
    """Why a field's similarity statistics are undefined or meaningless, or None when they are fine.

    fa, fb: image and text feature rows (`field_features`). Identical rows have identical similarities to every
    item, so a field whose rows are (nearly) all the same ranks (nearly) nothing.
    """
    n = fa.shape[0]
    words = FIELD_WORDS.get(field, f"{field} texts")
    for rows, what in ((UniqueRows(fb), words), (UniqueRows(fa), "image embeddings")):
        if rows.n_unique == 1:
            return f"all {n} {what} are identical: their similarity is constant, nothing to rank"
        share = rows.modal_share()
        if share > near_constant_share:
            return (f"near-constant {what}: {share:.1%} of the {n} images share one value (above "
                    f"align.near_constant_share = {near_constant_share:g}), so most pairs are tied")
    return None


def _number(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def align_field(img: np.ndarray, txt: np.ndarray, cfg: dict[str, Any], rng: np.random.Generator,
                field: str = "caption", progress: bool = False) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """All alignment metrics between two row-aligned embedding matrices (same items).

    Returns (the field's JSON entry, query item indices, their tie-aware mutual-kNN overlaps); statistics that
    are undefined are None with `reason` set.
    """
    n = img.shape[0]
    if n < MIN_ITEMS:
        raise DinoflowError(f"align: {n} items, need at least {MIN_ITEMS}")
    xa, xb = field_features(img, txt)
    k = min(int(cfg["mutual_knn_k"]), n - 1)
    out: dict[str, Any] = {"n_items": n, "n_pairs_total": n * (n - 1) // 2, "mutual_knn_k": k,
                           "mutual_knn_chance": k / (n - 1), "n_permutations": int(cfg["n_permutations"])}
    reason = degenerate_reason(xa, xb, field, float(cfg["near_constant_share"]))
    if reason is not None:
        out.update({key: None for key in STATISTICS}, reason=reason, method=None, n_pairs=0, n_queries=0,
                   query_spearman_sem=None, mantel_n_items=0)
        return out, np.empty(0, dtype=np.int64), np.empty(0)
    if n <= int(cfg["exact_max_n"]):
        res = exact_pair_spearman(xa, xb, progress=progress)
        out.update(n_pairs=res.n_pairs, spearman=_number(res.spearman), method="exact")
    else:
        i, j = sample_pairs(n, int(cfg["n_sampled_pairs"]), rng)
        rho = spearmanr(pair_dots(xa, i, j), pair_dots(xb, i, j)).statistic
        out.update(n_pairs=int(i.size), spearman=_number(rho), method="sampled")
    p, rho_subset, n_mantel = mantel_test(xa, xb, int(cfg["n_permutations"]), int(cfg["n_sampled_pairs"]), rng)
    out.update(mantel_p=_number(p), mantel_n_items=n_mantel, mantel_spearman=_number(rho_subset))
    n_q = min(n, int(cfg["exact_max_n"]))
    queries = np.arange(n) if n_q == n else np.sort(rng.choice(n, size=n_q, replace=False))
    per_query = query_spearman(xa, xb, queries)
    valid = per_query[np.isfinite(per_query)]
    out.update(mean_query_spearman=float(valid.mean()) if valid.size else None,
               query_spearman_sem=float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else None,
               n_queries=int(valid.size))
    overlap = mutual_knn_overlap(xa, xb, k, queries)
    out.update(mutual_knn=float(overlap.mean()), n_mutual_knn_queries=int(queries.size))
    undefined = [key for key in STATISTICS if out[key] is None]
    out["reason"] = (f"{', '.join(undefined)} undefined: a similarity is constant over the pairs or queries "
                     "involved" if undefined else None)
    return out, queries, overlap


def write_items(path: str, frames: list[pd.DataFrame]) -> None:
    """One row per (text field, query image): field, id, mutual_knn (tie-aware overlap in [0, 1])."""
    df = (pd.concat(frames, ignore_index=True) if frames else
          pd.DataFrame({"field": pd.Series(dtype=str), "id": pd.Series(dtype=str),
                        "mutual_knn": pd.Series(dtype=np.float64)}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def field_rows(img_ids: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text ids, text embeddings, row of each text id in img_ids or -1) of one field."""
    txt_ids, txt = read_vectors(paths.text_embeddings(field), "embedding")
    position = {i: p for p, i in enumerate(img_ids)}
    return txt_ids, txt, np.array([position.get(i, -1) for i in txt_ids], dtype=np.int64)


def main(params: dict[str, Any], model: str) -> None:
    """`dinoflow align --model M`: metrics/align/M.json from embeddings/M.parquet and text/<field>.parquet."""
    cfg = params["align"]
    src = paths.embeddings(model)
    img_ids, img = read_vectors(src, EMBEDDING_COLUMN)
    meta = read_vectors_metadata(src)
    warnings = text_warnings(paths.TEXT_METRICS)  # text the text model cannot see flags that field's alignment
    result: dict[str, Any] = {"model": model, "embedding_column": EMBEDDING_COLUMN,
                              "stand_in": meta.get("stand_in"), "stand_in_label": meta.get("stand_in_label"),
                              "weights_source": meta.get("weights_source"), "fields": {}}
    frames: list[pd.DataFrame] = []
    for f_index, field in enumerate(tqdm(TEXT_FIELDS, desc=f"align {model}", unit="field")):
        tpath = paths.text_embeddings(field)
        txt_ids, txt, rows = field_rows(img_ids, field)
        have = rows >= 0
        entry: dict[str, Any] = {"text_model": read_vectors_metadata(tpath).get("text_model"),
                                 "n_images": len(img_ids), "n_without_text": int(len(img_ids) - have.sum()),
                                 "text_warning": warnings[field]}
        if warnings[field]:
            log.warning("%s / %s: alignment affected: %s", model, field, warnings[field])
        if have.sum() < MIN_ITEMS:
            reason = f"fewer than {MIN_ITEMS} images have a {field} ({int(have.sum())})"
            entry.update({key: None for key in STATISTICS}, n_items=int(have.sum()), skipped=reason, reason=reason)
            log.warning("%s: %s skipped: only %d images have that text", model, field, int(have.sum()))
        else:
            rng = np.random.default_rng([int(params["seed"]), f_index])
            res, queries, overlap = align_field(img[rows[have]], txt[have], cfg, rng, field=field, progress=True)
            entry.update(res)
            frames.append(pd.DataFrame({"field": field, "id": img_ids[rows[have]][queries].astype(str),
                                        "mutual_knn": overlap}))
            if entry["reason"] is None:
                log.info("%s / %s: Spearman %.4f (%s, %d items), Mantel p %.3g, mutual-kNN %.3f (chance %.3f)",
                         model, field, entry["spearman"], entry["method"], entry["n_items"], entry["mantel_p"],
                         entry["mutual_knn"], entry["mutual_knn_chance"])
            else:
                log.warning("%s / %s: %s", model, field, entry["reason"])
        result["fields"][field] = entry
    out = paths.align_metrics(model)
    write_json(out, result)
    write_items(paths.align_items(model), frames)
    log.info("%s: alignment metrics -> %s, per-image mutual-kNN -> %s", model, out, paths.align_items(model))
