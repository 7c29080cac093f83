"""Figures of what a mixture learned, for models with two input features (matplotlib, Agg).

Shape legend: N rows, E experts, C classes, G grid points.

Axes follow the paper's Figure 2: the first feature horizontal, the second vertical.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, even where a display exists
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from moekit.analysis import moe_output  # noqa: E402
from moekit.io import atomic_path  # noqa: E402
from moekit.layers import MixtureOfExperts  # noqa: E402

CLASS_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Okabe & Ito (2008), the colour-blind-safe qualitative palette, strongest colours first; its black
# is replaced by grey so that an expert's colour never hides the black data markers and lines.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
             "#999999")


def expert_colors(n: int) -> list[str]:
    """One colour per expert: Okabe-Ito up to 8; beyond that tab20 (not colour-blind safe, so
    figures with more than 8 experts also label experts by number)."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    cmap = plt.get_cmap("tab20")
    return [matplotlib.colors.to_hex(cmap(i % 20)) for i in range(n)]


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write a figure atomically as PNG and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(x_N2: np.ndarray, steps: int = 200, margin: float = 0.08, floor: float = 0.0
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``steps`` x ``steps`` grid over the points' box widened by ``margin`` of its span, plus
    ``floor`` (so that a constant feature still spans something): the two meshgrid coordinate
    arrays and the grid points (G, 2), G = steps^2, first coordinate fastest."""
    lo, hi = x_N2.min(0), x_N2.max(0)
    pad = (hi - lo) * margin + floor
    g0 = np.linspace(lo[0] - pad[0], hi[0] + pad[0], steps)
    g1 = np.linspace(lo[1] - pad[1], hi[1] + pad[1], steps)
    m0, m1 = np.meshgrid(g0, g1)
    return m0, m1, np.stack([m0.ravel(), m1.ravel()], axis=1)


@torch.no_grad()
def gate_probs(model: nn.Module, x_ND: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """The gate's distribution p(x) on numpy rows, (N, E), in evaluation mode."""
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        parts = [moe_output(model(torch.as_tensor(x_ND[i:i + batch_size], dtype=dtype)),
                            "gate_probs").routing.probs_NE.double().numpy()
                 for i in range(0, len(x_ND), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(parts)


def scatter_classes(ax: Axes, x_N2: np.ndarray, y_N: np.ndarray, labels: Sequence[str]) -> None:
    for c, label in enumerate(labels):
        pts = x_N2[y_N == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, marker=CLASS_MARKERS[c % len(CLASS_MARKERS)],
                   facecolors="none", edgecolors="0.35", linewidths=0.7, label=label)


@torch.no_grad()
def expert_line(model: MixtureOfExperts, expert: int, classes: tuple[int, int]
                ) -> tuple[np.ndarray, float]:
    """Expert ``expert``'s decision line between two classes: w . x + b = 0 (linear experts)."""
    w_DC = model.experts.w_EDO[expert].double().numpy()
    b_C = model.experts.b_EO[expert].double().numpy()
    a, c = classes
    return w_DC[:, a] - w_DC[:, c], float(b_C[a] - b_C[c])


def expert_class_pairs(model: MixtureOfExperts, x_N2: np.ndarray, y_N: np.ndarray) -> list[tuple[int, int]]:
    """For each expert, the two classes it is most responsible for (by gate-weighted counts)."""
    p_NE = gate_probs(model, x_N2)
    n_classes = int(y_N.max()) + 1
    weight_EC = np.stack([p_NE[y_N == c].sum(0) for c in range(n_classes)], axis=1)
    return [tuple(int(c) for c in np.argsort(-row)[:2]) for row in weight_EC]


def _draw_line(ax: Axes, normal: np.ndarray, offset: float, xlim, ylim, **style) -> None:
    """Draw {x : normal . x + offset = 0} across the axes' box."""
    x0 = np.linspace(*xlim, 400)
    if abs(normal[1]) > 1e-12:
        x1 = -(normal[0] * x0 + offset) / normal[1]
    else:
        x0 = np.full(400, -offset / normal[0]) if abs(normal[0]) > 1e-12 else x0
        x1 = np.linspace(*ylim, 400)
    inside = (x1 >= ylim[0]) & (x1 <= ylim[1]) & (x0 >= xlim[0]) & (x0 <= xlim[1])
    ax.plot(np.where(inside, x0, np.nan), np.where(inside, x1, np.nan), **style)


def active_experts(model: MixtureOfExperts, x_N2: np.ndarray, threshold: float = 0.01) -> list[bool]:
    return list(gate_probs(model, x_N2).mean(0) >= threshold)


def plot_partition(model: MixtureOfExperts, x_N2: np.ndarray, y_N: np.ndarray,
                   labels: Sequence[str], *, ax: Axes | None = None,
                   axis_labels: tuple[str, str] = ("F1 (kHz)", "F2 (kHz)"),
                   title: str = "") -> Figure:
    """The paper's Figure 2: data, each active expert's decision line, and the gate's boundaries."""
    fig = ax.figure if ax is not None else plt.figure(figsize=(6.4, 5.2))
    ax = ax or fig.add_subplot()
    scatter_classes(ax, x_N2, y_N, labels)
    m0, m1, points = _grid(x_N2)
    p_GE = gate_probs(model, points)
    winner = p_GE.argmax(1).reshape(m0.shape)
    xlim, ylim = (m0.min(), m0.max()), (m1.min(), m1.max())
    active = active_experts(model, x_N2)
    pairs = expert_class_pairs(model, x_N2, y_N)
    colors = expert_colors(model.config.n_experts)
    for e in range(model.config.n_experts):
        if (winner == e).any() and active[e]:
            ax.contour(m0, m1, (winner == e).astype(float), levels=[0.5], colors="k",
                       linewidths=2.2, linestyles="-")
    for e, (is_active, pair) in enumerate(zip(active, pairs)):
        if not is_active:
            continue
        normal, offset = expert_line(model, e, pair)
        _draw_line(ax, normal, offset, xlim, ylim, color=colors[e], lw=1.6, ls="--",
                   label=f"expert {e}: {labels[pair[0]]} | {labels[pair[1]]}")
    inactive = [str(e) for e, a in enumerate(active) if not a]
    ax.plot([], [], color="k", lw=2.2, label="gate boundary")
    ax.set(xlim=xlim, ylim=ylim, xlabel=axis_labels[0], ylabel=axis_labels[1])
    note = f"inactive experts (mean proportion < 1%): {', '.join(inactive)}" if inactive else \
        "every expert active"
    ax.set_title((title + "\n" if title else "") + note, fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return fig


def plot_mixing_proportions(model: MixtureOfExperts, x_N2: np.ndarray, y_N: np.ndarray,
                            labels: Sequence[str], *,
                            axis_labels: tuple[str, str] = ("F1 (kHz)", "F2 (kHz)")) -> Figure:
    """Each expert's mixing proportion p_e(x) over the input plane, one panel per expert."""
    n = model.config.n_experts
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.8 * rows), squeeze=False,
                             sharex=True, sharey=True)
    m0, m1, points = _grid(x_N2, steps=120)
    p_GE = gate_probs(model, points)
    mean_E = gate_probs(model, x_N2).mean(0)
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


def plot_lines_over_time(model: MixtureOfExperts, snapshots: Sequence[tuple[int, dict]],
                         x_N2: np.ndarray, y_N: np.ndarray, labels: Sequence[str], *,
                         panels: int = 6,
                         axis_labels: tuple[str, str] = ("F1 (kHz)", "F2 (kHz)")) -> Figure:
    """The paper's Figure 3: each expert's decision line at several epochs of one run.

    Lines are drawn between the classes each expert handles at the end of the run; their width
    follows the expert's mean mixing proportion at that epoch (hairlines: effectively 0).
    """
    chosen = [snapshots[int(i)] for i in np.unique(np.linspace(0, len(snapshots) - 1, panels).round())]
    cols = min(len(chosen), 3)
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.8, 3.2 * rows), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    final_pairs = expert_class_pairs(model, x_N2, y_N)
    colors = expert_colors(len(final_pairs))
    m0, m1, _ = _grid(x_N2)
    xlim, ylim = (m0.min(), m0.max()), (m1.min(), m1.max())
    frame = MixtureOfExperts.from_config(model.config).to(next(model.parameters()).dtype)
    for ax, (epoch, state) in zip(axes.flat, chosen):
        frame.load_state_dict(state)
        scatter_classes(ax, x_N2, y_N, labels)
        mean_E = gate_probs(frame, x_N2).mean(0)
        for e, pair in enumerate(final_pairs):
            normal, offset = expert_line(frame, e, pair)
            _draw_line(ax, normal, offset, xlim, ylim, color=colors[e],
                       lw=0.4 + 3.0 * mean_E[e], alpha=0.9 if mean_E[e] >= 0.01 else 0.35)
        ax.set(xlim=xlim, ylim=ylim, title=f"epoch {epoch}")
    handles = [plt.Line2D([], [], color=colors[e], lw=2,
                          label=f"expert {e}: {labels[a]} | {labels[b]}")
               for e, (a, b) in enumerate(final_pairs)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(axis_labels[1])
    for ax in axes[-1, :]:
        ax.set_xlabel(axis_labels[0])
    return fig


def plot_training_curves(curves: dict[str, np.ndarray], criterion: float, *,
                         ylabel: str = "average squared error") -> Figure:
    """The stop metric against epochs for each system: median over runs and the 10-90% band."""
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    colors = expert_colors(len(curves))  # one colour per system, from the experts' palette
    for i, (name, curves_RT) in enumerate(curves.items()):
        last = int(np.max(np.nonzero(~np.isnan(curves_RT).all(0))[0])) + 1
        c_RT = curves_RT[:, :last]
        # A run that stopped holds its last value, so the band shows every run to the end.
        filled = _hold_last(c_RT)
        epochs = np.arange(last)
        ax.plot(epochs, np.median(filled, 0), color=colors[i], label=name)
        ax.fill_between(epochs, np.percentile(filled, 10, 0), np.percentile(filled, 90, 0),
                        color=colors[i], alpha=0.2)
    ax.axhline(criterion, color="k", ls=":", lw=1, label=f"criterion {criterion}")
    ax.set(xlabel="epoch", ylabel=ylabel, yscale="log")
    ax.legend(fontsize=8)
    return fig


def _hold_last(c_RT: np.ndarray) -> np.ndarray:
    out = c_RT.copy()
    for r in range(out.shape[0]):
        valid = np.nonzero(~np.isnan(out[r]))[0]
        if valid.size:
            out[r, valid[-1] + 1:] = out[r, valid[-1]]
    return out
