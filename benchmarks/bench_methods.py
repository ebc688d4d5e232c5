"""Training throughput (images/s) of every dinoflow method on the engine vs lightly's implementation of the method.

    OMP_NUM_THREADS=1 python benchmarks/bench_methods.py [--quick] [--methods simclr byol ...] [--backbones vit cnn]
                                                         [--batch B] [--reps N] [--warmup W] [--out DIR]

For each method with a lightly counterpart and each backbone (a small timm ViT and a small timm CNN), two sides
train on the *same* collated batch (made once by the method's own view maker from seeded synthetic images, so
data loading is not timed; both sides see the same number and size of views):

- dinoflow: `dinoflow.train.engine.Engine.train_step` around the registered method (``make_engine``, the method's
  default ``methods.<name>`` knobs): forward (same-size views through one backbone call where no BatchNorm uses
  batch statistics: `dinoflow.ssl.methods.base.pooled_views`), loss, backward, ``after_backward``, gradient
  clipping (head and backbone), AdamW step (PyTorch's fused kernel: `dinoflow.train.engine.adamw_implementation`),
  EMA of the method's pairs, queue updates, logged values and the collapse monitor;
- lightly (baseline): the training loop of lightly's own example of that method, built from lightly's heads,
  losses, ``MemoryBankModule`` (through ``NTXentLoss(memory_bank_size=...)``), ``update_momentum`` and
  ``deactivate_requires_grad``, on a timm model of the same architecture and weights (``num_classes=0``, as
  lightly's timm examples); same head sizes as dinoflow's method config; the same optimizer algorithm (AdamW, no
  weight decay on biases / norms via lightly's ``get_weight_decay_parameters``; torch's default implementation,
  as an example loop writes it) and the same gradient clipping (``train.clip_grad``).

Where lightly has no module for a part of a method the reference writes it as the paper does and the result
table says so (MoCo v3's loss: ``CE(q k^T / T, arange) * 2T`` from the paper's pseudo-code; lightly has its
heads but no MoCo v3 loss). Methods with no lightly counterpart at all are compared with a plain hand-written
PyTorch step of the same computation (the table's ``baseline`` column says which).

Timing: one process, ``torch.set_num_threads(1)`` (single thread), ``--warmup`` untimed steps per side first,
then ``--reps`` repetitions in which the sides alternate (the order flips every repetition), so load changes on
a shared machine hit both sides alike. Reported: median step time and images/s per side, the ratio
``images/s dinoflow / images/s lightly`` (median of the paired per-repetition ratios) and its 95% bootstrap
interval over the repetitions. The engine runs in its second epoch (warm-ups such as SwAV's frozen prototypes
and DINO's frozen last layer are over on both sides).

Results: benchmarks/results/methods.json and .md (methods_quick.* with --quick, or under --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _engine_bench, also when loaded from a file path (tests)

from _engine_bench import finish_step  # noqa: E402

# Backbones: a small timm ViT (the demo's ViT-S/14 at ViT-Tiny width, params.yaml `backbone`) and a small timm CNN
# (ResNet-18, the backbone of lightly's examples). Quick mode: the same architectures, shallower and smaller.
BACKBONES = {
    "full": {
        "vit": {"arch": "vit_small_patch14_dinov2", "kwargs": {"embed_dim": 192, "depth": 6, "num_heads": 3}},
        "cnn": {"arch": "resnet18", "kwargs": {}},
    },
    "quick": {
        "vit": {"arch": "vit_small_patch14_dinov2", "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}},
        "cnn": {"arch": "resnet18", "kwargs": {}},
    },
}
# Crops (px) and batch per mode; multi-crop methods (SwAV, DINO) add `n_local_crops` local crops.
SIZES = {
    "full": {"batch": 32, "global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 4, "reps": 9, "warmup": 1},
    "quick": {"batch": 8, "global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 2, "reps": 3, "warmup": 1},
}
# Quick mode shrinks the heads too (the same sizes on both sides; the defaults are sized for real runs).
QUICK_HEADS = {
    "simclr": {"hidden_dim": 256, "out_dim": 64},
    "moco_v2": {"hidden_dim": 256, "out_dim": 64, "queue_size": 256},
    "moco_v3": {"hidden_dim": 256, "out_dim": 64},
    "byol": {"hidden_dim": 256, "out_dim": 64},
    "simsiam": {"hidden_dim": 256, "out_dim": 256, "pred_hidden_dim": 64},
    "barlow_twins": {"hidden_dim": 256, "out_dim": 256},
    "vicreg": {"hidden_dim": 256, "out_dim": 256},
    "swav": {"hidden_dim": 256, "out_dim": 64, "n_prototypes": 64},
    "dino": {"out_dim": 512, "hidden_dim": 128, "bottleneck_dim": 64},
    "mae": {"decoder_dim": 64, "decoder_depth": 1, "decoder_num_heads": 2},
    "rotation": {"head_hidden_dim": 64},
    "relative_position": {"patch_size": 28, "gap": 8, "jitter": 2, "head_hidden_dim": 64},
    "jigsaw": {"tile_size": 28, "cell_size": 32, "n_permutations": 24, "tile_dim": 32, "head_hidden_dim": 64},
    "context_encoder": {"decoder_dim": 32},
}


# ------------------------------------------------------------------------------------------------ shared set-up
def synthetic_images(n: int, size: int = 160, seed: int = 0) -> list:
    """``n`` seeded smooth RGB PIL images (low-frequency noise upsampled), ``size`` x ``size`` px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BILINEAR))
    return out


def train_config(sizes: dict, batch: int, steps_per_epoch: int):
    """params.yaml's ``train`` section (parsed as the train stage does) with the benchmark's crops and batch, a
    constant-rate schedule (no warm-up) and nothing switched on that the baseline does not do (AMP, compile,
    gradient checkpointing)."""
    from dataclasses import replace

    import yaml

    from dinoflow.train.config import TrainConfig

    with open(HERE.parent / "params.yaml", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    return replace(TrainConfig.from_params(params), epochs=2, batch_size=batch, num_workers=0,
                   global_crop_size=sizes["global_crop_size"], local_crop_size=sizes["local_crop_size"],
                   n_local_crops=sizes["n_local_crops"], global_crop_scale=(0.32, 1.0),
                   local_crop_scale=(0.05, 0.32), lr=5e-4, min_lr=1e-6, warmup_epochs=0, weight_decay=0.04,
                   weight_decay_end=0.04, clip_grad=3.0, amp=False, compile=False, grad_checkpointing=False,
                   log_every=1, max_steps_per_epoch=steps_per_epoch, checkpoint_every=10_000)


def make_encoder(spec: dict, img_size: int):
    from dinoflow.models.encoder import Encoder

    torch.manual_seed(0)
    return Encoder(spec["arch"], img_size, dict(spec["kwargs"]))


def timm_backbone(encoder) -> nn.Module:
    """The baseline's backbone: a timm model of the encoder's architecture (``num_classes=0``: pooled features,
    ViT CLS token / CNN global average pool), with the encoder's weights. ViTs take any crop size, as dinoflow's."""
    import timm

    kwargs = dict(encoder.timm_kwargs) if hasattr(encoder, "timm_kwargs") else {}
    if encoder.is_vit:
        model = timm.create_model(encoder.arch, pretrained=False, num_classes=0, img_size=encoder.img_size,
                                  dynamic_img_size=True, **kwargs)
    else:
        model = timm.create_model(encoder.arch, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(encoder.model.state_dict())
    return model


def adamw(modules: list[nn.Module], cfg) -> torch.optim.Optimizer:
    """AdamW with lightly's decay / no-decay split (biases and norm layers without weight decay)."""
    from lightly.models.utils import get_weight_decay_parameters

    decay, no_decay = get_weight_decay_parameters(modules)
    decay = [p for p in decay if p.requires_grad]
    no_decay = [p for p in no_decay if p.requires_grad]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr * cfg.batch_size / 256)


def cosine_momentum(step: int, total: int, start: float, end: float) -> float:
    """lightly.utils.scheduler.cosine_schedule, as lightly's examples set the EMA momentum."""
    from lightly.utils.scheduler import cosine_schedule

    return float(cosine_schedule(step, total, start, end))


def two_view_step(backbone, head, criterion, train):
    """The step of lightly's SimCLR, Barlow Twins and VICReg examples: ``criterion(head(backbone(view 0)),
    head(backbone(view 1)))``, one backbone call per view; AdamW (`adamw`) over backbone + head."""
    opt = adamw([backbone, head], train)
    params = list(backbone.parameters()) + list(head.parameters())

    def step(views, i, targets=None):
        z0 = head(backbone(views[0]).flatten(start_dim=1))
        z1 = head(backbone(views[1]).flatten(start_dim=1))
        return finish_step(criterion(z0, z1), params, opt, train.clip_grad)

    return step


# ------------------------------------------------------------------------------------------------ lightly baselines
# Each builder gets (backbone: timm nn.Module, cfg: the dinoflow method's parsed Config, train: TrainConfig,
# embed_dim) and returns (step(views, step_index) -> loss, description). The loops follow lightly's examples
# (examples/pytorch/<method>.py of lightly 1.6): one backbone call per view, momentum update at the start.
def lightly_simclr(backbone, cfg, train, dim):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    head = SimCLRProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    return two_view_step(backbone, head, NTXentLoss(temperature=cfg.temperature), train), \
        "SimCLRProjectionHead + NTXentLoss"


def lightly_moco_v2(backbone, cfg, train, dim):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    head = MoCoProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, cfg.out_dim))
    model = nn.ModuleDict({"backbone": backbone, "head": head, "backbone_m": backbone_m, "head_m": head_m})
    opt = adamw([backbone, head], train)
    params = list(backbone.parameters()) + list(head.parameters())

    def step(views, i, targets=None):
        m = cosine_momentum(i, 1000, cfg.momentum, cfg.momentum_end)
        update_momentum(backbone, backbone_m, m)
        update_momentum(head, head_m, m)
        query = head(backbone(views[0]).flatten(start_dim=1))
        key = head_m(backbone_m(views[1]).flatten(start_dim=1)).detach()
        return finish_step(criterion(query, key), params, opt, train.clip_grad)

    step.model = model
    return step, "MoCoProjectionHead + NTXentLoss(memory_bank_size) + update_momentum"


def lightly_moco_v3(backbone, cfg, train, dim):
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    proj = MoCoProjectionHead(dim, cfg.hidden_dim, cfg.out_dim, num_layers=3, batch_norm=True)
    pred = MoCoProjectionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2, batch_norm=True)
    backbone_m, proj_m = copy.deepcopy(backbone), copy.deepcopy(proj)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(proj_m)
    opt = adamw([backbone, proj, pred], train)
    params = [p for mod in (backbone, proj, pred) for p in mod.parameters()]
    t = cfg.temperature

    def ctr(q, k):  # MoCo v3 paper, Algorithm 1
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return F.cross_entropy(q @ k.t() / t, torch.arange(q.shape[0])) * 2 * t

    def step(views, i, targets=None):
        m = cosine_momentum(i, 1000, cfg.momentum, cfg.momentum_end)
        update_momentum(backbone, backbone_m, m)
        update_momentum(proj, proj_m, m)
        q0, q1 = (pred(proj(backbone(v).flatten(start_dim=1))) for v in views[:2])
        with torch.no_grad():
            k0, k1 = (proj_m(backbone_m(v).flatten(start_dim=1)) for v in views[:2])
        return finish_step(ctr(q0, k1) + ctr(q1, k0), params, opt, train.clip_grad)

    return step, "MoCoProjectionHead (3+2 layers, BN) + update_momentum; loss from the MoCo v3 paper (none in lightly)"


def lightly_byol(backbone, cfg, train, dim):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    proj = BYOLProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    pred = BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
    backbone_m, proj_m = copy.deepcopy(backbone), copy.deepcopy(proj)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(proj_m)
    criterion = NegativeCosineSimilarity()
    opt = adamw([backbone, proj, pred], train)
    params = [p for mod in (backbone, proj, pred) for p in mod.parameters()]

    def forward(x):
        return pred(proj(backbone(x).flatten(start_dim=1)))

    def forward_momentum(x):
        return proj_m(backbone_m(x).flatten(start_dim=1)).detach()

    def step(views, i, targets=None):
        m = cosine_momentum(i, 1000, cfg.momentum, cfg.momentum_end)
        update_momentum(backbone, backbone_m, m)
        update_momentum(proj, proj_m, m)
        x0, x1 = views[:2]
        p0, z0 = forward(x0), forward_momentum(x0)
        p1, z1 = forward(x1), forward_momentum(x1)
        return finish_step(0.5 * (criterion(p0, z1) + criterion(p1, z0)), params, opt, train.clip_grad)

    return step, "BYOLProjection/PredictionHead + NegativeCosineSimilarity + update_momentum"


def lightly_simsiam(backbone, cfg, train, dim):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

    proj = SimSiamProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    pred = SimSiamPredictionHead(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim)
    criterion = NegativeCosineSimilarity()
    opt = adamw([backbone, proj, pred], train)
    params = [p for mod in (backbone, proj, pred) for p in mod.parameters()]

    def forward(x):
        z = proj(backbone(x).flatten(start_dim=1))
        return z.detach(), pred(z)

    def step(views, i, targets=None):
        z0, p0 = forward(views[0])
        z1, p1 = forward(views[1])
        return finish_step(0.5 * (criterion(z0, p1) + criterion(z1, p0)), params, opt, train.clip_grad)

    return step, "SimSiamProjection/PredictionHead + NegativeCosineSimilarity"


def lightly_barlow_twins(backbone, cfg, train, dim):
    from lightly.loss import BarlowTwinsLoss
    from lightly.models.modules import BarlowTwinsProjectionHead

    head = BarlowTwinsProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    criterion = BarlowTwinsLoss(lambda_param=cfg.lambda_param)
    return two_view_step(backbone, head, criterion, train), "BarlowTwinsProjectionHead + BarlowTwinsLoss"


def lightly_vicreg(backbone, cfg, train, dim):
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead

    head = VICRegProjectionHead(dim, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers)
    criterion = VICRegLoss(lambda_param=cfg.lambda_param, mu_param=cfg.mu_param, nu_param=cfg.nu_param)
    return two_view_step(backbone, head, criterion, train), "VICRegProjectionHead + VICRegLoss"


def lightly_swav(backbone, cfg, train, dim):
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

    if cfg.queue_size:
        raise SystemExit("bench_methods: the SwAV baseline follows lightly's example without a queue; "
                         "benchmark methods.swav.queue_size: 0")
    head = SwaVProjectionHead(dim, cfg.hidden_dim, cfg.out_dim)
    prototypes = SwaVPrototypes(cfg.out_dim, cfg.n_prototypes)
    criterion = SwaVLoss(temperature=cfg.temperature, sinkhorn_iterations=cfg.sinkhorn_iterations,
                         sinkhorn_epsilon=cfg.sinkhorn_epsilon)
    opt = adamw([backbone, head, prototypes], train)
    params = [p for mod in (backbone, head, prototypes) for p in mod.parameters()]

    def forward(x):
        z = F.normalize(head(backbone(x).flatten(start_dim=1)), dim=1, p=2)
        return prototypes(z)

    def step(views, i, targets=None):
        prototypes.normalize()
        outputs = [forward(v) for v in views]
        return finish_step(criterion(outputs[:2], outputs[2:]), params, opt, train.clip_grad)

    return step, "SwaVProjectionHead + SwaVPrototypes + SwaVLoss (multi-crop, no queue)"


def lightly_dino(backbone, cfg, train, dim):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    def head():
        return DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                                  freeze_last_layer=cfg.freeze_last_layer_epochs)

    student_head = head()
    teacher_backbone = copy.deepcopy(backbone)
    teacher_head = head()  # lightly's example builds it anew (a weight_norm head cannot be deep-copied)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
                         teacher_temp=cfg.teacher_temp, warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                         student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)
    opt = adamw([backbone, student_head], train)
    params = list(backbone.parameters()) + list(student_head.parameters())
    epoch = 1  # the engine is timed in its second epoch: the last layer trains on both sides

    def step(views, i, targets=None):
        m = cosine_momentum(i, 1000, cfg.momentum, cfg.momentum_end)
        update_momentum(backbone, teacher_backbone, m)
        update_momentum(student_head, teacher_head, m)
        with torch.no_grad():
            teacher_out = [teacher_head(teacher_backbone(v).flatten(start_dim=1)) for v in views[:2]]
        student_out = [student_head(backbone(v).flatten(start_dim=1)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=epoch)
        return finish_step(loss, params, opt, train.clip_grad,
                           before_clip=lambda: student_head.cancel_last_layer_gradients(current_epoch=epoch))

    return step, "DINOProjectionHead + DINOLoss + update_momentum (multi-crop)"


def lightly_mae(backbone, cfg, train, dim):
    from lightly.models import utils
    from lightly.models.modules.masked_vision_transformer_decoder_timm import MaskedVisionTransformerDecoderTIMM
    from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM

    encoder = MaskedVisionTransformerTIMM(vit=backbone)
    patch = backbone.patch_embed.patch_size[0]
    size = train.global_crop_size if cfg.crop_size is None else cfg.crop_size
    n_patches = (size // patch) ** 2
    prefix = backbone.num_prefix_tokens
    decoder = MaskedVisionTransformerDecoderTIMM(num_patches=n_patches, embed_dim=cfg.decoder_dim,
                                                 depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads,
                                                 num_prefix_tokens=prefix)
    embed, predict = nn.Linear(dim, cfg.decoder_dim), nn.Linear(cfg.decoder_dim, patch ** 2 * 3)
    opt = adamw([backbone, decoder, embed, predict], train)
    params = [p for mod in (backbone, decoder, embed, predict) for p in mod.parameters()]

    def step(views, i, targets=None):
        images = views[0]
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, decoder.sequence_length), mask_ratio=cfg.mask_ratio)
        x = embed(encoder.encode(images=images, idx_keep=idx_keep))
        full = utils.repeat_token(decoder.mask_token, (b, decoder.sequence_length))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = predict(utils.get_at_index(decoder(full), idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - prefix)
        if cfg.norm_pix_loss:
            target = utils.normalize_mean_var(target, dim=-1, eps=1.0e-6)
        return finish_step(F.mse_loss(pred, target), params, opt, train.clip_grad)

    return step, ("MaskedVisionTransformerTIMM.encode + MaskedVisionTransformerDecoderTIMM + utils "
                  "(random_token_mask, set_at_index, patchify), as lightly's MAE example")


# Pretext tasks: lightly has none of them; the baseline is a plain hand-written PyTorch step of the same
# computation (timm backbone call, the same head layers written as nn.Sequential, F.cross_entropy / MSE).
def plain_rotation(backbone, cfg, train, dim):
    hidden = cfg.head_hidden_dim
    head = (nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4)) if hidden
            else nn.Linear(dim, 4))
    opt = adamw([backbone, head], train)
    params = list(backbone.parameters()) + list(head.parameters())

    def step(views, i, targets=None):
        images = torch.cat(views)
        labels = targets["rotation"].t().reshape(-1)
        loss = F.cross_entropy(head(backbone(images)), labels)
        return finish_step(loss, params, opt, train.clip_grad)

    return step, "plain PyTorch: backbone on all rotated copies, MLP head, cross-entropy"


def plain_relative_position(backbone, cfg, train, dim):
    head = nn.Sequential(nn.Linear(2 * dim, cfg.head_hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(cfg.head_hidden_dim, 8))
    opt = adamw([backbone, head], train)
    params = list(backbone.parameters()) + list(head.parameters())

    def step(views, i, targets=None):
        b = views[0].shape[0]
        h = backbone(torch.cat(views[:2]))
        loss = F.cross_entropy(head(torch.cat([h[:b], h[b:]], dim=1)), targets["position"])
        return finish_step(loss, params, opt, train.clip_grad)

    return step, "plain PyTorch: backbone on both patches, late-fusion MLP head, 8-way cross-entropy"


def plain_jigsaw(backbone, cfg, train, dim):
    tile = nn.Sequential(nn.Linear(dim, cfg.tile_dim), nn.ReLU(inplace=True))
    classifier = nn.Sequential(nn.Linear(9 * cfg.tile_dim, cfg.head_hidden_dim), nn.ReLU(inplace=True),
                               nn.Linear(cfg.head_hidden_dim, cfg.n_permutations))
    opt = adamw([backbone, tile, classifier], train)
    params = [p for mod in (backbone, tile, classifier) for p in mod.parameters()]

    def step(views, i, targets=None):
        b = views[0].shape[0]
        h = backbone(torch.cat(views[:9])).view(9, b, -1).transpose(0, 1)
        loss = F.cross_entropy(classifier(tile(h).flatten(1)), targets["permutation"])
        return finish_step(loss, params, opt, train.clip_grad)

    return step, "plain PyTorch: backbone on the 9 tiles, shared tile layer + classifier, cross-entropy"


def plain_context_encoder(backbone, cfg, train, dim):
    from dinoflow.ssl.pretext.context_encoder import InpaintingDecoder

    if cfg.adversarial_weight:
        raise SystemExit("bench_methods: the context encoder baseline is the L2 objective; set "
                         "methods.context_encoder.adversarial_weight: 0")
    size = train.global_crop_size if cfg.crop_size is None else cfg.crop_size
    is_vit = hasattr(backbone, "patch_embed")
    with torch.no_grad():
        probe = backbone.forward_features(torch.zeros(1, 3, size, size))
    grid = size // backbone.patch_embed.patch_size[0] if is_vit else probe.shape[-1]
    decoder = InpaintingDecoder(dim, grid, size, cfg.decoder_dim)  # conv / up-conv layers, no dinoflow logic
    opt = adamw([backbone, decoder], train)
    params = list(backbone.parameters()) + list(decoder.parameters())
    prefix = getattr(backbone, "num_prefix_tokens", 0)

    def step(views, i, targets=None):
        masked, full = views[0], views[1]
        f = backbone.forward_features(masked)
        if is_vit:
            f = f[:, prefix:].transpose(1, 2).reshape(f.shape[0], dim, grid, grid)
        pred = decoder(f)
        m = targets["mask"].to(pred.dtype).expand_as(pred)
        loss = ((pred - full) ** 2 * m).sum() / m.sum()
        return finish_step(loss, params, opt, train.clip_grad)

    return step, "plain PyTorch: backbone feature map, up-convolution decoder, masked L2"


BASELINES: dict[str, Callable] = {
    "simclr": lightly_simclr, "moco_v2": lightly_moco_v2, "moco_v3": lightly_moco_v3, "byol": lightly_byol,
    "simsiam": lightly_simsiam, "barlow_twins": lightly_barlow_twins, "vicreg": lightly_vicreg,
    "swav": lightly_swav, "dino": lightly_dino, "mae": lightly_mae,
    "rotation": plain_rotation, "relative_position": plain_relative_position, "jigsaw": plain_jigsaw,
    "context_encoder": plain_context_encoder,
}
# Which baseline each method is measured against (shown in the result table).
BASELINE_KIND = {name: "lightly" for name in BASELINES}
BASELINE_KIND["moco_v3"] = "lightly heads + paper loss"
BASELINE_KIND.update({m: "plain PyTorch" for m in ("rotation", "relative_position", "jigsaw", "context_encoder")})
VIT_ONLY = {"mae"}


# ------------------------------------------------------------------------------------------------ one comparison
def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the median of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, len(v), size=(n, len(v)))], axis=1)
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def build_sides(method: str, kind: str, mode: str, batch: int, steps: int, section: dict | None):
    """The dinoflow engine step and the baseline step for (method, backbone kind), on one shared batch."""
    from dinoflow.ssl.methods.base import parse_config
    from dinoflow.train.engine import RunSpec, make_engine

    sizes = SIZES[mode]
    spec = BACKBONES[mode][kind]
    section = dict(QUICK_HEADS.get(method, {}) if mode == "quick" else {}, **(section or {}))
    cfg = train_config(sizes, batch, steps)
    images = synthetic_images(batch) * steps
    encoder = make_encoder(spec, sizes["global_crop_size"])
    run = RunSpec(method=method, method_section=section, trainable="all", train=cfg, finetune=None, seed=0)
    engine = make_engine(run, encoder, images)
    engine.set_epoch(0)
    batch_views = next(iter(engine.loader))
    engine.set_epoch(1)  # second epoch: prototype / last-layer freezes are over, as on the baseline side
    extras = engine.batch_extras(engine.sampler.global_batch(1, 0), 1)
    counter = iter(range(10**9))

    def dinoflow_step():
        return engine.train_step(batch_views, steps + next(counter) % steps, extras)["loss/total"]

    method_cfg = parse_config(method, section)
    torch.manual_seed(1)
    backbone = timm_backbone(make_encoder(spec, sizes["global_crop_size"]))
    backbone.train()
    base_step, what = BASELINES[method](backbone, method_cfg, cfg, encoder.embed_dim)
    views = [v.contiguous() for v in batch_views.views]
    base_counter = iter(range(10**9))

    targets = dict(batch_views.targets)

    def baseline_step():
        return base_step(views, next(base_counter), targets)

    shape = {"views": [list(v.shape[1:]) for v in batch_views.views], "batch": batch}
    return {"dinoflow": dinoflow_step, "baseline": baseline_step}, what, shape, asdict(method_cfg)


def views_label(shapes: list[list[int]]) -> str:
    """``[[3, 56, 56], [3, 56, 56], [3, 28, 28]]`` -> ``"2x56 + 1x28"`` (consecutive views of one size grouped)."""
    groups: list[list[int]] = []
    for shape in shapes:
        side = shape[-1]
        if groups and groups[-1][1] == side:
            groups[-1][0] += 1
        else:
            groups.append([1, side])
    return " + ".join(f"{n}x{side}" for n, side in groups)


def measure(sides: dict[str, Callable], warmup: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Step times per side: ``{"cpu": {side: [s, ...]}, "wall": {...}}`` (CPU time of this process and wall time).

    Warm-up steps first (untimed), then ``reps`` repetitions; the order of the sides flips every repetition."""
    for fn in sides.values():
        for _ in range(warmup):
            loss = fn()
            if not math.isfinite(loss):
                raise SystemExit(f"bench_methods: non-finite loss {loss} during warm-up")
    times: dict[str, dict[str, list[float]]] = {"cpu": {k: [] for k in sides}, "wall": {k: [] for k in sides}}
    names = list(sides)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            sides[k]()
            times["wall"][k].append(time.perf_counter() - t0)
            times["cpu"][k].append(time.process_time() - c0)
    return times


def write_markdown(result: dict[str, Any], path: Path) -> str:
    """The result table of a run (``result`` as written to the JSON) -> ``path``; returns the text."""
    mode, sizes, batch = result["mode"], result["sizes"], result["batch"]
    vit, cnn = result["backbones"]["vit"], result["backbones"]["cnn"]
    md = [f"# Training step per method: dinoflow engine vs lightly ({mode})", "",
          f"Command: `{result['command']}`" + (f"; table re-rendered from `{result['rendered_from']}` with "
                                               "`--render`  " if "rendered_from" in result else "  "),
          f"Backbones: ViT `{vit['arch']}` {vit['kwargs']}, CNN `{cnn['arch']}` {cnn['kwargs'] or '(timm default)'}; "
          f"batch {batch}; views per image as each method's view maker makes them (column `views`: count x px; "
          f"global crops {sizes['global_crop_size']} px, SwAV / DINO + {sizes['n_local_crops']} local crops of "
          f"{sizes['local_crop_size']} px), the same tensors on both sides; heads: each method's "
          f"{'quick-mode' if mode == 'quick' else 'default'} `methods.<name>` sizes on both sides; AdamW, "
          f"clip_grad 3.0 on both sides; CPU, {result['threads']} thread, {result['warmup']} warm-up step(s) per "
          f"side, {result['reps']} alternating repetitions; load average at the end {result['load_average_at_end']} "
          "on the shared 2-core machine.", "",
          "Times are the CPU time of this single-threaded process per step (`time.process_time`; on an idle machine "
          "it equals the wall time, on this shared one it is what the step itself costs, not the time slices other "
          "jobs take); median over the repetitions. `ratio` = dinoflow images/s / baseline images/s as the median "
          "of the paired per-repetition ratios (each pair measured back to back), with its 95% bootstrap interval "
          "over the repetitions; `ratio of medians` divides the two medians (the same quantity, unpaired: the two "
          "differ by the noise of the repetitions); >= 1.00 means dinoflow is at least as fast. Wall-clock: the "
          "paired ratio on wall time (all figures in the JSON).", "",
          "| method | backbone | views | baseline | dinoflow step (s) | baseline step (s) | dinoflow img/s | "
          "baseline img/s | ratio | 95% CI | ratio of medians | wall-clock ratio |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r["cpu"]
        ips = c["images_per_s"]
        md.append(f"| {r['method']} | {r['backbone']} | {views_label(r['shape']['views'])} | {r['baseline']} | "
                  f"{c['median_step_s']['dinoflow']:.3f} | {c['median_step_s']['baseline']:.3f} | "
                  f"{ips['dinoflow']:.1f} | {ips['baseline']:.1f} | {c['ratio']:.2f} | "
                  f"[{c['ratio_ci95'][0]:.2f}, {c['ratio_ci95'][1]:.2f}] | {ips['dinoflow'] / ips['baseline']:.2f} | "
                  f"{r['wall']['ratio']:.2f} |")
    md += ["", "Baseline of each method (lightly 1.6 parts, or a plain PyTorch step where lightly has none):", ""]
    md += [f"- {m}: {w}" for m, w in dict((r["method"], r["baseline_parts"]) for r in result["rows"]).items()]
    text = "\n".join(md) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small backbones, heads, crops and batch; 3 repetitions")
    ap.add_argument("--methods", nargs="*", default=None, help=f"default: all of {', '.join(BASELINES)}")
    ap.add_argument("--backbones", nargs="*", default=["vit", "cnn"], choices=["vit", "cnn"])
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 32; quick 8)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per side (default 9; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default 1)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only rewrite the .md table next to a results JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        result = dict(json.loads(src.read_text(encoding="utf-8")), rendered_from=src.name)
        print(write_markdown(result, src.with_suffix(".md")))
        return 0

    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    batch = args.batch or sizes["batch"]
    reps = args.reps or sizes["reps"]
    warmup = args.warmup if args.warmup is not None else sizes["warmup"]
    methods = args.methods or list(BASELINES)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise SystemExit(f"bench_methods: no baseline for {', '.join(unknown)} (known: {', '.join(BASELINES)})")
    from dinoflow.utils import write_json

    rows = []
    t_start = time.perf_counter()
    for method in methods:
        for kind in args.backbones:
            if kind != "vit" and method in VIT_ONLY:
                continue
            t0 = time.perf_counter()
            sides, what, shape, method_cfg = build_sides(method, kind, mode, batch, warmup + reps, None)
            times = measure(sides, warmup, reps)
            row = {"method": method, "backbone": kind, "arch": BACKBONES[mode][kind]["arch"],
                   "baseline": BASELINE_KIND[method], "baseline_parts": what, "shape": shape,
                   "method_config": method_cfg}
            for clock in ("cpu", "wall"):
                t = times[clock]
                med = {k: statistics.median(v) for k, v in t.items()}
                paired = [tb / td for td, tb in zip(t["dinoflow"], t["baseline"])]
                row[clock] = {"median_step_s": med, "images_per_s": {k: batch / v for k, v in med.items()},
                              "ratio": statistics.median(paired), "ratio_ci95": list(bootstrap_ci(paired)),
                              "step_times_s": t}
            c, w = row["cpu"], row["wall"]
            print(f"{method:>17} {kind}: cpu dinoflow {c['median_step_s']['dinoflow']:.3f}s baseline "
                  f"{c['median_step_s']['baseline']:.3f}s ratio {c['ratio']:.2f} [{c['ratio_ci95'][0]:.2f}, "
                  f"{c['ratio_ci95'][1]:.2f}]; wall ratio {w['ratio']:.2f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            rows.append(row)

    try:
        load = " / ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    except OSError:
        load = "n/a"
    name = "methods" + ("_quick" if args.quick else "")
    cmd = "OMP_NUM_THREADS=1 python benchmarks/bench_methods.py" + (" --quick" if args.quick else "") + \
        (f" --methods {' '.join(methods)}" if args.methods else "") + \
        (f" --backbones {' '.join(args.backbones)}" if args.backbones != ["vit", "cnn"] else "") + \
        (f" --batch {batch}" if args.batch else "") + (f" --reps {reps}" if args.reps else "") + \
        (f" --warmup {warmup}" if args.warmup is not None else "")
    result = {"command": cmd, "mode": mode, "engine_optimizer": "AdamW, fused kernel where supported (engine.adamw_implementation)",
              "baseline_optimizer": "AdamW, torch defaults", "batch": batch, "reps": reps,
              "warmup": warmup,
              "backbones": BACKBONES[mode], "sizes": sizes, "threads": torch.get_num_threads(),
              "platform": platform.platform(), "torch": torch.__version__, "load_average_at_end": load,
              "wall_s": time.perf_counter() - t_start, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    md = write_markdown(result, out / f"{name}.md")
    print(md)
    print(f"results -> {out / name}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
