"""The per-process part of the MoCo v2 shuffling-BN DDP test (a module of its own so that spawned processes can
import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gathered(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


def shuffle_round_trips(ctx) -> dict:
    """In one process of ``run_ddp``'s group: `shuffled_forward` round trips; what every process saw, gathered."""
    from dinoflow.ssl.methods.moco_v2 import shuffled_forward

    rank = ctx.rank
    b = 4
    x = torch.arange(rank * b, (rank + 1) * b, dtype=torch.float32).repeat(3, 1).t().contiguous()  # (4, 3)
    seen: list[torch.Tensor] = []

    def identity(t):
        seen.append(t.clone())
        return t * 1.0

    state = torch.get_rng_state()
    back = shuffled_forward(identity, x, seed=7)
    again = shuffled_forward(identity, x, seed=7)
    other = shuffled_forward(identity, x, seed=8)
    centred = shuffled_forward(lambda t: t - t.mean(0), x, seed=7)  # batch statistics of the shuffled rows
    return {"x": _gathered(x), "back": _gathered(back), "again": _gathered(again), "other": _gathered(other),
            "seen": torch.stack([_gathered(s) for s in seen]), "centred": _gathered(centred),
            "rng_untouched": torch.equal(state, torch.get_rng_state())}
