"""Figures of routing analysis: the gate's partition of the input, expert-by-class, load, entropy
over training, co-activation, and expert importance (matplotlib, Agg).

Shape legend: N rows, D input features, E experts, C classes (or target bins), G grid points.

Experts keep one colour across every figure (Okabe-Ito, colour-blind safe, up to 8 experts);
heat maps use cividis, which reads the same with every form of colour blindness. Each function
returns a Figure; write it with :func:`moekit.plots.save_figure`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from moekit.history import History
from moekit.plots import CLASS_MARKERS, _grid, expert_colors, gate_probs  # gate_probs re-exported

HEATMAP = "cividis"
MAX_POINTS = 2000  # data points drawn over a partition (a fixed subsample beyond that)


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
        d = x_ND.shape[1]
        if d == 2:
            names = tuple(feature_names) if feature_names else ("x1", "x2")
            return cls(np.zeros(2), np.eye(2), names)  # type: ignore[arg-type]
        mean_D = x_ND.mean(0)
        _, _, vt_DD = np.linalg.svd(x_ND - mean_D, full_matrices=False)
        return cls(mean_D, vt_DD[:2], ("principal component 1", "principal component 2"))

    def project(self, x_ND: np.ndarray) -> np.ndarray:
        return (x_ND - self.origin_D) @ self.basis_2D.T

    def lift(self, uv_G2: np.ndarray) -> np.ndarray:
        return self.origin_D + uv_G2 @ self.basis_2D


def _subsample(n: int) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))


def _scatter_labels(ax, uv_N2: np.ndarray, labels_N: np.ndarray | None,
                    label_names: Sequence[str] | None) -> None:
    keep = _subsample(len(uv_N2))
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


def plot_gate_partition(model: nn.Module, x_ND: np.ndarray, labels_N: np.ndarray | None = None,
                        label_names: Sequence[str] | None = None, *,
                        feature_names: Sequence[str] | None = None, title: str = "",
                        steps: int = 160) -> Figure:
    """The gate's partition of the input plane: the most probable expert (left) and the soft
    proportions (right, each point's colour the p-weighted blend of the experts' colours), with the
    data on top. One feature: p_e(x) along x instead."""
    x_ND = np.asarray(x_ND, dtype=np.float64)
    if x_ND.shape[1] == 1:
        return _plot_gate_1d(model, x_ND, feature_names, title)
    plane = Plane.of(x_ND, feature_names)
    uv_N2 = plane.project(x_ND)
    m0, m1, uv_G2 = _grid(uv_N2, steps, margin=0.06, floor=1e-9)
    p_GE = gate_probs(model, plane.lift(uv_G2))
    n_experts = p_GE.shape[1]
    colors_E3 = np.array([to_rgb(c) for c in expert_colors(n_experts)])
    winner_G = p_GE.argmax(1)
    tint_E3 = 0.45 * colors_E3 + 0.55  # lighter fills, so the data stays visible
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.9), sharex=True, sharey=True,
                             layout="constrained")
    soft_G3 = p_GE @ colors_E3
    panels = ((axes[0], tint_E3[winner_G], "most probable expert (argmax of p)"),
              (axes[1], 0.75 * soft_G3 + 0.25, "soft proportions (colours mixed by p)"))
    for ax, image, what in panels:
        ax.imshow(image.reshape(steps, steps, 3), origin="lower", aspect="auto",
                  extent=(m0[0, 0], m0[0, -1], m1[0, 0], m1[-1, 0]), interpolation="nearest")
        ax.contour(m0, m1, winner_G.reshape(m0.shape), levels=np.arange(n_experts) + 0.5,
                   colors="k", linewidths=0.9)
        _scatter_labels(ax, uv_N2, labels_N, label_names)
        ax.set_title(what, fontsize=10)
        ax.set_xlabel(plane.names[0])
    axes[0].set_ylabel(plane.names[1])
    share_E = np.bincount(winner_G, minlength=n_experts) / len(winner_G)
    handles = [Patch(facecolor=colors_E3[e], label=f"expert {e}"
                     + ("" if share_E[e] else " (wins nowhere in view)"))
               for e in range(n_experts)]
    class_handles, class_names = axes[0].get_legend_handles_labels()
    fig.legend(handles=handles + class_handles, labels=[h.get_label() for h in handles]
               + class_names, loc="outside right center", fontsize=8, frameon=False)
    slice_note = "" if x_ND.shape[1] == 2 else " (slice through the data mean)"
    fig.suptitle((title + ": " if title else "") + "how the gate divides the input" + slice_note,
                 fontsize=11)
    return fig


def _plot_gate_1d(model: nn.Module, x_N1: np.ndarray, feature_names, title: str) -> Figure:
    grid_G = np.linspace(x_N1.min(), x_N1.max(), 400)
    p_GE = gate_probs(model, grid_G[:, None])
    fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    colors = expert_colors(p_GE.shape[1])
    ax.stackplot(grid_G, p_GE.T, colors=colors, alpha=0.85,
                 labels=[f"expert {e}" for e in range(p_GE.shape[1])])
    ax.plot(x_N1[:, 0], np.full(len(x_N1), -0.04), "|", color="k", ms=6, alpha=0.4)
    ax.set(xlim=(grid_G[0], grid_G[-1]), ylim=(-0.08, 1), ylabel="mixing proportion p_e(x)",
           xlabel=(feature_names[0] if feature_names else "x"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.set_title((title + ": " if title else "") + "how the gate divides the input (data: ticks)",
                 fontsize=11)
    return fig


def _annotated_heatmap(ax, values_RC: np.ndarray, text_RC: np.ndarray, vmax: float = 1.0):
    image = ax.imshow(values_RC, cmap=HEATMAP, vmin=0, vmax=vmax, aspect="auto")
    for (r, c), v in np.ndenumerate(values_RC):
        ax.text(c, r, text_RC[r, c], ha="center", va="center", fontsize=8,
                color="k" if v > 0.55 * vmax else "w")
    return image


def plot_expert_by_label(counts_EC: np.ndarray, label_names: Sequence[str], *, nmi: float,
                         kind: str = "class", title: str = "") -> Figure:
    """Where each class goes: colour = the share of the class's rows whose primary expert is e
    (each column sums to 1), text = the row count."""
    counts_EC = np.asarray(counts_EC, dtype=np.float64)
    n_experts, n_labels = counts_EC.shape
    share_EC = counts_EC / np.maximum(counts_EC.sum(0, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.3 + 0.95 * n_labels + 1.6, 1.2 + 0.42 * n_experts + 0.6),
                           layout="constrained")
    image = _annotated_heatmap(ax, share_EC, counts_EC.astype(int).astype(str))
    crowded = n_labels > 5 or max(len(str(n)) for n in label_names) * n_labels > 40
    ax.set_xticks(range(n_labels), list(label_names), rotation=25 if crowded else 0,
                  ha="right" if crowded else "center", rotation_mode="anchor")
    ax.set_yticks(range(n_experts), [f"expert {e}" for e in range(n_experts)])
    ax.set_xlabel(kind)
    fig.colorbar(image, ax=ax, label=f"share of the {kind}'s rows")
    ax.set_title((title + "\n" if title else "") + f"Primary expert by {kind} "
                 f"(NMI = {nmi:.2f})", fontsize=10)
    return fig


def plot_load(stats: dict[str, Any], *, title: str = "") -> Figure:
    """Each expert's load (share of the routed mass) and primary share, against the uniform
    share 1/E and the dead-expert threshold; the title gives CV, max/mean and the entropy ratio."""
    load_E = np.asarray(stats["load"]["load"])
    primary_E = np.asarray(stats["load"]["primary_share"])
    n = len(load_E)
    colors = expert_colors(n)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * n + 2.5), 3.9), layout="constrained")
    at = np.arange(n)
    ax.bar(at - 0.2, load_E, 0.4, color=colors, edgecolor="k", linewidth=0.5,
           label="load (mean gate share)" if stats["dense"] else "load (share of assignments)")
    ax.bar(at + 0.2, primary_E, 0.4, color=colors, edgecolor="k", linewidth=0.5, hatch="///",
           alpha=0.55, label="rows where it is the primary expert")
    ax.axhline(1 / n, color="k", ls="--", lw=1, label=f"uniform, 1/E = {1 / n:.2f}")
    ax.axhline(stats["dead_threshold"], color="0.4", ls=":", lw=1,
               label=f"dead below {stats['dead_threshold']:g}")
    for e in stats["dead_experts"]:
        ax.text(e, max(load_E[e], primary_E[e]) + 0.01, "dead", ha="center", fontsize=8)
    ax.set_xticks(at, [str(e) for e in range(n)])
    ax.set(xlabel="expert", ylabel="share of rows", ylim=(0, max(1 / n, *load_E, *primary_E) * 1.2))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    imbalance, entropy = stats["imbalance"], stats["entropy"]
    ax.set_title((title + "\n" if title else "") + f"Load per expert: CV {_fmt(imbalance['cv'])}, "
                 f"max/mean {_fmt(imbalance['max_over_mean'])}, gate entropy / log E "
                 f"{_fmt(entropy['ratio'])}", fontsize=10)
    return fig


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def plot_routing_over_training(history: History | list[dict[str, Any]], *, title: str = ""
                               ) -> Figure:
    """Each expert's load and the gate's entropy ratio over training, from history records with
    ``epoch``, ``routing_load_<e>`` and ``routing_entropy_ratio``
    (see :class:`moekit.analysis.RoutingHistory`)."""
    history = history if isinstance(history, History) else History(list(history))
    loads = sorted({int(m.group(1)) for k in history.keys
                    if (m := re.fullmatch(r"routing_load_(\d+)", k))})
    if not loads:
        raise ValueError(f"plot_routing_over_training: the history has no routing_load_<e> "
                         f"columns; it has {history.keys}. Fit with callbacks=[RoutingHistory(x)].")
    epoch = np.asarray(history[:, "epoch"], dtype=np.float64)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True,
                                      layout="constrained", height_ratios=(2, 1))
    for e, color in zip(loads, expert_colors(len(loads))):
        top.plot(epoch, np.asarray(history[:, f"routing_load_{e}"], dtype=float), color=color,
                 lw=1.6, label=f"expert {e}")
    top.axhline(1 / len(loads), color="k", ls="--", lw=0.8, label=f"uniform, 1/E = "
                f"{1 / len(loads):.2f}")
    top.set(ylabel="load (share of rows)", ylim=(0, None))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    bottom.plot(epoch, np.asarray(history[:, "routing_entropy_ratio"], dtype=float), color="k")
    bottom.set(ylabel="gate entropy / log E", xlabel="epoch", ylim=(0, 1.02))
    if epoch.size and epoch.max() > 50:  # a long run: early epochs matter most
        bottom.set_xscale("symlog", linthresh=1)  # linear below 1, so epoch 0 stays on the axis
    if epoch.size:
        bottom.set_xlim(epoch.min(), epoch.max())
    top.set_title((title + ": " if title else "") + "routing over training", fontsize=11)
    return fig


def plot_coactivation(conditional_EE: np.ndarray, *, title: str = "") -> Figure:
    """P(expert j runs | expert i runs) for a routed layer; the diagonal (1) is left blank."""
    cond_EE = np.asarray(conditional_EE, dtype=np.float64)
    n = cond_EE.shape[0]
    shown_EE = np.where(np.eye(n, dtype=bool), np.nan, cond_EE)
    text_EE = np.array([["" if i == j else f"{v:.2f}" for j, v in enumerate(row)]
                        for i, row in enumerate(cond_EE)])
    fig, ax = plt.subplots(figsize=(1.8 + 0.55 * n, 1.4 + 0.5 * n), layout="constrained")
    image = _annotated_heatmap(ax, np.nan_to_num(shown_EE, nan=0.0), text_EE)
    ax.set_xticks(range(n), [str(e) for e in range(n)])
    ax.set_yticks(range(n), [str(e) for e in range(n)])
    ax.set(xlabel="expert j", ylabel="expert i")
    fig.colorbar(image, ax=ax, label="P(j also runs | i runs)")
    ax.set_title((title + "\n" if title else "") + "Co-activation of experts", fontsize=10)
    return fig


def plot_importance(importance: dict[str, Any], *, title: str = "") -> Figure:
    """The change of the task metric when each expert is ablated, and when every row is forced to
    it; bars on the 'worse' side of 0 mean the expert matters."""
    rows = importance["experts"]
    n = len(rows)
    colors = expert_colors(n)
    ablated = np.array([np.nan if r["ablated_change"] is None else r["ablated_change"]
                        for r in rows])
    forced = np.array([r["forced_change"] for r in rows], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 1.6 + 0.38 * n), sharey=True,
                                      layout="constrained")
    at = np.arange(n)
    for ax, values, what in ((left, ablated, "expert removed (others renormalised)"),
                             (right, forced, "every row forced to the expert")):
        bars = ax.barh(at, np.nan_to_num(values), color=colors, edgecolor="k", linewidth=0.5)
        tiny = 1e-3 * np.nanmax(np.abs(values), initial=0.0)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else "0" if abs(v) <= tiny
                                   else f"{v:+.3g}" for v in values], padding=3, fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        lo, hi = min(0.0, np.nanmin(values, initial=0.0)), max(0.0, np.nanmax(values, initial=0.0))
        span = (hi - lo) or 1.0
        ax.set_xlim(lo - 0.18 * span, hi + 0.18 * span)  # room for the labels on either side
        ax.set_title(what, fontsize=10)
        ax.set_xlabel(f"change of {importance['metric']} ("
                      f"{'higher' if importance['higher_is_better'] else 'lower'} is better)")
    left.set_yticks(at, [f"expert {r['expert']}" for r in rows])
    left.invert_yaxis()
    fig.suptitle((title + ": " if title else "") + f"Expert importance (baseline "
                 f"{importance['metric']} {importance['baseline']:.4g})", fontsize=11)
    return fig
