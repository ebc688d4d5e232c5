"""The docstring examples of the pretext-task blocks run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [f"dinoflow.ssl.pretext.{m}" for m in
           ("common", "rotation", "relative_position", "jigsaw", "context_encoder", "mae")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
