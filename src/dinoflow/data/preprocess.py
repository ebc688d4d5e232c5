"""`dinoflow preprocess`: every `ok` image of the manifest → RGB, 256 px, stored in Parquet shards.

Geometry (the same for every image): EXIF orientation applied, then
- `crop` (default): short side resized to `size`, centre crop to `size`×`size`;
- `pad`: long side resized to `size` (the whole image stays visible), centred on a `size`×`size` canvas of
  `pad_color`.
Colour: an embedded ICC profile (Adobe RGB, ProPhoto, Display P3, CMYK, grey, ...) is applied with LittleCMS
(Pillow's ImageCms) to give sRGB, the space the models were trained in (`to_srgb`, the one place that does it);
CMYK, palette, 16-bit and grey images become 8-bit RGB; transparent pixels are composited on white. Multi-frame
files (GIF, MPO, animated WebP, multi-page TIFF) use their first frame. The same `open_rgb` is used by ingest, so
the notes in the manifest say exactly what happens here.

Storage — why Parquet shards of encoded bytes (`shard-00000.parquet`, … with columns `id`, `image`, `width`,
`height`) and not one file per image: at 47k–1M images a folder of files is what makes DVC slow (it hashes,
stats and caches every file separately, and `dvc push`/`pull` move them one request at a time), and reading many
small files is bound by file-system metadata. A shard of 4,096 images is one DVC object. Parquet rather than
tar / WebDataset: any Arrow tool (pandas, DuckDB) reads the shards with their schema, and Arrow is already a
dependency. Images stay encoded (WebP q90: ~5.6 KB for a 256 px photo, 2-3x smaller than JPEG q90), so 1M images
take ~6 GB. Measured by `benchmarks/bench_preprocess.py` (results in `benchmarks/results/preprocess.md`):
shards mean ~3,000x fewer files, ~1.45x fewer bytes on disk, ~4-5x faster hashing and ~5x faster random reads
than one file per image.

`paths.PROCESSED_INDEX` maps each id to (shard, row) and to the byte range of its image inside the shard file
(offset, length: O(1) memory-mapped random access, see `locate_blobs`), and gives the perceptual hash of the
processed image (`phash`: `imagehash.phash`, 16 hex digits; `dinoflow groups` finds near-duplicates with it);
its order (manifest order of ok rows) is the image order every later stage uses. Read them with
`dinoflow.data.store.ImageStore`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps
from tqdm import tqdm

from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger

log = get_logger("dinoflow.preprocess")

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white (as the demo emoji are)
FORMATS = {"webp": "WEBP", "jpeg": "JPEG", "png": "PNG"}
SHARD_PATTERN = "shard-{:05d}.parquet"
ROW_GROUP_SIZE = 256  # rows per Parquet row group inside a shard: small reads without reading a whole shard
_EXIF_ORIENTATION = 0x0112
_EXIF_IFD, _EXIF_COLOR_SPACE, _UNCALIBRATED = 0x8769, 0xA001, 0xFFFF
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# ----------------------------------------------------------------------------------------------------------
# Decoding (shared with ingest)


@contextlib.contextmanager
def _no_pillow_bomb_check():
    """We apply our own pixel limit (ingest.max_pixels) from the header, so Pillow's global one is lifted while
    we open a file (its default would refuse some images before we can report them properly)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@contextlib.contextmanager
def _strict_loading():
    """Truncated data is an error while we decode, whatever another library set globally (Pillow's
    `LOAD_TRUNCATED_IMAGES = True` would silently fill the missing rows with grey)."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _png_bit_depth(im: Image.Image) -> int | None:
    """Bit depth from the PNG header: Pillow silently reduces 16-bit RGB(A) PNGs to 8 bits."""
    if im.format != "PNG" or im.fp is None:
        return None
    pos = im.fp.tell()
    try:
        im.fp.seek(24)
        depth = im.fp.read(1)
    finally:
        im.fp.seek(pos)
    return depth[0] if depth else None


def _reduced_bit_depth(im: Image.Image) -> bool:
    """Whether Pillow opened a high-bit-depth colour image (16-bit RGB(A) PNG, 16-bit RGB/CMYK TIFF) in an 8-bit
    mode, reducing it silently (grey 16-bit images keep their mode, "I;16", and are noted when converted)."""
    if im.mode not in ("RGB", "RGBA", "CMYK", "LA"):
        return False
    if im.format == "PNG":
        return (_png_bit_depth(im) or 8) > 8
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def upright_size(im: Image.Image) -> tuple[int, int]:
    """Width and height as displayed (EXIF orientations 5-8 swap the axes)."""
    w, h = im.size
    return (h, w) if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def _grey_to_8bit(im: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit (or 32-bit) grey → 8-bit "L": keep the high byte, as Pillow does for 16-bit RGB PNGs.
    convert("L") would clip everything above 255 to white instead."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        notes.append("float->8bit")
    else:
        arr8 = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        notes.append("16bit->8bit")
    return Image.fromarray(arr8, "L")


def to_rgb(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; appends what was converted to `notes` (it becomes the manifest `note`).
    Pixel values are taken as they are: colour management (ICC profiles) is `to_srgb`'s job, done before."""
    notes = [] if notes is None else notes
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _grey_to_8bit(im, notes).convert("RGB")
    if mode == "P":
        if "transparency" in im.info:
            im, mode = im.convert("RGBA"), "RGBA"
            notes.append("palette->rgb")
        else:
            notes.append("palette->rgb")
            return im.convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        notes.append("alpha->white")
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "CMYK":
        notes.append("cmyk->rgb")
        return im.convert("RGB")
    notes.append("gray->rgb" if mode in ("L", "1") else f"{mode.lower()}->rgb")
    return im.convert("RGB")


def colour_key_to_alpha(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """A grey or RGB image with a transparent colour key (PNG `tRNS` without an alpha channel: Pillow keeps the
    mode and puts the key in `info["transparency"]`) → "LA" / "RGBA" with those pixels transparent, so that they
    are composited on white like every other transparent pixel (`to_rgb`), not left as the key colour (often
    black). Images without a key, or whose key matches no pixel, are returned unchanged."""
    notes = [] if notes is None else notes
    key = im.info.get("transparency")
    if key is None or isinstance(key, bytes) or im.mode not in ("RGB", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        return im
    arr = np.asarray(im)
    mask = np.all(arr == np.asarray(key), axis=-1) if arr.ndim == 3 else arr == key
    if not mask.any():
        return im
    if im.mode.startswith("I"):
        im = _grey_to_8bit(im, notes)
    elif im.mode == "1":
        im = im.convert("L")
    out = im.convert("RGBA" if im.mode == "RGB" else "LA")
    out.putalpha(Image.fromarray(np.where(mask, 0, 255).astype(np.uint8), "L"))
    return out


# ----------------------------------------------------------------------------------------------------------
# Colour management


class IccError(ValueError):
    """An embedded ICC profile that cannot be applied (unreadable, or made for another kind of data)."""


def _note_text(text: str, limit: int = 60) -> str:
    """Free text made safe inside a `;`-separated note: no separators, no line breaks, bounded length."""
    text = " ".join(str(text).replace(";", ",").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@functools.lru_cache(maxsize=1)
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


_PROFILE_SPACE = {"RGB": "RGB ", "L": "GRAY", "CMYK": "CMYK"}  # image mode → ICC colour space it needs


@functools.lru_cache(maxsize=64)
def _icc_transform(icc: bytes, mode: str) -> tuple[ImageCms.ImageCmsTransform | None, str]:
    """(transform from the profile to sRGB for `mode` images, or None when the profile is sRGB already;
    the profile's description). Raises IccError. Cached per process: collections use a handful of profiles."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
        description = (profile.profile.profile_description or "").strip() or "unnamed profile"
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError) as exc:
        raise IccError(f"unreadable ICC profile ({exc})") from exc
    if space != _PROFILE_SPACE[mode]:
        raise IccError(f"ICC profile {description!r} is for {space.strip()} data, the image is {mode}")
    out_mode = "RGB"
    try:
        transform = ImageCms.buildTransform(profile, _srgb(), mode, out_mode,
                                            renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError) as exc:
        raise IccError(f"ICC profile {description!r} cannot be applied ({exc})") from exc
    if mode == "RGB":
        # An sRGB profile (under any name) changes nothing: check on a grid of colours rather than trusting
        # the description, and skip the work (and the note) when every colour stays within one level.
        grid = np.stack(np.meshgrid(*[np.linspace(0, 255, 6).round()] * 3, indexing="ij"), -1)
        probe = Image.fromarray(grid.reshape(1, -1, 3).astype(np.uint8), "RGB")
        moved = np.abs(np.asarray(transform.apply(probe), np.int16) - np.asarray(probe, np.int16)).max()
        if moved <= 1:
            return None, description
    return transform, description


def to_srgb(im: Image.Image, icc: bytes | None, notes: list[str] | None = None) -> Image.Image:
    """Apply an embedded ICC profile: the image's pixels, in the profile's colour space, → sRGB (8-bit).

    THE colour conversion of dinoflow (ingest and preprocess both get here through `open_rgb`). LittleCMS via
    Pillow's ImageCms, perceptual intent (for matrix/TRC profiles such as Adobe RGB, ProPhoto and Display P3 the
    same as relative colorimetric). Returns "RGB" (or "RGBA" when the image has alpha, kept unchanged) for RGB,
    CMYK and grey images with a profile; the image unchanged without a profile or with an sRGB one.
    Notes: `icc->srgb:<profile description>` when converted; `icc-unusable:<reason>` when a profile is present
    but cannot be applied (unreadable, or made for another colour space), and the pixels are used as they are.
    Palette and 16-bit images are reduced to 8 bits first (and noted), as the profile describes their colours.
    """
    notes = [] if notes is None else notes
    if not icc:
        return im
    if im.mode in ("P", "PA"):
        has_alpha = im.mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette->rgb")
    elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _grey_to_8bit(im, notes)
    elif im.mode == "1":
        im = im.convert("L")
    alpha = None
    if im.mode in _ALPHA_MODES:
        alpha = im.getchannel("A")
        im = im.convert("RGB" if im.mode in ("RGBA", "RGBa") else "L")
    if im.mode not in _PROFILE_SPACE:
        notes.append(f"icc-unusable:{_note_text(f'no colour management for {im.mode} images')}")
    else:
        try:
            transform, description = _icc_transform(bytes(icc), im.mode)
        except IccError as exc:
            notes.append(f"icc-unusable:{_note_text(str(exc), 120)}")
            transform = None
        else:
            if transform is not None:
                im = transform.apply(im)
                notes.append(f"icc->srgb:{_note_text(description)}")
    if alpha is not None:
        im = im.convert("RGBA" if im.mode in ("RGB", "RGBA") else "LA")
        im.putalpha(alpha)
    return im


# ----------------------------------------------------------------------------------------------------------
# Opening an image


def frame_count(im: Image.Image) -> int:
    """Frames in a multi-frame file (GIF, MPO, APNG, animated WebP, multi-page TIFF); 1 otherwise."""
    try:
        return int(getattr(im, "n_frames", 1) or 1)
    except (OSError, ValueError, EOFError, SyntaxError):
        return 1  # a damaged later frame: the first frame's decoding decides


def open_rgb(path: str | os.PathLike,
             draft_size: tuple[int, int] | Callable[[int, int], tuple[int, int]] | None = None,
             max_pixels: int | None = None) -> tuple[Image.Image, list[str], tuple[int, int]]:
    """Decode an image upright in sRGB. Returns (image, notes, original upright size).

    The first frame of a multi-frame file (noted `frame:1/N`); EXIF orientation applied; an embedded ICC profile
    applied (`to_srgb`); any mode made 8-bit RGB (`to_rgb`). Truncated data raises OSError.
    draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the result stays at least this
    large (DCT scaling is far faster than decoding at full size and then resizing); a callable gets the stored
    (width, height) and returns that size. max_pixels: raise
    `PixelLimitError` from the header, before anything is decoded.
    """
    with _no_pillow_bomb_check(), _strict_loading():
        return _open_rgb(path, draft_size, max_pixels)


def _open_rgb(path, draft_size, max_pixels) -> tuple[Image.Image, list[str], tuple[int, int]]:
    opened = Image.open(path)
    try:
        w, h = opened.size
        if max_pixels is not None and w * h > max_pixels:
            raise PixelLimitError(w, h, max_pixels)
        notes: list[str] = []
        # Before anything else reads the file (a PNG's getexif() loads the image and closes it).
        if _reduced_bit_depth(opened):
            notes.append("16bit->8bit")
        n_frames = frame_count(opened)
        if n_frames > 1:
            opened.seek(0)
            notes.append(f"frame:1/{n_frames}")
        size = upright_size(opened)
        orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
        if draft_size is not None and opened.format in ("JPEG", "MPO"):
            opened.draft(opened.mode, draft_size(w, h) if callable(draft_size) else draft_size)
        opened.load()
        valid_orientation = orientation in (2, 3, 4, 5, 6, 7, 8)  # 0, 9, ...: not a valid value, ignored
        # Pillow's TIFF reader applies the Orientation tag itself while loading (and removes the tag; its size is
        # upright from the start): the pixels are upright already, only the note and size remain to be set.
        applied_on_load = valid_orientation and opened.getexif().get(_EXIF_ORIENTATION, 1) != orientation
        if applied_on_load:
            size = opened.size
        icc = opened.info.get("icc_profile")
        if not icc and opened.getexif().get_ifd(_EXIF_IFD).get(_EXIF_COLOR_SPACE) == _UNCALIBRATED:
            # Cameras set to Adobe RGB write "uncalibrated" here (DCF option file) and often embed no profile:
            # the colours are not sRGB, but which space they are in is not stated. Say so; use them as they are.
            notes.append("colorspace-uncalibrated")
        im = opened
        if valid_orientation:
            if not applied_on_load:
                im = ImageOps.exif_transpose(im)
            notes.append("exif-rotated")
        im = colour_key_to_alpha(im, notes)
        im = to_srgb(im, icc, notes)
        out = to_rgb(im, notes)
        if out is not opened:
            opened.close()
        # else: the decoded pixels are returned; Pillow closed the file after load() (single-frame formats) or
        # it closes when the image is garbage-collected (multi-frame ones such as TIFF).
        return out, notes, size
    except BaseException:
        opened.close()
        raise


class PixelLimitError(ValueError):
    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} = {width * height:,} pixels is over ingest.max_pixels = {limit:,} "
                         "(possible decompression bomb)")
        self.width, self.height = width, height


# ----------------------------------------------------------------------------------------------------------
# Geometry and encoding


def draft_request(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """The smallest decoded size that still gives a full-quality `size` result (for JPEG draft mode)."""
    scale = size / (min(width, height) if mode == "crop" else max(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def fit(im: Image.Image, size: int, mode: str = "crop", pad_color: Sequence[int] = BACKGROUND) -> Image.Image:
    """Resize and crop (or pad) an RGB image to `size`×`size` (see the module docstring)."""
    w, h = im.size
    if mode == "crop":
        side = min(w, h)
        scale = size / side
        # Crop box in source pixels (floats allowed): the centred square the output covers. Resizing only that
        # box in one call is equivalent to resize-then-crop and skips resampling pixels we would throw away.
        left, top = (w - side) / 2, (h - side) / 2
        return im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                         reducing_gap=None if scale > 1 / 3 else 3.0)
    if mode == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 1 / 3 else 3.0)
        canvas = Image.new("RGB", (size, size), tuple(int(c) for c in pad_color))
        canvas.paste(small, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise DinoflowError(f"preprocess.mode: {mode!r} is not one of crop, pad")


def encode(im: Image.Image, fmt: str = "webp", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", compress_level=6)
    elif fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        # method 2: half the CPU of Pillow's default 4 for files ~2-5 % larger at 256 px (measured on photos and
        # the demo emoji); WebP q90 is still ~2-3x smaller than JPEG q90, which matters at 1M images.
        im.save(buf, "WEBP", quality=quality, method=2)
    else:
        raise DinoflowError(f"preprocess.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return buf.getvalue()


def process_image(path: str, size: int = 256, mode: str = "crop", pad_color: Sequence[int] = BACKGROUND,
                  fmt: str = "webp", quality: int = 90) -> bytes:
    """One image: decode (JPEG draft where it helps) → upright RGB → fit → encoded bytes."""
    return process_image_with_phash(path, size, mode, pad_color, fmt, quality)[0]


def process_image_with_phash(path: str, size: int = 256, mode: str = "crop", pad_color: Sequence[int] = BACKGROUND,
                             fmt: str = "webp", quality: int = 90) -> tuple[bytes, str]:
    """`process_image` plus the 64-bit perceptual hash (`imagehash.phash`, 16 hex digits) of the fitted image,
    used by `dinoflow groups` to find near-duplicates."""
    import imagehash

    im, _, _ = open_rgb(path, draft_size=lambda w, h: draft_request(w, h, size, mode))
    fitted = fit(im, size, mode, pad_color)
    return encode(fitted, fmt, quality), str(imagehash.phash(fitted))


# ----------------------------------------------------------------------------------------------------------
# Parallel map (ordered, chunked, bounded memory), shared with ingest


def resolve_workers(workers: int | None) -> int:
    """0 / None → every core this process may use."""
    if workers:
        return int(workers)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _pool_context():
    # forkserver: no fork of a process that may hold threads (torch, tqdm monitor); spawn where unavailable.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def parallel_map(fn: Callable[[list], list], items: Sequence[Any], workers: int, chunk_size: int = 64,
                 desc: str = "", unit: str = "img") -> Iterator[Any]:
    """Yield fn's results item by item in input order. fn takes a chunk (list) and returns one result per item.

    workers == 1 runs in this process (tests, debugging). Otherwise a process pool gets chunks, with at most
    4 chunks per worker in flight so that results waiting for an earlier slow chunk cannot fill the memory.
    """
    chunks = [list(items[i:i + chunk_size]) for i in range(0, len(items), chunk_size)]
    bar = tqdm(total=len(items), desc=desc, unit=unit, mininterval=1.0, dynamic_ncols=True)
    try:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                results = fn(chunk)
                bar.update(len(chunk))
                yield from results
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
            pending: deque = deque()
            it: Iterable[list] = iter(chunks)
            for chunk in it:
                pending.append((pool.submit(fn, chunk), len(chunk)))
                if len(pending) >= 4 * workers:
                    break
            while pending:
                future, n = pending.popleft()
                results = future.result()
                bar.update(n)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((pool.submit(fn, nxt), len(nxt)))
                yield from results
    finally:
        bar.close()


class _ChunkProcessor:
    """Picklable callable for the pool: processes a chunk of paths into encoded bytes (or an error)."""

    def __init__(self, size: int, mode: str, pad_color: Sequence[int], fmt: str, quality: int):
        self.kwargs = dict(size=size, mode=mode, pad_color=tuple(pad_color), fmt=fmt, quality=quality)

    def __call__(self, chunk: list[str]) -> list[tuple[tuple[bytes, str] | None, str | None]]:
        out = []
        for path in chunk:
            try:
                out.append((process_image_with_phash(path, **self.kwargs), None))
            except Exception as exc:  # noqa: BLE001 - reported with the id by the caller
                out.append((None, f"{type(exc).__name__}: {exc}"))
        return out


# ----------------------------------------------------------------------------------------------------------
# The stage


def _shard_table(ids: list[str], blobs: list[bytes], size: int):
    import pyarrow as pa

    n = len(ids)
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False),
                        pa.field("width", pa.int32(), nullable=False), pa.field("height", pa.int32(), nullable=False)])
    return pa.table([pa.array(ids, pa.string()), pa.array(blobs, pa.binary()), pa.array(np.full(n, size, np.int32)),
                     pa.array(np.full(n, size, np.int32))], schema=schema)


def locate_blobs(path: str | Path, blobs: Sequence[bytes]) -> list[int]:
    """Byte offset of each blob inside the written shard file, or -1 for all when one is not found verbatim.

    The shard is written uncompressed with PLAIN encoding for `image`, so Parquet stores each value verbatim
    after its 4-byte little-endian length, in row order. Recording where lets `ImageStore` slice an image out of
    the memory-mapped file in O(1) without decoding a row group (random access for shuffled training);
    each offset is checked against its length prefix, and readers fall back to Parquet when it does not hold.
    """
    import mmap

    offsets: list[int] = []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 4
        for blob in blobs:
            found = mm.find(blob, pos)
            if found < 4 or mm[found - 4:found] != len(blob).to_bytes(4, "little"):
                return [-1] * len(blobs)
            offsets.append(found)
            pos = found + len(blob) + 4
    return offsets


def write_shards(records: Iterable[tuple[str, bytes]], out_dir: str | Path, shard_size: int, size: int,
                 fmt: str) -> list[tuple[str, int, int, int, int]]:
    """Stream (id, encoded bytes) records into Parquet shards.

    Returns the index rows (id, shard, row, offset, length): offset/length locate the bytes in the shard file
    (see `locate_blobs`; -1 when not located)."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("shard-*.parquet"):  # a rerun with fewer images must not leave stale shards
        old.unlink()
    index: list[tuple[str, int, int, int, int]] = []
    buf_ids: list[str] = []
    buf_blobs: list[bytes] = []
    shard = 0

    def flush() -> None:
        nonlocal shard
        table = _shard_table(buf_ids, buf_blobs, size)
        table = table.replace_schema_metadata({"format": fmt, "size": str(size)})
        path = out_dir / SHARD_PATTERN.format(shard)
        # Images are already compressed: Parquet compression would only cost CPU. Dictionary encoding only for
        # `id`, so `image` is PLAIN (verbatim bytes, see locate_blobs).
        pq.write_table(table, path, compression="none", row_group_size=ROW_GROUP_SIZE, use_dictionary=["id"],
                       write_statistics=False, data_page_version="1.0")
        offsets = locate_blobs(path, buf_blobs)
        index.extend((i, shard, r, off, len(b)) for r, (i, b, off) in enumerate(zip(buf_ids, buf_blobs, offsets)))
        buf_ids.clear()
        buf_blobs.clear()
        shard += 1

    for image_id, blob in records:
        buf_ids.append(image_id)
        buf_blobs.append(blob)
        if len(buf_ids) >= shard_size:
            flush()
    if buf_ids:
        flush()
    return index


def write_index(index_rows: Sequence[tuple], path: str | Path, phash: dict[str, str] | None = None) -> None:
    """phash: id -> perceptual hash (hex), written as the `phash` column when given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*index_rows)) if index_rows else [[], [], [], [], []]
    columns = {"id": pa.array(cols[0], pa.string()), "shard": pa.array(cols[1], pa.int32()),
               "row": pa.array(cols[2], pa.int32()), "offset": pa.array(cols[3], pa.int64()),
               "length": pa.array(cols[4], pa.int64())}
    if phash is not None:
        columns["phash"] = pa.array([phash[i] for i in cols[0]], pa.string())
    table = pa.table(columns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def main(params: dict[str, Any], **_: Any) -> None:
    import pyarrow.parquet as pq

    cfg = params["preprocess"]
    size, mode, fmt = int(cfg["size"]), cfg.get("mode", "crop"), cfg.get("format", "webp")
    if mode not in ("crop", "pad"):
        raise DinoflowError(f"preprocess.mode: {mode!r} is not one of crop, pad")
    if fmt not in FORMATS:
        raise DinoflowError(f"preprocess.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not Path(paths.MANIFEST).exists():
        raise DinoflowError(f"{paths.MANIFEST}: manifest not found (run `dinoflow ingest` first)")
    if "file" not in pq.read_schema(paths.MANIFEST).names:
        raise DinoflowError(f"{paths.MANIFEST}: no `file` column (written by an older dinoflow): rerun "
                            "`dinoflow ingest`")
    manifest = pq.read_table(paths.MANIFEST, columns=["id", "file", "status"]).to_pandas()
    ok = manifest[manifest["status"] == "ok"]
    if ok.empty:
        raise DinoflowError(f"{paths.MANIFEST}: no rows with status ok, nothing to preprocess")
    images_dir = Path(params["collection"]["images_dir"])
    ids = ok["id"].astype(str).tolist()
    # `file`: the name on disk, which differs from the table's `path` when ingest matched it after Unicode
    # normalisation.
    files = [str(images_dir / p) for p in ok["file"]]
    workers = resolve_workers(cfg.get("workers", 0))
    log.info("preprocess: %d images from %s → %d px (%s, %s q%s), %d worker(s)", len(ids), images_dir, size,
             mode, fmt, cfg.get("quality", 90), workers)

    failures: list[str] = []
    phash: dict[str, str] = {}
    processor = _ChunkProcessor(size, mode, cfg.get("pad_color", BACKGROUND), fmt, int(cfg.get("quality", 90)))

    def records() -> Iterator[tuple[str, bytes]]:
        results = parallel_map(processor, files, workers, chunk_size=32, desc="preprocess")
        for image_id, path, (done, error) in zip(ids, files, results):
            if error is None:
                blob, phash[image_id] = done
                yield image_id, blob
            else:
                # Ingest decoded this file earlier: failing now means it changed on disk since.
                failures.append(f"{image_id} ({path}): {error}")

    index_rows = write_shards(records(), paths.PROCESSED_DIR, int(cfg["shard_size"]), size, fmt)
    if failures:
        raise DinoflowError(f"preprocess: {len(failures)} image(s) that ingest accepted could not be processed "
                            f"(rerun `dinoflow ingest`): " + "; ".join(failures[:5]))
    write_index(index_rows, paths.PROCESSED_INDEX, phash)
    log.info("preprocess: wrote %d images in %d shard(s) to %s, index %s", len(index_rows),
             len({r[1] for r in index_rows}), paths.PROCESSED_DIR, paths.PROCESSED_INDEX)
