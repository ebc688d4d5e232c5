"""Known-answer tests of the exact and sampled all-pairs Spearman (dinoflow.evaluate.spearman)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from dinoflow.errors import DinoflowError
from dinoflow.evaluate.spearman import (
    _TieGroups,
    exact_pair_spearman,
    float_keys,
    pair_blocks,
    sample_pairs,
    sampled_pair_spearman,
    spearman_with_bootstrap,
)


def _reference(xa, xb):
    iu = np.triu_indices(xa.shape[0], k=1)
    return spearmanr((xa @ xa.T)[iu], (xb @ xb.T)[iu]).statistic


def _tied(n, seed):
    """Small integer vectors: dot products are small integers, so most pair values are tied."""
    rng = np.random.default_rng(seed)
    xa = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    xb = (xa[:, :2] + rng.integers(-1, 2, size=(n, 2))).astype(np.float32)
    return xa, xb


def _continuous(n, seed):
    rng = np.random.default_rng(seed)
    xa = rng.normal(size=(n, 8)).astype(np.float32)
    xb = (xa[:, :4] + rng.normal(size=(n, 4))).astype(np.float32)
    return xa, xb


def test_float_keys_preserve_order_and_merge_signed_zeros():
    v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 2.0, 3.0e38], dtype=np.float32)
    v = v[np.isfinite(v)]
    k = float_keys(v)
    assert (np.diff(k.astype(np.int64)) >= 0).all()
    assert k[2] == k[3]  # -0.0 and 0.0 tie, as scipy treats them
    rng = np.random.default_rng(0)
    w = rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-20, 20, size=1000)
    np.testing.assert_array_equal(np.argsort(float_keys(w), kind="stable"), np.argsort(w, kind="stable"))
    with pytest.raises(DinoflowError, match="NaN"):
        float_keys(np.array([0.5, np.nan], dtype=np.float32))


def test_pair_blocks_cover_the_upper_triangle_once():
    xa, xb = _continuous(37, 1)
    a = np.concatenate([blk[0] for blk in pair_blocks(xa, xb, block_elements=50)])
    iu = np.triu_indices(37, k=1)
    np.testing.assert_allclose(np.sort(a), np.sort((xa @ xa.T)[iu]), rtol=1e-5, atol=1e-5)
    assert a.size == 37 * 36 // 2


@pytest.mark.parametrize("data", [_tied, _continuous])
@pytest.mark.parametrize("budget, dense_min", [(0, 1), (256 << 10, 1), (1 << 20, 1), (4 << 20, 1),
                                               (512 << 20, 1 << 14)])
def test_exact_equals_scipy(data, budget, dense_min):
    """All storage paths (sorted sparse keys only, some dense tables, all dense) give scipy's value."""
    xa, xb = data(120, 3)
    res = exact_pair_spearman(xa, xb, block_elements=700, table_budget_bytes=budget, dense_min_count=dense_min)
    assert res.n_pairs == 120 * 119 // 2
    assert res.spearman == pytest.approx(_reference(xa, xb), abs=1e-12)


def test_exact_uses_dense_tables_when_allowed():
    xa, xb = _tied(150, 4)
    res = exact_pair_spearman(xa, xb, table_budget_bytes=4 << 20, dense_min_count=1)
    assert res.table_bytes > 0 and res.n_tail_a < res.n_pairs  # the dense path really ran
    assert res.spearman == pytest.approx(_reference(xa, xb), abs=1e-12)


def test_exact_needs_three_items():
    xa, xb = _continuous(2, 0)
    with pytest.raises(DinoflowError, match="at least 3"):
        exact_pair_spearman(xa, xb)


def test_tie_groups_rank_like_scipy_under_multiplicities():
    rng = np.random.default_rng(5)
    v = rng.integers(0, 20, size=300).astype(np.float64)
    g = _TieGroups(v)
    np.testing.assert_allclose(g.ranks(None), rankdata(v))
    w = np.bincount(rng.integers(0, 300, size=300), minlength=300)
    expanded = np.repeat(v, w)
    ranks_of_copies = rankdata(expanded)
    first_copy = np.cumsum(w) - w  # each element's first copy in the expanded array
    present = w > 0
    np.testing.assert_allclose(g.ranks(w.astype(float))[present], ranks_of_copies[first_copy[present]])


def test_weighted_bootstrap_statistic_equals_scipy_on_expanded_sample():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 10, size=200).astype(float)
    b = a + rng.integers(0, 6, size=200)
    rho, lo, hi = spearman_with_bootstrap(a, b, 0, rng)
    assert rho == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_sample_pairs_uniform_and_ordered():
    rng = np.random.default_rng(7)
    i, j = sample_pairs(5, 100_000, rng)
    assert (i < j).all() and i.size == 100_000
    counts = np.bincount(i * 5 + j, minlength=25)
    pair_counts = counts[counts > 0]
    assert pair_counts.size == 10  # every one of the 10 pairs occurs
    expected = 100_000 / 10
    assert np.abs(pair_counts - expected).max() < 5 * np.sqrt(expected)


def test_sampled_interval_covers_exact_value():
    """The bootstrap 95% interval of the sampled estimate covers the exact all-pairs value in most runs."""
    xa, xb = _continuous(300, 8)
    exact = exact_pair_spearman(xa, xb).spearman
    covered, errors = 0, []
    for seed in range(20):
        res = sampled_pair_spearman(xa, xb, 4000, 200, np.random.default_rng(seed))
        covered += res.ci_low <= exact <= res.ci_high
        errors.append(abs(res.spearman - exact))
        assert res.ci_low < res.spearman < res.ci_high
    assert covered >= 16  # 95% nominal: P(fewer than 16 of 20) < 0.3% if calibrated
    assert np.mean(errors) < 0.03


def test_sampled_is_seeded():
    xa, xb = _continuous(50, 9)
    a = sampled_pair_spearman(xa, xb, 500, 20, np.random.default_rng(3))
    b = sampled_pair_spearman(xa, xb, 500, 20, np.random.default_rng(3))
    assert a == b
