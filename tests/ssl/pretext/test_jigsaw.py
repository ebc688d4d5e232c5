"""Jigsaw: the permutation set's minimum Hamming distance (brute force), the tiles of a known image, the loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.jigsaw import (JigsawHead, _all_permutations, JigsawViews, collate_jigsaw, hamming_permutation_set,
                                         jigsaw_loss, min_hamming_distance)


def _brute_force_min_distance(perms: np.ndarray) -> int:
    return int(round(pdist(perms, metric="hamming").min() * perms.shape[1]))


def test_permutation_set_is_distinct_permutations_and_seeded():
    perms = hamming_permutation_set(100, seed=0)
    assert perms.shape == (100, 9)
    assert all(sorted(row) == list(range(9)) for row in perms.tolist())
    assert len({tuple(r) for r in perms.tolist()}) == 100
    np.testing.assert_array_equal(perms, hamming_permutation_set(100, seed=0))
    assert not np.array_equal(perms, hamming_permutation_set(100, seed=1))


def test_min_hamming_distance_matches_scipy_and_beats_random_sets():
    perms = hamming_permutation_set(100, seed=0)
    d = min_hamming_distance(perms)
    assert d == _brute_force_min_distance(perms)
    assert d >= 6  # measured: 6 for 100 permutations (random sets of 100: 2 or 3)
    rng = np.random.default_rng(0)
    all_perms = _all_permutations(9)
    random_sets = [all_perms[rng.choice(len(all_perms), 100, replace=False)] for _ in range(5)]
    assert all(_brute_force_min_distance(r) < d for r in random_sets)
    assert min_hamming_distance(hamming_permutation_set(10, seed=0)) == _brute_force_min_distance(
        hamming_permutation_set(10, seed=0)) >= 8


@pytest.mark.parametrize("n_tiles,n_perms", [(3, 3), (3, 4), (4, 2), (4, 4)])
def test_greedy_reaches_the_brute_force_optimum_on_small_cases(n_tiles, n_perms):
    all_perms = np.array(list(itertools.permutations(range(n_tiles))))
    best = max(_brute_force_min_distance(all_perms[list(c)])
               for c in itertools.combinations(range(len(all_perms)), n_perms))
    for seed in range(3):
        assert min_hamming_distance(hamming_permutation_set(n_perms, n_tiles, seed)) == best


def _cell_coded_image(cell: int) -> torch.Tensor:
    """3x3 cells, cell i (row-major) filled with the value 20 * (i + 1)."""
    x = torch.zeros(3, 3 * cell, 3 * cell, dtype=torch.uint8)
    for i, (r, c) in enumerate(itertools.product(range(3), range(3))):
        x[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 20 * (i + 1)
    return x


def test_tiles_are_the_known_cells_in_permutation_order():
    perms = hamming_permutation_set(10, seed=0)
    views = JigsawViews(tile_size=6, cell_size=8, permutations=perms, crop_scale=(1.0, 1.0), normalize_tiles=False,
                        mean=(0, 0, 0), std=(1, 1, 1), flip=False)
    img = _cell_coded_image(8)
    labels = set()
    for seed in range(20):
        s = views(img, np.random.default_rng(seed))
        label = int(s["label"])
        labels.add(label)
        tile_values = [round(float(t.mean()) * 255) for t in s["tiles"]]
        assert tile_values == [20 * (int(p) + 1) for p in perms[label]]
        assert all(float(t.std()) < 1e-6 for t in s["tiles"])  # a tile never crosses its cell
    assert len(labels) > 5


def test_tiles_normalised_one_by_one_and_seeded():
    perms = hamming_permutation_set(10, seed=0)
    views = JigsawViews(tile_size=6, cell_size=8, permutations=perms)
    img = torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8)
    s = views(img, np.random.default_rng(1))
    torch.testing.assert_close(s["tiles"].mean(dim=(2, 3)), torch.zeros(9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s["tiles"].std(dim=(2, 3)), torch.ones(9, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(views(img, np.random.default_rng(1))["tiles"], s["tiles"])
    batch = collate_jigsaw([s, s])
    assert batch["tiles"].shape == (2, 9, 3, 6, 6) and batch["label"].shape == (2,)


def test_head_depends_on_tile_order_and_loss_is_cross_entropy():
    torch.manual_seed(0)
    head = JigsawHead(4, n_permutations=10, tile_dim=8, hidden_dim=16)
    x = torch.randn(3, 9, 4)
    logits = head(x)
    assert logits.shape == (3, 10)
    assert not torch.allclose(logits, head(x[:, torch.randperm(9)]))
    labels = torch.tensor([1, 9, 0])
    torch.testing.assert_close(jigsaw_loss(logits, labels),
                               -F.log_softmax(logits, 1)[torch.arange(3), labels].mean())
    with pytest.raises(DinoflowError, match="tile embeddings"):
        head(torch.randn(3, 8, 4))


def test_bad_parameters():
    with pytest.raises(DinoflowError, match="n_permutations"):
        hamming_permutation_set(7, n_tiles=3)
    with pytest.raises(DinoflowError, match="tile_size"):
        JigsawViews(tile_size=9, cell_size=8, permutations=hamming_permutation_set(10))
    with pytest.raises(DinoflowError, match="permutations"):
        JigsawViews(tile_size=6, cell_size=8, permutations=np.zeros((3, 9), dtype=int))
