"""Read a collection's metadata table (CSV, Parquet or JSON Lines) into dinoflow's column names.

The result has one row per input row, in input order:

- `row`: 0-based input row (data rows; the CSV header and blank JSONL lines are not rows),
- `id`, `path` (str or None), `caption` (str or None), `keywords` (list[str], empty when absent),
- one column per configured label column (str or None),
- `read_error`: None, or why the row cannot be trusted (invalid UTF-8, an unparsable JSON line); ingest turns
  it into the row's status instead of failing the whole table,
- every column the mapping does not name, under its own name; their names are in `df.attrs["unknown_columns"]`.

Invalid UTF-8 is decoded with `surrogateescape`, so each bad byte survives as a lone surrogate (U+DC80..U+DCFF)
that we can find and report per row, instead of one decode error that stops the whole file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from dinoflow.errors import DinoflowError

REQUIRED = ("id", "path")
OPTIONAL = ("caption", "keywords")
# Lone surrogates produced by errors="surrogateescape" for bytes 0x80..0xFF that are not valid UTF-8.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".csv", ".tsv", ".txt"):
        return "csv"
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise DinoflowError(f"{path}: unknown metadata format {ext!r} (use .csv, .parquet or .jsonl)")


def _read_csv(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        # dtype=object keeps ids such as "00123" as text and lets surrogates through (pandas' Arrow-backed
        # strings would reject them); only empty cells are missing, so a caption "NA" stays "NA".
        return pd.read_csv(path, sep=sep, dtype=object, encoding="utf-8", encoding_errors="surrogateescape",
                           keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as exc:
        raise DinoflowError(f"{path}: metadata file is empty (expected a header row with at least id, path)") \
            from exc
    except pd.errors.ParserError as exc:
        # pandas names the line ("Expected 3 fields in line 7, saw 4"); keep it in our message.
        raise DinoflowError(f"{path}: cannot parse CSV: {exc}") from exc


def _read_jsonl(path: Path) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    errors: list[str | None] = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
                errors.append(None)
            except ValueError as exc:
                # One broken line must not sink a million good ones: it becomes a row with an error.
                records.append({})
                errors.append(f"line {lineno}: not a JSON object ({exc})")
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    df = df.astype(object)
    df["__jsonl_error"] = pd.Series(errors, dtype=object)
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DinoflowError(f"{path}: cannot read Parquet: {exc}") from exc
    out = {}
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)  # checks UTF-8, which Parquet writers do not always guarantee
            except pa.ArrowInvalid:
                binary = pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()
                col = pa.chunked_array([chunk.view(binary) for chunk in col.chunks], binary)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out[name] = pd.Series([None if v is None else v.decode("utf-8", "surrogateescape")
                                   for v in col.to_pylist()], dtype=object)
        else:
            out[name] = pd.Series(col.to_pylist(), dtype=object)
    return pd.DataFrame(out, index=pd.RangeIndex(table.num_rows))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return value is pd.NA or value is pd.NaT


def _as_text(value: Any) -> str | None:
    """Cell → str or None. Whole floats from number-typed id columns come back without `.0`."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple, np.ndarray, dict)):
        return json.dumps(list(value) if isinstance(value, np.ndarray) else value, default=str)
    text = str(value).strip()
    return text or None


def parse_keywords(value: Any, separator: str = ";") -> list[str]:
    """A list (Parquet list / JSON array) or a `separator`-separated string → list of non-empty stripped str."""
    if _is_missing(value):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        items: Iterable[Any] = value
    else:
        items = str(value).split(separator) if separator else [str(value)]
    out = []
    for item in items:
        if _is_missing(item):
            continue
        text = str(item).strip()
        if text:
            out.append(text)
    return out


def _bad_utf8(value: Any) -> tuple[int, int] | None:
    """(character position, byte value) of the first byte that was not valid UTF-8, or None."""
    if isinstance(value, str):
        m = _BAD_BYTE.search(value)
        return None if m is None else (m.start(), ord(m.group(0)) - 0xDC00)
    if isinstance(value, list):
        for item in value:
            found = _bad_utf8(item)
            if found is not None:
                return found
    return None


def read_metadata(path: str | Path, columns: Mapping[str, str] | None = None, keyword_separator: str = ";",
                  label_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read the metadata table at `path` and rename its columns to dinoflow's (see the module docstring).

    columns: dinoflow name (`id`, `path`, `caption`, `keywords`) → the table's column name; names left out map
    to themselves. A missing `id` or `path` column is an error; a missing caption or keywords column is not
    (captions and keywords are optional: those rows get None / []). Label columns must exist.
    """
    path = Path(path)
    if not path.exists():
        raise DinoflowError(f"{path}: metadata file not found (collection.metadata in params.yaml)")
    fmt = _format(path)
    raw = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}[fmt](path)
    jsonl_errors = raw.pop("__jsonl_error") if "__jsonl_error" in raw.columns else None

    mapping = {name: name for name in REQUIRED + OPTIONAL}
    mapping.update(dict(columns or {}))
    unknown_keys = set(mapping) - set(REQUIRED + OPTIONAL)
    if unknown_keys:
        raise DinoflowError(f"collection.columns: unknown key(s) {sorted(unknown_keys)} "
                            f"(allowed: {', '.join(REQUIRED + OPTIONAL)})")
    found = [str(c) for c in raw.columns]
    for name in REQUIRED:
        if mapping[name] not in raw.columns:
            raise DinoflowError(f"{path}: no column {mapping[name]!r} for `{name}` (columns found: "
                                f"{', '.join(found) or 'none'}; set collection.columns.{name} in params.yaml)")
    label_columns = list(label_columns or [])
    for label in label_columns:
        if label not in raw.columns:
            raise DinoflowError(f"{path}: label column {label!r} not found (columns found: {', '.join(found)}; "
                                "see collection.label_columns in params.yaml)")

    n = len(raw)
    df = pd.DataFrame(index=pd.RangeIndex(n))
    df["row"] = np.arange(n, dtype=np.int64)

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw.columns else pd.Series([None] * n, dtype=object)

    for name in ("id", "path", "caption"):
        df[name] = pd.Series([_as_text(v) for v in column(mapping[name])], dtype=object)
    df["keywords"] = pd.Series([parse_keywords(v, keyword_separator) for v in column(mapping["keywords"])],
                               dtype=object)
    for label in label_columns:
        df[label] = pd.Series([_as_text(v) for v in raw[label]], dtype=object)

    used = {mapping[name] for name in REQUIRED + OPTIONAL} | set(label_columns)
    unknown = [c for c in raw.columns if c not in used]
    for c in unknown:
        df[c] = raw[c].astype(object).values
    df.attrs["unknown_columns"] = [str(c) for c in unknown]
    df.attrs["format"] = fmt

    # Per-row problems: invalid UTF-8 in any mapped column, or a JSON line that could not be parsed.
    errors: list[str | None] = list(jsonl_errors) if jsonl_errors is not None else [None] * n
    for name in ["id", "path", "caption", "keywords", *label_columns]:
        values = df[name]
        # Cheap vectorised screen first: only rows with a surrogate are looked at one by one.
        if name == "keywords":
            suspects = values.map(lambda v: _bad_utf8(v) is not None)
        else:
            suspects = values.str.contains(_BAD_BYTE, na=False)
        for i in np.flatnonzero(suspects.to_numpy(dtype=bool)):
            if errors[i] is None:
                pos, byte = _bad_utf8(values.iat[i])
                errors[i] = (f"invalid UTF-8 in column {mapping.get(name, name)!r}: byte 0x{byte:02x} at "
                             f"character {pos} (re-encode the metadata file as UTF-8)")
    df["read_error"] = pd.Series(errors, dtype=object)
    return df

