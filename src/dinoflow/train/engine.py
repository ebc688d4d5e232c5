"""The training engine: one readable loop for every self-supervised method (training, lr search and tests).

What the engine does, whatever the method (`dinoflow.ssl.methods.base.SSLMethod`):

1. data: a seeded permutation per epoch cut into global batches (`GlobalBatchSampler`); every image's views are
   seeded by (seed, epoch, image) (`ViewDataset`), batch-level randomness (iBOT masks) by (seed, epoch, global
   batch) and sliced per process, so a step depends only on (seed, epoch, step) and the saved state, and N
   processes compute the loss of the same global batch as one process;
2. per step, the schedules set lr (``lr`` for scratch models; ``lr_head`` / ``lr_backbone`` for fine-tunes),
   weight decay, the EMA momentum (methods with a momentum encoder) and the method's own values;
3. ``method(batch, ctx)`` (its ``training_step``; DDP-wrapped when several processes) under bf16 autocast when
   ``train.amp``; the returned terms are averaged over processes and logged;
4. backward, ``method.after_backward``, gradient clipping (head and backbone separately, as DINOv2), AdamW step
   (no weight decay on biases / norms / 1-d tensors; head vs backbone lr; DINOv2 layer-wise decay);
5. EMA: every (student, teacher) pair the method declares moves towards the student (frozen parameters stay
   bit-identical; buffers copied);
6. monitors (`dinoflow.train.monitors`): spread and RankMe of the embeddings the method returns, and the entropy
   of its teacher's targets when it has them; at the end, a collapse verdict over the last epoch (contract 2).

Fine-tunes (`init` not random): the backbone is frozen for ``finetune.head_warmup_epochs`` (heads warm up), then
the ``trainable`` blocks train with their own lr; BatchNorm statistics of the pretrained backbone are kept.

`fit` is a whole training run of a model: resume from ``paths.train_state`` (bit-exact), dvclive curves under
``paths.train_log_dir``, the collapse verdict (``train.on_collapse``: warn or fail) and the drift from the initial
weights (`dinoflow.train.drift`), the evaluated backbone (``train.evaluate_network``) saved with ``save_encoder``.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import has_running_statistics
from dinoflow.ssl.methods.base import (Batch, MethodSetup, SSLMethod, StepContext, ViewDataset, ViewSettings,
                                       build_method, collate_views)
from dinoflow.train import monitors
from dinoflow.train.config import FinetuneConfig, TrainConfig
from dinoflow.train.distributed import DistContext, all_reduce_mean, global_batchnorm
from dinoflow.train.schedules import cosine_schedule
from dinoflow.utils import get_logger

log = get_logger(__name__)

# Environment variable for tests and drills: end the process after this many steps *without* saving, as a kill.
STOP_AFTER_ENV = "DINOFLOW_STOP_AFTER_STEPS"


# ------------------------------------------------------------------------------------------------------- data
class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's slice of each global batch of an epoch (a seeded permutation cut into batches).

    Unlike `DistributedSampler` (which deals indices round-robin), the global batch does not depend on the
    number of processes, which is what makes N processes equivalent to one. `start_step` skips the batches a
    resumed run has already done without loading them.
    """

    def __init__(self, n_images: int, global_batch: int, steps_per_epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if global_batch % world_size:
            raise DinoflowError(f"train.batch_size ({global_batch}) must be divisible by the number of processes "
                                f"({world_size})")
        self.n, self.batch, self.steps, self.seed = n_images, global_batch, steps_per_epoch, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def global_batch(self, epoch: int, step: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[step * self.batch:(step + 1) * self.batch].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch // self.world
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(self.epoch, step)
            yield batch[self.rank * local:(self.rank + 1) * local]

    def __len__(self) -> int:
        return self.steps - self.start_step


def view_settings(cfg: TrainConfig, mean=None, std=None) -> ViewSettings:
    """Crop settings of the ``train`` section with the backbone's normalisation (timm data config)."""
    extra = {k: tuple(float(x) for x in v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    return ViewSettings(global_crop_size=cfg.global_crop_size, local_crop_size=cfg.local_crop_size,
                        n_local_crops=cfg.n_local_crops, global_crop_scale=tuple(cfg.global_crop_scale),
                        local_crop_scale=tuple(cfg.local_crop_scale), **extra)


#: device types PyTorch's fused AdamW kernel runs on (torch.optim.adamw: ``_get_fused_kernels_supported_devices``)
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw_implementation(groups: list[dict[str, Any]]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point tensor on a device type the fused AdamW kernel
    supports (one kernel per parameter list instead of a dozen element-wise passes; the optimizer step of the
    benchmark ViT 11.3 -> 3.0 ms, of ResNet-18 50 -> 35 ms, one CPU thread); else ``{"foreach": True}``
    (multi-tensor kernels).

    Both compute AdamW (Loshchilov & Hutter 2019) as ``torch.optim.AdamW`` documents; they may differ from the
    default loop in the last float bits (another order of the same operations), never in the algorithm. A run
    is bit-identical to itself (and to its resume) whichever is chosen, as the choice depends on the parameters
    only."""
    params = [p for g in groups for p in g["params"]]
    fused_ok = bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return {"fused": True} if fused_ok else {"foreach": True}


def sync_batchnorm_targets(method: SSLMethod) -> list[nn.Module]:
    """The modules whose BatchNorm layers become SyncBatchNorm in a scratch DDP run of a BatchNorm backbone: the
    student backbone and the teacher of every EMA pair, except the method's `SSLMethod.local_batchnorm` (MoCo v2's
    key encoder with shuffling BN keeps per-process statistics)."""
    local = {id(m) for m in method.local_batchnorm()}
    return [m for m in [method.backbone] + [t for _, t in method.ema_pairs()] if id(m) not in local]


def _set_batchnorm_eval(module: nn.Module) -> None:
    """Every layer with running statistics (`has_running_statistics`: BatchNorm, EvoNorm B, ...) in eval mode."""
    for m in module.modules():
        if has_running_statistics(m):
            m.eval()


def allow_any_input_size(encoder) -> None:
    """Let a timm ViT take other crop sizes too (positional embedding interpolated, as DINOv2).

    Equivalent to building it with `dynamic_img_size=True` (same weights); CNNs take any size already.
    """
    m = encoder.model
    if not encoder.is_vit or getattr(m, "dynamic_img_size", True):
        return
    from timm.layers import Format

    m.dynamic_img_size = True
    m.patch_embed.strict_img_size = False
    m.patch_embed.flatten = False
    m.patch_embed.output_fmt = Format.NHWC


# ------------------------------------------------------------------------------------------------ the engine
class Engine:
    """Optimizer, schedules, phases, DDP, AMP, clipping, EMA and the data pipeline around one `SSLMethod`.

    ``method``: built around its student backbone (`build_method`); ``images``: anything with ``__len__`` and
    ``get(i)`` or ``[i]`` (PIL images); ``trainable``: the backbone's spec (none / all / lastK) once it trains;
    ``finetune``: the fine-tune settings (None: a scratch run, one ``lr`` schedule for everything).
    ``cfg.lr`` / ``cfg.weight_decay`` are the peaks (per 256 images; scaled by the global batch, DINO's linear
    rule). `steps` iterates the run; `train_step` is one optimisation step.
    """

    def __init__(self, method: SSLMethod, images: Any, cfg: TrainConfig, *, seed: int, trainable: str = "all",
                 finetune: FinetuneConfig | None = None, ctx: DistContext | None = None):
        self.cfg, self.seed, self.images = cfg, int(seed), images
        self.ctx = ctx or DistContext(0, 1, 0, torch.device("cpu"))
        self.device = self.ctx.device
        self.epochs = cfg.epochs
        self.steps_per_epoch = cfg.steps_per_epoch(len(images))
        self.total_steps = self.epochs * self.steps_per_epoch
        self.trainable, self.ft = trainable, finetune
        self.head_warmup_epochs = finetune.head_warmup_epochs if finetune else 0
        if finetune and self.head_warmup_epochs >= self.epochs:
            raise DinoflowError(f"finetune.head_warmup_epochs ({self.head_warmup_epochs}) must be smaller than "
                                f"train.epochs ({self.epochs}) or the backbone never trains")

        # -- the method: trainable backbone, SyncBN over processes for scratch CNNs, DDP, compile
        self.method = method
        method.backbone.set_grad_checkpointing(cfg.grad_checkpointing)
        method.backbone.set_trainable(trainable)
        method.to(self.device)
        if self.ctx.enabled and not finetune and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                     for m in method.backbone.modules()):
            from timm.layers import convert_sync_batchnorm

            for module in sync_batchnorm_targets(method):
                convert_sync_batchnorm(module)
        if self.ctx.enabled:  # heads normalise over the global batch, as one process would
            local = {id(m) for m in method.local_batchnorm()}
            for name, child in method.named_children():
                if name != "backbone" and id(child) not in local:
                    global_batchnorm(child)
        # Parameters that ever train (heads + the `trainable` blocks); the frozen rest is not in the optimizer.
        self.train_names = [n for n, p in method.named_parameters() if p.requires_grad]
        self.model: nn.Module = method
        if self.ctx.enabled:
            # Fine-tunes toggle requires_grad (head warm-up), and methods may skip heads in some steps.
            self.model = DistributedDataParallel(
                method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True, broadcast_buffers=False)
        if cfg.compile:
            self.model = torch.compile(self.model)

        # -- optimizer and schedules
        groups = self._param_groups()
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, **adamw_implementation(groups))
        self.schedules = self._schedules()
        self.method_schedules = {k: np.asarray(v, dtype=np.float64)
                                 for k, v in method.schedules(self.epochs, self.steps_per_epoch).items()}
        for k, v in self.method_schedules.items():
            if len(v) != self.total_steps:
                raise DinoflowError(f"method {method.name}: schedule {k!r} has {len(v)} values for "
                                    f"{self.total_steps} steps")
        names = dict(method.named_parameters())
        train_ids = {id(names[n]) for n in self.train_names}
        self.head_params = [p for n, p in names.items() if not n.startswith("backbone.") and id(p) in train_ids]
        self.backbone_params = [p for n, p in names.items() if n.startswith("backbone.") and id(p) in train_ids]
        self.ema_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ema_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for student, teacher in method.ema_pairs():
            sp, tp = dict(student.named_parameters()), dict(teacher.named_parameters())
            if sp.keys() != tp.keys():
                raise DinoflowError(f"method {method.name}: an EMA pair's student and teacher differ in structure")
            self.ema_pairs += [(sp[k], tp[k]) for k in sp if id(sp[k]) in train_ids]
            self.ema_buffers += list(zip(student.buffers(), teacher.buffers()))

        self.evaluated()  # a teacher asked of a method without one fails now, not after training

        # -- data
        self.sampler = GlobalBatchSampler(len(images), cfg.batch_size, self.steps_per_epoch, self.seed,
                                          self.ctx.rank, self.ctx.world_size)
        self.dataset = ViewDataset(images, method.view_maker(), seed=self.seed)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                                  num_workers=cfg.num_workers, collate_fn=collate_views,
                                                  persistent_workers=False, pin_memory=torch.cuda.is_available())
        self.epoch = 0
        self.set_epoch(0)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def scale(self) -> float:
        return self.cfg.batch_size / 256.0

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases / norms / 1-d tensors; head vs backbone lr; layer-wise decay.

        Each group records which lr schedule it follows (``schedule``) and its multipliers (``lr_scale``,
        ``wd_scale``).
        """
        backbone = self.method.backbone
        layer_of: dict[str, int] = {}
        decay = self.ft.layer_decay if self.ft else 1.0
        n_layers = 0
        if decay != 1.0:
            stem, blocks, tail = backbone.block_groups()
            n_layers = len(blocks)
            layer_of.update({f"backbone.{n}": 0 for n in stem})
            # timm puts the final norm (ViT norm, CNN conv_head/bn2) in the last group; DINOv2 gives it the top lr.
            layer_of.update({f"backbone.{n}": i + 1 if ".blocks." in n else n_layers + 1
                             for i, b in enumerate(blocks) for n in b})
            layer_of.update({f"backbone.{n}": n_layers + 1 for n in tail})
        groups: dict[tuple, dict[str, Any]] = {}
        train = set(self.train_names)
        for name, p in self.method.named_parameters():
            if name not in train:
                continue
            is_head = not name.startswith("backbone.")
            schedule = "lr" if not self.ft else ("lr_head" if is_head else "lr_backbone")
            wd_scale = 0.0 if (p.ndim <= 1 or name.endswith(".bias")) else 1.0
            # DINOv2: lr * decay ** (n_layers + 1 - layer); the stem gets the smallest lr, the final norm 1.
            lr_scale = 1.0 if is_head or decay == 1.0 else decay ** (n_layers + 1 - layer_of.get(name, n_layers + 1))
            key = (schedule, wd_scale, lr_scale)
            groups.setdefault(key, {"params": [], "schedule": schedule, "wd_scale": wd_scale, "lr_scale": lr_scale})
            groups[key]["params"].append(p)
        if not groups:
            raise DinoflowError(f"method {self.method.name}: nothing to train (no parameter requires gradients)")
        return list(groups.values())

    def _schedules(self) -> dict[str, np.ndarray]:
        c, e, n = self.cfg, self.epochs, self.steps_per_epoch
        warmup = min(float(c.warmup_epochs), e)
        s = {"wd": cosine_schedule(c.weight_decay, c.weight_decay_end, e, n)}
        if self.method.momentum is not None:
            m0, m1 = self.method.momentum
            s["momentum"] = cosine_schedule(float(m0), float(m1), e, n)
        if not self.ft:
            s["lr"] = cosine_schedule(c.lr * self.scale, c.min_lr, e, n, warmup)
        else:
            s["lr_head"] = cosine_schedule(self.ft.lr_head * self.scale, c.min_lr, e, n, warmup)
            # The backbone is frozen during the head warm-up; its own warm-up + cosine fills the remaining epochs.
            h = self.head_warmup_epochs
            rest = cosine_schedule(self.ft.lr_backbone * self.scale, c.min_lr, e - h, n, min(warmup, e - h))
            s["lr_backbone"] = np.concatenate([np.zeros(h * n), rest])
        return s

    # ------------------------------------------------------------------ phases
    @property
    def phase(self) -> str:
        if not self.ft:
            return "train"
        return "head_warmup" if self.epoch < self.head_warmup_epochs else "backbone"

    def set_epoch(self, epoch: int) -> None:
        """Fine-tunes: backbone frozen during the head warm-up epochs, the chosen blocks train afterwards."""
        self.epoch = int(epoch)
        if self.ft:
            self.method.backbone.set_trainable(self.trainable if self.phase == "backbone" else "none")
        self.method.train()
        if not self.ft:  # teachers too: their BatchNorm layers use batch statistics, as MoCo / BYOL / DINO run them
            for _, teacher in self.method.ema_pairs():  # (Encoder.train keeps BN without trainable params in eval)
                for module in teacher.modules():
                    if has_running_statistics(module):
                        module.train()
        if self.ft:  # small batches: keep the pretrained BN statistics of the backbone and its EMA copies
            _set_batchnorm_eval(self.method.backbone)
            for student, teacher in self.method.ema_pairs():
                if student is self.method.backbone:
                    _set_batchnorm_eval(teacher)

    def batch_extras(self, global_indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        """The method's batch-level randomness for the global batch, seeded by (seed, epoch, indices); this
        process's rows."""
        rng = np.random.default_rng([self.seed, int(epoch), *map(int, global_indices)])
        extras = self.method.batch_extras(len(global_indices), rng)
        local = len(global_indices) // self.ctx.world_size
        out = {}
        for k, v in extras.items():
            if v.shape[0] != len(global_indices):
                raise DinoflowError(f"method {self.method.name}: batch_extras[{k!r}] has {v.shape[0]} rows for a "
                                    f"global batch of {len(global_indices)}")
            out[k] = v[self.ctx.rank * local:(self.ctx.rank + 1) * local]
        return out

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Batch, it: int, extras: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimisation step at global step ``it``; returns the logged values (averaged over processes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedules[group["schedule"]][it]) * group["lr_scale"]
            group["weight_decay"] = float(self.schedules["wd"][it]) * group["wd_scale"]
        values = {k: float(v[it]) for k, v in self.method_schedules.items()}
        if "momentum" in self.schedules:
            values["momentum"] = float(self.schedules["momentum"][it])
        for name in ("lr", "lr_head", "lr_backbone", "wd"):
            if name in self.schedules:
                values[name] = float(self.schedules[name][it])
        ctx = StepContext(step=it, epoch=self.epoch, total_steps=self.total_steps, values=values, dist=self.ctx,
                          phase=self.phase)
        batch = batch.to(self.device, non_blocking=True)
        if extras:
            batch.extras = {k: v.to(self.device) for k, v in extras.items()}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.amp else nullcontext()
        with amp:
            out = dict(self.model(batch, ctx))
        if "loss" not in out:
            raise DinoflowError(f"method {self.method.name}: training_step returned no 'loss'")
        loss = out.pop("loss")
        embeddings, targets = out.pop("embeddings", None), out.pop("targets", None)
        logged = self._process_mean({**out, "loss/total": loss})
        if not math.isfinite(logged["loss/total"]):
            lr = self.optimizer.param_groups[0]["lr"]
            raise DinoflowError(
                f"training diverged: loss is {logged['loss/total']} at step {it} (epoch {self.epoch}, method "
                f"{self.method.name}; {', '.join(f'{k}={v:.4g}' for k, v in logged.items())}; lr={lr:.3g})."
                " Lower train.lr (or finetune.lr_*) or raise train.clip_grad / warmup_epochs")

        loss.backward()
        self.method.after_backward(ctx)
        clip = self.cfg.clip_grad
        norms = {}
        for part, plist in (("head", self.head_params), ("backbone", self.backbone_params)):
            with_grad = [p for p in plist if p.grad is not None]
            if with_grad:
                norms[part] = float(nn.utils.clip_grad_norm_(with_grad, float(clip) if clip else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        # EMA: only the parameters that changed this step (frozen ones stay bit-identical); buffers copied.
        if self.ema_pairs:
            with torch.no_grad():
                m = values["momentum"]
                moved = [(s, t) for s, t in self.ema_pairs if s.requires_grad]
                if moved:
                    torch._foreach_lerp_([t for _, t in moved], [s for s, _ in moved], 1.0 - m)
                for sb, tb in self.ema_buffers:
                    tb.copy_(sb)

        if embeddings is not None:
            logged.update(self._monitors(embeddings, targets))
        logged.update({k if k in ("lr", "wd", "momentum") else ("lr/" + k[3:] if k.startswith("lr_") else k): v
                       for k, v in values.items()})
        logged.update({f"grad_norm/{k}": v for k, v in norms.items()})
        if self.ft:  # the two phases' curves, as the fine-tune figure overlays them
            logged["finetune/head_loss" if self.phase == "head_warmup" else "finetune/backbone_loss"] = \
                logged["loss/total"]
        return logged

    # ------------------------------------------------------------------ monitors and the evaluated network
    def _monitors(self, embeddings: torch.Tensor, targets: torch.Tensor | None) -> dict[str, float]:
        """Collapse monitors of this step (`dinoflow.train.monitors`), averaged over processes: with targets
        (DINO-style teachers) `teacher/entropy`, `teacher/entropy_fraction`, `teacher/std`, `teacher/rankme`;
        without, `<network>/std` and `<network>/rankme` of the method's embeddings. Also records what the verdict
        needs (rows per process, embedding dimension, log K) in `self.monitor_meta`."""
        if targets is not None:
            values = monitors.teacher_monitors(targets, embeddings)
            self.monitor_meta = {"log_k": math.log(targets.shape[-1]) if targets.shape[-1] > 1 else 1.0}
        else:
            net = self.method.evaluated_network
            values = {f"{net}/{k}": v for k, v in monitors.embedding_monitors(embeddings).items()}
            self.monitor_meta = {}
        self.monitor_meta.update(n_samples=int(embeddings.shape[0]), embed_dim=int(embeddings.shape[-1]))
        return self._process_mean(values)

    def _process_mean(self, values: dict[str, Any]) -> dict[str, float]:
        """0-d tensors / numbers -> their means over processes as Python floats, in one all-reduce of a stacked
        vector and one device-to-host copy (not one all-reduce and one synchronisation per value)."""
        if not values:
            return {}
        stacked = torch.stack([torch.as_tensor(v).detach().to(self.device, torch.float32).reshape(())
                               for v in values.values()])
        return dict(zip(values, all_reduce_mean(stacked).tolist()))

    def verdict(self, history: list[dict[str, float]]) -> dict[str, Any] | None:
        """Contract 2's collapse verdict over the monitors of `history` (the steps of the last epoch); None when
        the method returned no embeddings to watch."""
        if not history:
            return None
        meta = history[-1]
        if "teacher/entropy" in meta:
            return monitors.collapse_verdict(**monitors.summarise(history), log_k=meta["_log_k"],
                                             embed_dim=int(meta["_embed_dim"]), n_samples=int(meta["_n_samples"]))
        net = self.method.evaluated_network
        if f"{net}/std" not in meta:
            return None
        mean = {k: float(np.mean([h[f"{net}/{k}"] for h in history])) for k in monitors.EMBEDDING_KEYS}
        return monitors.embedding_verdict(mean["std"], mean["rankme"], int(meta["_embed_dim"]),
                                          int(meta["_n_samples"]))

    def history_entry(self, values: dict[str, float]) -> dict[str, float]:
        """What the verdict keeps of one step: the monitors and their context (n, D, log K)."""
        keep = {k: v for k, v in values.items()
                if k in monitors.MONITOR_KEYS or k.endswith(("/std", "/rankme")) or k == "teacher/entropy_fraction"}
        keep.update({f"_{k}": float(v) for k, v in getattr(self, "monitor_meta", {}).items()})
        return keep

    def evaluated(self) -> tuple[str, Any]:
        """(network name, backbone) saved as the model: `train.evaluate_network` (auto: the method's choice)."""
        choice = self.cfg.evaluate_network
        if choice == "auto":
            return self.method.evaluated_network, self.method.exported_backbone()
        if choice == "student":
            return "student", self.method.backbone
        teacher = self.method.ema_backbone()
        if teacher is None:
            raise DinoflowError(f"train.evaluate_network: teacher, but method {self.method.name!r} has no teacher "
                                "(no EMA copy of the backbone); use auto or student")
        return "teacher", teacher

    # ------------------------------------------------------------------ the loop
    def steps(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, float]]]:
        """Run steps ``start`` .. ``stop`` (default: the end of the run); yields (global step, logged values)."""
        n = self.steps_per_epoch
        stop = self.total_steps if stop is None else min(stop, self.total_steps)
        for epoch in range(start // n, self.epochs):
            first = start - epoch * n if epoch == start // n else 0
            self.set_epoch(epoch)
            self.sampler.set_epoch(epoch, first)
            self.dataset.set_epoch(epoch)
            for step, batch in enumerate(self.loader, start=first):
                it = epoch * n + step
                if it >= stop:
                    return
                extras = self.batch_extras(self.sampler.global_batch(epoch, step), epoch)
                yield it, self.train_step(batch, it, extras)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class RunSpec:
    """What one model's training is, parsed once: method name and its section, trainable spec, fine-tune or
    not, the typed configs, and the lr overrides from the lr search."""

    method: str
    method_section: dict[str, Any]
    trainable: str
    train: TrainConfig
    finetune: FinetuneConfig | None
    seed: int


def make_engine(spec: RunSpec, encoder, images: Any, ctx: DistContext | None = None) -> Engine:
    """Build the method around ``encoder`` (seeded heads) and its engine."""
    ctx = ctx or DistContext(0, 1, 0, torch.device("cpu"))
    allow_any_input_size(encoder)
    data = encoder.data_config
    setup = MethodSetup(views=view_settings(spec.train, data["mean"], data["std"]), seed=spec.seed,
                        epochs=spec.train.epochs, steps_per_epoch=spec.train.steps_per_epoch(len(images)),
                        world_size=ctx.world_size, finetune=spec.finetune is not None)
    with torch.random.fork_rng(devices=[]):  # heads' initial weights: the same whatever ran before
        torch.manual_seed(spec.seed)
        method = build_method(spec.method, encoder, spec.method_section, setup)
    return Engine(method, images, spec.train, seed=spec.seed, trainable=spec.trainable, finetune=spec.finetune,
                  ctx=ctx)


def with_lr(cfg: TrainConfig, lr: float | None = None, weight_decay: float | None = None) -> TrainConfig:
    """``cfg`` with the lr search's values (None keeps the configured one)."""
    changes = {k: float(v) for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    return replace(cfg, **changes)


# ------------------------------------------------------------------------------------------------ a whole run
def _trim_dvclive(log_dir: Path, step: int) -> None:
    """Drop logged rows at or after `step`: a killed run logged steps that the resumed run repeats."""
    import pandas as pd

    for tsv in (log_dir / "plots" / "metrics").rglob("*.tsv"):
        df = pd.read_csv(tsv, sep="\t")
        if "step" in df.columns:
            df[df["step"] < step].to_csv(tsv, sep="\t", index=False)


def fit(engine: Engine, model_name: str, info: dict[str, Any], run_hash: str, *, state_path: str | Path,
        log_dir: str | Path, weights_path: str | Path, extra_info: dict[str, Any] | None = None,
        initial=None):
    """Train ``engine`` to the end as model ``model_name``, resuming from ``state_path`` when it was saved with
    the same ``run_hash``; curves to ``log_dir`` (dvclive); the evaluated backbone + info to ``weights_path``.

    info.json gains (contract 2) ``evaluated_network``, ``collapse`` (the verdict over the last epoch's monitors)
    and ``drift`` (median cosine between ``initial``'s and the final embeddings; None without ``initial``).
    Returns the evaluated backbone. Raises DinoflowError when the loss diverges, or when the verdict is a collapse
    and ``train.on_collapse`` is fail (weights not saved).
    """
    from dvclive import Live

    from dinoflow.models.factory import save_encoder
    from dinoflow.train import checkpoint
    from dinoflow.train.drift import embedding_drift

    ctx, cfg, n_steps = engine.ctx, engine.cfg, engine.steps_per_epoch
    state_path, log_dir = Path(state_path), Path(log_dir)
    start = 0
    history: list[dict[str, float]] = []  # collapse monitors of the steps of the current epoch
    state = checkpoint.load_state(state_path)
    if state is not None and state.get("run_hash") != run_hash:
        log.warning("%s: saved for other parameters; training %s from the start", state_path, model_name)
        state = None
    if state is not None:
        engine.load_state_dict(state["engine"])
        checkpoint.set_rng_states(state["rng"])
        start = int(state["step"])
        history = list(state["monitors"])
        log.info("%s: resuming at step %d of %d (epoch %d)", model_name, start, engine.total_steps,
                 start // n_steps)

    def save(step: int) -> None:
        if ctx.is_main:
            checkpoint.save_state(state_path, {"engine": engine.state_dict(), "rng": checkpoint.rng_states(),
                                               "step": step, "epoch": step // n_steps, "run_hash": run_hash,
                                               "monitors": history,
                                               "data_order": {"seed": engine.seed, "steps_per_epoch": n_steps,
                                                              "global_batch": cfg.batch_size}})

    live = None
    if ctx.is_main:
        if start == 0 and log_dir.exists():
            import shutil

            shutil.rmtree(log_dir)  # a fresh run: no stale curves from an earlier one
        if start > 0:
            _trim_dvclive(log_dir, start)
        live = Live(str(log_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    network, _ = engine.evaluated()
    log.info("%s: %s %s, %d epochs x %d steps, global batch %d, %d process(es), trainable=%s, evaluated: %s",
             model_name, engine.method.name, "fine-tune" if engine.ft else "from scratch", engine.epochs, n_steps,
             cfg.batch_size, ctx.world_size, engine.trainable, network)
    from tqdm.auto import tqdm

    last: dict[str, float] = {}
    t0, done = time.time(), 0
    bar = tqdm(total=engine.total_steps, initial=start, desc=f"train {model_name}", disable=not ctx.is_main)
    for it, last in engine.steps(start):
        if it % n_steps == 0:
            history = []
        history.append(engine.history_entry(last))
        done += 1
        if live is not None and it % cfg.log_every == 0:
            live.step = it
            for k, v in last.items():
                live.log_metric(k, v)
            live.next_step()
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss/total']:.4f}")
        if stop_after and done >= stop_after:
            bar.close()
            log.warning("%s: stopping after %d steps (%s), without saving, as a kill would", model_name, done,
                        STOP_AFTER_ENV)
            return engine.evaluated()[1]
        if (it + 1) % n_steps == 0 or (it + 1) % cfg.checkpoint_every == 0:
            save(it + 1)
        if (it + 1) % n_steps == 0:
            verdict = engine.verdict(history)
            if verdict is not None and verdict["verdict"] != "healthy":
                log.warning("%s epoch %d: %s (%s)", model_name, it // n_steps, verdict["verdict"], verdict["reason"])
    bar.close()
    elapsed = time.time() - t0
    verdict = engine.verdict(history)  # the last epoch's (also after a resume with nothing left to do)
    network, backbone = engine.evaluated()
    if ctx.is_main:
        if verdict is not None and verdict["verdict"] != "healthy" and cfg.on_collapse == "fail":
            if live is not None:
                live.end()
            raise DinoflowError(f"model {model_name}: {verdict['verdict']} after training ({verdict['reason']}); "
                                f"weights not saved (train.on_collapse: fail). Curves: {log_dir}")
        drift = (embedding_drift(initial, backbone, engine.images, cfg.drift_images, engine.seed)
                 if initial is not None else None)
        info = dict(info, evaluated_network=network, collapse=verdict, drift=drift,
                    train={"method": engine.method.name, "epochs": engine.epochs, "steps": engine.total_steps,
                           "steps_per_epoch": n_steps, "global_batch": cfg.batch_size,
                           "processes": ctx.world_size, "final_loss": last.get("loss/total"),
                           "images_per_s_this_run": round(done * cfg.batch_size / max(elapsed, 1e-9), 2),
                           **(extra_info or {})})
        save_encoder(backbone, weights_path, info)
        if live is not None:
            if verdict is not None:
                live.summary["collapse"] = {k: v for k, v in verdict.items() if k != "reason"}
            if drift is not None:
                live.summary["drift"] = {"median_cosine": drift["median_cosine"], "ci95": drift["ci95"]}
            live.end()
        if verdict is not None:
            log.info("%s: collapse verdict %s (%s)", model_name, verdict["verdict"], verdict["reason"])
        if drift is not None:
            log.info("%s: median cosine to the initial embeddings %.4f [%.4f, %.4f] over %d images", model_name,
                     drift["median_cosine"], *drift["ci95"], drift["n_images"])
        log.info("%s: %s backbone -> %s; curves -> %s; state -> %s", model_name, network, weights_path, log_dir,
                 state_path)
    return backbone
