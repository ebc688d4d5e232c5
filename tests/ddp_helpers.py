"""Run a function in N CPU processes joined in one gloo process group: the set-up every DDP test shares.

Importable as ``ddp_helpers`` from every test folder: pytest's default ("prepend") import mode puts ``tests/`` (the
directory of the root ``conftest.py``, and of this module) on ``sys.path``, and ``torch.multiprocessing.spawn``
hands the parent's ``sys.path`` to its children, so they can import this module and the caller's helper modules.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it), for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(*args, ctx=ctx)`` in ``world_size`` spawned processes of a gloo group; their return values, by rank.

    Each process sets the variables torchrun would (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), uses
    one torch thread, joins the group through ``dinoflow.train.distributed.init_distributed("cpu")`` (so ``ctx`` is
    its ``DistContext``) and leaves it afterwards. ``fn`` and ``args`` must be picklable (``fn`` a module-level
    function of an importable module); the return values travel back through ``torch.save`` files in a temporary
    directory. A process that raises makes ``torch.multiprocessing.spawn`` raise ``ProcessRaisedException`` here.
    """
    with tempfile.TemporaryDirectory(prefix="dinoflow-ddp-") as out_dir:
        torch.multiprocessing.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                                    join=True)
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dinoflow.train.distributed import cleanup, init_distributed

    ctx = init_distributed("cpu")
    try:
        torch.save(fn(*args, ctx=ctx), Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup()
