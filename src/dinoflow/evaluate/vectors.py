"""Parquet files of vectors (image and text embeddings): `id` plus fixed-size float32 list columns.

One writer and one reader, used by `embed`, `embed-text`, `neighbours`, `align`, `probes` and the report, so the
layout is spelled in one place. Provenance (model name, weights source, stand-in label, params hash, counts) goes
into the Parquet schema metadata as JSON under the key `dinoflow`.

Both directions check every vector column (`dinoflow.checks`): a NaN / infinite value or an all-zero row (cosine
undefined) is a `DinoflowError` naming the file, the column, the model and the number of bad rows; nothing
non-finite is written, and an older or foreign file with such rows is refused before any stage uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinoflow.checks import require_finite, require_nonzero_rows
from dinoflow.errors import DinoflowError

METADATA_KEY = b"dinoflow"


def write_vectors(path: str | Path, ids: list[str] | np.ndarray, columns: Mapping[str, np.ndarray],
                  metadata: Mapping[str, Any]) -> None:
    """Write `id` and one FixedSizeList<float32> column per entry of `columns` (each (N, D)).

    Raises: DinoflowError for a wrong shape, or (before anything is written) a non-finite value or an all-zero
    row in a column, naming the file, column, model (`metadata["model"]` or `["text_model"]`) and the row count.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    source = metadata.get("model") or metadata.get("text_model")
    arrays: list[pa.Array] = [pa.array(ids, type=pa.string())]
    names = ["id"]
    for name, mat in columns.items():
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf here, and is reported just below
            mat = np.ascontiguousarray(mat, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[0] != len(ids):
            raise DinoflowError(f"{path}: column {name!r} has shape {mat.shape}, expected ({len(ids)}, D)")
        check_vectors(mat, f"{path}: column {name!r}" + (f" (model {source})" if source else ""),
                      "not written; the model produced invalid vectors (diverged weights? inputs out of range?)")
        flat = pa.array(mat.reshape(-1), type=pa.float32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, mat.shape[1]))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    meta = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True, default=str).encode()}
    # Also the plain string fields, so `parquet-tools meta` shows the provenance without decoding JSON.
    for key, value in metadata.items():
        if isinstance(value, (str, int, float, bool)):
            meta[str(key).encode()] = str(value).encode()
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written output for Snakemake to trust


def read_vectors(path: str | Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids as an object array of str, (N, D) float32 matrix) of one vector column."""
    path = Path(path)
    if not path.exists():
        raise DinoflowError(f"{path}: file not found (run the stage that writes it first)")
    try:
        table = pq.read_table(path, columns=["id", column])
    except (KeyError, pa.ArrowInvalid) as exc:
        names = pq.read_schema(path).names
        raise DinoflowError(f"{path}: no vector column {column!r} (columns: {', '.join(names)})") from exc
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.value_type != pa.float32():
        raise DinoflowError(f"{path}: column {column!r} has type {col.type}, expected fixed_size_list<float32>")
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    values = values.reshape(len(ids), dim)
    source = _source_of(table.schema.metadata or {})
    check_vectors(values, f"{path}: column {column!r}" + (f" (model {source})" if source else ""),
                  "re-run the stage that writes this file")
    return ids, values


def _source_of(schema_metadata: Mapping[bytes, bytes]) -> str | None:
    """The model named in a file's dinoflow metadata (image model or text model), for error messages."""
    try:
        meta = json.loads(schema_metadata[METADATA_KEY].decode())
    except (KeyError, ValueError):
        return None
    return meta.get("model") or meta.get("text_model")


def check_vectors(x: np.ndarray, what: str, hint: str = "") -> None:
    """Vectors fit for cosine similarity: all finite (`require_finite`) and no all-zero row.

    Raises: DinoflowError naming `what` and the number of bad rows."""
    require_finite(x, what, hint)
    require_nonzero_rows(x, what, hint)


def read_vectors_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance dict written by `write_vectors`."""
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise DinoflowError(f"{path}: no dinoflow metadata in the Parquet schema (not written by dinoflow?)")
    return json.loads(meta[METADATA_KEY].decode())


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), so that dot products are cosine similarities."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def collection_mean(x: np.ndarray) -> np.ndarray:
    """(D,) float64 mean of the rows of `x` (N, D), accumulated in float64 without a float64 copy of `x`."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DinoflowError(f"collection_mean: expected a non-empty (N, D) matrix, got shape {x.shape}")
    return x.mean(axis=0, dtype=np.float64)


def similarity_features(x: np.ndarray, center: bool = True, eps: float = 1e-12,
                        mean: np.ndarray | None = None) -> np.ndarray:
    """Rows ready for cosine similarity by dot product, computed so that the result does not depend on rounding.

    x: (N, D) embeddings of one collection. With `center`, the collection mean is subtracted first: `mean` when
    given ((D,), e.g. `collection_mean` of the whole collection, so that a block or a sample of rows is centred
    like the rest), else the mean of these N rows. Embeddings that share a large common component (e.g. a random
    ViT whose residual branches are scaled by LayerScale 1e-5) then differ in what varies between images, not in
    float32 rounding of a cosine near 1. Always float64 (N, D). A row whose centred norm is 0 stays 0 (its
    similarities are 0, not NaN). The parameters come from the `similarity` params section (`SimilarityConfig`).
    """
    x = np.asarray(x, dtype=np.float64)
    if center:
        mu = x.mean(axis=0, keepdims=True) if mean is None else np.asarray(mean, dtype=np.float64).reshape(1, -1)
        if mu.shape[1] != x.shape[1]:
            raise DinoflowError(f"similarity_features: mean has {mu.shape[1]} values for {x.shape[1]}-d rows")
        x = x - mu
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > eps)


@dataclass(frozen=True)
class SimilarityConfig:
    """The `similarity` params section: how every evaluation stage turns embeddings into cosine-ready rows.

    center: subtract the collection mean before the cosine (`similarity_features`). Read once at a stage's
    entry with `from_params`; `describe()` is the text written to metrics/health/<model>.json, the neighbours
    metadata and the report.
    """

    center: bool

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "SimilarityConfig":
        section = params.get("similarity")
        if not isinstance(section, Mapping):
            raise DinoflowError("params.yaml: the `similarity` section is missing (e.g. `similarity: {center: true}`)")
        if not isinstance(section.get("center"), bool):
            raise DinoflowError(f"similarity.center: expected true or false, got {section.get('center')!r}")
        return cls(center=section["center"])

    def describe(self) -> str:
        return "centred cosine, float64" if self.center else "cosine, float64"

    def features(self, x: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
        """`similarity_features(x, center=self.center, mean=mean)`: float64 (N, D) rows."""
        return similarity_features(x, center=self.center, mean=mean)
