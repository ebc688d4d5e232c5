"""The method seam: views and batches, seeded datasets, typed method configs, backbone checks, registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.ssl.methods import base
from dinoflow.ssl.methods.base import (MethodSetup, SSLMethod, TwoViews, ViewDataset, ViewSettings, Views,
                                       collate_views, parse_config)


class _Rotations:
    """A pretext-style view maker: one crop rotated by a random multiple of 90 degrees, label = the multiple."""

    def __call__(self, image, rng):
        x = base.to_uint8_rgb(image).float() / 255
        k = int(torch.randint(0, 4, (), generator=rng))
        return Views([torch.rot90(x, k, dims=(1, 2))], {"rotation": k, "box": torch.tensor([0.0, 1.0])})


class _Toy(SSLMethod):
    name = "toy_for_tests"
    supports = frozenset({"vit"})

    @dataclass
    class Config:
        proj_dim: int = 8
        temperature: float = 0.5
        crop_scale: tuple[float, float] = (0.2, 1.0)
        note: str | None = None

        def validate(self, name):
            if self.temperature <= 0:
                raise DinoflowError(f"methods.{name}.temperature: must be > 0")


def _images(n=4, size=20):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def test_view_dataset_is_seeded_per_sample_and_collates_targets():
    ds = ViewDataset(_images(), _Rotations(), seed=3)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0].crops[0], b[0].crops[0]) and a[0].targets["rotation"] == b[0].targets["rotation"]
    labels = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        labels |= {ds[i][0].targets["rotation"] for i in range(4)}
    assert len(labels) > 1  # the label changes with (epoch, image)
    batch = collate_views([ds[i] for i in range(4)])
    assert batch.views[0].shape == (4, 3, 20, 20)
    assert batch.targets["rotation"].dtype == torch.long and batch.targets["rotation"].shape == (4,)
    assert batch.targets["box"].shape == (4, 2) and batch.indices.tolist() == [0, 1, 2, 3]


def test_two_views_and_global_rng_untouched():
    views = TwoViews(ViewSettings(global_crop_size=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    ds = ViewDataset(_images(), views, seed=0)
    state = torch.get_rng_state()
    batch = collate_views([ds[i] for i in range(3)])
    assert torch.equal(state, torch.get_rng_state())
    assert len(batch.views) == 2 and batch.views[1].shape == (3, 3, 16, 16)
    assert not torch.equal(batch.views[0], batch.views[1])


def test_collate_refuses_mismatched_samples():
    a = (Views([torch.zeros(3, 4, 4)], {"k": 1}), 0)
    with pytest.raises(DinoflowError, match="image 1"):
        collate_views([a, (Views([torch.zeros(3, 4, 4)], {}), 1)])
    with pytest.raises(DinoflowError, match="one size"):
        collate_views([a, (Views([torch.zeros(3, 5, 5)], {"k": 1}), 1)])


def test_parse_config_defaults_types_and_errors():
    cfg = parse_config(_Toy, {"temperature": 1, "crop_scale": [0.1, 0.5]})
    assert cfg.proj_dim == 8 and cfg.temperature == 1.0 and isinstance(cfg.temperature, float)
    assert cfg.crop_scale == (0.1, 0.5)
    with pytest.raises(DinoflowError, match=r"methods.toy_for_tests: unknown key\(s\) tau"):
        parse_config(_Toy, {"tau": 1})
    with pytest.raises(DinoflowError, match=r"methods.toy_for_tests.proj_dim"):
        parse_config(_Toy, {"proj_dim": "8"})
    with pytest.raises(DinoflowError, match=r"methods.toy_for_tests.temperature: must be > 0"):
        parse_config(_Toy, {"temperature": -1.0})


def test_backbone_support_is_checked_with_a_clear_message():
    cnn = Encoder("resnet10t", 32)
    with pytest.raises(DinoflowError, match="toy_for_tests.*needs a VIT backbone; resnet10t is a CNN"):
        _Toy(cnn, parse_config(_Toy, {}), MethodSetup())


def test_registry_names_and_unknown_method():
    base.register(_Toy)
    assert "toy_for_tests" in base.available_methods()
    assert base.get_method("toy_for_tests") is _Toy
    with pytest.raises(DinoflowError, match="not a registered method"):
        base.get_method("no_such_method")
