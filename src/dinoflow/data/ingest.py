"""`dinoflow ingest`: validate every metadata row and its image; write the manifest and a summary.

Every input row gets exactly one manifest row (nothing is dropped silently) with `status` `ok` or one of the
reason codes in `REASONS`. Rows with `ok` are what later stages use. Conversions that preprocess will apply
(CMYK, 16-bit, palette, alpha, grey → RGB; EXIF rotation) keep the row `ok` and are listed in `note`.
A missing caption or keywords is normal and stays `ok`.

Decisions worth knowing:
- Duplicate ids: the first row (in input order) with an id keeps it, whatever its own status; later rows get
  `duplicate_id` and their image is not opened.
- Invalid UTF-8 anywhere in a row's mapped fields (id, path, caption, keywords, labels) skips the row
  (`invalid_utf8`): mojibake text would silently corrupt the caption/keyword similarity the workflow measures.
  A file in a legacy encoding therefore fails the whole run with a count telling the user to re-encode it.
- Unknown columns (not mapped in `collection.columns` nor listed in `collection.label_columns`) are a table-level
  finding, not a row status: they are named in the log and in the summary (`unknown_columns`). With
  `ingest.allow_unknown_columns: false` (default) they are left out of the manifest; with `true` they are kept
  as text columns (prefixed `extra_` where a name clashes with a manifest column).
- The run fails (`DinoflowError`) only when the skipped share exceeds `ingest.max_skipped_fraction`; the
  manifest and summary are written first so the user can inspect them.

Scale: the per-image work (stat, header, decode) runs in a process pool over chunks; JPEGs are decoded in
draft mode at 1/8 scale, which still reads the whole entropy-coded stream and so still finds truncation.
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError

from dinoflow import paths
from dinoflow.data.collection import read_metadata
from dinoflow.data.preprocess import PixelLimitError, open_rgb, parallel_map, resolve_workers
from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger, write_json

log = get_logger("dinoflow.ingest")

OK = "ok"
REASONS = {
    "unreadable_row": "the metadata row itself could not be parsed",
    "invalid_utf8": "a text field of the row is not valid UTF-8",
    "missing_id": "the id is empty",
    "duplicate_id": "an earlier row already has this id",
    "missing_path": "the path is empty",
    "path_outside_images_dir": "the path leaves the image folder (absolute, '..' or a symlink out)",
    "missing_file": "no file at the path",
    "not_a_file": "the path is a directory or another non-regular file",
    "empty_file": "the file has zero bytes",
    "not_an_image": "not an image Pillow can identify (despite its extension)",
    "too_many_pixels": "more pixels than ingest.max_pixels (decompression-bomb guard)",
    "truncated_image": "the image data ends early",
    "corrupt_image": "the image data cannot be decoded",
}
MANIFEST_COLUMNS = ("row", "id", "path", "caption", "keywords", "status", "detail", "width", "height", "note")


def _check_path(rel: str) -> str | None:
    """Reason the relative path is unacceptable before touching the disk, or None."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path (paths must be relative to collection.images_dir)"
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"path {rel!r} resolves outside the image folder"
    if norm == ".":
        return "path names the image folder itself"
    return None


class _ImageChecker:
    """Picklable per-chunk worker: (row, path) → (status, detail, width, height, note)."""

    def __init__(self, images_dir: str, max_pixels: int):
        self.images_dir = images_dir
        self.root = os.path.realpath(images_dir)
        self.max_pixels = max_pixels

    def __call__(self, chunk: list[str]) -> list[tuple[str, str, int | None, int | None, str]]:
        return [self.check(rel) for rel in chunk]

    def check(self, rel: str) -> tuple[str, str, int | None, int | None, str]:
        full = os.path.join(self.images_dir, rel)
        real = os.path.realpath(full)
        if os.path.commonpath([self.root, real]) != self.root:
            return "path_outside_images_dir", f"{rel} resolves to {real}, outside {self.root}", None, None, ""
        try:
            st = os.stat(full)
        except FileNotFoundError:
            return "missing_file", f"no file {full}", None, None, ""
        except OSError as exc:
            return "missing_file", f"cannot stat {full}: {exc}", None, None, ""
        if not os.path.isfile(full):
            return "not_a_file", f"{full} is not a regular file", None, None, ""
        if st.st_size == 0:
            return "empty_file", f"{full} has 0 bytes", None, None, ""
        try:
            # (1, 1): JPEGs decode at 1/8 scale; every other format decodes fully, which is what finds damage.
            _, notes, (w, h) = open_rgb(full, draft_size=(1, 1), max_pixels=self.max_pixels)
        except PixelLimitError as exc:
            return "too_many_pixels", str(exc), exc.width, exc.height, ""
        except UnidentifiedImageError:
            ext = os.path.splitext(rel)[1] or "no extension"
            return "not_an_image", f"{full} ({st.st_size} bytes, {ext}) is not an image Pillow can identify", \
                None, None, ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-row status, never a crash
            message = f"{type(exc).__name__}: {exc}"
            reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
            return reason, f"{full}: {message}", None, None, ""
        return OK, "", int(w), int(h), ";".join(notes)


def validate_rows(df: pd.DataFrame, images_dir: str, max_pixels: int, workers: int) -> pd.DataFrame:
    """Add status, detail, width, height, note to the frame from `read_metadata` (same rows, same order)."""
    n = len(df)
    status = np.full(n, OK, dtype=object)
    detail = np.full(n, "", dtype=object)
    pending = np.ones(n, dtype=bool)  # rows still to check

    def mark(mask: np.ndarray, reason: str, details: Any) -> None:
        mask = mask & pending
        status[mask] = reason
        detail[mask] = details[mask] if isinstance(details, np.ndarray) else details
        pending[mask] = False

    read_error = df["read_error"].to_numpy(dtype=object)
    has_error = pd.notna(read_error)
    # read_metadata's two kinds of row error: "invalid UTF-8 ..." or "line N: not a JSON object ..."
    bad_text = np.array([isinstance(e, str) and e.startswith("invalid UTF-8") for e in read_error])
    mark(has_error & bad_text, "invalid_utf8", read_error)
    mark(has_error & ~bad_text, "unreadable_row", read_error)

    ids = df["id"].to_numpy(dtype=object)
    mark(pd.isna(ids), "missing_id", "empty id")
    # The first row with an id keeps it, whatever its own status (documented above).
    id_series = pd.Series(ids, dtype=object)
    dup = id_series.duplicated(keep="first").to_numpy() & pd.notna(ids)
    if dup.any():
        first = ~dup & pd.notna(ids)
        first_row = dict(zip(id_series[first], df["row"].to_numpy()[first]))
        dup_detail = np.array([f"id {v!r} already used by row {first_row[v]}" if d else ""
                               for v, d in zip(ids, dup)], dtype=object)
        mark(dup, "duplicate_id", dup_detail)

    rel_paths = df["path"].to_numpy(dtype=object)
    mark(pd.isna(rel_paths), "missing_path", "empty path")
    path_problem = np.array([_check_path(p) if isinstance(p, str) else None for p in rel_paths], dtype=object)
    mark(pd.notna(path_problem), "path_outside_images_dir", path_problem)

    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    note = np.full(n, "", dtype=object)
    todo = np.flatnonzero(pending)
    checker = _ImageChecker(str(images_dir), int(max_pixels))
    results = parallel_map(checker, [rel_paths[i] for i in todo], workers, chunk_size=64, desc="ingest")
    for i, (st, det, w, h, nt) in zip(todo, results):
        status[i], detail[i], note[i] = st, det, nt
        width[i], height[i] = w, h

    out = df.copy()
    out["status"] = status
    out["detail"] = detail
    out["width"] = pd.array(width, dtype="Int32")
    out["height"] = pd.array(height, dtype="Int32")
    out["note"] = note
    return out


def manifest_table(df: pd.DataFrame, label_columns: list[str], extra_columns: list[str]):
    """The manifest as an Arrow table with the documented schema (docs/architecture.md)."""
    import pyarrow as pa

    def text(values: Any) -> pa.Array:
        return pa.array([v if isinstance(v, str) else (None if pd.isna(v) else str(v)) for v in values],
                        pa.string())

    def clean(values: Any) -> list:
        # Rows with invalid UTF-8 keep their text for inspection, with bad bytes shown as U+FFFD.
        return [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
                for v in values]

    cols: dict[str, pa.Array] = {
        "row": pa.array(df["row"].to_numpy(np.int64)),
        "id": text(clean(df["id"])),
        "path": text(clean(df["path"])),
        "caption": text(clean(df["caption"])),
        "keywords": pa.array([clean(k) for k in df["keywords"]], pa.list_(pa.string())),
    }
    for label in label_columns:
        cols[label] = text(clean(df[label]))
    cols["status"] = text(df["status"])
    cols["detail"] = text(clean(df["detail"]))
    cols["width"] = pa.array(df["width"], pa.int32())
    cols["height"] = pa.array(df["height"], pa.int32())
    cols["note"] = text(df["note"])
    for extra in extra_columns:
        name = f"extra_{extra}" if extra in cols else extra
        cols[name] = text(clean(df[extra]))
    return pa.table(cols)


def summarise(df: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    counts = Counter(df["status"])
    n = len(df)
    skipped = n - counts.get(OK, 0)
    notes = Counter(part for note in df["note"] if note for part in note.split(";"))
    caption_missing = int(df.loc[df["status"] == OK, "caption"].isna().sum())
    keywords_missing = int((df.loc[df["status"] == OK, "keywords"].map(len) == 0).sum())
    return {
        "n_rows": n,
        "n_ok": counts.get(OK, 0),
        "n_skipped": skipped,
        "skipped_fraction": skipped / n if n else 0.0,
        "by_status": dict(sorted(counts.items())),
        "notes": dict(sorted(notes.items())),
        "ok_without_caption": caption_missing,
        "ok_without_keywords": keywords_missing,
        **extra,
    }


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    import pyarrow.parquet as pq

    coll, cfg = params["collection"], params["ingest"]
    label_columns = list(coll.get("label_columns") or [])
    df = read_metadata(coll["metadata"], coll.get("columns"), coll.get("keyword_separator", ";"), label_columns)
    unknown = df.attrs.get("unknown_columns", [])
    keep_unknown = bool(cfg.get("allow_unknown_columns", False))
    if unknown:
        log.warning("ingest: %s has column(s) not in collection.columns / label_columns: %s — %s",
                    coll["metadata"], ", ".join(unknown),
                    "kept in the manifest" if keep_unknown else
                    "left out of the manifest (set ingest.allow_unknown_columns: true to keep them)")
    images_dir = coll["images_dir"]
    if not Path(images_dir).is_dir():
        raise DinoflowError(f"collection.images_dir: {images_dir} is not a directory")

    workers = resolve_workers(cfg.get("workers", 0))
    log.info("ingest: %d rows from %s, images in %s, %d worker(s)", len(df), coll["metadata"], images_dir, workers)
    df = validate_rows(df, images_dir, int(cfg["max_pixels"]), workers)

    table = manifest_table(df, label_columns, unknown if keep_unknown else [])
    Path(paths.MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, paths.MANIFEST)
    limit = float(cfg["max_skipped_fraction"])
    summary = summarise(df, metadata=str(coll["metadata"]), images_dir=str(images_dir), manifest=paths.MANIFEST,
                        unknown_columns=unknown, unknown_columns_kept=keep_unknown and bool(unknown),
                        max_skipped_fraction=limit)
    write_json(paths.INGEST_SUMMARY, summary)
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items() if k != OK) or "none"
    log.info("ingest: %d ok, %d skipped (%s); notes: %s; manifest %s, summary %s", summary["n_ok"],
             summary["n_skipped"], reasons, summary["notes"] or "none", paths.MANIFEST, paths.INGEST_SUMMARY)
    if summary["skipped_fraction"] > limit:
        raise DinoflowError(
            f"ingest: {summary['n_skipped']} of {summary['n_rows']} rows skipped "
            f"({summary['skipped_fraction']:.1%} > ingest.max_skipped_fraction = {limit:.1%}); by reason: {reasons}. "
            f"See the status and detail columns of {paths.MANIFEST}")
    return summary
