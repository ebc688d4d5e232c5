"""`dinoflow probes --model M`: how well do the frozen CLS embeddings predict the collection's label columns?

For each label column (`collection.label_columns`):
- a seeded, stratified, *grouped* train/test split (`grouped_split`): the groups of `paths.GROUPS` (near-duplicate
  families, or `collection.group_column`) never straddle train and test, so a test image is never scored against
  its own resized copy or skin-tone sibling in the training set. Classes whose images lie in fewer than two groups
  cannot be both trained and tested; their groups stay in train. The test share is `probes.test_fraction`
  rounded to tenths (the union of round(10 f) of 10 `StratifiedGroupKFold` folds);
- weighted kNN as in DINO (Caron et al. 2021, eval_knn.py): cosine similarities (`vectors.similarity_features`)
  to the training set, the k = `probes.knn_k` nearest vote for their class with weight exp(sim / T),
  T = `probes.knn_temperature`. Tied similarities are handled explicitly: each training image votes with its
  probability of being among the k nearest under random tie-breaking (`ties.inclusion_probabilities`);
- a linear probe: `sklearn.linear_model.LogisticRegression` on L2-normalised, then standardised features (the
  scaler is fitted on the training split: without it, unit-norm embeddings whose classes differ by small
  directions give near-constant logits and the probe collapses to the majority class). Its inverse
  regularisation C is chosen from `probes.linear_c_grid` by `probes.cv_folds`-fold grouped stratified
  cross-validation inside the training split (mean top-1 accuracy; ties go to the smaller C), then refitted on
  the whole training split; the chosen C and the cross-validated accuracies are reported.
Top-1 / top-5 correctness of every test image is its probability under random tie-breaking of tied class scores
(`ties.expected_topk_hit`); accuracies are their means. Accuracies and confusion matrices (rows: true class,
columns: predicted) go to `paths.probe_metrics(M)`, the per-test-image correctness (with ids) to
`paths.probe_items(M)` for the item bootstrap of `dinoflow compare`. A test split of fewer images or groups than
`dinoflow.evaluate.sample_size` asks for is logged as a warning naming the column and the counts.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.sample_size import small_sample_note
from dinoflow.evaluate.ties import UniqueRows, expected_topk_hit, inclusion_probabilities
from dinoflow.evaluate.vectors import l2_normalize, read_vectors, read_vectors_metadata, similarity_features
from dinoflow.utils import get_logger, write_json

log = get_logger(__name__)

SPLIT_FOLDS = 10  # test share resolution: the test split is the union of round(10 f) of these folds
ITEM_COLUMNS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
TOP_K = 5  # the top-k accuracy reported next to top-1; undefined (null + reason) for TOP_K or fewer classes


def _codes(values: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1].reshape(-1)


def _train_only(y: np.ndarray, g: np.ndarray, min_groups: int) -> np.ndarray:
    """Items that must stay in train: of classes spanning < min_groups groups, and every item of their groups
    (repeated until stable, since moving a group can leave another class with too few groups)."""
    forced = np.zeros(len(y), dtype=bool)
    while True:
        free = ~forced
        pairs = np.unique(np.stack([y[free], g[free]], axis=1), axis=0) if free.any() else np.empty((0, 2), int)
        span = np.bincount(pairs[:, 0], minlength=y.max() + 1 if len(y) else 0)
        bad_class = span < min_groups
        new = free & bad_class[y]
        new_groups = np.unique(g[new | forced])
        new = np.isin(g, new_groups) & ~forced
        if not new.any():
            return forced
        forced |= new


def grouped_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted: stratified by label, whole groups on one side.

    labels, groups: (N,) arrays of class labels and group names. Classes spanning fewer than two groups (e.g. a
    class of one image) and the groups holding them stay in train. The test side is the union of
    round(10 * test_fraction) of 10 `sklearn.model_selection.StratifiedGroupKFold(shuffle=True)` folds (fewer
    folds when there are fewer than 10 groups). Raises DinoflowError when test_fraction is not in (0, 1) or fewer
    than two classes span two or more groups.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < test_fraction < 1:
        raise DinoflowError(f"probes.test_fraction: must be between 0 and 1, got {test_fraction}")
    y, g = _codes(labels), _codes(groups)
    idx = np.arange(len(y))
    forced = _train_only(y, g, 2)
    rest = idx[~forced]
    n_groups = len(np.unique(g[rest]))
    if len(np.unique(y[rest])) < 2 or n_groups < 2:
        raise DinoflowError("probes: need at least two classes whose images lie in two or more groups each "
                            "(a class held by one group cannot be both trained and tested)")
    n_splits = min(SPLIT_FOLDS, n_groups, int(np.bincount(y[rest]).max()))  # sklearn: some class >= n_splits
    n_test = int(np.clip(round(test_fraction * n_splits), 1, n_splits - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members": expected
        folds = [te for _, te in StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                 .split(np.zeros(rest.size), y[rest], g[rest])]
    test = np.sort(rest[np.concatenate(folds[:n_test])])
    train = np.setdiff1d(idx, test)
    return train, test


def cv_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped stratified folds (train part, validation part) of a training split (indices into labels).

    Fewer folds when there are fewer groups; [] when there are fewer than two groups.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    g, y = _codes(groups), _codes(labels)
    k = min(n_folds, len(np.unique(g)), int(np.bincount(y).max()) if len(y) else 0)
    if k < 2:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                    .split(np.zeros(len(g)), y, g))


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int,
               temperature: float, block_elements: int = 1 << 23) -> np.ndarray:
    """DINO's weighted kNN class scores (n_test, n_classes), tie-aware.

    train_x, test_x: rows ready for cosine similarity (`similarity_features`). Score of class c for a test row:
    sum over training items j of class c of P(j among the k nearest) * exp(sim_j / T); without ties that is
    DINO's sum over the k nearest.
    """
    tr, te = UniqueRows(train_x), UniqueRows(test_x)
    k = min(k, tr.n)
    scores = np.zeros((te.n, n_classes))
    rows = max(1, block_elements // max(tr.n, 1))
    for s in range(0, te.n, rows):
        idx = np.arange(s, min(s + rows, te.n))
        sims = te.sims(idx, tr)
        p = inclusion_probabilities(sims, k)
        r, c = np.nonzero(p)
        np.add.at(scores, (idx[r], train_y[c]), p[r, c] * np.exp(sims[r, c] / temperature))
    return scores


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int, clf=None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if clf is None:
        clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed, warm_start=True)
    clf.set_params(C=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below via n_iter_, not as noise
        clf.fit(x, y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        log.warning("linear probe (C=%g) did not converge in probes.linear_max_iter=%d iterations", c, max_iter)
    return clf


def _proba(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    scores = np.full((x.shape[0], n_classes), -np.inf)
    scores[:, clf.classes_] = clf.predict_proba(x)
    return scores


def linear_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int,
                  max_iter: int, seed: int, c: float = 1.0) -> np.ndarray:
    """Class probabilities (n_test, n_classes) of a logistic regression with inverse regularisation c on
    L2-normalised, standardised features (classes absent from training: -inf)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(l2_normalize(train_x))
    clf = _fit_logreg(scaler.transform(l2_normalize(train_x)), train_y, c, max_iter, seed)
    return _proba(clf, scaler.transform(l2_normalize(test_x)), n_classes)


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, c_grid: list[float],
             n_folds: int, max_iter: int, seed: int) -> tuple[float, dict[str, Any]]:
    """C of `c_grid` with the best mean validation top-1 over grouped stratified folds of (x, y).

    Each fold standardises on its own training part; along the grid (ascending C) the solver warm-starts.
    Returns (C, {"c_grid", "cv_folds", "cv_top1": [mean per C], "c_at_grid_edge": bool}); a warning is logged
    when the chosen C is the smallest or largest of the grid. A one-value grid is returned without CV.
    Raises DinoflowError when the grid has several values but the data have fewer than two groups.
    """
    from sklearn.preprocessing import StandardScaler

    grid = sorted(float(c) for c in c_grid)
    if len(grid) == 1:
        return grid[0], {"c_grid": grid, "cv_folds": 0, "cv_top1": None, "c_at_grid_edge": None}
    folds = cv_folds(y, groups, n_folds, seed)
    if not folds:
        raise DinoflowError("probes.linear_c_grid: cross-validation needs at least two groups in the training "
                            "split (give one C to skip it)")
    acc = np.zeros((len(folds), len(grid)))
    xn = l2_normalize(x)
    for f, (tr, va) in enumerate(folds):
        scaler = StandardScaler().fit(xn[tr])
        xtr, xva = scaler.transform(xn[tr]), scaler.transform(xn[va])
        clf = None
        for j, c in enumerate(grid):
            clf = _fit_logreg(xtr, y[tr], c, max_iter, seed, clf)
            acc[f, j] = expected_topk_hit(_proba(clf, xva, n_classes), y[va], 1).mean()
    mean = acc.mean(axis=0)
    best = int(np.flatnonzero(mean >= mean.max() - 1e-12)[0])
    at_edge = best in (0, len(grid) - 1)
    if at_edge:
        log.warning("linear probe: cross-validation chose C=%g, at the edge of probes.linear_c_grid %s; a wider "
                    "grid may do better", grid[best], grid)
    return grid[best], {"c_grid": grid, "cv_folds": len(folds), "cv_top1": mean.tolist(), "c_at_grid_edge": at_edge}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[list[int]]:
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m.tolist()


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Mean over rows of P(true class among the k highest scores) under random tie-breaking."""
    return float(expected_topk_hit(scores, y, k).mean())


def probe_column(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: dict[str, Any],
                 seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """kNN and linear probe results for one label column.

    x: (N, D) embeddings, labels / groups: (N,) str (rows without a label removed by the caller).
    Returns (the column's JSON entry, per test item arrays: "index" (row of x) and ITEM_COLUMNS). The entry's
    "classes_without_test_images" lists the classes `grouped_split` kept wholly in train.
    """
    classes, y = np.unique(labels, return_inverse=True)
    y = y.reshape(-1)
    train, test = grouped_split(y, groups, float(cfg["test_fraction"]), seed)
    n_classes = len(classes)
    feats = similarity_features(x)
    out: dict[str, Any] = {"classes": classes.tolist(), "n_classes": n_classes, "n_train": int(train.size),
                           "n_test": int(test.size), "n_test_groups": int(len(np.unique(groups[test]))),
                           "chance_top1": float(np.bincount(y[test]).max() / test.size),
                           # classes grouped_split kept wholly in train (held by one near-duplicate group):
                           # the test scores say nothing about them
                           "classes_without_test_images": classes[np.bincount(y[test], minlength=n_classes) == 0]
                           .tolist()}
    c, cv = choose_c(x[train], y[train], groups[train], n_classes, list(cfg["linear_c_grid"]),
                     int(cfg["cv_folds"]), int(cfg["linear_max_iter"]), seed)
    items: dict[str, np.ndarray] = {"index": test}
    for name, scores in (
        ("knn", knn_scores(feats[train], y[train], feats[test], n_classes, int(cfg["knn_k"]),
                           float(cfg["knn_temperature"]))),
        ("linear", linear_scores(x[train], y[train], x[test], n_classes, int(cfg["linear_max_iter"]), seed, c)),
    ):
        hit1, hit5 = expected_topk_hit(scores, y[test], 1), expected_topk_hit(scores, y[test], TOP_K)
        items[f"{name}_top1"], items[f"{name}_top5"] = hit1, hit5
        pred = np.argmax(scores, axis=1)
        out[name] = {"top1": float(hit1.mean()), "top1_reason": None,
                     # with TOP_K or fewer classes every class is among the top 5: 1.0 by construction, for any
                     # model, so it is no evidence (null + reason; compare leaves it out)
                     "top5": float(hit5.mean()) if n_classes > TOP_K else None,
                     "top5_reason": None if n_classes > TOP_K else
                     f"top-{TOP_K} is 1 by construction with {n_classes} classes (<= {TOP_K})",
                     "confusion": confusion(y[test], pred, n_classes)}
    out["knn"].update(k=int(min(int(cfg["knn_k"]), train.size)), temperature=float(cfg["knn_temperature"]))
    out["linear"].update(C=c, **cv)
    return out, items


def _fmt_topk(value: float | None) -> str:
    return "undefined (too few classes)" if value is None else f"{value:.3f}"


def read_groups(ids: np.ndarray) -> np.ndarray:
    """Group name of each id from `paths.GROUPS`; DinoflowError when the file or an id is missing."""
    if not os.path.exists(paths.GROUPS):
        raise DinoflowError(f"{paths.GROUPS}: groups not found (run `dinoflow groups` first)")
    table = pd.read_parquet(paths.GROUPS, columns=["id", "group"])
    mapping = table.set_index(table["id"].astype(str))["group"].astype(str)
    groups = mapping.reindex(ids)
    missing = groups.isna().to_numpy()
    if missing.any():
        raise DinoflowError(f"{paths.GROUPS}: {int(missing.sum())} embedded image(s) have no group, e.g. "
                            f"{list(np.asarray(ids)[missing][:3])} (groups older than the embeddings? rerun "
                            "`dinoflow groups`)")
    return groups.to_numpy().astype(str)


def write_items(path: str, frames: list[pd.DataFrame]) -> None:
    """One row per (label column, test image): column, id, ITEM_COLUMNS (float64 in [0, 1])."""
    empty = pd.DataFrame({"column": pd.Series(dtype=str), "id": pd.Series(dtype=str),
                          **{c: pd.Series(dtype=np.float64) for c in ITEM_COLUMNS}})
    df = pd.concat(frames, ignore_index=True) if frames else empty
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)


def main(params: dict[str, Any], model: str) -> dict[str, Any]:
    cfg = params["probes"]
    columns = list(params["collection"].get("label_columns") or [])
    src = paths.embeddings(model)
    ids, x = read_vectors(src, "cls")
    meta = read_vectors_metadata(src)
    result: dict[str, Any] = {"model": model, "embedding_column": "cls", "stand_in": meta.get("stand_in"),
                              "stand_in_label": meta.get("stand_in_label"), "columns": {}}
    frames: list[pd.DataFrame] = []
    if columns:
        if not os.path.exists(paths.MANIFEST):
            raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
        manifest = pd.read_parquet(paths.MANIFEST)
        absent = [c for c in columns if c not in manifest.columns]
        if absent:
            raise DinoflowError(f"collection.label_columns: {absent} not in {paths.MANIFEST} "
                                f"(columns: {', '.join(manifest.columns)})")
        manifest = manifest.set_index(manifest["id"].astype(str))
        groups = read_groups(ids)
    for column in columns:
        labels = manifest[column].reindex(ids)
        have = labels.notna().to_numpy() & (labels.astype(str).str.strip() != "").to_numpy()
        try:
            res, items = probe_column(x[have], labels[have].astype(str).to_numpy(), groups[have], cfg,
                                      int(params["seed"]))
        except DinoflowError as exc:
            raise DinoflowError(f"probes on label column {column!r}: {exc}") from exc
        res["n_without_label"] = int((~have).sum())
        result["columns"][column] = res
        frames.append(pd.DataFrame({"column": column, "id": ids[have][items["index"]].astype(str),
                                    **{c: items[c] for c in ITEM_COLUMNS}}))
        log.info("%s / %s: kNN top-1 %.3f top-5 %s, linear (C=%g) top-1 %.3f top-5 %s (%d classes, %d test "
                 "images in %d groups)", model, column, res["knn"]["top1"], _fmt_topk(res["knn"]["top5"]),
                 res["linear"]["C"], res["linear"]["top1"], _fmt_topk(res["linear"]["top5"]), res["n_classes"],
                 res["n_test"],
                 res["n_test_groups"])
        if res["classes_without_test_images"]:
            log.warning("%s / %s: class(es) %s have no test image (each lies in a single near-duplicate group of %s, "
                        "kept in train): the probe scores say nothing about them", model, column,
                        res["classes_without_test_images"], paths.GROUPS)
        few = small_sample_note(res["n_test"], res["n_test_groups"])
        if few:
            log.warning("%s / %s: probe test split: %s", model, column, few)
    if not columns:
        log.info("collection.label_columns is empty: no probes for %s", model)
    out = paths.probe_metrics(model)
    write_json(out, result)
    write_items(paths.probe_items(model), frames)
    log.info("%s: probe metrics -> %s, per-image results -> %s", model, out, paths.probe_items(model))
    return result
