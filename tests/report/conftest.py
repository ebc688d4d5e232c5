"""Fixtures of the report tests; the workspace builder lives in report_fixtures.py (importable by tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from report_fixtures import build_workspace, chdir


@pytest.fixture(scope="session")
def report_ws(tmp_path_factory) -> tuple[Path, dict]:
    """(workflow root, params) with every report input, the grid and attention figures included (built once)."""
    from dinoflow.report import attention, grids

    root = tmp_path_factory.mktemp("report")
    params = build_workspace(root)
    with chdir(root / "ws"):
        grids.main(params)
        attention.main(params)
    return root / "ws", params
