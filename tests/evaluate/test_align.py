"""Alignment metrics: planted image-text structure, Mantel calibration, mutual-kNN, per-query Spearman, main."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from dinoflow import paths
from dinoflow.evaluate import align
from dinoflow.evaluate.align import align_field, mantel_test, mutual_knn, query_spearman
from dinoflow.evaluate.vectors import l2_normalize, write_vectors
from dinoflow.utils import read_json, write_json

CFG = {"exact_max_n": 1000, "n_sampled_pairs": 3000, "n_bootstrap": 50, "n_permutations": 49, "mutual_knn_k": 5}
NCFG = {"exact_max_n": 10_000, "block_size": 64}


def planted(n, seed, noise=0.3):
    """Items in 6 latent classes: text says the class; a 'seeing' image embedding has the class plus noise."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 6, size=n)
    centres = rng.normal(size=(6, 16))
    text = centres[cls] @ rng.normal(size=(16, 24)) + noise * rng.normal(size=(n, 24))
    seeing = centres[cls] + noise * rng.normal(size=(n, 16))
    random = rng.normal(size=(n, 16))
    return seeing, random, text


def test_planted_structure_high_for_seeing_embedding_and_zero_for_random():
    seeing, random, text = planted(150, 0)
    good = align_field(seeing, text, CFG, NCFG, np.random.default_rng(0))
    bad = align_field(random, text, CFG, NCFG, np.random.default_rng(0))
    assert good["method"] == "exact" and good["n_pairs"] == 150 * 149 // 2
    assert good["spearman"] > 0.6 and good["mean_query_spearman"] > 0.5 and good["mutual_knn"] > 0.15  # chance: 5 / 149
    assert good["mantel_p"] == pytest.approx(1 / 50)
    assert abs(bad["spearman"]) < 0.05 and abs(bad["mean_query_spearman"]) < 0.05
    assert bad["mutual_knn"] < 0.1 and bad["mantel_p"] > 0.05


def test_exact_value_matches_scipy_on_cosines():
    seeing, _, text = planted(60, 1)
    out = align_field(seeing, text, CFG, NCFG, np.random.default_rng(0))
    a, b = l2_normalize(seeing), l2_normalize(text)
    iu = np.triu_indices(60, k=1)
    assert out["spearman"] == pytest.approx(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic, abs=1e-9)


def test_sampled_mode_interval_covers_exact():
    seeing, _, text = planted(200, 2, noise=1.5)
    exact = align_field(seeing, text, CFG, NCFG, np.random.default_rng(0))
    sampled = align_field(seeing, text, dict(CFG, exact_max_n=100, n_bootstrap=200), NCFG,
                          np.random.default_rng(1))
    assert sampled["method"] == "sampled" and sampled["n_pairs"] == 3000
    assert sampled["ci_low"] <= exact["spearman"] <= sampled["ci_high"]
    assert sampled["n_queries"] == 100


def test_mutual_knn_identical_spaces_is_one_and_reference():
    x = np.random.default_rng(3).normal(size=(80, 10))
    out = align_field(x, x.copy(), CFG, NCFG, np.random.default_rng(0))
    assert out["mutual_knn"] == pytest.approx(1.0)
    assert out["spearman"] == pytest.approx(1.0)
    a = np.array([[1, 2, 3], [0, 2, 4]])
    b = np.array([[3, 9, 1], [5, 6, 7]])
    assert mutual_knn(a, b) == pytest.approx((2 / 3 + 0) / 2)


def test_mantel_p_small_for_related_and_uniform_for_unrelated():
    seeing, _, text = planted(40, 4, noise=0.8)
    p, _, n_items = mantel_test(l2_normalize(seeing), l2_normalize(text), 99, 10_000, np.random.default_rng(0))
    assert p == pytest.approx(0.01) and n_items == 40
    ps = []
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        a, b = l2_normalize(rng.normal(size=(25, 6))), l2_normalize(rng.normal(size=(25, 6)))
        ps.append(mantel_test(a, b, 39, 10_000, rng)[0])
    ps = np.array(ps)
    # Under the null the p-value is uniform on {1/40, ..., 1}: mean 0.51, P(p <= 0.05) = 0.05.
    assert 0.38 < ps.mean() < 0.64
    assert (ps <= 0.05).mean() <= 0.15


def test_mantel_subsamples_items_above_pair_budget():
    seeing, _, text = planted(100, 5)
    p, rho, n_items = mantel_test(l2_normalize(seeing), l2_normalize(text), 19, 1000, np.random.default_rng(0))
    assert n_items * (n_items - 1) // 2 <= 1000 < (n_items + 1) * n_items // 2
    assert p == pytest.approx(1 / 20) and rho > 0.5


def test_query_spearman_equals_scipy_per_row():
    rng = np.random.default_rng(6)
    a, b = l2_normalize(rng.normal(size=(30, 5))), l2_normalize(rng.normal(size=(30, 5)))
    b[:, 0] += a[:, 0]
    got = query_spearman(a, b, np.array([0, 7, 29]), block_elements=40)
    sa, sb = a @ a.T, b @ b.T
    for q, g in zip([0, 7, 29], got):
        keep = np.arange(30) != q
        assert g == pytest.approx(spearmanr(sa[q, keep], sb[q, keep]).statistic, abs=1e-9)


def test_main_writes_metrics_per_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seeing, _, text = planted(40, 7)
    ids = [f"im{i}" for i in range(40)]
    write_vectors(paths.embeddings("m"), ids, {"cls": seeing, "patch_mean": seeing},
                  {"model": "m", "stand_in": False, "stand_in_label": ""})
    # captions for 30 items (in another order), keywords for only 3: the latter is skipped with its counts
    order = np.random.default_rng(0).permutation(40)[:30]
    write_vectors(paths.text_embeddings("caption"), [ids[i] for i in order], {"embedding": text[order]},
                  {"text_model": "t"})
    write_vectors(paths.text_embeddings("keywords"), ids[:3], {"embedding": text[:3]}, {"text_model": "t"})
    write_json(paths.TEXT_METRICS, {"quality": {"caption": {"warning": "12 of 30 texts mostly [UNK]"},
                                                "keywords": {"warning": None}}})
    params = {"seed": 0, "align": CFG, "neighbours": NCFG}
    align.main(params, model="m")
    out = read_json(paths.align_metrics("m"))
    cap = out["fields"]["caption"]
    assert cap["text_warning"] == "12 of 30 texts mostly [UNK]" and out["fields"]["keywords"]["text_warning"] is None
    assert cap["n_items"] == 30 and cap["n_without_text"] == 10 and cap["n_pairs"] == 435
    for key in ("spearman", "ci_low", "ci_high", "method", "mantel_p", "mean_query_spearman", "mutual_knn"):
        assert key in cap
    direct = align_field(seeing[np.sort(order)], text[np.sort(order)], CFG, NCFG, np.random.default_rng(0))
    assert cap["spearman"] == pytest.approx(direct["spearman"], abs=1e-9)  # rows matched by id, not position
    assert out["fields"]["keywords"]["n_items"] == 3 and "skipped" in out["fields"]["keywords"]
