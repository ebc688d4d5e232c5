"""Jigsaw puzzles (Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles",
ECCV 2016): an image is cut into 3x3 tiles, the tiles are shuffled by one permutation of a fixed set, every tile
goes through the same network (siamese "context-free" network), and a classifier on the concatenated tile
embeddings predicts the index of the permutation.

Permutation set (paper Sec. 3.2 / Algorithm 1): chosen by maximal Hamming distance so that the puzzles are
distinguishable. :func:`hamming_permutation_set` is the greedy farthest-point selection over all ``n!``
permutations: start from a (seeded) random permutation, then repeatedly add the permutation whose *minimum*
Hamming distance to the chosen ones is largest (ties broken by the seeded generator). Greedy, so not always
optimal (5 permutations of 4 tiles: 2 for some seeds where 3 is possible), but 100 permutations of 9 tiles reach a
minimum distance of 6 where random sets of 100 have 2 or 3. (Noroozi's released code
maximises the *mean* distance; the minimum is what makes the closest two puzzles differ, and what the tests check.)

Tiles (paper Sec. 3.1): the image is cropped to a ``3 * cell_size`` square, cut into 3x3 cells, and a
``tile_size`` square is taken at a random place inside each cell (``cell_size - tile_size`` pixels of jitter, so
edges do not continue across tiles); each tile is normalised by its own mean and standard deviation (the paper's
defence against shortcuts through low-level statistics).

Convention: with permutation ``perm`` the network sees ``tiles[perm[0]], tiles[perm[1]], ...``: input position
``i`` shows the original tile ``perm[i]`` (tiles numbered row-major).

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.jigsaw import JigsawViews, hamming_permutation_set, min_hamming_distance
    >>> perms = hamming_permutation_set(10, seed=0)
    >>> perms.shape, min_hamming_distance(perms) >= 8
    ((10, 9), True)
    >>> views = JigsawViews(tile_size=6, cell_size=8, permutations=perms)
    >>> s = views(torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8), np.random.default_rng(0))
    >>> s["tiles"].shape, 0 <= int(s["label"]) < 10
    (torch.Size([9, 3, 6, 6]), True)
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.common import (IMAGENET_MEAN, IMAGENET_STD, check_mean_std, check_positive_int,
                                         check_scale, normalize, random_resized_crop, to_uint8_image)

GRID = 3
N_TILES = GRID * GRID


@functools.lru_cache(maxsize=4)
def _all_permutations(n_tiles: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n_tiles))), dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def _hamming_permutation_set(n_permutations: int, n_tiles: int, seed: int) -> np.ndarray:
    candidates = _all_permutations(n_tiles)
    columns = np.ascontiguousarray(candidates.T)  # (n_tiles, n!): one fast vector compare per position

    def distance_to(j: int) -> np.ndarray:
        same = np.zeros(columns.shape[1], dtype=np.int8)
        for pos in range(n_tiles):
            same += columns[pos] == columns[pos, j]
        return n_tiles - same

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(candidates)))]
    # min_dist[j]: smallest Hamming distance from candidate j to the chosen set (0 for chosen ones).
    min_dist = distance_to(chosen[0])
    for _ in range(n_permutations - 1):
        best = np.flatnonzero(min_dist == min_dist.max())
        j = int(best[rng.integers(len(best))])
        chosen.append(j)
        np.minimum(min_dist, distance_to(j), out=min_dist)
    return candidates[chosen].astype(np.int64)


def hamming_permutation_set(n_permutations: int, n_tiles: int = N_TILES, seed: int = 0) -> np.ndarray:
    """``(n_permutations, n_tiles)`` int64 array of distinct permutations of ``range(n_tiles)``, greedily chosen
    for the largest minimum pairwise Hamming distance (see the module docstring); same ``seed``, same set.

    Raises ``DinoflowError`` when ``n_permutations`` exceeds ``n_tiles!`` or is < 2, or ``n_tiles`` > 10 (the
    search enumerates all ``n_tiles!`` permutations). Cost for 9 tiles: a few ms per chosen permutation; cached.
    """
    n_permutations = check_positive_int("methods.jigsaw", "n_permutations", n_permutations, minimum=2)
    n_tiles = check_positive_int("jigsaw", "n_tiles", n_tiles, minimum=2)
    if n_tiles > 10:
        raise DinoflowError(f"jigsaw: {n_tiles} tiles would enumerate {math.factorial(n_tiles)} permutations")
    if n_permutations > math.factorial(n_tiles):
        raise DinoflowError(f"methods.jigsaw.n_permutations ({n_permutations}) exceeds the {math.factorial(n_tiles)} "
                            f"permutations of {n_tiles} tiles")
    return _hamming_permutation_set(n_permutations, n_tiles, int(seed)).copy()


def min_hamming_distance(permutations: np.ndarray) -> int:
    """Smallest Hamming distance (number of differing positions) between two rows of ``permutations``."""
    p = np.asarray(permutations)
    if p.ndim != 2 or len(p) < 2:
        raise DinoflowError(f"min_hamming_distance: need >= 2 permutations as rows, got shape {p.shape}")
    d = (p[:, None, :] != p[None, :, :]).sum(axis=2)
    np.fill_diagonal(d, p.shape[1] + 1)
    return int(d.min())


class JigsawViews:
    """Image -> ``{"tiles": (9, 3, T, T) float32 (shuffled), "label": () int64 (permutation index)}``.

    ``normalize_tiles``: per-tile, per-channel zero mean / unit variance (paper); otherwise the ``mean``/``std``
    normalisation of the backbone.
    """

    section = "methods.jigsaw"

    def __init__(self, tile_size: int, cell_size: int, permutations: np.ndarray,
                 crop_scale: Sequence[float] = (0.6, 1.0), normalize_tiles: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = True):
        self.tile_size = check_positive_int(self.section, "tile_size", tile_size)
        self.cell_size = check_positive_int(self.section, "cell_size", cell_size)
        if self.tile_size > self.cell_size:
            raise DinoflowError(f"{self.section}: tile_size ({tile_size}) must not exceed cell_size ({cell_size})")
        perms = np.asarray(permutations, dtype=np.int64)
        if perms.ndim != 2 or perms.shape[1] != N_TILES or not all(
                sorted(row) == list(range(N_TILES)) for row in perms.tolist()):
            raise DinoflowError(f"{self.section}: permutations must be rows of a permutation of 0..8, "
                                f"got shape {perms.shape}")
        self.permutations = perms
        self.crop_scale = check_scale(self.section, crop_scale)
        self.normalize_tiles = bool(normalize_tiles)
        self.mean, self.std = check_mean_std(mean, std)
        self.flip = bool(flip)
        self.region_size = GRID * self.cell_size

    def tiles_in_order(self, region: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """The 9 tiles of a ``(3, region_size, region_size)`` crop in row-major grid order, and their ``(top,
        left)`` pixels ``(9, 2)``; each tile at a random offset inside its cell."""
        c, t = self.cell_size, self.tile_size
        offsets = rng.integers(0, c - t + 1, size=(N_TILES, 2))
        boxes = np.array([(r * c + offsets[i, 0], q * c + offsets[i, 1])
                          for i, (r, q) in enumerate(itertools.product(range(GRID), range(GRID)))])
        tiles = torch.stack([region[:, y: y + t, x: x + t] for y, x in boxes])
        return tiles, boxes

    def __call__(self, image: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        region = random_resized_crop(to_uint8_image(image), self.region_size, self.crop_scale, rng, flip=self.flip)
        tiles, _ = self.tiles_in_order(region, rng)
        label = int(rng.integers(len(self.permutations)))
        tiles = tiles[torch.from_numpy(self.permutations[label])]
        if self.normalize_tiles:
            x = tiles.to(torch.float32) / 255.0
            mean = x.mean(dim=(2, 3), keepdim=True)
            std = x.std(dim=(2, 3), keepdim=True)
            x = (x - mean) / std.clamp_min(1e-3)  # a flat tile stays zero instead of exploding
        else:
            x = normalize(tiles, self.mean, self.std)
        return {"tiles": x, "label": torch.tensor(label, dtype=torch.long)}


def collate_jigsaw(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``tiles`` ``(B, 9, 3, T, T)``, ``label`` ``(B,)``."""
    if not samples:
        raise DinoflowError("jigsaw: empty batch")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class JigsawHead(nn.Module):
    """Tile embeddings ``(B, 9, D)`` (in input order) -> permutation logits ``(B, n_permutations)``.

    As the paper's context-free network: a per-tile layer (``Linear(D, tile_dim) -> ReLU``, shared, fc6), the 9
    outputs concatenated in input order, ``Linear(9 * tile_dim, hidden) -> ReLU`` (fc7) and
    ``Linear(hidden, n_permutations)`` (fc8).
    """

    def __init__(self, in_dim: int, n_permutations: int, tile_dim: int = 256, hidden_dim: int = 1024):
        super().__init__()
        in_dim = check_positive_int("jigsaw head", "in_dim", in_dim)
        tile_dim = check_positive_int("methods.jigsaw", "tile_dim", tile_dim)
        hidden_dim = check_positive_int("methods.jigsaw", "head_hidden_dim", hidden_dim)
        self.tile = nn.Sequential(nn.Linear(in_dim, tile_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(N_TILES * tile_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, int(n_permutations)))

    def forward(self, tile_embeddings: torch.Tensor) -> torch.Tensor:
        if tile_embeddings.ndim != 3 or tile_embeddings.shape[1] != N_TILES:
            raise DinoflowError(f"JigsawHead: expected (B, 9, D) tile embeddings, got {tuple(tile_embeddings.shape)}")
        return self.classifier(self.tile(tile_embeddings).flatten(1))


def jigsaw_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the permutation classes (Noroozi & Favaro Sec. 3)."""
    return F.cross_entropy(logits, labels)
