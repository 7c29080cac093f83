"""Figures for a mixture fitted to a user's table: learning curves and the gate's regions.

Shape legend: N rows, E experts, G grid points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# moekit.plots first: importing it selects the Agg backend before pyplot loads.
from moekit.plots import CLASS_MARKERS, OKABE_ITO, _grid, expert_colors  # isort: skip
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from moekit.history import History


def plot_learning_curves(history: History) -> Figure:
    """The training (and validation) loss per epoch, and the accuracy where there is one."""
    keys = history.keys
    panels = [m for m in ("loss", "accuracy") if f"train_{m}" in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    epochs = history.column("epoch")
    for ax, metric in zip(axes[0], panels):
        for split, style in (("train", "-"), ("val", "--")):
            name = f"{split}_{metric}"
            if name in keys:
                ax.plot(epochs, history.column(name), style,
                        color=OKABE_ITO[0] if split == "train" else OKABE_ITO[1],
                        label="training" if split == "train" else "validation")
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_gate_regions(gate_proba: Callable[[np.ndarray], np.ndarray], x_N2: np.ndarray,
                      labels_N: np.ndarray, *, axis_labels: Sequence[str] = ("x1", "x2"),
                      steps: int = 200) -> Figure:
    """The gate's partition of the input plane: each point coloured by its leading expert, shaded by
    how sure the gate is, with the data on top (one marker per class or target bin)."""
    g0, g1, points_G2 = _grid(x_N2, steps, margin=0.06, floor=1e-9)
    p_GE = gate_proba(points_G2)
    n_experts = p_GE.shape[1]
    leader = p_GE.argmax(1).reshape(g0.shape)
    confidence = p_GE.max(1).reshape(g0.shape)
    fig, ax = plt.subplots(figsize=(6.6, 5.2))
    colors = expert_colors(n_experts)  # the same colour per expert as every other moekit figure
    cmap = ListedColormap(colors)
    ax.pcolormesh(g0, g1, leader, cmap=cmap, vmin=-0.5, vmax=n_experts - 0.5, shading="auto",
                  alpha=0.25 + 0.35 * (confidence - confidence.min()) / (np.ptp(confidence) + 1e-12))
    ax.contour(g0, g1, leader, levels=np.arange(n_experts) + 0.5, colors="k", linewidths=1.2)
    for i, label in enumerate(np.unique(labels_N)):
        rows = labels_N == label
        ax.scatter(x_N2[rows, 0], x_N2[rows, 1], s=14, marker=CLASS_MARKERS[i % len(CLASS_MARKERS)],
                   facecolor="white", edgecolor="k", linewidths=0.6, label=str(label))
    for e in range(n_experts):
        ax.scatter([], [], marker="s", s=60, color=colors[e], label=f"expert {e} region")
    ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1],
           title="The gate's partition (colour: leading expert; black: its boundaries)")
    ax.legend(fontsize=7, loc="best", framealpha=0.85, ncol=2)
    fig.tight_layout()
    return fig
