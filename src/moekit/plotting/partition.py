"""How the gate divides the input: one partition figure for every report (the paper's Figure 2, the
routing analysis and `moekit fit`'s report), and each expert's mixing proportion over the plane.

Shape legend: N rows, D input features, E experts, G grid points.

Axes follow the paper's Figure 2: the first feature horizontal, the second vertical. With more than
two features the figure is a slice: the plane through the data mean spanned by the first two
principal components (:class:`Plane`); with one feature, the proportions along it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from moekit.nn.outputs import MoEOutput
from moekit.plotting.style import (
    draw_line,
    expert_colors,
    grid,
    new_figure,
    scatter_labels,
    subsample,
)

GateFunction = Callable[[np.ndarray], np.ndarray]  # rows (N, D) -> mixing proportions (N, E)


@torch.no_grad()
def gate_probs(model: nn.Module, x_ND: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """The gate's distribution p(x) on numpy rows, (N, E), in evaluation mode."""
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        parts = [MoEOutput.check(model(torch.as_tensor(x_ND[i:i + batch_size], dtype=dtype)),
                                 "gate_probs").routing.probs_NE.double().numpy()
                 for i in range(0, len(x_ND), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(parts)


@dataclass(frozen=True)
class Plane:
    """A 2-D view of the input space: input = origin + (u, v) @ basis; ``names`` label the axes.

    For two features it is the features themselves; for more, the plane through the data mean
    spanned by the first two principal components (a slice: the other directions held at the mean).
    """

    origin_D: np.ndarray
    basis_2D: np.ndarray
    names: tuple[str, str]

    @classmethod
    def of(cls, x_ND: np.ndarray, feature_names: Sequence[str] | None = None) -> Plane:
        x_ND = np.asarray(x_ND, dtype=np.float64)
        if x_ND.shape[1] == 2:
            names = tuple(feature_names) if feature_names else ("x1", "x2")
            return cls(np.zeros(2), np.eye(2), names)  # type: ignore[arg-type]
        mean_D = x_ND.mean(0)
        _, _, vt_DD = np.linalg.svd(x_ND - mean_D, full_matrices=False)
        return cls(mean_D, vt_DD[:2], ("principal component 1", "principal component 2"))

    def project(self, x_ND: np.ndarray) -> np.ndarray:
        return (x_ND - self.origin_D) @ self.basis_2D.T

    def lift(self, uv_G2: np.ndarray) -> np.ndarray:
        return self.origin_D + uv_G2 @ self.basis_2D


@dataclass(frozen=True)
class ExpertLine:
    """A line drawn over the partition, {x : normal . x + offset = 0}, in expert ``expert``'s
    colour: a linear expert's decision line
    (:func:`moekit.plotting.expert_lines.expert_decision_lines`)."""

    expert: int
    normal: np.ndarray
    offset: float
    label: str


def _gate_function(gate: nn.Module | GateFunction) -> GateFunction:
    if isinstance(gate, nn.Module):
        return lambda x_ND: gate_probs(gate, x_ND)
    return gate


def plot_partition(gate: nn.Module | GateFunction, x_ND: np.ndarray,
                   labels_N: np.ndarray | None = None, label_names: Sequence[str] | None = None,
                   *, feature_names: Sequence[str] | None = None, title: str = "",
                   note: str = "", soft: bool = True, lines: Sequence[ExpertLine] = (),
                   steps: int = 160) -> Figure:
    """The gate's partition of the input plane: the most probable expert (left, its boundaries in
    black) and, with ``soft``, the soft proportions (right, each point's colour the p-weighted
    blend of the experts' colours), with the data on top (one marker per label). One feature: the
    proportions p_e(x) along it instead.

    Args:
        gate: a module returning MoEOutput, or a function from rows (N, D) to proportions (N, E)
            (e.g. an estimator's ``gate_proba``, in the data's own units).
        x_ND: the data; labels_N: each row's label index, or None; label_names: their names.
        feature_names: the axes' names (two features). title: a name put on the figure; note: a
            line under it.
        lines: lines to draw over the left panel (two features only): the paper's Figure 2 draws
            each active expert's decision line.
    """
    gate_fn = _gate_function(gate)
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if x_ND.shape[1] == 1:
        return _partition_1d(gate_fn, x_ND, feature_names, title)
    if lines and x_ND.shape[1] != 2:
        raise ValueError(f"plot_partition: lines are drawn in the plane of two features; got "
                         f"{x_ND.shape[1]} features. Pass lines=() for a slice of more.")
    plane = Plane.of(x_ND, feature_names)
    uv_N2 = plane.project(x_ND)
    m0, m1, uv_G2 = grid(uv_N2, steps, margin=0.06, floor=1e-9)
    p_GE = gate_fn(plane.lift(uv_G2))
    n_experts = p_GE.shape[1]
    colors_E3 = np.array([to_rgb(c) for c in expert_colors(n_experts)])
    winner_G = p_GE.argmax(1)
    panels = [("most probable expert (argmax of p)", (0.45 * colors_E3 + 0.55)[winner_G])]
    if soft:  # lighter fills above, so the data stays visible
        panels.append(("soft proportions (colours mixed by p)", 0.75 * (p_GE @ colors_E3) + 0.25))
    fig = new_figure(1.8 + 4.85 * len(panels), 4.9)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)[0]
    xlim, ylim = (m0[0, 0], m0[0, -1]), (m1[0, 0], m1[-1, 0])
    for ax, (what, image_G3) in zip(axes, panels, strict=True):
        ax.imshow(image_G3.reshape(steps, steps, 3), origin="lower", aspect="auto",
                  extent=(*xlim, *ylim), interpolation="nearest")
        ax.contour(m0, m1, winner_G.reshape(m0.shape), levels=np.arange(n_experts) + 0.5,
                   colors="k", linewidths=0.9)
        scatter_labels(ax, uv_N2, labels_N, label_names)
        ax.set(xlim=xlim, ylim=ylim, xlabel=plane.names[0])
        ax.set_title(what, fontsize=10)
    axes[0].set_ylabel(plane.names[1])
    colors = expert_colors(n_experts)
    for line in lines:
        draw_line(axes[0], line.normal, line.offset, xlim, ylim, color=colors[line.expert],
                  lw=1.8, ls="--", label=line.label)
    share_E = np.bincount(winner_G, minlength=n_experts) / len(winner_G)
    handles = [Patch(facecolor=colors_E3[e], label=f"expert {e}"
                     + ("" if share_E[e] else " (wins nowhere in view)"))
               for e in range(n_experts)]
    data_handles, data_names = axes[0].get_legend_handles_labels()
    fig.legend(handles=handles + data_handles,
               labels=[h.get_label() for h in handles] + data_names,
               loc="outside right center", fontsize=8, frameon=False)
    slice_note = "" if x_ND.shape[1] == 2 else " (slice through the data mean)"
    fig.suptitle((title + ": " if title else "") + "how the gate divides the input" + slice_note
                 + (f"\n{note}" if note else ""), fontsize=11)
    return fig


def _partition_1d(gate_fn: GateFunction, x_N1: np.ndarray, feature_names: Sequence[str] | None,
                  title: str) -> Figure:
    grid_G = np.linspace(x_N1.min(), x_N1.max(), 400)
    p_GE = gate_fn(grid_G[:, None])
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot()
    colors = expert_colors(p_GE.shape[1])
    ax.stackplot(grid_G, p_GE.T, colors=colors, alpha=0.85,
                 labels=[f"expert {e}" for e in range(p_GE.shape[1])])
    shown = x_N1[subsample(len(x_N1)), 0]
    ax.plot(shown, np.full(len(shown), -0.04), "|", color="k", ms=6, alpha=0.4)
    ax.set(xlim=(grid_G[0], grid_G[-1]), ylim=(-0.08, 1), ylabel="mixing proportion p_e(x)",
           xlabel=(feature_names[0] if feature_names else "x"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.set_title((title + ": " if title else "") + "how the gate divides the input (data: ticks)",
                 fontsize=11)
    return fig


def plot_mixing_proportions(model: nn.Module, x_N2: np.ndarray, *,
                            axis_labels: tuple[str, str] = ("F1 (kHz)", "F2 (kHz)")) -> Figure:
    """Each expert's mixing proportion p_e(x) over the input plane, one panel per expert."""
    m0, m1, points = grid(x_N2, steps=120)
    p_GE = gate_probs(model, points)
    n = p_GE.shape[1]
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = new_figure(3.1 * cols + 1.0, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    mean_E = gate_probs(model, x_N2).mean(0)
    image = None
    for e, ax in enumerate(axes.flat):
        if e >= n:
            ax.axis("off")
            continue
        image = ax.pcolormesh(m0, m1, p_GE[:, e].reshape(m0.shape), vmin=0, vmax=1,
                              cmap="viridis", shading="auto")
        ax.scatter(x_N2[:, 0], x_N2[:, 1], s=3, c="w", alpha=0.5)
        ax.set_title(f"expert {e}: mean p = {mean_E[e]:.2f}", fontsize=9)
        if e % cols == 0:
            ax.set_ylabel(axis_labels[1])
        if e // cols == rows - 1:
            ax.set_xlabel(axis_labels[0])
    fig.colorbar(image, ax=axes, shrink=0.8, label="mixing proportion")
    return fig
