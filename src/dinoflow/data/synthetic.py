"""A tiny generated collection with planted structure, for tests and quick checks (no network needed).

Each image is a coloured shape on a light background; the caption and keywords name the colour and shape,
and `shape` / `color` are label columns. An embedding that sees colour and shape therefore aligns with the
text, while random embeddings do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(size / 2 + rng.uniform(-0.1, 0.1) * size) for _ in range(2))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    return img


def make_tiny_collection(root: str | Path, n: int = 24, size: int = 64, seed: int = 0,
                         missing_text_every: int = 0) -> dict[str, str]:
    """Write `n` images to root/images and root/metadata.csv. Returns the collection params section.

    missing_text_every: when > 0, every k-th row gets no caption and no keywords (as in real archives).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        img = _draw(shape, COLORS[color], size, rng)
        rel = f"{i:05d}_{color}_{shape}.png"
        img.save(root / "images" / rel)
        no_text = missing_text_every > 0 and i % missing_text_every == missing_text_every - 1
        rows.append({
            "id": f"img{i:05d}",
            "path": rel,
            "caption": None if no_text else f"a {color} {shape}",
            "keywords": None if no_text else f"{color};{shape};shape",
            "shape": shape,
            "color": color,
        })
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return {
        "name": "tiny",
        "images_dir": str(root / "images"),
        "metadata": str(root / "metadata.csv"),
        "columns": {"id": "id", "path": "path", "caption": "caption", "keywords": "keywords"},
        "label_columns": ["shape", "color"],
        "keyword_separator": ";",
    }
