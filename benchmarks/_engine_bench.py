"""Shared set-up of the training benchmarks: an engine of a params.yaml model's architecture and one batch of its
views made once from random images (so data loading is not timed)."""

from __future__ import annotations

import copy

import torch
from PIL import Image


def random_images(n: int, size: int = 128, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy())
            for _ in range(n)]


def engine_and_batch(params: dict, method: str, batch: int, device: torch.device, section: dict | None = None,
                     model: str = "scratch"):
    """(engine, batch, extras) of `method` on the architecture of `model` (`backbone`), trained from scratch with
    a global batch of `batch` images; `section` overrides `methods.<method>`."""
    from dinoflow.models.factory import create_encoder
    from dinoflow.ssl.methods.base import collate_views
    from dinoflow.train.distributed import DistContext
    from dinoflow.train.engine import make_engine
    from dinoflow.train.run import run_spec

    p = copy.deepcopy(params)
    p["train"].update(batch_size=batch, max_steps_per_epoch=None, epochs=1000, warmup_epochs=0)
    p.setdefault("methods", {})[method] = {**(p.get("methods", {}).get(method) or {}), **(section or {})}
    for m in p["models"]:
        if m["name"] == model:
            m.update(method=method, init="random", trainable="all")
    torch.manual_seed(0)
    encoder, _ = create_encoder(p, model)
    images = random_images(batch)
    engine = make_engine(run_spec(p, model), encoder, images, DistContext(0, 1, 0, device))
    engine.set_epoch(0)
    data = collate_views([engine.dataset[i] for i in range(batch)])
    extras = engine.batch_extras(list(range(batch)), 0)
    return engine, data, extras
