"""`dinoflow demo-collection`: a real captioned collection built from two pinned npm packages, no hub needed.

- images: `@lobehub/fluent-emoji-3d@1.1.0` (MIT): 3,391 files `assets/<code points>.webp`, 256×256 WebP with
  alpha, composited on white and written as PNG (lossless; ~29 KB each);
- text: `emojibase-data@17.0.0` `en/data.json`: the English label is the caption, the tags are the keywords
  (skin-tone variants inherit their base emoji's tags), group and subgroup (names from `meta/groups.json`) are
  label columns; `family` (the code points without skin-tone modifiers U+1F3FB-U+1F3FF) names the base emoji of
  each skin-tone variant and is the demo's `collection.group_column` (1,816 images are in 304 families of two or
  more variants: they must not straddle a probe's train/test split).

The join is on code points with U+FE0F (emoji presentation selector) and U+E007F (tag terminator) left out,
because the image file names drop them inconsistently (`a9-fe0f.webp`, `1f441-200d-1f5e8.webp`). 16 emoji have
two files (e.g. `00a9-fe0f` and `a9-fe0f`); the one named like emojibase's hexcode is kept, so the collection has
3,375 images, one per emoji. Rows are in emojibase order (Unicode's), so `demo.limit: N` keeps the first N.

The tarballs are fetched with `npm pack` into `<out_dir>/../.npm-cache` and checked against the sha256 and the
npm integrity (sha512) pinned below; both are recorded in `<out_dir>/SOURCES.json`. The collection is rebuilt
only when it is missing or was built from other packages / another limit.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from dinoflow.data.preprocess import parallel_map, resolve_workers
from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger, read_json, write_json

log = get_logger("dinoflow.demo")

# Checksums of the tarballs `npm pack` fetched for the pinned versions (sha256 of the .tgz; `integrity` as the
# npm registry publishes it). A mismatch means the registry served different bytes: we refuse to build.
PINNED: dict[str, dict[str, str]] = {
    "@lobehub/fluent-emoji-3d@1.1.0": {
        "sha256": "c1bb7eee7de090205a232518a9ab4adb3df458bfbe8a1f78232991194c8b2e58",
        "integrity": "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
    },
    "emojibase-data@17.0.0": {
        "sha256": "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a",
        "integrity": "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    },
}
IGNORED_CODE_POINTS = {0xFE0F, 0xE007F}
BACKGROUND = (255, 255, 255, 255)
SOURCES = "SOURCES.json"
METADATA = "metadata.csv"
METADATA_COLUMNS = ("id", "path", "caption", "keywords", "group", "subgroup", "family")


# ----------------------------------------------------------------------------------------------------------
# Fetching


def tarball_name(spec: str) -> str:
    """The file name `npm pack <spec>` writes: `@scope/name@1.2.3` → `scope-name-1.2.3.tgz`."""
    name, _, version = spec.rpartition("@")
    if not name or not version:
        raise DinoflowError(f"demo: package spec {spec!r} must be name@version (a pinned version)")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def checksums(path: Path) -> dict[str, str]:
    sha256, sha512 = hashlib.sha256(), hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha256.update(block)
            sha512.update(block)
    return {"sha256": sha256.hexdigest(), "integrity": "sha512-" + base64.b64encode(sha512.digest()).decode()}


def npm_pack(spec: str, cache_dir: Path, timeout: int = 600) -> Path:
    """The tarball of `spec` in `cache_dir`, fetched with `npm pack` unless already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / tarball_name(spec)
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DinoflowError("demo: `npm` not found; install Node.js (npm) to build the demo collection, or "
                            f"put {target.name} in {cache_dir}")
    log.info("demo: npm pack %s → %s", spec, cache_dir)
    try:
        proc = subprocess.run([npm, "pack", spec, "--json", "--pack-destination", str(cache_dir.resolve())],
                              cwd=cache_dir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DinoflowError(f"demo: `npm pack {spec}` took more than {timeout} s (is the npm registry reachable?)") \
            from exc
    if proc.returncode != 0 or not target.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DinoflowError(f"demo: `npm pack {spec}` failed (exit {proc.returncode}): " + " | ".join(tail))
    return target


def verify(spec: str, path: Path) -> dict[str, str]:
    """Checksums of the tarball; a mismatch with PINNED is an error (the file is removed so a rerun re-fetches)."""
    sums = checksums(path)
    pinned = PINNED.get(spec)
    if pinned is None:
        log.warning("demo: %s is not one of the pinned packages; recording its checksums without checking them",
                    spec)
    elif sums != pinned:
        path.unlink()
        raise DinoflowError(f"demo: {path.name} for {spec} has sha256 {sums['sha256']}, expected "
                            f"{pinned['sha256']} (pinned in dinoflow/data/demo.py); the download was removed")
    return sums


# ----------------------------------------------------------------------------------------------------------
# The join


def code_points(hexcode: str) -> tuple[int, ...]:
    """`1F441-FE0F-200D-1F5E8-FE0F` or `1f3f4-e0067_e0062` → code points, without FE0F / E007F."""
    parts = [p for p in re.split(r"[-_\s]+", hexcode.strip()) if p]
    try:
        points = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"not a code-point sequence: {hexcode!r}") from None
    return tuple(p for p in points if p not in IGNORED_CODE_POINTS)


SKIN_TONES = range(0x1F3FB, 0x1F400)  # U+1F3FB..U+1F3FF, Fitzpatrick skin-tone modifiers


def family(hexcode: str) -> str:
    """The base emoji of a skin-tone variant: its code points without skin-tone modifiers (and without FE0F /
    E007F, as `code_points`), lower-case hex joined by '-'. All variants of one emoji share it; it is the demo's
    `collection.group_column`, so probes never split a family between train and test."""
    return "-".join(f"{p:x}" for p in code_points(hexcode) if p not in SKIN_TONES)


def _member_json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        member = tar.getmember(name)
    except KeyError:
        return None
    return json.load(tar.extractfile(member))


def load_emojibase(tgz: Path) -> dict[tuple[int, ...], dict[str, Any]]:
    """Code points → {hexcode, caption, keywords, group, subgroup, order} for every emoji and skin variant."""
    with tarfile.open(tgz, "r:gz") as tar:
        data = _member_json(tar, "package/en/data.json")
        if data is None:
            raise DinoflowError(f"{tgz}: no package/en/data.json (is it emojibase-data?)")
        groups_meta = _member_json(tar, "package/meta/groups.json") or {}
        messages = _member_json(tar, "package/en/messages.json") or {}
    group_names = {int(k): v for k, v in (groups_meta.get("groups") or {}).items()}
    subgroup_names = {int(k): v for k, v in (groups_meta.get("subgroups") or {}).items()}
    # Fallback: en/messages.json lists the same slugs as `key`, indexed by `order`.
    for table, key in ((group_names, "groups"), (subgroup_names, "subgroups")):
        for item in messages.get(key, []):
            table.setdefault(int(item["order"]), item["key"])

    def name(table: dict[int, str], number: Any) -> str | None:
        return None if number is None else table.get(int(number), str(number))

    entries: dict[tuple[int, ...], dict[str, Any]] = {}
    for emoji in data:
        tags = list(emoji.get("tags") or [])
        for variant in [emoji, *(emoji.get("skins") or [])]:
            record = {
                "hexcode": variant["hexcode"],
                "caption": variant.get("label"),
                "keywords": list(variant.get("tags") or tags),
                "group": name(group_names, variant.get("group", emoji.get("group"))),
                "subgroup": name(subgroup_names, variant.get("subgroup", emoji.get("subgroup"))),
                "order": variant.get("order", emoji.get("order")),
            }
            entries.setdefault(code_points(variant["hexcode"]), record)
    return entries


def emoji_files(tgz: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tgz, "r:gz") as tar:
        return {Path(m.name).stem: m for m in tar.getmembers()
                if m.isfile() and m.name.startswith("package/assets/") and m.name.endswith(".webp")}


def join(file_stems: list[str], entries: dict[tuple[int, ...], dict[str, Any]]) -> tuple[list[dict], dict]:
    """Match image files to emojibase records. Returns (rows in emojibase order, counts)."""
    matched: dict[tuple[int, ...], str] = {}
    unmatched: list[str] = []
    duplicates = 0
    for stem in sorted(file_stems):
        try:
            key = code_points(stem)
        except ValueError:
            unmatched.append(stem)
            continue
        if key not in entries:
            unmatched.append(stem)
            continue
        if key in matched:
            duplicates += 1
            # Two files for one emoji: keep the one spelled like emojibase's hexcode.
            if stem == entries[key]["hexcode"].lower():
                matched[key] = stem
            continue
        matched[key] = stem
    rows = []
    for key, stem in matched.items():
        e = entries[key]
        rows.append({"id": e["hexcode"].lower(), "file": stem, "caption": e["caption"],
                     "keywords": ";".join(e["keywords"]), "group": e["group"], "subgroup": e["subgroup"],
                     "family": family(e["hexcode"]), "order": e["order"]})
    rows.sort(key=lambda r: (r["order"] is None, r["order"] if r["order"] is not None else 0, r["id"]))
    counts = {"files": len(file_stems), "matched": len(rows), "unmatched_files": len(unmatched),
              "duplicate_files": duplicates, "emojibase_without_image": len(entries) - len(rows)}
    if unmatched:
        counts["unmatched_examples"] = unmatched[:20]
    return rows, counts


def composite_on_white(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")


def _write_composites(chunk: list[tuple[str, bytes]]) -> list[bool]:
    """Pool worker: composite each WebP on white and save it as PNG at the given path."""
    for path, data in chunk:
        composite_on_white(data).save(path, optimize=False)
    return [True] * len(chunk)


def build(emoji_tgz: Path, emojibase_tgz: Path, out_dir: Path, limit: int | None = None,
          workers: int = 0) -> dict[str, Any]:
    """Write out_dir/images/<id>.png and out_dir/metadata.csv from the two tarballs; returns the counts.
    workers: processes compositing the images (0 = all cores)."""
    entries = load_emojibase(emojibase_tgz)
    members = emoji_files(emoji_tgz)
    if not members:
        raise DinoflowError(f"{emoji_tgz}: no package/assets/*.webp (is it @lobehub/fluent-emoji-3d?)")
    rows, counts = join(list(members), entries)
    if limit is not None:
        rows = rows[:int(limit)]
    log.info("demo: %d image files, %d matched to emojibase, %d unmatched, %d duplicate files dropped, "
             "%d emojibase entries without an image; writing %d", counts["files"], counts["matched"],
             counts["unmatched_files"], counts["duplicate_files"], counts["emojibase_without_image"], len(rows))

    images = out_dir / "images"
    tmp = out_dir / "images.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = {r["file"]: r for r in rows}
    jobs: list[tuple[str, bytes]] = []
    with tarfile.open(emoji_tgz, "r:gz") as tar:
        # One sequential pass over the gzip stream (random access into a .tgz would re-read it each time);
        # the WebP files are small (~8 KB), so all of them fit in memory for the pool.
        for member in tar:
            row = wanted.get(Path(member.name).stem) if member.name.startswith("package/assets/") else None
            if row is not None and member.isfile():
                jobs.append((str(tmp / f"{row['id']}.png"), tar.extractfile(member).read()))
    for done in parallel_map(_write_composites, jobs, resolve_workers(workers), chunk_size=64,
                             desc="demo images", unit="file"):
        assert done
    shutil.rmtree(images, ignore_errors=True)
    tmp.rename(images)
    table = pd.DataFrame([{"id": r["id"], "path": f"{r['id']}.png", "caption": r["caption"],
                           "keywords": r["keywords"], "group": r["group"], "subgroup": r["subgroup"],
                           "family": r["family"]} for r in rows], columns=list(METADATA_COLUMNS))
    table.to_csv(out_dir / METADATA, index=False)
    counts["written"] = len(rows)
    return counts


def main(params: dict[str, Any], **_: Any) -> dict[str, Any] | None:
    cfg = params["demo"]
    if not cfg.get("enabled", True):
        log.info("demo: demo.enabled is false, nothing to build")
        return None
    out_dir = Path(cfg["out_dir"])
    specs = {"emoji": cfg["emoji_package"], "emojibase": cfg["emojibase_package"]}
    limit = cfg.get("limit")
    sources_path = out_dir / SOURCES
    if sources_path.exists() and (out_dir / METADATA).exists() and (out_dir / "images").is_dir():
        recorded = read_json(sources_path)
        if recorded.get("packages", {}).get("emoji", {}).get("spec") == specs["emoji"] and \
                recorded.get("packages", {}).get("emojibase", {}).get("spec") == specs["emojibase"] and \
                recorded.get("limit") == limit and \
                tuple(pd.read_csv(out_dir / METADATA, nrows=0).columns) == METADATA_COLUMNS:
            log.info("demo: %s already built from %s and %s (limit %s); nothing to do", out_dir, specs["emoji"],
                     specs["emojibase"], limit)
            return recorded
    cache_dir = out_dir.parent / ".npm-cache"
    packages = {}
    for role, spec in specs.items():
        tgz = npm_pack(spec, cache_dir)
        packages[role] = {"spec": spec, "tarball": str(tgz), **verify(spec, tgz)}
    out_dir.mkdir(parents=True, exist_ok=True)
    # All cores: the demo is built once, and a workers key here would be one more parameter for DVC to track.
    counts = build(Path(packages["emoji"]["tarball"]), Path(packages["emojibase"]["tarball"]), out_dir, limit)
    record = {"packages": packages, "limit": limit, "counts": counts,
              "licenses": {"emoji": "MIT (@lobehub/fluent-emoji-3d, Microsoft Fluent Emoji)",
                           "emojibase": "MIT (emojibase-data)"}}
    write_json(sources_path, record)
    log.info("demo: wrote %d images to %s and %s; sources in %s", counts["written"], out_dir / "images",
             out_dir / METADATA, sources_path)
    return record
