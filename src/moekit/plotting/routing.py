"""Figures of routing statistics: expert by class, load per expert, routing over training,
co-activation, and expert importance.

Shape legend: E experts, C classes (or target bins).

Experts keep one colour across every figure (:func:`~moekit.plotting.style.expert_colors`); heat
maps use cividis. Each function returns a Figure; write it with
:func:`~moekit.plotting.style.save_figure`. The gate's partition is in
:mod:`moekit.plotting.partition`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moekit.fitting.history import History
from moekit.plotting.style import HEATMAP, expert_colors, new_figure


def annotated_heatmap(ax, values_RC: np.ndarray, text_RC: np.ndarray, vmax: float = 1.0):
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
    fig = new_figure(1.3 + 0.95 * n_labels + 1.6, 1.2 + 0.42 * n_experts + 0.6)
    ax = fig.add_subplot()
    image = annotated_heatmap(ax, share_EC, counts_EC.astype(int).astype(str))
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
    fig = new_figure(max(5.0, 0.75 * n + 2.5), 3.9)
    ax = fig.add_subplot()
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
    (see :class:`moekit.analysis.over_training.RoutingHistory`)."""
    history = history if isinstance(history, History) else History(list(history))
    loads = sorted({int(m.group(1)) for k in history.keys
                    if (m := re.fullmatch(r"routing_load_(\d+)", k))})
    if not loads:
        raise ValueError(f"plot_routing_over_training: the history has no routing_load_<e> "
                         f"columns; it has {history.keys}. Fit with callbacks=[RoutingHistory(x)].")
    epoch = np.asarray(history[:, "epoch"], dtype=np.float64)
    fig = new_figure(7.5, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for e, color in zip(loads, expert_colors(len(loads)), strict=True):
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
    fig = new_figure(1.8 + 0.55 * n, 1.4 + 0.5 * n)
    ax = fig.add_subplot()
    image = annotated_heatmap(ax, np.nan_to_num(shown_EE, nan=0.0), text_EE)
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
    fig = new_figure(10.0, 1.6 + 0.38 * n)
    left, right = fig.subplots(1, 2, sharey=True)
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
