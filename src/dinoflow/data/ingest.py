"""`dinoflow ingest`: validate every metadata row and its image; write the manifest and a summary.

Every input row gets exactly one manifest row (nothing is dropped silently) with `status` `ok` or one of the
reason codes in `REASONS`. Rows with `ok` are what later stages use. Conversions that preprocess will apply
(ICC profile → sRGB, CMYK, 16-bit, palette, alpha, grey → RGB; EXIF rotation; first frame of a multi-frame file)
and what was read differently from the table (a file name matched after Unicode normalisation, a keyword list
written as a Python/JSON literal) keep the row `ok` and are listed in `note` (`NOTES`). docs/ingest.md is the
curators' guide to every status and note. A missing caption or keywords is normal and stays `ok`.

Decisions worth knowing:
- Duplicate ids: the first row (in input order) with an id keeps it, whatever its own status; later rows get
  `duplicate_id` and their image is not opened. Ids differing only in Unicode normalisation (NFC/NFD) are
  duplicates. Rows naming the same file (after resolution: `./a.png`, hard links) all stay `ok`; later ones
  are noted `duplicate-file:row N`.
- Ids are text exactly as written (leading zeros, 19-digit numbers: `collection.read_metadata` never lets them
  through a float); surrounding whitespace is removed and noted. An id that is not a scalar, or a floating-point
  number too large to be exact (the table's writer may already have rounded it), is `invalid_id`.
- File names: the table's path is tried as written, then matched regardless of Unicode normalisation (macOS
  stores "café" decomposed, NFD; tables hold it composed, NFC); the file read is the manifest's `file` column.
  A missing file's detail names near matches (letter case, compatibility normalisation, other extension).
- Damaged images: Pillow hides libjpeg's "Corrupt JPEG data" warnings and does not check PNG CRCs while
  decoding, so JPEGs are decoded again by a strict libjpeg-turbo path (`jpeg_problem`), PNGs are verified chunk
  by chunk, WebP RIFF sizes are checked: any complaint makes the row `corrupt_image` (or `truncated_image`) with
  the decoder's message.
- Invalid UTF-8 anywhere in a row's mapped fields (id, path, caption, keywords, labels) skips the row
  (`invalid_utf8`): mojibake text would silently corrupt the caption/keyword similarity the workflow measures.
  A file in a legacy encoding therefore fails the whole run with a count telling the user to re-encode it.
- Unknown columns (not mapped in `collection.columns` nor listed in `collection.label_columns` / `group_column`) are a table-level
  finding, not a row status: they are named in the log and in the summary (`unknown_columns`). With
  `ingest.allow_unknown_columns: false` (default) they are left out of the manifest; with `true` they are kept
  as text columns (prefixed `extra_` where a name clashes with a manifest column).
- The run fails (`DinoflowError`) only when the skipped share exceeds `ingest.max_skipped_fraction`; the
  manifest and summary are written first so the user can inspect them.

Scale: the per-image work (stat, header, decode) runs in a process pool over chunks; JPEGs are decoded in
draft mode at 1/8 scale, which still reads the whole entropy-coded stream and so still finds truncation (the
strict check decodes at 1/8 scale too with simplejpeg; at full size with the torchvision fallback). File-name
matching lists a folder once, and only when a path is not found as written.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import sys
import tempfile
import unicodedata
import urllib.parse
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dinoflow import paths
from dinoflow.data.collection import json_text, read_metadata
from dinoflow.data.preprocess import PixelLimitError, open_rgb, parallel_map, resolve_workers
from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger, write_json

log = get_logger("dinoflow.ingest")

OK = "ok"
REASONS = {
    "unreadable_row": "the metadata row itself could not be parsed",
    "invalid_utf8": "a text field of the row is not valid UTF-8",
    "missing_id": "the id is empty",
    "invalid_id": "the id is not an identifier (a list or object, or a float too large to be exact)",
    "duplicate_id": "an earlier row already has this id",
    "missing_path": "the path is empty",
    "path_outside_images_dir": "the path leaves the image folder (absolute, '..', a symlink out, or a URL)",
    "missing_file": "no file at the path",
    "not_a_file": "the path is a directory or another non-regular file",
    "empty_file": "the file has zero bytes",
    "unreadable_file": "the file cannot be read (permission denied, I/O error)",
    "not_an_image": "not an image Pillow can identify (despite its extension)",
    "too_many_pixels": "more pixels than ingest.max_pixels (decompression-bomb guard)",
    "truncated_image": "the image data ends early",
    "corrupt_image": "the image data is damaged: the decoder failed or complained (message in detail)",
}
NOTES = {  # `note` entries of ok rows: `code` or `code:detail`; the summary counts them by code
    "icc->srgb": "an embedded ICC colour profile (named after ':') was converted to sRGB",
    "icc-unusable": "an embedded ICC profile could not be applied (reason after ':'); pixels used as they are",
    "colorspace-uncalibrated": "no ICC profile, and EXIF says the colours are not sRGB ('uncalibrated', as "
                               "cameras in Adobe RGB mode write): pixels used as sRGB, colours may be dull",
    "frame": "a multi-frame file (GIF, MPO, APNG, animated WebP, TIFF); `frame:1/N`: the first of N frames is used",
    "jpeg-padding": "libjpeg found a few stray bytes after the last image block (written by some encoders); "
                    "every block decoded, the pixels are intact",
    "exif-rotated": "the EXIF orientation was applied",
    "cmyk->rgb": "CMYK without a profile, converted with the naive formula",
    "16bit->8bit": "16-bit samples reduced to 8 bits",
    "float->8bit": "floating-point samples clipped to 0..255",
    "palette->rgb": "a palette image expanded to RGB",
    "alpha->white": "transparent pixels (alpha channel or a PNG's transparent colour key) composited on white",
    "gray->rgb": "a grey image copied to the three channels",
    "path-backslashes": "the path uses Windows separators (`sub\\a.png`) and was read as `sub/a.png`; `file` has "
                        "the name used",
    "duplicate-file": "an earlier ok row (`duplicate-file:row N`) names the same file: both rows are kept, the "
                      "image appears twice",
    "filename-unicode": "the file's name differs from the table's only in Unicode normalisation (e.g. NFD on "
                        "macOS); `file` has the name on disk",
    "id-whitespace-stripped": "spaces around the id were removed",
    "path-whitespace-stripped": "spaces around the path were removed",
    "keywords-list-literal": "the keywords cell was a serialised list (JSON, Python or NumPy repr), read as a list",
    "keywords-nested-list": "the keywords list held lists (flattened) or objects (kept as JSON text)",
    "keywords-unparsed-list": "the keywords cell looks like a serialised list but could not be parsed; it was "
                              "split on collection.keyword_separator instead",
}
MANIFEST_COLUMNS = ("row", "id", "path", "caption", "keywords", "status", "detail", "width", "height", "note",
                    "file")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _check_path(rel: str) -> str | None:
    """Reason the relative path is unacceptable before touching the disk, or None."""
    if _URL.match(rel):
        return (f"{rel[:80]!r} is a URL, not a path relative to collection.images_dir (download the images into "
                "that folder and give their relative paths)")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path (paths must be relative to collection.images_dir)"
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"path {rel!r} resolves outside the image folder"
    if norm == ".":
        return "path names the image folder itself"
    return None


# ----------------------------------------------------------------------------------------------------------
# File names as the OS stores them


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _loose(name: str) -> str:
    """Compatibility-normalised, case-folded, stripped: what a human would call "the same name"."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


class FileNames:
    """Finds the file a table path names under `root`, component by component.

    A path found as written is used as is. Otherwise each missing component is looked up in its folder's listing
    (read once per folder and cached) by its NFC form, so a name stored decomposed (NFD, as macOS writes
    "café") matches the composed name in the table, and the other way round. Only canonical equivalence is
    matched (the names look identical and are the same text for Unicode); for everything else (letter case,
    compatibility forms such as full-width letters, spaces, another extension) `resolve` names the near matches
    in its message and reads nothing.
    """

    def __init__(self, root: str):
        self.root = root
        self._listings: dict[str, tuple[list[str], dict[str, list[str]]] | None] = {}

    def _listing(self, folder: str) -> tuple[list[str], dict[str, list[str]]] | None:
        if folder not in self._listings:
            try:
                names = sorted(os.listdir(os.path.join(self.root, folder) if folder else self.root))
            except OSError:
                self._listings[folder] = None
            else:
                by_nfc: dict[str, list[str]] = {}
                for name in names:
                    by_nfc.setdefault(_nfc(name), []).append(name)
                self._listings[folder] = (names, by_nfc)
        return self._listings[folder]

    def resolve(self, rel: str) -> tuple[str | None, str, str]:
        """(path relative to root of the file to read, or None; note; message when None).

        note is `filename-unicode:NFD` (the form of the name on disk) when a component matched only after
        Unicode normalisation, else "".
        """
        if os.path.lexists(os.path.join(self.root, rel)):
            return rel, "", ""
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        found: list[str] = []
        forms: set[str] = set()
        for i, part in enumerate(parts):
            folder = "/".join(found)
            candidate = f"{folder}/{part}" if folder else part
            if os.path.lexists(os.path.join(self.root, candidate)):
                found.append(part)
                continue
            listing = self._listing(folder)
            if listing is None:
                return None, "", f"{os.path.join(self.root, folder)} is not a folder"
            names, by_nfc = listing
            same = by_nfc.get(_nfc(part), [])
            if len(same) == 1:
                found.append(same[0])
                forms.add(_form(same[0]))
                continue
            where = os.path.join(self.root, folder) if folder else self.root
            if len(same) > 1:
                return None, "", (f"{len(same)} names in {where} match {part!r} under Unicode normalisation "
                                  f"({', '.join(repr(n) for n in same)}): ambiguous, rename one")
            kind = "folder" if i < len(parts) - 1 else "file"
            hints = self._near(names, part)
            near = f"; near match: {'; '.join(hints)}" if hints else "; no near match in that folder"
            return None, "", f"no {kind} {part!r} in {where}{near}"
        return "/".join(found), (f"filename-unicode:{'/'.join(sorted(forms))}" if forms else ""), ""

    @staticmethod
    def _near(names: list[str], part: str, limit: int = 3) -> list[str]:
        """Names in the folder a person would take for `part`, each with how it differs."""
        loose, stem, ext = _loose(part), *os.path.splitext(part)
        hidden = _invisible(part)
        hints = []
        for name in names:
            if name.casefold() == part.casefold() or _nfc(name).casefold() == _nfc(part).casefold():
                why = "differs in letter case"
            elif (hidden or _invisible(name)) and _visible(name) == _visible(part):
                extra = sorted(set(hidden) ^ set(_invisible(name)))
                why = ("differs by invisible character(s) "
                       + ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '')}".strip() for c in extra))
            elif "%" in part and _nfc(urllib.parse.unquote(part)) == _nfc(name):
                why = "the table's name is percent-encoded, as in a URL (%20 for a space)"
            elif _loose(name) == loose:
                why = "differs in spaces or Unicode compatibility form (e.g. full-width letters, ligatures)"
            elif _loose(os.path.splitext(name)[0]) == _loose(stem) and ext:
                why = f"other extension {os.path.splitext(name)[1] or '(none)'!r}"
            else:
                continue
            hints.append(f"{name!r} ({why})")
            if len(hints) == limit:
                break
        return hints


def _invisible(name: str) -> str:
    """Format characters (zero-width space, joiners, BOM, direction marks) in a name: copied from web pages and
    spreadsheets, they make two names that look identical differ."""
    return "".join(c for c in name if unicodedata.category(c) == "Cf")


def _visible(name: str) -> str:
    return "".join(c for c in name if unicodedata.category(c) != "Cf")


def _form(name: str) -> str:
    for form in ("NFC", "NFD"):
        if unicodedata.normalize(form, name) == name:
            return form
    return "mixed"


# ----------------------------------------------------------------------------------------------------------
# Damaged image data that Pillow decodes without complaint


def jpeg_problem(data: bytes) -> str | None:
    """libjpeg-turbo's first complaint about a JPEG (or MPO) stream, or None when it decodes cleanly.

    Pillow's decoder discards libjpeg's warnings ("Corrupt JPEG data: 4000 extraneous bytes before marker
    0xd9", "premature end of data segment", "bad Huffman code"), which libjpeg emits while it fills damaged
    blocks with grey; we decode again and treat any warning as damage. With simplejpeg (libjpeg-turbo, `strict`:
    warnings raise) the decode is DCT-scaled to 1/8 (all entropy-coded data is still read); without it,
    torchvision.io.decode_jpeg at full size, whose libjpeg prints warnings on the C stderr (captured here).
    """
    try:
        import simplejpeg
    except ImportError:
        return _jpeg_problem_torchvision(data)
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY",
                               min_width=1, min_height=1, min_factor=8, strict=True)
    except ValueError as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def _jpeg_problem_torchvision(data: bytes) -> str | None:
    import torch
    from torchvision.io import decode_jpeg

    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as exc:
            # "decode_jpeg, <source file>:<line>, Image is incomplete or truncated" → the last part
            error = str(exc).rsplit(", ", 1)[-1].strip()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        printed = [line.strip() for line in captured.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return error or (printed[0] if printed else None)


def png_chunk_problem(data: bytes) -> str | None:
    """The first chunk of a PNG whose CRC checksum is wrong (critical or ancillary), or None.

    Pillow refuses a bad CRC in an ancillary chunk (text, colour profile, ...) while opening, and `Image.open`
    then says only "cannot identify image file"; here the chunk is named. A file cut inside a chunk is left to
    the decoder (truncated). PNG spec, section 5.3: CRC-32 over the chunk type and data.
    """
    pos = 8
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return None
        if zlib.crc32(data[pos + 4:end - 4]) & 0xFFFFFFFF != int.from_bytes(data[end - 4:end], "big"):
            role = "ancillary" if kind[:1] and kind[0] & 0x20 else "critical"
            return f"CRC error in {role} chunk {kind.decode('latin-1')!r} at byte {pos}"
        if kind == b"IEND":
            return None
        pos = end
    return None


def png_problem(path: str) -> str | None:
    """A chunk with a bad CRC (`png_chunk_problem`), else Pillow's verify(), or None."""
    with open(path, "rb") as fh:
        problem = png_chunk_problem(fh.read())
    if problem is not None:
        return problem
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


def webp_problem(data: bytes) -> tuple[str, str] | None:
    """(status, message) when the RIFF container's sizes do not match the file, or None.

    WebP has no checksum: damage inside the compressed data that libwebp decodes without error cannot be found.
    """
    size = len(data)
    declared = int.from_bytes(data[4:8], "little") + 8
    if declared > size:
        return "truncated_image", f"RIFF header says {declared} bytes, the file has {size}"
    pos = 12
    while pos + 8 <= declared:
        chunk, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        end = pos + 8 + length + (length & 1)
        if end > declared:
            return "corrupt_image", (f"WebP chunk {chunk.decode('latin-1')!r} at byte {pos} claims {length} bytes, "
                                     f"beyond the end of the RIFF data ({declared} bytes)")
        pos = end
    if pos != declared:
        return "corrupt_image", f"WebP chunks end at byte {pos}, the RIFF header says {declared}"
    return None


# A few stray bytes between the last entropy-coded block and the end-of-image marker: every block was decoded
# before libjpeg met them, so nothing is lost (several cameras and encoders write such padding). Damage inside
# the data makes the decoder finish far from the marker (thousands of bytes) or fail on a bad code or marker.
_PADDING_BEFORE_EOI = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9$")
MAX_PADDING_BEFORE_EOI = 32


def integrity_problem(path: str) -> tuple[str, str] | None:
    """(status, message) for damage the normal decode does not report (JPEG, PNG, WebP), or None.
    status `ok` with a message: libjpeg warned about harmless padding before the end marker (noted)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head.startswith(b"\xff\xd8\xff"):
            fh.seek(0)
            data = fh.read()
            problem = jpeg_problem(data)
            if problem is None:
                return None
            benign = _PADDING_BEFORE_EOI.match(problem)
            if benign and int(benign.group(1)) <= MAX_PADDING_BEFORE_EOI:
                return OK, problem  # padding after the last block (some encoders write it): pixels are intact
            low = problem.lower()
            reason = "truncated_image" if "premature end of jpeg file" in low or "truncated" in low \
                else "corrupt_image"
            if reason == "truncated_image" and not data.endswith(b"\xff\xd9") \
                    and jpeg_problem(data + b"\xff\xd9") is None:
                # Every block is there, only the 2-byte end marker is not (an interrupted write after the data).
                problem += (" (only the 2-byte end-of-image marker is missing: the image data is complete; "
                            "re-saving the file fixes it)")
            return reason, f"libjpeg: {problem}"
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            fh.seek(0)
            return webp_problem(fh.read())
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        problem = png_problem(path)
        if problem is None:
            return None
        return ("truncated_image" if "truncated" in problem.lower() else "corrupt_image"), f"PNG: {problem}"
    return None


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def sniff(path: str) -> tuple[str | None, bool]:
    """(what the file's first bytes say it is, whether that is an image format Pillow reads), or (None, False).
    Only used to explain a file Pillow could not open."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    images = [(b"\xff\xd8\xff", "a JPEG file"), (b"\x89PNG\r\n\x1a\n", "a PNG file"), (b"GIF87a", "a GIF file"),
              (b"GIF89a", "a GIF file"), (b"II*\x00", "a TIFF file"), (b"MM\x00*", "a TIFF file"),
              (b"BM", "a BMP file")]
    for magic, kind in images:
        if head.startswith(magic) and (magic != b"BM" or head[6:10] == b"\0\0\0\0"):  # BMP: reserved bytes 0
            return kind, True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP file", True
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return (f"a HEIF/HEIC photo (brand {brand.decode('latin-1')!r}, as iPhones write): Pillow needs the "
                    "pillow-heif plugin for it; convert it to JPEG"), False
        if brand in (b"avif", b"avis"):
            return "an AVIF image: convert it to JPEG or PNG", False
        return f"an MP4/QuickTime file (brand {brand.decode('latin-1')!r}), probably a video", False
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page (a web page, e.g. an error page, saved under an image's name)", False
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "an SVG drawing (vector graphics): rasterise it to PNG", False
    if head.startswith(b"%PDF"):
        return "a PDF document", False
    return None, False


def _safe_integrity_problem(path: str) -> tuple[str, str] | None:
    try:
        return integrity_problem(path)
    except Exception:  # noqa: BLE001 - only used to explain a failure already found
        return None


class _ImageChecker:
    """Picklable per-chunk worker: (row, path) → (status, detail, width, height, note)."""

    def __init__(self, images_dir: str, max_pixels: int):
        self.images_dir = images_dir
        self.root = os.path.realpath(images_dir)
        self.max_pixels = max_pixels

    def __call__(self, chunk: list[str]) -> list[tuple[str, str, int | None, int | None, str]]:
        return [self.check(rel) for rel in chunk]

    def check(self, rel: str) -> tuple[str, str, int | None, int | None, str]:
        full = os.path.join(self.images_dir, rel)
        real = os.path.realpath(full)
        if os.path.commonpath([self.root, real]) != self.root:
            return "path_outside_images_dir", f"{rel} resolves to {real}, outside {self.root}", None, None, ""
        try:
            st = os.stat(full)
        except FileNotFoundError:
            return "missing_file", f"no file {full}", None, None, ""
        except OSError as exc:
            return "missing_file", f"cannot stat {full}: {exc}", None, None, ""
        if not os.path.isfile(full):
            return "not_a_file", f"{full} is not a regular file", None, None, ""
        if st.st_size == 0:
            return "empty_file", f"{full} has 0 bytes", None, None, ""
        try:
            # Permissions, a failing disk or network share, a cloud "online-only" placeholder: the file is not
            # damaged, we cannot read it (the image decoders would call it corrupt).
            with open(full, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            return "unreadable_file", f"{full}: cannot read the file: {exc.strerror or exc}", None, None, ""
        try:
            # (1, 1): JPEGs decode at 1/8 scale; every other format decodes fully, which is what finds damage.
            _, notes, (w, h) = open_rgb(full, draft_size=(1, 1), max_pixels=self.max_pixels)
        except PixelLimitError as exc:
            return "too_many_pixels", str(exc), exc.width, exc.height, ""
        except UnidentifiedImageError as exc:
            # An image format Pillow refuses to open (a bad CRC, an unsupported JPEG variant) is damage, not "not
            # an image"; other files are named when we recognise them (HTML page, HEIC photo, PDF).
            problem = _safe_integrity_problem(full)
            if problem is not None and problem[0] != OK:
                return problem[0], f"{full}: {problem[1]} (Pillow cannot open it)", None, None, ""
            kind, is_image = sniff(full)
            if is_image:
                return "corrupt_image", f"{full}: {kind} (by its first bytes) that Pillow cannot decode: {exc}", \
                    None, None, ""
            ext = os.path.splitext(rel)[1] or "no extension"
            what = f": it is {kind}" if kind else ""
            return "not_an_image", \
                f"{full} ({st.st_size} bytes, {ext}) is not an image Pillow can identify{what}", None, None, ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-row status, never a crash
            message = f"{type(exc).__name__}: {exc}"
            reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
            # The strict checks often say more than Pillow ("could not create decoder object").
            problem = _safe_integrity_problem(full)
            if problem is not None:
                return problem[0], f"{full}: {problem[1]} (Pillow: {message})", None, None, ""
            return reason, f"{full}: {message}", None, None, ""
        problem = integrity_problem(full)
        if problem is not None and problem[0] == OK:
            notes.append(f"jpeg-padding:{problem[1]}")
        elif problem is not None:
            return problem[0], f"{full}: {problem[1]}", int(w), int(h), ""
        return OK, "", int(w), int(h), ";".join(notes)


# Surrogates that are not bytes escaped by `surrogateescape` (those are U+DC80..U+DCFF).
_LONE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")

# Ids a spreadsheet rewrote in scientific notation ("1.3448E+18"): distinct ids collapse into one.
_SCIENTIFIC = re.compile(r"^[+-]?\d(\.\d+)?[eE][+-]?\d+$")


def _join_notes(*parts: str) -> str:
    return ";".join(p for p in parts if p)


def validate_rows(df: pd.DataFrame, images_dir: str, max_pixels: int, workers: int) -> pd.DataFrame:
    """Add status, detail, width, height, note, file to the frame from `read_metadata` (same rows and order)."""
    n = len(df)
    status = np.full(n, OK, dtype=object)
    detail = np.full(n, "", dtype=object)
    pending = np.ones(n, dtype=bool)  # rows still to check
    rows = df["row"].to_numpy()

    def mark(mask: np.ndarray, reason: str, details: Any) -> None:
        mask = mask & pending
        status[mask] = reason
        detail[mask] = details[mask] if isinstance(details, np.ndarray) else details
        pending[mask] = False

    read_error = df["read_error"].to_numpy(dtype=object)
    read_status = df["read_status"].to_numpy(dtype=object)
    for reason in ("invalid_utf8", "unreadable_row", "invalid_id"):
        mark(read_status == reason, reason, read_error)

    ids = df["id"].to_numpy(dtype=object)
    mark(pd.isna(ids), "missing_id", np.array([f"row {r}: the id is empty" for r in rows], dtype=object))
    # The first row with an id keeps it, whatever its own status (documented above). Ids compare as exact text,
    # up to Unicode normalisation: "café" typed on a Mac (NFD) and elsewhere (NFC) look identical in every output.
    id_series = pd.Series([_nfc(v) if isinstance(v, str) else v for v in ids], dtype=object)
    dup = id_series.duplicated(keep="first").to_numpy() & pd.notna(ids)
    if dup.any():
        first = ~dup & pd.notna(ids)
        first_row = dict(zip(id_series[first], rows[first]))
        first_id = dict(zip(id_series[first], ids[first]))

        def dup_text(v: str) -> str:
            key = _nfc(v)
            hint = (" (it looks like a number a spreadsheet rewrote in scientific notation, which merges distinct "
                    "ids: export ids as text)") if _SCIENTIFIC.match(v) else ""
            if first_id[key] != v:
                hint = (f" (written {ascii(first_id[key])} there and {ascii(v)} here: the same text in another Unicode "
                        "normalisation, NFC/NFD)")
            return f"id {v!r} already used by row {first_row[key]}{hint}"

        mark(dup, "duplicate_id", np.array([dup_text(v) if d else "" for v, d in zip(ids, dup)], dtype=object))

    rel_paths = df["path"].to_numpy(dtype=object)
    mark(pd.isna(rel_paths), "missing_path", "empty path")
    path_problem = np.array([_check_path(p) if isinstance(p, str) else None for p in rel_paths], dtype=object)
    mark(pd.notna(path_problem), "path_outside_images_dir", path_problem)

    # File names: as written, else after Unicode normalisation (in this process: each folder is listed once).
    files = np.full(n, None, dtype=object)
    name_note = np.full(n, "", dtype=object)
    names = FileNames(str(images_dir))
    folder_name = os.path.basename(os.path.normpath(str(images_dir)))
    near_match = 0
    for i in np.flatnonzero(pending):
        found, note, message = names.resolve(rel_paths[i])
        if found is None and "\\" in rel_paths[i]:
            # A table written on Windows: `sub\a.png` means sub/a.png (a file named with a backslash, legal on
            # Linux and macOS, was tried first).
            alt, alt_note, _ = names.resolve(rel_paths[i].replace("\\", "/"))
            if alt is not None:
                found, note = alt, _join_notes("path-backslashes", alt_note)
        if found is None:
            head, _, rest = rel_paths[i].replace("\\", "/").partition("/")
            if rest and head == folder_name and names.resolve(rest)[0] is not None:
                # "images/a.jpg" with images_dir ".../images": the path repeats the image folder.
                message += (f"; near match: {rest!r} exists: the path starts with the image folder's own name "
                            f"{head!r}, but paths are relative to collection.images_dir")
            near_match += "near match:" in message
            status[i], detail[i] = "missing_file", f"row {rows[i]}: path {rel_paths[i]!r}: {message}"
            pending[i] = False
        else:
            files[i], name_note[i] = found, note

    width: list[int | None] = [None] * n
    height: list[int | None] = [None] * n
    note = np.full(n, "", dtype=object)
    todo = np.flatnonzero(pending)
    checker = _ImageChecker(str(images_dir), int(max_pixels))
    results = parallel_map(checker, [files[i] for i in todo], workers, chunk_size=64, desc="ingest")
    for i, (st, det, w, h, nt) in zip(todo, results):
        status[i], detail[i], note[i] = st, det, nt
        width[i], height[i] = w, h

    # Several ok rows naming one file (`a.png`, `./a.png`, a hard link, another letter case on a case-insensitive
    # disk): all stay ok, later ones say which row has the same file.
    same_file = np.full(n, "", dtype=object)
    first_row_of: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(status == OK):
        try:
            st_ = os.stat(os.path.join(images_dir, files[i]))
        except OSError:
            continue
        key = (st_.st_dev, st_.st_ino)
        if key in first_row_of:
            same_file[i] = f"duplicate-file:row {first_row_of[key]}"
        else:
            first_row_of[key] = int(rows[i])

    read_note = df["read_note"].to_numpy(dtype=object)
    out = df.copy()
    out["status"] = status
    out["detail"] = detail
    out["width"] = pd.array(width, dtype="Int32")
    out["height"] = pd.array(height, dtype="Int32")
    out["note"] = [_join_notes(r or "", fn, im, same) if s == OK else _join_notes(r or "", fn)
                   for r, fn, im, same, s in zip(read_note, name_note, note, same_file, status)]
    out["file"] = files
    out.attrs["missing_with_near_match"] = int(near_match)
    return out


def manifest_table(df: pd.DataFrame, label_columns: list[str], extra_columns: list[str]):
    """The manifest as an Arrow table with the documented schema (docs/architecture.md)."""
    import pyarrow as pa

    def text(values: Any) -> pa.Array:
        # Lists and objects (JSON Lines cells of extra columns) as JSON text; NaN / None / NA as null.
        return pa.array([v if isinstance(v, str) else
                         json_text(v) if isinstance(v, (list, tuple, dict, np.ndarray)) else
                         (None if pd.isna(v) else str(v)) for v in values], pa.string())

    def clean(values: Any) -> list:
        # Rows with invalid UTF-8 keep their text for inspection, with bad bytes (and lone surrogates from JSON
        # \u escapes, which have no UTF-8 form) shown as U+FFFD.
        return [_LONE_SURROGATE.sub("\ufffd", v).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                if isinstance(v, str) else v for v in values]

    cols: dict[str, pa.Array] = {
        "row": pa.array(df["row"].to_numpy(np.int64)),
        "id": text(clean(df["id"])),
        "path": text(clean(df["path"])),
        "caption": text(clean(df["caption"])),
        "keywords": pa.array([clean(k) for k in df["keywords"]], pa.list_(pa.string())),
    }
    for label in label_columns:
        cols[label] = text(clean(df[label]))
    cols["status"] = text(df["status"])
    cols["detail"] = text(clean(df["detail"]))
    cols["width"] = pa.array(df["width"], pa.int32())
    cols["height"] = pa.array(df["height"], pa.int32())
    cols["note"] = text(clean(df["note"]))
    cols["file"] = text(df["file"])
    for extra in extra_columns:
        name = f"extra_{extra}" if extra in cols else extra
        cols[name] = text(clean(df[extra]))
    return pa.table(cols)


def summarise(df: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    counts = Counter(df["status"])
    n = len(df)
    skipped = n - counts.get(OK, 0)
    # Counted by code (the part before ':'), so `frame:1/12` and `frame:1/3` are both `frame`.
    notes = Counter(part.split(":", 1)[0] for note in df["note"] if note for part in note.split(";"))
    caption_missing = int(df.loc[df["status"] == OK, "caption"].isna().sum())
    keywords_missing = int((df.loc[df["status"] == OK, "keywords"].map(len) == 0).sum())
    return {
        "n_rows": n,
        "n_ok": counts.get(OK, 0),
        "n_skipped": skipped,
        "skipped_fraction": skipped / n if n else 0.0,
        "by_status": dict(sorted(counts.items())),
        "notes": dict(sorted(notes.items())),
        "missing_file_with_near_match": int(df.attrs.get("missing_with_near_match", 0)),
        "ok_without_caption": caption_missing,
        "ok_without_keywords": keywords_missing,
        **extra,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """The one line `dinoflow ingest` prints on stdout (Snakemake and `dvc repro` show it; the log holds the
    rest): rows kept and skipped per manifest status, and where to read more. E.g. "ingest: 25 rows, 24 ok,
    1 skipped (missing_file: 1); per row: data/interim/manifest.parquet (status, detail); statuses: docs/ingest.md"."""
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items() if k != OK)
    return (f"ingest: {summary['n_rows']} rows, {summary['n_ok']} ok, {summary['n_skipped']} skipped"
            f"{f' ({reasons})' if reasons else ''}; per row: {paths.MANIFEST} (status, detail); counts: "
            f"{paths.INGEST_SUMMARY}; statuses: docs/ingest.md")


def main(params: dict[str, Any], **_: Any) -> dict[str, Any]:
    import pyarrow.parquet as pq

    coll, cfg = params["collection"], params["ingest"]
    # Label columns and the group column (rows of one group never straddle a probe split) are kept in the manifest.
    label_columns = list(dict.fromkeys([*(coll.get("label_columns") or []),
                                        *([coll["group_column"]] if coll.get("group_column") else [])]))
    df = read_metadata(coll["metadata"], coll.get("columns"), coll.get("keyword_separator", ";"), label_columns)
    unknown = df.attrs.get("unknown_columns", [])
    keep_unknown = bool(cfg.get("allow_unknown_columns", False))
    if unknown:
        log.warning("ingest: %s has column(s) not in collection.columns / label_columns: %s — %s",
                    coll["metadata"], ", ".join(unknown),
                    "kept in the manifest" if keep_unknown else
                    "left out of the manifest (set ingest.allow_unknown_columns: true to keep them)")
    images_dir = coll["images_dir"]
    if not Path(images_dir).is_dir():
        raise DinoflowError(f"collection.images_dir: {images_dir} is not a directory")

    workers = resolve_workers(cfg.get("workers", 0))
    log.info("ingest: %d rows from %s, images in %s, %d worker(s)", len(df), coll["metadata"], images_dir, workers)
    if importlib.util.find_spec("simplejpeg") is None:
        log.warning("ingest: simplejpeg is not installed: JPEGs are checked with torchvision's decoder at full size "
                    "(about 10x slower; `pip install simplejpeg`, a dinoflow dependency)")
    df = validate_rows(df, images_dir, int(cfg["max_pixels"]), workers)

    table = manifest_table(df, label_columns, unknown if keep_unknown else [])
    Path(paths.MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, paths.MANIFEST)
    limit = float(cfg["max_skipped_fraction"])
    summary = summarise(df, metadata=str(coll["metadata"]), images_dir=str(images_dir), manifest=paths.MANIFEST,
                        unknown_columns=unknown, unknown_columns_kept=keep_unknown and bool(unknown),
                        max_skipped_fraction=limit)
    write_json(paths.INGEST_SUMMARY, summary)
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items() if k != OK) or "none"
    (log.warning if summary["n_skipped"] else log.info)(
        "ingest: %d ok, %d skipped (%s); notes: %s; manifest %s, summary %s", summary["n_ok"],
        summary["n_skipped"], reasons, summary["notes"] or "none", paths.MANIFEST, paths.INGEST_SUMMARY)
    if summary["missing_file_with_near_match"]:
        log.warning("ingest: %d missing file(s) have a near match on disk (letter case, spaces, another "
                    "extension): a naming problem rather than lost files? See the detail column of %s",
                    summary["missing_file_with_near_match"], paths.MANIFEST)
    print(summary_line(summary), flush=True)
    if summary["skipped_fraction"] > limit:
        raise DinoflowError(
            f"ingest: {summary['n_skipped']} of {summary['n_rows']} rows skipped "
            f"({summary['skipped_fraction']:.1%} > ingest.max_skipped_fraction = {limit:.1%}); by reason: {reasons}. "
            f"See the status and detail columns of {paths.MANIFEST}")
    return summary
