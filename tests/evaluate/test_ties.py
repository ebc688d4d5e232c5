"""Tie-aware top-k statistics against brute force over every tie-breaking order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dinoflow.evaluate.ties import UniqueRows, expected_topk_hit, inclusion_probabilities, mutual_knn_overlap
from dinoflow.evaluate.vectors import similarity_features


def brute_inclusion(row: np.ndarray, k: int) -> np.ndarray:
    """Average over every permutation used as a tie-breaker: sort by (value desc, position in permutation)."""
    finite = np.flatnonzero(np.isfinite(row))
    hits = np.zeros(row.size)
    perms = list(itertools.permutations(finite))
    for perm in perms:
        rank = {j: r for r, j in enumerate(perm)}
        order = sorted(finite, key=lambda j: (-row[j], rank[j]))
        hits[order[:k]] += 1
    return hits / len(perms)


def test_inclusion_probabilities_equal_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(30):
        m = int(rng.integers(2, 7))
        row = rng.integers(0, 3, size=m).astype(float)  # heavy ties
        if trial % 3 == 0:
            row[rng.integers(0, m)] = -np.inf            # the excluded query itself
        k = int(rng.integers(1, m + 1))
        got = inclusion_probabilities(row[None, :], k)[0]
        np.testing.assert_allclose(got, brute_inclusion(row, k), atol=1e-12)
        assert got.sum() == pytest.approx(min(k, np.isfinite(row).sum()))


def test_inclusion_without_ties_is_plain_topk():
    row = np.array([[0.3, 0.9, 0.1, 0.5]])
    np.testing.assert_array_equal(inclusion_probabilities(row, 2), [[0, 1, 0, 1]])
    with pytest.raises(ValueError):
        inclusion_probabilities(np.array([[np.nan, 1.0]]), 1)


def test_expected_topk_hit_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(40):
        c = int(rng.integers(2, 6))
        scores = rng.integers(0, 3, size=(1, c)).astype(float)
        y = np.array([int(rng.integers(0, c))])
        k = int(rng.integers(1, c + 1))
        # brute force: every order of the classes as tie-breaker
        hits = [y[0] in sorted(range(c), key=lambda j: (-scores[0, j], perm.index(j)))[:k]
                for perm in itertools.permutations(range(c))]
        assert expected_topk_hit(scores, y, k)[0] == pytest.approx(np.mean(hits))


def test_expected_topk_hit_handles_impossible_classes_and_near_ties():
    scores = np.array([[0.5, -np.inf, 0.5], [0.2, 0.3 + 1e-15, 0.3]])
    np.testing.assert_allclose(expected_topk_hit(scores, np.array([1, 2]), 1), [0.0, 0.5])
    np.testing.assert_allclose(expected_topk_hit(scores, np.array([1, 0]), 3), [1.0, 1.0])


def brute_mutual_knn(fa: np.ndarray, fb: np.ndarray, k: int) -> np.ndarray:
    """Per item: average |kNN_a & kNN_b| / k over all pairs of tie-breaking orders (independent in a and b)."""
    n = fa.shape[0]
    out = []
    for i in range(n):
        sets = []
        for f in (fa, fb):
            row = f @ f[i]
            row = np.round(row, 12)  # duplicates: equal values
            row[i] = -np.inf
            others = [j for j in range(n) if j != i]
            sets.append([frozenset(sorted(others, key=lambda j: (-row[j], perm.index(j)))[:k])
                         for perm in itertools.permutations(others)])
        total = [len(sa & sb) for sa in sets[0] for sb in sets[1]]
        out.append(np.mean(total) / k)
    return np.array(out)


def test_mutual_knn_overlap_equals_brute_force_with_duplicates():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 4))
    fa = similarity_features(base[[0, 0, 1, 2, 2, 1]] + np.array([0, 0, 0, 0, 0, 1e-3])[:, None])
    fb = similarity_features(rng.normal(size=(2, 3))[[0, 1, 0, 1, 0, 0]])  # 4 identical captions, 2 others
    for k in (1, 2, 3):
        np.testing.assert_allclose(mutual_knn_overlap(fa, fb, k), brute_mutual_knn(fa, fb, k), atol=1e-12)


def test_constant_text_gives_exactly_chance_and_identical_spaces_give_one():
    rng = np.random.default_rng(3)
    img = similarity_features(rng.normal(size=(16, 8)))
    const = np.ones((16, 5))  # sixteen images all captioned "holiday photo"
    overlap = mutual_knn_overlap(img, const, k=10)
    np.testing.assert_allclose(overlap, 10 / 15)  # chance, not the 0.744 index order gave
    np.testing.assert_allclose(mutual_knn_overlap(img, img.copy(), k=5), 1.0)
    np.testing.assert_allclose(mutual_knn_overlap(img, img, 5, queries=np.array([3, 7])), 1.0)


def test_unique_rows_give_bit_identical_similarities_for_duplicates():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 33))
    x = x[[0, 1, 0, 2, 3, 0, 4]]
    u = UniqueRows(x)
    s = u.sims(np.arange(7), u)
    assert u.n_unique == 5 and u.modal_share() == pytest.approx(3 / 7)
    assert s[1, 0] == s[1, 2] == s[1, 5] and s[3, 0] == s[3, 5]
