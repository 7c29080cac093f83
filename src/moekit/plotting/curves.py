"""Curves over training: the stop metric of many replicate runs, and one fit's learning curves.

Shape legend: R runs, T epochs.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from moekit.fitting.history import History
from moekit.plotting.style import OKABE_ITO, expert_colors, new_figure


def hold_last(c_RT: np.ndarray) -> np.ndarray:
    """Each run's curve with its last value held after it stopped (NaN there), so that a band over
    runs shows every run to the end.

    Example:
        >>> hold_last(np.array([[1.0, 0.5, np.nan]])).tolist()
        [[1.0, 0.5, 0.5]]
    """
    out = c_RT.copy()
    for r in range(out.shape[0]):
        valid = np.nonzero(~np.isnan(out[r]))[0]
        if valid.size:
            out[r, valid[-1] + 1:] = out[r, valid[-1]]
    return out


def plot_training_curves(curves: dict[str, np.ndarray], criterion: float, *,
                         ylabel: str = "average squared error") -> Figure:
    """The stop metric against epochs for each system: median over runs and the 10-90% band."""
    fig = new_figure(7.0, 4.4)
    ax = fig.add_subplot()
    colors = expert_colors(len(curves))  # one colour per system, from the experts' palette
    for color, (name, curves_RT) in zip(colors, curves.items(), strict=True):
        last = int(np.max(np.nonzero(~np.isnan(curves_RT).all(0))[0])) + 1
        filled_RT = hold_last(curves_RT[:, :last])
        epochs = np.arange(last)
        ax.plot(epochs, np.median(filled_RT, 0), color=color, label=name)
        ax.fill_between(epochs, np.percentile(filled_RT, 10, 0), np.percentile(filled_RT, 90, 0),
                        color=color, alpha=0.2)
    ax.axhline(criterion, color="k", ls=":", lw=1, label=f"criterion {criterion}")
    ax.set(xlabel="epoch", ylabel=ylabel, yscale="log")
    ax.legend(fontsize=8)
    return fig


def plot_learning_curves(history: History) -> Figure:
    """The training (and validation) loss per epoch, and the accuracy where there is one."""
    keys = history.keys
    panels = [m for m in ("loss", "accuracy") if f"train_{m}" in keys]
    fig = new_figure(5.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    epochs = history.column("epoch")
    for ax, metric in zip(axes, panels, strict=True):
        for split, style in (("train", "-"), ("val", "--")):
            name = f"{split}_{metric}"
            if name in keys:
                ax.plot(epochs, history.column(name), style,
                        color=OKABE_ITO[0] if split == "train" else OKABE_ITO[1],
                        label="training" if split == "train" else "validation")
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig
