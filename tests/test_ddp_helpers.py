"""The shared DDP test helper: every rank joins one gloo group and its return value comes back in rank order."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from ddp_helpers import free_port, run_ddp


def _rank_and_sum(offset: int, *, ctx) -> dict:
    t = torch.tensor([float(ctx.rank + offset)])
    dist.all_reduce(t)  # sum over the group: only equals the brute-force sum if both ranks really joined one group
    return {"rank": ctx.rank, "world": ctx.world_size, "env_rank": dist.get_rank(), "sum": t}


def test_free_port_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.slow  # two spawned processes import torch (~10 s)
def test_run_ddp_returns_each_rank_result_in_order():
    results = run_ddp(2, _rank_and_sum, 10)
    assert [r["rank"] for r in results] == [r["env_rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    assert all(torch.equal(r["sum"], torch.tensor([10.0 + 11.0])) for r in results)
