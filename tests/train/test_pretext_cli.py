"""End to end through the CLI on the tiny workspace: pretext and MAE models train from scratch and as fine-tunes
of the pretrained stand-in, save their weights and say which method made them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dinoflow import paths
from dinoflow.cli import main as cli
from dinoflow.utils import read_json

MODELS = [
    {"name": "mae", "init": "random", "method": "mae", "trainable": "all"},
    {"name": "jigsaw_ft", "init": "pretrained", "method": "jigsaw", "trainable": "last1"},
    {"name": "rotation", "init": "random", "method": "rotation", "trainable": "all"},
]
SECTIONS = {
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
    "jigsaw": {"tile_size": 14, "cell_size": 16, "n_permutations": 10, "tile_dim": 16, "head_hidden_dim": 32},
    "rotation": {"head_hidden_dim": 16, "rotations_per_image": 2},
}


@pytest.mark.slow
def test_cli_trains_pretext_models(tiny_workspace: Path, monkeypatch):
    monkeypatch.chdir(tiny_workspace)
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["models"] = MODELS
    params["methods"] = {**(params.get("methods") or {}), **SECTIONS}
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for stage in (["ingest"], ["preprocess"]):
        assert cli(stage) == 0, stage
    for model in MODELS:
        assert cli(["train", "--model", model["name"]]) == 0, model
        info = read_json(paths.model_info(model["name"]))
        assert info["method"] == model["method"]
        weights = load_file(paths.model_weights(model["name"]))
        assert weights and not any(k.startswith(("decoder.", "head.")) for k in weights)  # the backbone only
        assert Path(paths.train_state(model["name"])).exists()
