"""Shared plotting helpers: matplotlib figures rendered with the Agg backend, saved as PNG.

Figures are built with `matplotlib.figure.Figure` directly (never `pyplot`), so plotting works
without a display and never changes the process's matplotlib backend or pyplot state (a notebook
importing vmoe_eval keeps its own backend). `Figure.savefig` renders through Agg.

    fig, ax = new_figure(6, 4)
    line(ax, xs, ys, label="BPR, K=2", marker="o")
    save(fig, "out/plot.png")
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def new_figure(width: float, height: float, *, nrows: int = 1, ncols: int = 1) -> tuple:
    """(figure, axes) with an Agg canvas; `axes` is one Axes, or an array for a grid."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def save(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Writes `fig` as a PNG to `path` (parent folders created) and returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def heatmap(
    ax: Any,
    matrix: np.ndarray,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str = "",
    annotate: bool = False,
    fmt: str = "{:.2f}",
) -> Any:
    """Draws `matrix` [rows, cols] as an image on `ax` with a colorbar; returns the image.

    Labels are shown for every row / column when given; `annotate` writes each value in its cell
    (for small matrices)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="none")
    if row_labels is not None:
        ax.set_yticks(range(matrix.shape[0]), labels=list(row_labels))
    if col_labels is not None:
        ax.set_xticks(range(matrix.shape[1]), labels=list(col_labels))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    colorbar = ax.figure.colorbar(image, ax=ax)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    if annotate:
        finite = matrix[np.isfinite(matrix)]
        middle = (finite.max() + finite.min()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(matrix):
            color = "white" if np.isfinite(value) and value < middle else "black"
            ax.text(j, i, fmt.format(value), ha="center", va="center", color=color, fontsize=7)
    return image


def line(
    ax: Any,
    x: Sequence[float],
    y: Sequence[float],
    *,
    label: str,
    marker: str = "o",
    color: str | None = None,
    linestyle: str = "-",
) -> None:
    """One line with markers at every point, sorted by x."""
    order = np.argsort(np.asarray(x, dtype=np.float64), kind="stable")
    xs = np.asarray(x, dtype=np.float64)[order]
    ys = np.asarray(y, dtype=np.float64)[order]
    ax.plot(xs, ys, marker=marker, color=color, linestyle=linestyle, label=label, markersize=5)
