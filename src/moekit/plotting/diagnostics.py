"""How a fitted model's predictions compare with the truth on held-out rows: the confusion matrix of
a classifier, and predicted against actual (with the residuals) for a regression.

Shape legend: N rows, C classes.

Both take plain arrays in the target's own units or labels, so that they plot any model's
predictions, not only a moekit estimator's.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from moekit.plotting.style import HEATMAP, OKABE_ITO, new_figure, subsample


def row_shares(counts_CC: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its total (a row without rows stays 0).

    Example:
        >>> row_shares(np.array([[3, 1], [0, 0]])).tolist()
        [[0.75, 0.25], [0.0, 0.0]]
    """
    counts_CC = np.asarray(counts_CC, dtype=np.float64)
    totals_C1 = counts_CC.sum(1, keepdims=True)
    return np.divide(counts_CC, totals_C1, out=np.zeros_like(counts_CC), where=totals_C1 > 0)


def plot_confusion_matrix(counts_CC: np.ndarray, class_names: Sequence[str], *,
                          title: str = "") -> Figure:
    """The confusion matrix: row = true class, column = predicted class; each cell shows its row
    count and is shaded by the share of its true class's rows (so a rare class reads as clearly
    as a common one).

    Example:
        >>> fig = plot_confusion_matrix(np.array([[5, 1], [0, 4]]), ["cat", "dog"])
    """
    counts_CC = np.asarray(counts_CC)
    n = len(class_names)
    if counts_CC.shape != (n, n):
        raise ValueError(f"plot_confusion_matrix: counts_CC must be (C, C) with C = "
                         f"len(class_names) = {n}; got shape {counts_CC.shape}.")
    shares_CC = row_shares(counts_CC)
    side = min(2.6 + 0.55 * n, 12.0)
    fig = new_figure(side + 1.4, side)
    ax = fig.add_subplot()
    image = ax.imshow(shares_CC, cmap=HEATMAP, vmin=0.0, vmax=1.0)
    cmap = matplotlib.colormaps[HEATMAP]
    for i in range(n):
        for j in range(n):
            r, g, b, _ = cmap(shares_CC[i, j])
            ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(j, i, str(int(counts_CC[i, j])), ha="center", va="center", color=ink,
                    fontsize=9 if n <= 10 else 7)
    names = [str(c) for c in class_names]
    ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 4 else 0,
                  ha="right" if max(map(len, names)) > 4 else "center")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=title or f"confusion matrix ({int(counts_CC.sum())} rows)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's rows")
    return fig


def plot_predicted_vs_actual(actual_N: np.ndarray, predicted_N: np.ndarray, *,
                             target_name: str = "target", title: str = "") -> Figure:
    """Two panels, in the target's own units: predicted against actual with the line y = x (on it:
    a perfect prediction), and the residual (actual - predicted) against the prediction (a pattern
    there is structure the model missed).

    Example:
        >>> fig = plot_predicted_vs_actual(np.array([1.0, 2.0, 3.0]), np.array([1.1, 1.8, 3.3]),
        ...                                target_name="price")
    """
    actual_N = np.asarray(actual_N, dtype=np.float64).reshape(-1)
    predicted_N = np.asarray(predicted_N, dtype=np.float64).reshape(-1)
    if actual_N.shape != predicted_N.shape:
        raise ValueError(f"plot_predicted_vs_actual: actual_N and predicted_N must have one value "
                         f"per row; got {actual_N.shape[0]} and {predicted_N.shape[0]} values.")
    n_rows = len(actual_N)
    keep = subsample(n_rows)
    actual_N, predicted_N = actual_N[keep], predicted_N[keep]
    residual_N = actual_N - predicted_N
    fig = new_figure(10.4, 4.4)
    left, right = fig.subplots(1, 2)
    style = {"s": 14, "color": OKABE_ITO[0], "alpha": 0.7, "linewidths": 0}
    left.scatter(actual_N, predicted_N, **style)
    both = np.concatenate([actual_N, predicted_N])
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo) or 0.5
        lo, hi = lo - pad, hi + pad
        left.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (perfect prediction)")
        left.set(xlim=(lo, hi), ylim=(lo, hi))
        left.set_aspect("equal", adjustable="box")
        left.legend(fontsize=8, loc="upper left")
    left.set(xlabel=f"actual {target_name}", ylabel=f"predicted {target_name}",
             title="predicted against actual")
    right.scatter(predicted_N, residual_N, **style)
    right.axhline(0.0, color="k", ls="--", lw=1)
    right.set(xlabel=f"predicted {target_name}",
              ylabel=f"residual: actual - predicted ({target_name})",
              title="residuals against predicted")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{n_rows} rows, in the units of {target_name}")
    return fig
