"""Collapse monitors and the verdict rule on synthetic teacher outputs of each kind (monitors.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from dinoflow.train import monitors

N, D, K = 64, 32, 256


def _verdict(probs: torch.Tensor, cls: torch.Tensor, kl: float) -> dict:
    m = monitors.teacher_monitors(probs, cls)
    step = {**m, "dino_kl": kl}
    return monitors.collapse_verdict(**monitors.summarise([step, step]), log_k=math.log(K), embed_dim=D,
                                     n_samples=N)


def _healthy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(N, D, generator=g)
    prototypes = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1)
    logits = torch.nn.functional.normalize(cls, dim=-1) @ prototypes.T
    return torch.softmax(logits / 0.1, dim=-1), cls


def test_monitors_match_independent_formulas():
    probs, cls = _healthy()
    m = monitors.teacher_monitors(probs, cls)
    assert m["teacher/entropy"] == pytest.approx(np.mean(scipy_entropy(probs.numpy().T)), rel=1e-5)
    assert m["teacher/entropy_fraction"] == pytest.approx(m["teacher/entropy"] / math.log(K))
    normed = cls.numpy() / np.linalg.norm(cls.numpy(), axis=1, keepdims=True)
    assert m["teacher/std"] == pytest.approx(normed.std(axis=0, ddof=1).mean(), rel=1e-5)
    s = np.linalg.svd(cls.numpy().astype(np.float64) - cls.numpy().mean(0), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert m["teacher/rankme"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)


def test_healthy_outputs():
    probs, cls = _healthy()
    v = _verdict(probs, cls, kl=0.3 * math.log(K))
    assert v["verdict"] == "healthy", v["reason"]
    assert set(v) == {"verdict", "reason", "teacher_entropy", "log_k", "student_teacher_kl", "teacher_std", "rankme",
                      "embed_dim"}
    assert v["embed_dim"] == D and v["log_k"] == pytest.approx(math.log(K))


def test_uniform_targets_are_uniform_collapse():
    _, cls = _healthy()
    uniform = torch.full((N, K), 1.0 / K)
    # the targets carry no information, whatever the embeddings do
    assert _verdict(uniform, cls, kl=1.0)["verdict"] == "uniform_collapse"
    # every image gives (almost) the same embedding: what a random ViT with LayerScale 1e-5 does
    same = torch.randn(1, D).repeat(N, 1) + 1e-6 * torch.randn(N, D)
    v = _verdict(uniform, same, kl=0.0)
    assert v["verdict"] == "uniform_collapse" and "same embedding" in v["reason"]
    assert v["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)


def test_one_hot_targets_are_one_hot_collapse():
    one_hot = torch.zeros(N, K)
    one_hot[:, 0] = 1.0
    same = torch.randn(1, D).repeat(N, 1)
    v = _verdict(one_hot, same, kl=0.0)
    assert v["verdict"] == "one_hot_collapse" and v["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)
    # sharp targets that the student already matches are the DINO paper's sharpening-only collapse
    _, cls = _healthy()
    assert _verdict(one_hot, cls, kl=0.01)["verdict"] == "one_hot_collapse"
    # sharp targets that the student still has to learn are not a collapse
    varied = torch.nn.functional.one_hot(torch.arange(N) % K, K).float()
    assert _verdict(varied, cls, kl=2.0)["verdict"] == "healthy"


def test_embeddings_on_a_few_directions_are_dimensional_collapse():
    probs, _ = _healthy()
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(N, 2, generator=g) @ torch.randn(2, D, generator=g) + 1e-3 * torch.randn(N, D, generator=g)
    v = _verdict(probs, flat, kl=1.0)
    assert v["verdict"] == "dimensional_collapse", v["reason"]
    assert v["rankme"] < 3


def test_summarise_averages_and_rejects_empty_or_non_finite():
    steps = [{"teacher/entropy": 1.0, "dino_kl": 0.5, "teacher/std": 0.1, "teacher/rankme": 10.0},
             {"teacher/entropy": 3.0, "dino_kl": 1.5, "teacher/std": 0.3, "teacher/rankme": 20.0}]
    assert monitors.summarise(steps) == pytest.approx({"teacher_entropy": 2.0, "student_teacher_kl": 1.0,
                                                       "teacher_std": 0.2, "rankme": 15.0})
    with pytest.raises(ValueError, match="no logged steps"):
        monitors.summarise([])
    with pytest.raises(ValueError, match="non-finite"):
        monitors.collapse_verdict(math.nan, 1.0, 0.0, 0.1, 5.0, embed_dim=8, n_samples=8)


def test_single_row_batch_is_finite():
    m = monitors.teacher_monitors(torch.full((1, 4), 0.25), torch.randn(1, 8))
    assert m["teacher/std"] == 0.0 and m["teacher/rankme"] == 0.0
    assert all(math.isfinite(v) for v in m.values())
