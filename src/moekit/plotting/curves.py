"""Curves over training: the stop metric of many replicate runs, and one fit's learning curves
(training and validation, with the kept epoch marked).

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


def history_column(history: History, name: str) -> np.ndarray:
    """One metric over the records as floats (T,), NaN where a record lacks it.

    Example:
        >>> history_column(History([{"a": 1.0}, {"b": 2.0}]), "a").tolist()
        [1.0, nan]
    """
    return np.array([np.nan if r.get(name) is None else float(r[name]) for r in history],
                    dtype=np.float64)


def history_steps(history: History) -> tuple[np.ndarray, str]:
    """The x axis of a history (T,) and its name: 'epoch' (gradient fits), else 'iteration' (EM
    fits), else the record's position counted from 1."""
    for name in ("epoch", "iteration"):
        if name in history.keys:
            steps_T = history_column(history, name)
            if not np.isnan(steps_T).any():
                return steps_T, name
    return np.arange(1, len(history) + 1, dtype=np.float64), "epoch"


def kept_record(history: History) -> tuple[int | None, str]:
    """The record whose weights the fit kept, and why: the lowest ``val_loss`` where the history
    has one (early stopping restores that epoch's weights), else the last record.

    Returns ``(position, reason)``; position is None for an empty history.

    Example:
        >>> kept_record(History([{"val_loss": 0.5}, {"val_loss": 0.25}, {"val_loss": 0.3}]))
        (1, 'lowest validation loss')
    """
    if not len(history):
        return None, "no records"
    if "val_loss" in history.keys:
        val_T = history_column(history, "val_loss")
        finite_T = np.where(np.isfinite(val_T), val_T, np.nan)  # a diverged epoch is never kept
        if not np.isnan(finite_T).all():
            return int(np.nanargmin(finite_T)), "lowest validation loss"
    return len(history) - 1, "last record"


def _objective(history: History) -> tuple[str, str, str] | None:
    """The column the fit minimised (or EM's maximised), its validation twin, and a title."""
    keys = history.keys
    if "train_loss" in keys or "val_loss" in keys:
        return "train_loss", "val_loss", "loss"
    if "log_likelihood" in keys:
        return "log_likelihood", "val_log_likelihood", "log-likelihood"
    return None


def plot_learning_curves(history: History, *, loss_label: str = "loss",
                         title: str = "") -> Figure:
    """The training and validation loss per epoch on one axis, the accuracy beside it where the
    history has one, and the epoch whose weights were kept (:func:`kept_record`) marked.

    Works with or without the ``val_*`` columns (early stopping off, older runs) and on an EM
    history (``iteration``, ``log_likelihood``: the mean log-likelihood per row, plotted as is,
    higher is better). ``loss_label`` names the y axis of the loss (say what loss, per what,
    on what scale).

    Example:
        >>> h = History([{"epoch": 1, "train_loss": 0.9, "val_loss": 1.0},
        ...              {"epoch": 2, "train_loss": 0.5, "val_loss": 0.7}])
        >>> fig = plot_learning_curves(h, loss_label="cross-entropy per row (nats)")
    """
    keys = history.keys
    objective = _objective(history)
    panels = ([objective] if objective else []) + (
        [("train_accuracy", "val_accuracy", "accuracy")]
        if {"train_accuracy", "val_accuracy"} & set(keys) else [])
    fig = new_figure(5.2 * max(len(panels), 1), 3.8)
    if not panels:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no loss or accuracy was recorded", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    steps_T, step_name = history_steps(history)
    kept, reason = kept_record(history)
    short = len(history) < 30  # few points: draw markers so that each one shows
    for ax, (train, val, metric) in zip(axes, panels, strict=True):
        for name, style, color, label in ((train, "-", OKABE_ITO[0], "training"),
                                          (val, "--", OKABE_ITO[1], "validation")):
            if name in keys:
                ax.plot(steps_T, history_column(history, name), style, color=color, label=label,
                        marker="o" if short else None, markersize=3)
        if kept is not None:
            ax.axvline(steps_T[kept], color="k", ls=":", lw=1,
                       label=f"kept: {step_name} {steps_T[kept]:g} ({reason})")
        ylabel = "accuracy (share of rows right)" if metric == "accuracy" else loss_label
        ax.set(xlabel=step_name, ylabel=ylabel, title=f"{metric} per {step_name}")
        if metric == "accuracy":  # a share: never drawn past 1
            ax.set_ylim(top=min(ax.get_ylim()[1], 1.005))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
