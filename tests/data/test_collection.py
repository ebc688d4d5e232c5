"""read_metadata: three formats, column mapping, keywords, invalid UTF-8 as a per-row error."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinoflow.data.collection import keyword_cell, parse_keywords, read_metadata
from dinoflow.errors import DinoflowError

ROWS = [
    {"id": "007", "path": "a.png", "caption": "a red circle", "keywords": ["red", "circle"], "shape": "circle"},
    {"id": "008", "path": "b.png", "caption": None, "keywords": [], "shape": None},
    {"id": "009", "path": "sub/c.png", "caption": "NA", "keywords": ["blue"], "shape": "square"},
]


def write_all_formats(root: Path) -> dict[str, Path]:
    csv = root / "m.csv"
    pd.DataFrame([{**r, "keywords": ";".join(r["keywords"]) or None} for r in ROWS]).to_csv(csv, index=False)
    jsonl = root / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    parquet = root / "m.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    return {"csv": csv, "jsonl": jsonl, "parquet": parquet}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_formats_give_the_same_rows(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    df = read_metadata(path, {}, ";", ["shape"])
    assert df["row"].tolist() == [0, 1, 2]
    assert df["id"].tolist() == ["007", "008", "009"]  # leading zeros survive (ids are text)
    assert df["path"].tolist() == ["a.png", "b.png", "sub/c.png"]
    assert df["caption"].tolist() == ["a red circle", None, "NA"]  # "NA" is a caption, not a missing value
    assert df["keywords"].tolist() == [["red", "circle"], [], ["blue"]]
    assert df["shape"].tolist() == ["circle", None, "square"]
    assert df["read_error"].isna().all()
    assert df.attrs["unknown_columns"] == []


def test_column_mapping_and_unknown_columns(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"key": ["x1", "x2"], "file": ["x1.jpg", "x2.jpg"], "title": ["one", "two"],
                  "tags": ["a|b", ""], "photographer": ["p", "q"], "genre": ["g", "h"]}).to_csv(path, index=False)
    df = read_metadata(path, {"id": "key", "path": "file", "caption": "title", "keywords": "tags"}, "|", ["genre"])
    assert df["id"].tolist() == ["x1", "x2"]
    assert df["caption"].tolist() == ["one", "two"]
    assert df["keywords"].tolist() == [["a", "b"], []]
    assert df["genre"].tolist() == ["g", "h"]
    assert df.attrs["unknown_columns"] == ["photographer"]
    assert df["photographer"].tolist() == ["p", "q"]


def test_missing_caption_and_keywords_columns_are_normal(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "path": ["a.png"]}).to_csv(path, index=False)
    df = read_metadata(path, None, ";")
    assert df["caption"].tolist() == [None]
    assert df["keywords"].tolist() == [[]]


def test_missing_required_column_names_file_and_column(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a"], "file": ["a.png"]}).to_csv(path, index=False)
    with pytest.raises(DinoflowError, match=r"m\.csv.*'path'.*columns found: id, file"):
        read_metadata(path, {}, ";")


def test_missing_label_column_is_an_error(tmp_path):
    path = write_all_formats(tmp_path)["csv"]
    with pytest.raises(DinoflowError, match="label column 'colour'"):
        read_metadata(path, {}, ";", ["colour"])


def test_unknown_mapping_key_is_an_error(tmp_path):
    path = write_all_formats(tmp_path)["csv"]
    with pytest.raises(DinoflowError, match=r"collection\.columns.*'title'"):
        read_metadata(path, {"title": "caption"}, ";")


def test_invalid_utf8_in_csv_is_a_row_error(tmp_path):
    path = tmp_path / "m.csv"
    # Row 1's caption is Latin-1 (0xe9 = é); rows 0 and 2 are valid UTF-8, including a real é.
    path.write_bytes(b"id,path,caption,keywords\n"
                     b"a,a.png,caf\xc3\xa9,x\n"
                     b"b,b.png,caf\xe9 au lait,y\n"
                     b"c,c.png,\"two\nlines\",z\n")
    df = read_metadata(path, {}, ";")
    assert df["caption"][0] == "café"
    assert df["caption"][2] == "two\nlines"
    assert df["read_error"][0] is None and df["read_error"][2] is None
    assert "invalid UTF-8 in column 'caption'" in df["read_error"][1]
    assert "0xe9 at character 3" in df["read_error"][1]


def test_invalid_utf8_in_keywords_list_of_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "path": "a.png", "keywords": ["ok", "bad\xff"]}\n'
                     b'{"id": "b", "path": "b.png", "keywords": ["fine"]}\n')
    df = read_metadata(path, {}, ";")
    assert "column 'keywords': byte 0xff" in df["read_error"][0]
    assert df["read_error"][1] is None


def test_invalid_utf8_in_parquet_strings(tmp_path):
    path = tmp_path / "m.parquet"
    captions = pa.array([b"good", b"bad \xc3\x28 byte"], pa.binary()).view(pa.string())  # not validated
    pq.write_table(pa.table({"id": ["a", "b"], "path": ["a.png", "b.png"], "caption": captions}), path)
    df = read_metadata(path, {}, ";")
    assert df["read_error"][0] is None
    assert "column 'caption': byte 0xc3 at character 4" in df["read_error"][1]


def test_broken_jsonl_line_is_a_row_not_a_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "path": "a.png"}\n\n{"id": "b", "path": \n[1, 2]\n{"id": "c", "path": "c.png"}\n',
                    encoding="utf-8")
    df = read_metadata(path, {}, ";")
    assert df["id"].tolist() == ["a", None, None, "c"]
    assert df["read_error"][0] is None and df["read_error"][3] is None
    assert df["read_error"][1].startswith("line 3: ")
    assert df["read_error"][2].startswith("line 4: ") and "JSON object" in df["read_error"][2]


def test_malformed_csv_names_file_and_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,path\na,a.png\nb,b.png,extra,fields\n", encoding="utf-8")
    with pytest.raises(DinoflowError, match=r"m\.csv: cannot parse CSV.*line 3"):
        read_metadata(path, {}, ";")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DinoflowError, match="not found"):
        read_metadata(tmp_path / "nope.csv", {}, ";")
    (tmp_path / "m.xlsx").write_bytes(b"x")
    with pytest.raises(DinoflowError, match="unknown metadata format '.xlsx'"):
        read_metadata(tmp_path / "m.xlsx", {}, ";")


def test_numeric_ids_from_parquet_become_text(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1, 20], "path": ["a.png", "b.png"]}), path)
    assert read_metadata(path, {}, ";")["id"].tolist() == ["1", "20"]


@pytest.mark.parametrize("value,expected", [
    ("a; b ;;c", ["a", "b", "c"]),
    (["a", " b ", "", None], ["a", "b"]),
    (None, []),
    (float("nan"), []),
    ("", []),
    ("single", ["single"]),
])
def test_parse_keywords(value, expected):
    assert parse_keywords(value, ";") == expected


# ---------------------------------------------------------------------------------------------- identifiers

BIG_IDS = [1344800117571260417, 1344800117571260419, 1344800117571260420]


def test_19_digit_json_ids_with_a_null_survive_exactly(tmp_path):
    """pandas would make this column float64 (because of the null) and round ...417 to ...416."""
    path = tmp_path / "m.jsonl"
    rows = [{"id": i, "path": f"{k}.png"} for k, i in enumerate(BIG_IDS)] + [{"id": None, "path": "x.png"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    df = read_metadata(path, {}, ";")
    assert df["id"].tolist() == [str(i) for i in BIG_IDS] + [None]
    assert df["read_error"].isna().all()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_big_ids_survive_every_reader(tmp_path, fmt):
    ids = [str(i) for i in BIG_IDS]
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("id,path\n" + "".join(f"{i},{i}.png\n" for i in ids), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(f'{{"id": {i}, "path": "{i}.png"}}\n' for i in ids), encoding="utf-8")
    else:  # an int64 column with a null, as pyarrow writes it (no float on the way)
        pq.write_table(pa.table({"id": pa.array(BIG_IDS + [None], pa.int64()),
                                 "path": [f"{i}.png" for i in ids] + ["x.png"]}), path)
        ids = ids + [None]
    assert read_metadata(path, {}, ";")["id"].tolist() == ids


def test_mixed_id_types_in_jsonl_stay_as_written(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "007", "path": "a.png"}\n{"id": 7, "path": "b.png"}\n{"id": 7.0, "path": "c.png"}\n'
                    '{"id": "7", "path": 12}\n{"id": 1.5e3, "path": "e.png"}\n', encoding="utf-8")
    df = read_metadata(path, {}, ";")
    assert df["id"].tolist() == ["007", "7", "7.0", "7", "1.5e3"]  # the digits in the file, nothing converted
    assert df["path"].tolist() == ["a.png", "b.png", "c.png", "12", "e.png"]


def test_float_ids_are_exact_or_refused(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array([12.0, 2.5, float(BIG_IDS[0]), None], pa.float64()),
                             "path": ["a.png", "b.png", "c.png", "d.png"]}), path)
    df = read_metadata(path, {}, ";")
    assert df["id"].tolist()[:2] == ["12", "2.5"]
    assert df["read_status"].tolist() == [None, None, "invalid_id", None]
    assert "above 2^53" in df["read_error"][2] and "row 2" in df["read_error"][2]
    assert df["id"][3] is None  # a missing id, not an invalid one


def test_non_scalar_ids_are_invalid(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": [1, 2], "path": "a.png"}\n{"id": true, "path": "b.png"}\n{"id": {"x": 1}, '
                    '"path": "c.png"}\n{"id": "ok", "path": "d.png"}\n', encoding="utf-8")
    df = read_metadata(path, {}, ";")
    assert df["read_status"].tolist() == ["invalid_id", "invalid_id", "invalid_id", None]
    assert "not a single value" in df["read_error"][0] and "boolean" in df["read_error"][1]


def test_whitespace_around_ids_and_paths_is_removed_and_noted(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,path\n" 007 ",a.png\n008, b.png\n009,c.png\n', encoding="utf-8")
    df = read_metadata(path, {}, ";")
    assert df["id"].tolist() == ["007", "008", "009"] and df["path"].tolist() == ["a.png", "b.png", "c.png"]
    assert df["read_note"].tolist() == ["id-whitespace-stripped", "path-whitespace-stripped", ""]


# ---------------------------------------------------------------------------------------------- keyword lists


@pytest.mark.parametrize("cell,expected", [
    ("['red', 'circle']", ["red", "circle"]),              # DataFrame.to_csv of a list
    ('["red", "circle"]', ["red", "circle"]),              # JSON
    ("('red', 'circle')", ["red", "circle"]),              # a tuple
    ("{'red'}", ["red"]),                                  # a set
    ("['red' 'circle']", ["red", "circle"]),               # str(numpy array): no commas, not concatenated
    ("['red',\n 'dark blue']", ["red", "dark blue"]),      # wrapped over lines
    ("['a; b', 'c']", ["a; b", "c"]),                      # the separator inside an item stays
    ("[\"it's\", 'say \"hi\"']", ["it's", 'say "hi"']),    # quotes inside items
    ("[1, -2, 3.5]", ["1", "-2", "3.5"]),
    ("['x', None, nan]", ["x"]),
    ("[]", []),
    ("['café', 'ü']", ["café", "ü"]),
])
def test_serialised_keyword_lists(cell, expected):
    assert keyword_cell(cell, ";") == (expected, "keywords-list-literal")


@pytest.mark.parametrize("cell,expected", [
    ("[red, circle]", ["[red, circle]"]),       # looks like a list, is not a literal: split on ";" and warned
    ("['a', ['b']]", ["['a', ['b']]"]),         # nested
    ("[__import__('os')]", ["[__import__('os')]"]),  # never evaluated
])
def test_unparsable_list_cells_are_split_and_flagged(cell, expected):
    assert keyword_cell(cell, ";") == (expected, "keywords-unparsed-list")


def test_text_that_only_starts_with_a_bracket_is_plain_text():
    assert keyword_cell("[draft] photo;sea", ";") == (["[draft] photo", "sea"], None)


def test_pandas_round_trip_of_a_list_column(tmp_path, caplog):
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "path": ["a.png", "b.png", "c.png"],
                  "keywords": [["red", "circle"], [], ["x; y"]]}).to_csv(path, index=False)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('d,d.png,"[red, circle]"\n')
    df = read_metadata(path, {}, ";")
    assert df["keywords"].tolist()[:3] == [["red", "circle"], [], ["x; y"]]
    assert df["read_note"].tolist() == ["keywords-list-literal"] * 3 + ["keywords-unparsed-list"]
    assert "cannot be parsed" in caplog.text and "rows 3" in caplog.text and "m.csv" in caplog.text
