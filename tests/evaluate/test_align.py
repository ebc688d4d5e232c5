"""Alignment metrics: planted image-text structure, Mantel calibration, tie-aware mutual-kNN, per-query Spearman,
degenerate fields (null + reason, strict JSON), main."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from dinoflow import paths
from dinoflow.evaluate import align
from dinoflow.evaluate.align import align_field, mantel_test, mutual_knn, query_spearman
from dinoflow.evaluate.vectors import l2_normalize, similarity_features, write_vectors
from dinoflow.utils import read_json, write_json

CFG = {"exact_max_n": 1000, "n_sampled_pairs": 3000, "n_permutations": 49, "mutual_knn_k": 5,
       "near_constant_share": 0.9}


def run(img, txt, cfg=CFG, seed=0, field="caption"):
    return align_field(img, txt, cfg, np.random.default_rng(seed), field=field)[0]


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
    good = run(seeing, text)
    bad = run(random, text)
    assert good["method"] == "exact" and good["n_pairs"] == 150 * 149 // 2
    assert good["spearman"] > 0.6 and good["mean_query_spearman"] > 0.5 and good["mutual_knn"] > 0.15  # chance: 5 / 149
    assert good["mantel_p"] == pytest.approx(1 / 50)
    assert abs(bad["spearman"]) < 0.05 and abs(bad["mean_query_spearman"]) < 0.05
    assert bad["mutual_knn"] < 0.1 and bad["mantel_p"] > 0.05
    assert good["reason"] is None and good["mutual_knn_chance"] == pytest.approx(5 / 149)


def test_exact_value_matches_scipy_on_cosines():
    seeing, _, text = planted(60, 1)
    out = run(seeing, text)
    a, b = similarity_features(seeing), similarity_features(text)
    iu = np.triu_indices(60, k=1)
    # the exact all-pairs code ranks float32 similarities: float32 rounding moves rho by ~1e-7
    assert out["spearman"] == pytest.approx(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic, abs=1e-6)


def test_sampled_mode_estimates_the_exact_value():
    seeing, _, text = planted(200, 2, noise=1.5)
    exact = run(seeing, text)
    sampled = run(seeing, text, dict(CFG, exact_max_n=100, n_sampled_pairs=6000), seed=1)
    assert sampled["method"] == "sampled" and sampled["n_pairs"] == 6000
    assert sampled["spearman"] == pytest.approx(exact["spearman"], abs=0.05)  # SE ~ 1 / sqrt(6000)
    assert sampled["n_queries"] == 100 and sampled["n_mutual_knn_queries"] == 100
    assert "ci_low" not in exact  # the zero-width "interval" of an exact value is gone (see compare)


def test_mutual_knn_identical_spaces_is_one_and_reference():
    x = np.random.default_rng(3).normal(size=(80, 10))
    out = run(x, x.copy())
    assert out["mutual_knn"] == pytest.approx(1.0)
    assert out["spearman"] == pytest.approx(1.0)
    a = np.array([[1, 2, 3], [0, 2, 4]])
    b = np.array([[3, 9, 1], [5, 6, 7]])
    assert mutual_knn(a, b) == pytest.approx((2 / 3 + 0) / 2)


def test_constant_caption_field_gives_null_and_reason():
    """Sixteen images all captioned "holiday photo": no NaN, no meaningless 0.744, a stated reason."""
    img = np.random.default_rng(8).normal(size=(16, 12))
    txt = np.tile(np.random.default_rng(9).normal(size=(1, 24)), (16, 1))
    out, queries, overlap = align_field(img, txt, CFG, np.random.default_rng(0), field="caption")
    for key in ("spearman", "mantel_p", "mean_query_spearman", "mutual_knn"):
        assert out[key] is None
    assert out["reason"].startswith("all 16 captions are identical")
    assert queries.size == 0 and overlap.size == 0
    json.dumps(out, allow_nan=False)  # strict JSON
    near = txt.copy()
    near[0] += 1.0                    # 15 of 16 identical: 93.8% > near_constant_share
    out = run(img, near)
    assert out["spearman"] is None and "near-constant captions: 93.8%" in out["reason"]
    out = run(np.zeros_like(img), planted(16, 1)[2])  # collapsed image embeddings
    assert out["spearman"] is None and "image embeddings are identical" in out["reason"]


def test_mantel_p_small_for_related_and_uniform_for_unrelated():
    seeing, _, text = planted(40, 4, noise=0.8)
    p, _, n_items = mantel_test(similarity_features(seeing), similarity_features(text), 99, 10_000,
                                np.random.default_rng(0))
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
    params = {"seed": 0, "align": CFG}
    align.main(params, model="m")
    raw = open(paths.align_metrics("m")).read()
    out = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    cap = out["fields"]["caption"]
    assert cap["text_warning"] == "12 of 30 texts mostly [UNK]" and out["fields"]["keywords"]["text_warning"] is None
    assert cap["n_items"] == 30 and cap["n_without_text"] == 10 and cap["n_pairs"] == 435
    for key in ("spearman", "method", "mantel_p", "mean_query_spearman", "mutual_knn", "reason"):
        assert key in cap
    direct = run(seeing[np.sort(order)], text[np.sort(order)])
    assert cap["spearman"] == pytest.approx(direct["spearman"], abs=1e-9)  # rows matched by id, not position
    kw = out["fields"]["keywords"]
    assert kw["n_items"] == 3 and "skipped" in kw and kw["spearman"] is None and "fewer than" in kw["reason"]
    items = pd.read_parquet(paths.align_items("m"))
    assert set(items["field"]) == {"caption"} and len(items) == 30
    assert items["mutual_knn"].mean() == pytest.approx(cap["mutual_knn"])
    assert set(items["id"]) == {ids[i] for i in order}


def test_main_constant_captions_strict_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = np.random.default_rng(1).normal(size=(16, 8))
    ids = [f"im{i}" for i in range(16)]
    write_vectors(paths.embeddings("m"), ids, {"cls": img, "patch_mean": img}, {"model": "m"})
    const = np.tile(np.arange(6.0), (16, 1))  # all "holiday photo"
    for field in ("caption", "keywords"):
        write_vectors(paths.text_embeddings(field), ids, {"embedding": const}, {"text_model": "t"})
    write_json(paths.TEXT_METRICS, {"quality": {"caption": {"warning": None}, "keywords": {"warning": None}}})
    align.main({"seed": 0, "align": CFG}, model="m")
    out = json.loads(open(paths.align_metrics("m")).read(), parse_constant=lambda c: pytest.fail(c))
    assert out["fields"]["caption"]["spearman"] is None
    assert "captions are identical" in out["fields"]["caption"]["reason"]
    assert "keyword descriptors are identical" in out["fields"]["keywords"]["reason"]
