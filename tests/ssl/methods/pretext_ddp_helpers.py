"""The DDP worker of the pretext-method tests (a module of its own so that spawned processes can import it)."""

from __future__ import annotations

import os

import torch

# Methods and sizes compared between 1 and 2 processes (ViT backbones: no batch statistics in the network).
DDP_METHODS = {
    "rotation": {"head_hidden_dim": 32},
    "jigsaw": {"tile_size": 14, "cell_size": 16, "n_permutations": 10, "tile_dim": 16, "head_hidden_dim": 32},
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
}


def run_steps(method: str, images: list, n_steps: int, ctx=None) -> dict:
    """``n_steps`` engine steps of ``method`` (tiny ViT, global batch 8): logged values and final weights."""
    from method_helpers import tiny_engine

    engine = tiny_engine(method, "vit", images, section=DDP_METHODS[method], ctx=ctx, epochs=1, lr=0.05,
                         warmup_epochs=0)
    values = [v for _, v in engine.steps(0, n_steps)]
    return {"values": values, "weights": {k: v.detach().clone() for k, v in engine.method.state_dict().items()}}


def ddp_worker(rank: int, world_size: int, port: int, images: list, n_steps: int, out: str) -> None:
    """One process of a gloo group: every method of `DDP_METHODS` for ``n_steps``; rank 0 saves the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dinoflow.train.distributed import cleanup, init_distributed

    ctx = init_distributed("cpu")
    try:
        results = {m: run_steps(m, images, n_steps, ctx) for m in DDP_METHODS}
        if rank == 0:
            torch.save(results, out)
    finally:
        cleanup()
