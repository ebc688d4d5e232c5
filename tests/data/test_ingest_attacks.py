"""Adversarial inputs a curator's real exports produce, found by attacking the data layer (issue 8, follow-up):
Excel and pandas exports of the table, JSON quirks, Windows paths, PNG/JPEG variants Pillow cannot open, rows
that name the same file. Each row still ends in the manifest with the right status and a note or detail that
says what happened."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinoflow import paths
from dinoflow.data import preprocess
from dinoflow.data.collection import read_metadata
from dinoflow.data.preprocess import open_rgb
from dinoflow.errors import DinoflowError

from data_helpers import data_params, encode_image, jpeg_bytes, png_bytes, png_chunk, run_ingest, smooth_rgb


PNG = encode_image(Image.new("RGB", (8, 8), (200, 10, 10)), "PNG")


def write_collection(root: Path, files: dict[str, bytes], meta_name: str, meta: bytes, **ingest_cfg) -> dict:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    (root / meta_name).write_bytes(meta)
    params = data_params({"name": "t", "images_dir": str(images), "metadata": str(root / meta_name),
                          "columns": {"id": "id", "path": "path"}, "label_columns": [],
                          "keyword_separator": ";"})
    params["ingest"].update({"max_skipped_fraction": 1.0, **ingest_cfg})
    return params


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


# ------------------------------------------------------------------------------------------- the table


def test_lone_surrogate_escapes_in_json_are_a_row_status_not_a_crash(tmp_path, workspace):
    """Text cut in the middle of an emoji ("\\ud83d" without its pair, as truncated tweets have) cannot be
    written as UTF-8: it was a raw UnicodeEncodeError while writing the manifest. An escaped \\udc80 must not be
    reported as a bad byte 0x80 either."""
    meta = (b'{"id": "a", "path": "a.png", "caption": "sunset \\ud83d"}\n'
            b'{"id": "b\\udc80", "path": "a.png"}\n'
            b'{"id": "c", "path": "a.png", "caption": "ok \\ud83d\\ude00"}\n')
    params = write_collection(tmp_path, {"a.png": PNG}, "m.jsonl", meta)
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["invalid_utf8", "invalid_utf8", "ok"]
    assert "lone surrogate" in manifest["detail"][0] and "'caption'" in manifest["detail"][0]
    assert "line 1" in manifest["detail"][0] and "U+D83D" in manifest["detail"][0]
    assert "byte 0x80" not in manifest["detail"][1] and "'id'" in manifest["detail"][1]
    assert manifest["caption"][2] == "ok \U0001F600"  # a proper pair is one character


def test_jsonl_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "path": "a.png"}\r\n{"id": "b", "path": "b.png"}\r\n')
    df = read_metadata(path)
    assert df["id"].tolist() == ["a", "b"] and df["read_status"].isna().all()


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_export_is_read_as_rows(tmp_path, indent):
    """A `.json` export is often an array of objects, pretty-printed: each line used to become a broken row."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": 1344800117571260417, "path": "a.png", "caption": "café"},
                                {"id": "007", "path": "b.png"}, ["not", "an", "object"]], indent=indent,
                               ensure_ascii=False), encoding="utf-8")
    df = read_metadata(path)
    assert df["id"].tolist() == ["1344800117571260417", "007", None]
    assert df["caption"].tolist() == ["café", None, None]
    assert df["read_status"].tolist() == [None, None, "unreadable_row"] and "element 2" in df["read_error"][2]


def test_a_broken_json_array_names_the_file_and_position(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[{"id": "a", "path": "a.png"},\n {"id": "b", "path": }]', encoding="utf-8")
    with pytest.raises(DinoflowError, match=r"m\.json.*line 2 column"):
        read_metadata(path)


def test_gzipped_json_lines_are_read(tmp_path):
    import gzip

    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([{"id": "007", "path": "a.png"}])))
    assert read_metadata(path)["id"].tolist() == ["007"]


def test_duplicate_keys_in_a_json_line_are_not_resolved_silently(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "path": "a.png", "id": "b"}\n{"id": "c", "path": "c.png"}\n')
    df = read_metadata(path)
    assert df["read_status"].tolist() == ["unreadable_row", None]
    assert "line 1" in df["read_error"][0] and "'id'" in df["read_error"][0] and "twice" in df["read_error"][0]


@pytest.mark.parametrize("token", ["Infinity", "-Infinity"])
def test_non_finite_json_ids_are_invalid(tmp_path, token):
    path = tmp_path / "m.jsonl"
    path.write_text(f'{{"id": {token}, "path": "a.png"}}\n{{"id": 12, "path": "b.png"}}\n', encoding="utf-8")
    df = read_metadata(path)
    assert df["read_status"].tolist() == ["invalid_id", None] and df["id"][1] == "12"
    assert token in df["read_error"][0]


def test_float32_ids_above_2_to_24_are_refused(tmp_path):
    """A float32 column is exact only below 2^24: 16777217 was already stored as 16777216."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array([16777217.0, 12.0, 2.5], pa.float32()),
                             "path": ["a.png", "b.png", "c.png"]}), path)
    df = read_metadata(path)
    assert df["read_status"].tolist() == ["invalid_id", None, None]
    assert df["id"].tolist()[1:] == ["12", "2.5"]
    assert "2^24" in df["read_error"][0]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_unicode_text_export_with_a_bom_is_read(tmp_path, encoding):
    """Excel's "Unicode Text" export: UTF-16 with a byte-order mark, tab-separated, CRLF. It was a raw
    UnicodeEncodeError."""
    text = "id\tpath\tcaption\r\n007\tcafé.png\tქართული\r\n"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[encoding]
    path = tmp_path / "m.txt"
    path.write_bytes(bom + text.encode(encoding))
    df = read_metadata(path)
    assert df["id"].tolist() == ["007"] and df["path"].tolist() == ["café.png"]
    assert df["caption"].tolist() == ["ქართული"]


@pytest.mark.parametrize("data", [
    b"\xef\xbb\xbfid;path;caption\r\n007;a.png;\"he said \"\"hi\"\"; twice\"\r\n1e5;b.png;x\r\n",  # Excel (EU locale)
    b"sep=;\r\nid;path;caption\r\n007;a.png;\"he said \"\"hi\"\"; twice\"\r\n1e5;b.png;x\r\n",  # Excel's sep= line
    b"id\tpath\tcaption\n007\ta.png\the said \"hi\"; twice\n1e5\tb.png\tx\n",  # tab-separated in a .csv
    b"id;path;caption;\"notes, en\"\n007;a.png;\"he said \"\"hi\"\"; twice\";\n1e5;b.png;x;\n",  # "," in a name
])
def test_excel_csv_separators_are_detected(tmp_path, data, caplog):
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    df = read_metadata(path)
    assert df["id"].tolist() == ["007", "1e5"] and df["path"].tolist() == ["a.png", "b.png"]
    assert df["caption"][0] == 'he said "hi"; twice'
    assert "separat" in caplog.text


@pytest.mark.parametrize("data, line", [
    (b"id,path,caption\n1,a.png,red, blue\n2,b.png,green\n", 2),  # first row: pandas took it as an index column
    (b"id,path\n1,a.png\n2,b.png,extra\n", 3),
])
def test_a_row_with_more_fields_than_the_header_is_an_error_not_a_shift(tmp_path, data, line):
    """An unquoted comma in the first row's caption made pandas use the first column as the index: every id
    became a path, silently."""
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    with pytest.raises(DinoflowError, match=rf"m\.csv.*line {line}"):
        read_metadata(path)


def test_a_trailing_separator_loses_nothing_and_is_accepted(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,path\n1,a.png,\n2,b.png,\n")
    df = read_metadata(path)
    assert df["id"].tolist() == ["1", "2"] and df["path"].tolist() == ["a.png", "b.png"]


def test_a_one_column_header_names_the_problem(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id|path\n1|a.png\n")
    with pytest.raises(DinoflowError, match="only one column"):
        read_metadata(path)


def test_utf16_without_a_bom_and_header_case_are_explained(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("id,path\n1,a.png\n".encode("utf-16-le"))
    with pytest.raises(DinoflowError, match="NUL bytes.*UTF-16"):
        read_metadata(path)
    path.write_bytes(b"ID,Path\n1,a.png\n")
    with pytest.raises(DinoflowError, match="'ID' differs only in letter case"):
        read_metadata(path)


@pytest.mark.parametrize("name, data", [("m.csv", b"id,path\n"), ("m.jsonl", b"\n\n"), ("m.json", b"[]")])
def test_a_table_without_rows_is_an_error_not_an_empty_success(tmp_path, name, data):
    """A header-only CSV went through ingest as "0 ok, 0 skipped" and failed only in preprocess."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DinoflowError, match="no data rows"):
        read_metadata(path)


def test_duplicate_column_names_in_csv_are_an_error(tmp_path):
    """pandas renames the second `id` to `id.1` and the table would silently use the first."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,path,id\n1,a.png,2\n")
    with pytest.raises(DinoflowError, match=r"'id'.*more than once"):
        read_metadata(path)


def test_header_names_with_spaces_are_shown_quoted(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id ,path\n1,a.png\n")
    with pytest.raises(DinoflowError, match=r"'id '"):
        read_metadata(path)


def test_unknown_columns_holding_lists_and_objects_are_kept_as_json(tmp_path, workspace):
    rows = [{"id": "a", "path": "a.png", "tags": [1, "x"], "obj": {"k": "v"}},
            {"id": "b", "path": "a.png", "tags": None, "obj": None}]
    params = write_collection(tmp_path, {"a.png": PNG}, "m.jsonl", jsonl(rows), allow_unknown_columns=True)
    run_ingest(params)
    table = pq.read_table(paths.MANIFEST)
    assert table.column("tags").to_pylist() == ['[1, "x"]', None]  # numbers as written
    assert json.loads(table.column("obj")[0].as_py()) == {"k": "v"} and table.column("obj")[1].as_py() is None


@pytest.mark.parametrize("cell, expected, note", [
    ([["red", "circle"], ["sun"]], ["red", "circle", "sun"], "keywords-nested-list"),
    (["a", {"k": "v"}], ["a", '{"k": "v"}'], "keywords-nested-list"),
    ([True, 2.5, None, "x"], ["true", "2.5", "x"], None),
    ({"k": "v"}, ['{"k": "v"}'], "keywords-unparsed-list"),
])
def test_keyword_cells_holding_json_structures_are_never_python_reprs(tmp_path, cell, expected, note):
    path = tmp_path / "m.jsonl"
    path.write_bytes(jsonl([{"id": "a", "path": "a.png", "keywords": cell}]))
    df = read_metadata(path)
    assert df["keywords"][0] == expected
    assert df["read_note"][0] == (note or "")


# ------------------------------------------------------------------------------------------- paths


def test_windows_backslash_paths_are_matched_and_noted(tmp_path, workspace):
    rows = [{"id": "a", "path": "sub\\a.png"}, {"id": "b", "path": "sub/a.png"}, {"id": "c", "path": "sub\\zz.png"}]
    params = write_collection(tmp_path, {"sub/a.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["ok", "ok", "missing_file"]
    assert manifest["file"][0] == "sub/a.png" and manifest["path"][0] == "sub\\a.png"
    assert "path-backslashes" in manifest["note"][0] and manifest["note"][1].startswith("duplicate-file:")
    assert "sub\\\\zz.png" in manifest["detail"][2] or "sub\\zz.png" in manifest["detail"][2]
    preprocess.main(params)
    assert pq.read_table(paths.PROCESSED_INDEX).column("id").to_pylist() == ["a", "b"]


def test_a_file_named_with_a_backslash_on_disk_is_used_as_written(tmp_path, workspace):
    rows = [{"id": "a", "path": "x\\y.png"}]
    params = write_collection(tmp_path, {"x\\y.png": PNG, "x/y.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, _ = run_ingest(params)
    assert manifest["status"].tolist() == ["ok"] and manifest["file"][0] == "x\\y.png" and manifest["note"][0] == ""


def test_urls_and_percent_encoded_names_are_explained(tmp_path, workspace):
    rows = [{"id": "a", "path": "https://example.org/img/a.png"}, {"id": "b", "path": "file:///data/a.png"},
            {"id": "c", "path": "my%20caf%C3%A9.png"}]
    params = write_collection(tmp_path, {"my café.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["path_outside_images_dir", "path_outside_images_dir", "missing_file"]
    assert "is a URL" in manifest["detail"][0] and "is a URL" in manifest["detail"][1]
    assert "'my café.png'" in manifest["detail"][2] and "percent-encoded" in manifest["detail"][2]
    assert summary["missing_file_with_near_match"] == 1


def test_a_path_that_repeats_the_image_folder_is_explained(tmp_path, workspace):
    rows = [{"id": "a", "path": "images/sub/a.png"}, {"id": "b", "path": "images\\sub\\a.png"}]
    params = write_collection(tmp_path, {"sub/a.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["missing_file", "missing_file"]
    assert all("'sub/a.png' exists" in d and "image folder's own name 'images'" in d for d in manifest["detail"])
    assert summary["missing_file_with_near_match"] == 2


def test_rows_naming_the_same_file_are_noted(tmp_path, workspace):
    """Two records of one image are two rows (both ok), but the later one says which row has the same file:
    otherwise retrieval metrics count a trivial exact duplicate as a found neighbour."""
    rows = [{"id": "a", "path": "a.png"}, {"id": "b", "path": "b.png"}, {"id": "c", "path": "./a.png"},
            {"id": "d", "path": "sub/../a.png"}, {"id": "e", "path": "a.png"}]
    params = write_collection(tmp_path, {"a.png": PNG, "b.png": PNG, "sub/x.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["ok"] * 5
    assert manifest["note"].tolist() == ["", "", "duplicate-file:row 0", "duplicate-file:row 0",
                                         "duplicate-file:row 0"]
    assert summary["notes"]["duplicate-file"] == 3


def test_invisible_characters_in_a_path_are_named(tmp_path, workspace):
    rows = [{"id": "a", "path": "a\u200b.png"}]
    params = write_collection(tmp_path, {"a.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, _ = run_ingest(params)
    assert manifest["status"].tolist() == ["missing_file"]
    assert "'a.png'" in manifest["detail"][0] and "U+200B" in manifest["detail"][0]


# ------------------------------------------------------------------------------------------- images


def test_png_with_a_bad_crc_in_an_ancillary_chunk_is_corrupt_not_an_unknown_format(tmp_path, workspace):
    good = png_bytes(Image.fromarray(smooth_rgb(16, 16)))
    text = png_chunk(b"tEXt", b"Comment\0hello", crc=0)
    files = {"text_crc.png": good[:33] + text + good[33:]}
    rows = [{"id": "a", "path": "text_crc.png"}]
    manifest, _ = run_ingest(write_collection(tmp_path, files, "m.jsonl", jsonl(rows)))
    assert manifest["status"].tolist() == ["corrupt_image"]
    assert "tEXt" in manifest["detail"][0] and "CRC" in manifest["detail"][0]


def test_files_cut_at_the_end_say_so(tmp_path, workspace, jpeg_backend):
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    j, p = jpeg_bytes(noisy), png_bytes(Image.fromarray(noisy))
    files = {"no_eoi.jpg": j[:-2], "half.jpg": j[:len(j) // 2], "no_iend.png": p[:-12]}
    rows = [{"id": k, "path": k} for k in files]
    manifest, _ = run_ingest(write_collection(tmp_path, files, "m.jsonl", jsonl(rows)))
    assert manifest["status"].tolist() == ["truncated_image"] * 3
    assert "only the 2-byte end-of-image marker is missing" in manifest["detail"][0]
    assert "end-of-image marker" not in manifest["detail"][1]


def test_image_formats_pillow_cannot_decode_are_named(tmp_path, workspace):
    """A 12-bit JPEG is a damaged/unsupported JPEG, not "not an image"; an iPhone HEIC says what it is."""
    j = jpeg_bytes(smooth_rgb(16, 16))
    sof = j.index(b"\xff\xc0")
    files = {"j12.jpg": j[:sof + 4] + bytes([12]) + j[sof + 5:],
             "photo.jpg": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64,
             "page.jpg": b"<!DOCTYPE html><html>404</html>"}
    rows = [{"id": k, "path": k} for k in files]
    manifest, _ = run_ingest(write_collection(tmp_path, files, "m.jsonl", jsonl(rows)))
    assert manifest["status"].tolist() == ["corrupt_image", "not_an_image", "not_an_image"]
    assert "JPEG" in manifest["detail"][0]
    assert "HEIF" in manifest["detail"][1]
    assert "HTML" in manifest["detail"][2]


@pytest.mark.parametrize("orientation", [0, 9])
def test_invalid_exif_orientation_is_not_claimed_as_a_rotation(tmp_path, orientation):
    arr = smooth_rgb(16, 12)
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(arr, exif_orientation=orientation))
    im, notes, size = open_rgb(path)
    assert "exif-rotated" not in notes and im.size == (16, 12) and size == (16, 12)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_a_transparent_colour_key_is_composited_on_white_like_alpha(tmp_path, mode):
    """PNG tRNS on a grey or RGB image (no alpha channel): the keyed pixels were left black, silently, while
    every other transparent pixel becomes white."""
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[0, 0] = (255, 0, 0) if mode == "RGB" else (200, 200, 200)
    im = Image.fromarray(arr) if mode == "RGB" else Image.fromarray(arr[..., 0])
    if mode == "I;16":
        im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    path = tmp_path / "key.png"
    im.save(path, "PNG", transparency=(0, 0, 0) if mode == "RGB" else 0)
    out, notes, _ = open_rgb(path)
    px = np.asarray(out)
    assert px[1, 1].tolist() == [255, 255, 255] and "alpha->white" in notes
    assert px[0, 0].tolist() == ([255, 0, 0] if mode == "RGB" else [200, 200, 200])


def test_ids_that_differ_only_in_unicode_normalisation_are_duplicates(tmp_path, workspace):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    rows = [{"id": nfc, "path": "a.png"}, {"id": nfd, "path": "b.png"}, {"id": "Café", "path": "b.png"}]
    params = write_collection(tmp_path, {"a.png": PNG, "b.png": PNG}, "m.jsonl", jsonl(rows))
    manifest, _ = run_ingest(params)
    assert manifest["status"].tolist() == ["ok", "duplicate_id", "ok"]  # letter case is a different id
    assert manifest["id"][1] == nfd  # kept as written
    assert "row 0" in manifest["detail"][1] and "NFC/NFD" in manifest["detail"][1]


def test_missing_values_written_as_text_are_kept_but_reported(tmp_path, caplog):
    """`df.astype(str).to_csv` writes "nan" for every missing caption: kept (it may be meant), but logged."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,path,caption,keywords\n1,a.png,nan,None\n2,b.png,a cat,['x']\n3,c.png,NaN,\"['nan']\"\n")
    df = read_metadata(path)
    assert df["caption"].tolist() == ["nan", "a cat", "NaN"] and df["keywords"].tolist() == [["None"], ["x"], ["nan"]]
    assert "2 cell(s) of column 'caption'" in caplog.text and "rows 0, 2" in caplog.text
    assert "2 cell(s) of column 'keywords'" in caplog.text


def test_a_file_that_cannot_be_read_is_not_called_corrupt(tmp_path, workspace, monkeypatch):
    """Permission denied (tests may run as root, where chmod 000 still reads, so `open` is made to refuse)."""
    import builtins

    params = write_collection(tmp_path, {"a.png": PNG, "b.png": PNG}, "m.jsonl",
                              jsonl([{"id": "a", "path": "a.png"}, {"id": "b", "path": "b.png"}]))
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("a.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    manifest, _ = run_ingest(params)
    assert manifest["status"].tolist() == ["unreadable_file", "ok"]
    assert "Permission denied" in manifest["detail"][0] and "a.png" in manifest["detail"][0]


def _rgb16_tiff(arr16: np.ndarray) -> bytes:
    """(H, W, 3) uint16 → an uncompressed 16-bit RGB TIFF (Pillow cannot write one)."""
    h, w, _ = arr16.shape
    data = arr16.astype("<u2").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, None),
               (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data))]
    bps_offset = 8 + 2 + len(entries) * 12 + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bps_offset, 273: bps_offset + 6}.get(tag, value)
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data


def test_16bit_rgb_tiff_reduced_to_8_bits_is_noted_like_png(tmp_path):
    arr16 = (smooth_rgb(8, 4).astype(np.uint16) * 257)
    path = tmp_path / "a.tif"
    path.write_bytes(_rgb16_tiff(arr16))
    im, notes, _ = open_rgb(path)
    assert notes == ["16bit->8bit"]
    assert np.array_equal(np.asarray(im), (arr16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_is_applied_once_and_noted_like_jpeg(tmp_path, orientation):
    """Pillow's TIFF reader rotates on load and drops the tag: the note was missing and the manifest's
    width/height were swapped back (not upright)."""
    arr = smooth_rgb(16, 8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "a.png", "PNG", exif=exif)
    Image.fromarray(arr).save(tmp_path / "a.tif", "TIFF", tiffinfo={0x0112: orientation})
    ref, ref_notes, ref_size = open_rgb(tmp_path / "a.png")
    im, notes, size = open_rgb(tmp_path / "a.tif")
    assert notes == ref_notes == ["exif-rotated"]
    assert size == ref_size == ref.size == ((8, 16) if orientation in (6, 8) else (16, 8))
    assert np.array_equal(np.asarray(im), np.asarray(ref))
