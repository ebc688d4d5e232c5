"""Image-text alignment of one model: does the image embedding see what captions / keyword descriptors say?

For each text field (caption, keywords), over the images that have that text:
- `spearman`: rank correlation between image cosine similarity and text cosine similarity over all pairs i < j,
  exact (`spearman.exact_pair_spearman`) up to `align.exact_max_n` items, above it estimated from
  `align.n_sampled_pairs` uniform pairs with a percentile bootstrap 95% interval (`ci_low`, `ci_high`; an exact
  value has a zero-width interval);
- `mantel_p`: one-sided permutation (Mantel) p-value: item labels of the text matrix permuted
  `align.n_permutations` times, (1 + #{rho_perm >= rho}) / (1 + n_permutations). Computed on the full triangle of
  all items, or of a seeded random subset of items when that triangle has more than `align.n_sampled_pairs` pairs
  (a valid test of the same null hypothesis; ranks of a full triangle do not change under permutation, so each
  permutation costs one gather);
- `mean_query_spearman`: mean over query items of the Spearman between their image and text similarities to
  all other items (all queries up to exact_max_n, a seeded sample of exact_max_n queries above);
- `mutual_knn`: mean over items of |kNN_image(i) & kNN_text(i)| / k, k = `align.mutual_knn_k` (Huh et al. 2024,
  "The Platonic Representation Hypothesis").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.neighbours import topk_neighbours
from dinoflow.evaluate.spearman import exact_pair_spearman, sampled_pair_spearman
from dinoflow.evaluate.text import text_warnings
from dinoflow.evaluate.vectors import l2_normalize, read_vectors, read_vectors_metadata
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


def mutual_knn(idx_a: np.ndarray, idx_b: np.ndarray) -> float:
    """Mean over rows of |set(idx_a[i]) & set(idx_b[i])| / k (both (N, k) neighbour index arrays)."""
    k = idx_a.shape[1]
    shared = (idx_a[:, :, None] == idx_b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def align_field(img: np.ndarray, txt: np.ndarray, cfg: dict[str, Any], neighbour_cfg: dict[str, Any],
                rng: np.random.Generator, progress: bool = False) -> dict[str, Any]:
    """All alignment metrics between two row-aligned embedding matrices (same items)."""
    xa, xb = l2_normalize(img), l2_normalize(txt)
    n = xa.shape[0]
    if n < MIN_ITEMS:
        raise DinoflowError(f"align: {n} items, need at least {MIN_ITEMS}")
    out: dict[str, Any] = {"n_items": n}
    if n <= int(cfg["exact_max_n"]):
        res = exact_pair_spearman(xa, xb, progress=progress)
        out.update(n_pairs=res.n_pairs, spearman=res.spearman, ci_low=res.spearman, ci_high=res.spearman,
                   method="exact")
    else:
        res = sampled_pair_spearman(xa, xb, int(cfg["n_sampled_pairs"]), int(cfg["n_bootstrap"]), rng)
        out.update(n_pairs=res.n_pairs, spearman=res.spearman, ci_low=res.ci_low, ci_high=res.ci_high,
                   method="sampled")
    out["n_pairs_total"] = n * (n - 1) // 2
    p, rho_subset, n_mantel = mantel_test(xa, xb, int(cfg["n_permutations"]), int(cfg["n_sampled_pairs"]), rng)
    out.update(mantel_p=p, mantel_n_items=n_mantel, mantel_spearman=rho_subset,
               n_permutations=int(cfg["n_permutations"]))
    n_q = min(n, int(cfg["exact_max_n"]))
    queries = np.arange(n) if n_q == n else np.sort(rng.choice(n, size=n_q, replace=False))
    per_query = query_spearman(xa, xb, queries)
    valid = per_query[np.isfinite(per_query)]
    out.update(mean_query_spearman=float(valid.mean()) if valid.size else float("nan"),
               query_spearman_sem=float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else None,
               n_queries=int(valid.size))
    k = int(cfg["mutual_knn_k"])
    ia, _, method_a = topk_neighbours(xa, k, neighbour_cfg)
    ib, _, _ = topk_neighbours(xb, k, neighbour_cfg)
    out.update(mutual_knn=mutual_knn(ia, ib), mutual_knn_k=int(ia.shape[1]), knn_method=method_a)
    return out


def main(params: dict[str, Any], model: str) -> None:
    """`dinoflow align --model M`: metrics/align/M.json from embeddings/M.parquet and text/<field>.parquet."""
    cfg = params["align"]
    src = paths.embeddings(model)
    img_ids, img = read_vectors(src, EMBEDDING_COLUMN)
    meta = read_vectors_metadata(src)
    position = {i: p for p, i in enumerate(img_ids)}
    warnings = text_warnings(paths.TEXT_METRICS)  # text the text model cannot see flags that field's alignment
    result: dict[str, Any] = {"model": model, "embedding_column": EMBEDDING_COLUMN,
                              "stand_in": meta.get("stand_in"), "stand_in_label": meta.get("stand_in_label"),
                              "weights_source": meta.get("weights_source"), "fields": {}}
    for f_index, field in enumerate(tqdm(TEXT_FIELDS, desc=f"align {model}", unit="field")):
        tpath = paths.text_embeddings(field)
        txt_ids, txt = read_vectors(tpath, "embedding")
        rows = np.array([position.get(i, -1) for i in txt_ids])
        have = rows >= 0
        entry: dict[str, Any] = {"text_model": read_vectors_metadata(tpath).get("text_model"),
                                 "n_images": len(img_ids), "n_without_text": int(len(img_ids) - have.sum()),
                                 "text_warning": warnings[field]}
        if warnings[field]:
            log.warning("%s / %s: alignment affected: %s", model, field, warnings[field])
        if have.sum() < MIN_ITEMS:
            entry.update(n_items=int(have.sum()), skipped=f"fewer than {MIN_ITEMS} images have a {field}")
            log.warning("%s: %s skipped: only %d images have that text", model, field, int(have.sum()))
        else:
            rng = np.random.default_rng([int(params["seed"]), f_index])
            entry.update(align_field(img[rows[have]], txt[have], cfg, params["neighbours"], rng, progress=True))
            log.info("%s / %s: Spearman %.4f [%.4f, %.4f] (%s, %d items), Mantel p %.3g, mutual-kNN %.3f",
                     model, field, entry["spearman"], entry["ci_low"], entry["ci_high"], entry["method"],
                     entry["n_items"], entry["mantel_p"], entry["mutual_knn"])
        result["fields"][field] = entry
    out = paths.align_metrics(model)
    write_json(out, result)
    log.info("%s: alignment metrics -> %s", model, out)
