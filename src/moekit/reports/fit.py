"""The HTML report of a `moekit fit` run: the summary, the settings chosen and why, the scores in
the target's own units (:mod:`moekit.reports.metrics`), training and validation curves, the
confusion matrix or predicted-against-actual on the validation rows, the gate's partition, and the
routing analysis every moekit report shares (:mod:`moekit.reports.analysis`).

Shape legend: N rows, E experts, C classes.

What it reads from the run's summary dict: ``task``, ``target``, ``rows``, ``train_rows``,
``validation_rows``, ``inputs``, ``n_experts``, ``epochs``, ``stop_reason``, ``score_name``,
``train_score``; and where present ``validation_score``, ``n_experts_curve``, ``data`` (the CSV's
path), ``choices`` (a list of ``{"setting", "value", "why"}``), ``interrupted`` (bool) and
``threads`` (int).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moekit.plotting.curves import history_steps, kept_record, plot_learning_curves
from moekit.plotting.diagnostics import plot_confusion_matrix, plot_predicted_vs_actual
from moekit.plotting.partition import plot_partition
from moekit.plotting.style import save_figure
from moekit.reports import html as report
from moekit.reports.analysis import AnalysisInput, analysis_sections, analyze_input, estimator_input
from moekit.reports.metrics import (
    METRIC_NAMES,
    confusion_counts,
    fit_metrics,
    row_positions,
    select_rows,
)

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


def loss_label(estimator: Any, task: str) -> str:
    """The y-axis label of a fit's loss curve: which loss, per row, and on what scale (the
    regressor fits a standardised target, so its loss is not in the target's units)."""
    scale = "on the standardised target" if task == "regress" else ""
    keys = estimator.history_.keys
    if "train_loss" not in keys and "log_likelihood" in keys:
        return f"EM objective: log-likelihood per row\n(nats{', ' + scale if scale else ''})"
    loss = getattr(estimator, "loss", "nll")
    what = {"nll": "cross-entropy, nats" if task == "classify" else "negative log-likelihood",
            "competitive": "competitive squared error", "cooperative": "blend's squared error"}
    on = scale or ("on one-hot classes" if loss != "nll" else "")
    return f"fitting loss per row\n({what.get(loss, loss)}{', ' + on if on else ''})"


def validation_positions(estimator: Any, n_rows: int, summary: dict[str, Any],
                         validation_rows: Any = None) -> np.ndarray | None:
    """The run's validation rows (positions): ``validation_rows`` if given, else the list saved
    in the estimator's metadata (a run read back), else none when the run held none out; None when
    rows were held out but their positions are unknown."""
    if validation_rows is None:
        saved = (getattr(estimator, "metadata_", None) or {}).get("validation_rows")
        if saved is None:
            return np.arange(0) if summary.get("validation_rows") == 0 else None
        saved = saved if isinstance(saved, list) else []
        validation_rows = [r for r in saved if isinstance(r, int) and 0 <= r < n_rows]
    return row_positions(np.asarray(validation_rows, dtype=np.intp), n_rows)


def _summary_section(summary: dict[str, Any], kept: str) -> report.Section:
    rows = [("task", summary["task"]), ("target", summary["target"]),
            ("rows (training / validation)",
             f"{summary['rows']} ({summary['train_rows']} / {summary['validation_rows']})"),
            ("model inputs", ", ".join(summary["inputs"])), ("experts", summary["n_experts"]),
            ("epochs", f"{summary['epochs']} (stopped: {summary['stop_reason']}{kept})"),
            (f"training {summary['score_name']}", f"{summary['train_score']:.4f}")]
    if summary.get("validation_score") is not None:
        rows.append((f"validation {summary['score_name']}", f"{summary['validation_score']:.4f}"))
    if summary.get("threads") is not None:
        rows.append(("CPU threads", summary["threads"]))
    body = report.table(["", ""], rows)
    curve = summary.get("n_experts_curve")
    if curve:
        criterion = next(k for k in curve if k != "n_experts")
        body += report.text(f"The number of experts was chosen by {criterion}:")
        body += report.table(["experts", criterion],
                             [(n, f"{v:.2f}")
                              for n, v in zip(curve["n_experts"], curve[criterion], strict=True)])
    return report.Section("Summary", body)


def _value(value: Any) -> str:
    """A setting's value as the reader expects it: text as is, a float to 4 significant digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def choices_section(choices: Any) -> report.Section | None:
    """The "Settings chosen, and why" table from ``summary["choices"]`` (a list of ``{"setting",
    "value", "why"}``); None when there are none (older runs). Entries that are not dicts are
    skipped."""
    if not isinstance(choices, list):
        return None
    rows = [(str(c.get("setting", "")), _value(c.get("value")), str(c.get("why", "")))
            for c in choices if isinstance(c, dict)]
    if not rows:
        return None
    return report.Section("Settings chosen, and why", report.table(["setting", "value", "why"],
                                                                   rows))


def _rows(name: str) -> str:
    """'validation' -> 'the validation rows'; 'all' -> 'all rows'."""
    return "all rows" if name == "all" else f"the {name} rows"


UNITS = ("rmse", "mae", "target_std")  # in the target's units: significant digits, not decimals


def _number(value: float | None, key: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}" if key in UNITS else f"{value:.4f}"


def scores_section(scores: dict[str, dict[str, float]], task: str, target: str,
                   n_classes: int | None = None) -> report.Section:
    """The scores in the target's units, one column per set of rows (e.g. training, validation);
    ``n_classes`` gives the log-loss of a uniform guess for scale."""
    keys = [k for k in METRIC_NAMES if any(k in m for m in scores.values())]
    units = f" ({target} units)" if task == "regress" else ""
    rows = [(METRIC_NAMES[k][0] + (units if k in UNITS else ""),
             *(_number(m.get(k), k) for m in scores.values())) for k in keys]
    body = report.table(["metric", *(f"{name} rows" for name in scores)], rows)
    last = next((m for m in reversed(list(scores.values())) if m), {})
    name = next((n for n, m in reversed(list(scores.items())) if m), "")
    if task == "regress" and last.get("target_std"):
        body += report.text(
            f"On {_rows(name)} the RMSE is {last['rmse'] / last['target_std']:.2f} of the "
            f"target's standard deviation (1: no better than always predicting the mean; 0: "
            f"perfect). Computed from predict, in the units of {target}.")
    elif task == "classify" and last:
        body += report.text(
            f"On {_rows(name)} the model's accuracy is {last['accuracy']:.3f}, against "
            f"{last['baseline_accuracy']:.3f} for always predicting the most common class. "
            "Log-loss is from predict_proba (lower is better"
            + (f"; a uniform guess scores ln {n_classes} = {math.log(n_classes):.3f})."
               if n_classes else ")."))
    return report.Section("Scores in the target's own units", body)


def _diagnostics_section(estimator: Any, inputs: pd.DataFrame, y: np.ndarray, task: str,
                         target: str, rows: np.ndarray, which: str,
                         figures: Path) -> report.Section:
    x_rows, y_N = select_rows(inputs, rows), y[rows]
    heading = {"validation": "validation rows", "training": "training rows: none were held out",
               "all": "all rows: the validation rows were not given"}[which]
    if task == "classify":
        classes = [str(c) for c in estimator.classes_]
        counts_CC = confusion_counts(y_N, estimator.predict(x_rows), estimator.classes_)
        path = save_figure(plot_confusion_matrix(counts_CC, classes),
                           figures / "confusion_matrix.png")
        return report.Section(f"Confusion matrix ({heading})", report.figure(
            path, f"{_rows(which).capitalize()}: true class (rows) against predicted class "
                  "(columns); the numbers are row counts, the shading each true class's share.")
            + report.table([f"true \\ predicted {target}", *classes],
                           [[name, *row] for name, row in zip(classes, counts_CC.tolist(),
                                                              strict=True)]))
    predicted_N = estimator.predict(x_rows)
    path = save_figure(plot_predicted_vs_actual(y_N, predicted_N, target_name=target),
                       figures / "predicted_vs_actual.png")
    return report.Section(f"Predicted against actual ({heading})", report.figure(
        path, f"{_rows(which).capitalize()}, in the units of {target}: predicted against actual "
              "with the line "
              "y = x (left), and the residual against the prediction (right)."))


def fit_analysis_input(estimator: Any, inputs: pd.DataFrame, y: np.ndarray | None, target: str,
                       source: str) -> AnalysisInput:
    """What `moekit fit`'s report and `moekit analyze` analyse for a fit run: its estimator on the
    rows of ``source`` (named ``model``, in the run's analysis folder)."""
    return estimator_input(estimator, inputs, y, name="model", feature_names=list(inputs.columns),
                           target_name=target,
                           description=f"The mixture of `moekit fit` on {Path(source).name} "
                                       f"({len(inputs)} rows; inputs standardised as in fitting).")


def write_fit_report(path: Path, estimator: Any, inputs: pd.DataFrame, y: np.ndarray,
                     summary: dict[str, Any], *,
                     validation_rows: Sequence[int] | np.ndarray | None = None) -> Path:
    """Write report.html, its figures under ``figures/`` and the routing analysis under
    ``analysis/model/`` beside it (the same analysis `moekit analyze` writes).

    Args:
        path: the report file (``RUN/report.html``).
        estimator: the fitted estimator. inputs: the model's input columns (N, D), every row of
            the data. y: the target (N,), as fitted.
        summary: the run's summary (the keys the module docstring lists).
        validation_rows: the positions of the run's validation rows; default: the estimator's
            ``metadata_["validation_rows"]`` (a run read back). Without either, scores and
            diagnostics use every row and say so.
    """
    figures = path.parent / "figures"
    task, target = summary["task"], summary["target"]
    history = estimator.history_
    kept, reason = kept_record(history)
    kept_text = ""
    if kept is not None:
        steps_T, step_name = history_steps(history)
        kept_text = f"; weights kept from {step_name} {steps_T[kept]:g}, the {reason}"
    sections = []
    if summary.get("interrupted"):
        sections.append(report.Section("", report.banner(
            "This fit was interrupted (Ctrl-C) before it finished: the model saved and reported "
            "here is the best one found up to that point, not a finished fit, and a complete fit "
            "may score better. Rerun `moekit fit` to let it finish.")))
    sections.append(_summary_section(summary, kept_text))
    chosen = choices_section(summary.get("choices"))
    if chosen is not None:
        sections.append(chosen)
    val = validation_positions(estimator, len(y), summary, validation_rows)
    everything = np.arange(len(y))
    if val is None:
        groups = {"all": everything}
    else:
        groups = {"training": np.setdiff1d(everything, val), "validation": val}
    scores = {name: fit_metrics(estimator, inputs, y, rows, task) for name, rows in groups.items()}
    sections.append(scores_section(scores, task, target,
                                   len(getattr(estimator, "classes_", [])) or None))
    if _has_curves(history):
        curves = save_figure(plot_learning_curves(history, loss_label=loss_label(estimator, task)),
                             figures / "learning_curves.png")
        sections.append(report.Section("Learning curves", report.figure(
            curves, "Training and validation loss (and accuracy) per epoch: a validation loss "
                    "that rises while the training loss falls is over-fitting. Validation here "
                    "is what the fit held out to stop early; the dotted line marks the epoch "
                    "whose weights were kept.")))
    which, rows = next(((n, r) for n, r in reversed(list(groups.items())) if len(r)),
                       ("all", everything))
    sections.append(_diagnostics_section(estimator, inputs, y, task, target, rows, which,
                                         figures))
    if inputs.shape[1] == 2:
        names = list(inputs.columns)
        groups_N, group_names = target_groups(y, task)
        fig = plot_partition(lambda x: estimator.gate_proba(pd.DataFrame(x, columns=names)),
                             inputs.to_numpy(), groups_N, group_names, feature_names=names)
        partition = save_figure(fig, figures / "gate_partition.png")
        sections.append(report.Section("The gate's partition", report.figure(
            partition, "How the gate divides the input plane, in the data's own units: the expert "
                       "the gate weights most (left) and the soft proportions (right).")))
    item = fit_analysis_input(estimator, inputs, y, target, str(summary.get("data", "")))
    stats = analyze_input(item, path.parent / ANALYSIS_DIR)
    sections += analysis_sections(stats, path.parent / ANALYSIS_DIR / item.name)
    title = f"moekit fit: {target} from {Path(str(summary.get('data', ''))).name}"
    return report.write_report(path, title, sections)


def _has_curves(history: Any) -> bool:
    keys = set(history.keys)
    return bool(len(history)) and bool({"train_loss", "val_loss", "log_likelihood"} & keys)
