"""Neighbour search: exact blocked search and the FAISS path against brute force; the used (centred) similarity
against rounding; the stage's outputs (neighbours and health)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import neighbours
from dinoflow.evaluate.neighbours import _drop_self, exact_topk, faiss_topk, similarity_rows, topk_neighbours
from dinoflow.evaluate.vectors import l2_normalize, similarity_features, write_vectors
from dinoflow.utils import read_json
from _embedding_fixtures import common_vector_features, layerscale_vit_features


def brute_force(x, k):
    """Reference: full cosine matrix, Python sort per row (score desc, index asc), self skipped."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
    out = []
    for i in range(len(x)):
        order = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sims[i, j], j))
        out.append(order[:k])
    return np.array(out), sims


@pytest.mark.parametrize("n, block", [(60, 7), (101, 4096), (33, 1)])
def test_exact_blocked_equals_brute_force(n, block):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    ref, sims = brute_force(x, 5)
    idx, val = exact_topk(l2_normalize(x), 5, block_size=block)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(val, np.take_along_axis(sims, ref, axis=1), atol=1e-5)
    assert (np.diff(val, axis=1) <= 1e-7).all()


def test_exact_with_queries_and_block_cap(monkeypatch):
    monkeypatch.setattr(neighbours, "MAX_BLOCK_ELEMENTS", 50)  # forces 1-row blocks for 60 columns
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(60, 8)))
    q = l2_normalize(rng.normal(size=(9, 8)))
    idx, val = exact_topk(x, 4, queries=q, exclude_self=False)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(idx, ref)


def test_k_larger_than_collection_is_clamped():
    x = l2_normalize(np.random.default_rng(2).normal(size=(4, 3)))
    idx, _ = exact_topk(x, 10)
    assert idx.shape == (4, 3)
    assert all(i not in row for i, row in enumerate(idx))
    with pytest.raises(DinoflowError, match="k"):
        exact_topk(x, 0)


def test_faiss_flat_equals_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    ref, _ = brute_force(x, 7)
    idx, _ = faiss_topk(l2_normalize(x), 7, index="flat")
    np.testing.assert_array_equal(idx, ref)


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_faiss_approximate_indexes_on_small_data(index):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    ref, sims = brute_force(x, 10)
    idx, val = faiss_topk(l2_normalize(x), 10, index=index)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref)])
    assert recall >= 0.98
    assert all(i not in row for i, row in enumerate(idx))
    np.testing.assert_allclose(val, np.take_along_axis(sims, idx, axis=1), atol=1e-4)


def test_drop_self_when_index_misses_the_query():
    ids = np.array([[0, 5, 6], [7, 8, 9]])  # row 1 lacks itself: its weakest hit goes
    scores = np.array([[1.0, 0.9, 0.8], [0.7, 0.6, 0.5]], dtype=np.float32)
    i, s = _drop_self(ids, scores, 2)
    np.testing.assert_array_equal(i, [[5, 6], [7, 8]])
    np.testing.assert_allclose(s, [[0.9, 0.8], [0.7, 0.6]])


def test_ivf_probing_every_list_equals_brute_force():
    """With nprobe = nlist IVF scans every vector: exactly the brute-force answer, whatever the training did."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    ref, sims = brute_force(x, 6)
    idx, val = faiss_topk(l2_normalize(x), 6, index="ivf", nlist=10, nprobe=10, train_size=200)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(val, np.take_along_axis(sims, ref, axis=1), atol=1e-5)


def test_ivf_default_nlist_rule_and_seeded_build():
    from dinoflow.evaluate.neighbours import build_faiss_index, ivf_nlist

    assert ivf_nlist(1_000_000) == 4000 and ivf_nlist(390) == 10 and ivf_nlist(10) == 1
    x = l2_normalize(np.random.default_rng(8).normal(size=(2000, 8)))
    a, b = (faiss_topk(x, 5, index="ivf", seed=3, nprobe=2) for _ in range(2))
    np.testing.assert_array_equal(a[0], b[0])
    index = build_faiss_index(x, "ivf", nprobe=500)
    assert index.nlist == ivf_nlist(2000) and index.nprobe == index.nlist  # nprobe is capped at nlist


def test_drop_self_for_a_subset_of_queries():
    ids = np.array([[40, 5, 6], [7, 8, 9]])  # queries are rows 40 and 12 of the data; 12 is missing
    scores = np.array([[1.0, 0.9, 0.8], [0.7, 0.6, 0.5]], dtype=np.float32)
    i, _ = _drop_self(ids, scores, 2, self_ids=np.array([40, 12]))
    np.testing.assert_array_equal(i, [[5, 6], [7, 8]])


def test_default_faiss_path_is_ivf_with_configured_nprobe():
    x = np.random.default_rng(9).normal(size=(300, 8)).astype(np.float32)
    ref, _ = brute_force(x, 4)
    idx, _, method = topk_neighbours(x, 4, {"exact_max_n": 100, "block_size": 16, "faiss_nprobe": 10**6})
    assert method == "faiss-ivf"
    np.testing.assert_array_equal(idx, ref)  # nprobe capped at nlist: every list scanned, so exact


def test_dispatch_between_exact_and_faiss():
    x = np.random.default_rng(5).normal(size=(50, 8)).astype(np.float32)
    _, _, m1 = topk_neighbours(x, 3, {"exact_max_n": 50, "block_size": 16})
    _, _, m2 = topk_neighbours(x, 3, {"exact_max_n": 49, "block_size": 16, "faiss_index": "flat"})
    assert (m1, m2) == ("exact", "faiss-flat")


HEALTH = {"n_pairs": 1000, "rankme_rows": 100, "min_rankme": 2.0}


@pytest.mark.parametrize("center", [True, False])
def test_main_writes_long_table_and_health(tmp_path, monkeypatch, center):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(30, 8)) + 3.0).astype(np.float32)  # a common offset: centring changes the ranking
    ids = [f"im{i}" for i in range(30)]
    write_vectors(paths.embeddings("m"), ids, {"cls": x, "patch_mean": x}, {"model": "m", "stand_in": False})
    params = {"seed": 0, "neighbours": {"k": 4, "exact_max_n": 1000, "block_size": 8},
              "similarity": {"center": center}, "health": HEALTH}
    neighbours.main(params, model="m")
    table = pq.read_table(paths.neighbours("m"))
    t = table.to_pandas()
    assert list(t.columns) == ["query_id", "rank", "neighbour_id", "score"]
    assert t["score"].dtype == np.float64
    assert len(t) == 30 * 4 and (t["query_id"] != t["neighbour_id"]).all()
    ref, sims = brute_force(x - x.astype(np.float64).mean(axis=0) if center else x, 4)
    got = t.sort_values(["query_id", "rank"]).groupby("query_id")
    for i, name in enumerate(ids):
        part = got.get_group(name)
        assert part["neighbour_id"].tolist() == [ids[j] for j in ref[i]]
        np.testing.assert_allclose(part["score"], sims[i, ref[i]], rtol=0, atol=1e-6)
    assert t["rank"].min() == 1 and t["rank"].max() == 4
    meta = json.loads(table.schema.metadata[b"dinoflow"])
    expected = "centred cosine, float64" if center else "cosine, float64"
    assert meta["similarity"] == expected and meta["neighbours_method"] == "exact"
    assert meta["neighbours_precision"] == "float64"
    health = read_json(paths.health_metrics("m"))
    assert health["similarity"] == expected and health["n"] == 30 and health["dim"] == 8
    assert not health["degenerate"] and health["reason"] is None


def test_main_refuses_a_missing_similarity_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    write_vectors(paths.embeddings("m"), list("abcde"), {"cls": x}, {"model": "m"})
    params = {"seed": 0, "neighbours": {"k": 2, "exact_max_n": 10, "block_size": 8}, "health": HEALTH}
    with pytest.raises(DinoflowError, match="similarity"):
        neighbours.main(params, model="m")
    params["similarity"] = {"center": "yes"}
    with pytest.raises(DinoflowError, match=r"similarity\.center"):
        neighbours.main(params, model="m")


# ------------------------------------------------------------------------------------------ rounding robustness
def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of row i's top-k of `a` also in row i's top-k of `b`."""
    return float(np.mean([len(set(r) & set(s)) / a.shape[1] for r, s in zip(a, b)]))


@pytest.mark.parametrize("make", [lambda: layerscale_vit_features(1e-5), common_vector_features],
                         ids=["layerscale-1e-5-vit", "common-vector+1e-6"])
def test_used_similarity_is_independent_of_rounding(make):
    """float32 and float64 top-10 of the used (centred) similarity agree; the raw float32 cosine does not: its
    top-10 overlaps the float64 one at about chance level (10 / (N - 1))."""
    x = make()
    n = len(x)
    x64 = x.astype(np.float64)
    raw64, _ = exact_topk(x64 / np.linalg.norm(x64, axis=1, keepdims=True), 10)
    raw32, _ = exact_topk(l2_normalize(x), 10)
    assert raw32.dtype == np.int64
    assert _overlap(raw32, raw64) < 0.3, "raw float32 cosines should be rounding noise here"
    used64, val64, m64 = topk_neighbours(x, 10, {"exact_max_n": n, "block_size": 64}, center=True)
    assert m64 == "exact" and val64.dtype == np.float64
    used32, _ = exact_topk(similarity_rows(x, center=True, dtype=np.float32), 10)  # float32 arithmetic
    assert _overlap(used32, used64) >= 0.99
    faiss32, _, m32 = topk_neighbours(x, 10, {"exact_max_n": n - 1, "block_size": 64, "faiss_index": "flat"},
                                      center=True)
    assert m32 == "faiss-flat"
    assert _overlap(faiss32, used64) >= 0.99
    # the reference: sklearn's cosine of the float64-centred embeddings
    from sklearn.metrics.pairwise import cosine_similarity

    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    sims = cosine_similarity(xc)
    np.fill_diagonal(sims, -np.inf)
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert _overlap(ref, used64) >= 0.999


def test_similarity_rows_are_blocked_features_on_the_collection_mean():
    x = (np.random.default_rng(12).normal(size=(50, 6)) + 5).astype(np.float32)
    full = similarity_features(x, center=True)
    for dtype in (np.float64, np.float32):
        rows = similarity_rows(x, center=True, dtype=dtype, block=7)  # blocks centred on the whole mean
        assert rows.dtype == dtype
        np.testing.assert_allclose(rows, full, atol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(similarity_rows(x, center=False, block=7),
                               x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), atol=1e-13)


def test_unknown_faiss_index_is_reported_with_its_parameter():
    x = l2_normalize(np.random.default_rng(10).normal(size=(20, 4)))
    with pytest.raises(DinoflowError, match="neighbours.faiss_index.*ivf, hnsw, flat"):
        faiss_topk(x, 3, index="lsh")
