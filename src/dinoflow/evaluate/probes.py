"""`dinoflow probes --model M`: how well do the frozen CLS embeddings predict the collection's label columns?

For each label column (`collection.label_columns`): a fixed, seeded, stratified train/test split
(`probes.test_fraction`; classes with a single image go to train), then
- weighted kNN as in DINO (Caron et al. 2021, eval_knn.py): cosine similarities to the training set, the
  k = `probes.knn_k` nearest vote for their class with weight exp(sim / T), T = `probes.knn_temperature`;
- a linear probe: `sklearn.linear_model.LogisticRegression` on L2-normalised, then standardised features
  (the scaler is fitted on the training split: without it, unit-norm embeddings whose classes differ by small
  directions give near-constant logits and the probe collapses to the majority class).
Top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns: predicted) of each go to
`paths.probe_metrics(M)`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pandas as pd

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.neighbours import exact_topk
from dinoflow.evaluate.vectors import l2_normalize, read_vectors, read_vectors_metadata
from dinoflow.utils import get_logger, write_json

log = get_logger(__name__)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), stratified by label; singleton classes stay in train."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise DinoflowError(f"probes.test_fraction: must be between 0 and 1, got {test_fraction}")
    idx = np.arange(len(labels))
    values, counts = np.unique(labels, return_counts=True)
    single = np.isin(labels, values[counts < 2])
    rest = idx[~single]
    if len(np.unique(labels[rest])) < 2 or len(rest) < 2:
        raise DinoflowError("probes: need at least two classes with two or more images each")
    n_test = max(int(round(test_fraction * len(rest))), len(np.unique(labels[rest])))
    n_test = min(n_test, len(rest) - len(np.unique(labels[rest])))
    train, test = train_test_split(rest, test_size=n_test, stratify=labels[rest], random_state=seed)
    return np.sort(np.concatenate([train, idx[single]])), np.sort(test)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int,
               temperature: float) -> np.ndarray:
    """DINO's weighted kNN class scores (n_test, n_classes): sum over the k nearest of exp(sim / T)."""
    tr, te = l2_normalize(train_x), l2_normalize(test_x)
    k = min(k, tr.shape[0])
    idx, sims = exact_topk(tr, k, queries=te, exclude_self=False)
    weights = np.exp(sims.astype(np.float64) / temperature)
    scores = np.zeros((te.shape[0], n_classes))
    np.add.at(scores, (np.arange(te.shape[0])[:, None], train_y[idx]), weights)
    return scores


def linear_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int,
                  max_iter: int, seed: int) -> np.ndarray:
    """Class probabilities (n_test, n_classes) of a logistic regression on L2-normalised, standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(l2_normalize(train_x))
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below via n_iter_, not as noise
        clf.fit(scaler.transform(l2_normalize(train_x)), train_y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        log.warning("linear probe did not converge in probes.linear_max_iter=%d iterations", max_iter)
    scores = np.full((test_x.shape[0], n_classes), -np.inf)
    scores[:, clf.classes_] = clf.predict_proba(scaler.transform(l2_normalize(test_x)))
    return scores


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores (ties broken by lower class index)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order == y[:, None]).any(axis=1).mean())


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[list[int]]:
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m.tolist()


def probe_column(x: np.ndarray, labels: np.ndarray, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """kNN and linear probe results for one label column (labels: str array; rows without a label removed)."""
    classes, y = np.unique(labels, return_inverse=True)
    train, test = stratified_split(y, float(cfg["test_fraction"]), seed)
    n_classes = len(classes)
    out: dict[str, Any] = {"classes": classes.tolist(), "n_classes": n_classes, "n_train": int(train.size),
                           "n_test": int(test.size), "chance_top1": float(np.bincount(y[test]).max() / test.size)}
    for name, scores in (
        ("knn", knn_scores(x[train], y[train], x[test], n_classes, int(cfg["knn_k"]),
                           float(cfg["knn_temperature"]))),
        ("linear", linear_scores(x[train], y[train], x[test], n_classes, int(cfg["linear_max_iter"]), seed)),
    ):
        pred = np.argmax(scores, axis=1)
        out[name] = {"top1": topk_accuracy(scores, y[test], 1), "top5": topk_accuracy(scores, y[test], 5),
                     "confusion": confusion(y[test], pred, n_classes)}
    out["knn"].update(k=int(min(int(cfg["knn_k"]), train.size)), temperature=float(cfg["knn_temperature"]))
    return out


def main(params: dict[str, Any], model: str) -> dict[str, Any]:
    cfg = params["probes"]
    columns = list(params["collection"].get("label_columns") or [])
    src = paths.embeddings(model)
    ids, x = read_vectors(src, "cls")
    meta = read_vectors_metadata(src)
    result: dict[str, Any] = {"model": model, "embedding_column": "cls", "stand_in": meta.get("stand_in"),
                              "stand_in_label": meta.get("stand_in_label"), "columns": {}}
    if columns:
        if not os.path.exists(paths.MANIFEST):
            raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
        manifest = pd.read_parquet(paths.MANIFEST)
        absent = [c for c in columns if c not in manifest.columns]
        if absent:
            raise DinoflowError(f"collection.label_columns: {absent} not in {paths.MANIFEST} "
                                f"(columns: {', '.join(manifest.columns)})")
        manifest = manifest.set_index(manifest["id"].astype(str))
    for column in columns:
        labels = manifest[column].reindex(ids)
        have = labels.notna().to_numpy() & (labels.astype(str).str.strip() != "").to_numpy()
        try:
            res = probe_column(x[have], labels[have].astype(str).to_numpy(), cfg, int(params["seed"]))
        except DinoflowError as exc:
            raise DinoflowError(f"probes on label column {column!r}: {exc}") from exc
        res["n_without_label"] = int((~have).sum())
        result["columns"][column] = res
        log.info("%s / %s: kNN top-1 %.3f top-5 %.3f, linear top-1 %.3f top-5 %.3f (%d classes, %d test)",
                 model, column, res["knn"]["top1"], res["knn"]["top5"], res["linear"]["top1"],
                 res["linear"]["top5"], res["n_classes"], res["n_test"])
    if not columns:
        log.info("collection.label_columns is empty: no probes for %s", model)
    out = paths.probe_metrics(model)
    write_json(out, result)
    log.info("%s: probe metrics -> %s", model, out)
    return result
