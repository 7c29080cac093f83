"""The HTML report of a `moekit fit` run: summary, learning curves, the gate's partition, and the
routing analysis every moekit report shares (:mod:`moekit.reports.analysis`).

Shape legend: N rows, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.plotting.curves import plot_learning_curves
from moekit.plotting.partition import plot_partition
from moekit.plotting.style import save_figure
from moekit.reports import html as report
from moekit.reports.analysis import AnalysisInput, analysis_sections, analyze_input, estimator_input

N_TARGET_BINS = 4
ANALYSIS_DIR = "analysis"


def expert_loads(probs_NE: np.ndarray) -> list[dict[str, float]]:
    """Per expert: the mean mixing proportion and the share of rows where it has the largest one."""
    leader_N = probs_NE.argmax(1)
    return [{"expert": e, "mean_proportion": float(probs_NE[:, e].mean()),
             "argmax_share": float((leader_N == e).mean())} for e in range(probs_NE.shape[1])]


def target_groups(y: np.ndarray, task: str) -> tuple[np.ndarray, list[str]]:
    """Each row's group (N,) and the groups' names, in order: the classes; or a regression target
    cut into quartile bins, named by their range.

    Example:
        >>> target_groups(np.array(["b", "a", "b"]), "classify")
        (array([1, 0, 1]), ['a', 'b'])
    """
    if task == "classify":
        names, groups_N = np.unique(y.astype(str), return_inverse=True)
        return groups_N, [str(n) for n in names]
    bins = pd.qcut(pd.Series(y.astype(float)), N_TARGET_BINS, duplicates="drop")
    return bins.cat.codes.to_numpy(), [str(c) for c in bins.cat.categories]


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
                             [(n, f"{v:.2f}")
                              for n, v in zip(curve["n_experts"], curve[criterion], strict=True)])
    return report.Section("Summary", body)


def fit_analysis_input(estimator: Any, inputs: pd.DataFrame, y: np.ndarray | None, target: str,
                       source: str) -> AnalysisInput:
    """What `moekit fit`'s report and `moekit analyze` analyse for a fit run: its estimator on the
    rows of ``source`` (named ``model``, in the run's analysis folder)."""
    return estimator_input(estimator, inputs, y, name="model", feature_names=list(inputs.columns),
                           target_name=target,
                           description=f"The mixture of `moekit fit` on {Path(source).name} "
                                       f"({len(inputs)} rows; inputs standardised as in fitting).")


def write_fit_report(path: Path, estimator: Any, inputs: pd.DataFrame, y: np.ndarray,
                     summary: dict[str, Any]) -> Path:
    """Write report.html, its figures under ``figures/`` and the routing analysis under
    ``analysis/model/`` beside it (the same analysis `moekit analyze` writes)."""
    figures = path.parent / "figures"
    sections = [_summary_section(summary)]
    if len(estimator.history_) and "train_loss" in estimator.history_.keys:
        curves = save_figure(plot_learning_curves(estimator.history_),
                             figures / "learning_curves.png")
        sections.append(report.Section("Learning curves", report.figure(
            curves, "Training loss (and accuracy) per epoch, on the training rows.")))
    if inputs.shape[1] == 2:
        names = list(inputs.columns)
        groups_N, groups = target_groups(y, summary["task"])
        fig = plot_partition(lambda x: estimator.gate_proba(pd.DataFrame(x, columns=names)),
                             inputs.to_numpy(), groups_N, groups, feature_names=names)
        partition = save_figure(fig, figures / "gate_partition.png")
        sections.append(report.Section("The gate's partition", report.figure(
            partition, "How the gate divides the input plane, in the data's own units: the expert "
                       "the gate weights most (left) and the soft proportions (right).")))
    item = fit_analysis_input(estimator, inputs, y, summary["target"], str(summary.get("data", "")))
    stats = analyze_input(item, path.parent / ANALYSIS_DIR)
    sections += analysis_sections(stats, path.parent / ANALYSIS_DIR / item.name)
    title = f"moekit fit: {summary['target']} from {Path(str(summary.get('data', ''))).name}"
    return report.write_report(path, title, sections)
