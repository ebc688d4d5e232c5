"""Small shared helpers: logging, seeding, device choice, JSON output."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from dinoflow.errors import DinoflowError


def get_logger(name: str = "dinoflow") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger("dinoflow").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("dinoflow")
        root.addHandler(handler)
        root.setLevel(os.environ.get("DINOFLOW_LOG_LEVEL", "INFO"))
    return logger


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same params give the same outputs on CPU."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _strict(obj: Any, where: str, path: Path) -> Any:
    """A copy of obj with numpy scalars / arrays as plain Python values; refuses NaN and infinity.

    `where` is the key path so far (`fields.caption.spearman`, `items[3]`), named in the error.
    """
    if isinstance(obj, dict):
        return {k: _strict(v, f"{where}.{k}" if where else str(k), path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, f"{where}[{i}]", path) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist(), where, path)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not np.isfinite(value):
            raise DinoflowError(f"{path}: refusing to write {value} at key {where or '<top level>'} (strict JSON "
                                "has no NaN/Infinity: the writer must give null and a reason instead)")
        return value
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write obj as strict JSON (indented, sorted keys), atomically.

    numpy scalars and arrays become plain numbers / lists; other unknown objects (paths) their str(). Raises
    DinoflowError naming the file and the key path when a value is NaN or infinite: every JSON the project writes
    must parse with strict parsers (jq, JavaScript), so undefined statistics are null with a stated reason.
    """
    path = Path(path)
    clean = _strict(obj, "", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(clean, fh, indent=2, sort_keys=True, default=str, allow_nan=False)
        fh.write("\n")
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
