"""Shared fixtures: a tiny generated collection and a params.yaml scaled down so every stage runs in seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dinoflow.data.synthetic import make_tiny_collection

REPO = Path(__file__).resolve().parents[1]


def tiny_params(collection: dict) -> dict:
    """The repo's params.yaml with a tiny collection and tiny models/training so the whole DAG runs fast."""
    with open(REPO / "params.yaml", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    params = copy.deepcopy(params)
    params["collection"] = collection
    params["demo"]["enabled"] = False
    params["preprocess"]["size"] = 64
    params["preprocess"]["shard_size"] = 10
    params["preprocess"]["workers"] = 1
    params["ingest"]["workers"] = 1
    params["backbone"].update({"img_size": 28, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}})
    params["pretrained"]["img_size"] = 32
    params["train"].update({"epochs": 2, "batch_size": 8, "global_crop_size": 28, "local_crop_size": 14,
                            "n_local_crops": 2, "warmup_epochs": 1})
    params["methods"]["dinov2"].update({"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                                        "warmup_teacher_temp_epochs": 1})
    params["lr_search"].update({"n_trials": 2, "max_steps": 2})
    params["embed"]["batch_size"] = 8
    params["neighbours"].update({"k": 3, "grid_random_queries": 2, "grid_k": 3})
    params["align"].update({"exact_max_n": 1000, "n_permutations": 19})
    params["collection"].setdefault("group_column", None)
    params["compare"].update({"n_resamples": 200, "n_pairs": 500})
    params["probes"]["knn_k"] = 5
    return params


@pytest.fixture
def tiny_collection(tmp_path: Path) -> dict:
    """24 generated images with captions/keywords/labels under tmp_path/collection; returns its params section."""
    return make_tiny_collection(tmp_path / "collection", n=24, size=64, missing_text_every=6)


@pytest.fixture
def tiny_workspace(tmp_path: Path, tiny_collection: dict) -> Path:
    """A workflow root (cwd for snakemake / dvc / dinoflow) with a tiny params.yaml."""
    ws = tmp_path / "ws"
    ws.mkdir()
    with open(ws / "params.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(tiny_params(tiny_collection), fh, sort_keys=False)
    return ws
