"""What every moekit figure shares: the palette, the markers, the grid over a plane, and writing a
figure to disk.

Shape legend: N rows, G grid points.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`), never through
pyplot, so no backend is chosen at import and no window can open: the figures are written to files
(:func:`save_figure`) and embedded in reports.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from moekit.io.files import atomic_path

CLASS_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Okabe & Ito (2008), the colour-blind-safe qualitative palette, strongest colours first; its black
# is replaced by grey so that an expert's colour never hides the black data markers and lines.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
             "#999999")
HEATMAP = "cividis"  # reads the same with every form of colour blindness
MAX_POINTS = 2000  # data points drawn over a plane (a fixed subsample beyond that)


def expert_colors(n: int) -> list[str]:
    """One colour per expert, the same in every figure: Okabe-Ito up to 8; beyond that tab20 (not
    colour-blind safe, so figures with more than 8 experts also label experts by number).

    Example:
        >>> expert_colors(2)
        ['#0072B2', '#D55E00']
    """
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    cmap = matplotlib.colormaps["tab20"]
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def new_figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    """A figure of ``width`` x ``height`` inches, laid out by matplotlib's constrained layout."""
    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write a figure atomically as PNG; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def grid(x_N2: np.ndarray, steps: int = 200, margin: float = 0.08, floor: float = 0.0
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``steps`` x ``steps`` grid over the points' box widened by ``margin`` of its span, plus
    ``floor`` (so that a constant feature still spans something): the two meshgrid coordinate
    arrays and the grid points (G, 2), G = steps^2, first coordinate fastest.

    Example:
        >>> m0, m1, points = grid(np.array([[0.0, 0.0], [1.0, 2.0]]), steps=3, margin=0.0)
        >>> points[:3].tolist()
        [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]]
    """
    lo, hi = x_N2.min(0), x_N2.max(0)
    pad = (hi - lo) * margin + floor
    g0 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], steps)
    g1 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], steps)
    m0, m1 = np.meshgrid(g0, g1)
    return m0, m1, np.stack([m0.ravel(), m1.ravel()], axis=1)


def subsample(n: int) -> np.ndarray:
    """The rows to draw: all of them up to ``MAX_POINTS``, else a fixed random subset in order."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))


def scatter_labels(ax, uv_N2: np.ndarray, labels_N: np.ndarray | None,
                   label_names: list[str] | tuple[str, ...] | None) -> None:
    """The data on a plane: open black markers, one shape per label (dots without labels)."""
    keep = subsample(len(uv_N2))
    uv_N2 = uv_N2[keep]
    if labels_N is None:
        ax.scatter(uv_N2[:, 0], uv_N2[:, 1], s=6, c="k", alpha=0.5, linewidths=0)
        return
    labels_N = labels_N[keep]
    names = list(label_names) if label_names else [str(c) for c in range(labels_N.max() + 1)]
    for c, name in enumerate(names):
        pts = uv_N2[labels_N == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=13, marker=CLASS_MARKERS[c % len(CLASS_MARKERS)],
                   facecolors="none", edgecolors="k", linewidths=0.6, label=name)


def draw_line(ax, normal: np.ndarray, offset: float, xlim, ylim, **style) -> None:
    """Draw {x : normal . x + offset = 0} across the axes' box."""
    x0 = np.linspace(*xlim, 400)
    if abs(normal[1]) > 1e-12:
        x1 = -(normal[0] * x0 + offset) / normal[1]
    else:
        x0 = np.full(400, -offset / normal[0]) if abs(normal[0]) > 1e-12 else x0
        x1 = np.linspace(*ylim, 400)
    inside = (x1 >= ylim[0]) & (x1 <= ylim[1]) & (x0 >= xlim[0]) & (x0 <= xlim[1])
    ax.plot(np.where(inside, x0, np.nan), np.where(inside, x1, np.nan), **style)
