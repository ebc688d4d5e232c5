"""Drift of a trained model: per-image cosine initial vs final embeddings, median and bootstrap interval."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.train import drift


def _images(n: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _vit() -> Encoder:
    torch.manual_seed(0)
    return Encoder("vit_small_patch14_dinov2", 28, {"embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 0.0})


def test_paired_cosine_against_the_formula_and_degenerate_rows():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    want = [float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(drift.paired_cosine(a, b), want, rtol=1e-12)
    a[0] = 0.0  # a zero embedding has no direction: cosine 0, not NaN
    assert drift.paired_cosine(a, b)[0] == 0.0
    np.testing.assert_allclose(drift.paired_cosine(b, b), np.ones(5), rtol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        drift.paired_cosine(a, b[:3])


def test_median_ci_known_answers():
    median, (lo, hi) = drift.median_ci(np.full(50, 0.7), seed=0)  # constant: a zero-width interval
    assert median == lo == hi == 0.7
    values = np.random.default_rng(2).normal(size=400)
    median, (lo, hi) = drift.median_ci(values, seed=0)
    assert median == np.median(values) and lo < median < hi
    # the median of 400 N(0,1) values has standard error ~ sqrt(pi/2)/sqrt(400) ~ 0.063
    assert 0.15 < hi - lo < 0.35
    assert drift.median_ci(values, seed=0) == drift.median_ci(values, seed=0)  # seeded
    with pytest.raises(ValueError):
        drift.median_ci(np.array([np.nan, 1.0]), seed=0)


def test_positions_are_seeded_and_bounded():
    a = drift.drift_positions(100, 10, seed=3)
    assert len(a) == 10 and len(set(a)) == 10 and (np.diff(a) > 0).all() and a.max() < 100
    np.testing.assert_array_equal(a, drift.drift_positions(100, 10, seed=3))
    assert not np.array_equal(a, drift.drift_positions(100, 10, seed=4))
    np.testing.assert_array_equal(drift.drift_positions(5, 10, seed=0), np.arange(5))
    with pytest.raises(DinoflowError, match="drift_images"):
        drift.drift_positions(5, 0, seed=0)


def test_unchanged_encoder_has_cosine_one_and_a_moved_one_less():
    images, enc = _images(), _vit()
    same = drift.embedding_drift(enc, copy.deepcopy(enc), images, n_images=8, seed=0)
    assert same["median_cosine"] == pytest.approx(1.0) and same["ci95"] == pytest.approx([1.0, 1.0])
    assert same["n_images"] == 8 and same["reference"] == "initial weights before training"
    moved = copy.deepcopy(enc)
    with torch.no_grad():
        for p in moved.model.blocks[-1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    d = drift.embedding_drift(enc, moved, images, n_images=8, seed=0)
    assert d["median_cosine"] < 0.99 and d["ci95"][0] <= d["median_cosine"] <= d["ci95"][1]
    # the reference value: cosines of the CLS embeddings computed directly with the model's eval preprocessing
    from dinoflow.data.transforms import eval_transform

    tf = eval_transform(enc.data_config)
    pos = drift.drift_positions(len(images), 8, seed=0)
    x = torch.stack([tf(images[i]) for i in pos])
    with torch.no_grad():
        a, b = enc.eval()(x).double(), moved.eval()(x).double()
    want = torch.nn.functional.cosine_similarity(a, b).numpy()
    assert d["median_cosine"] == pytest.approx(float(np.median(want)), rel=1e-5)
