"""DINOv2-style self-distillation, readable end to end: `train(params, model)` is the whole loop.

One step (`DinoTrainer.train_step`, shared with the learning-rate search):

1. schedules set this step's lr, weight decay, teacher momentum and teacher temperature;
2. the teacher (an EMA of the student, no gradients) sees the 2 global crops: CLS logits, and for ViTs the logits
   of the patch tokens that the student will see masked;
3. the student sees the global crops with iBOT masks and the local crops;
4. loss = DINO CLS loss (teacher centred or Sinkhorn-Knopp, every teacher view against every other student view)
   + iBOT masked-patch loss (ViTs) + KoLeo on the student's global CLS tokens;
5. backward; the prototypes (head last layer) stay frozen for `freeze_last_layer_epochs`; gradients are clipped
   (backbone and head separately, as DINOv2); AdamW steps; the teacher moves towards the student.

Scratch models train everything at `train.lr` (or the lr search's best). Fine-tunes (`init` not random) first
warm up fresh heads with the backbone frozen (`finetune.head_warmup_epochs`), then train the chosen blocks
(`trainable: lastK`) with their own lr (`finetune.lr_backbone`, optional layer-wise decay).

Determinism and resume: the data order is a seeded permutation per epoch, crops are seeded by (seed, epoch, image)
and masks by (seed, epoch, global batch), so a step depends only on (seed, epoch, step) and the saved state.
Several processes (torchrun) each take a slice of the same global batch, so N processes compute the same loss as
one process with the same global batch.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dinoflow import paths
from dinoflow.config import model_config, params_hash
from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.ssl.augment import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from dinoflow.ssl.heads import DINOHead, cancel_last_layer_gradients
from dinoflow.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinoflow.ssl.masking import MaskingGenerator, sample_masks
from dinoflow.train import checkpoint, monitors
from dinoflow.train.drift import embedding_drift
from dinoflow.train.distributed import DistContext, all_gather_with_grad, all_reduce_mean, init_distributed
from dinoflow.train.schedules import cosine_schedule, teacher_temp_schedule
from dinoflow.utils import get_logger, read_json, seed_everything

log = get_logger(__name__)

# Environment variable for tests and drills: end the process after this many steps *without* saving, as a kill.
STOP_AFTER_ENV = "DINOFLOW_STOP_AFTER_STEPS"
DEFAULT_CHECKPOINT_EVERY = 100


# ------------------------------------------------------------------------------------------------ the networks
class DinoNet(nn.Module):
    """Backbone + DINO head: what the student and the teacher both are.

    The head is shared by the CLS token (DINO loss) and the masked patch tokens (iBOT loss), as DINOv2's default;
    both go through it in one call.
    """

    def __init__(self, backbone: Encoder, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, hide_masked: bool = True) -> dict[str, torch.Tensor | None]:
        """Head logits of the global CLS tokens, of the patch tokens at `masks`, and of the local CLS tokens.

        The student hides the masked patches (`hide_masked`); the teacher sees them and gives the targets there.
        """
        g = self.backbone.forward_tokens(global_crops, masks if hide_masked else None)
        n_cls = g["cls"].shape[0]
        tokens = [g["cls"]]
        if masks is not None:
            tokens.append(g["patch"].flatten(0, 1)[masks.flatten()])
        logits = self.head(torch.cat(tokens))
        out: dict[str, torch.Tensor | None] = {"cls": g["cls"], "global_logits": logits[:n_cls],
                                                "patch_logits": logits[n_cls:] if masks is not None else None,
                                                "local_logits": None}
        if local_crops is not None:
            out["local_logits"] = self.head(self.backbone.forward_tokens(local_crops)["cls"])
        return out


def allow_any_input_size(encoder: Encoder) -> None:
    """Let a timm ViT take the local crops' size too (positional embedding interpolated, as DINOv2).

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


def _set_batchnorm_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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


def steps_per_epoch(n_images: int, train: dict[str, Any]) -> int:
    """Whole global batches per epoch, capped by `train.max_steps_per_epoch` (CPU demos)."""
    n = n_images // int(train["batch_size"])
    if n < 1:
        raise DinoflowError(f"train.batch_size: {train['batch_size']} is larger than the {n_images} images; "
                            "lower it")
    cap = train.get("max_steps_per_epoch")
    return min(n, int(cap)) if cap else n


def make_loader(images: Any, augmentation: MultiCropAugmentation, sampler: GlobalBatchSampler, seed: int,
                num_workers: int) -> tuple[torch.utils.data.DataLoader, MultiCropDataset]:
    """DataLoader of (crops, indices) batches; masks are added per global batch in the loop, not here."""
    dataset = MultiCropDataset(images, augmentation, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=partial(collate_multicrop, n_global_crops=2),
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    return loader, dataset


# ------------------------------------------------------------------------------------------------ the trainer
class DinoTrainer:
    """Student, EMA teacher, losses, optimizer and per-step schedules; `train_step` is one optimisation step."""

    def __init__(self, params: dict[str, Any], encoder: Encoder, *, trainable: str, finetune: bool,
                 epochs: int, steps_per_epoch: int, ctx: DistContext | None = None,
                 lr: float | None = None, weight_decay: float | None = None, teacher_temp: float | None = None):
        self.params, self.t = params, dict(params["train"])
        self.ctx = ctx or DistContext(0, 1, 0, torch.device("cpu"))
        self.device = self.ctx.device
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.trainable, self.finetune = trainable, finetune
        self.ft = dict(params.get("finetune") or {}) if finetune else {}
        self.head_warmup_epochs = int(self.ft.get("head_warmup_epochs", 0)) if finetune else 0
        if self.head_warmup_epochs >= self.epochs:
            raise DinoflowError(f"finetune.head_warmup_epochs ({self.head_warmup_epochs}) must be smaller than "
                                f"train.epochs ({self.epochs}) or the backbone never trains")
        t = self.t
        self.use_ibot = encoder.is_vit and float(t["ibot_loss_weight"]) > 0
        self.global_size = int(t["global_crop_size"])
        if self.use_ibot and self.global_size % encoder.patch_size:
            raise DinoflowError(f"train.global_crop_size ({self.global_size}) must be a multiple of the patch size "
                                f"({encoder.patch_size}) for iBOT masks")

        # -- student and teacher: same weights at the start; the teacher never gets gradients
        allow_any_input_size(encoder)
        encoder.set_grad_checkpointing(bool(t.get("grad_checkpointing", False)))
        head = DINOHead(encoder.embed_dim, int(t["out_dim"]), int(t["head_hidden_dim"]),
                        int(t["head_bottleneck_dim"]))
        self.student = DinoNet(encoder, head).to(self.device)
        encoder.set_trainable(trainable)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        if self.ctx.enabled and not finetune and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                     for m in encoder.modules()):
            from timm.layers import convert_sync_batchnorm

            self.student = convert_sync_batchnorm(self.student)
        # Parameters that ever train (heads + the `trainable` blocks); the frozen rest is not in the optimizer.
        self.train_names = [n for n, p in self.student.named_parameters() if p.requires_grad]
        self.student_ddp: nn.Module = self.student
        if self.ctx.enabled:
            # Fine-tunes toggle requires_grad (head warm-up) so DDP must tolerate parameters without gradients.
            self.student_ddp = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=finetune, )
        self.forward = torch.compile(self.student_ddp) if t.get("compile") else self.student_ddp

        # -- losses
        centering = t.get("centering", "centering")
        self.dino_loss = DINOLoss(int(t["out_dim"]), float(t["student_temp"]), centering=centering).to(self.device)
        self.ibot_loss = iBOTPatchLoss(int(t["out_dim"]), float(t["student_temp"]),
                                       centering=centering).to(self.device)
        self.koleo_loss = KoLeoLoss()
        self.mask_generator = None
        if self.use_ibot:
            grid = self.global_size // encoder.patch_size
            self.mask_generator = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)

        # -- optimizer and schedules
        self.base = self._base_values(lr, weight_decay, teacher_temp)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=0.0, weight_decay=0.0)
        self.schedules = self._schedules()
        self.backbone_params = [p for n, p in self.student.named_parameters()
                                if n.startswith("backbone.") and n in self.train_names]
        self.head_params = [p for n, p in self.student.named_parameters()
                            if n.startswith("head.") and n in self.train_names]
        self.ema_pairs = [(s, tp) for (n, s), (_, tp) in zip(self.student.named_parameters(),
                                                             self.teacher.named_parameters())
                          if n in self.train_names]
        self.epoch = 0
        self.set_epoch(0)

    # ------------------------------------------------------------------ set-up helpers
    def _base_values(self, lr: float | None, weight_decay: float | None, teacher_temp: float | None) -> dict:
        """Peak values: lrs per 256 images scaled by the global batch (DINO's linear scaling rule)."""
        t, scale = self.t, int(self.t["batch_size"]) / 256.0
        base = {"lr": (lr if lr is not None else float(t["lr"])) * scale,
                "weight_decay": weight_decay if weight_decay is not None else float(t["weight_decay"]),
                "teacher_temp": teacher_temp if teacher_temp is not None else float(t["teacher_temp"])}
        if self.finetune:
            base["lr_head"] = float(self.ft["lr_head"]) * scale
            base["lr_backbone"] = float(self.ft["lr_backbone"]) * scale
        return base

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases / norms / 1-d tensors; head vs backbone lr; layer-wise decay.

        Each group records which lr schedule it follows (`schedule`) and its multipliers (`lr_scale`, `wd_scale`).
        """
        backbone: Encoder = self.student.backbone
        layer_of: dict[str, int] = {}
        decay = float(self.ft.get("layer_decay", 1.0)) if self.finetune else 1.0
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
        for name, p in self.student.named_parameters():
            if name not in self.train_names:
                continue
            is_head = name.startswith("head.")
            schedule = "lr" if not self.finetune else ("lr_head" if is_head else "lr_backbone")
            wd_scale = 0.0 if (p.ndim <= 1 or name.endswith(".bias")) else 1.0
            # DINOv2: lr * decay ** (n_layers + 1 - layer); the stem gets the smallest lr, the final norm 1.
            lr_scale = 1.0 if is_head or decay == 1.0 else decay ** (n_layers + 1 - layer_of.get(name, n_layers + 1))
            key = (schedule, wd_scale, lr_scale)
            groups.setdefault(key, {"params": [], "schedule": schedule, "wd_scale": wd_scale, "lr_scale": lr_scale})
            groups[key]["params"].append(p)
        return list(groups.values())

    def _schedules(self) -> dict[str, np.ndarray]:
        t, e, n = self.t, self.epochs, self.steps_per_epoch
        warmup = min(float(t["warmup_epochs"]), e)
        s = {
            "wd": cosine_schedule(self.base["weight_decay"], float(t["weight_decay_end"]), e, n),
            "momentum": cosine_schedule(float(t["momentum_teacher"]), float(t["momentum_teacher_end"]), e, n),
            "teacher_temp": teacher_temp_schedule(float(t["warmup_teacher_temp"]), self.base["teacher_temp"],
                                                  float(t["warmup_teacher_temp_epochs"]), e, n),
        }
        if not self.finetune:
            s["lr"] = cosine_schedule(self.base["lr"], float(t["min_lr"]), e, n, warmup)
        else:
            s["lr_head"] = cosine_schedule(self.base["lr_head"], float(t["min_lr"]), e, n, warmup)
            # The backbone is frozen during the head warm-up; its own warm-up + cosine fills the remaining epochs.
            h = self.head_warmup_epochs
            rest = cosine_schedule(self.base["lr_backbone"], float(t["min_lr"]), e - h, n, min(warmup, e - h))
            s["lr_backbone"] = np.concatenate([np.zeros(h * n), rest])
        return s

    # ------------------------------------------------------------------ phases
    def set_epoch(self, epoch: int) -> None:
        """Fine-tunes: backbone frozen during the head warm-up epochs, the chosen blocks train afterwards."""
        self.epoch = int(epoch)
        if self.finetune:
            backbone_phase = self.epoch >= self.head_warmup_epochs
            self.student.backbone.set_trainable(self.trainable if backbone_phase else "none")
        self.student.train()
        if self.finetune:
            _set_batchnorm_eval(self.student.backbone)  # small batches: keep pretrained BN statistics

    @property
    def in_head_warmup(self) -> bool:
        return self.finetune and self.epoch < self.head_warmup_epochs

    # ------------------------------------------------------------------ one step
    def local_masks(self, global_indices: Sequence[int], epoch: int) -> torch.Tensor | None:
        """iBOT masks of this process's global crops, drawn for the whole global batch then sliced (view-major)."""
        if self.mask_generator is None:
            return None
        b_global = len(global_indices)
        rng = np.random.default_rng([int(self.params["seed"]), int(epoch), *map(int, global_indices)])
        masks = sample_masks(2 * b_global, self.mask_generator, self.t["mask_ratio"],
                             float(self.t["mask_probability"]), rng)["masks"]
        local = b_global // self.ctx.world_size
        masks = masks.reshape(2, b_global, -1)[:, self.ctx.rank * local:(self.ctx.rank + 1) * local]
        return masks.reshape(2 * local, -1)

    def train_step(self, batch: dict[str, Any], it: int, masks: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step at global step `it`; returns the logged values (averaged over processes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedules[group["schedule"]][it]) * group["lr_scale"]
            group["weight_decay"] = float(self.schedules["wd"][it]) * group["wd_scale"]
        teacher_temp = float(self.schedules["teacher_temp"][it])
        momentum = float(self.schedules["momentum"][it])
        dev = self.device
        global_crops = batch["global_crops"].to(dev, non_blocking=True)
        local_crops = batch["local_crops"].to(dev, non_blocking=True) if batch["local_crops"] is not None else None
        masks = masks.to(dev) if masks is not None else None
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if self.t.get("amp") else nullcontext()

        with amp:
            # Teacher: global crops only, unmasked; its patch logits at the positions the student sees masked.
            with torch.no_grad():
                t_out = self.teacher(global_crops, None, masks, hide_masked=False)
                t_cls_logits, t_patch_logits = t_out["global_logits"], t_out["patch_logits"]
            s_out = self.forward(global_crops, local_crops, masks)

            # DINO: every teacher global view against every other student view (global and local).
            t_probs = self.dino_loss.teacher_probs(t_cls_logits, teacher_temp)
            student_views = list(s_out["global_logits"].chunk(2))
            if s_out["local_logits"] is not None:
                student_views += list(s_out["local_logits"].chunk(batch["n_local_crops"]))
            dino = self.dino_loss.cross_entropy(student_views, list(t_probs.chunk(2)))
            if self.dino_loss.centering == "centering":
                self.dino_loss.update_center(t_cls_logits)
            terms = {"dino": dino}
            if masks is not None and float(self.t["ibot_loss_weight"]) > 0:
                ibot = self.ibot_loss(s_out["patch_logits"], t_patch_logits, masks, teacher_temp)
                terms["ibot"] = float(self.t["ibot_loss_weight"]) * ibot
            if float(self.t["koleo_loss_weight"]) > 0:
                # Per global view, over the global batch (gathered) so it does not depend on the process count.
                koleo = sum(self.koleo_loss(all_gather_with_grad(x)) for x in s_out["cls"].chunk(2))
                terms["koleo"] = float(self.t["koleo_loss_weight"]) * koleo
            loss = sum(terms.values())

        values = {f"loss/{k}": float(all_reduce_mean(v.detach().float())) for k, v in terms.items()}
        values["loss/total"] = sum(values.values())
        if not math.isfinite(values["loss/total"]):
            raise DinoflowError(
                f"training diverged: loss is {values['loss/total']} at step {it} (epoch {self.epoch}; "
                f"{', '.join(f'{k}={v:.4g}' for k, v in values.items())}; lr={self.optimizer.param_groups[0]['lr']:.3g})."
                " Lower train.lr (or finetune.lr_*) or raise train.clip_grad / warmup_epochs")

        loss.backward()
        cancel_last_layer_gradients(self.student.head, self.epoch, int(self.t["freeze_last_layer_epochs"]))
        clip = self.t.get("clip_grad")
        norms = {}
        for part, plist in (("head", self.head_params), ("backbone", self.backbone_params)):
            with_grad = [p for p in plist if p.grad is not None]
            if with_grad:
                norms[part] = float(nn.utils.clip_grad_norm_(with_grad, float(clip) if clip else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        # EMA teacher: only the parameters that changed this step (frozen ones stay bit-identical).
        with torch.no_grad():
            moved = [(s, t) for s, t in self.ema_pairs if s.requires_grad]
            torch._foreach_lerp_([t for _, t in moved], [s for s, _ in moved], 1.0 - momentum)
            for sb, tb in zip(self.student.buffers(), self.teacher.buffers()):
                tb.copy_(sb)

        # Collapse monitors (monitors.py): target entropy, spread and effective rank of the teacher embeddings.
        watched = monitors.teacher_monitors(t_probs, t_out["cls"])
        watched = {k: float(all_reduce_mean(torch.tensor(v, device=dev))) for k, v in watched.items()}
        teacher_entropy = watched["teacher/entropy"]
        values.update(watched)
        values.update({
            # The part of the DINO cross-entropy the student can reduce: CE - H(teacher) = KL(teacher || student)
            # (each teacher view is the target equally often). The CE itself rises while the teacher temperature
            # warms up, because the targets' entropy rises; this term is the one that falls as the student learns.
            "dino_kl": values["loss/dino"] - teacher_entropy,
            "teacher/temp": teacher_temp, "momentum": momentum, "wd": float(self.schedules["wd"][it]),
        })
        for name in ("lr", "lr_head", "lr_backbone"):
            if name in self.schedules:
                values[name if name == "lr" else f"lr/{name[3:]}"] = float(self.schedules[name][it])
        values.update({f"grad_norm/{k}": v for k, v in norms.items()})
        if self.finetune:  # the two phases' curves, as the fine-tune figure overlays them
            values["finetune/head_loss" if self.in_head_warmup else "finetune/backbone_loss"] = values["loss/total"]
        return values

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "dino_loss": self.dino_loss.state_dict(),
                "ibot_loss": self.ibot_loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.ibot_loss.load_state_dict(state["ibot_loss"])


# ------------------------------------------------------------------------------------------------ the loop
def scratch_lr_from_search(params: dict[str, Any], model_name: str) -> dict[str, float]:
    """The lr search's best values for a model that reads them (`lr_from_search`, default: dino from random)."""
    cfg = model_config(params, model_name)
    use = cfg.get("lr_from_search", cfg["init"] == "random" and cfg["method"] != "none")
    if not use:
        return {}
    path = Path(paths.LR_SEARCH_BEST)
    if not path.exists():
        raise DinoflowError(f"{path}: missing; model {model_name!r} takes its lr from the search "
                            "(run `dinoflow lr-search` first, or set lr_from_search: false on the model)")
    best = read_json(path)
    if "lr" not in best:
        raise DinoflowError(f"{path}: no 'lr' entry (rerun `dinoflow lr-search`)")
    return {k: float(best[k]) for k in ("lr", "weight_decay", "teacher_temp") if k in best}


def _trim_dvclive(log_dir: Path, step: int) -> None:
    """Drop logged rows at or after `step`: a killed run logged steps that the resumed run repeats."""
    import pandas as pd

    for tsv in (log_dir / "plots" / "metrics").rglob("*.tsv"):
        df = pd.read_csv(tsv, sep="\t")
        if "step" in df.columns:
            df[df["step"] < step].to_csv(tsv, sep="\t", index=False)


def train(params: dict[str, Any], model_name: str, encoder: Encoder, info: dict[str, Any],
          images: Any = None, ctx: DistContext | None = None) -> Encoder:
    """Train `encoder` with DINO as model `model_name` wants, resuming from `paths.train_state` when it exists.

    Returns the evaluated backbone (`train.evaluate_network`: the EMA teacher's or the student's) after saving it
    to `paths.model_weights`, with info.json (contract 2) holding the evaluated network, the collapse verdict
    (`monitors.collapse_verdict` over the last epoch) and the drift from the initial weights (`drift.py`).
    `images`: anything with `__len__` and `get(i)` (default: the processed `ImageStore`).
    Raises DinoflowError when the loss diverges, or when the verdict is a collapse and `train.on_collapse` is fail.
    """
    from dvclive import Live

    from dinoflow.data.store import ImageStore
    from dinoflow.models.factory import save_encoder

    cfg = model_config(params, model_name)
    t = params["train"]
    ctx = ctx or init_distributed("auto")
    seed = int(params["seed"])
    seed_everything(seed)  # the heads' initial weights
    images = images if images is not None else ImageStore(paths.PROCESSED_DIR)
    n_steps = steps_per_epoch(len(images), t)
    finetune = cfg["init"] != "random"
    overrides = scratch_lr_from_search(params, model_name)
    initial = copy.deepcopy(encoder).eval()  # the reference of the drift measure
    trainer = DinoTrainer(params, encoder, trainable=cfg["trainable"], finetune=finetune, epochs=int(t["epochs"]),
                          steps_per_epoch=n_steps, ctx=ctx, **overrides)
    mean, std = encoder.data_config["mean"], encoder.data_config["std"]
    augmentation = MultiCropAugmentation.from_params(t, mean=mean, std=std)
    sampler = GlobalBatchSampler(len(images), int(t["batch_size"]), n_steps, seed, ctx.rank, ctx.world_size)
    loader, dataset = make_loader(images, augmentation, sampler, seed, int(t.get("num_workers", 0)))

    # -- resume
    state_path = Path(paths.train_state(model_name))
    run_hash = params_hash({"seed": seed, "train": t, "finetune": params.get("finetune") if finetune else None,
                            "model": cfg, "init": info.get("params_hash"), "overrides": overrides,
                            "n_images": len(images), "world_size": ctx.world_size})
    start = 0
    history: list[dict[str, float]] = []  # collapse monitors of the steps of the current epoch
    state = checkpoint.load_state(state_path)
    if state is not None and state.get("run_hash") != run_hash:
        log.warning("%s: saved for other parameters; training %s from the start", state_path, model_name)
        state = None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        checkpoint.set_rng_states(state["rng"])
        start = int(state["step"])
        history = list(state["monitors"])
        log.info("%s: resuming at step %d of %d (epoch %d)", model_name, start, trainer.total_steps,
                 start // n_steps)

    def save(step: int) -> None:
        if ctx.is_main:
            checkpoint.save_state(state_path, {"trainer": trainer.state_dict(), "rng": checkpoint.rng_states(),
                                               "step": step, "epoch": step // n_steps, "run_hash": run_hash,
                                               "monitors": history,
                                               "data_order": {"seed": seed, "steps_per_epoch": n_steps,
                                                              "global_batch": int(t["batch_size"])}})

    log_dir = Path(paths.train_log_dir(model_name))
    live = None
    if ctx.is_main:
        if start == 0 and log_dir.exists():
            import shutil

            shutil.rmtree(log_dir)  # a fresh run: no stale curves from an earlier one
        if start > 0:
            _trim_dvclive(log_dir, start)
        live = Live(str(log_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    every = int(t.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY))
    log.info("%s: DINO %s, %d epochs x %d steps, global batch %d, %d process(es), trainable=%s, iBOT %s",
             model_name, "fine-tune" if finetune else "from scratch", trainer.epochs, n_steps, t["batch_size"],
             ctx.world_size, cfg["trainable"], "on" if trainer.use_ibot else "off")
    last: dict[str, float] = {}
    t0, done = time.time(), 0
    bar = tqdm(total=trainer.total_steps, initial=start, desc=f"train {model_name}", disable=not ctx.is_main)
    for epoch in range(start // n_steps, trainer.epochs):
        first = start - epoch * n_steps if epoch == start // n_steps else 0
        trainer.set_epoch(epoch)
        sampler.set_epoch(epoch, first)
        dataset.set_epoch(epoch)
        if first == 0:
            history = []
        for step, batch in enumerate(loader, start=first):
            it = epoch * n_steps + step
            masks = trainer.local_masks(sampler.global_batch(epoch, step), epoch)
            last = trainer.train_step(batch, it, masks)
            history.append({k: last[k] for k in monitors.MONITOR_KEYS})
            done += 1
            if live is not None and it % int(t.get("log_every", 1)) == 0:
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
                return evaluated_backbone(trainer, t)
            if (it + 1) % every == 0 and step + 1 < n_steps:
                save(it + 1)
        save((epoch + 1) * n_steps)
        verdict = model_verdict(history, trainer, t)
        if verdict["verdict"] != "healthy":
            log.warning("%s epoch %d: %s (%s)", model_name, epoch, verdict["verdict"], verdict["reason"])
    bar.close()
    elapsed = time.time() - t0
    verdict = model_verdict(history, trainer, t)  # the last epoch's (also after a resume with nothing left to do)
    backbone = evaluated_backbone(trainer, t)
    if ctx.is_main:
        if verdict["verdict"] != "healthy" and t["on_collapse"] == "fail":
            if live is not None:
                live.end()
            raise DinoflowError(f"model {model_name}: {verdict['verdict']} after training ({verdict['reason']}); "
                                f"weights not saved (train.on_collapse: fail). Curves: {log_dir}")
        drift = embedding_drift(initial, backbone, images, int(t["drift_images"]), seed)
        info = dict(info, evaluated_network=t["evaluate_network"], collapse=verdict, drift=drift,
                    train={"epochs": trainer.epochs, "steps": trainer.total_steps, "steps_per_epoch": n_steps,
                           "global_batch": int(t["batch_size"]), "processes": ctx.world_size,
                           "final_loss": last.get("loss/total"), "lr_overrides": overrides,
                           "images_per_s_this_run": round(done * int(t["batch_size"]) / max(elapsed, 1e-9), 2)})
        save_encoder(backbone, paths.model_weights(model_name), info)
        if live is not None:
            live.summary["collapse"] = {k: verdict[k] for k in ("verdict", *monitors.MONITOR_KEYS.values())}
            live.summary["drift"] = {"median_cosine": drift["median_cosine"], "ci95": drift["ci95"]}
            live.end()
        log.info("%s: collapse verdict %s (%s); median cosine to the initial embeddings %.4f [%.4f, %.4f] over %d "
                 "images", model_name, verdict["verdict"], verdict["reason"], drift["median_cosine"], *drift["ci95"],
                 drift["n_images"])
        log.info("%s: %s backbone -> %s; curves -> %s; state -> %s", model_name, t["evaluate_network"],
                 paths.model_weights(model_name), log_dir, state_path)
    return backbone


def evaluated_backbone(trainer: DinoTrainer, t: dict[str, Any]) -> Encoder:
    """The backbone saved as the model: the EMA teacher's (DINO's choice) or the student's (`train.evaluate_network`)."""
    return {"teacher": trainer.teacher, "student": trainer.student}[t["evaluate_network"]].backbone


def model_verdict(history: list[dict[str, float]], trainer: DinoTrainer, t: dict[str, Any]) -> dict[str, Any]:
    """`monitors.collapse_verdict` over the monitors of the steps of the last epoch (`history`)."""
    n_samples = 2 * (int(t["batch_size"]) // trainer.ctx.world_size)  # rows of one process's teacher batch
    return monitors.collapse_verdict(**monitors.summarise(history), log_k=math.log(int(t["out_dim"])),
                                     embed_dim=trainer.student.backbone.embed_dim, n_samples=n_samples)
