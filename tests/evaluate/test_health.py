import numpy as np
import pytest

from dinoflow.evaluate.health import rankme


def test_rankme_matches_formula_and_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert 12 < rankme(x) <= 16
    line = np.outer(rng.normal(size=100), rng.normal(size=8))
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    assert rankme(np.zeros((5, 3))) == 0.0


def test_rankme_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        rankme(np.array([[np.nan, 1.0]]))


# ----------------------------------------------------------------------------------------- embedding health
from dinoflow.errors import DinoflowError  # noqa: E402
from dinoflow.evaluate.health import (HealthConfig, embedding_health, float32_cosine_resolution,  # noqa: E402
                                      pair_cosines, sample_pairs)
from _embedding_fixtures import common_vector_features, layerscale_vit_features  # noqa: E402

CFG = HealthConfig(n_pairs=200_000, rankme_rows=10_000, min_rankme=2.0)


def health(x, center=True, cfg=CFG):
    return embedding_health(x, center=center, similarity="centred cosine, float64", cfg=cfg, seed=0, model="m")


@pytest.mark.parametrize("make", [lambda: layerscale_vit_features(1e-5), common_vector_features],
                         ids=["layerscale-1e-5-vit", "common-vector+1e-6"])
def test_detector_fires_on_near_identical_embeddings(make):
    h = health(make())
    assert h["degenerate"] is True
    assert "within float32 resolution" in h["reason"] and "RankMe" in h["reason"]
    assert h["rankme"] < 1.01  # one dominant direction
    raw, used = h["cosine_raw"], h["cosine_used"]
    assert raw["p99"] - raw["p01"] < float32_cosine_resolution(h["dim"]) and raw["median"] > 1 - 1e-6
    # the used (centred) similarity still spreads: it is what the neighbours rank by
    assert used["p99"] - used["p01"] > 0.3 and abs(used["median"]) < 0.2
    assert set(h) >= {"model", "n", "dim", "cosine_raw", "cosine_used", "rankme", "degenerate", "reason",
                      "similarity"}
    assert set(raw) == set(used) == {"median", "p01", "p99", "std"}


@pytest.mark.parametrize("make", [lambda: layerscale_vit_features(1.0),
                                  lambda: np.random.default_rng(1).normal(size=(300, 48)).astype(np.float32)],
                         ids=["layerscale-1-vit", "gaussian"])
def test_detector_stays_quiet_on_healthy_embeddings(make):
    h = health(make())
    assert h["degenerate"] is False and h["reason"] is None
    assert h["rankme"] > 5


def test_rank_bound_and_identical_rows_are_reasons_of_their_own():
    rng = np.random.default_rng(2)
    x = np.zeros((200, 16))
    x[:, 0], x[:, 1] = rng.normal(size=200), 0.1 * rng.normal(size=200)  # wide cosines, ~1.3 effective dims
    h = health(x)
    assert h["degenerate"] and h["reason"].startswith("RankMe") and "float32" not in h["reason"]
    same = np.tile(rng.normal(size=8), (10, 1))
    h = health(same)
    assert h["degenerate"] and "identical" in h["reason"] and h["cosine_used"]["std"] == 0.0


def test_pairs_all_when_few_else_seeded_uniform_sample():
    i, j = sample_pairs(6, 100, seed=0)
    assert len(i) == 15 and (i < j).all() and len(set(zip(i, j))) == 15
    i, j = sample_pairs(5000, 20_000, seed=3)
    assert len(i) == 20_000 and (i != j).all() and i.min() >= 0 and j.max() < 5000
    i2, j2 = sample_pairs(5000, 20_000, seed=3)
    assert (i == i2).all() and (j == j2).all()
    # uniform: the partner offset j - i (mod n) covers 1..n-1 evenly (chi-square-free check on quartiles)
    offset = (j - i) % 5000
    counts = np.histogram(offset, bins=4, range=(1, 5000))[0]
    assert counts.min() > 0.9 * counts.mean()


def test_pair_cosines_against_sklearn_and_memory_blocks(monkeypatch):
    from sklearn.metrics.pairwise import cosine_similarity

    import dinoflow.evaluate.health as H

    monkeypatch.setattr(H, "PAIR_BLOCK", 7)  # several blocks, each centred on the whole collection's mean
    x = (np.random.default_rng(4).normal(size=(40, 5)) + 2).astype(np.float32)
    i, j = sample_pairs(40, 10_000, seed=0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(pair_cosines(x, i, j, center=False), cosine_similarity(x64)[i, j], atol=1e-12)
    np.testing.assert_allclose(pair_cosines(x, i, j, center=True),
                               cosine_similarity(x64 - x64.mean(axis=0))[i, j], atol=1e-12)


def test_health_on_sampled_pairs_and_rows_is_seeded_and_bounded():
    x = np.random.default_rng(5).normal(size=(3000, 8)).astype(np.float32)
    cfg = HealthConfig(n_pairs=5000, rankme_rows=500, min_rankme=2.0)
    a, b = health(x, cfg=cfg), health(x, cfg=cfg)
    assert a == b and a["n_pairs"] == 5000 and a["n_rankme_rows"] == 500
    assert abs(a["cosine_raw"]["median"]) < 0.05 and 7 < a["rankme"] <= 8


def test_bad_input_and_config_are_named():
    with pytest.raises(DinoflowError, match="emb.parquet: the embeddings hold NaN"):
        embedding_health(np.array([[1.0, np.nan], [0.0, 1.0]]), center=True, similarity="s", cfg=CFG, seed=0,
                         model="m", source="emb.parquet")
    with pytest.raises(DinoflowError, match="at least 2 embeddings"):
        health(np.ones((1, 3)))
    with pytest.raises(DinoflowError, match="health.n_pairs"):
        HealthConfig.from_params({"health": {"n_pairs": 0, "rankme_rows": 5, "min_rankme": 2}})
    with pytest.raises(DinoflowError, match="health.min_rankme"):
        HealthConfig.from_params({"health": {"n_pairs": 3, "rankme_rows": 5, "min_rankme": 0.5}})
    with pytest.raises(DinoflowError, match="`health` section is missing"):
        HealthConfig.from_params({})
    assert HealthConfig.from_params({"health": {"n_pairs": 3, "rankme_rows": 5, "min_rankme": 2}}) == \
        HealthConfig(3, 5, 2.0)
