"""Near-duplicate groups: pigeonhole Hamming search vs brute force, planted copies found by phash, the stage."""

from __future__ import annotations

import io
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFilter

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.evaluate import groups
from dinoflow.evaluate.groups import chunk_bounds, hamming_pairs, phash_groups
from dinoflow.utils import read_json


def brute_pairs(h: np.ndarray, d: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(h.size) for j in range(i + 1, h.size)
            if bin(int(h[i]) ^ int(h[j])).count("1") <= d}


def components_of(n: int, pairs) -> list[frozenset]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in pairs:
        parent[find(a)] = find(b)
    comps: dict[int, set] = {}
    for i in range(n):
        comps.setdefault(find(i), set()).add(i)
    return sorted(frozenset(c) for c in comps.values())


@pytest.mark.parametrize("d", [0, 1, 3, 6])
def test_hamming_pairs_match_brute_force(d):
    rng = np.random.default_rng(d)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    # planted near copies at distances 0..8 and exact duplicates
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 9)), replace=False)))
             for _ in range(60)]
    h = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64), base[:5]])
    i, j = hamming_pairs(h, d)
    got = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    want = brute_pairs(h, d)
    assert got <= want  # every reported pair is within the distance
    # and the components are exactly those of all pairs within the distance
    assert components_of(h.size, got) == components_of(h.size, want)


def test_chunks_cover_64_bits():
    for d in range(11):
        bounds = chunk_bounds(d)
        assert len(bounds) == d + 1 and sum(w for _, w in bounds) == 64
        assert [s for s, _ in bounds] == list(np.cumsum([0] + [w for _, w in bounds[:-1]]))


def _scene(seed: int, size: int = 256) -> Image.Image:
    """A distinct photo-like image: random shapes on a gradient."""
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1, size=(1, 1, 3))
    img = Image.fromarray(np.broadcast_to(grad, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 40, size=2)
        w, h = rng.integers(20, 120, size=2)
        draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def _recompress(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_phash_groups_find_planted_near_duplicates_and_not_distinct_images():
    originals = [_scene(s) for s in range(12)]
    copies = {
        1: originals[1].resize((180, 180)).resize((256, 256)),            # resized
        3: _recompress(originals[3], 40),                                   # recompressed
        5: originals[5].filter(ImageFilter.GaussianBlur(1.0)),              # slightly blurred
    }
    images = originals + list(copies.values())
    ids = np.array([f"o{i}" for i in range(12)] + [f"c{k}" for k in copies])
    hashes = np.array([int(str(imagehash.phash(im)), 16) for im in images], dtype=np.uint64)
    g = phash_groups(ids, hashes, max_distance=4)
    for n, k in enumerate(copies):
        assert g[12 + n] == g[k] == f"o{k}"
    assert len(set(g[:12])) == 12  # distinct scenes stay apart


def _write_index(ids, hashes=None):
    Path(paths.PROCESSED_INDEX).parent.mkdir(parents=True, exist_ok=True)
    cols = {"id": pa.array(ids, pa.string())}
    if hashes is not None:
        cols["phash"] = pa.array(hashes, pa.string())
    pq.write_table(pa.table(cols), paths.PROCESSED_INDEX)


def test_main_with_phash_and_strict_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hashes = ["ffffffffffffffff", "fffffffffffffffe", "0000000000000000", "00000000000000ff", "0f0f0f0f0f0f0f0f"]
    _write_index([f"i{n}" for n in range(5)], hashes)
    params = {"collection": {"group_column": None}, "groups": {"max_distance": 4}}
    summary = groups.main(params)
    out = pd.read_parquet(paths.GROUPS)
    assert out["group"].tolist() == ["i0", "i0", "i2", "i3", "i4"]
    assert summary == read_json(paths.GROUPS_SUMMARY) == {
        "source": "phash", "column": None, "hash": "phash", "max_distance": 4, "n_images": 5, "n_groups": 4,
        "n_near_duplicate_groups": 1, "n_images_in_near_duplicate_groups": 2}
    _write_index(["a", "b"], ["xyz", "00"])
    with pytest.raises(DinoflowError, match="row 0: phash 'xyz'"):
        groups.main(params)
    _write_index(["a", "b"])
    with pytest.raises(DinoflowError, match="no `phash` column"):
        groups.main(params)


def test_main_with_group_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(paths.MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"row": [0, 1, 2, 3, 4], "id": ["a", "b", "c", "d", "x"],
                  "family": ["f1", "f1", "", "f2", "f9"]}).to_parquet(paths.MANIFEST)
    _write_index(["d", "a", "b", "c"])  # x was not ok: not in the index
    params = {"collection": {"group_column": "family"},
              "groups": {"max_distance": 4}}
    summary = groups.main(params)
    out = pd.read_parquet(paths.GROUPS)
    assert out["id"].tolist() == ["d", "a", "b", "c"]
    assert out["group"].tolist() == ["f2", "f1", "f1", "<no family> c"]
    assert summary["source"] == "group_column" and summary["column"] == "family"
    assert summary["max_distance"] is None and summary["n_groups"] == 3
    assert summary["n_near_duplicate_groups"] == 1 and summary["n_images_in_near_duplicate_groups"] == 2
    params["collection"]["group_column"] = "nope"
    with pytest.raises(DinoflowError, match="group_column 'nope': not a column of .*manifest"):
        groups.main(params)


def test_preprocess_hashes_the_processed_image_and_indexes_it(tmp_path):
    from dinoflow.data.preprocess import process_image_with_phash, write_index

    img = _scene(7, size=300)
    img.save(tmp_path / "a.png")
    img.resize((150, 150)).save(tmp_path / "b.jpg", quality=70)     # a smaller recompressed copy
    _scene(8, size=300).save(tmp_path / "c.png")
    blob, ha = process_image_with_phash(str(tmp_path / "a.png"), size=256)
    _, hb = process_image_with_phash(str(tmp_path / "b.jpg"), size=256)
    _, hc = process_image_with_phash(str(tmp_path / "c.png"), size=256)
    fitted = Image.open(io.BytesIO(blob)).convert("RGB")
    assert fitted.size == (256, 256) and len(ha) == 16
    assert imagehash.hex_to_hash(ha) - imagehash.phash(fitted) <= 2  # hash of the fitted (pre-WebP) image
    dist = {k: imagehash.hex_to_hash(ha) - imagehash.hex_to_hash(h) for k, h in (("b", hb), ("c", hc))}
    assert dist["b"] <= 4 < dist["c"]
    write_index([("a", 0, 0, 4, 10), ("c", 0, 1, 20, 10)], tmp_path / "index.parquet", {"a": ha, "c": hc})
    index = pd.read_parquet(tmp_path / "index.parquet")
    assert index["phash"].tolist() == [ha, hc] and list(index.columns)[:5] == ["id", "shard", "row", "offset", "length"]
