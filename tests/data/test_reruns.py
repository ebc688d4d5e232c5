"""Snakemake re-runs ingest and preprocess when an image changes in place (same name, folder mtime unchanged)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinoflow import paths
from dinoflow.data.collection import image_listing, update_image_listing
from dinoflow.data.store import ImageStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from _workflow_helpers import jobs, link_workflow, snakemake  # noqa: E402

INGEST, PREPROCESS = ("ingest", None), ("preprocess", None)


def _replace_keeping_folder_mtime(path: Path, im: Image.Image, mtime_ns: int | None = None) -> None:
    folder = path.parent.stat()
    im.save(path)  # overwrites the file in place, like `cp corrected.png images/a.png`
    os.utime(path.parent, ns=(folder.st_atime_ns, folder.st_mtime_ns))
    if mtime_ns is not None:  # like `cp -p`: the new content keeps an old modification time
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _pixels(ws: Path, image_id: str) -> np.ndarray:
    store = ImageStore(ws / paths.PROCESSED_DIR, ws / paths.PROCESSED_INDEX)
    return np.asarray(store.get_by_id(image_id).convert("RGB")).astype(int)


@pytest.mark.slow
def test_in_place_corrections_rerun_ingest_and_preprocess(tiny_workspace, tiny_collection):
    ws = link_workflow(tiny_workspace)
    specs = jobs(ws)
    target = [paths.PROCESSED_INDEX]
    assert snakemake(ws, target, specs=specs) == {INGEST, PREPROCESS}
    assert snakemake(ws, target, specs=specs) == set(), "a second run must do nothing"

    images = Path(tiny_collection["images_dir"])
    manifest = pq.read_table(ws / paths.MANIFEST).to_pandas()
    first = manifest.iloc[0]
    before = _pixels(ws, first["id"])
    time.sleep(0.05)  # a distinct mtime on file systems with coarse timestamps
    _replace_keeping_folder_mtime(images / first["path"], Image.new("RGB", (64, 64), (0, 0, 255)))
    assert snakemake(ws, target, specs=specs) == {INGEST, PREPROCESS}
    after = _pixels(ws, first["id"])
    assert np.abs(after - [0, 0, 255]).max() <= 8 and np.abs(after - before).max() > 100  # the new pixels
    assert snakemake(ws, target, specs=specs) == set(), "and then nothing again"

    # `cp -p`: new content (another size) with the old mtime still re-runs.
    second = images / manifest.iloc[1]["path"]
    old_mtime = second.stat().st_mtime_ns
    _replace_keeping_folder_mtime(second, Image.new("RGB", (80, 64), (255, 0, 0)), mtime_ns=old_mtime)
    assert snakemake(ws, target, specs=specs) == {INGEST, PREPROCESS}
    assert np.abs(_pixels(ws, manifest.iloc[1]["id"]) - [255, 0, 0]).max() <= 8
    assert snakemake(ws, target, specs=specs) == set()


def test_listing_is_rewritten_only_when_something_changed(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(b"a")
    (images / "sub" / "b.png").write_bytes(b"bb")
    out = tmp_path / "listing.tsv"
    entries, newest = image_listing(images)
    assert [(p, s) for p, s, _ in entries] == [("a.png", 1), ("sub/b.png", 2)]
    update_image_listing(images, out)
    assert out.stat().st_mtime_ns == newest  # dated by the newest image/folder, not by when it was written
    stamp = out.stat().st_mtime_ns
    time.sleep(0.01)
    update_image_listing(images, out)
    assert out.stat().st_mtime_ns == stamp, "unchanged listing: file untouched"
    # same name, new content, old mtime: dated now, so it is newer than any output made before
    old = (images / "a.png").stat().st_mtime_ns
    (images / "a.png").write_bytes(b"aaa")
    os.utime(images / "a.png", ns=(old, old))
    t0 = time.time_ns()
    update_image_listing(images, out)
    assert out.stat().st_mtime_ns >= t0
    assert "a.png\t3\t" in out.read_text()


def test_missing_folder_gives_an_old_empty_listing(tmp_path):
    out = tmp_path / "listing.tsv"
    update_image_listing(tmp_path / "not_yet", out)
    assert out.read_text().count("\n") == 1 and out.stat().st_mtime_ns == 0
