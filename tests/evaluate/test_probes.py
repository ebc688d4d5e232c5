"""Probes: DINO weighted kNN and top-k accuracy against a loop reference, the split, the linear probe, main."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import probes
from dinoflow.evaluate.probes import knn_scores, linear_scores, stratified_split, topk_accuracy
from dinoflow.evaluate.vectors import write_vectors
from dinoflow.utils import read_json


def knn_reference(train_x, train_y, test_x, k, t, n_classes):
    """Per test item: cosine to every train item, k best by a Python sort, votes exp(sim / T) in a dict."""
    preds = []
    for q in test_x:
        sims = [(float(np.dot(q, v) / (np.linalg.norm(q) * np.linalg.norm(v))), j) for j, v in enumerate(train_x)]
        sims.sort(key=lambda s: (-s[0], s[1]))
        votes = {c: 0.0 for c in range(n_classes)}
        for s, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(s / t)
        preds.append(sorted(votes, key=lambda c: (-votes[c], c)))
    return preds


def test_knn_top1_top5_equal_reference():
    rng = np.random.default_rng(0)
    n_classes = 8
    centres = rng.normal(size=(n_classes, 6))
    ytr, yte = rng.integers(0, n_classes, 120), rng.integers(0, n_classes, 40)
    xtr = centres[ytr] + 1.2 * rng.normal(size=(120, 6))
    xte = centres[yte] + 1.2 * rng.normal(size=(40, 6))
    scores = knn_scores(xtr, ytr, xte, n_classes, k=20, temperature=0.07)
    ref = knn_reference(xtr, ytr, xte, 20, 0.07, n_classes)
    for kk in (1, 5):
        expected = np.mean([y in r[:kk] for y, r in zip(yte, ref)])
        assert topk_accuracy(scores, yte, kk) == pytest.approx(expected)
    assert 0.3 < topk_accuracy(scores, yte, 1) < topk_accuracy(scores, yte, 5) <= 1.0


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 0])
    assert topk_accuracy(scores, y, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, y, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, y, 5) == 1.0  # k above the number of classes


def test_split_is_stratified_seeded_and_keeps_singletons_in_train():
    y = np.array([0] * 20 + [1] * 10 + [2] * 4 + [3])
    tr1, te1 = stratified_split(y, 0.3, seed=0)
    tr2, te2 = stratified_split(y, 0.3, seed=0)
    np.testing.assert_array_equal(te1, te2)
    assert set(tr1).isdisjoint(te1) and len(tr1) + len(te1) == len(y)
    assert 34 in tr1  # the singleton class
    assert np.bincount(y[te1], minlength=4)[:3].tolist() == [6, 3, 1]
    _, te3 = stratified_split(y, 0.3, seed=1)
    assert not np.array_equal(te1, te3)
    with pytest.raises(DinoflowError, match="test_fraction"):
        stratified_split(y, 1.5, 0)
    with pytest.raises(DinoflowError, match="two classes"):
        stratified_split(np.array([0, 0, 1]), 0.3, 0)


def test_linear_probe_separable_and_scores_are_probabilities():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 30)
    x = np.eye(3)[y] * 5 + 0.3 * rng.normal(size=(90, 3))
    s = linear_scores(x[::2], y[::2], x[1::2], 4, 1000, 0)  # class 3 absent from training: -inf score
    assert topk_accuracy(s, y[1::2], 1) == 1.0
    np.testing.assert_allclose(s[:, :3].sum(axis=1), 1.0)
    assert np.isneginf(s[:, 3]).all()


def test_main_writes_probe_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    n = 60
    group = np.array(["a", "b", "c"])[np.arange(n) % 3]
    x = np.eye(3)[np.arange(n) % 3] * 3 + rng.normal(size=(n, 3))
    ids = [f"im{i}" for i in range(n)]
    write_vectors(paths.embeddings("m"), ids, {"cls": x, "patch_mean": x}, {"model": "m", "stand_in": False})
    manifest = pd.DataFrame({"id": ids[::-1], "status": "ok", "group": list(group[::-1]),
                             "sub": [None] * 5 + list(group[::-1][5:])})
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    manifest.to_parquet(paths.MANIFEST)
    params = {"seed": 0, "collection": {"label_columns": ["group", "sub"]},
              "probes": {"test_fraction": 0.3, "knn_k": 5, "knn_temperature": 0.07, "linear_max_iter": 500}}
    probes.main(params, model="m")
    out = read_json(paths.probe_metrics("m"))
    g = out["columns"]["group"]
    assert g["classes"] == ["a", "b", "c"] and g["n_test"] == 18 and g["n_train"] == 42
    assert g["knn"]["top1"] > 0.8 and g["linear"]["top1"] > 0.8 and g["knn"]["top5"] == 1.0
    assert np.array(g["knn"]["confusion"]).sum() == 18
    assert out["columns"]["sub"]["n_without_label"] == 5
    params["collection"]["label_columns"] = ["nope"]
    with pytest.raises(DinoflowError, match="nope"):
        probes.main(params, model="m")


def test_linear_probe_separates_classes_that_differ_by_a_small_direction():
    """Unit-norm embeddings dominated by a shared component (as real CLS tokens are) must still be separable:
    the probe standardises features, so it does not collapse to the majority class."""
    rng = np.random.default_rng(0)
    n, d = 400, 32
    y = rng.integers(0, 4, size=n)
    signal = np.eye(d)[y] * 0.02                     # tiny class-specific direction
    x = np.ones((n, d)) * 5.0 + signal + rng.normal(0, 0.002, size=(n, d))
    s = linear_scores(x[:300], y[:300], x[300:], 4, 1000, 0)
    assert topk_accuracy(s, y[300:], 1) > 0.95
