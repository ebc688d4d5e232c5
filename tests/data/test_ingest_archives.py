"""What real archives do to ingest: exact ids, colour profiles, damaged data Pillow accepts, multi-frame files,
file names in another Unicode normalisation, near-miss names. Every input row stays in the manifest."""

from __future__ import annotations

import io
import json
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from dinoflow import paths
from dinoflow.data import ingest, preprocess
from dinoflow.data.ingest import jpeg_problem
from dinoflow.data.store import ImageStore

from data_helpers import (ADOBE_RGB_PRIMARIES, D50_XY, PROPHOTO_PRIMARIES, SRGB_PRIMARIES, cmyk_icc, data_params,
                          encode_image, gray_icc, jpeg_bytes, rgb_icc, reference_to_srgb, run_ingest, smooth_rgb,
                          srgb_encode)

ADOBE = rgb_icc("Adobe RGB (1998)", ADOBE_RGB_PRIMARIES, gamma=563 / 256)
PROPHOTO = rgb_icc("ProPhoto RGB", PROPHOTO_PRIMARIES, white_xy=D50_XY, gamma=1.8)


def collection(root: Path, files: dict[str, bytes], rows: list[dict] | None = None, fmt: str = "csv") -> dict:
    """Write `files` under root/images and a metadata table (default: one row per file, id = stem)."""
    images = root / "images"
    for name, data in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    images.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [{"id": Path(n).stem, "path": n} for n in files]
    meta = root / f"metadata.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(meta, index=False)
    else:
        meta.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    params = data_params({"name": "t", "images_dir": str(images), "metadata": str(meta),
                          "columns": {"id": "id", "path": "path"}, "label_columns": [], "keyword_separator": ";"})
    params["ingest"]["max_skipped_fraction"] = 1.0
    return params


def by_id(manifest: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["id"]: r for _, r in manifest.iterrows()}


# ---------------------------------------------------------------------------------------------- identifiers


def test_19_digit_ids_and_a_null_id_end_to_end(tmp_path, workspace):
    ids = [1344800117571260417, 1344800117571260419, 1344800117571260420]
    png = encode_image(Image.new("RGB", (8, 8)), "PNG")
    rows = [{"id": i, "path": f"{k}.png"} for k, i in enumerate(ids)] + [{"id": None, "path": "0.png"}]
    params = collection(tmp_path, {f"{k}.png": png for k in range(3)}, rows, fmt="jsonl")
    manifest, summary = run_ingest(params)
    assert pq.read_table(paths.MANIFEST).column("id").to_pylist() == [str(i) for i in ids] + [None]
    assert manifest["status"].tolist() == ["ok", "ok", "ok", "missing_id"]  # no false duplicate_id
    assert manifest["detail"][3] == "row 3: the id is empty"
    preprocess.main(params)
    assert pq.read_table(paths.PROCESSED_INDEX).column("id").to_pylist() == [str(i) for i in ids]


def test_spreadsheet_rounded_ids_are_duplicates_with_a_hint(tmp_path, workspace):
    png = encode_image(Image.new("RGB", (8, 8)), "PNG")
    rows = [{"id": "1.3448E+18", "path": "a.png"}, {"id": "1.3448E+18", "path": "b.png"}]
    manifest, _ = run_ingest(collection(tmp_path, {"a.png": png, "b.png": png}, rows))
    assert manifest["status"].tolist() == ["ok", "duplicate_id"]
    assert "scientific notation" in manifest["detail"][1] and "row 0" in manifest["detail"][1]


def test_invalid_ids_get_their_own_status(tmp_path, workspace):
    png = encode_image(Image.new("RGB", (8, 8)), "PNG")
    rows = [{"id": ["a", "b"], "path": "a.png"}, {"id": "007", "path": "a.png"}]
    manifest, summary = run_ingest(collection(tmp_path, {"a.png": png}, rows, fmt="jsonl"))
    assert manifest["status"].tolist() == ["invalid_id", "ok"]
    assert manifest["id"][1] == "007" and "not a single value" in manifest["detail"][0]
    assert summary["by_status"] == {"invalid_id": 1, "ok": 1}


# ---------------------------------------------------------------------------------------------- colour


def test_icc_profiles_are_converted_to_srgb_and_noted(tmp_path, workspace):
    flat = Image.new("RGB", (16, 16), (180, 120, 90))
    corners = {(c, m, y, k): ((0, 0, 0) if k else (255, 255, 255)) for c in (0, 1) for m in (0, 1)
               for y in (0, 1) for k in (0, 1)}
    corners[(0, 1, 1, 0)] = (200, 30, 40)  # this press's "red"
    files = {
        "adobe.png": encode_image(flat, "PNG", icc_profile=ADOBE),
        "prophoto.tif": encode_image(flat, "TIFF", icc_profile=PROPHOTO),
        "adobe.jpg": encode_image(flat, "JPEG", quality=100, subsampling=0, icc_profile=ADOBE),
        "srgb.png": encode_image(flat, "PNG", icc_profile=rgb_icc("some sRGB", SRGB_PRIMARIES, gamma=None)),
        "cmyk.jpg": encode_image(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100,
                         icc_profile=cmyk_icc("Test press", corners)),
        "gray.png": encode_image(Image.new("L", (16, 16), 128), "PNG", icc_profile=gray_icc("Gray linear", 1.0)),
        "alpha.png": encode_image(Image.new("RGBA", (16, 16), (180, 120, 90, 255)), "PNG", icc_profile=ADOBE),
        "broken.png": encode_image(flat, "PNG", icc_profile=b"not a profile" * 20),
        "mismatch.png": encode_image(flat, "PNG", icc_profile=gray_icc("Gray", 2.2)),
        "plain.png": encode_image(flat, "PNG"),
    }
    params = collection(tmp_path, files, [{"id": n.split(".")[0] + ("_jpg" if n == "adobe.jpg" else ""),
                                            "path": n} for n in files])
    manifest, summary = run_ingest(params)
    rows = by_id(manifest)
    assert set(manifest["status"]) == {"ok"}  # a colour problem never drops an image
    assert rows["adobe"]["note"] == rows["adobe_jpg"]["note"] == "icc->srgb:Adobe RGB (1998)"
    assert rows["prophoto"]["note"] == "icc->srgb:ProPhoto RGB"
    assert rows["cmyk"]["note"] == "icc->srgb:Test press"
    assert rows["gray"]["note"] == "icc->srgb:Gray linear"
    assert rows["alpha"]["note"] == "icc->srgb:Adobe RGB (1998);alpha->white"
    assert rows["srgb"]["note"] == "" and rows["plain"]["note"] == ""
    assert rows["broken"]["note"].startswith("icc-unusable:unreadable ICC profile")
    assert rows["mismatch"]["note"] == "icc-unusable:ICC profile 'Gray' is for GRAY data, the image is RGB"
    assert summary["notes"]["icc->srgb"] == 6 and summary["notes"]["icc-unusable"] == 2

    # The pixels preprocess stores are the converted ones (checked against the formula, not against LittleCMS).
    params["preprocess"]["format"] = "png"
    preprocess.main(params)
    store = ImageStore(paths.PROCESSED_DIR, paths.PROCESSED_INDEX)

    def px(image_id: str) -> np.ndarray:
        return np.asarray(store.get_by_id(image_id).convert("RGB"))[16, 16].astype(int)

    adobe = reference_to_srgb((180, 120, 90), ADOBE_RGB_PRIMARIES, gamma=563 / 256)
    assert np.abs(px("adobe") - adobe).max() <= 1 and np.abs(px("alpha") - adobe).max() <= 1
    assert np.abs(px("adobe") - [199, 121, 88]).max() <= 1  # what a colour-managed viewer shows
    assert np.abs(px("adobe_jpg") - adobe).max() <= 2  # JPEG q100 4:4:4 rounds by a level
    prophoto = reference_to_srgb((180, 120, 90), PROPHOTO_PRIMARIES, D50_XY, 1.8)
    assert np.abs(px("prophoto") - prophoto).max() <= 1
    assert np.abs(px("cmyk") - [200, 30, 40]).max() <= 2  # the profile's red, not the naive (255, 0, 0)
    assert np.abs(px("gray") - srgb_encode(np.array(128 / 255))).max() <= 1  # linear grey 128 is sRGB 188
    assert np.abs(px("broken") - [180, 120, 90]).max() <= 1 and np.abs(px("srgb") - [180, 120, 90]).max() <= 1


def test_uncalibrated_exif_colour_space_without_a_profile_is_noted(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA001] = 0xFFFF  # ColorSpace: uncalibrated (a camera in Adobe RGB mode)
    path = tmp_path / "a.jpg"
    path.write_bytes(encode_image(Image.new("RGB", (8, 8), (180, 120, 90)), "JPEG", exif=exif))
    assert preprocess.open_rgb(path)[1] == ["colorspace-uncalibrated"]
    exif.get_ifd(0x8769)[0xA001] = 1  # sRGB
    path.write_bytes(encode_image(Image.new("RGB", (8, 8), (180, 120, 90)), "JPEG", exif=exif))
    assert preprocess.open_rgb(path)[1] == []


def test_jpeg_with_a_profile_reaches_the_model_converted(tmp_path):
    """The brief's example: (180, 120, 90) in an Adobe RGB JPEG is (199, 122, 89) on a colour-managed screen."""
    path = tmp_path / "a.jpg"
    path.write_bytes(encode_image(Image.new("RGB", (64, 64), (180, 120, 90)), "JPEG", quality=95, icc_profile=ADOBE))
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))[32, 32]  # JPEG rounding: about (180, 121, 91)
    expected = reference_to_srgb(stored, ADOBE_RGB_PRIMARIES, gamma=563 / 256)
    out = preprocess.process_image(str(path), 32, "crop", fmt="png")
    got = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))[16, 16].astype(int)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - [199, 122, 89]).max() <= 2


# ---------------------------------------------------------------------------------------------- damage


def noisy_jpeg(progressive: bool = False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(arr), "JPEG", quality=90, progressive=progressive)


def overwrite(data: bytes, n: int, random: bool) -> bytes:
    out = bytearray(data)
    mid = len(out) // 2
    out[mid:mid + n] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes() if random \
        else bytes(n)
    return bytes(out)


def png_with_bad_crc() -> bytes:
    """Valid zlib data, wrong IDAT checksum: Pillow decodes it without complaint (only verify() checks)."""
    data = bytearray(encode_image(Image.fromarray(smooth_rgb(32, 32)), "PNG"))
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    crc_at = idat + 4 + length
    data[crc_at:crc_at + 4] = struct.pack(">I", (zlib.crc32(data[idat:crc_at]) ^ 1) & 0xFFFFFFFF)
    return bytes(data)


def damaged_files() -> dict[str, bytes]:
    good = noisy_jpeg()
    assert good.endswith(b"\xff\xd9")
    webp = encode_image(Image.fromarray(smooth_rgb(64, 64)), "WEBP", quality=90)
    grown = bytearray(webp)
    grown[16:20] = struct.pack("<I", struct.unpack("<I", webp[16:20])[0] + 4000)  # VP8 chunk claims more
    return {
        "good.jpg": good,
        "zeroed.jpg": overwrite(good, 4000, random=False),
        "random.jpg": overwrite(good, 3000, random=True),
        "zeroed_progressive.jpg": overwrite(noisy_jpeg(progressive=True), 4000, random=False),
        "cut_with_eoi.jpg": good[: len(good) // 2] + b"\xff\xd9",  # truncated, then "repaired" with an end marker
        "padded.jpg": good[:-2] + b"\0" * 20 + good[-2:],  # harmless padding before the end marker
        "crc.png": png_with_bad_crc(),
        "good.webp": webp,
        "truncated.webp": webp[: len(webp) // 2],
        "chunk.webp": bytes(grown),
    }


EXPECTED_DAMAGE = {
    "good": ("ok", None),
    "zeroed": ("corrupt_image", "Corrupt JPEG data"),
    "random": ("corrupt_image", None),
    "zeroed_progressive": ("corrupt_image", "Corrupt JPEG data"),
    "cut_with_eoi": ("corrupt_image", "premature end of data segment"),
    "crc": ("corrupt_image", "CRC"),
    "truncated": ("truncated_image", None),
    "chunk": ("corrupt_image", "WebP chunk 'VP8 '"),
}


def test_damaged_images_are_corrupt_with_the_decoders_message(tmp_path, workspace, jpeg_backend):
    files = damaged_files()
    # Pillow alone accepts the zeroed JPEGs and the bad-CRC PNG: the case this check exists for.
    for name in ("zeroed.jpg", "crc.png"):
        Image.open(io.BytesIO(files[name])).load()
    ids = {Path(n).stem + ("_webp" if n.endswith(".webp") else "") for n in files}
    rows = [{"id": Path(n).stem + ("_webp" if n.endswith(".webp") else ""), "path": n} for n in files]
    manifest, summary = run_ingest(collection(tmp_path, files, rows))
    rows_by_id = by_id(manifest)
    assert set(rows_by_id) == ids and len(manifest) == len(files)
    assert rows_by_id["good_webp"]["status"] == "ok"
    for case, (status, text) in EXPECTED_DAMAGE.items():
        row = rows_by_id.get(case, rows_by_id.get(f"{case}_webp"))
        assert row["status"] == status, (case, row["detail"])
        if text:
            assert text.lower() in row["detail"].lower(), (case, row["detail"])
        if status != "ok":
            assert row["detail"].startswith(str(tmp_path / "images" / row["path"]))  # names the file
    assert "RIFF header says" in rows_by_id["truncated_webp"]["detail"]
    assert rows_by_id["padded"]["status"] == "ok"
    assert rows_by_id["padded"]["note"] == "jpeg-padding:Corrupt JPEG data: 16 extraneous bytes before marker 0xd9"


def test_jpeg_problem_names_libjpegs_complaint(jpeg_backend):
    good = noisy_jpeg()
    check = ingest.jpeg_problem
    assert check(good) is None
    assert check(overwrite(good, 4000, random=False)) == "Corrupt JPEG data: 8260 extraneous bytes before marker 0xd9"


def test_multi_frame_files_say_which_frame_is_used(tmp_path, workspace):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    files = {f"anim.{ext}": encode_image(frames[0], fmt, save_all=True, append_images=frames[1:])
             for ext, fmt in [("gif", "GIF"), ("webp", "WEBP"), ("mpo", "MPO"), ("png", "PNG")]}
    rows = [{"id": n.replace(".", "_"), "path": n} for n in files]
    params = collection(tmp_path, files, rows)
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["ok"] * 4
    assert manifest["note"].tolist() == ["frame:1/3;palette->rgb"] + ["frame:1/3"] * 3  # GIF: a palette image
    assert summary["notes"] == {"frame": 4, "palette->rgb": 1}
    params["preprocess"]["format"] = "png"
    preprocess.main(params)
    store = ImageStore(paths.PROCESSED_DIR, paths.PROCESSED_INDEX)
    for image_id in manifest["id"]:
        assert np.abs(np.asarray(store.get_by_id(image_id).convert("RGB")).astype(int) - [255, 0, 0]).max() <= 8


# ---------------------------------------------------------------------------------------------- file names


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def test_nfd_file_names_match_an_nfc_table(tmp_path, workspace):
    png = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    names = [f"café_{i}.png" for i in range(4)]
    files = {nfd(n): png for n in names[:3]} | {names[3]: png}  # three stored NFD (macOS), one NFC
    files[nfd("Montréal") + "/" + nfd("été.png")] = png  # a decomposed folder too
    rows = [{"id": f"r{i}", "path": n} for i, n in enumerate(names)] + [{"id": "r4", "path": "Montréal/été.png"}]
    assert all(unicodedata.is_normalized("NFC", r["path"]) for r in rows)
    params = collection(tmp_path, files, rows)
    manifest, summary = run_ingest(params)
    assert manifest["status"].tolist() == ["ok"] * 5
    assert manifest["path"].tolist() == [r["path"] for r in rows]  # the table's text, unchanged
    assert manifest["file"].tolist() == [nfd(n) for n in names[:3]] + [names[3], nfd("Montréal/été.png")]
    assert manifest["note"].tolist() == ["filename-unicode:NFD"] * 3 + ["", "filename-unicode:NFD"]
    assert summary["notes"] == {"filename-unicode": 4}
    preprocess.main(params)
    assert len(pq.read_table(paths.PROCESSED_INDEX)) == 5


def test_missing_files_name_their_near_matches(tmp_path, workspace):
    png = encode_image(Image.new("RGB", (8, 8)), "PNG")
    files = {"Photo.PNG": png, "scan.jpeg": jpeg_bytes(smooth_rgb(8, 8)), "ｗｉｄｅ.png": png, "other.png": png}
    rows = [{"id": "case", "path": "photo.png"}, {"id": "ext", "path": "scan.jpg"},
            {"id": "wide", "path": "wide.png"}, {"id": "none", "path": "nothing.png"},
            {"id": "folder", "path": "nofolder/x.png"}]
    manifest, summary = run_ingest(collection(tmp_path, files, rows))
    assert manifest["status"].tolist() == ["missing_file"] * 5
    detail = dict(zip(manifest["id"], manifest["detail"]))
    assert "near match: 'Photo.PNG' (differs in letter case)" in detail["case"]
    assert "'scan.jpeg' (other extension '.jpeg')" in detail["ext"]
    assert "'ｗｉｄｅ.png' (differs in spaces or Unicode compatibility form" in detail["wide"]
    assert "no near match" in detail["none"] and detail["none"].startswith("row 3: path 'nothing.png'")
    assert "no folder 'nofolder'" in detail["folder"]
    assert summary["missing_file_with_near_match"] == 3


def test_ambiguous_normalisation_is_not_guessed(tmp_path, workspace):
    png = encode_image(Image.new("RGB", (8, 8)), "PNG")
    files = {"café.png": png, nfd("café.png"): png}
    rows = [{"id": "nfc", "path": "café.png"}, {"id": "nfd", "path": nfd("café.png")},
            {"id": "other", "path": unicodedata.normalize("NFC", "cafe\u0301\u0301.png")}]
    manifest, _ = run_ingest(collection(tmp_path, files, rows))
    # Each exact name is used as is; neither is a normalisation guess.
    assert manifest["status"].tolist()[:2] == ["ok", "ok"] and manifest["note"].tolist()[:2] == ["", ""]
    assert manifest["file"].tolist()[:2] == ["café.png", nfd("café.png")]


def test_every_status_and_note_code_is_documented_for_curators():
    """docs/ingest.md explains each status and note ingest can write (and the code's tables list them)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "ingest.md").read_text(encoding="utf-8")
    for code in ["ok", *ingest.REASONS]:
        assert f"| `{code}` |" in text, code
    for code in ingest.NOTES:
        assert f"`{code}" in text, code


def test_notes_written_are_documented(tmp_path, workspace):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    files = {"a.gif": encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:]),
             nfd("é.png"): encode_image(Image.new("RGBA", (8, 8)), "PNG", icc_profile=ADOBE),
             "c.jpg": encode_image(Image.new("CMYK", (8, 8)), "JPEG"),
             "d.png": encode_image(Image.new("RGB", (8, 8)), "PNG", icc_profile=b"x" * 64)}
    rows = [{"id": "a", "path": "a.gif", "keywords": "['x', 'y']"}, {"id": " b", "path": "é.png", "keywords": "[x"},
            {"id": "c", "path": "c.jpg", "keywords": "[x]"}, {"id": "d", "path": "d.png", "keywords": ""}]
    manifest, summary = run_ingest(collection(tmp_path, files, rows))
    assert set(manifest["status"]) == {"ok"}
    assert set(summary["notes"]) <= set(ingest.NOTES) and len(summary["notes"]) >= 7
    assert summary["notes"]["keywords-unparsed-list"] == 1 and summary["notes"]["id-whitespace-stripped"] == 1
