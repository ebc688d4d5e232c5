"""dinoflow.utils.write_json: strict JSON only (no NaN / Infinity tokens), errors name the file and key path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinoflow.errors import DinoflowError
from dinoflow.utils import write_json


def test_numpy_values_become_plain_json(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": np.float32(0.5), "b": np.int64(3), "c": np.array([1.0, 2.0]), "d": np.bool_(True),
                      "e": None, "f": tmp_path})
    text = path.read_text()
    out = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))
    assert out == {"a": 0.5, "b": 3, "c": [1.0, 2.0], "d": True, "e": None, "f": str(tmp_path)}


@pytest.mark.parametrize("bad", [float("nan"), np.float32("inf"), -np.inf])
def test_nan_and_infinity_are_refused_with_file_and_key_path(tmp_path, bad):
    path = tmp_path / "align.json"
    with pytest.raises(DinoflowError, match=r"align\.json.*fields\.caption\.ci\[1\]"):
        write_json(path, {"fields": {"caption": {"ci": [0.1, bad]}}})
    assert not path.exists()  # nothing half-written


def test_existing_file_is_kept_when_the_new_content_is_refused(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(DinoflowError, match="<top level>"):
        write_json(path, float("nan"))
    assert json.loads(path.read_text()) == {"v": 1}
