"""docs/methods.md's worked example is a working method: its code registers, validates its section and trains."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path

import yaml

from dinoflow.config import validate_params
from dinoflow.ssl.methods import base
from method_helpers import tiny_engine, tiny_images

DOC = Path(__file__).resolve().parents[3] / "docs" / "methods.md"


def test_worked_example_registers_and_trains(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("dinoflow_doc_example_hypersphere")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own documentation
    namespace = module.__dict__
    try:
        assert base.get_method("hypersphere") is namespace["Hypersphere"]
        snippet = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
        params = yaml.safe_load((DOC.parents[1] / "params.yaml").read_text())
        params["models"] += snippet["models"]
        params["methods"].update(snippet["methods"])
        validate_params(params)
        engine = tiny_engine("hypersphere", "cnn", tiny_images(tmp_path, n=16),
                             section={"hidden_dim": 32, "out_dim": 16})
        losses = [v["loss/total"] for _, v in engine.steps()]
        assert len(losses) == 4 and all(map(math.isfinite, losses))
    finally:
        base._REGISTRY.pop("hypersphere", None)
