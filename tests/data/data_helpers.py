"""Image files with the problems real archives have, built in memory (shared by the data-layer tests)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
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


def encode_image(im: Image.Image, fmt: str, **kw) -> bytes:
    """The bytes of `im` saved by Pillow as `fmt` (keyword arguments: Pillow's save options)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    return encode_image(im, "PNG")


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type + data (or `crc` as given, to write a wrong one)."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, pixels: bytes | None = None) -> bytes:
    """A PNG written by hand: 16-bit RGB (Pillow cannot write it) or a header that lies about the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(pixels if pixels is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


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


# ------------------------------------------------------------------------------------------------------------
# ICC profiles written byte by byte (ICC.1:2001-04, version 2), so colour-management tests need no system files.

D50 = np.array([0.9642, 1.0, 0.8249])
D65_XY = (0.3127, 0.3290)
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))
PROPHOTO_PRIMARIES = ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001))
P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
D50_XY = (0.3457, 0.3585)


def _xy_to_xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz_matrix(primaries, white_xy) -> np.ndarray:
    """Linear RGB → XYZ (Y of white = 1) from chromaticities (the standard construction, e.g. Lindbloom)."""
    m = np.stack([_xy_to_xyz(*p) for p in primaries], axis=1)
    scale = np.linalg.solve(m, _xy_to_xyz(*white_xy))
    return m * scale


def bradford(src_white: np.ndarray, dst_white: np.ndarray) -> np.ndarray:
    """Chromatic adaptation matrix (Bradford) from one white (XYZ) to another."""
    cone_src, cone_dst = BRADFORD @ src_white, BRADFORD @ dst_white
    return np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD


def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def _desc_tag(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)


def _gamma_tag(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(gamma * 256)))


def _srgb_trc_tag() -> bytes:
    """parametricCurveType 3: the sRGB transfer function (IEC 61966-2-1), as Display P3 uses."""
    params = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return b"para" + b"\0" * 4 + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in params)


def _profile(device_class: bytes, space: bytes, tags: dict[bytes, bytes]) -> bytes:
    body, table, offset = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + device_class + space + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(_s15(v) for v in D50)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def rgb_icc(description: str, primaries, white_xy=D65_XY, gamma: float | None = 2.2) -> bytes:
    """A matrix/TRC RGB display profile: colorants adapted to D50 with Bradford; gamma or (None) the sRGB curve."""
    m = bradford(_xy_to_xyz(*white_xy), D50) @ rgb_to_xyz_matrix(primaries, white_xy)
    trc = _srgb_trc_tag() if gamma is None else _gamma_tag(gamma)
    return _profile(b"mntr", b"RGB ", {
        b"desc": _desc_tag(description), b"wtpt": _xyz_tag(D50),
        b"rXYZ": _xyz_tag(m[:, 0]), b"gXYZ": _xyz_tag(m[:, 1]), b"bXYZ": _xyz_tag(m[:, 2]),
        b"rTRC": trc, b"gTRC": trc, b"bTRC": trc, b"cprt": b"text" + b"\0" * 4 + b"none\0"})


def gray_icc(description: str, gamma: float) -> bytes:
    return _profile(b"mntr", b"GRAY", {b"desc": _desc_tag(description), b"wtpt": _xyz_tag(D50),
                                        b"kTRC": _gamma_tag(gamma), b"cprt": b"text" + b"\0" * 4 + b"none\0"})


def cmyk_icc(description: str, corners: dict[tuple[int, int, int, int], tuple[int, int, int]]) -> bytes:
    """An input (scanner-class) CMYK profile whose A2B0 is a 2x2x2x2 lut16 to XYZ: each ink corner (0 or 1 per
    C, M, Y, K) has the given sRGB colour; inside, LittleCMS interpolates."""
    m = bradford(_xy_to_xyz(*D65_XY), D50) @ rgb_to_xyz_matrix(SRGB_PRIMARIES, D65_XY)
    clut = []
    for c in (0, 1):
        for mg in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    rgb = np.array(corners[(c, mg, y, k)]) / 255
                    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
                    xyz = m @ lin
                    clut += [int(round(min(v, 1.99) * 32768)) for v in xyz]
    ident = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = (b"mft2" + b"\0" * 4 + bytes([4, 3, 2, 0]) + ident + struct.pack(">HH", 2, 2)
           + struct.pack(">8H", *([0, 65535] * 4)) + struct.pack(f">{len(clut)}H", *clut)
           + struct.pack(">6H", *([0, 65535] * 3)))
    return _profile(b"scnr", b"CMYK", {b"desc": _desc_tag(description), b"wtpt": _xyz_tag(D50), b"A2B0": lut,
                                        b"cprt": b"text" + b"\0" * 4 + b"none\0"})


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255


def reference_to_srgb(rgb, primaries, white_xy=D65_XY, gamma: float | None = 2.2) -> np.ndarray:
    """Independent reference: decode the transfer curve, RGB → XYZ (adapted to D65 with Bradford when the white
    differs), XYZ → linear sRGB, encode. Clipped, not gamut-mapped (LittleCMS does the same for matrix/TRC)."""
    v = np.asarray(rgb, np.float64) / 255
    lin = v ** gamma if gamma is not None else np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    xyz = bradford(_xy_to_xyz(*white_xy), _xy_to_xyz(*D65_XY)) @ rgb_to_xyz_matrix(primaries, white_xy) @ lin
    return srgb_encode(np.linalg.solve(rgb_to_xyz_matrix(SRGB_PRIMARIES, D65_XY), xyz))


def run_ingest(params: dict) -> tuple[pd.DataFrame, dict]:
    """Run the ingest stage in the current workspace: (manifest as written, summary)."""
    from dinoflow import paths
    from dinoflow.data import ingest

    summary = ingest.main(params)
    return pq.read_table(paths.MANIFEST).to_pandas(), summary
