"""`Encoder`: one small, uniform API around any timm backbone (ViT or CNN).

Every later stage (training, embedding, attention figures) talks to this class only, so swapping the
architecture is a change of `backbone.arch` in params.yaml:

>>> enc = Encoder("vit_small_patch14_dinov2", img_size=28, timm_kwargs=dict(embed_dim=32, depth=2, num_heads=2))
>>> out = enc.forward_tokens(torch.zeros(2, 3, 28, 28))
>>> out["cls"].shape, out["patch"].shape
(torch.Size([2, 32]), torch.Size([2, 4, 32]))
"""

from __future__ import annotations

import re
from typing import Any

import timm
import torch
from timm.models import checkpoint_seq, group_parameters
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger

log = get_logger(__name__)


def is_vit_model(model: nn.Module) -> bool:
    """A timm model with ViT-style token plumbing (patch_embed + _pos_embed + blocks)."""
    return all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "num_prefix_tokens"))


def _create_timm(arch: str, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """timm model without classifier; `img_size` goes to models that take it (ViTs fix pos_embed with it)."""
    if img_size is not None:
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
        except TypeError as exc:  # CNNs take any input size and reject the argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def has_running_statistics(module: nn.Module) -> bool:
    """True for a layer that keeps running statistics (a ``running_mean`` / ``running_var`` tensor): BatchNorm
    1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d and EvoNorm2dB* (batch variance in training, running variance
    in eval), an InstanceNorm with ``track_running_stats``. In training mode such a layer normalises by the batch
    and updates its statistics; in eval mode it uses the stored ones."""
    return any(isinstance(getattr(module, k, None), torch.Tensor) for k in ("running_mean", "running_var"))


class Encoder(nn.Module):
    """A timm backbone without classifier, plus a DINOv2/iBOT mask token for ViTs.

    `arch`: any timm model name; `img_size`: input size (given to timm when the model takes it, as ViTs do;
    CNNs take any size and only record it for `data_config`);
    `timm_kwargs`: extra `timm.create_model` arguments (e.g. a smaller `embed_dim`/`depth` for CPU demos).
    """

    def __init__(self, arch: str, img_size: int | None = None, timm_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.arch = arch
        self.timm_kwargs = dict(timm_kwargs or {})
        try:
            self.model = _create_timm(arch, img_size, self.timm_kwargs)
        except RuntimeError as exc:  # timm: unknown model name
            raise DinoflowError(f"backbone.arch / pretrained.arch: timm cannot create {arch!r}: {exc}") from exc
        except TypeError as exc:
            raise DinoflowError(
                f"backbone.kwargs: {self.timm_kwargs} not accepted by timm model {arch!r}: {exc}") from exc
        self.is_vit = is_vit_model(self.model)
        self.img_size = img_size
        self.embed_dim: int = int(self.model.num_features)
        if self.is_vit:
            # DINOv2 keeps a (1, D) mask token that replaces masked patch embeddings (iBOT); zeros as in DINOv2.
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
            self.patch_size: int | None = int(self.model.patch_embed.patch_size[0])
            self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        else:
            self.mask_token = None
            self.patch_size = None
            self.num_prefix_tokens = 0
        self.trainable_names: list[str] = [n for n, _ in self.named_parameters()]
        self.info: dict[str, Any] = {}  # filled by dinoflow.models.factory (weights source, stand-in label)

    # ------------------------------------------------------------------ configuration
    @property
    def data_config(self) -> dict[str, Any]:
        """timm's eval preprocessing (mean/std/interpolation), with input_size set to the size we train at."""
        cfg = timm.data.resolve_data_config({}, model=self.model)
        if self.img_size is not None:
            cfg["input_size"] = (3, self.img_size, self.img_size)
        return cfg

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def block_groups(self) -> tuple[list[str], list[list[str]], list[str]]:
        """(stem names, block groups, tail names) from timm's fine-grained `group_matcher(coarse=False)`.

        One group per block in both families: a ViT transformer block, or one EfficientNet-style block
        (`blocks.<stage>.<block>`, not a whole stage), so `lastK` trains K blocks whatever the architecture.
        timm merges the final norm into the last block group (ViT `norm`, EfficientNet `conv_head`/`bn2`);
        the tail is what no pattern matches (e.g. ViT `fc_norm` with average pooling) and always follows
        the last block. Names are relative to this Encoder (prefixed `model.`).
        """
        if not hasattr(self.model, "group_matcher"):
            raise DinoflowError(f"trainable: timm model {self.arch!r} has no group_matcher; use none or all")
        matcher = self.model.group_matcher(coarse=False)
        groups = group_parameters(self.model, matcher)
        ids = sorted(groups)
        specs = matcher["blocks"] if isinstance(matcher["blocks"], (list, tuple)) else [(matcher["blocks"], None)]
        patterns = [re.compile(p) for p, _ in specs]
        tail: list[str] = []
        if len(ids) > 1 and not any(p.match(n) for n in groups[ids[-1]] for p in patterns):
            tail = groups[ids.pop()]
        stem = groups[ids[0]]
        blocks = [groups[i] for i in ids[1:]]
        pre = lambda names: ["model." + n for n in names]  # noqa: E731
        return pre(stem), [pre(b) for b in blocks], pre(tail)

    def set_trainable(self, spec: str) -> list[str]:
        """Freeze / unfreeze parameters: `none`, `all`, or `lastK` (last K block groups + final norm).

        A block group is one block (timm's fine-grained grouping): one transformer block of a ViT, one
        inverted-residual block of an EfficientNet-style CNN, whose final norm is `conv_head` + `bn2`. The mask token trains only with
        `all` (it belongs to the embedding). Returns (and keeps in `trainable_names`) the trainable names.
        """
        spec = str(spec)
        names = [n for n, _ in self.named_parameters()]
        if spec == "all":
            chosen = set(names)
        elif spec == "none":
            chosen = set()
        else:
            m = re.fullmatch(r"last(\d+)", spec)
            if not m or int(m.group(1)) < 1:
                raise DinoflowError(f"models[].trainable: {spec!r} is not none, all or lastK (e.g. last1, last3)")
            k = int(m.group(1))
            _, blocks, tail = self.block_groups()
            if k > len(blocks):
                raise DinoflowError(
                    f"models[].trainable: {spec!r} asks for {k} block groups but {self.arch} has {len(blocks)}")
            chosen = {n for group in blocks[-k:] for n in group} | set(tail)
        for n, p in self.named_parameters():
            p.requires_grad_(n in chosen)
        self.train(self.training)  # re-apply the frozen-BatchNorm rule
        self.trainable_names = [n for n in names if n in chosen]
        log.info("%s: trainable=%s -> %d of %d parameter tensors", self.arch, spec, len(chosen), len(names))
        return self.trainable_names

    def parameter_counts(self) -> dict[str, Any]:
        """{"trainable_params", "total_params", "trainable_share"} of this backbone (elements, not tensors),
        for the current `set_trainable` spec; the share is 0.0 for a backbone without parameters."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable_params": int(trainable), "total_params": int(total),
                "trainable_share": float(trainable / total) if total else 0.0}

    def train(self, mode: bool = True) -> "Encoder":
        """As nn.Module.train, but frozen normalisation layers with running statistics (BatchNorm, timm's
        BatchNormAct2d / EvoNorm B, see `has_running_statistics`) stay in eval mode: partial fine-tunes keep the
        pretrained running statistics of the layers they do not train."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if has_running_statistics(module):
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    # ------------------------------------------------------------------ forward passes
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features: (B, N_tokens, D) for ViTs, (B, C, H, W) for CNNs."""
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, D): the CLS token for ViTs, global average pool for CNNs."""
        return self.forward_tokens(x)["cls"]

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"cls": (B, D), "patch": (B, N, D)}; `masks` (B, N) or (B, h, w) bool marks patches to hide (ViT only).

        ViT path = timm's forward_features with the DINOv2 mask-token substitution between the patch
        embedding and the positional embedding. CNN: cls is the global average pool of the last feature map
        and the patch tokens are its flattened spatial positions.
        """
        if not self.is_vit:
            if masks is not None:
                raise DinoflowError(f"masked patch tokens (iBOT) need a ViT backbone; {self.arch} is a CNN")
            fmap = self.model.forward_features(x)
            return {"cls": fmap.mean(dim=(2, 3)), "patch": fmap.flatten(2).transpose(1, 2)}
        m = self.model
        tok = m.patch_embed(x)  # (B, N, D), or (B, h, w, D) with dynamic_img_size
        if masks is not None:
            n_patches = tok.shape[1:-1].numel()
            if masks.shape[0] != tok.shape[0] or masks[0].numel() != n_patches:
                raise DinoflowError(
                    f"masks: shape {tuple(masks.shape)} does not match {tok.shape[0]} images x {n_patches} patches")
            keep = masks.reshape(*tok.shape[:-1], 1).to(torch.bool)
            tok = torch.where(keep, self.mask_token.to(tok.dtype), tok)
        tok = m._pos_embed(tok)
        tok = m.patch_drop(tok)
        tok = m.norm_pre(tok)
        if m.grad_checkpointing and not torch.jit.is_scripting():
            tok = checkpoint_seq(m.blocks, tok)
        else:
            tok = m.blocks(tok)
        tok = m.norm(tok)
        return {"cls": tok[:, 0], "patch": tok[:, self.num_prefix_tokens:]}

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"cls": (B, D), "patch_mean": (B, D)}: the two embeddings written by `dinoflow embed`."""
        out = self.forward_tokens(x)
        return {"cls": out["cls"], "patch_mean": out["patch"].mean(dim=1)}

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of height x width (ViT: size // patch; CNN: run a probe pass)."""
        if self.is_vit:
            return height // self.patch_size, width // self.patch_size
        with torch.no_grad():
            p = next(self.parameters())
            fmap = self.model.forward_features(torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype))
        return int(fmap.shape[2]), int(fmap.shape[3])

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, **kwargs):
        """timm's ViT `get_intermediate_layers` (DINOv2 API) passthrough."""
        if not hasattr(self.model, "get_intermediate_layers"):
            raise DinoflowError(f"{self.arch}: timm offers get_intermediate_layers for ViTs only")
        return self.model.get_intermediate_layers(x, n, **kwargs)
