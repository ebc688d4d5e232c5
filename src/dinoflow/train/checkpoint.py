"""Resumable training state: one `torch.save` file written atomically, loaded with `weights_only=True`.

The state holds everything the next step depends on (student, teacher, heads, optimizer, loss centres, step,
epoch, the RNG states of torch / NumPy / Python); the data order is a pure function of (seed, epoch), so the
step number is enough to restart inside an epoch. The final DINO backbone goes to safetensors through
`dinoflow.models.factory.save_encoder`, not here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoflow.errors import DinoflowError
from dinoflow.utils import get_logger

log = get_logger(__name__)


def rng_states() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), NumPy and Python as tensors / plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a crash while saving leaves the previous state intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and how to start over
        raise DinoflowError(f"{path}: cannot read the training state ({exc}); delete it to train from the start") \
            from exc
