"""dinoflow ingest: one manifest row per input row, one distinct status per problem, conversions noted."""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinoflow import paths
from dinoflow.data import ingest
from dinoflow.errors import DinoflowError

from data_helpers import data_params, jpeg_bytes, png_bytes, raw_png, rgb16_png, run_ingest, smooth_rgb



def add_case_files(images: Path, outside: Path) -> list[dict]:
    """Write one file per case into `images`; return the metadata rows (id = case name)."""
    arr = smooth_rgb(48, 32)
    good_jpeg = jpeg_bytes(arr)
    files: dict[str, bytes] = {
        "zero.jpg": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "notimage.jpg": b"this is a text file that pretends to be a JPEG\n" * 20,
        "cmyk.jpg": _save(Image.new("CMYK", (30, 20), (255, 0, 0, 0)), "JPEG"),
        "gray16.png": png_bytes(Image.fromarray(np.full((12, 10), 40000, np.uint16))),
        "rgb16.png": rgb16_png(np.full((6, 5, 3), [65535, 0, 32768], np.uint16)),
        "palette.png": png_bytes(Image.new("RGB", (16, 16), (10, 200, 30)).quantize(4)),
        "alpha.png": png_bytes(Image.new("RGBA", (16, 16), (255, 0, 0, 128))),
        "rotated.jpg": jpeg_bytes(smooth_rgb(40, 20), exif_orientation=6),
        "big.png": png_bytes(Image.new("RGB", (300, 300), (1, 2, 3))),
        "liar.png": raw_png(100_000, 100_000, 8, 2),  # header claims 10^10 pixels, data is tiny
        "ok.jpg": good_jpeg,
        "dup.jpg": good_jpeg,
    }
    corrupt = bytearray(png_bytes(Image.fromarray(smooth_rgb(64, 64, seed=3))))
    start = corrupt.find(b"IDAT") + 40
    corrupt[start:start + 20] = bytes(b ^ 0x5A for b in corrupt[start:start + 20])
    files["corrupt.png"] = bytes(corrupt)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 255, 255, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    files["palette_alpha.png"] = _save(pal, "PNG", transparency=0)
    for name, data in files.items():
        (images / name).write_bytes(data)
    (images / "adir.jpg").mkdir()
    (outside / "secret.png").write_bytes(png_bytes(Image.new("RGB", (4, 4))))
    os.symlink(outside / "secret.png", images / "link.png")

    rows = [{"id": Path(name).stem, "path": name, "caption": f"case {name}", "keywords": "k1;k2"}
            for name in files]
    rows += [
        {"id": "missing", "path": "does_not_exist.jpg", "caption": "x", "keywords": ""},
        {"id": "adir", "path": "adir.jpg", "caption": "x", "keywords": ""},
        {"id": "dup", "path": "ok.jpg", "caption": "second row with id dup", "keywords": ""},
        {"id": "escape", "path": "../outside/secret.png", "caption": "x", "keywords": ""},
        {"id": "absolute", "path": str(outside / "secret.png"), "caption": "x", "keywords": ""},
        {"id": "symlink", "path": "link.png", "caption": "x", "keywords": ""},
        {"id": "nocaption", "path": "ok.jpg", "caption": None, "keywords": None},
        {"id": None, "path": "ok.jpg", "caption": "no id", "keywords": ""},
        {"id": "nopath", "path": None, "caption": "x", "keywords": ""},
    ]
    return rows


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path: Path, workspace: Path) -> dict:
    """A collection with every problem; returns params (max_pixels 50,000, nothing fails the run)."""
    root = tmp_path / "messy"
    images, outside = root / "images", root / "outside"
    images.mkdir(parents=True)
    outside.mkdir()
    rows = add_case_files(images, outside)
    df = pd.DataFrame(rows)
    df["photographer"] = "someone"  # an unknown column
    csv = df.to_csv(index=False).encode("utf-8")
    # One more row whose caption is Latin-1, not UTF-8.
    csv += b"latin1,ok.jpg,caf\xe9,k,someone\n"
    (root / "metadata.csv").write_bytes(csv)
    collection = {"name": "messy", "images_dir": str(images), "metadata": str(root / "metadata.csv"),
                  "columns": {"id": "id", "path": "path", "caption": "caption", "keywords": "keywords"},
                  "label_columns": [], "keyword_separator": ";"}
    params = data_params(collection)
    params["ingest"].update({"max_pixels": 50_000, "max_skipped_fraction": 1.0, "workers": 1})
    return params


EXPECTED_STATUS = {
    "zero": "empty_file",
    "truncated": "truncated_image",
    "corrupt": "corrupt_image",
    "notimage": "not_an_image",
    "big": "too_many_pixels",
    "liar": "too_many_pixels",
    "missing": "missing_file",
    "adir": "not_a_file",
    "escape": "path_outside_images_dir",
    "absolute": "path_outside_images_dir",
    "symlink": "path_outside_images_dir",
    "latin1": "invalid_utf8",
    "nopath": "missing_path",
    "cmyk": "ok", "gray16": "ok", "rgb16": "ok", "palette": "ok", "palette_alpha": "ok", "alpha": "ok",
    "rotated": "ok", "ok": "ok", "nocaption": "ok", "dup": "ok",
}


def test_every_problem_gets_its_own_status(messy):
    manifest, summary = run_ingest(messy)
    assert len(manifest) == 25 and manifest["row"].tolist() == list(range(25))  # nothing dropped
    by_id = {i: r for i, r in manifest.groupby("id", dropna=False)}
    for case, status in EXPECTED_STATUS.items():
        assert by_id[case]["status"].iloc[0] == status, (case, by_id[case]["detail"].iloc[0])
    # the second row with id "dup" is the duplicate; its detail names the first row
    dup_rows = by_id["dup"].sort_values("row")
    assert dup_rows["status"].tolist() == ["ok", "duplicate_id"]
    assert f"already used by row {dup_rows['row'].iloc[0]}" in dup_rows["detail"].iloc[1]
    assert manifest.loc[manifest["id"].isna(), "status"].tolist() == ["missing_id"]
    # every skip reason is a documented one, and the summary counts match the manifest
    assert set(manifest["status"]) - {"ok"} <= set(ingest.REASONS)
    assert summary["by_status"] == manifest["status"].value_counts().to_dict()
    assert summary["n_rows"] == 25 and summary["n_ok"] == (manifest["status"] == "ok").sum()
    assert json.loads(Path(paths.INGEST_SUMMARY).read_text())["by_status"] == summary["by_status"]


def test_details_say_why(messy):
    manifest, _ = run_ingest(messy)
    detail = dict(zip(manifest["id"], manifest["detail"]))
    assert "300x300 = 90,000 pixels is over ingest.max_pixels = 50,000" in detail["big"]
    assert "100000x100000" in detail["liar"]
    assert "0 bytes" in detail["zero"]
    assert "truncated" in detail["truncated"]
    assert "not an image" in detail["notimage"] and ".jpg" in detail["notimage"]
    assert "invalid UTF-8 in column 'caption': byte 0xe9" in detail["latin1"]
    assert "absolute path" in detail["absolute"]
    assert "outside" in detail["symlink"]


def test_conversions_are_noted_and_rows_stay_ok(messy):
    manifest, summary = run_ingest(messy)
    note = dict(zip(manifest["id"], manifest["note"]))
    assert note["cmyk"] == "cmyk->rgb"
    assert note["gray16"] == "16bit->8bit"
    assert note["rgb16"] == "16bit->8bit"
    assert note["palette"] == "palette->rgb"
    assert note["palette_alpha"] == "palette->rgb;alpha->white"
    assert note["alpha"] == "alpha->white"
    assert note["rotated"] == "exif-rotated"
    assert note["ok"] == ""
    assert summary["notes"]["exif-rotated"] == 1


def test_width_height_are_the_upright_original_size(messy):
    manifest, _ = run_ingest(messy)
    size = {i: (w, h) for i, w, h in zip(manifest["id"], manifest["width"], manifest["height"])}
    assert size["ok"] == (48, 32)
    assert size["rotated"] == (20, 40)  # stored 40x20 with orientation 6: displayed portrait
    assert size["big"] == (300, 300)
    assert pd.isna(size["missing"][0])


def test_missing_caption_and_keywords_are_normal(messy):
    manifest, summary = run_ingest(messy)
    row = manifest[manifest["id"] == "nocaption"].iloc[0]
    assert row["status"] == "ok"
    assert pd.isna(row["caption"]) and list(row["keywords"]) == []
    assert list(manifest[manifest["id"] == "cmyk"].iloc[0]["keywords"]) == ["k1", "k2"]
    assert summary["ok_without_caption"] == 1


def test_manifest_schema(messy):
    run_ingest(messy)
    schema = pq.read_schema(paths.MANIFEST)
    assert schema.names[:5] == ["row", "id", "path", "caption", "keywords"]
    expected = {"row": pa.int64(), "id": pa.string(), "caption": pa.string(), "keywords": pa.list_(pa.string()),
                "status": pa.string(), "detail": pa.string(), "width": pa.int32(), "height": pa.int32(),
                "note": pa.string()}
    for name, kind in expected.items():
        assert schema.field(name).type.equals(kind), name


def test_unknown_columns_are_reported_and_dropped_or_kept(messy):
    manifest, summary = run_ingest(messy)
    assert summary["unknown_columns"] == ["photographer"] and summary["unknown_columns_kept"] is False
    assert "photographer" not in manifest.columns
    params = copy.deepcopy(messy)
    params["ingest"]["allow_unknown_columns"] = True
    manifest, summary = run_ingest(params)
    assert summary["unknown_columns_kept"] is True
    assert set(manifest["photographer"].dropna()) == {"someone"}


def test_summary_line_on_stdout(messy, capsys):
    """One line on stdout: rows kept / skipped per status and where to read more (Snakemake shows stdout)."""
    _, summary = run_ingest(messy)
    out = capsys.readouterr().out.splitlines()
    assert out == [ingest.summary_line(summary)]
    skipped = {k: v for k, v in summary["by_status"].items() if k != "ok"}
    assert out[0].startswith(f"ingest: 25 rows, {summary['n_ok']} ok, {sum(skipped.values())} skipped (")
    assert all(f"{k}: {v}" in out[0] for k, v in skipped.items()) and "missing_file: 1" in out[0]
    assert out[0].endswith(f"per row: {paths.MANIFEST} (status, detail); counts: {paths.INGEST_SUMMARY}; "
                           "statuses: docs/ingest.md")


def test_too_many_skipped_fails_with_counts_and_manifest(messy, capsys):
    messy["ingest"]["max_skipped_fraction"] = 0.25
    with pytest.raises(DinoflowError) as err:
        ingest.main(messy)
    assert capsys.readouterr().out.startswith("ingest: 25 rows, 10 ok, 15 skipped (")  # printed before failing
    message = str(err.value)
    assert "15 of 25 rows skipped" in message and "> ingest.max_skipped_fraction = 25.0%" in message
    assert "too_many_pixels: 2" in message and "path_outside_images_dir: 3" in message
    assert paths.MANIFEST in message
    assert len(pq.read_table(paths.MANIFEST)) == 25  # written before failing


def test_clean_collection_is_all_ok(tiny_collection, workspace):
    params = data_params(tiny_collection)
    params["ingest"]["workers"] = 1
    manifest, summary = run_ingest(params)
    assert summary["by_status"] == {"ok": 24}
    assert ingest.summary_line(summary).startswith("ingest: 24 rows, 24 ok, 0 skipped; per row: ")
    assert summary["ok_without_caption"] == 4  # missing_text_every=6 in the fixture
    assert manifest["shape"].notna().all() and manifest["color"].notna().all()


def test_process_pool_gives_the_same_manifest(messy):
    serial, _ = run_ingest(messy)
    messy["ingest"]["workers"] = 2
    pooled, _ = run_ingest(messy)
    pd.testing.assert_frame_equal(serial, pooled)


def test_missing_images_dir_is_an_error(messy):
    messy["collection"]["images_dir"] = "/nonexistent/images"
    with pytest.raises(DinoflowError, match="collection.images_dir: /nonexistent/images"):
        ingest.main(messy)


def test_jsonl_with_a_broken_line(tiny_collection, workspace, tmp_path):
    rows = pd.read_csv(tiny_collection["metadata"]).head(3)
    lines = [json.dumps({k: (None if pd.isna(v) else v) for k, v in r.items()}) for r in rows.to_dict("records")]
    lines.insert(1, '{"id": "broken", "path": ')
    meta = tmp_path / "m.jsonl"
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = data_params({**tiny_collection, "metadata": str(meta)})
    params["ingest"]["max_skipped_fraction"] = 0.5
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["ok", "unreadable_row", "ok", "ok"]
    assert manifest["detail"][1].startswith("line 2: not a JSON object")


def test_group_column_is_kept_in_the_manifest_not_reported_unknown(messy):
    params = copy.deepcopy(messy)
    params["collection"]["group_column"] = "photographer"
    manifest, summary = run_ingest(params)
    assert summary["unknown_columns"] == []
    assert set(manifest["photographer"].dropna()) == {"someone"}
