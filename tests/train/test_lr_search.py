"""`dinoflow lr-search`: trials judged on a grouped held-out slice (kNN top-1 with labels, RankMe without)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.health import rankme
from dinoflow.train import lr_search
from dinoflow.utils import read_json
from train_helpers import make_env


def _groups_and_labels(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Groups of 2 consecutive images and the `shape` label, in make_env's image order (sorted file names)."""
    meta = pd.read_csv(params["collection"]["metadata"]).sort_values("path")
    return np.array([f"g{i // 2}" for i in range(len(meta))], dtype=object), meta["shape"].to_numpy(dtype=object)


def test_heldout_slice_keeps_groups_whole():
    groups = np.array([f"g{i // 3}" for i in range(60)], dtype=object)
    labels = np.array(["a", "b", "c"] * 20, dtype=object)
    labels[[0, 1]] = None  # group g0 has unlabelled images: it is never held out
    s = lr_search.grouped_heldout(groups, labels, n_heldout=20, query_fraction=0.3, seed=0, label_column="lab")
    assert s.criterion == "knn_top1" and s.label_column == "lab" and s.n_classes == 3
    assert len(s.heldout) >= 20 and len(s.heldout) + len(s.train) == 60
    assert not set(groups[s.train]) & set(groups[s.heldout])  # no group straddles training / held-out
    assert not set(groups[s.heldout[s.reference]]) & set(groups[s.heldout[s.query]])
    assert "g0" not in set(groups[s.heldout])
    assert 0 < len(s.query) < len(s.heldout)
    again = lr_search.grouped_heldout(groups, labels, 20, 0.3, seed=0, label_column="lab")
    np.testing.assert_array_equal(again.heldout, s.heldout)  # seeded
    free = lr_search.grouped_heldout(groups, None, n_heldout=20, query_fraction=0.3, seed=0)
    assert free.criterion == "rankme" and free.query is None
    with pytest.raises(DinoflowError, match="heldout_images"):
        lr_search.grouped_heldout(groups, None, n_heldout=60, query_fraction=0.3, seed=0)


def test_criterion_known_answers():
    groups = np.array([f"g{i}" for i in range(40)], dtype=object)
    labels = np.array(["a", "b"] * 20, dtype=object)
    s = lr_search.grouped_heldout(groups, labels, n_heldout=30, query_fraction=0.5, seed=0, label_column="lab")
    # one direction per class: kNN top-1 is 1; the same direction for every image: at chance level or below
    y = s.labels
    separable = np.where(y[:, None] == 0, [[1.0, 0.0, 0.1]], [[0.0, 1.0, 0.1]]) + 0.01 * np.random.default_rng(
        0).normal(size=(len(y), 3))
    result = lr_search.criterion_value(separable, s, {"knn_k": 5, "knn_temperature": 0.07}, seed=0)
    assert result["name"] == "knn_top1/lab" and result["value"] == 1.0 and result["ci95"] == [1.0, 1.0]
    noise = np.random.default_rng(1).normal(size=(len(y), 3))
    worse = lr_search.criterion_value(noise, s, {"knn_k": 5, "knn_temperature": 0.07}, seed=0)
    assert worse["value"] < 1.0 and worse["ci95"][0] <= worse["value"] <= worse["ci95"][1]
    free = lr_search.grouped_heldout(groups, None, n_heldout=30, query_fraction=0.5, seed=0)
    x = np.random.default_rng(2).normal(size=(len(free.heldout), 8))
    r = lr_search.criterion_value(x, free, {}, seed=0)
    assert r["name"] == "rankme" and r["value"] == pytest.approx(rankme(x - x.mean(0)))
    assert lr_search.criterion_value(np.full((len(free.heldout), 8), np.nan), free, {}, seed=0)["value"] is None


@pytest.mark.slow  # ~2 min on 2 shared cores: three searches of short trials
def test_lr_search_writes_files_and_best_lr_in_range(tmp_path, monkeypatch):
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    params["lr_search"].update(n_trials=3, max_steps=2, lr_range=[1e-4, 1e-1], heldout_images=10)
    groups, labels = _groups_and_labels(params)
    best = lr_search.search(params, images, groups, labels, "shape")
    saved = read_json(paths.LR_SEARCH_BEST)
    assert saved["lr"] == best["lr"] and 1e-4 <= saved["lr"] <= 1e-1
    assert saved["criterion"] == "knn_top1/shape" and saved["higher_is_better"] is True
    assert saved["n_heldout"] + saved["n_train"] == len(images) and saved["n_heldout"] >= 10
    trials = pd.read_csv(paths.LR_SEARCH_TRIALS)
    assert len(trials) == 3 and {"number", "value", "lr", "state", "criterion", "ci95_low", "ci95_high",
                                 "loss_last_quarter"} <= set(trials.columns)
    assert trials["lr"].between(1e-4, 1e-1).all() and trials["value"].between(0, 1).all()
    complete = trials[trials["state"] == "COMPLETE"]
    assert saved["objective"] == pytest.approx(complete["value"].max())  # best = the highest criterion
    lo, hi = saved["objective_ci95"]
    assert 0 <= lo <= hi <= 1
    assert Path(paths.LR_SEARCH_PLOT).stat().st_size > 1000
    # trials scoring inside the best one's interval are counted and named in the note (known answer from the table)
    others = complete[complete["number"] != saved["trial"]]
    inside = others[(others["value"] >= lo) & (others["value"] <= hi)]
    assert saved["n_indistinguishable"] == len(inside)
    assert (saved["note"] is None) == inside.empty
    if not inside.empty:
        assert "cannot tell these learning rates apart" in saved["note"]
        assert all(f"{v:.3g}" in saved["note"] for v in inside["lr"])
    # seeded: the same search proposes the same learning rates and measures the same values
    first = trials[["lr", "value"]].to_numpy()
    lr_search.search(params, images, groups, labels, "shape")
    np.testing.assert_allclose(pd.read_csv(paths.LR_SEARCH_TRIALS)[["lr", "value"]].to_numpy(), first)
    # without label columns: RankMe of the held-out embeddings
    free = lr_search.search(params, images, groups)
    assert free["criterion"] == "rankme" and free["objective"] >= 1


def test_loss_of_the_last_quarter_is_kept_for_reference():
    assert lr_search.objective_value([4.0, 3.0, 2.0, 1.0, 9.0, 5.0, 3.0, 1.0]) == 2.0
    assert lr_search.objective_value([1.0, math.inf]) == math.inf
    assert lr_search.objective_value([]) == math.inf


def test_bad_range_and_missing_groups_are_reported(tmp_path, monkeypatch):
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    groups, labels = _groups_and_labels(params)
    params["lr_search"]["lr_range"] = [1e-2, 1e-4]
    with pytest.raises(DinoflowError, match="lr_search.lr_range"):
        lr_search.search(params, images, groups, labels, "shape")
    with pytest.raises(DinoflowError, match="groups.parquet: missing"):
        lr_search.read_groups_and_labels(params, ["img00000"])
    Path(paths.GROUPS).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ["img00000"], "group": ["g0"]}).to_parquet(paths.GROUPS)
    with pytest.raises(DinoflowError, match="no group for 1 processed images .*img00001"):
        lr_search.read_groups_and_labels(params, ["img00000", "img00001"])


def test_all_trials_diverged_is_an_error_not_a_best_lr(tmp_path, monkeypatch):
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    params["lr_search"].update(n_trials=2, max_steps=4, lr_range=[1e-3, 1e-1], heldout_images=10)
    groups, labels = _groups_and_labels(params)

    def diverging(params, images, lr, wd, temp, report):
        losses = [5.0, float("nan")]
        for step, loss in enumerate(losses):
            report(step, loss)
        return losses, None  # no backbone: the trial diverged

    monkeypatch.setattr(lr_search, "run_trial", diverging)
    Path(paths.LR_SEARCH_BEST).unlink(missing_ok=True)  # make_env writes one for the scratch model's tests
    with pytest.raises(DinoflowError, match=r"no trial completed \(all diverged\).*lr_search.lr_range"):
        lr_search.search(params, images, groups, labels, "shape")
    assert not Path(paths.LR_SEARCH_BEST).exists()
