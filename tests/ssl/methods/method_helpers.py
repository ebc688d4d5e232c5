"""Tiny backbones, images and engines for the method tests (img 28-32, depth 2, a few steps)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dinoflow.models.encoder import Encoder
from dinoflow.train.config import TrainConfig
from dinoflow.train.engine import RunSpec, make_engine

# Small heads for every method (the defaults are sized for real runs).
SMALL = {
    "simclr": {"hidden_dim": 64, "out_dim": 32},
    "moco_v2": {"hidden_dim": 64, "out_dim": 32, "queue_size": 64, "momentum": 0.9},
    "moco_v3": {"hidden_dim": 64, "out_dim": 32, "momentum": 0.9},
    "byol": {"hidden_dim": 64, "out_dim": 32, "momentum": 0.9},
    "simsiam": {"hidden_dim": 64, "out_dim": 64, "pred_hidden_dim": 32},
    "barlow_twins": {"hidden_dim": 64, "out_dim": 64},
    "vicreg": {"hidden_dim": 64, "out_dim": 64},
    "swav": {"hidden_dim": 64, "out_dim": 32, "n_prototypes": 16, "queue_size": 16, "freeze_prototypes_epochs": 0},
    "dinov2": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "momentum": 0.9, "freeze_last_layer_epochs": 0,
               "warmup_teacher_temp_epochs": 0},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "momentum": 0.9, "freeze_last_layer_epochs": 0},
}


def tiny_encoder(kind: str) -> Encoder:
    torch.manual_seed(0)
    if kind == "vit":
        enc = Encoder("vit_small_patch14_dinov2", 28, {"embed_dim": 32, "depth": 2, "num_heads": 2})
        with torch.no_grad():
            # timm's ViT init (std 0.02) maps every image to almost the same CLS token; Xavier weights let the
            # image content reach it, so a few steps can show learning (as tests/train/train_helpers.py does).
            for m in enc.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    torch.nn.init.xavier_uniform_(m.weight)
        return enc
    return Encoder("test_efficientnet", 28)


def tiny_images(root: Path, n: int = 16) -> list:
    from dinoflow.data.synthetic import make_tiny_collection

    collection = make_tiny_collection(root / "collection", n=n, size=48)
    return [Image.open(p).convert("RGB") for p in sorted(Path(collection["images_dir"]).glob("*.png"))]


def tiny_train_config(**changes) -> TrainConfig:
    values = dict(epochs=2, batch_size=8, num_workers=0, global_crop_size=28, local_crop_size=14, n_local_crops=2,
                  global_crop_scale=(0.5, 1.0), local_crop_scale=(0.2, 0.5), lr=0.01, min_lr=1e-6, warmup_epochs=0,
                  weight_decay=0.0, weight_decay_end=0.0, clip_grad=3.0, amp=False, compile=False,
                  grad_checkpointing=False, log_every=1, max_steps_per_epoch=None, checkpoint_every=100,
                  evaluate_network="auto", on_collapse="warn", drift_images=8)
    values.update(changes)
    return TrainConfig(**values)


def tiny_engine(method: str, kind: str, images: list, section: dict | None = None, ctx=None, **train):
    spec = RunSpec(method=method, method_section={**SMALL.get(method, {}), **(section or {})}, trainable="all",
                   train=tiny_train_config(**train), finetune=None, seed=0)
    return make_engine(spec, tiny_encoder(kind), images, ctx=ctx)
