"""Helpers of the engine tests that spawned DDP processes import (tiny methods on tiny images)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl" / "methods"))
from method_helpers import tiny_engine  # noqa: E402


def run_steps(method: str, images: list, n_steps: int, ctx=None) -> dict:
    """``n_steps`` engine steps of ``method`` (tiny ViT): logged values and the final state; ``run_ddp`` passes ctx."""
    engine = tiny_engine(method, "vit", images, ctx=ctx, epochs=1)
    values = [v for _, v in engine.steps(0, n_steps)]
    return {"values": values, "state": {k: v.detach().clone() for k, v in engine.method.state_dict().items()}}

