"""Masked autoencoder (He, Chen, Xie, Li, Dollár & Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022), from lightly's building blocks.

- Masking (data seam): per sample, ``int(N * (1 - mask_ratio))`` of the ``N`` patches are kept, chosen by
  ``lightly.models.utils.random_token_mask`` run under a private torch generator seeded from the sample's NumPy
  generator (so the global RNGs are untouched and a sample depends only on its seed). Indices are *patch* indices
  in ``[0, N)``; :func:`to_sequence_index` shifts them past the ViT's prefix (class/register) tokens.
- Encoder: the backbone's timm ViT sees only the visible patches (``lightly``'s ``MaskedVisionTransformerTIMM``
  around the same timm module, weights and positional embedding untouched).
- Decoder (:class:`MAEDecoder`): ``Linear(D, decoder_dim)``, the mask token at every hidden position, lightly's
  ``MaskedVisionTransformerDecoderTIMM`` (fixed 2-D sin-cos positional embedding, ``decoder_depth`` timm blocks),
  ``Linear(decoder_dim, patch_size**2 * 3)`` on the masked positions. The paper's decoder has 8 blocks of width
  512; a "light" CPU default is 1-2 blocks of width 128.
- Loss (:func:`mae_loss`, the paper's ``norm_pix_loss``): mean squared error between the prediction and the pixels
  of each masked patch (``lightly.models.utils.patchify`` order), each target patch normalised by its own mean and
  (unbiased) variance (``lightly.models.utils.normalize_mean_var``, eps 1e-6).

MAE needs patch tokens: a CNN backbone raises ``DinoflowError``.

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.mae import MAEViews
    >>> views = MAEViews(crop_size=16, patch_size=4, mask_ratio=0.75)
    >>> s = views(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8), np.random.default_rng(0))
    >>> s["image"].shape, s["idx_keep"].shape, s["idx_mask"].shape
    (torch.Size([3, 16, 16]), torch.Size([4]), torch.Size([12]))
    >>> sorted(s["idx_keep"].tolist() + s["idx_mask"].tolist()) == list(range(16))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.common import (IMAGENET_MEAN, IMAGENET_STD, check_mean_std, check_positive_int,
                                         check_scale, normalize, random_resized_crop, to_uint8_image)


def _lightly():
    try:
        from lightly.models import utils
        from lightly.models.modules.masked_vision_transformer_decoder_timm import MaskedVisionTransformerDecoderTIMM
        from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM
    except ImportError as exc:  # pragma: no cover - lightly is a dependency
        raise DinoflowError(f"method mae needs the lightly package ({exc})") from exc
    return utils, MaskedVisionTransformerTIMM, MaskedVisionTransformerDecoderTIMM


def check_mask_ratio(mask_ratio: float) -> float:
    if not 0.0 < float(mask_ratio) < 1.0:
        raise DinoflowError(f"methods.mae.mask_ratio must be in (0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def num_visible(n_patches: int, mask_ratio: float) -> int:
    """Patches kept per image: ``int(N * (1 - mask_ratio))`` as the MAE code, at least 1."""
    return max(1, int(n_patches * (1.0 - mask_ratio)))


class MAEViews:
    """Image -> ``{"image": (3, S, S) float32, "idx_keep": (K,) int64, "idx_mask": (N - K,) int64}``.

    Random resized crop (``crop_scale``, the paper's 0.2-1.0) + flip, normalisation, and the random patch mask;
    ``S`` must be a multiple of ``patch_size``.
    """

    section = "methods.mae"

    def __init__(self, crop_size: int, patch_size: int, mask_ratio: float = 0.75,
                 crop_scale: Sequence[float] = (0.2, 1.0), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, flip: bool = True):
        self.crop_size = check_positive_int(self.section, "crop_size", crop_size)
        self.patch_size = check_positive_int(self.section, "patch_size", patch_size)
        if self.crop_size % self.patch_size:
            raise DinoflowError(f"{self.section}: crop size {crop_size} is not a multiple of the ViT patch size "
                                f"{patch_size}")
        self.grid = self.crop_size // self.patch_size
        self.n_patches = self.grid * self.grid
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.crop_scale = check_scale(self.section, crop_scale)
        self.mean, self.std = check_mean_std(mean, std)
        self.flip = bool(flip)

    def sample_mask(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx_keep, idx_mask)`` patch indices from lightly's ``random_token_mask``, seeded by ``rng``."""
        utils, _, _ = _lightly()
        seed = int(rng.integers(2**63 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            keep, mask = utils.random_token_mask((1, self.n_patches), mask_ratio=self.mask_ratio,
                                                 mask_class_token=True)
        return keep[0], mask[0]

    def __call__(self, image: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        x = random_resized_crop(to_uint8_image(image), self.crop_size, self.crop_scale, rng, flip=self.flip)
        keep, mask = self.sample_mask(rng)
        return {"image": normalize(x, self.mean, self.std), "idx_keep": keep, "idx_mask": mask}


def collate_mae(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``image`` ``(B, 3, S, S)``, ``idx_keep`` ``(B, K)``, ``idx_mask`` ``(B, N - K)``."""
    if not samples:
        raise DinoflowError("mae: empty batch")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def to_sequence_index(patch_index: torch.Tensor, num_prefix_tokens: int, with_prefix: bool) -> torch.Tensor:
    """Patch indices ``(B, K)`` -> token-sequence indices (``+ num_prefix_tokens``), with the prefix tokens'
    indices ``0..num_prefix_tokens-1`` prepended when ``with_prefix`` (what the encoder keeps)."""
    seq = patch_index + num_prefix_tokens
    if with_prefix and num_prefix_tokens:
        prefix = torch.arange(num_prefix_tokens, device=seq.device, dtype=seq.dtype).expand(seq.shape[0], -1)
        seq = torch.cat([prefix, seq], dim=1)
    return seq


def masked_patch_targets(images: torch.Tensor, patch_size: int, idx_mask: torch.Tensor) -> torch.Tensor:
    """Pixels of the masked patches: ``(B, N - K, patch_size**2 * 3)`` (lightly ``patchify`` + ``get_at_index``)."""
    utils, _, _ = _lightly()
    return utils.get_at_index(utils.patchify(images, patch_size), idx_mask)


def mae_loss(prediction: torch.Tensor, target: torch.Tensor, norm_pix_loss: bool = True) -> torch.Tensor:
    """MAE loss on masked patches: ``mean((prediction - t)^2)`` over patches and pixels, ``t`` the target patch
    normalised by its own mean and unbiased variance (eps 1e-6) when ``norm_pix_loss`` (He et al., Sec. 3 "Target";
    ``forward_loss`` of the MAE code). ``prediction``/``target``: ``(B, M, patch_size**2 * 3)``."""
    if prediction.shape != target.shape:
        raise DinoflowError(f"mae: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    if norm_pix_loss:
        utils, _, _ = _lightly()
        target = utils.normalize_mean_var(target, dim=-1, eps=1.0e-6)
    return ((prediction - target) ** 2).mean()


class VisibleEncoder:
    """Runs a timm ViT on the visible tokens only (lightly ``MaskedVisionTransformerTIMM.encode``).

    Not an ``nn.Module`` on purpose: it wraps the backbone's own timm module (no copy, weights and positional
    embedding untouched), so the method's parameters are the backbone's and nothing is registered twice.
    """

    def __init__(self, vit: nn.Module):
        _, MaskedVisionTransformerTIMM, _ = _lightly()
        self.wrapper = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip",
                                                   pos_embed_initialization="skip")

    def __call__(self, images: torch.Tensor, idx_keep_seq: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)``, sequence indices ``(B, P + K)`` -> tokens ``(B, P + K, D)`` (after the final norm)."""
        return self.wrapper.encode(images=images, idx_keep=idx_keep_seq)


class MAEDecoder(nn.Module):
    """Encoded visible tokens -> pixel predictions of the masked patches (see the module docstring)."""

    def __init__(self, embed_dim: int, n_patches: int, patch_size: int, num_prefix_tokens: int = 1,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        _, _, MaskedVisionTransformerDecoderTIMM = _lightly()
        decoder_dim = check_positive_int("methods.mae", "decoder_dim", decoder_dim)
        decoder_num_heads = check_positive_int("methods.mae", "decoder_num_heads", decoder_num_heads)
        if decoder_dim % decoder_num_heads:
            raise DinoflowError(f"methods.mae: decoder_dim ({decoder_dim}) must be divisible by decoder_num_heads "
                                f"({decoder_num_heads})")
        self.n_patches, self.patch_size = int(n_patches), int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.n_patches, embed_dim=decoder_dim,
            depth=check_positive_int("methods.mae", "decoder_depth", decoder_depth), num_heads=decoder_num_heads,
            num_prefix_tokens=self.num_prefix_tokens, mlp_ratio=float(mlp_ratio))
        self.predict = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)
        nn.init.xavier_uniform_(self.predict.weight)
        nn.init.zeros_(self.predict.bias)

    def forward(self, encoded: torch.Tensor, idx_keep_seq: torch.Tensor, idx_mask_seq: torch.Tensor) -> torch.Tensor:
        """``encoded`` ``(B, P + K, D)`` at sequence positions ``idx_keep_seq``; returns ``(B, M, p*p*3)`` at
        ``idx_mask_seq`` (as lightly's MAE example: mask tokens everywhere, the visible ones scattered back)."""
        utils, _, _ = _lightly()
        x = self.embed(encoded)
        full = utils.repeat_token(self.decoder.mask_token, (x.shape[0], self.decoder.sequence_length))
        full = utils.set_at_index(full.to(x.dtype), idx_keep_seq, x)
        decoded = self.decoder(full)  # + fixed sin-cos positional embedding, blocks, norm
        return self.predict(utils.get_at_index(decoded, idx_mask_seq))
