"""dinoflow preprocess: geometry against torchvision, colour conversions against formulas, shards and order."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dinoflow import paths
from dinoflow.data import ingest, preprocess
from dinoflow.data.preprocess import draft_request, fit, open_rgb, process_image, to_rgb
from dinoflow.errors import DinoflowError

from data_helpers import data_params, jpeg_bytes, rgb16_png, smooth_rgb


def decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


# Sizes where torchvision's integer rounding (resized long side, crop offset) is exact, so both sides compute
# the same geometry: downscale landscape / portrait, strong downscale, upscale.
@pytest.mark.parametrize("w,h,size", [(120, 80, 64), (80, 120, 64), (360, 90, 30), (48, 30, 60)])
def test_crop_matches_torchvision_resize_centercrop(w, h, size):
    arr = smooth_rgb(w, h, seed=w)
    ours = np.asarray(fit(Image.fromarray(arr), size, "crop")).astype(np.int32)
    ref = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                      v2.CenterCrop(size)])(torch.from_numpy(arr).permute(2, 0, 1))
    ref = ref.permute(1, 2, 0).numpy().astype(np.int32)
    assert ours.shape == ref.shape == (size, size, 3)
    # Same geometry; the two libraries' bicubic implementations differ by a level or two.
    assert np.abs(ours - ref).mean() < 1.5


def test_pad_known_answer():
    red = Image.new("RGB", (100, 50), (255, 0, 0))
    out = np.asarray(fit(red, 64, "pad", (0, 0, 255)))
    # long side 100 → 64, short side 50 → 32, centred: rows 16..47 red, the rest pad colour
    assert (out[16:48] == [255, 0, 0]).all()
    assert (out[:16] == [0, 0, 255]).all() and (out[48:] == [0, 0, 255]).all()
    tall = np.asarray(fit(Image.new("RGB", (10, 40), (255, 0, 0)), 32, "pad", (255, 255, 255)))
    assert (tall[:, 12:20] == [255, 0, 0]).all() and (tall[:, :12] == 255).all() and (tall[:, 20:] == 255).all()


def test_crop_known_answer_keeps_the_centre():
    # Left third blue, middle third green, right third red: the centre crop of a 3:1 image is all green.
    arr = np.zeros((60, 180, 3), np.uint8)
    arr[:, :60] = (0, 0, 255)
    arr[:, 60:120] = (0, 255, 0)
    arr[:, 120:] = (255, 0, 0)
    out = np.asarray(fit(Image.fromarray(arr), 30, "crop")).astype(int)
    assert np.abs(out[:, 2:-2] - [0, 255, 0]).max() <= 2  # bicubic may ring at the outermost columns


def test_unknown_mode_is_an_error():
    with pytest.raises(DinoflowError, match="preprocess.mode: 'stretch'"):
        fit(Image.new("RGB", (4, 4)), 2, "stretch")


def test_exif_rotation_is_applied(tmp_path):
    arr = smooth_rgb(60, 30, seed=1)
    arr[:10, :10] = (255, 0, 0)  # a red block in the stored top-left corner
    path = tmp_path / "r.jpg"
    path.write_bytes(jpeg_bytes(arr, quality=100, exif_orientation=6))  # 6: display rotated 90° clockwise
    im, notes, size = open_rgb(path)
    assert notes == ["exif-rotated"] and size == (30, 60) and im.size == (30, 60)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))  # decoded pixels as stored, orientation not applied
    expected = np.rot90(stored, k=-1)  # clockwise: the stored top-left corner ends up top-right
    got = np.asarray(im).astype(int)
    assert np.array_equal(got, expected)
    assert (np.abs(got[:8, -8:] - [255, 0, 0]) < 40).all()


def test_to_rgb_conversions_known_answers():
    notes: list[str] = []
    cyan = to_rgb(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), notes)
    assert cyan.getpixel((0, 0)) == (0, 255, 255) and notes == ["cmyk->rgb"]
    notes = []
    half_red = to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), notes)
    # alpha compositing on white: out = a * c + (1 - a) * 255
    a = 128 / 255
    expected = tuple(round(a * c + (1 - a) * 255) for c in (255, 0, 0))
    assert all(abs(x - y) <= 1 for x, y in zip(half_red.getpixel((0, 0)), expected)) and notes == ["alpha->white"]
    notes = []
    gray16 = to_rgb(Image.fromarray(np.array([[40000, 255, 65535]], np.uint16)), notes)
    assert [gray16.getpixel((i, 0)) for i in range(3)] == [(156, 156, 156), (0, 0, 0), (255, 255, 255)]
    assert notes == ["16bit->8bit"]
    notes = []
    pal = Image.new("RGB", (2, 2), (10, 200, 30)).quantize(4)
    assert to_rgb(pal, notes).getpixel((0, 0)) == (10, 200, 30) and notes == ["palette->rgb"]


def test_rgb16_png_keeps_the_high_byte(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(rgb16_png(np.full((3, 4, 3), [65535, 0, 32768], np.uint16)))
    im, notes, _ = open_rgb(path)
    assert im.getpixel((0, 0)) == (255, 0, 128) and notes == ["16bit->8bit"]


def test_jpeg_draft_decodes_smaller_but_never_below_the_target(tmp_path):
    arr = smooth_rgb(1600, 1200, seed=2)
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(arr, quality=90))
    request = draft_request(1600, 1200, 256, "crop")
    assert request == (342, 256)
    drafted, _, size = open_rgb(path, draft_size=request)
    assert size == (1600, 1200)
    assert drafted.size == (400, 300)  # 1/4 scale: the smallest DCT scale still ≥ 342x256
    full = decode(process_image(str(path), 256, "crop", fmt="png"))
    reference = np.asarray(fit(Image.fromarray(arr), 256, "crop")).astype(int)
    assert np.abs(full - reference).mean() < 3  # draft + resize ≈ full decode + resize


@pytest.fixture
def processed(tiny_collection, workspace):
    params = data_params(tiny_collection)
    ingest.main(params)
    preprocess.main(params)
    return params


def test_shards_and_index(processed, tiny_collection):
    index = pq.read_table(paths.PROCESSED_INDEX).to_pandas()
    manifest = pq.read_table(paths.MANIFEST).to_pandas()
    assert index["id"].tolist() == manifest.loc[manifest["status"] == "ok", "id"].tolist()
    shards = sorted(Path(paths.PROCESSED_DIR).glob("shard-*.parquet"))
    assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert index.groupby("shard").size().tolist() == [10, 10, 4]  # shard_size 10, 24 images
    first = pq.read_table(shards[1])
    assert first.column_names == ["id", "image", "width", "height"]
    assert first.column("id").to_pylist() == index.loc[index["shard"] == 1, "id"].tolist()
    assert set(first.column("width").to_pylist()) == {32}
    images = Path(tiny_collection["images_dir"])
    for _, r in index.iterrows():  # the recorded byte range is exactly the Parquet value
        data = shards[r["shard"]].read_bytes()
        value = pq.read_table(shards[r["shard"]]).column("image")[r["row"]].as_py()
        assert data[r["offset"]:r["offset"] + r["length"]] == value
    for _, r in index.iloc[[0, 13, 23]].iterrows():
        blob = pq.read_table(shards[r["shard"]]).column("image")[r["row"]].as_py()
        path = images / manifest.loc[manifest["id"] == r["id"], "path"].iloc[0]
        assert blob == process_image(str(path), 32, "crop", fmt="webp", quality=90)
        assert decode(blob).shape == (32, 32, 3)


def test_pool_output_is_identical_and_ordered(processed):
    serial = {p.name: p.read_bytes() for p in Path(paths.PROCESSED_DIR).glob("shard-*.parquet")}
    processed["preprocess"]["workers"] = 2
    preprocess.main(processed)
    pooled = {p.name: p.read_bytes() for p in Path(paths.PROCESSED_DIR).glob("shard-*.parquet")}
    assert pooled == serial


def test_rerun_with_fewer_images_removes_stale_shards(processed):
    processed["preprocess"]["shard_size"] = 100
    preprocess.main(processed)
    assert [p.name for p in Path(paths.PROCESSED_DIR).glob("shard-*.parquet")] == ["shard-00000.parquet"]
    assert set(pq.read_table(paths.PROCESSED_INDEX).column("shard").to_pylist()) == {0}


def test_skipped_rows_are_not_processed(tiny_collection, workspace):
    (Path(tiny_collection["images_dir"]) / "00003_yellow_circle.png").write_bytes(b"")
    params = data_params(tiny_collection)
    ingest.main(params)
    preprocess.main(params)
    ids = pq.read_table(paths.PROCESSED_INDEX).column("id").to_pylist()
    assert len(ids) == 23 and "img00003" not in ids


def test_changed_file_after_ingest_is_an_error(tiny_collection, workspace):
    params = data_params(tiny_collection)
    ingest.main(params)
    (Path(tiny_collection["images_dir"]) / "00005_green_square.png").write_bytes(b"garbage")
    with pytest.raises(DinoflowError, match=r"1 image\(s\).*img00005"):
        preprocess.main(params)


def test_missing_manifest_is_an_error(workspace, tiny_collection):
    with pytest.raises(DinoflowError, match="run `dinoflow ingest` first"):
        preprocess.main(data_params(tiny_collection))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_other_formats(processed, fmt):
    processed["preprocess"]["format"] = fmt
    preprocess.main(processed)
    blob = pq.read_table(Path(paths.PROCESSED_DIR) / "shard-00000.parquet").column("image")[0].as_py()
    assert Image.open(io.BytesIO(blob)).format == fmt.upper()



# ---------------------------------------------------------------------------------------------- colour management

from data_helpers import (ADOBE_RGB_PRIMARIES, D50_XY, D65_XY, P3_PRIMARIES, PROPHOTO_PRIMARIES,  # noqa: E402
                          SRGB_PRIMARIES, gray_icc, reference_to_srgb, rgb_icc, srgb_encode)
from dinoflow.data.preprocess import to_srgb  # noqa: E402

RGB_PROFILES = {  # name: (primaries, white, gamma; None = the sRGB curve)
    "Adobe RGB (1998)": (ADOBE_RGB_PRIMARIES, D65_XY, 563 / 256),
    "ProPhoto RGB": (PROPHOTO_PRIMARIES, D50_XY, 1.8),
    "Display P3": (P3_PRIMARIES, D65_XY, None),
}


@pytest.mark.parametrize("name", list(RGB_PROFILES))
def test_to_srgb_matches_the_colorimetric_formula(name):
    primaries, white, gamma = RGB_PROFILES[name]
    icc = rgb_icc(name, primaries, white, gamma)
    colours = np.stack(np.meshgrid(*[np.arange(0, 256, 51)] * 3, indexing="ij"), -1).reshape(-1, 3)
    im = Image.fromarray(colours.reshape(1, -1, 3).astype(np.uint8))
    notes: list[str] = []
    got = np.asarray(to_srgb(im, icc, notes)).reshape(-1, 3).astype(int)
    expected = np.stack([reference_to_srgb(c, primaries, white, gamma) for c in colours])
    # Out-of-gamut colours are clipped per channel (not gamut-mapped): compare the colours inside sRGB.
    inside = ((expected > 0.5) & (expected < 254.5)).all(1)
    assert inside.sum() > 20
    assert np.abs(got[inside] - expected[inside]).max() <= 1.01
    assert notes == [f"icc->srgb:{name}"]


def test_to_srgb_leaves_srgb_and_unprofiled_images_alone():
    im = Image.new("RGB", (2, 2), (180, 120, 90))
    notes: list[str] = []
    assert to_srgb(im, rgb_icc("sRGB under another name", SRGB_PRIMARIES, gamma=None), notes) is im
    assert to_srgb(im, None, notes) is im and notes == []


def test_to_srgb_grey_and_16bit_grey_with_a_profile():
    notes: list[str] = []
    out = to_srgb(Image.new("L", (2, 2), 128), gray_icc("linear", 1.0), notes)
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - srgb_encode(np.array(128 / 255))) <= 1
    notes = []
    out = to_srgb(Image.fromarray(np.full((2, 2), 128 * 256, np.uint16)), gray_icc("linear", 1.0), notes)
    assert notes == ["16bit->8bit", "icc->srgb:linear"] and abs(out.getpixel((0, 0))[0] - 188) <= 1


def test_to_srgb_reports_profiles_it_cannot_apply():
    im = Image.new("RGB", (2, 2), (1, 2, 3))
    notes: list[str] = []
    assert to_srgb(im, b"\0" * 200, notes).getpixel((0, 0)) == (1, 2, 3)
    assert notes[0].startswith("icc-unusable:unreadable ICC profile")
    notes = []
    to_srgb(im, gray_icc("Dot Gain 20%", 2.2), notes)
    assert notes == ["icc-unusable:ICC profile 'Dot Gain 20%' is for GRAY data, the image is RGB"]
