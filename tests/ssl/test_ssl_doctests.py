"""The docstring examples of the SSL blocks, pretext-task blocks and schedules run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "dinoflow.ssl.heads",
    "dinoflow.ssl.losses.dino",
    "dinoflow.ssl.losses.ibot",
    "dinoflow.ssl.losses.koleo",
    "dinoflow.ssl.masking",
    "dinoflow.ssl.augment",
    "dinoflow.train.schedules",
    *(f"dinoflow.ssl.pretext.{m}" for m in ("common", "rotation", "relative_position", "jigsaw", "context_encoder",
                                            "mae")),
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
