"""MoCo v2 (Chen et al. 2020, after He et al. 2020): a query encoder, a momentum (EMA) key encoder and a queue
of earlier keys as negatives; InfoNCE ``CE([q.k+, q.queue] / T, 0)``; 2-layer MLP head without BatchNorm.

The query sees view 0, the key encoder view 1 (``symmetric: true`` adds the swapped term, as MoCo v3 does).
The queue holds the keys of the last ``queue_size`` images of the global batch (persistent, seeded: resume is
bit-exact); the loss equals lightly's ``NTXentLoss`` with a memory bank holding the same queue (tested).

Shuffling BN (He et al. 2020, sec. 3.3; the official ``MoCo._batch_shuffle_ddp``, ``shuffle_bn: true``): under
DDP the key encoder's batch is shuffled across processes before it and unshuffled after it (lightly's
``batch_shuffle_distributed`` / ``batch_unshuffle_distributed``), so that the BatchNorm statistics of a key are
taken over other images than those of its query and the model cannot "cheat" through them. The permutation is
drawn from (seed, step), so a step stays a function of (seed, epoch, step) and the saved state. In one process
it is skipped: BatchNorm over the whole batch is invariant to a permutation of its rows, so shuffling would
change nothing. With a ViT (LayerNorm, no batch statistics) it changes nothing either, only moves rows. With it,
the key encoder keeps per-process BatchNorm under DDP (`local_batchnorm`; the query encoder's scratch-CNN
BatchNorm is synchronised as usual), so with a BatchNorm CNN N processes no longer equal one exactly: that is
the method (the official code runs per-GPU BatchNorm and shuffles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed
from torch import nn

from dinoflow.ssl.methods._common import FeatureQueue, check_momentum, check_positive, gather, gather_no_grad, \
    info_nce
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, make_teacher, pooled, pooled_views, register, \
    sample_seed
from dinoflow.train.distributed import is_distributed

SHUFFLE_STREAM = 2  # sample_seed stream of the shuffling-BN permutation (0, 1: the dataset's per-image streams)


@torch.no_grad()
def shuffled_forward(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int) -> torch.Tensor:
    """``encode`` applied to this process's rows ``x`` ``(B, ...)`` after shuffling the global batch across
    processes, its output ``(B, ...)`` unshuffled back to ``x``'s order (MoCo's shuffling BN, He et al. 2020 sec.
    3.3; lightly's ``batch_shuffle_distributed`` / ``batch_unshuffle_distributed``, adapted from the official
    ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``). Every process must hold the same number of rows.

    The permutation comes from torch's generator seeded with ``seed`` inside ``fork_rng`` (the caller's generator
    state is untouched; rank 0's permutation is broadcast). Without a process group this is ``encode(x)``: one
    process has the whole batch, and BatchNorm over a batch does not depend on the order of its rows.
    """
    if not is_distributed():
        return encode(x)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        shuffled, order = batch_shuffle_distributed(x)
    return batch_unshuffle_distributed(encode(shuffled), order)


@register
class MoCoV2(SSLMethod):
    name = "moco_v2"
    family = "contrastive"
    evaluated_network = "student"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 128
        temperature: float = 0.2
        queue_size: int = 4096      # negatives kept from earlier batches (65536 in the paper)
        momentum: float = 0.99      # EMA of the key encoder, cosine to momentum_end (0.999 in the paper)
        momentum_end: float = 1.0
        symmetric: bool = False
        shuffle_bn: bool = True     # shuffle the key encoder's batch across DDP processes (no-op in one process)

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, temperature=self.temperature,
                           queue_size=self.queue_size)
            check_momentum(name, self.momentum, self.momentum_end)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = MoCoProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.key_backbone = make_teacher(backbone)
        self.key_projection_head = make_teacher(self.projection_head)
        self.queue = FeatureQueue(cfg.queue_size, cfg.out_dim, seed=setup.seed)
        self.momentum = (cfg.momentum, cfg.momentum_end)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.projection_head, self.key_projection_head)]

    def exported_backbone(self):
        return self.backbone

    def local_batchnorm(self) -> list[nn.Module]:
        """Shuffling BN needs the key encoder's BatchNorm per process (as the official MoCo): SyncBatchNorm over
        the global batch would make the shuffle pointless."""
        return [self.key_backbone, self.key_projection_head] if self.cfg.shuffle_bn else []

    def _encode_key(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.key_projection_head(pooled(self.key_backbone, x)), dim=1)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, ctx, view: int) -> torch.Tensor:
        """``(B, out_dim)`` normalised keys of ``x`` (the key encoder; its batch shuffled across processes when
        ``shuffle_bn``; the permutation seeded by (seed, step, view))."""
        if not self.cfg.shuffle_bn:
            return self._encode_key(x)
        return shuffled_forward(self._encode_key, x, sample_seed(self.setup.seed, ctx.step, view, SHUFFLE_STREAM))

    def training_step(self, batch, ctx):
        x0, x1 = batch.views[:2]
        if self.cfg.symmetric:  # the query encoder sees both views: one backbone call when that is the same maths
            h0, h1 = pooled_views(self.backbone, [x0, x1])
        else:
            h0 = pooled(self.backbone, x0)
        q0 = self.projection_head(h0)
        k1 = self._keys(x1, ctx, 1)
        negatives = self.queue.features.clone()
        loss = info_nce(gather(q0), gather_no_grad(k1), negatives, self.cfg.temperature)
        keys = [k1]
        if self.cfg.symmetric:
            q1 = self.projection_head(h1)
            k0 = self._keys(x0, ctx, 0)
            loss = 0.5 * (loss + info_nce(gather(q1), gather_no_grad(k0), negatives, self.cfg.temperature))
            keys.append(k0)
        for k in keys:
            self.queue.push(gather_no_grad(k))
        return {"loss": loss, "embeddings": h0.detach()}
