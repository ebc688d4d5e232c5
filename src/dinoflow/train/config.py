"""Typed training configuration, parsed once at the train stage's entry from the validated params.

`TrainConfig` (params.yaml ``train``: what every method shares: epochs, batch, crops, optimizer and schedules,
AMP / compile / checkpointing, logging) and `FinetuneConfig` (``finetune``: head warm-up and the separate head /
backbone learning rates of models that start from trained weights). Defaults live in the JSON schema
(`dinoflow.config.with_defaults`); a method's own knobs live in ``methods.<name>`` and its ``Config`` dataclass
(`dinoflow.ssl.methods.base.parse_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dinoflow.config import with_defaults
from dinoflow.errors import DinoflowError


def _from_section(cls, section: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(n for n in names if n not in section)
    if missing:
        raise DinoflowError(f"params.yaml {where}: missing key(s) {', '.join(missing)}")
    values = {}
    for f in dataclasses.fields(cls):
        v = section[f.name]
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section (units: images, epochs, optimisation steps; lrs per 256 images)."""

    epochs: int
    batch_size: int
    num_workers: int
    global_crop_size: int
    local_crop_size: int
    n_local_crops: int
    global_crop_scale: tuple[float, float]
    local_crop_scale: tuple[float, float]
    lr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    clip_grad: float | None
    amp: bool
    compile: bool
    grad_checkpointing: bool
    log_every: int
    max_steps_per_epoch: int | None
    checkpoint_every: int
    evaluate_network: str      # auto (the method's choice) | teacher | student
    on_collapse: str           # warn | fail
    drift_images: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        if "train" not in params:
            raise DinoflowError("params.yaml: no `train:` section (needed by models that train)")
        return _from_section(cls, with_defaults(params)["train"], "train")

    def steps_per_epoch(self, n_images: int) -> int:
        """Whole global batches per epoch, capped by ``max_steps_per_epoch`` (CPU demos)."""
        n = n_images // self.batch_size
        if n < 1:
            raise DinoflowError(f"train.batch_size: {self.batch_size} is larger than the {n_images} images; "
                                "lower it")
        return min(n, self.max_steps_per_epoch) if self.max_steps_per_epoch else n


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``finetune`` section: heads train alone for ``head_warmup_epochs``, then the chosen blocks join with
    their own lr (``lr_backbone``, optional layer-wise decay ``layer_decay``); lrs per 256 images."""

    head_warmup_epochs: int
    lr_head: float
    lr_backbone: float
    layer_decay: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "FinetuneConfig":
        return _from_section(cls, with_defaults(params).get("finetune") or {}, "finetune")
