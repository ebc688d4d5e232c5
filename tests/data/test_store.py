"""ImageStore / ImageDataset over the shards written by preprocess."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinoflow import paths
from dinoflow.data import ingest, preprocess
from dinoflow.data.store import ImageDataset, ImageStore
from dinoflow.errors import DinoflowError

from data_helpers import data_params


@pytest.fixture
def store(tiny_collection, workspace) -> ImageStore:
    params = data_params(tiny_collection)
    ingest.main(params)
    preprocess.main(params)
    return ImageStore(paths.PROCESSED_DIR)


def reference_images() -> dict[str, np.ndarray]:
    """Every stored image decoded straight from the shard files, by id."""
    out = {}
    for shard in sorted(Path(paths.PROCESSED_DIR).glob("shard-*.parquet")):
        table = pq.read_table(shard)
        for image_id, blob in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            out[image_id] = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return out


def test_len_ids_get_and_get_by_id(store):
    ref = reference_images()
    index_ids = pq.read_table(paths.PROCESSED_INDEX).column("id").to_pylist()
    assert len(store) == 24 and store.ids == index_ids
    for i, image_id in enumerate(store.ids):
        im = store.get(i)
        assert im.mode == "RGB" and im.size == (32, 32)
        assert np.array_equal(np.asarray(im), ref[image_id])
    assert np.array_equal(np.asarray(store.get_by_id("img00017")), ref["img00017"])
    assert np.array_equal(np.asarray(store.get(-1)), ref[store.ids[-1]])


def test_bad_lookups(store):
    with pytest.raises(DinoflowError, match="no processed image with id 'nope'"):
        store.get_by_id("nope")
    with pytest.raises(IndexError):
        store.get(24)


def test_reads_are_slices_of_the_mapped_shards(store):
    index = pq.read_table(paths.PROCESSED_INDEX).to_pandas()
    assert (index["offset"] > 0).all()
    store.get(0)
    store.get(23)
    assert len(store._cache) == 0 and sorted(store._maps) == [0, 2]  # no Parquet decoding happened


def test_parquet_fallback_without_offsets_and_bounded_cache(store):
    ref = reference_images()
    table = pq.read_table(paths.PROCESSED_INDEX)
    pq.write_table(table.select(["id", "shard", "row"]), paths.PROCESSED_INDEX)  # an index without offsets
    small = ImageStore(paths.PROCESSED_DIR, cache_shards=1)
    for i in [0, 23, 11, 1, 22]:  # hop between shards
        assert np.array_equal(np.asarray(small.get(i)), ref[small.ids[i]])
        assert len(small._cache) == 1 and not small._maps


def test_stale_offsets_fall_back_to_parquet(store):
    ref = reference_images()
    table = pq.read_table(paths.PROCESSED_INDEX)
    shifted = table.set_column(table.column_names.index("offset"), "offset",
                               pa.array([o + 7 for o in table.column("offset").to_pylist()], pa.int64()))
    pq.write_table(shifted, paths.PROCESSED_INDEX)
    fresh = ImageStore(paths.PROCESSED_DIR)
    assert all(np.array_equal(np.asarray(fresh.get(i)), ref[fresh.ids[i]]) for i in range(len(fresh)))
    assert len(fresh._cache) > 0


def test_pickle_drops_the_cache(store):
    store.get(0)
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone._cache) == 0 and not clone._maps and len(clone) == len(store)
    assert np.array_equal(np.asarray(clone.get(5)), np.asarray(store.get(5)))


def test_dataset_and_dataloader_workers(store):
    ds = ImageDataset(store)
    x, i = ds[3]
    assert i == 3 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(np.array(store.get(3))).permute(2, 0, 1).float() / 255)
    flip = ImageDataset(store, transform=lambda im: torch.from_numpy(np.array(im.transpose(Image.FLIP_LEFT_RIGHT))))
    assert torch.equal(flip[2][0], torch.from_numpy(np.asarray(store.get(2))[:, ::-1].copy()))
    loader = DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    seen, batches = [], []
    for xb, ib in loader:
        seen.extend(ib.tolist())
        batches.append(xb)
    assert seen == list(range(24))
    assert torch.equal(torch.cat(batches)[3], x)


def test_missing_index_and_missing_shard(store, tmp_path):
    with pytest.raises(DinoflowError, match="run `dinoflow preprocess` first"):
        ImageStore(tmp_path / "nowhere" / "images")
    (Path(paths.PROCESSED_DIR) / "shard-00002.parquet").unlink()
    fresh = ImageStore(paths.PROCESSED_DIR)
    with pytest.raises(DinoflowError, match="shard-00002.parquet: shard listed in"):
        fresh.get(23)
