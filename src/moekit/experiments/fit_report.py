"""The HTML report of a `moekit fit` run: learning curves, expert usage, partition, expert by class.

Shape legend: N rows, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit import report
from moekit.plots import save_figure
from moekit.plots_tabular import plot_expert_usage, plot_gate_regions, plot_learning_curves

N_TARGET_BINS = 4


def expert_loads(probs_NE: np.ndarray) -> list[dict[str, float]]:
    """Per expert: the mean mixing proportion and the share of rows where it has the largest one."""
    leader_N = probs_NE.argmax(1)
    return [{"expert": e, "mean_proportion": float(probs_NE[:, e].mean()),
             "argmax_share": float((leader_N == e).mean())} for e in range(probs_NE.shape[1])]


def target_groups(y: np.ndarray, task: str) -> np.ndarray:
    """Class labels as they are; a regression target cut into quartile bins, labelled by range."""
    if task == "classify":
        return y.astype(str)
    bins = pd.qcut(pd.Series(y.astype(float)), N_TARGET_BINS, duplicates="drop")
    return bins.astype(str).to_numpy()


def expert_by_group(probs_NE: np.ndarray, groups_N: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Rows of each group led by each expert: (groups, counts (G, E))."""
    labels = sorted(set(groups_N.tolist()), key=str)
    leader_N = probs_NE.argmax(1)
    counts_GE = np.array([[int(((groups_N == g) & (leader_N == e)).sum())
                           for e in range(probs_NE.shape[1])] for g in labels])
    return labels, counts_GE


def _summary_section(summary: dict[str, Any]) -> report.Section:
    rows = [("task", summary["task"]), ("target", summary["target"]),
            ("rows (training / validation)",
             f"{summary['rows']} ({summary['train_rows']} / {summary['validation_rows']})"),
            ("model inputs", ", ".join(summary["inputs"])), ("experts", summary["n_experts"]),
            ("epochs", f"{summary['epochs']} (stopped: {summary['stop_reason']})"),
            (f"training {summary['score_name']}", f"{summary['train_score']:.4f}")]
    if summary.get("validation_score") is not None:
        rows.append((f"validation {summary['score_name']}", f"{summary['validation_score']:.4f}"))
    body = report.table(["", ""], rows)
    curve = summary.get("n_experts_curve")
    if curve:
        criterion = next(k for k in curve if k != "n_experts")
        body += report.text(f"The number of experts was chosen by {criterion}:")
        body += report.table(["experts", criterion],
                             [(n, f"{v:.2f}") for n, v in zip(curve["n_experts"], curve[criterion])])
    return report.Section("Summary", body)


def write_fit_report(path: Path, estimator: Any, inputs: pd.DataFrame, y: np.ndarray,
                     train: np.ndarray, val: np.ndarray, summary: dict[str, Any]) -> Path:
    """Write report.html (and its figures under ``figures/`` beside it)."""
    figures = path.parent / "figures"
    sections = [_summary_section(summary)]
    if len(estimator.history_) and "train_loss" in estimator.history_.keys:
        curves = save_figure(plot_learning_curves(estimator.history_), figures / "learning_curves.png")
        sections.append(report.Section("Learning curves", report.figure(
            curves, "Training loss (and accuracy) per epoch, on the training rows.")))

    probs_NE = estimator.gate_proba(inputs)
    loads = expert_loads(probs_NE)
    usage = save_figure(plot_expert_usage(probs_NE.mean(0), np.array([r["argmax_share"] for r in loads])),
                        figures / "expert_usage.png")
    usage_rows = [(r["expert"], f"{r['mean_proportion']:.3f}", f"{r['argmax_share']:.1%}")
                  for r in loads]
    sections.append(report.Section("Expert usage", report.table(
        ["expert", "mean mixing proportion", "share of rows it leads"], usage_rows)
        + report.figure(usage, "Mean mixing proportion and share of rows each expert leads, all rows.")))

    groups_N = target_groups(y, summary["task"])
    labels, counts_GE = expert_by_group(probs_NE, groups_N)
    heading = "class" if summary["task"] == "classify" else f"{summary['target']} (quartile bin)"
    rows = [(g, *counts_GE[i], int(counts_GE[i].sum())) for i, g in enumerate(labels)]
    sections.append(report.Section(
        "Expert by class" if summary["task"] == "classify" else "Expert by target range",
        report.text("Rows of each group (all rows) counted under the expert the gate weights most.")
        + report.table([heading, *[f"expert {e}" for e in range(probs_NE.shape[1])], "rows"], rows)))

    if inputs.shape[1] == 2:
        names = list(inputs.columns)
        fig = plot_gate_regions(lambda x: estimator.gate_proba(pd.DataFrame(x, columns=names)),
                                inputs.to_numpy(), groups_N, axis_labels=names)
        partition = save_figure(fig, figures / "gate_partition.png")
        sections.append(report.Section("The gate's partition", report.figure(
            partition, "Each point of the input plane coloured by the expert the gate weights most.")))
    title = f"moekit fit: {summary['target']} from {Path(str(summary.get('data', ''))).name}"
    return report.write_report(path, title, sections)
