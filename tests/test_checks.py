"""dinoflow.checks: counts of non-finite values / rows, zero rows and out-of-range indices, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.checks import require_finite, require_index_range, require_nonzero_rows
from dinoflow.errors import DinoflowError


def test_finite_arrays_and_integers_pass():
    require_finite(np.random.default_rng(0).normal(size=(5, 3)), "x")
    require_finite(np.arange(4), "ints")  # integers cannot be non-finite
    require_finite(torch.ones(3, dtype=torch.bfloat16), "t")
    require_finite({"a": torch.zeros(2), "n": torch.tensor(3)}, "sd")
    require_finite(np.zeros((0, 4)), "empty")


@pytest.mark.parametrize("kind", ["numpy", "torch32", "torch_bf16"])
def test_counts_of_nan_inf_and_rows(kind):
    x = np.zeros((6, 4), dtype=np.float32)
    x[1, 0] = x[1, 3] = np.nan
    x[4, 2] = np.inf
    x[5, 1] = -np.inf
    ref_values, ref_rows = int((~np.isfinite(x)).sum()), int((~np.isfinite(x)).any(axis=1).sum())  # brute force
    assert (ref_values, ref_rows) == (4, 3)
    arr = {"numpy": x, "torch32": torch.from_numpy(x), "torch_bf16": torch.from_numpy(x).to(torch.bfloat16)}[kind]
    with pytest.raises(DinoflowError, match=r"^emb\.parquet: column 'cls': 4 of 24 values are not finite "
                                            r"\(2 NaN, 2 infinite\), in 3 of 6 rows; re-run$"):
        require_finite(arr, "emb.parquet: column 'cls'", "re-run")


def test_state_dict_names_every_bad_tensor():
    sd = {"blocks.0.attn.qkv.weight": torch.randn(12, 4), "norm.weight": torch.ones(4),
          "pos_embed": torch.randn(1, 5, 4), "steps": torch.tensor(7)}
    sd["blocks.0.attn.qkv.weight"].view(-1)[:5] = float("nan")
    sd["pos_embed"][0, 0, 0] = float("inf")
    with pytest.raises(DinoflowError) as err:
        require_finite(sd, "model m: w.pth")
    msg = str(err.value)
    assert msg.startswith("model m: w.pth: 2 of 4 tensors hold non-finite values")
    assert "'blocks.0.attn.qkv.weight': 5 of 48 values are not finite (5 NaN, 0 infinite)" in msg
    assert "'pos_embed': 1 of 20 values are not finite (0 NaN, 1 infinite)" in msg
    assert "norm.weight" not in msg


def test_large_matrix_is_checked_in_blocks(monkeypatch):
    import dinoflow.checks as C

    monkeypatch.setattr(C, "BLOCK_ELEMENTS", 8)  # 2 rows of 4 per block: counts must add up across blocks
    x = np.ones((9, 4))
    x[[0, 3, 8], 1] = np.nan
    x[3, 2] = -np.inf
    x[5] = 0
    with pytest.raises(DinoflowError, match=r"4 of 36 values .*\(3 NaN, 1 infinite\), in 3 of 9 rows"):
        require_finite(x, "x")
    with pytest.raises(DinoflowError, match=r"1 of 9 rows are all zero .*\[5\]"):
        require_nonzero_rows(np.nan_to_num(x), "x")
    require_finite(np.zeros((0, 4, 2)), "empty")


def test_zero_rows_and_index_range():
    x = np.ones((5, 3))
    x[[1, 3]] = 0
    with pytest.raises(DinoflowError, match=r"v: 2 of 5 rows are all zero .*first rows \[1, 3\]"):
        require_nonzero_rows(x, "v")
    require_nonzero_rows(np.eye(3), "v")
    idx = np.array([[0, 1, -1], [2, 5, 1]])
    require_index_range(idx[:, :1], 3, "i")
    with pytest.raises(DinoflowError, match=r"i: 2 of 6 indices are outside \[0, 3\) \(min -1, max 5\)"):
        require_index_range(idx, 3, "i")
    with pytest.raises(DinoflowError, match=r"1 of 6 indices .*\(min 5, max 5\)"):
        require_index_range(idx, 3, "i", missing=-1)  # -1: a FAISS miss, allowed
    with pytest.raises(DinoflowError, match="integers"):
        require_index_range(np.array([0.5]), 3, "i")
