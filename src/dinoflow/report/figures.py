"""Matplotlib figures shared by the report stages (Agg backend, no display needed).

Every figure is returned as a `matplotlib.figure.Figure` so callers choose to save it to a file
(`save_figure`) or to inline it in the HTML page (`figure_to_png`). Text that comes from the collection
(captions, labels) is drawn with `parse_math=False`, so a `$` in a caption is never read as TeX.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dinoflow.errors import DinoflowError  # noqa: E402

DPI = 100
# The columns dvclive writes next to the value in plots/metrics/<name>.tsv.
_DVCLIVE_NON_VALUE = ("timestamp", "step")


# ----------------------------------------------------------------------------------------------------- helpers
def new_figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot's global state, so loops over many figures never leak memory."""
    return Figure(figsize=(width, height), dpi=DPI)


def figure_to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def wrap_text(text: Any, width: int = 24, max_lines: int = 3) -> str:
    """Wrap a caption to `max_lines` lines of `width` characters, ending with an ellipsis when cut."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = " ".join(str(text).split())
    lines = textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=True)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        lines[-1] = (last[: width - 1] if len(last) >= width else last) + "…"
    return "\n".join(lines)


def model_row_title(name: str, info: Mapping[str, Any] | None) -> str:
    """The row label of a model in every figure; a stand-in model says so (its `stand_in_label`)."""
    if info and info.get("stand_in"):
        label = info.get("stand_in_label") or "stand-in"
        return f"{name}\n[{wrap_text(label, width=30, max_lines=4)}]"
    return name


def hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# -------------------------------------------------------------------------------------------- training curves
def panel_grid(n: int, max_cols: int, panel_width: float, panel_height: float,
               title_height: float) -> tuple[Figure, list]:
    """A figure for `n` small panels, at most `max_cols` a row, each `panel_width` x `panel_height` inches, plus
    `title_height` inches for the suptitle: (figure, the first `n` axes in reading order); the grid's unused
    axes are hidden."""
    ncols = min(max_cols, max(1, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = new_figure(panel_width * ncols, panel_height * nrows + title_height)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def read_dvclive_curves(log_dir: str | Path) -> dict[str, pd.DataFrame]:
    """All step series of a dvclive directory: {metric name: DataFrame(step, value)}.

    dvclive writes one TSV per metric under plots/metrics/ (nested names become sub-folders) with a
    `step` column and a column named after the metric.
    """
    root = Path(log_dir) / "plots" / "metrics"
    curves: dict[str, pd.DataFrame] = {}
    if not root.is_dir():
        return curves
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        try:
            df = pd.read_csv(tsv, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DinoflowError(f"{tsv}: cannot read dvclive metric file ({exc})") from exc
        value_cols = [c for c in df.columns if c not in _DVCLIVE_NON_VALUE]
        if "step" not in df.columns or not value_cols:
            raise DinoflowError(f"{tsv}: expected a 'step' column and a value column, found {list(df.columns)}")
        curves[name] = pd.DataFrame({"step": pd.to_numeric(df["step"]),
                                     "value": pd.to_numeric(df[value_cols[-1]], errors="coerce")})
    return curves


def training_curves_figure(model: str, curves: Mapping[str, pd.DataFrame], title: str | None = None,
                           max_panels: int = 24) -> Figure:
    """One small panel per logged series (losses first), for one model."""
    names = sorted(curves, key=lambda n: (0 if "loss" in n.lower() else 1, n))[:max_panels]
    fig, axes = panel_grid(len(names), 4, 3.2, 2.4, 0.4)
    for ax, name in zip(axes, names):
        df = curves[name]
        ax.plot(df["step"], df["value"], lw=1.2)
        ax.set_title(name, fontsize=9, parse_math=False)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title or model, fontsize=11, parse_math=False)
    fig.tight_layout()
    return fig


def is_loss_curve(name: str) -> bool:
    """A loss series of a dvclive log: `loss`, `loss/<term>` (the engine logs `loss/total` and a method's terms as
    `loss/<term>`), or any name whose first part starts with `loss`."""
    return name.split("/", 1)[0].lower().startswith("loss")


def loss_sort_key(name: str) -> tuple:
    """The total loss first (`loss` or `loss/total`), then the components in name order."""
    return (0 if name.lower() in ("loss", "loss/total") else 1, name)


def method_curves_figure(curves_by_model: Mapping[str, Mapping[str, pd.DataFrame]],
                         titles: Mapping[str, str] | None = None, ncols: int = 4) -> Figure:
    """Training curves per method: one small panel per trained model (in the given order), each with the loss
    and its components (every logged series that :func:`is_loss_curve` accepts, whatever the method logs) against
    the step. The total loss is drawn thick, components thin with a legend; a model without a loss series gets
    an empty panel saying so. `titles`: panel title per model (default: the model name)."""
    models = list(curves_by_model)
    fig, axes = panel_grid(len(models), ncols, 3.0, 2.3, 0.5)
    for ax, model in zip(axes, models):
        curves = curves_by_model[model]
        names = sorted((n for n in curves if is_loss_curve(n)), key=loss_sort_key)
        for n in names:
            total = loss_sort_key(n)[0] == 0
            ax.plot(curves[n]["step"], curves[n]["value"], lw=1.8 if total else 0.9, label=n,
                    color="black" if total else None)
        if not names:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        elif len(names) > 1:
            ax.legend(fontsize=6, loc="best")
        ax.set_title((titles or {}).get(model, model), fontsize=8, parse_math=False)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle("training loss per method (and its components)", fontsize=10)
    fig.tight_layout()
    return fig


def finetune_curves_figure(curves_by_model: Mapping[str, Mapping[str, pd.DataFrame]],
                           series: Sequence[str]) -> Figure:
    """The fine-tunes' head and backbone curves overlaid: one panel per series, one line per model."""
    fig, axes = panel_grid(len(series), 3, 4.2, 3.0, 0.3)
    for ax, name in zip(axes, series):
        for model, curves in curves_by_model.items():
            if name in curves:
                df = curves[name]
                ax.plot(df["step"], df["value"], lw=1.2, label=model)
        ax.set_title(name, fontsize=9, parse_math=False)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fine-tunes: head and backbone", fontsize=11)
    fig.tight_layout()
    return fig


def lr_search_figure(trials: pd.DataFrame, lr_column: str, value_column: str) -> Figure:
    """Final (or pruned) loss of each trial against its learning rate, log x axis."""
    fig = new_figure(5.0, 3.4)
    ax = fig.subplots()
    df = trials[[lr_column, value_column] + (["state"] if "state" in trials.columns else [])].copy()
    df[lr_column] = pd.to_numeric(df[lr_column], errors="coerce")
    df[value_column] = pd.to_numeric(df[value_column], errors="coerce")
    df = df.dropna(subset=[lr_column, value_column])
    if "state" in df.columns:
        for state, part in df.groupby("state"):
            ax.scatter(part[lr_column], part[value_column], label=str(state), s=30)
        ax.legend(fontsize=8)
    else:
        ax.scatter(df[lr_column], df[value_column], s=30)
    if len(df) and (df[lr_column] > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(lr_column, parse_math=False)
    ax.set_ylabel(value_column, parse_math=False)
    ax.set_title("learning-rate search trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ alignment
def alignment_bar_figure(field: str, rows: Sequence[Mapping[str, Any]], metric: str = "spearman") -> Figure:
    """Bar chart of one alignment metric for one text field, one bar per model, 95% CI as error bars.

    rows: dicts with `model`, `metric` value and optional `ci_low` / `ci_high` (None when exact, no interval).
    """
    models = [r["model"] for r in rows]
    values = np.array([np.nan if r.get(metric) is None else float(r[metric]) for r in rows])
    lows = np.array([np.nan if r.get("ci_low") is None else float(r["ci_low"]) for r in rows])
    highs = np.array([np.nan if r.get("ci_high") is None else float(r["ci_high"]) for r in rows])
    has_ci = ~(np.isnan(lows) | np.isnan(highs))
    yerr = np.zeros((2, len(rows)))
    yerr[0, has_ci] = np.clip(values[has_ci] - lows[has_ci], 0, None)
    yerr[1, has_ci] = np.clip(highs[has_ci] - values[has_ci], 0, None)
    fig = new_figure(max(4.0, 1.1 * len(rows) + 1.5), 3.6)
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x, np.nan_to_num(values), color="#4C72B0", yerr=yerr, capsize=4, ecolor="#222222")
    for xi, v in zip(x, values):
        if not np.isnan(v):
            ax.annotate(f"{v:.3f}", (xi, v), textcoords="offset points", xytext=(0, 3 if v >= 0 else -11),
                        ha="center", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (image vs text similarity)", fontsize=8, parse_math=False)
    ax.set_title(f"{field}: {metric}, 95% CI where sampled", fontsize=10, parse_math=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------- probes
def confusion_matrix_figure(matrix: Sequence[Sequence[float]], classes: Sequence[str], title: str,
                            max_classes: int = 40) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted), row-normalised colours, counts written
    when the matrix is small enough to read."""
    cm = np.asarray(matrix, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classes):
        raise DinoflowError(f"confusion matrix for {title!r}: shape {cm.shape} does not match "
                            f"{len(classes)} classes")
    n = len(classes)
    if n > max_classes:  # keep the most frequent true classes so the figure stays readable
        keep = np.sort(np.argsort(-cm.sum(axis=1), kind="stable")[:max_classes])
        cm = cm[np.ix_(keep, keep)]
        classes = [classes[i] for i in keep]
        title += f" ({max_classes} most frequent of {n} classes)"
        n = max_classes
    row_sum = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, row_sum, out=np.zeros_like(cm), where=row_sum > 0)
    size = min(12.0, 2.5 + 0.35 * n)
    fig = new_figure(size + 1.0, size)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    labels = [wrap_text(c, width=18, max_lines=1) for c in classes]
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        lab.set_parse_math(False)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10, parse_math=False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- image panels
def image_panel(ax, image, title: str = "", fontsize: int = 7) -> None:
    ax.imshow(image)
    hide_axes(ax)
    if title:
        ax.set_title(title, fontsize=fontsize, parse_math=False)

