"""Schedules: known values of the warm-up + cosine curve (DINO's cosine_scheduler) and the teacher temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinoflow.errors import DinoflowError
from dinoflow.train.schedules import cosine_schedule, teacher_temp_schedule


def _reference(base, final, epochs, spe, warmup_epochs, start):
    """Step-by-step transcription of DINO's utils.cosine_scheduler (independent scalar loop)."""
    warm = warmup_epochs * spe
    out = []
    for s in range(warm):
        out.append(start + (base - start) * (s / (warm - 1) if warm > 1 else 1.0))
    n = epochs * spe - warm
    for i in range(n):
        out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    return np.array(out)


def test_length_and_warmup_endpoints():
    s = cosine_schedule(1e-3, 1e-6, epochs=5, steps_per_epoch=10, warmup_epochs=2, start_warmup_value=1e-5)
    assert s.shape == (50,)
    assert s[0] == pytest.approx(1e-5)
    assert s[19] == pytest.approx(1e-3)  # last warm-up step reaches the base value
    assert s[20] == pytest.approx(1e-3)  # cosine starts at the base value
    assert np.all(np.diff(s[:20]) > 0) and np.all(np.diff(s[20:]) < 0)


def test_cosine_midpoint_is_mean_of_base_and_final():
    s = cosine_schedule(1.0, 0.2, epochs=4, steps_per_epoch=25)  # 100 cosine steps, no warm-up
    assert s[50] == pytest.approx(0.6)  # cos(pi/2) = 0
    assert s[25] == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 4)))
    assert s[-1] == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi * 99 / 100)))


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_matches_reference_loop(warmup):
    got = cosine_schedule(0.5, 0.01, epochs=6, steps_per_epoch=7, warmup_epochs=warmup, start_warmup_value=0.1)
    np.testing.assert_allclose(got, _reference(0.5, 0.01, 6, 7, warmup, 0.1), rtol=1e-12)


def test_momentum_schedule_increases_to_one():
    m = cosine_schedule(0.992, 1.0, epochs=3, steps_per_epoch=4)
    assert m[0] == pytest.approx(0.992)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0


def test_teacher_temp_warmup_then_constant():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=2, epochs=5, steps_per_epoch=3)
    assert t.shape == (15,)
    np.testing.assert_allclose(t[:6], np.linspace(0.04, 0.07, 6))
    np.testing.assert_allclose(t[6:], 0.07)


def test_teacher_temp_warmup_longer_than_run_is_cut():
    t = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=2, steps_per_epoch=5)
    np.testing.assert_allclose(t, np.linspace(0.04, 0.07, 20)[:10])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"epochs": 0, "steps_per_epoch": 3}, "epochs"),
        ({"epochs": 2, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"epochs": 2, "steps_per_epoch": 3, "warmup_epochs": 3}, "warmup_epochs"),
    ],
)
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(DinoflowError, match=word):
        cosine_schedule(1.0, 0.0, **kwargs)
