"""Data-parallel training across processes (torchrun): process-group set-up from environment variables.

`torchrun --nproc_per_node=N -m dinoflow.cli train --model scratch` (or `--nnodes`, `--rdzv-endpoint` for several
machines) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them. Without
them it returns a single-process context and nothing else changes. The backend is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger, resolve_device

log = get_logger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment variables (or run as one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, resolve_device(device))
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise DinoflowError(f"WORLD_SIZE={world_size} but RANK is missing or not an integer: {exc}") from exc
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, dev, backend)
    return DistContext(rank, world_size, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over processes (a no-op for one process); returns a new tensor."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every process and keeps this process's slice.

    Used for batch-level terms (KoLeo) so that N processes compute the loss of the global batch: with DDP's
    gradient averaging, the result equals the single-process gradient exactly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0 (identity for one process), differentiably."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the *global* batch (gathered over processes).

    The CPU-capable equivalent of ``SyncBatchNorm`` for projection / prediction heads (SimCLR, BYOL, Barlow
    Twins, VICReg, SwAV heads normalise over the batch): every process normalises the gathered batch and keeps
    its own rows, and the running statistics are updated identically everywhere, so N processes equal one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        n = x.shape[0]
        y = super().forward(all_gather_with_grad(x))
        r = dist.get_rank()
        return y[r * n:(r + 1) * n]


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` inside ``module`` by `GlobalBatchNorm1d` (same parameters and buffers)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(next(iter(child.buffers()), torch.zeros(())).device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module
