"""Read a collection's metadata table (CSV, Parquet or JSON Lines) into dinoflow's column names.

The result has one row per input row, in input order:

- `row`: 0-based input row (data rows; the CSV header and blank JSONL lines are not rows),
- `id`, `path` (str or None), `caption` (str or None), `keywords` (list[str], empty when absent),
- one column per configured label column (str or None),
- `read_status` / `read_error`: None, or why the row cannot be trusted (`invalid_utf8`, `unreadable_row`: an
  unparsable JSON line, `invalid_id`) and the message; ingest turns them into the row's status instead of
  failing the whole table,
- `read_note`: "" or `;`-separated notes on how a cell was read (`id-whitespace-stripped`,
  `path-whitespace-stripped`, `keywords-list-literal`, `keywords-unparsed-list`),
- every column the mapping does not name, under its own name; their names are in `df.attrs["unknown_columns"]`.

Identifiers are text, exactly as written, in every format: CSV cells are read as text (no type inference, so
"007" keeps its zeros); JSON numbers are kept as the digits in the file (`json` would give Python ints, but
pandas turns an int column with a null into float64, which rounds 1344800117571260417 to ...416); Parquet
integers become their decimal text. A floating-point id is exact only below 2^53: above it, the program that
wrote the table may already have rounded it, so it is refused (`invalid_id`) rather than trusted.

Keyword cells: a list (Parquet list, JSON array) is taken as is; a string is split on `keyword_separator`,
unless it is a serialised list — a JSON array, a Python list/tuple literal (what `DataFrame.to_csv` writes for a
list) or a NumPy array repr (`['red' 'circle']`) — which is read as a list without evaluating anything
(`json`, then Python's tokenizer with `ast.literal_eval` on single string tokens).

Text files are UTF-8, or UTF-8/16/32 with a byte-order mark (Excel's "Unicode Text" is UTF-16); a CSV whose
header is one column with `,` is read with `;` or tab when that gives the id and path columns (Excel in locales
with a decimal comma), and Excel's `sep=;` first line is honoured. A CSV header naming a column twice and a JSON
line with a key twice are refused (pandas / json would silently pick one copy).

Invalid UTF-8 is decoded with `surrogateescape`, so each bad byte survives as a lone surrogate (U+DC80..U+DCFF)
that we can find and report per row, instead of one decode error that stops the whole file.
"""

from __future__ import annotations

import ast
import decimal
import io
import json
import math
import os
import re
import time
import tokenize
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger

log = get_logger("dinoflow.collection")

REQUIRED = ("id", "path")
OPTIONAL = ("caption", "keywords")
# Lone surrogates produced by errors="surrogateescape" for bytes 0x80..0xFF that are not valid UTF-8.
_BAD_BYTE = re.compile("[\udc80-\udcff]")
# Any lone surrogate: a bad byte (above), or a JSON \u escape of half a UTF-16 pair ("\ud83d" without its pair,
# as text cut in the middle of an emoji has). Neither can be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


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


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _open_binary(path: Path):
    if path.suffix.lower() == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _encoding(path: Path) -> str:
    """UTF-8, or the Unicode encoding a byte-order mark announces: Excel's "Unicode Text" export is UTF-16 with
    a BOM, and Windows tools put a UTF-8 BOM in front of CSV and JSON Lines files."""
    with _open_binary(path) as fh:
        head = fh.read(4)
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")


# Separators spreadsheets write: Excel uses ";" where "," is the decimal comma, "\t" for "Text"/"Unicode Text".
_SEPARATORS = (",", ";", "\t")


def _csv_layout(path: Path, encoding: str, default: str, wanted: Iterable[str]) -> tuple[str, int]:
    """(separator, lines to skip) from the header: Excel's `sep=;` first line, else `default` when its header has
    the `wanted` columns, else the spreadsheet separator (`;`, tab) whose header has them."""
    import csv

    with _open_binary(path) as fh:
        text = io.TextIOWrapper(fh, encoding=encoding, errors="surrogateescape", newline="")
        first = text.readline()
        if first.lower().startswith("sep=") and len(first.rstrip("\r\n")) == 5:
            log.info("%s: Excel's first line %r sets the separator: read with %r", path, first.strip(), first[4])
            return first[4], 1
    line = first
    if "\x00" in line:
        raise DinoflowError(f"{path}: the header contains NUL bytes: UTF-16 text without a byte-order mark? Save "
                            "the table as UTF-8 (or UTF-16 with a BOM, Excel's \"Unicode Text\")")
    wanted = [w for w in wanted if w]

    def header(sep: str) -> list[str]:
        return next(csv.reader([line], delimiter=sep), [])

    def has_wanted(sep: str) -> bool:
        names = header(sep)
        return len(names) > 1 and all(w in names for w in wanted)

    if not line.strip() or has_wanted(default):
        return default, 0
    for sep in _SEPARATORS:
        if sep != default and has_wanted(sep):
            log.info("%s: the header is %r-separated, not %r (as Excel writes in some locales): read with %r",
                     path, sep, default, sep)
            return sep, 0
    if len(header(default)) == 1 and any(c in line for c in ";\t|:"):
        tried = ", ".join(map(repr, _SEPARATORS))
        raise DinoflowError(f"{path}: the header has only one column ({line.strip()[:80]!r}) with the separator "
                            f"{default!r}: is the file separated by another character? (tried {tried})")
    return default, 0  # the caller reports the missing column, naming the columns found


def _read_csv(path: Path, wanted: Iterable[str] = ()) -> pd.DataFrame:
    import csv

    default = "\t" if path.suffix.lower() == ".tsv" else ","
    encoding = _encoding(path)
    sep, skip = _csv_layout(path, encoding, default, wanted)
    with _open_binary(path) as fh:
        text = io.TextIOWrapper(fh, encoding=encoding, errors="surrogateescape", newline="")
        for _ in range(skip):
            text.readline()
        names = next(csv.reader([text.readline()], delimiter=sep), [])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DinoflowError(f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once in the header: "
                            "which one holds the data is ambiguous (rename or remove the copies)")
    try:
        # dtype=object keeps ids such as "00123" as text and lets surrogates through (pandas' Arrow-backed
        # strings would reject them); only empty cells are missing, so a caption "NA" stays "NA".
        # index_col=False: when the first data row has one field more than the header (an unquoted comma in a
        # caption), pandas would otherwise take the first column as the index and shift every column of every
        # row by one, silently (ids become paths). With it, pandas drops the extra fields with a ParserWarning,
        # which we turn into an error naming the line (`_check_extra_fields`).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, sep=sep, dtype=object, encoding=encoding, encoding_errors="surrogateescape",
                             keep_default_na=False, na_values=[""], skiprows=skip, index_col=False)
        if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
            _check_extra_fields(path, encoding, sep, skip, len(names))
        return df
    except pd.errors.EmptyDataError as exc:
        raise DinoflowError(f"{path}: metadata file is empty (expected a header row with at least id, path)") \
            from exc
    except pd.errors.ParserError as exc:
        # pandas names the line ("Expected 3 fields in line 7, saw 4"); keep it in our message.
        raise DinoflowError(f"{path}: cannot parse CSV: {exc}") from exc


def _check_extra_fields(path: Path, encoding: str, sep: str, skip: int, n_columns: int) -> None:
    """Raise for the first row with more fields than the header, unless the extra fields are empty (a trailing
    separator, which loses nothing)."""
    import csv

    with _open_binary(path) as fh:
        text = io.TextIOWrapper(fh, encoding=encoding, errors="surrogateescape", newline="")
        for _ in range(skip):
            text.readline()
        reader = csv.reader(text, delimiter=sep)
        next(reader, None)
        for fields in reader:
            if len(fields) > n_columns and any(f.strip() for f in fields[n_columns:]):
                raise DinoflowError(
                    f"{path}: line {reader.line_num + skip} has {len(fields)} fields but the header has {n_columns}: "
                    f"an unquoted {sep!r} inside a cell? Quote that cell (extra: {fields[n_columns:][:3]!r})")


class JsonNumber(str):
    """A JSON number exactly as written in the file ("1344800117571260417", "1.50"): never a float."""


def _json_constant(name: str) -> Any:
    # NaN (written by Python's json for a float nan) is a missing value; Infinity stays visible (an invalid id).
    return None if name == "NaN" else JsonNumber(name)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with a key written twice, `json` keeps the last value silently."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def json_text(value: Any) -> str:
    """A cell of nested JSON values (lists, objects, `JsonNumber`s) → compact JSON text, numbers as written."""
    if isinstance(value, JsonNumber):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {json_text(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(json_text(v) for v in value) + "]"
    if isinstance(value, (np.generic,)):
        value = value.item()
    if _is_missing(value):
        return "null"
    return json.dumps(value, ensure_ascii=False, default=str)


def _json_loads(text: str) -> Any:
    return json.loads(text, parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=_json_constant,
                      object_pairs_hook=_json_object)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON Lines (one object per line; blank lines skipped), or a JSON array of objects (a `.json` export whose
    first character is `[`, pretty-printed or not): one row per line / element."""
    records: list[dict[str, Any]] = []
    errors: list[str | None] = []
    raw_bad: list[bool] = []  # the line itself had bytes that are not UTF-8 (vs. \u escapes of surrogates)
    labels: list[str] = []  # where each row is in the file: "line 3", "element 2"
    with _open_binary(path) as fh:
        text = io.TextIOWrapper(fh, encoding=_encoding(path), errors="surrogateescape", newline="\n").read()

    def add(value: Any, label: str, error: str | None = None, bad: bool = False) -> None:
        if error is None and not isinstance(value, dict):
            error = f"expected a JSON object, got {type(value).__name__}"
        records.append(value if error is None else {})
        errors.append(None if error is None else f"{label}: not a JSON object ({error})")
        raw_bad.append(bad)
        labels.append(label)

    if text.lstrip().startswith("["):
        try:
            array = _json_loads(text)
        except ValueError as exc:
            raise DinoflowError(f"{path}: the file starts with '[' but is not a JSON array: {exc} (write one JSON "
                                "object per line, or a valid array of objects)") from exc
        if not isinstance(array, list):
            raise DinoflowError(f"{path}: expected a JSON array of objects, got {type(array).__name__}")
        bad = _BAD_BYTE.search(text) is not None
        for k, value in enumerate(array):
            add(value, f"element {k}", bad=bad)
    else:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = _json_loads(line)
            except ValueError as exc:
                # One broken line must not sink a million good ones: it becomes a row with an error.
                add(None, f"line {lineno}", error=str(exc))
            else:
                add(value, f"line {lineno}", bad=_BAD_BYTE.search(line) is not None)
    # Column by column as object: DataFrame.from_records would infer dtypes (ints with a null → float64).
    names = list(dict.fromkeys(key for rec in records for key in rec))
    df = pd.DataFrame({name: pd.Series([rec.get(name) for rec in records], dtype=object) for name in names},
                      index=pd.RangeIndex(len(records)))
    df["__jsonl_error"] = pd.Series(errors, dtype=object)
    df.attrs["raw_bad_bytes"] = raw_bad
    df.attrs["row_labels"] = labels
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
        elif pa.types.is_float16(col.type) or pa.types.is_float32(col.type):
            # NumPy scalars keep their precision, so `identifier` knows a float32 id is exact only below 2^24.
            scalar = np.dtype(col.type.to_pandas_dtype()).type
            out[name] = pd.Series([None if v is None else scalar(v) for v in col.to_pylist()], dtype=object)
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
        return json_text(value)
    text = str(value).strip()
    return text or None


def identifier(value: Any, name: str = "id") -> tuple[str | None, str | None, bool]:
    """A cell of the id (or path) column → (text or None when missing, error or None, whitespace stripped?).

    Text is kept as written; integers (Parquet int64, JSON numbers) become their decimal digits. A float is
    accepted only when exact (whole floats print without `.0`); above 2^53 it may already have been rounded by
    whoever wrote the table, which would silently merge or rename ids, so it is an error. Lists, objects and
    booleans are not identifiers.
    """
    if _is_missing(value):
        return None, None, False
    if isinstance(value, (bool, np.bool_)):
        return None, f"{name} is a boolean ({value}), not an identifier", False
    if isinstance(value, (list, tuple, np.ndarray, dict)):
        return None, f"{name} is a {type(value).__name__} ({_as_text(value)}), not a single value", False
    if isinstance(value, JsonNumber) and value.lstrip("-") == "Infinity":
        return None, f"{name} is {value}, not an identifier", False
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return None, f"{name} is {v}, not an identifier", False
        # float64: every integer up to 2^53 is exact; float32 only up to 2^24 (float16: 2^11).
        bits = np.finfo(value.dtype).nmant + 1 if isinstance(value, np.floating) else 53
        if abs(v) >= 2 ** bits:
            return None, (f"{name} {value!r} is a floating-point number above 2^{bits}, so the program that wrote "
                          "the table may have rounded it (1344800117571260417 becomes ...416): write ids as text "
                          "or integers"), False
        return (str(int(v)) if v.is_integer() else str(value)), None, False
    if isinstance(value, (int, np.integer, decimal.Decimal)):
        return str(value), None, False
    text = str(value)
    stripped = text.strip()
    return (stripped or None), None, stripped != text and bool(stripped)


def _list_literal(text: str) -> list[str] | None:
    """The items of a serialised list (JSON array, Python list/tuple/set literal, NumPy repr), or None.

    Nothing is evaluated: JSON is parsed by `json`; otherwise Python's tokenizer splits the text and only single
    string-literal tokens go through `ast.literal_eval`. Adjacent strings (NumPy's `['a' 'b']`) stay separate
    items. Nested lists, names and expressions are not a keyword list (None).
    """
    try:
        value = json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    except ValueError:
        value = None
    if isinstance(value, list):
        return [str(v) for v in value if v is not None] if all(
            v is None or isinstance(v, (str, bool)) for v in value) else None
    closing = {"[": "]", "(": ")", "{": "}"}
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError):
        return None
    if len(tokens) < 2 or closing.get(tokens[0].string) != tokens[-1].string:
        return None
    items: list[str] = []
    sign = ""
    for tok in tokens[1:-1]:
        if tok.type == tokenize.STRING:
            try:
                item = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                return None
            if isinstance(item, bytes):
                item = item.decode("utf-8", "replace")
            items.append(item)
        elif tok.type == tokenize.NUMBER:
            items.append(sign + tok.string)
            sign = ""
        elif tok.type == tokenize.NAME and tok.string in ("None", "nan", "NaN"):
            continue  # a missing element
        elif tok.type == tokenize.NAME and tok.string in ("True", "False"):
            items.append(tok.string)
        elif tok.type == tokenize.OP and tok.string == ",":
            continue
        elif tok.type == tokenize.OP and tok.string == "-" and not sign:
            sign = "-"
        else:
            return None
    return items


def _looks_like_list(text: str) -> bool:
    return len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")"), ("{", "}"))


def keyword_cell(value: Any, separator: str = ";") -> tuple[list[str], str | None]:
    """A keywords cell → (keywords, note or None). See the module docstring for the rules.

    note: `keywords-list-literal` when a serialised list was recognised; `keywords-unparsed-list` when the cell
    looks like one ([...], (...), {...}) but is not (then it is split on `separator` like any text);
    `keywords-nested-list` when a list (JSON array, Parquet list) holds lists or objects: nested lists are
    flattened, objects kept as their JSON text (never as a Python repr such as "['x']").
    """
    if _is_missing(value):
        return [], None
    note = None
    if isinstance(value, (list, tuple, np.ndarray)):
        items: Iterable[Any] = _flatten(value)
        if any(isinstance(v, (list, tuple, np.ndarray, dict)) for v in value):
            note = "keywords-nested-list"
    else:
        text = json_text(value) if isinstance(value, dict) else str(value).strip()
        parsed = _list_literal(text) if _looks_like_list(text) else None
        if parsed is not None:
            items, note = parsed, "keywords-list-literal"
        else:
            if _looks_like_list(text):
                note = "keywords-unparsed-list"
            items = text.split(separator) if separator else [text]
    out = []
    for item in items:
        if _is_missing(item):
            continue
        item_text = (json_text(item) if isinstance(item, (bool, np.bool_, dict)) else str(item)).strip()
        if item_text:
            out.append(item_text)
    return out, note


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    for item in items:
        if isinstance(item, (list, tuple, np.ndarray)):
            yield from _flatten(item)
        else:
            yield item


def parse_keywords(value: Any, separator: str = ";") -> list[str]:
    """A list (Parquet list / JSON array), a serialised list, or a `separator`-separated string → list of
    non-empty stripped str (`keyword_cell` without its note)."""
    return keyword_cell(value, separator)[0]


def _bad_utf8(value: Any) -> tuple[int, int] | None:
    """(character position, code point) of the first lone surrogate (a byte that was not valid UTF-8 is
    U+DC80..U+DCFF, see the module docstring), or None."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return None if m is None else (m.start(), ord(m.group(0)))
    if isinstance(value, list):
        for item in value:
            found = _bad_utf8(item)
            if found is not None:
                return found
    return None


# What pandas (`astype(str)`, `str(None)`), databases and spreadsheets write for a missing value.
MISSING_AS_TEXT = frozenset({"nan", "NaN", "None", "null", "NULL", "<NA>", "NaT", "#N/A"})


def _warn_missing_as_text(path: Path, column: str, values: pd.Series) -> None:
    """Log the rows whose cell (or a keyword) is the text of a missing value ("nan", "None", ...): kept as
    text, since it may be meant ("NaN" as a word), but a caption "nan" on every unlabelled row would make the
    captions look alike to the text model."""
    rows: list[int] = []
    seen: set[str] = set()
    for i, value in enumerate(values):
        found = {v for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, str) and v in MISSING_AS_TEXT}
        if found:
            rows.append(i)
            seen |= found
    if rows:
        log.warning("%s: %d cell(s) of column %r are the text of a missing value (%s; rows %s%s): kept as text. "
                    "A missing value written by pandas astype(str) or a database export? Leave such cells empty",
                    path, len(rows), column, ", ".join(map(repr, sorted(seen))), ", ".join(map(str, rows[:10])),
                    ", ..." if len(rows) > 10 else "")


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
    mapping = {name: name for name in REQUIRED + OPTIONAL}
    mapping.update(dict(columns or {}))
    unknown_keys = set(mapping) - set(REQUIRED + OPTIONAL)
    if unknown_keys:
        raise DinoflowError(f"collection.columns: unknown key(s) {sorted(unknown_keys)} "
                            f"(allowed: {', '.join(REQUIRED + OPTIONAL)})")
    if fmt == "csv":
        raw = _read_csv(path, [mapping[name] for name in REQUIRED])
    else:
        raw = {"parquet": _read_parquet, "jsonl": _read_jsonl}[fmt](path)
    jsonl_errors = raw.pop("__jsonl_error") if "__jsonl_error" in raw.columns else None
    if len(raw) == 0:
        raise DinoflowError(f"{path}: the table has no data rows (collection.metadata in params.yaml)")
    raw_bad_bytes = raw.attrs.get("raw_bad_bytes")
    row_labels = raw.attrs.get("row_labels")
    # Names with spaces around them are shown quoted: `id ` is not `id`.
    found = [repr(str(c)) if str(c) != str(c).strip() else str(c) for c in raw.columns]
    for name in REQUIRED:
        if mapping[name] not in raw.columns:
            near = [str(c) for c in raw.columns if str(c).strip().casefold() == mapping[name].casefold()]
            hint = f"; {near[0]!r} differs only in letter case or spaces" if near else ""
            raise DinoflowError(f"{path}: no column {mapping[name]!r} for `{name}` (columns found: "
                                f"{', '.join(found) or 'none'}{hint}; set collection.columns.{name} in params.yaml)")
    label_columns = list(label_columns or [])
    for label in label_columns:
        if label not in raw.columns:
            raise DinoflowError(f"{path}: label column {label!r} not found (columns found: {', '.join(found)}; "
                                "see collection.label_columns and collection.group_column in params.yaml: "
                                "group_column: null finds near-duplicate groups from the images instead)")

    n = len(raw)
    df = pd.DataFrame(index=pd.RangeIndex(n))
    df["row"] = np.arange(n, dtype=np.int64)

    def column(name: str) -> pd.Series:
        return raw[name] if name in raw.columns else pd.Series([None] * n, dtype=object)

    notes: list[list[str]] = [[] for _ in range(n)]
    id_errors: list[str | None] = [None] * n
    for name in ("id", "path"):
        values = []
        for i, v in enumerate(column(mapping[name])):
            text, error, stripped = identifier(v, name)
            values.append(text)
            if error is not None and id_errors[i] is None:
                id_errors[i] = f"row {i}: column {mapping[name]!r}: {error}"
            if stripped:
                notes[i].append(f"{name}-whitespace-stripped")
        df[name] = pd.Series(values, dtype=object)
    df["caption"] = pd.Series([_as_text(v) for v in column(mapping["caption"])], dtype=object)
    keywords = []
    for i, v in enumerate(column(mapping["keywords"])):
        kws, note = keyword_cell(v, keyword_separator)
        keywords.append(kws)
        if note:
            notes[i].append(note)
    df["keywords"] = pd.Series(keywords, dtype=object)
    unparsed = [i for i, row_notes in enumerate(notes) if "keywords-unparsed-list" in row_notes]
    if unparsed:
        log.warning("%s: %d keyword cell(s) look like a serialised list but cannot be parsed; split on %r instead "
                    "(rows %s%s)", path, len(unparsed), keyword_separator, ", ".join(map(str, unparsed[:10])),
                    ", ..." if len(unparsed) > 10 else "")
    for label in label_columns:
        df[label] = pd.Series([_as_text(v) for v in raw[label]], dtype=object)
    for name in ["caption", "keywords", *label_columns]:
        _warn_missing_as_text(path, mapping.get(name, name), df[name])

    used = {mapping[name] for name in REQUIRED + OPTIONAL} | set(label_columns)
    unknown = [c for c in raw.columns if c not in used]
    for c in unknown:
        df[c] = raw[c].astype(object).values
    df.attrs["unknown_columns"] = [str(c) for c in unknown]
    df.attrs["format"] = fmt

    # Per-row problems: a JSON line that could not be parsed, invalid UTF-8 in any mapped column, an invalid id.
    errors: list[str | None] = list(jsonl_errors) if jsonl_errors is not None else [None] * n
    statuses: list[str | None] = ["unreadable_row" if e is not None else None for e in errors]
    for name in ["id", "path", "caption", "keywords", *label_columns]:
        values = df[name]
        # Cheap vectorised screen first: only rows with a surrogate are looked at one by one.
        if name == "keywords":
            suspects = values.map(lambda v: _bad_utf8(v) is not None)
        else:
            suspects = values.str.contains(_SURROGATE, na=False)
        for i in np.flatnonzero(suspects.to_numpy(dtype=bool)):
            if errors[i] is None:
                pos, code = _bad_utf8(values.iat[i])
                column_name = mapping.get(name, name)
                if 0xDC80 <= code <= 0xDCFF and (raw_bad_bytes is None or raw_bad_bytes[i]):
                    errors[i] = (f"invalid UTF-8 in column {column_name!r}: byte 0x{code - 0xDC00:02x} at "
                                 f"character {pos} (re-encode the metadata file as UTF-8)")
                else:
                    where = f"{row_labels[i]}: " if row_labels else ""
                    errors[i] = (f"{where}column {column_name!r}: lone surrogate U+{code:04X} at character {pos}, "
                                 "a \\u escape of half a UTF-16 pair (text cut in the middle of an emoji?): not "
                                 "valid Unicode text, fix or remove that character")
                statuses[i] = "invalid_utf8"
    for i, error in enumerate(id_errors):
        if error is not None and errors[i] is None:
            errors[i], statuses[i] = error, "invalid_id"
    df["read_status"] = pd.Series(statuses, dtype=object)
    df["read_error"] = pd.Series(errors, dtype=object)
    df["read_note"] = pd.Series([";".join(row_notes) for row_notes in notes], dtype=object)
    return df


# ----------------------------------------------------------------------------------------------------------
# A cheap fingerprint of the image folder, for Snakemake


def image_listing(images_dir: str | os.PathLike) -> tuple[list[tuple[str, int, int]], int]:
    """Every file under `images_dir` (recursively, symlinked files followed, symlinked folders not) as
    (relative path, size in bytes, mtime in ns), sorted; and the newest mtime (ns) of any file or folder.
    One `stat` per entry: no file is read, so it stays cheap at 10^5 images."""
    root = os.fspath(images_dir)
    entries: list[tuple[str, int, int]] = []
    newest = 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        newest = max(newest, os.stat(folder).st_mtime_ns)
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:  # a dangling symlink: listed, ingest reports it
                st = os.lstat(os.path.join(folder, name))
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            entries.append((rel.replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime_ns)
    entries.sort()
    return entries, newest


LISTING_HEADER = "# path\tsize_bytes\tmtime_ns (written by dinoflow.data.collection.update_image_listing)\n"


def update_image_listing(images_dir: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write the listing of `images_dir` to `out` (TSV) only when it changed, and return `out`.

    Snakemake decides by modification times, and replacing an image in place (`cp new.jpg images/a.jpg`) does
    not change the folder's mtime, so a rule that depends on the folder alone never re-runs. A rule that also
    depends on this listing does: the file is rewritten when any image's path, size or mtime changes, and its
    mtime is set to the newest mtime among the images and folders (so a first listing of images older than
    the outputs triggers nothing), or to now when an image kept its name but changed with an old mtime
    (`cp -p`). Unchanged, the file is left alone. A missing folder (the demo collection before it is built)
    gives an empty listing dated 1970, older than anything.
    """
    out = Path(out)
    if Path(images_dir).is_dir():
        entries, newest = image_listing(images_dir)
    else:
        entries, newest = [], 0
    text = LISTING_HEADER + "".join(f"{p}\t{size}\t{mtime}\n" for p, size, mtime in entries)
    old = out.read_text(encoding="utf-8", errors="surrogateescape") if out.exists() else None
    if old == text:
        return str(out)
    if old is not None:
        before = {}
        for line in old.splitlines()[1:]:
            parts = line.rsplit("\t", 2)
            if len(parts) == 3:
                before[parts[0]] = (int(parts[1]), int(parts[2]))
        if any(p in before and before[p] != (size, mtime) for p, size, mtime in entries):
            newest = max(newest, time.time_ns())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    os.utime(tmp, ns=(newest, newest))
    os.replace(tmp, out)
    return str(out)

