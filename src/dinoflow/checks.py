"""Checks of the numbers that flow between stages: nothing non-finite, degenerate or out of range goes downstream.

`require_finite` is THE non-finite check: weights when they are loaded (every pretrained format, dinoflow's own
safetensors) and saved, embeddings when written and read (`evaluate.vectors`), neighbour scores. Each failure is a
`DinoflowError` that names what was checked (model, file, tensor or column, given by the caller in `what`) and how
many values / rows are bad, so a diverged checkpoint stops the stage that meets it instead of turning into NaN
embeddings, NaN neighbour scores or a scikit-learn traceback three stages later.

`require_nonzero_rows` (a zero vector has no direction: its cosine similarity is 0/0) and `require_index_range`
(neighbour indices must point at a row) cover the other invalid values a stage could emit.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np

from dinoflow.errors import DinoflowError

MAX_LISTED = 10  # tensors named in one error message
BLOCK_ELEMENTS = 1 << 22  # values checked at a time in a NumPy array (bounded temporary memory)


def _counts(values: Any) -> tuple[int, int, int, int, int] | None:
    """(n_values, n_nan, n_inf, n_bad_rows, n_rows) of a float array / tensor; None for a non-float one.

    Rows are the first axis of a 2-D or higher array (n_bad_rows = rows with any non-finite value); a 0-/1-D
    array has no rows (both 0)."""
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it (seconds) for NumPy
    if torch is not None and isinstance(values, torch.Tensor):
        if not (values.is_floating_point() or values.is_complex()):
            return None
        t = values.detach()
        nan = torch.isnan(t)
        bad = ~torch.isfinite(t)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return t.numel(), 0, 0, 0, (t.shape[0] if t.ndim >= 2 else 0)
        rows = (int(bad.reshape(t.shape[0], -1).any(dim=1).sum()), t.shape[0]) if t.ndim >= 2 else (0, 0)
        n_nan = int(nan.sum())
        return t.numel(), n_nan, n_bad - n_nan, *rows
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)):
        return None
    # Row blocks of about BLOCK_ELEMENTS values: the boolean temporaries of a 1M x 384 matrix would be 384 MB.
    rows2 = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:]))) if arr.ndim >= 2 else arr.reshape(1, arr.size)
    step = max(1, BLOCK_ELEMENTS // max(1, rows2.shape[1]))
    n_nan = n_inf = bad_rows = 0
    for start in range(0, rows2.shape[0], step):
        block = rows2[start:start + step]
        bad = ~np.isfinite(block)
        if bad.any():
            nan = int(np.isnan(block).sum())
            n_nan, n_inf = n_nan + nan, n_inf + int(bad.sum()) - nan
            bad_rows += int(bad.any(axis=1).sum())
    return arr.size, n_nan, n_inf, (bad_rows if arr.ndim >= 2 else 0), (arr.shape[0] if arr.ndim >= 2 else 0)


def _describe(counts: tuple[int, int, int, int, int]) -> str:
    size, n_nan, n_inf, bad_rows, rows = counts
    text = f"{n_nan + n_inf} of {size} values are not finite ({n_nan} NaN, {n_inf} infinite)"
    if rows:
        text += f", in {bad_rows} of {rows} rows"
    return text


def require_finite(values: Any, what: str, hint: str = "") -> None:
    """Raise a `DinoflowError` unless every value is finite (no NaN, no +-inf).

    values: a NumPy array, a torch tensor (any device, any float dtype incl. bf16), or a mapping name -> array /
    tensor (a state dict: every entry is checked and all bad entries are named, up to `MAX_LISTED`). Integer and
    boolean arrays are finite by construction and pass.
    what: names the thing checked, e.g. "model scratch: models/scratch/weights.safetensors" or
    "embeddings/m.parquet: column 'cls' (model m)"; the message is "<what>: <counts>[; <hint>]".
    Raises: DinoflowError with the count of bad values (NaN / infinite) and, for a 2-D+ array, of bad rows.
    """
    suffix = f"; {hint}" if hint else ""
    if isinstance(values, Mapping):
        bad = []
        for name, tensor in values.items():
            counts = _counts(tensor)
            if counts is not None and counts[1] + counts[2]:
                bad.append(f"{name!r}: {_describe(counts)}")
        if bad:
            listed = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED
                                                   else "")
            raise DinoflowError(f"{what}: {len(bad)} of {len(values)} tensors hold non-finite values: "
                                f"{listed}{suffix}")
        return
    counts = _counts(values)
    if counts is not None and counts[1] + counts[2]:
        raise DinoflowError(f"{what}: {_describe(counts)}{suffix}")


def require_nonzero_rows(x: np.ndarray, what: str, hint: str = "") -> None:
    """Raise a `DinoflowError` when a row of the 2-D array `x` is all zero (no direction: cosine undefined).

    Raises: DinoflowError naming how many rows (and the first few row positions) are zero.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        return
    step = max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
    zero = np.concatenate([~np.any(x[s:s + step] != 0, axis=1) for s in range(0, x.shape[0], step)])
    n = int(zero.sum())
    if n:
        first = np.flatnonzero(zero)[:5].tolist()
        raise DinoflowError(f"{what}: {n} of {x.shape[0]} rows are all zero (cosine similarity undefined; "
                            f"first rows {first}){'; ' + hint if hint else ''}")


def require_index_range(idx: np.ndarray, n: int, what: str, missing: int | None = None) -> None:
    """Raise a `DinoflowError` unless every entry of the integer array `idx` is in [0, n) (or equals `missing`,
    the marker of an absent hit, e.g. FAISS's -1).

    Raises: DinoflowError with the number of out-of-range entries and the offending range.
    """
    idx = np.asarray(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise DinoflowError(f"{what}: indices have dtype {idx.dtype}, expected integers")
    bad = (idx < 0) | (idx >= n)
    if missing is not None:
        bad &= idx != missing
    n_bad = int(bad.sum())
    if n_bad:
        vals = idx[bad]
        raise DinoflowError(f"{what}: {n_bad} of {idx.size} indices are outside [0, {n}) "
                            f"(min {int(vals.min())}, max {int(vals.max())})")
