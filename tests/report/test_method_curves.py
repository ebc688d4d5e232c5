"""Training curves per method: one panel per trained model with its loss and loss components, whatever keys the
method logs (the engine's `loss/total`, a method's `loss/<term>`), read back from the dvclive TSV files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dinoflow.report import figures as F
from report_fixtures import write_dvclive


def _curve(values) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(len(values)), "value": np.asarray(values, dtype=float)})


def test_is_loss_curve_and_order():
    assert [n for n in ("loss/total", "loss/ibot", "loss", "lr", "pretext/accuracy", "teacher/entropy",
                        "loss_dino", "finetune/head_loss") if F.is_loss_curve(n)] == \
        ["loss/total", "loss/ibot", "loss", "loss_dino"]
    assert sorted(["loss/koleo", "loss/total", "loss/dino"], key=F.loss_sort_key) == \
        ["loss/total", "loss/dino", "loss/koleo"]


def test_one_panel_per_model_with_its_own_loss_terms(tmp_path):
    logged = {  # different methods log different keys; only the losses are drawn, total first
        "simclr": {"loss/total": [5, 4, 3], "lr": [0, 1, 2]},
        "dinov2": {"loss/total": [9, 8, 7, 6], "loss/dino_cls": [5, 4, 4, 3], "loss/ibot": [3, 3, 2, 2],
                   "loss/koleo": [-1, -1.5, -2, -2], "teacher/entropy": [8, 8, 8, 8]},
        "rotation": {"loss/total": [1.4, 1.3], "pretext/accuracy": [0.2, 0.3]},
        "odd": {"lr": [1, 2]},
    }
    curves = {}
    for m, series in logged.items():  # through dvclive's files and the report's reader
        write_dvclive(tmp_path / m, {k: np.asarray(v, dtype=float) for k, v in series.items()})
        curves[m] = F.read_dvclive_curves(tmp_path / m)
    titles = {m: f"{m} · {m}" for m in logged}
    fig = F.method_curves_figure(curves, titles, ncols=3)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(titles.values())
    expected = {"simclr": ["loss/total"], "dinov2": ["loss/total", "loss/dino_cls", "loss/ibot", "loss/koleo"],
                "rotation": ["loss/total"], "odd": []}
    for ax, m in zip(axes, logged):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == expected[m]
        for ln in lines:
            np.testing.assert_allclose(ln.get_ydata(), logged[m][ln.get_label()])
            np.testing.assert_allclose(ln.get_xdata(), np.arange(len(logged[m][ln.get_label()])))
        if lines:
            assert lines[0].get_linewidth() > max((ln.get_linewidth() for ln in lines[1:]), default=0)
    assert "no loss logged" in [t.get_text() for t in axes[3].texts]
    assert len(fig.axes) == 6 and sum(ax.get_visible() for ax in fig.axes) == 4  # 2 x 3 grid, 2 hidden
    assert F.figure_to_png(fig).startswith(b"\x89PNG")


@pytest.mark.parametrize("n", [1, 15])
def test_grid_size(n):
    curves = {f"m{i}": {"loss/total": _curve([2, 1])} for i in range(n)}
    fig = F.method_curves_figure(curves)
    assert sum(ax.get_visible() for ax in fig.axes) == n
    assert len(fig.axes) == (1 if n == 1 else 16)  # 4 columns
