"""Figures of a language model's routing, layer by layer, and of its training beside its dense
twin: expert load, experts against token categories, the selectivity curve (NMI over depth),
transitions between consecutive layers, repeat rates against chance, ablation importance, the
validation curves, and the routing saturation over training. Text coloured by its experts:
:mod:`moekit.plotting.lm_text`.

Shape legend: L MoE layers, E experts, C token categories, S evaluation (or snapshot) steps.

Every function takes plain arrays (what ``lm_analysis.json`` holds) and returns a Figure; write it
with :func:`~moekit.plotting.style.save_figure`. Heat maps of shares use cividis from 0; the
ablation map, whose values change sign, a diverging map centred on 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moekit.plotting.routing import annotated_heatmap
from moekit.plotting.style import OKABE_ITO, expert_colors, new_figure

DIVERGING = "PuOr_r"  # colour-blind safe; orange = worse (Δ bpb > 0), purple = better


def _grid(n_panels: int, columns: int) -> tuple[int, int]:
    cols = max(1, min(columns, n_panels))
    return -(-n_panels // cols), cols


def _panels(fig: Figure, n_panels: int, columns: int) -> list[Any]:
    rows, cols = _grid(n_panels, columns)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    return list(axes[:n_panels])


def _category_ticks(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)), list(names), rotation=35, ha="right",
                  rotation_mode="anchor", fontsize=8)


def plot_layer_load(load_LE: np.ndarray, dead_experts: Sequence[Sequence[int]], *,
                    title: str = "") -> Figure:
    """Each layer's load, the share of the T*K assignments each expert takes (a row sums to 1),
    annotated in percent; dead experts (no token at all) are marked."""
    load_LE = np.asarray(load_LE, dtype=np.float64)
    n_layers, n_experts = load_LE.shape
    text_LE = np.array([[f"{100 * v:.0f}%" for v in row] for row in load_LE], dtype=object)
    for layer, dead in enumerate(dead_experts):
        for e in dead:
            text_LE[layer, e] = "dead"
    fig = new_figure(1.8 + 0.62 * n_experts, 1.3 + 0.42 * n_layers)
    ax = fig.add_subplot()
    image = annotated_heatmap(ax, load_LE, text_LE, vmax=max(float(load_LE.max()), 1e-9))
    ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)])
    ax.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="share of assignments")
    ax.set_title((title + "\n" if title else "") + f"Load per layer (uniform: 1/E = "
                 f"{100 / n_experts:.3g}%)", fontsize=10)
    return fig


def plot_category_shares(share_LEC: np.ndarray, category_names: Sequence[str], *,
                         nmi_L: Sequence[float], top_k: int, columns: int = 2,
                         title: str = "") -> Figure:
    """Per layer, P(e in S | c): the share of category c's tokens that expert e processes (among
    its K choices; a column sums to K), annotated in percent; categories with no tokens are left
    out by the caller (pass their columns or not)."""
    share_LEC = np.asarray(share_LEC, dtype=np.float64)
    n_layers, n_experts, n_cats = share_LEC.shape
    rows, cols = _grid(n_layers, columns)
    fig = new_figure(cols * (1.4 + 0.5 * n_cats) + 1.0, rows * (1.5 + 0.32 * n_experts) + 0.4)
    vmax = max(float(share_LEC.max()), 1e-9)
    image = None
    for layer, ax in enumerate(_panels(fig, n_layers, columns)):
        text_EC = np.array([[f"{100 * v:.0f}" for v in row] for row in share_LEC[layer]])
        image = annotated_heatmap(ax, share_LEC[layer], text_EC, vmax=vmax)
        _category_ticks(ax, category_names)
        ax.set_yticks(range(n_experts), [f"expert {e}" for e in range(n_experts)], fontsize=8)
        ax.set_title(f"layer {layer}: NMI = {float(nmi_L[layer]):.3f}", fontsize=9)
    fig.colorbar(image, ax=fig.axes[:n_layers], shrink=0.8,
                 label=f"share of the category's tokens (sum: K = {top_k})")
    fig.suptitle((title + ": " if title else "") + "Which experts each token category goes to",
                 fontsize=11)
    return fig


def plot_selectivity(nmi_L: Sequence[float], *, input_nmi_L: Sequence[float] | None = None,
                     title: str = "") -> Figure:
    """The selectivity curve: NMI(first-choice expert, token category) at each layer, for the
    category of the byte each position predicts and (optionally) of the byte it reads."""
    nmi_L = np.asarray(nmi_L, dtype=np.float64)
    layers = np.arange(len(nmi_L))
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot()
    curves = [(nmi_L, "category of the predicted (next) byte", OKABE_ITO[0], "o")]
    if input_nmi_L is not None:
        curves.append((np.asarray(input_nmi_L, dtype=np.float64),
                       "category of the byte read", OKABE_ITO[1], "s"))
    top = 0.0
    for values, label, color, marker in curves:
        ax.plot(layers, values, marker=marker, color=color, lw=1.8, label=label)
        for x, v in zip(layers, values, strict=True):
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8, color=color)
        top = max(top, float(np.nanmax(values, initial=0.0)))
    ax.set_xticks(layers, [str(i) for i in layers])
    ax.set(xlabel="layer", ylabel="NMI (0: routing independent of category)",
           ylim=(0, max(0.05, top * 1.3)), xlim=(-0.4, len(nmi_L) - 0.6))
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.set_title((title + ": " if title else "") + "Selectivity over depth", fontsize=11)
    return fig


def plot_transitions(transition_probs_LEE: np.ndarray, *, columns: int = 3, title: str = ""
                     ) -> Figure:
    """P(first choice j at layer l + 1 | first choice i at layer l), one panel per pair of
    consecutive layers (rows sum to 1; independence gives each row the next layer's load)."""
    probs_LEE = np.asarray(transition_probs_LEE, dtype=np.float64)
    n_pairs, n_experts = probs_LEE.shape[:2]
    if n_pairs == 0:
        raise ValueError("plot_transitions: the model has one MoE layer, so there are no "
                         "transitions between layers; skip this figure.")
    rows, cols = _grid(n_pairs, columns)
    fig = new_figure(cols * (1.3 + 0.42 * n_experts) + 1.0, rows * (1.3 + 0.38 * n_experts))
    vmax = max(float(probs_LEE.max()), 1e-9)
    image = None
    for layer, ax in enumerate(_panels(fig, n_pairs, columns)):
        text_EE = np.array([[f"{v:.2f}"[1:] if v < 1 else "1" for v in row]
                            for row in probs_LEE[layer]])
        image = annotated_heatmap(ax, probs_LEE[layer], text_EE, vmax=vmax)
        ticks = [str(e) for e in range(n_experts)]
        ax.set_xticks(range(n_experts), ticks, fontsize=8)
        ax.set_yticks(range(n_experts), ticks, fontsize=8)
        ax.set(xlabel=f"expert at layer {layer + 1}", ylabel=f"expert at layer {layer}")
    fig.colorbar(image, ax=fig.axes[:n_pairs], shrink=0.8, label="P(next layer's expert | this "
                 "layer's expert)")
    fig.suptitle((title + ": " if title else "") + "First choices from one layer to the next",
                 fontsize=11)
    return fig


def plot_repeat_rates(repeats: dict[str, Any], *, top_k: int, title: str = "") -> Figure:
    """How often consecutive tokens repeat an expert at each layer (bars) against the rate of
    independent tokens with the same loads (black ticks): the same first choice, and for K > 1
    sets that share an expert (Mixtral's "first or second choice")."""
    measures = [("same_first", "same first choice", OKABE_ITO[0])]
    if top_k > 1:
        measures.append(("sets_intersect", "share an expert (any of the K)", OKABE_ITO[2]))
    observed = {m: np.asarray(repeats[f"{m}_L"], dtype=np.float64) for m, _, _ in measures}
    chance = {m: np.asarray(repeats[f"{m}_chance_L"], dtype=np.float64) for m, _, _ in measures}
    n_layers = len(observed["same_first"])
    width = 0.8 / len(measures)
    fig = new_figure(max(5.5, 1.2 * n_layers * len(measures) + 2.5), 4.0)
    ax = fig.add_subplot()
    for i, (name, label, color) in enumerate(measures):
        at = np.arange(n_layers) - 0.4 + width * (i + 0.5)
        bars = ax.bar(at, np.nan_to_num(observed[name]), width * 0.92, color=color,
                      edgecolor="k", linewidth=0.5, label=label)
        ax.hlines(chance[name], at - width * 0.46, at + width * 0.46, colors="k", lw=2,
                  label="chance (independent tokens)" if i == 0 else None)
        ratios = [f"×{o / c:.1f}" if c > 0 else "" for o, c in zip(observed[name], chance[name],
                                                                    strict=True)]
        ax.bar_label(bars, labels=ratios, padding=2, fontsize=8)
    ax.set_xticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set(ylabel="share of consecutive token pairs", ylim=(0, 1.12))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title((title + ": " if title else "") + "Consecutive tokens on the same experts "
                 "(×: observed / chance)", fontsize=10)
    return fig


def plot_ablation_deltas(delta_bpb_LEC: np.ndarray, delta_bpb_LE: np.ndarray,
                         category_names: Sequence[str], layers: Sequence[int], *,
                         columns: int = 2, title: str = "") -> Figure:
    """Per ablated layer, the change of bits per byte on each category (and on all tokens, the
    last column) when each expert alone is removed from that layer's choice; positive = worse."""
    delta_LEC = np.asarray(delta_bpb_LEC, dtype=np.float64)
    delta_LEC = np.concatenate([delta_LEC, np.asarray(delta_bpb_LE, float)[:, :, None]], axis=2)
    names = [*category_names, "all"]
    n_layers, n_experts, n_cols = delta_LEC.shape
    limit = max(float(np.nanmax(np.abs(delta_LEC), initial=0.0)), 1e-6)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    rows, cols = _grid(n_layers, columns)
    fig = new_figure(cols * (1.4 + 0.55 * n_cols) + 1.0, rows * (1.5 + 0.32 * n_experts) + 0.4)
    image = None
    digits = int(np.clip(1 - np.floor(np.log10(limit)), 2, 5))  # two significant at the largest
    for i, ax in enumerate(_panels(fig, n_layers, columns)):
        image = ax.imshow(np.nan_to_num(delta_LEC[i]), cmap=DIVERGING, norm=norm, aspect="auto")
        for (e, c), v in np.ndenumerate(delta_LEC[i]):
            ax.text(c, e, "" if np.isnan(v) else f"{v:+.{digits}f}", ha="center", va="center",
                    fontsize=6.5, color="w" if abs(v) > 0.6 * limit else "k")
        ax.axvline(n_cols - 1.5, color="k", lw=1)
        _category_ticks(ax, names)
        ax.set_yticks(range(n_experts), [f"expert {e}" for e in range(n_experts)], fontsize=8)
        ax.set_title(f"layer {layers[i]}: expert removed", fontsize=9)
    fig.colorbar(image, ax=fig.axes[:n_layers], shrink=0.8,
                 label="Δ bits per byte (> 0: worse)")
    fig.suptitle((title + ": " if title else "") + "What each expert is needed for", fontsize=11)
    return fig


def plot_lm_training(evals: Sequence[dict[str, Any]], *, train_steps: Sequence[dict[str, Any]]
                     = (), final: dict[str, float] | None = None, title: str = "") -> Figure:
    """Validation bits per byte of the MoE and its dense twin at each evaluation step (left, with
    the training bits per byte faint behind, a 25-step moving mean), and MoE minus dense (right:
    below 0 the MoE is ahead). ``evals``: records with ``step``, ``moe_val_bpb``,
    ``dense_val_bpb``; ``train_steps``: records with ``step``, ``moe_loss``, ``dense_loss`` (nats);
    ``final``: {'moe': bpb, 'dense': bpb} on the whole validation split."""
    step_S = np.array([r["step"] for r in evals], dtype=np.float64)
    val = {m: np.array([r[f"{m}_val_bpb"] for r in evals], dtype=np.float64)
           for m in ("moe", "dense")}
    colors = {"moe": OKABE_ITO[0], "dense": OKABE_ITO[1]}
    labels = {"moe": "MoE", "dense": "dense twin"}
    fig = new_figure(11.0, 4.0)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    if train_steps:
        steps = np.array([r["step"] for r in train_steps], dtype=np.float64)
        window = min(25, len(steps))
        kernel = np.ones(window) / window
        for m in ("moe", "dense"):
            bpb = np.array([r[f"{m}_loss"] for r in train_steps], dtype=np.float64) / np.log(2)
            left.plot(steps[window - 1:], np.convolve(bpb, kernel, "valid"), color=colors[m],
                      lw=0.9, alpha=0.35, label=f"{labels[m]}, training (moving mean)")
    for m in ("moe", "dense"):
        left.plot(step_S, val[m], marker="o", ms=3.5, color=colors[m], lw=1.6,
                  label=f"{labels[m]}, validation")
    for m in ("moe", "dense") if final else ():
        if m in final:
            left.plot(step_S[-1:], [final[m]], marker="*", ms=11, color=colors[m], ls="none",
                      markeredgecolor="k", label=f"{labels[m]}, whole validation split at the "
                      f"end: {final[m]:.4f}")
    left.set(xlabel="training step", ylabel="bits per byte")
    left.legend(fontsize=7.5, loc="upper right", frameon=False)
    gap = val["moe"] - val["dense"]
    right.axhline(0, color="k", lw=0.8)
    right.plot(step_S, gap, marker="o", ms=3.5, color="k", lw=1.4)
    right.fill_between(step_S, gap, 0, where=gap < 0, color=colors["moe"], alpha=0.3,
                       label="MoE ahead")
    right.fill_between(step_S, gap, 0, where=gap > 0, color=colors["dense"], alpha=0.3,
                       label="dense ahead")
    right.set(xlabel="training step", ylabel="MoE − dense validation bpb")
    right.legend(fontsize=8, frameon=False)
    fig.suptitle((title + ": " if title else "") + "Training: MoE beside its dense twin of equal "
                 "active compute", fontsize=11)
    return fig


def plot_saturation(steps_S: Sequence[int], overlap_SL: np.ndarray, chance_overlap_SL: np.ndarray,
                    *, top1_agreement_SL: np.ndarray | None = None, top_k: int,
                    title: str = "") -> Figure:
    """Routing saturation over training: each snapshot's top-k overlap with the final model's
    routing (mean |A ∩ B| / K over tokens) at every layer against the training step (left, one
    line per layer, the overlap independent tokens would give dashed in the layer's colour), and
    the share of tokens whose first choice is already the final one (right, when given)."""
    steps = np.asarray(steps_S, dtype=np.float64)
    overlap_SL = np.asarray(overlap_SL, dtype=np.float64)
    chance_SL = np.asarray(chance_overlap_SL, dtype=np.float64)
    n_layers = overlap_SL.shape[1]
    colors = expert_colors(n_layers)
    panels = [("overlap", overlap_SL, f"top-{top_k} overlap with the final routing")]
    if top1_agreement_SL is not None:
        panels.append(("top1", np.asarray(top1_agreement_SL, dtype=np.float64),
                       "same first choice as the final model"))
    pad = max(0.02 * float(np.ptp(steps)), 0.5)
    fig = new_figure(4.6 * len(panels) + 1.6, 3.9)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (key, values_SL, ylabel) in zip(axes, panels, strict=True):
        for layer in range(n_layers):
            ax.plot(steps, values_SL[:, layer], marker="o", ms=3.5, lw=1.6, color=colors[layer],
                    label=f"layer {layer}")
            if key == "overlap":
                ax.plot(steps, chance_SL[:, layer], ls="--", lw=1.0, color=colors[layer])
        ax.set(xlabel="training step of the snapshot", ylabel=ylabel, ylim=(0, 1.04),
               xlim=(steps.min() - pad, steps.max() + pad))
        ax.axhline(1, color="k", lw=0.6, alpha=0.5)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls="--", lw=1.0, color="k"))
    labels.append("chance: independent tokens\nwith the same loads (left)")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle((title + ": " if title else "") + "Routing saturation: how much of the final "
                 "routing each snapshot already has", fontsize=11)
    return fig
