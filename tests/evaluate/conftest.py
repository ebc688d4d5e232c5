"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest

from dinoflow import paths
from dinoflow.config import load_params


@pytest.fixture
def random_model_workspace(tiny_workspace, monkeypatch):
    """The tiny workspace as cwd, ingested and preprocessed, with the seeded random model `random` saved:
    (params, encoder)."""
    from dinoflow.data import ingest, preprocess
    from dinoflow.models.factory import create_encoder, save_encoder

    monkeypatch.chdir(tiny_workspace)
    params = load_params("params.yaml")
    ingest.main(params)
    preprocess.main(params)
    encoder, info = create_encoder(params, "random")
    save_encoder(encoder, paths.model_weights("random"), info)
    return params, encoder
