"""Under torch.distributed (2 gloo processes on CPU) the centre, the Sinkhorn-Knopp targets and the loss equal those
of one process that sees the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dinoflow.ssl.losses import DINOLoss, iBOTPatchLoss
from ddp_helpers import run_ddp

K, B = 8, 6  # global batch 6 -> 3 per rank
CENTERINGS = ("centering", "sinkhorn_knopp")


def _data():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(B, K, generator=g) for _ in range(2)]
    student = [torch.randn(B, K, generator=g) for _ in range(4)]
    patches_t, patches_s = torch.randn(7, K, generator=g), torch.randn(7, K, generator=g)
    masks = torch.zeros(B, 4, dtype=torch.bool)
    masks[0, :3] = True; masks[1, :1] = True; masks[4, :3] = True  # rank 0: 4 tokens, rank 1: 3 tokens
    return teacher, student, patches_t, patches_s, masks


def _compute(rank: int, world: int, centering: str):
    teacher, student, pt, ps, masks = _data()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    tok = masks.flatten().cumsum(0).reshape(B, 4)  # token rows belonging to these images
    first = int(tok[rows.start - 1, -1]) if rows.start else 0
    last = int(tok[rows.stop - 1, -1])
    dino, ibot = DINOLoss(K, centering=centering), iBOTPatchLoss(K, centering=centering)
    out = {}
    for step in range(2):  # second step uses the updated centre
        out[f"dino{step}"] = dino([s[rows] for s in student], [t[rows] for t in teacher], teacher_temp=0.05)
        out[f"ibot{step}"] = ibot(ps[first:last], pt[first:last], masks[rows], teacher_temp=0.05)
    out["sk"] = dino.teacher_probs(teacher[0][rows], 0.05)
    out["dino_center"], out["ibot_center"] = dino.center.clone(), ibot.center.clone()
    return out


def _distributed(*, ctx) -> dict:
    """This process's `_compute` for every centring, its losses averaged over the processes."""
    result = {}
    for centering in CENTERINGS:
        out = _compute(ctx.rank, ctx.world_size, centering)
        for key in ("dino0", "dino1", "ibot0", "ibot1"):
            dist.all_reduce(out[key])  # the mean of per-rank losses is what DDP's gradient averaging optimises
            out[key] /= ctx.world_size
        result[centering] = out
    return result


@pytest.mark.slow
def test_two_processes_match_one():
    results = run_ddp(2, _distributed)
    for centering in CENTERINGS:
        single = _compute(0, 1, centering)
        ranks = [results[r][centering] for r in range(2)]
        # iBOT divides each rank's sum by its own image count, equal here (3 and 3), so the means agree too.
        for key in ("dino0", "dino1", "ibot0", "ibot1", "dino_center", "ibot_center"):
            for r in range(2):
                torch.testing.assert_close(ranks[r][key], single[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=key, c=centering: f"{c} {k}: {m}")
        torch.testing.assert_close(torch.cat([r["sk"] for r in ranks]), single["sk"], rtol=1e-5, atol=1e-6)
    # the centring mode really moved the centres (so the comparison above is not zeros against zeros)
    assert torch.count_nonzero(_compute(0, 1, "centering")["ibot_center"]) > 0
