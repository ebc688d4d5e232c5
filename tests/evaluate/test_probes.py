"""Probes: DINO weighted kNN and top-k accuracy against a loop reference, the grouped split, the linear probe
with C chosen by grouped cross-validation, per-image results, main."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import probes
from dinoflow.evaluate.probes import choose_c, grouped_split, knn_scores, linear_scores, topk_accuracy
from dinoflow.evaluate.vectors import similarity_features, write_vectors
from dinoflow.utils import read_json


def knn_reference(train_x, train_y, test_x, k, t, n_classes):
    """Per test item: cosine to every train item, k best by a Python sort, votes exp(sim / T) in a dict."""
    votes_all = []
    for q in test_x:
        sims = [(float(np.dot(q, v) / (np.linalg.norm(q) * np.linalg.norm(v))), j) for j, v in enumerate(train_x)]
        sims.sort(key=lambda s: (-s[0], s[1]))
        votes = {c: 0.0 for c in range(n_classes)}
        for s, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(s / t)
        votes_all.append(votes)
    return votes_all


def hit_reference(votes, y, k):
    """P(true class in the top k) when classes with equal votes are ordered at random."""
    above = sum(v > votes[y] + 1e-9 for v in votes.values())
    tied = sum(abs(v - votes[y]) <= 1e-9 for v in votes.values())
    return min(1.0, max(0.0, (k - above) / tied))


def test_knn_top1_top5_equal_reference():
    rng = np.random.default_rng(0)
    n_classes = 8
    centres = rng.normal(size=(n_classes, 6))
    ytr, yte = rng.integers(0, n_classes, 120), rng.integers(0, n_classes, 40)
    xtr = centres[ytr] + 1.2 * rng.normal(size=(120, 6))
    xte = centres[yte] + 1.2 * rng.normal(size=(40, 6))
    feats = similarity_features(np.concatenate([xtr, xte]))
    xtr, xte = feats[:120], feats[120:]
    scores = knn_scores(xtr, ytr, xte, n_classes, k=20, temperature=0.07)
    ref = knn_reference(xtr, ytr, xte, 20, 0.07, n_classes)
    for kk in (1, 5):
        expected = np.mean([hit_reference(v, int(y), kk) for y, v in zip(yte, ref)])
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
    g = np.arange(len(y))  # every image its own group: a plain stratified split
    tr1, te1 = grouped_split(y, g, 0.3, seed=0)
    tr2, te2 = grouped_split(y, g, 0.3, seed=0)
    np.testing.assert_array_equal(te1, te2)
    assert set(tr1).isdisjoint(te1) and len(tr1) + len(te1) == len(y)
    assert 34 in tr1  # the singleton class
    counts = np.bincount(y[te1], minlength=4)
    assert (np.abs(counts[:3] - 0.3 * np.array([20, 10, 4])) <= 1).all() and counts[3] == 0  # stratified
    _, te3 = grouped_split(y, g, 0.3, seed=1)
    assert not np.array_equal(te1, te3)
    with pytest.raises(DinoflowError, match="test_fraction"):
        grouped_split(y, g, 1.5, 0)
    with pytest.raises(DinoflowError, match="two classes"):
        grouped_split(np.array([0, 0, 1]), np.array([0, 1, 2]), 0.3, 0)


def test_grouped_split_never_straddles_over_random_groups():
    """Property test: random labels and random groups (groups may mix classes); no group on both sides, every
    image on exactly one side, classes held by one group only in train, test share near the target."""
    rng = np.random.default_rng(0)
    ran = 0
    for trial in range(40):
        n = int(rng.integers(20, 300))
        y = rng.integers(0, int(rng.integers(2, 8)), size=n)
        g = rng.integers(0, int(rng.integers(5, n)), size=n)
        # some groups share one class (near-duplicates of one subject), others mix classes
        pure = rng.random(n) < 0.5
        y[pure] = g[pure] % (y.max() + 1)
        try:
            train, test = grouped_split(y.astype(str), g.astype(str), 0.3, seed=trial)
        except DinoflowError:
            continue
        ran += 1
        assert set(g[train]).isdisjoint(g[test])
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
        one_group = [c for c in np.unique(y) if len(np.unique(g[y == c])) < 2]
        assert not np.isin(y[test], one_group).any()
        assert 0.0 < len(test) / n < 0.6
    assert ran >= 35


def test_grouped_split_keeps_near_duplicate_families_together():
    families = np.repeat(np.arange(40), 5)            # 40 families of 5 skin-tone variants
    y = families % 4
    train, test = grouped_split(y, families, 0.3, seed=0)
    assert set(families[train]).isdisjoint(families[test])
    assert len(test) == 60 and np.bincount(y[test]).tolist() == [15, 15, 15, 15]


def test_choose_c_prefers_strong_regularisation_on_noise_and_weak_on_clean_data():
    rng = np.random.default_rng(3)
    n, d = 240, 40
    y = rng.integers(0, 3, size=n)
    g = np.arange(n) // 2
    clean = np.eye(d)[y] * 3 + 0.5 * rng.normal(size=(n, d))
    c, cv = choose_c(clean, y, g, 3, [1e-4, 1.0], 3, 500, 0)
    assert c == 1.0 and cv["cv_folds"] == 3 and cv["cv_top1"][1] > 0.9
    noise = rng.normal(size=(n, d))
    c_noise, cv_noise = choose_c(noise, y, g, 3, [1e-4, 1.0], 3, 500, 0)
    assert max(cv_noise["cv_top1"]) < 0.6
    assert cv["c_at_grid_edge"] is True
    assert choose_c(noise, y, g, 3, [0.5], 3, 500, 0) == (0.5, {"c_grid": [0.5], "cv_folds": 0, "cv_top1": None,
                                                               "c_at_grid_edge": None})
    with pytest.raises(DinoflowError, match="linear_c_grid"):
        choose_c(noise, y, np.zeros(n), 3, [0.1, 1.0], 3, 500, 0)


def test_knn_with_tied_embeddings_is_chance_not_index_order():
    """Collapsed embeddings: every training image is tied, so each votes with probability k / n_train; the
    expected top-1 is the share of classes tied at the top, not whichever class index order favours."""
    ytr = np.array([0] * 10 + [1] * 10)
    xtr, xte = np.zeros((20, 4)), np.zeros((6, 4))
    scores = knn_scores(xtr, ytr, xte, 2, k=5, temperature=0.07)
    np.testing.assert_allclose(scores, 2.5)  # 10 images x 5/20 x exp(0)
    assert topk_accuracy(scores, np.array([0, 1, 0, 1, 0, 1]), 1) == pytest.approx(0.5)


def test_linear_probe_separable_and_scores_are_probabilities():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 30)
    x = np.eye(3)[y] * 5 + 0.3 * rng.normal(size=(90, 3))
    s = linear_scores(x[::2], y[::2], x[1::2], 4, 1000, 0)  # class 3 absent from training: -inf score
    assert topk_accuracy(s, y[1::2], 1) == 1.0
    np.testing.assert_allclose(s[:, :3].sum(axis=1), 1.0)
    assert np.isneginf(s[:, 3]).all()


def test_main_writes_probe_metrics_and_items(tmp_path, monkeypatch, caplog):
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
    pd.DataFrame({"id": ids, "group": [f"g{i // 2}" for i in range(n)]}).to_parquet(paths.GROUPS)
    params = {"seed": 0, "collection": {"label_columns": ["group", "sub"]},
              "probes": {"test_fraction": 0.3, "knn_k": 5, "knn_temperature": 0.07, "linear_max_iter": 500,
                         "linear_c_grid": [0.1, 1.0], "cv_folds": 3}}
    with caplog.at_level("WARNING", logger="dinoflow"):
        probes.main(params, model="m")
    out = read_json(paths.probe_metrics("m"))
    g = out["columns"]["group"]
    assert g["classes"] == ["a", "b", "c"] and g["n_test"] == 18 and g["n_train"] == 42
    # 18 test images in 9 groups: below sample_size.MIN_IMAGES / MIN_GROUPS, so a warning names column and counts
    assert g["n_test_groups"] == 9
    assert "m / group: probe test split: few images: 18 images (< 100) in 9 groups (< 30)" in caplog.text
    assert g["knn"]["top1"] > 0.8 and g["linear"]["top1"] > 0.8
    # 3 classes: every class is among the top 5, so top-5 is no evidence: null with its reason
    assert g["knn"]["top5"] is None and g["linear"]["top5"] is None
    assert "by construction with 3 classes" in g["knn"]["top5_reason"] and g["knn"]["top1_reason"] is None
    assert g["linear"]["C"] in (0.1, 1.0) and len(g["linear"]["cv_top1"]) == 2 and g["linear"]["cv_folds"] == 3
    assert np.array(g["knn"]["confusion"]).sum() == 18
    assert out["columns"]["sub"]["n_without_label"] == 5
    items = pd.read_parquet(paths.probe_items("m"))
    gi = items[items["column"] == "group"]
    assert len(gi) == 18 and gi["knn_top1"].mean() == pytest.approx(g["knn"]["top1"])
    assert gi["linear_top1"].mean() == pytest.approx(g["linear"]["top1"])
    assert (gi["linear_top5"] == 1.0).all()  # per image still recorded: trivially 1 with 3 classes
    test_groups = {f"g{int(i[2:]) // 2}" for i in gi["id"]}
    train_ids = set(ids) - set(gi["id"])
    assert test_groups.isdisjoint({f"g{int(i[2:]) // 2}" for i in train_ids})  # pairs never straddle
    params["collection"]["label_columns"] = ["nope"]
    with pytest.raises(DinoflowError, match="nope"):
        probes.main(params, model="m")
    params["collection"]["label_columns"] = ["group"]
    pd.DataFrame({"id": ids[:10], "group": "g"}).to_parquet(paths.GROUPS)
    with pytest.raises(DinoflowError, match="no group"):
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


def test_main_names_classes_without_test_images(tmp_path, monkeypatch, caplog):
    """A class whose images all lie in one near-duplicate group stays in train (grouped_split): probes.json lists
    it and a warning says so, instead of a silent empty row of the confusion matrix (a curator's 30 striped
    images that phash put in one group)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    labels = np.array(["a"] * 24 + ["b"] * 24 + ["c"] * 10)
    groups = [f"g{i}" for i in range(48)] + ["c_all"] * 10  # class c: one group of 10
    x = np.eye(3)[np.unique(labels, return_inverse=True)[1]] * 3 + rng.normal(size=(len(labels), 3))
    ids = [f"im{i}" for i in range(len(labels))]
    write_vectors(paths.embeddings("m"), ids, {"cls": x, "patch_mean": x}, {"model": "m", "stand_in": False})
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    pd.DataFrame({"id": ids, "status": "ok", "shape": labels}).to_parquet(paths.MANIFEST)
    pd.DataFrame({"id": ids, "group": groups}).to_parquet(paths.GROUPS)
    params = {"seed": 0, "collection": {"label_columns": ["shape"]},
              "probes": {"test_fraction": 0.3, "knn_k": 5, "knn_temperature": 0.07, "linear_max_iter": 500,
                         "linear_c_grid": [0.1, 1.0], "cv_folds": 3}}
    with caplog.at_level("WARNING", logger="dinoflow"):
        probes.main(params, model="m")
    entry = read_json(paths.probe_metrics("m"))["columns"]["shape"]
    assert entry["classes_without_test_images"] == ["c"]
    assert np.array(entry["knn"]["confusion"])[2].sum() == 0  # the independent fact: no c in the test split
    assert "m / shape: class(es) ['c'] have no test image" in caplog.text
    # every class split across groups: the list is empty and nothing is said
    pd.DataFrame({"id": ids, "group": [f"g{i}" for i in range(len(ids))]}).to_parquet(paths.GROUPS)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinoflow"):
        probes.main(params, model="m")
    assert read_json(paths.probe_metrics("m"))["columns"]["shape"]["classes_without_test_images"] == []
    assert "no test image" not in caplog.text
