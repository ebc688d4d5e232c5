"""The steps of the pretext-method DDP test (a module of its own so that spawned processes can import it)."""

from __future__ import annotations

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


def run_all(images: list, n_steps: int, ctx=None) -> dict:
    """`run_steps` of every method of `DDP_METHODS`, by method (one process, or one of ``run_ddp``'s with ctx)."""
    return {m: run_steps(m, images, n_steps, ctx) for m in DDP_METHODS}
