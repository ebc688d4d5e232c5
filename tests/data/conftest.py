"""Fixtures and markers of the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinoflow.data import ingest


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs the npm registry; skipped when it cannot be reached")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workflow root as cwd: stages write data/, metrics/ relative to it."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture(params=["simplejpeg", "torchvision"])
def jpeg_backend(request, monkeypatch):
    """Both strict JPEG paths of ingest: simplejpeg when installed, else (and always) torchvision's libjpeg."""
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(ingest, "jpeg_problem", ingest._jpeg_problem_torchvision)
    return request.param
