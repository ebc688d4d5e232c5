"""Retrieval grids: query choice, neighbour reading (against brute force) and the figures written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from report_fixtures import brute_force_top, chdir
from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.report.figures import model_row_title, wrap_text
from dinoflow.report.grids import (GRID_QUERIES, grid_figure, query_file_name, read_neighbours_similarity,
                                   read_query_neighbours, score_text, select_queries)
from dinoflow.utils import read_json

OK_IDS = [f"id{i:02d}" for i in range(30)]


def test_select_queries_fixed_first_then_seeded_draw():
    a = select_queries(OK_IDS, ["id07", "id03", "id07"], 5, seed=0)
    assert a["fixed"] == ["id07", "id03"]  # order kept, repeat dropped
    assert a["all"] == a["fixed"] + a["random"]
    assert len(a["random"]) == 5 and len(set(a["random"])) == 5
    assert not set(a["random"]) & {"id07", "id03"} and set(a["random"]) <= set(OK_IDS)
    # Same seed, same draw even when the ok ids arrive in another order; the draw is uniform, so over seeds
    # every id gets drawn (a constant choice would not).
    assert select_queries(list(reversed(OK_IDS)), ["id07", "id03"], 5, seed=0) == a
    drawn = {q for s in range(40) for q in select_queries(OK_IDS, [], 3, seed=s)["random"]}
    assert drawn == set(OK_IDS)


def test_select_queries_caps_and_rejects_unknown_ids():
    assert select_queries(OK_IDS[:3], [], 10, seed=1)["random"] == sorted(OK_IDS[:3])
    with pytest.raises(DinoflowError, match=r"neighbours\.grid_query_ids.*'nope'"):
        select_queries(OK_IDS, ["nope"], 2, seed=0)
    with pytest.raises(DinoflowError, match="grid_random_queries"):
        select_queries(OK_IDS, [], -1, seed=0)


def test_query_file_name_is_safe_and_ordered():
    assert query_file_name(3, "a/b c<>.png") == "query_003_a_b_c_.png.png"
    assert query_file_name(0, "../..") == "query_000_id.png"
    names = [query_file_name(i, "x") for i in (2, 10, 1)]
    assert sorted(names) == [names[2], names[0], names[1]]


def test_wrap_text_truncates_with_ellipsis():
    text = "one two three four five six seven eight nine ten eleven twelve"
    out = wrap_text(text, width=10, max_lines=2)
    assert out.count("\n") == 1 and out.endswith("…")
    assert wrap_text(None) == "" and wrap_text(float("nan")) == ""
    assert wrap_text("short", 10, 2) == "short"


def test_read_query_neighbours_equals_brute_force(report_ws):
    ws, params = report_ws
    root = ws.parent
    k = params["neighbours"]["grid_k"]
    with chdir(ws):
        ok = pd.read_parquet(paths.MANIFEST).query("status == 'ok'")["id"].tolist()
        queries = ok[:4]
        for m in model_names(params):
            emb = np.load(root / f"emb_{m}.npy")
            idx, scores = brute_force_top(emb, k)
            got = read_query_neighbours(paths.neighbours(m), queries, k)
            for q in queries:
                i = ok.index(q)
                assert [n for n, _ in got[q]] == [ok[j] for j in idx[i]]
                np.testing.assert_allclose([s for _, s in got[q]], scores[i], rtol=1e-6)


def test_read_query_neighbours_leaves_out_the_query_itself(tmp_path):
    df = pd.DataFrame({"query_id": ["a", "a", "a"], "rank": [0, 1, 2], "neighbour_id": ["a", "b", "c"],
                       "score": np.array([1.0, 0.5, 0.2], dtype=np.float32)})
    df.to_parquet(tmp_path / "n.parquet")
    assert read_query_neighbours(tmp_path / "n.parquet", ["a"], 5) == {"a": [("b", 0.5), ("c", pytest.approx(0.2))]}
    with pytest.raises(DinoflowError, match="not found"):
        read_query_neighbours(tmp_path / "missing.parquet", ["a"], 5)
    df.drop(columns="score").to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DinoflowError, match="score"):
        read_query_neighbours(tmp_path / "bad.parquet", ["a"], 5)


def test_grids_stage_outputs(report_ws):
    ws, params = report_ws
    with chdir(ws):
        q = read_json(GRID_QUERIES)
        ok = pd.read_parquet(paths.MANIFEST).query("status == 'ok'")["id"].tolist()
        expected = select_queries(ok, params["neighbours"]["grid_query_ids"],
                                  params["neighbours"]["grid_random_queries"], params["seed"])
        assert q["query_ids"] == expected["all"] and q["query_ids"][0] == "img00000"
        assert q["files"] == [query_file_name(i, x) for i, x in enumerate(q["query_ids"])]
        for name in q["files"]:
            with Image.open(f"{paths.GRIDS_DIR}/{name}") as im:
                assert im.width > 400 and im.height > 200 * len(model_names(params))


def test_grid_figure_layout_titles_and_scores():
    rows = [("model-a", [("n1", 0.91234), ("n2", 0.5)]), (model_row_title("b", {"stand_in": True,
                                                                                "stand_in_label": "a stand-in"}), [])]
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    fig = grid_figure("q", rows, 2, lambda _id: img, {"q": "$x$ <b>", "n1": "first", "n2": "second"},
                      "centred cosine, float64")
    axes = np.array(fig.axes).reshape(2, 3)
    assert axes[0, 1].get_title() == "#1  s 0.9123" and axes[0, 2].get_title() == "#2  s 0.5"
    assert "s = centred cosine, float64" in fig._suptitle.get_text()
    assert axes[0, 0].get_ylabel() == "model-a" and "[a stand-in]" in axes[1, 0].get_ylabel()
    texts = [t.get_text() for t in axes[0, 0].texts]
    assert "$x$ <b>" in texts  # drawn literally (parse_math=False), not as TeX
    assert any(t.get_text() == "no neighbours" for t in axes[1, 1].texts)
    fig.canvas.draw()  # a caption with $ must not break rendering


def test_score_text_tells_close_scores_apart():
    """Scores that differ (even 1 - 5e-10 against 1 - 6e-10, what raw cosines of a LayerScale-1e-5 random ViT
    look like) print differently; 4 significant digits."""
    assert score_text(0.41234) == "s 0.4123" and score_text(-0.012345) == "s -0.01235"
    assert score_text(0.4123) != score_text(0.4124)
    assert score_text(1 - 5e-10) == "1−s 5e-10" and score_text(1 - 6e-10) == "1−s 6e-10"
    assert score_text(0.9995) == "1−s 0.0005" and score_text(0.99949) == "1−s 0.00051"
    assert score_text(1.0) == "1−s 0"
    texts = {score_text(s) for s in 1 - np.array([1e-9, 2e-9, 1e-6, 2e-6, 1e-4, 2e-3, 0.1, 0.2, 0.9])}
    assert len(texts) == 9


def test_grids_read_the_similarity_of_the_neighbours(report_ws, tmp_path):
    ws, params = report_ws
    with chdir(ws):
        assert read_json(GRID_QUERIES)["similarity"] == "centred cosine, float64"
        assert read_neighbours_similarity(paths.neighbours("random")) == "centred cosine, float64"
    df = pd.DataFrame({"query_id": ["a"], "rank": [1], "neighbour_id": ["b"], "score": [0.5]})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df).replace_schema_metadata({b"dinoflow": b'{"model": "m"}'}),
                   tmp_path / "old.parquet")
    with pytest.raises(DinoflowError, match="old.parquet: the neighbours metadata does not say which similarity"):
        read_neighbours_similarity(tmp_path / "old.parquet")
