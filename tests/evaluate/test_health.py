import numpy as np
import pytest

from dinoflow.evaluate.health import rankme


def test_rankme_matches_formula_and_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert 12 < rankme(x) <= 16
    line = np.outer(rng.normal(size=100), rng.normal(size=8))
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    assert rankme(np.zeros((5, 3))) == 0.0


def test_rankme_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        rankme(np.array([[np.nan, 1.0]]))
