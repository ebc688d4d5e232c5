"""Image files with the problems real archives have, built in memory (shared by the data-layer tests)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def smooth_rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients + blobs): resampling differences stay small, unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 6)
        out[..., c] = 127.5 + 120 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph)
    return out.round().clip(0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 95, exif_orientation: int | None = None) -> bytes:
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if exif_orientation is None:
        im.save(buf, "JPEG", quality=quality)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, pixels: bytes | None = None) -> bytes:
    """A PNG written by hand: 16-bit RGB (Pillow cannot write it) or a header that lies about the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(pixels if pixels is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def rgb16_png(arr16: np.ndarray) -> bytes:
    """(H, W, 3) uint16 → 16-bit RGB PNG."""
    h, w, _ = arr16.shape
    big = arr16.astype(">u2")
    raw = b"".join(b"\x00" + big[r].tobytes() for r in range(h))
    return raw_png(w, h, 16, 2, raw)


def data_params(collection: dict) -> dict:
    """The repo's params.yaml with `collection` swapped in and the data stages scaled down (one worker)."""
    from pathlib import Path

    import yaml

    with open(Path(__file__).resolve().parents[2] / "params.yaml", encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    params["collection"] = collection
    params["ingest"]["workers"] = 1
    params["preprocess"].update({"size": 32, "shard_size": 10, "workers": 1})
    return params
