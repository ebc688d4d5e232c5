"""Helpers of the engine tests that spawned DDP processes import (tiny methods on tiny images)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl" / "methods"))
from method_helpers import tiny_engine  # noqa: E402


def run_steps(method: str, images: list, n_steps: int, ctx=None) -> dict:
    engine = tiny_engine(method, "vit", images, ctx=ctx, epochs=1)
    values = [v for _, v in engine.steps(0, n_steps)]
    return {"values": values, "state": {k: v.detach().clone() for k, v in engine.method.state_dict().items()}}


def ddp_worker(rank: int, world_size: int, port: int, method: str, images: list, n_steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dinoflow.train.distributed import cleanup, init_distributed

    ctx = init_distributed("cpu")
    try:
        result = run_steps(method, images, n_steps, ctx)
        if rank == 0:
            torch.save(result, out)
    finally:
        cleanup()
