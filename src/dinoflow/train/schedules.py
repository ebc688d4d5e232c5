"""Per-step schedules for DINO training: learning rate, weight decay, teacher momentum, teacher temperature.

Each schedule is a NumPy array with one value per optimisation step (``epochs * steps_per_epoch`` values), as in
DINO's ``cosine_scheduler`` and DINOv2's ``CosineScheduler``: index it with the global step.

Example:
    >>> from dinoflow.train.schedules import cosine_schedule, teacher_temp_schedule
    >>> lr = cosine_schedule(1e-3, 1e-6, epochs=10, steps_per_epoch=100, warmup_epochs=1)
    >>> len(lr), float(lr[0]), round(float(lr[99]), 6)
    (1000, 0.0, 0.001)
    >>> momentum = cosine_schedule(0.992, 1.0, epochs=10, steps_per_epoch=100)
    >>> temp = teacher_temp_schedule(0.04, 0.07, warmup_epochs=2, epochs=10, steps_per_epoch=100)
    >>> float(temp[0]), float(temp[-1])
    (0.04, 0.07)
"""

from __future__ import annotations

import numpy as np

from dinoflow.errors import DinoflowError


def _check(epochs: float, steps_per_epoch: int, warmup_epochs: float, what: str) -> tuple[int, int]:
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise DinoflowError(f"{what}: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    if epochs <= 0:
        raise DinoflowError(f"{what}: epochs must be > 0, got {epochs!r}")
    if warmup_epochs < 0:
        raise DinoflowError(f"{what}: warmup epochs must be >= 0, got {warmup_epochs!r}")
    total = int(round(epochs * steps_per_epoch))
    warmup = int(round(warmup_epochs * steps_per_epoch))
    return total, warmup


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: float,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value``, then cosine from ``base_value`` to ``final_value``.

    Same values as DINO's ``utils.cosine_scheduler``: the warm-up is ``np.linspace`` over its steps (so its last
    step equals ``base_value``); step ``i`` of the ``n`` cosine steps is
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` (it never quite reaches ``final_value``).
    Fractional epochs are allowed (rounded to whole steps).
    """
    total, warmup = _check(epochs, steps_per_epoch, warmup_epochs, "cosine_schedule")
    if warmup > total:
        raise DinoflowError(
            f"cosine_schedule: warmup_epochs ({warmup_epochs}) is longer than the run ({epochs} epochs)"
        )
    warmup_part = np.linspace(start_warmup_value, base_value, warmup)
    iters = np.arange(total - warmup)
    n = max(len(iters), 1)
    cosine_part = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / n))
    return np.concatenate((warmup_part, cosine_part)).astype(np.float64)


def teacher_temp_schedule(
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_epochs: float,
    epochs: float,
    steps_per_epoch: int,
) -> np.ndarray:
    """Teacher temperature per step: linear from ``warmup_teacher_temp`` to ``teacher_temp``, then constant.

    As DINOv2 (per-step warm-up over ``warmup_epochs``). A warm-up longer than the run is cut at the run's end,
    as in DINO, where the warm-up may exceed a short run.
    """
    total, warmup = _check(epochs, steps_per_epoch, warmup_epochs, "teacher_temp_schedule")
    warmup_part = np.linspace(warmup_teacher_temp, teacher_temp, warmup)
    constant = np.full(max(total - warmup, 0), float(teacher_temp))
    return np.concatenate((warmup_part, constant))[:total].astype(np.float64)
