"""What each linear expert decides: its decision line between the two classes it handles most, on
two input features, and those lines over training (the paper's Figure 3).

Shape legend: N rows, D = 2 input features, E experts, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from moekit.nn.dense import MixtureOfExperts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moekit.plotting.partition import ExpertLine

# matplotlib (through moekit.plotting.partition and .style) is imported in the functions that use
# it: the vowel experiment's measures import INACTIVE_PROPORTION from here in every worker process
# of `moekit vowels`, which draws nothing.
INACTIVE_PROPORTION = 0.01  # a mean mixing proportion below this is "effectively 0" (the paper's)


@torch.no_grad()
def expert_line(model: MixtureOfExperts, expert: int, classes: tuple[int, int]
                ) -> tuple[np.ndarray, float]:
    """Expert ``expert``'s decision line between two classes: w . x + b = 0 (linear experts)."""
    w_DC = model.experts.w_EDO[expert].double().numpy()
    b_C = model.experts.b_EO[expert].double().numpy()
    a, c = classes
    return w_DC[:, a] - w_DC[:, c], float(b_C[a] - b_C[c])


def expert_class_pairs(model: MixtureOfExperts, x_N2: np.ndarray, y_N: np.ndarray
                       ) -> list[tuple[int, int]]:
    """For each expert, the two classes it is most responsible for (by gate-weighted counts)."""
    from moekit.plotting.partition import gate_probs  # matplotlib: see INACTIVE_PROPORTION

    p_NE = gate_probs(model, x_N2)
    n_classes = int(y_N.max()) + 1
    weight_EC = np.stack([p_NE[y_N == c].sum(0) for c in range(n_classes)], axis=1)
    return [tuple(int(c) for c in np.argsort(-row)[:2]) for row in weight_EC]


def active_experts(model: MixtureOfExperts, x_N2: np.ndarray,
                   threshold: float = INACTIVE_PROPORTION) -> list[bool]:
    """Whether each expert's mean mixing proportion over ``x_N2`` reaches ``threshold``."""
    from moekit.plotting.partition import gate_probs  # matplotlib: see INACTIVE_PROPORTION

    return list(gate_probs(model, x_N2).mean(0) >= threshold)


def expert_decision_lines(model: MixtureOfExperts, x_N2: np.ndarray, y_N: np.ndarray,
                          labels: Sequence[str]) -> list[ExpertLine]:
    """The decision line of every active expert, between the two classes it handles most: the
    lines of the paper's Figure 2, for :func:`~moekit.plotting.partition.plot_partition`."""
    from moekit.plotting.partition import ExpertLine  # matplotlib: see INACTIVE_PROPORTION

    pairs = expert_class_pairs(model, x_N2, y_N)
    lines = []
    for e, (is_active, pair) in enumerate(zip(active_experts(model, x_N2), pairs, strict=True)):
        if is_active:
            normal, offset = expert_line(model, e, pair)
            lines.append(ExpertLine(e, normal, offset,
                                    f"expert {e}: {labels[pair[0]]} | {labels[pair[1]]}"))
    return lines


def plot_lines_over_time(model: MixtureOfExperts, snapshots: Sequence[tuple[int, dict]],
                         x_N2: np.ndarray, y_N: np.ndarray, labels: Sequence[str], *,
                         panels: int = 6,
                         axis_labels: tuple[str, str] = ("F1 (kHz)", "F2 (kHz)")) -> Figure:
    """The paper's Figure 3: each expert's decision line at several epochs of one run.

    Lines are drawn between the classes each expert handles at the end of the run; their width
    follows the expert's mean mixing proportion at that epoch (hairlines: effectively 0).
    """
    from matplotlib.lines import Line2D  # matplotlib here only: see INACTIVE_PROPORTION

    from moekit.plotting.partition import gate_probs
    from moekit.plotting.style import draw_line, expert_colors, grid, new_figure, scatter_labels

    at = np.unique(np.linspace(0, len(snapshots) - 1, panels).round())
    chosen = [snapshots[int(i)] for i in at]
    cols = min(len(chosen), 3)
    rows = int(np.ceil(len(chosen) / cols))
    fig = new_figure(3.6 * cols + 1.8, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    final_pairs = expert_class_pairs(model, x_N2, y_N)
    colors = expert_colors(len(final_pairs))
    m0, m1, _ = grid(x_N2)
    xlim, ylim = (m0.min(), m0.max()), (m1.min(), m1.max())
    frame = MixtureOfExperts.from_config(model.config).to(next(model.parameters()).dtype)
    for ax, (epoch, state) in zip(axes.flat, chosen, strict=False):
        frame.load_state_dict(state)
        scatter_labels(ax, x_N2, y_N, list(labels))
        mean_E = gate_probs(frame, x_N2).mean(0)
        for e, pair in enumerate(final_pairs):
            normal, offset = expert_line(frame, e, pair)
            draw_line(ax, normal, offset, xlim, ylim, color=colors[e],
                      lw=0.4 + 3.0 * mean_E[e], alpha=0.9 if mean_E[e] >= 0.01 else 0.35)
        ax.set(xlim=xlim, ylim=ylim, title=f"epoch {epoch}")
    handles = [Line2D([], [], color=colors[e], lw=2, label=f"expert {e}: {labels[a]} | {labels[b]}")
               for e, (a, b) in enumerate(final_pairs)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    for ax in axes.flat[len(chosen):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(axis_labels[1])
    for ax in axes[-1, :]:
        ax.set_xlabel(axis_labels[0])
    return fig
