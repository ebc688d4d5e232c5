"""The demo collection: join and compositing on a fake package tree (no network), plus one real `npm pack`."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dinoflow.data import demo
from dinoflow.data.collection import read_metadata
from dinoflow.errors import DinoflowError
from dinoflow.utils import read_json

EMOJI_SPEC, EMOJIBASE_SPEC = "fake-emoji@1.0.0", "@fake/emojibase@2.0.0"


def webp_rgba(color: tuple[int, int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (size, size), color).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def write_tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


EMOJIBASE = [
    {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"], "group": 0, "subgroup": 0,
     "order": 1},
    {"label": "copyright", "hexcode": "00A9-FE0F", "tags": ["c"], "group": 8, "subgroup": 96, "order": 3},
    {"label": "raised hand", "hexcode": "270B", "tags": ["hand", "stop"], "group": 1, "subgroup": 16, "order": 2,
     "skins": [{"label": "raised hand: dark skin tone", "hexcode": "270B-1F3FF", "group": 1, "subgroup": 16,
                "order": 2.5, "tone": 5}]},
    {"label": "flag: England", "hexcode": "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "tags": ["flag"],
     "group": 9, "subgroup": 99, "order": 4},
    {"label": "no image for me", "hexcode": "1F601", "tags": [], "group": 0, "subgroup": 0, "order": 5},
]
GROUPS = {"groups": {"0": "smileys-emotion", "1": "people-body", "8": "symbols", "9": "flags"},
          "subgroups": {"0": "face-smiling", "16": "hand-fingers-open", "96": "alphanum", "99": "subdivision-flag"}}
ASSETS = {
    "1f600.webp": (255, 0, 0, 255),                    # opaque red
    "a9-fe0f.webp": (0, 0, 255, 255),                  # duplicate spelling of 00a9: dropped
    "00a9-fe0f.webp": (0, 255, 0, 0),                  # fully transparent → white
    "270b.webp": (0, 0, 0, 128),                       # half-transparent black → mid grey
    "270b-1f3ff.webp": (0, 0, 255, 255),
    "1f3f4-e0067_e0062_e0065_e006e_e0067.webp": (255, 255, 0, 255),
    "ffff0.webp": (1, 2, 3, 255),                      # no emojibase entry: unmatched
}


@pytest.fixture
def fake_packages(tmp_path: Path) -> dict[str, Path]:
    emoji = tmp_path / "emoji.tgz"
    write_tgz(emoji, {f"assets/{name}": webp_rgba(c) for name, c in ASSETS.items()} | {"README.md": b"hi"})
    emojibase = tmp_path / "emojibase.tgz"
    write_tgz(emojibase, {"en/data.json": json.dumps(EMOJIBASE).encode(),
                          "meta/groups.json": json.dumps(GROUPS).encode()})
    return {"emoji": emoji, "emojibase": emojibase}


def test_code_points_and_tarball_names():
    assert demo.code_points("1F441-FE0F-200D-1F5E8-FE0F") == demo.code_points("1f441-200d-1f5e8") == \
        (0x1F441, 0x200D, 0x1F5E8)
    assert demo.code_points("1f3f4-e0067_e0062") == (0x1F3F4, 0xE0067, 0xE0062)
    assert demo.code_points("00a9-fe0f") == demo.code_points("a9") == (0xA9,)
    assert demo.tarball_name("@lobehub/fluent-emoji-3d@1.1.0") == "lobehub-fluent-emoji-3d-1.1.0.tgz"
    assert demo.tarball_name("emojibase-data@17.0.0") == "emojibase-data-17.0.0.tgz"
    with pytest.raises(DinoflowError, match="name@version"):
        demo.tarball_name("emojibase-data")


def test_build_joins_and_composites(fake_packages, tmp_path):
    out = tmp_path / "demo"
    counts = demo.build(fake_packages["emoji"], fake_packages["emojibase"], out)
    assert counts == {"files": 7, "matched": 5, "unmatched_files": 1, "duplicate_files": 1,
                      "emojibase_without_image": 1, "unmatched_examples": ["ffff0"], "written": 5}
    meta = pd.read_csv(out / "metadata.csv", dtype=str, keep_default_na=False)
    # emojibase order: 1f600 (1), 270b (2), 270b-1f3ff (2.5), 00a9 (3), flag (4)
    assert meta["id"].tolist() == ["1f600", "270b", "270b-1f3ff", "00a9-fe0f",
                                   "1f3f4-e0067-e0062-e0065-e006e-e0067-e007f"]
    row = meta.set_index("id")
    assert row.loc["1f600", "caption"] == "grinning face" and row.loc["1f600", "keywords"] == "face;grin"
    assert row.loc["270b-1f3ff", "caption"] == "raised hand: dark skin tone"
    assert row.loc["270b-1f3ff", "keywords"] == "hand;stop"  # skin variants inherit the base tags
    assert (row.loc["00a9-fe0f", "group"], row.loc["00a9-fe0f", "subgroup"]) == ("symbols", "alphanum")
    assert row.loc["270b", "group"] == "people-body"
    # skin-tone variants share their base emoji's family (the demo's group column); others are their own family
    assert row.loc["270b", "family"] == row.loc["270b-1f3ff", "family"] == "270b"
    assert row.loc["00a9-fe0f", "family"] == "a9" and row.loc["1f600", "family"] == "1f600"
    assert demo.family("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC") == demo.family("1F9D1-200D-1F91D-200D-1F9D1")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(meta["path"])

    def pixel(image_id):
        return Image.open(out / "images" / f"{image_id}.png").getpixel((3, 3))

    assert pixel("1f600") == (255, 0, 0)
    assert pixel("00a9-fe0f") == (255, 255, 255)  # the kept file is the transparent one (hexcode spelling)
    grey = round(255 * (1 - 128 / 255))            # alpha compositing of black at alpha 128 on white
    assert all(abs(v - grey) <= 1 for v in pixel("270b"))
    assert Image.open(out / "images" / "1f600.png").mode == "RGB"
    # the result is a collection dinoflow reads with the default params
    df = read_metadata(out / "metadata.csv", {}, ";", ["group", "subgroup"])
    assert df["keywords"][0] == ["face", "grin"] and df["read_error"].isna().all()


def test_limit_keeps_the_first_rows(fake_packages, tmp_path):
    demo.build(fake_packages["emoji"], fake_packages["emojibase"], tmp_path / "d", limit=2)
    meta = pd.read_csv(tmp_path / "d" / "metadata.csv", dtype=str)
    assert meta["id"].tolist() == ["1f600", "270b"]
    assert len(list((tmp_path / "d" / "images").iterdir())) == 2


def demo_params(out_dir: Path, limit=None) -> dict:
    return {"demo": {"enabled": True, "out_dir": str(out_dir), "emoji_package": EMOJI_SPEC,
                     "emojibase_package": EMOJIBASE_SPEC, "limit": limit}}


def test_main_records_sources_and_builds_only_when_missing(fake_packages, tmp_path):
    out = tmp_path / "raw" / "demo"
    cache = tmp_path / "raw" / ".npm-cache"
    cache.mkdir(parents=True)
    # pre-populated npm cache: main must not call npm at all
    shutil.copy(fake_packages["emoji"], cache / demo.tarball_name(EMOJI_SPEC))
    shutil.copy(fake_packages["emojibase"], cache / demo.tarball_name(EMOJIBASE_SPEC))
    record = demo.main(demo_params(out))
    sources = read_json(out / "SOURCES.json")
    assert sources == json.loads(json.dumps(record))
    expected = hashlib.sha256(fake_packages["emoji"].read_bytes()).hexdigest()
    assert sources["packages"]["emoji"]["sha256"] == expected
    assert sources["packages"]["emojibase"]["integrity"].startswith("sha512-")
    assert sources["counts"]["written"] == 5
    stamp = (out / "metadata.csv").stat().st_mtime_ns
    demo.main(demo_params(out))
    assert (out / "metadata.csv").stat().st_mtime_ns == stamp  # already built: nothing redone
    demo.main(demo_params(out, limit=3))
    assert len(pd.read_csv(out / "metadata.csv")) == 3  # another limit: rebuilt


def test_disabled_does_nothing(tmp_path):
    params = demo_params(tmp_path / "demo")
    params["demo"]["enabled"] = False
    assert demo.main(params) is None and not (tmp_path / "demo").exists()


def test_pinned_checksum_mismatch_is_refused(tmp_path):
    spec = "emojibase-data@17.0.0"
    bad = tmp_path / demo.tarball_name(spec)
    bad.write_bytes(b"not the real tarball")
    with pytest.raises(DinoflowError, match="expected d01d0e2c"):
        demo.verify(spec, bad)
    assert not bad.exists()  # removed so that a rerun fetches it again


def _npm_reachable() -> bool:
    if shutil.which("npm") is None:
        return False
    try:
        return subprocess.run(["npm", "view", "emojibase-data@17.0.0", "version"], capture_output=True,
                              timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.network
def test_npm_pack_matches_the_pinned_checksum(tmp_path):
    if not _npm_reachable():
        pytest.skip("npm or the npm registry is not reachable")
    spec = "emojibase-data@17.0.0"
    tgz = demo.npm_pack(spec, tmp_path / "cache")
    assert demo.verify(spec, tgz) == demo.PINNED[spec]
    entries = demo.load_emojibase(tgz)
    grinning = entries[(0x1F600,)]
    assert grinning["caption"] == "grinning face" and grinning["group"] == "smileys-emotion"
    assert grinning["subgroup"] == "face-smiling" and "smile" in grinning["keywords"]
