"""End to end through the CLI on the tiny workspace: ingest, preprocess, lr-search, train (random, scratch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from dinoflow import paths
from dinoflow.cli import main as cli
from dinoflow.utils import read_json


@pytest.mark.slow
def test_cli_lr_search_then_scratch_training(tiny_workspace: Path, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    for stage in (["ingest"], ["preprocess"], ["train", "--model", "random"]):
        assert cli(stage) == 0, stage
    assert cli(["train", "--model", "scratch"]) == 2  # no lr search yet: a clear error, not a traceback
    assert cli(["lr-search"]) == 2  # no groups table (contract 1) yet: a clear error
    # the `groups` stage's table (contract 1), written here: pairs of consecutive images form a group
    ids = pd.read_parquet(paths.MANIFEST, columns=["id", "status"]).query("status == 'ok'")["id"].tolist()
    pd.DataFrame({"id": ids, "group": [f"g{i // 2}" for i in range(len(ids))]}).to_parquet(paths.GROUPS)
    assert cli(["lr-search"]) == 0
    best = read_json(paths.LR_SEARCH_BEST)
    assert best["criterion"] == "knn_top1/shape" and best["n_heldout"] >= 8
    assert cli(["train", "--model", "scratch"]) == 0
    info = read_json(paths.model_info("scratch"))
    assert info["train"]["lr_overrides"]["lr"] == best["lr"]
    assert load_file(paths.model_weights("scratch")).keys() == load_file(paths.model_weights("random")).keys()
    assert Path(paths.train_state("scratch")).exists()
    assert read_json(Path(paths.train_log_dir("scratch")) / "metrics.json")["step"] == 5
    assert info["collapse"]["verdict"] in ("healthy", "uniform_collapse", "one_hot_collapse", "dimensional_collapse")
    assert info["drift"]["n_images"] == len(ids) and info["evaluated_network"] == "teacher"
