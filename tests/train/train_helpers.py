"""Shared set-up of the training tests: tiny params, in-memory images, and the steps the DDP test runs per process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from PIL import Image

from dinoflow.data.synthetic import make_tiny_collection

REPO = Path(__file__).resolve().parents[2]


def _tiny_params():
    """tests/conftest.py's `tiny_params`, loaded by path (a plain `import conftest` is ambiguous)."""
    spec = importlib.util.spec_from_file_location("dinoflow_tests_root_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_params


def make_env(root: Path) -> tuple[dict, list]:
    """(params, images) for a workspace at root/ws (made the caller's cwd by the tests).

    Models added to the default list: `base` (seeded random ViT saved as is) and `vit_ft` (fine-tune of `base`,
    last block trainable), so the fine-tune path is tested on the tiny ViT too. The scratch lr is a written
    best.json, as the lr search would leave it.
    """
    collection = make_tiny_collection(root / "collection", n=24, size=64)
    params = _tiny_params()(collection)
    params["models"].insert(0, {"name": "base", "init": "random", "method": "none", "trainable": "none"})
    params["models"].append({"name": "vit_ft", "init": "base", "method": "dinov2", "trainable": "last1"})
    images = [Image.open(p).convert("RGB") for p in sorted(Path(collection["images_dir"]).glob("*.png"))]
    ws = root / "ws"
    (ws / "models" / "lr_search").mkdir(parents=True, exist_ok=True)
    (ws / "models" / "lr_search" / "best.json").write_text(json.dumps({"lr": 0.0005}))
    return params, images


def scratch_engine(params: dict, images: list, ctx=None, model: str = "scratch"):
    """The engine of `model` (DINOv2) as `dinoflow train` builds it, with Xavier-initialised ViT weights.

    timm's ViT init (std 0.02) maps every image to almost the same CLS token (distances ~1e-6), where KoLeo's
    -log(distance) turns float rounding (which differs between batch sizes) into % differences. Xavier weights let
    the image content reach the CLS token, so comparisons test the algorithm.
    """
    from dinoflow.models.factory import create_encoder
    from dinoflow.train.engine import make_engine
    from dinoflow.train.run import run_spec
    from dinoflow.utils import seed_everything

    seed_everything(params["seed"])
    encoder, _ = create_encoder(params, model)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.xavier_uniform_(m.weight)
    return make_engine(run_spec(params, model), encoder, images, ctx)


def run_steps(params: dict, images: list, n_steps: int, ctx=None) -> dict:
    """Build the scratch engine and run its first `n_steps` steps over the real data path (``run_ddp`` passes ctx)."""
    engine = scratch_engine(params, images, ctx)
    values = [v for _, v in engine.steps(0, n_steps)]
    m = engine.method
    return {"values": values,
            "teacher": {k: v.clone() for k, v in {**{f"backbone.{k}": v for k, v in m.teacher_backbone.state_dict().items()},
                                                  **{f"head.{k}": v for k, v in m.teacher_head.state_dict().items()}}.items()},
            "student": {k: v.clone() for k, v in {**{f"backbone.{k}": v for k, v in m.backbone.state_dict().items()},
                                                  **{f"head.{k}": v for k, v in m.head.state_dict().items()}}.items()}}
