"""Non-finite and degenerate numbers never flow downstream: embeddings (written and read), text embeddings,
neighbour indices and scores; every stage that reads vectors stops with a DinoflowError, not a NaN output or a
scikit-learn traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import align, neighbours, probes, text
from dinoflow.evaluate.neighbours import neighbours_table
from dinoflow.evaluate.vectors import read_vectors, write_vectors
from dinoflow.utils import write_json


def raw_vectors(path: str, ids: list[str], x: np.ndarray, meta: dict) -> None:
    """A vectors file written without dinoflow's checks (an older run, another tool)."""
    flat = pa.array(np.asarray(x, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table({"id": pa.array(ids), "cls": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})
    table = table.replace_schema_metadata({b"dinoflow": json.dumps(meta).encode()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_write_vectors_refuses_nan_embeddings_and_writes_nothing(tmp_path):
    x = np.full((16, 8), np.nan, dtype=np.float32)  # a diverged model: 16 of 16 NaN embeddings
    out = tmp_path / "embeddings" / "m.parquet"
    with pytest.raises(DinoflowError, match=r"m\.parquet: column 'cls' \(model m\): 128 of 128 values are not "
                                            r"finite \(128 NaN, 0 infinite\), in 16 of 16 rows; not written"):
        write_vectors(out, [f"i{k}" for k in range(16)], {"cls": x}, {"model": "m"})
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    big = np.ones((3, 2)) * 1e39  # finite in float64, infinite once stored as float32
    with pytest.raises(DinoflowError, match=r"'patch_mean'.*\(0 NaN, 6 infinite\), in 3 of 3 rows"):
        write_vectors(out, ["a", "b", "c"], {"cls": np.ones((3, 2)), "patch_mean": big}, {"model": "m"})


def test_write_vectors_refuses_zero_rows(tmp_path):
    x = np.ones((4, 3), dtype=np.float32)
    x[2] = 0
    with pytest.raises(DinoflowError, match=r"column 'embedding' \(model t\): 1 of 4 rows are all zero"):
        write_vectors(tmp_path / "t.parquet", list("abcd"), {"embedding": x}, {"text_model": "t"})
    assert not (tmp_path / "t.parquet").exists()


def test_read_vectors_refuses_a_bad_file(tmp_path):
    path = str(tmp_path / "e.parquet")
    x = np.random.default_rng(0).normal(size=(5, 4))
    x[3, 1] = np.nan
    raw_vectors(path, list("abcde"), x, {"model": "old"})
    with pytest.raises(DinoflowError, match=r"e\.parquet: column 'cls' \(model old\): 1 of 20 values .* in 1 of 5 "
                                            r"rows; re-run the stage"):
        read_vectors(path, "cls")
    x[3, 1] = 0
    x[1] = 0
    raw_vectors(path, list("abcde"), x, {})
    with pytest.raises(DinoflowError, match=r"e\.parquet: column 'cls': 1 of 5 rows are all zero.*\[1\]"):
        read_vectors(path, "cls")


@pytest.fixture
def nan_embeddings(tmp_path, monkeypatch):
    """A workflow root whose embeddings/m.parquet has NaN rows (written before these checks existed)."""
    monkeypatch.chdir(tmp_path)
    n = 30
    ids = [f"im{i}" for i in range(n)]
    x = np.random.default_rng(1).normal(size=(n, 6))
    x[[4, 9]] = np.nan
    raw_vectors(paths.embeddings("m"), ids, x, {"model": "m"})
    return ids


def test_neighbours_stops_on_nan_embeddings(nan_embeddings):
    params = {"seed": 0, "neighbours": {"k": 3, "exact_max_n": 1000, "block_size": 8}, "similarity": {"center": True},
              "health": {"n_pairs": 100, "rankme_rows": 30, "min_rankme": 2.0}}
    with pytest.raises(DinoflowError, match=r"embeddings/m\.parquet: column 'cls' \(model m\): .* in 2 of 30 rows"):
        neighbours.main(params, model="m")
    assert not Path(paths.neighbours("m")).exists()


def test_probes_stop_on_nan_embeddings_without_a_sklearn_traceback(nan_embeddings):
    manifest = pd.DataFrame({"id": nan_embeddings, "status": "ok", "group": ["a", "b", "c"] * 10})
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    manifest.to_parquet(paths.MANIFEST)
    params = {"seed": 0, "collection": {"label_columns": ["group"]},
              "probes": {"test_fraction": 0.3, "knn_k": 5, "knn_temperature": 0.07, "linear_max_iter": 100}}
    with pytest.raises(DinoflowError, match=r"embeddings/m\.parquet: column 'cls' \(model m\)"):
        probes.main(params, model="m")
    assert not Path(paths.probe_metrics("m")).exists()


def test_align_stops_on_nan_embeddings(nan_embeddings):
    with pytest.raises(DinoflowError, match=r"in 2 of 30 rows"):
        align.main({"seed": 0, "align": {}, "neighbours": {}}, model="m")


def test_neighbours_table_checks_indices_and_scores():
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    idx = np.array([[1, 2], [0, 2], [3, -1], [2, 0]])
    scores = np.array([[0.9, 0.5], [0.9, 0.1], [0.3, 0.0], [0.3, -0.2]], dtype=np.float32)
    assert neighbours_table(ids, idx, scores).num_rows == 7  # the FAISS miss (-1) is left out
    bad = idx.copy()
    bad[1, 1] = 4
    with pytest.raises(DinoflowError, match=r"out\.parquet \(model m\): neighbour indices: 1 of 8 indices are "
                                            r"outside \[0, 4\) \(min 4, max 4\)"):
        neighbours_table(ids, bad, scores, what="out.parquet (model m)")
    nan = scores.copy()
    nan[0, 0] = np.nan
    with pytest.raises(DinoflowError, match=r"neighbour scores: 1 of 7 values are not finite \(1 NaN"):
        neighbours_table(ids, idx, nan)
    nan[2, 1] = np.nan  # the score of a FAISS miss is not a result: ignored
    nan[0, 0] = 0.9
    assert neighbours_table(ids, idx, nan).num_rows == 7
    big = scores.copy()
    big[3, 0] = 1.5
    with pytest.raises(DinoflowError, match=r"1 of 7 neighbour scores are outside \[-1, 1\] \(max \|score\| 1\.5\)"):
        neighbours_table(ids, idx, big)


def test_text_embeddings_with_nan_are_not_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "status": "ok", "caption": ["x", "y"], "keywords": [["k"], ["l"]]}
                 ).to_parquet(paths.MANIFEST)
    monkeypatch.setattr(text, "load_text_model", lambda name, device: (object(), "folder"))
    monkeypatch.setattr(text, "embed_texts", lambda model, texts, batch_size: np.full((len(texts), 4), np.nan))
    params = {"seed": 0, "embed": {"device": "cpu"}, "text": {"model": "some-model", "batch_size": 4}}
    with pytest.raises(DinoflowError, match=r"text/caption\.parquet: column 'embedding' \(model some-model\): .*"
                                            r"in 2 of 2 rows"):
        text.main(params)
    assert not Path(paths.text_embeddings("caption")).exists() and not Path(paths.TEXT_METRICS).exists()


@pytest.fixture
def processed(random_model_workspace):
    return random_model_workspace[0]


def test_embed_stops_on_diverged_weights_and_on_nan_outputs(processed, monkeypatch):
    from dinoflow.evaluate import embed

    sd = load_file(paths.model_weights("random"))
    good = {k: v.clone() for k, v in sd.items()}
    sd["model.blocks.0.attn.qkv.weight"].view(-1)[:5] = float("nan")  # Meta's diverged-run case, in our format
    save_file(sd, paths.model_weights("random"))
    with pytest.raises(DinoflowError, match=r"^model random: models/random/weights\.safetensors: .*"
                                            r"'model\.blocks\.0\.attn\.qkv\.weight': 5 of"):
        embed.main(processed, model="random")
    assert not Path(paths.embeddings("random")).exists()

    save_file(good, paths.model_weights("random"))
    real = embed.embed_dataset

    def overflowing(*args, **kwargs):  # finite weights whose forward pass overflows (e.g. in bf16)
        out = real(*args, **kwargs)
        out["patch_mean"][::2] = np.inf
        return out

    monkeypatch.setattr(embed, "embed_dataset", overflowing)
    with pytest.raises(DinoflowError, match=r"embeddings/random\.parquet: column 'patch_mean' \(model random\): "
                                            r".*infinite\), in \d+ of \d+ rows; not written"):
        embed.main(processed, model="random")
    assert not Path(paths.embeddings("random")).exists()
    monkeypatch.setattr(embed, "embed_dataset", real)
    embed.main(processed, model="random")
    assert np.isfinite(read_vectors(paths.embeddings("random"), "cls")[1]).all()
