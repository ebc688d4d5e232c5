"""`dinoflow lr-search`: seeded Optuna search writes its table, figure and a best lr inside the range."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.train import lr_search
from dinoflow.utils import read_json
from train_helpers import make_env


def test_lr_search_writes_files_and_best_lr_in_range(tmp_path, monkeypatch):
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    params["lr_search"].update(n_trials=3, max_steps=3, lr_range=[1e-4, 1e-1])
    best = lr_search.main(params, images=images)
    saved = read_json(paths.LR_SEARCH_BEST)
    assert saved["lr"] == best["lr"] and 1e-4 <= saved["lr"] <= 1e-1
    trials = pd.read_csv(paths.LR_SEARCH_TRIALS)
    assert len(trials) == 3 and {"number", "value", "lr", "state"} <= set(trials.columns)
    assert trials["lr"].between(1e-4, 1e-1).all()
    complete = trials[trials["state"] == "COMPLETE"]
    assert saved["objective"] == pytest.approx(complete["value"].min())  # best = the lowest objective
    assert Path(paths.LR_SEARCH_PLOT).stat().st_size > 1000
    # seeded: the same search proposes the same learning rates
    first = list(trials["lr"])
    lr_search.main(params, images=images)
    assert list(pd.read_csv(paths.LR_SEARCH_TRIALS)["lr"]) == pytest.approx(first)


def test_objective_is_the_mean_of_the_last_quarter():
    assert lr_search.objective_value([4.0, 3.0, 2.0, 1.0, 9.0, 5.0, 3.0, 1.0]) == 2.0
    assert lr_search.objective_value([1.0, math.inf]) == math.inf
    assert lr_search.objective_value([]) == math.inf


def test_bad_range_is_reported(tmp_path, monkeypatch):
    params, images = make_env(tmp_path)
    monkeypatch.chdir(tmp_path / "ws")
    params["lr_search"]["lr_range"] = [1e-2, 1e-4]
    with pytest.raises(DinoflowError, match="lr_search.lr_range"):
        lr_search.main(params, images=images)


def test_all_trials_diverged_is_an_error_not_a_best_lr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def diverging(params, images, lr, wd, temp, report):
        losses = [5.0, float("nan"), float("nan"), float("nan")]
        for step, loss in enumerate(losses):
            report(step, loss)
        return losses

    monkeypatch.setattr(lr_search, "run_trial", diverging)
    params = {"seed": 0, "lr_search": {"n_trials": 2, "max_steps": 4, "lr_range": [1e-3, 1e-1]}}
    with pytest.raises(DinoflowError, match=r"all 2 completed trials diverged.*lr_search.lr_range"):
        lr_search.main(params, images=object())
    assert not Path(paths.LR_SEARCH_BEST).exists()
