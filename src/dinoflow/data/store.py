"""Read the preprocessed images written by `dinoflow preprocess` (Parquet shards + index).

`ImageStore` is lazy: it reads the small index up front and touches a shard only when one of its images is
asked for. The index records where each image's bytes sit inside its shard file, so a read is a slice of the
memory-mapped file: O(1), no Parquet decoding, and the bytes live once in the OS page cache, shared by all
DataLoader workers. Shards without located offsets (written by other tools) are read through Parquet instead,
keeping the last `cache_shards` `image` columns. Pickling drops the maps and the cache, so each worker opens its
own.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from dinoflow import paths
from dinoflow.data.preprocess import SHARD_PATTERN
from dinoflow.errors import DinoflowError


def default_index(processed_dir: str | Path) -> Path:
    """The index next to the shard folder, as in paths.py (data/processed/images → data/processed/index.parquet)."""
    return Path(processed_dir).parent / Path(paths.PROCESSED_INDEX).name


class ImageStore:
    """Random access to the processed images by position (index order) or by id."""

    def __init__(self, processed_dir: str | Path = paths.PROCESSED_DIR, index: str | Path | None = None,
                 cache_shards: int = 4):
        import pyarrow.parquet as pq

        self.processed_dir = Path(processed_dir)
        self.index_path = Path(index) if index is not None else default_index(self.processed_dir)
        if not self.index_path.exists():
            raise DinoflowError(f"{self.index_path}: index of processed images not found "
                                "(run `dinoflow preprocess` first)")
        table = pq.read_table(self.index_path)
        self._ids: list[str] = table.column("id").to_pylist()
        self._shard = table.column("shard").to_numpy().astype(np.int64)
        self._row = table.column("row").to_numpy().astype(np.int64)
        n = len(self._ids)
        has_offsets = "offset" in table.column_names and "length" in table.column_names
        self._offset = table.column("offset").to_numpy().astype(np.int64) if has_offsets else np.full(n, -1)
        self._length = table.column("length").to_numpy().astype(np.int64) if has_offsets else np.full(n, -1)
        self._maps: dict[int, Any] = {}
        self._pos = {image_id: i for i, image_id in enumerate(self._ids)}
        if len(self._pos) != len(self._ids):
            raise DinoflowError(f"{self.index_path}: duplicate ids in the index (rerun `dinoflow preprocess`)")
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, Any] = OrderedDict()

    # -- the contract ------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, i: int) -> Image.Image:
        """The i-th image (index order) as an RGB PIL image."""
        with Image.open(io.BytesIO(self.get_bytes(i))) as im:
            return im.convert("RGB")

    def get_by_id(self, image_id: str) -> Image.Image:
        return self.get(self.position(image_id))

    # -- extras ------------------------------------------------------------------------------------------
    def position(self, image_id: str) -> int:
        try:
            return self._pos[image_id]
        except KeyError:
            raise DinoflowError(f"{self.index_path}: no processed image with id {image_id!r}") from None

    def get_bytes(self, i: int) -> bytes:
        """The stored encoded bytes of the i-th image (WebP / JPEG / PNG as preprocess.format said)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} images")
        shard, offset = int(self._shard[i]), int(self._offset[i])
        if offset >= 0:
            mm = self._map(shard)
            length = int(self._length[i])
            # The 4-byte length prefix Parquet writes before each PLAIN value guards against a stale index.
            if mm[offset - 4:offset] == length.to_bytes(4, "little"):
                return mm[offset:offset + length]
        return self._shard_images(shard)[int(self._row[i])].as_py()

    def _shard_path(self, shard: int) -> Path:
        path = self.processed_dir / SHARD_PATTERN.format(shard)
        if not path.exists():
            raise DinoflowError(f"{path}: shard listed in {self.index_path} is missing (rerun `dinoflow preprocess`)")
        return path

    def _map(self, shard: int):
        mm = self._maps.get(shard)
        if mm is None:
            import mmap

            with open(self._shard_path(shard), "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = mm
        return mm

    def _shard_images(self, shard: int):
        column = self._cache.get(shard)
        if column is not None:
            self._cache.move_to_end(shard)
            return column
        import pyarrow.parquet as pq

        column = pq.read_table(self._shard_path(shard), columns=["image"], memory_map=True).column("image")
        self._cache[shard] = column
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return column

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # mapped files and Arrow buffers do not travel; each worker maps its own
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"ImageStore({str(self.processed_dir)!r}, {len(self)} images)"


class ImageDataset(Dataset):
    """torch Dataset over an ImageStore: item i → (transform(image), i). Without a transform, a float tensor
    (3, H, W) in [0, 1]."""

    def __init__(self, store: ImageStore, transform: Callable[[Image.Image], Any] | None = None):
        self.store = store
        self.transform = transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.store.get(i)
        if self.transform is not None:
            return self.transform(image), i
        return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), i
