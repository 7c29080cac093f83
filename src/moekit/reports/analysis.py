"""The routing analysis of one model (what `moekit analyze` writes): every routing statistic, the
intervention table and the figures, as analysis.json and a self-contained analysis.html.

Shape legend: N rows, D input features, E experts.

The same content goes into other reports through :func:`analysis_sections` (the vowels report and
the `moekit fit` report use it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.analysis.agreement import routing_agreement
from moekit.analysis.importance import expert_importance
from moekit.analysis.recorder import record_routing, row_labels
from moekit.fitting.history import History
from moekit.io.files import write_text_atomic
from moekit.io.paths import plain_name
from moekit.io.run_folder import folder_built_whole
from moekit.plotting.partition import plot_partition
from moekit.plotting.routing import (
    plot_coactivation,
    plot_expert_by_label,
    plot_importance,
    plot_load,
    plot_routing_over_training,
)
from moekit.plotting.style import save_figure
from moekit.reports.html import Section, figure, table, text, write_report

JSON_FILE = "analysis.json"
HTML_FILE = "analysis.html"


@dataclass(frozen=True)
class AnalysisInput:
    """One model to analyse and the data to analyse it on (what `moekit analyze RUN` loads).

    Attributes:
        name: a short name, used as the sub-folder and in headings (e.g. '4_experts').
        model: a module returning MoEOutput. x: inputs (N, D). y: targets, or None.
        class_names, feature_names: labels for tables and axes.
        reference: a second model (another run, another checkpoint) to compare routing with.
        reference_name: how the report calls it. history: records with routing columns, or None.
        description: a sentence saying what the model and the data are.
    """

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor | None = None
    class_names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    reference: nn.Module | None = None
    reference_name: str = "reference"
    history: History | None = None
    description: str = ""
    likelihood: str = "gaussian"
    variance: float = 1.0
    target_name: str = "y"
    target_unscale: tuple[float, float] = (0.0, 1.0)


def estimator_input(estimator: Any, X: Any, y: Any = None, *, name: str = "model",
                    feature_names: Sequence[str] | None = None, target_name: str = "y",
                    description: str = "") -> AnalysisInput:
    """An :class:`AnalysisInput` for a fitted
    :class:`~moekit.estimators.classifier.MixtureOfExpertsClassifier`
    or ``Regressor``: its ``model_`` on the standardised inputs, and the targets as the model
    sees them (class indices into ``classes_``; standardised values for a regression, whose
    expert-by-target bins are named in the original units).

    Example:
        >>> clf = MixtureOfExpertsClassifier(n_experts=3).fit(X, y)  # doctest: +SKIP
        >>> analyze_input(estimator_input(clf, X, y), "runs/fit/analysis")  # doctest: +SKIP
    """
    X_ND = np.asarray(X, dtype=np.float64)
    dtype = next(estimator.model_.parameters()).dtype
    x = torch.as_tensor(estimator.scaler_.transform(X_ND), dtype=dtype)
    classes = getattr(estimator, "classes_", None)
    target, class_names = None, None
    if y is not None and classes is not None:
        target = torch.as_tensor(np.searchsorted(classes, np.asarray(y)), dtype=torch.long)
        class_names = tuple(str(c) for c in classes)
    unscale = (0.0, 1.0)
    if y is not None and classes is None:
        y_NO = np.asarray(y, dtype=np.float64).reshape(len(X_ND), -1)
        target = torch.as_tensor(estimator.y_scaler_.transform(y_NO), dtype=dtype)
        unscale = (float(estimator.y_scaler_.mean_[0]), float(estimator.y_scaler_.scale_[0]))
    names = feature_names if feature_names is not None else getattr(estimator,
                                                                     "feature_names_in_", None)
    loss = getattr(estimator, "loss", "nll")
    return AnalysisInput(
        name=name, model=estimator.model_, x=x, y=target, class_names=class_names,
        feature_names=None if names is None else tuple(f"{n} (standardised)" for n in names),
        target_name=target_name, target_unscale=unscale,
        description=description or f"{type(estimator).__name__} with "
                                   f"{estimator.model_.config.n_experts} experts, on "
                                   f"{len(X_ND)} rows (inputs standardised as in fitting).",
        likelihood="categorical" if classes is not None and loss == "nll" else "gaussian")


def analyze(model: nn.Module, x: Tensor, y: Tensor | None = None, *, out_dir: Path | str,
            class_names: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
            history: History | None = None, reference: nn.Module | None = None,
            reference_name: str = "reference", title: str = "moekit analysis",
            figure_title: str = "", description: str = "", target_name: str = "y",
            target_unscale: tuple[float, float] = (0.0, 1.0), likelihood: str = "gaussian",
            variance: float = 1.0, n_target_bins: int = 5, batch_size: int = 4096,
            store: bool = False) -> dict[str, Any]:
    """Compute every routing statistic and the expert-importance table, draw the figures, and write
    ``analysis.json`` and ``analysis.html`` into ``out_dir``; return the statistics.

    Args:
        model: a module returning :class:`~moekit.nn.outputs.MoEOutput`.
        x: inputs (N, D); y: class indices or float targets (binned for the expert-by-target
            table), or None.
        history: records with ``routing_load_<e>`` / ``routing_entropy_ratio`` for the
            over-training figure.
        reference: a second model to measure routing agreement with.
        title: the HTML page's title; figure_title: a short name put on every figure.
        likelihood, variance: the posterior used for KL(h || p) (see
            :func:`moekit.analysis.recorder.record_routing`).
        store: also stream per-row routing to ``out_dir/routing`` (a
            :class:`~moekit.analysis.store.RoutingStore`).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> stats = analyze(MixtureOfExperts(2, 3, 4), torch.randn(50, 2),
        ...                 torch.randint(0, 3, (50,)), out_dir="runs/a")  # doctest: +SKIP
        >>> stats["expert_by_label"]["nmi"]                                # doctest: +SKIP
    """
    out = Path(out_dir)
    rec = record_routing(model, x, y, batch_size=batch_size, class_names=class_names,
                         n_target_bins=n_target_bins, target_name=target_name,
                         target_unscale=target_unscale,
                         likelihood=likelihood, variance=variance,
                         store=out / "routing" if store else None)
    stats = rec.stats.to_dict()
    x_ND = x.reshape(-1, x.shape[-1])
    stats.update(
        title=title, description=description,
        model={"class": type(model).__name__,
               "parameters": int(sum(p.numel() for p in model.parameters()))},
        data={"rows": int(x_ND.shape[0]), "features": int(x_ND.shape[1]),
              "feature_names": list(feature_names) if feature_names else None,
              "target": None if y is None else ("regression" if y.is_floating_point()
                                                else "classes"),
              "target_edges": list(rec.target_edges) if rec.target_edges else None,
              "target_scale": _target_scale(y, target_unscale, target_name)},
        likelihood=likelihood if stats["posterior"] else None,
        importance=expert_importance(model, x, y, batch_size=batch_size,
                                     load_E=rec.stats.load_E).to_dict(),
        agreement=None,
    )
    if reference is not None:
        stats["agreement"] = dict(routing_agreement(model, reference, x, batch_size=batch_size)
                                  .to_dict(), reference=reference_name)
    edges = None if rec.target_edges is None else np.asarray(rec.target_edges)
    labels_N = None if y is None else row_labels(y, edges).numpy()
    stats["figures"] = _figures(model, x_ND, labels_N, stats, out, feature_names, history,
                                figure_title)
    write_text_atomic(out / JSON_FILE, json.dumps(stats, indent=1))
    write_report(out / HTML_FILE, title, analysis_sections(stats, out))
    if rec.store is not None:
        stats["store"] = str(rec.store.directory)
    return stats


def analyze_input(item: AnalysisInput, out_dir: Path | str, **options: Any) -> dict[str, Any]:
    """:func:`analyze` on an :class:`AnalysisInput`, into ``out_dir / item.name``: a plain name
    (nothing is written outside ``out_dir``), the folder built beside it and swapped in whole."""
    plain_name(item.name, source=f"the analysis of {item.name!r}", field="the model's name")
    final = Path(out_dir) / item.name
    with folder_built_whole(final) as build:
        stats = analyze(item.model, item.x, item.y, out_dir=build, class_names=item.class_names,
                        feature_names=item.feature_names, history=item.history,
                        reference=item.reference, reference_name=item.reference_name,
                        title=f"moekit analysis: {item.name}",
                        figure_title=item.name.replace("_", " "), description=item.description,
                        likelihood=item.likelihood, variance=item.variance,
                        target_name=item.target_name, target_unscale=item.target_unscale,
                        **options)
    if "store" in stats:  # where the per-row routing store is once the folder is in place
        stats["store"] = str(final / Path(stats["store"]).relative_to(build))
    return stats


def _figures(model: nn.Module, x_ND: Tensor, labels_N: np.ndarray | None, stats: dict[str, Any],
             out: Path, feature_names, history: History | None, title: str) -> dict[str, str]:
    """Draw every figure the statistics support; returns {key: file name inside ``out``}."""
    files: dict[str, str] = {}
    by_label = stats["expert_by_label"]
    names = by_label["labels"] if by_label else None

    def save(key: str, fig) -> None:
        files[key] = save_figure(fig, out / f"{key}.png").name

    if x_ND.shape[0] == stats["rows"]:  # one routing row per input row (not a sequence model)
        save("partition", plot_partition(model, x_ND.double().numpy(), labels_N, names,
                                         feature_names=feature_names, title=title))
    save("load", plot_load(stats, title=title))
    if by_label:
        save("expert_by_label", plot_expert_by_label(by_label["counts"], names,
                                                     nmi=_nan_if_none(by_label["nmi"]),
                                                     kind=by_label["kind"], title=title))
    if stats["coactivation"]:
        save("coactivation", plot_coactivation(stats["coactivation"]["conditional"],
                                               title=title))
    save("importance", plot_importance(stats["importance"], title=title))
    if history is not None and any(k.startswith("routing_load_") for k in history.keys):
        save("over_training", plot_routing_over_training(history, title=title))
    return files


def _target_scale(y: Tensor | None, target_unscale: tuple[float, float], target_name: str
                  ) -> dict[str, Any] | None:
    """For a float target the model sees standardised, the mean and standard deviation that map
    it back to the target's units (the metric 'mse' is on the standardised scale); else None."""
    if y is None or not y.is_floating_point() or tuple(target_unscale) == (0.0, 1.0):
        return None
    return {"name": target_name, "mean": float(target_unscale[0]),
            "std": float(target_unscale[1])}


def metric_label(stats: dict[str, Any]) -> str:
    """The importance metric's name as the report shows it: 'mse' on a standardised target says
    so (its numbers are not in the target's units).

    Example:
        >>> metric_label({"importance": {"metric": "mse"},
        ...               "data": {"target_scale": {"mean": 10.0, "std": 2.0}}})
        'mse (standardised target)'
    """
    metric = stats["importance"]["metric"]
    scaled = (stats.get("data") or {}).get("target_scale")
    return f"{metric} (standardised target)" if scaled and metric == "mse" else metric


def scale_note(stats: dict[str, Any]) -> str:
    """A sentence saying how to read an mse on the standardised target in the target's units;
    empty when the metric is not such an mse."""
    scaled = (stats.get("data") or {}).get("target_scale")
    if not scaled or stats["importance"]["metric"] != "mse":
        return ""
    mean, std, name = scaled["mean"], scaled["std"], scaled.get("name") or "the target"
    return (f" The mse here is on the standardised target ({name} minus its mean {mean:.4g}, "
            f"over its standard deviation {std:.4g}), as the model is fitted: multiply by "
            f"{std:.4g}^2 = {std * std:.4g} for the target's squared units, and the RMS output "
            f"change by {std:.4g}.")


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


# --- report sections ---------------------------------------------------------------------------

CAPTIONS = {
    "partition": "How the gate divides the input: the most probable expert (left) and the soft "
                 "proportions (right), with the data.",
    "load": "Load per expert: share of the routed mass (solid) and of rows where the expert is "
            "the primary one (hatched).",
    "expert_by_label": "Where each class (or target bin) goes: share of its rows per primary "
                       "expert; numbers are row counts.",
    "coactivation": "Co-activation: how often expert j runs on the rows expert i runs on.",
    "importance": "Expert importance: the task metric's change when each expert is removed, or "
                  "when every row is forced to it.",
    "over_training": "Each expert's load and the gate's entropy over training.",
}


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_sentences(stats: dict[str, Any]) -> list[str]:
    """Plain-language findings, each computed from the statistics."""
    e = stats["n_experts"]
    ratio = stats["entropy"]["ratio"]
    found = []
    if ratio is not None:
        effective = math.exp(stats["entropy"]["mean_nats"])
        found.append(f"The gate's entropy is {ratio:.2f} of its maximum log {e}: on average a "
                     f"row's proportions are as spread as a uniform choice among "
                     f"{effective:.2f} experts.")
    dead = stats["dead_experts"]
    found.append(f"{len(dead)} of {e} experts are dead (load below "
                 f"{stats['dead_threshold']:g}): {', '.join(map(str, dead))}." if dead
                 else f"No dead expert: every one of the {e} experts takes at least "
                      f"{stats['dead_threshold']:g} of the load.")
    if stats["expert_by_label"]:
        nmi = stats["expert_by_label"]["nmi"]
        found.append(f"The primary expert and the {stats['expert_by_label']['kind']} share "
                     f"NMI = {_num(nmi, 2)} (1: each determines the other; 0: independent).")
    if stats["posterior"]:
        found.append(f"Mean KL(posterior h || gate prior p) = "
                     f"{_num(stats['posterior']['kl_mean'])} nats: how much seeing the target "
                     "changes which expert is responsible.")
    imp = stats["importance"]
    rows = [r for r in imp["experts"] if r["ablated_change"] is not None]
    if rows:
        sign = -1 if imp["higher_is_better"] else 1
        worst = max(rows, key=lambda r: sign * r["ablated_change"])
        found.append(f"Removing expert {worst['expert']} hurts most: {metric_label(stats)} goes "
                     f"from "
                     f"{imp['baseline']:.4g} to {worst['ablated']:.4g}.")
    if stats["agreement"]:
        a = stats["agreement"]
        found.append(f"Against {a['reference']}, {100 * a['agreement']:.1f}% of rows have "
                     f"corresponding primary experts after matching experts one to one "
                     f"({100 * a['agreement_unmatched']:.1f}% before matching).")
    return found


def analysis_sections(stats: dict[str, Any], out_dir: Path | str, *, heading: str = "",
                      embed_figures: bool = True, link_from: Path | str | None = None
                      ) -> list[Section]:
    """The report sections of one analysis (as :func:`analyze` wrote it into ``out_dir``).

    ``heading`` prefixes each section title (to tell models apart in a shared report). Figures are
    embedded, or with ``embed_figures=False`` linked relative to ``link_from`` (the folder of the
    report that includes them).
    """
    out = Path(out_dir)
    prefix = f"{heading}: " if heading else ""
    e = stats["n_experts"]
    overview = table(["statistic", "value"], [
        ("rows", stats["rows"]), ("experts (E)", e), ("experts per row (K)", stats["top_k"]),
        ("gate entropy / log E", _num(stats["entropy"]["ratio"])),
        ("entropy of the mean proportions / log E", _num(stats["entropy"]["marginal_ratio"])),
        ("load CV", _num(stats["imbalance"]["cv"])),
        ("load max / mean", _num(stats["imbalance"]["max_over_mean"])),
        ("dead experts", ", ".join(map(str, stats["dead_experts"])) or "none"),
        ("NMI(primary expert, label)", _num((stats["expert_by_label"] or {}).get("nmi"))),
        ("mean KL(h || p), nats", _num((stats["posterior"] or {}).get("kl_mean"))),
        ("dropped assignments", _num(stats["dropped"]["rate"])),
    ])
    intro = text(stats["description"]) if stats.get("description") else ""
    sections = [Section(prefix + "Routing summary", intro + overview + "".join(
        text(s) for s in summary_sentences(stats)))]
    imp = stats["importance"]
    metric = metric_label(stats)
    contribution = stats["contribution_share"] or [None] * e
    posterior = (stats["posterior"] or {}).get("mean_posterior") or [None] * e
    per_expert = table(
        ["expert", "load", "mean p", "primary share", "output share", "mean posterior h",
         f"{metric} without it", f"{metric} all rows to it", "RMS output change"],
        [(r["expert"], _num(stats["load"]["load"][i]), _num(stats["load"]["mean_proportion"][i]),
          _num(stats["load"]["primary_share"][i]), _num(contribution[i]), _num(posterior[i]),
          _num(r["ablated"], 4), _num(r["forced"], 4), _num(r["output_change"], 4))
         for i, r in enumerate(imp["experts"])])
    temps = table(["gate temperature", metric, "change"],
                  [(1.0, _num(imp["baseline"], 4), "0")]
                  + [(t["temperature"], _num(t["metric"], 4), _num(t["change"], 4))
                     for t in imp["temperatures"]])
    sections.append(Section(prefix + "Experts and interventions", per_expert + text(
        f"Baseline {metric}: {imp['baseline']:.4g} "
        f"({'higher' if imp['higher_is_better'] else 'lower'} is better). Removing an expert "
        "renormalises the others; forcing sends every row to that expert alone; the output share "
        "is each expert's part of sum ||p_e o_e||." + scale_note(stats)) + temps))
    by_label = stats["expert_by_label"]
    if by_label:
        counts = table([f"expert \\ {by_label['kind']}"] + by_label["labels"],
                       [[f"expert {i}"] + [int(c) for c in row]
                        for i, row in enumerate(by_label["counts"])])
        sections.append(Section(prefix + f"Experts by {by_label['kind']}", counts))
    if stats["agreement"]:
        a = stats["agreement"]
        sections.append(Section(prefix + f"Agreement with {a['reference']}", table(
            ["statistic", "value"],
            [("matching (expert here -> expert there)",
              ", ".join(f"{i}->{j}" for i, j in enumerate(a["match_A"]))),
             ("rows with corresponding primary experts", _num(a["agreement"])),
             ("the same without matching", _num(a["agreement_unmatched"])),
             ("NMI of the primary experts", _num(a["nmi"])),
             ("mean total-variation distance of p", _num(a["tv_distance"])),
             ("overlap of chosen experts", _num(a["selection_overlap"]))])))
    figures = []
    for key, name in stats["figures"].items():
        path = out / name
        caption = CAPTIONS.get(key, key)
        figures.append(figure(path, caption,
                              link_from=None if embed_figures else Path(link_from or out)))
    sections.append(Section(prefix + "Routing figures", "".join(figures)))
    return sections
