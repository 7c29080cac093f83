"""`moekit vowels`: run the protocol, then write results.json, the figures and the HTML report."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit._version import __version__
from moekit.datasets import VowelTask, vowel_task
from moekit.experiments.vowels import (SystemResult, VowelsConfig, loss_comparison_systems,
                                       run_system, systems_of, to_jsonable)
from moekit.experiments.vowels_summary import (Claim, Row, TTest, claims, describe_runs,
                                               epoch_t_tests, format_table, rows_to_json,
                                               table_rows)
from moekit.io import write_text_atomic
from moekit.plots import (plot_lines_over_time, plot_mixing_proportions, plot_partition,
                          plot_training_curves, save_figure)
from moekit.report import Section, figure, preformatted, table, text, write_report


@dataclass
class VowelsOutcome:
    """Everything `moekit vowels` produced; ``files`` maps a short name to the path written."""

    config: VowelsConfig
    rows: list[Row]
    loss_rows: list[Row]
    tests: list[TTest]
    claims: list[Claim]
    table_text: str
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def _track_epochs(max_epochs: int) -> tuple[int, ...]:
    """Epochs at which to snapshot the Figure 3 run: dense early, sparse late."""
    return tuple(int(e) for e in np.unique(np.r_[0, np.geomspace(1, max_epochs, 40).astype(int)]))


def run_vowels(config: VowelsConfig, task: VowelTask | None = None) -> VowelsOutcome:
    """Run every system (25 runs each, step exploration included) and write all outputs."""
    start = time.perf_counter()
    task = task or vowel_task(include_speaker_76=config.include_speaker_76)
    track_size = max(config.experts) if config.experts else None
    results = [run_system(s, task, config,
                          track_epochs=_track_epochs(config.max_epochs)
                          if s.kind == "mixture" and s.size == track_size else ())
               for s in systems_of(config)]
    loss_results = [run_system(s, task, config) for s in loss_comparison_systems(config)]
    seconds = time.perf_counter() - start

    rows, loss_rows = table_rows(results), table_rows(loss_results)
    if loss_rows:  # the main error function's row of the same mixture completes the comparison
        sizes = {r.system.size for r in loss_results}
        main_rows = [row for row, r in zip(rows, results)
                     if r.system.kind == "mixture" and r.system.size in sizes]
        loss_rows = sorted(loss_rows + main_rows, key=lambda r: r.system)
    tests = epoch_t_tests(results)
    found = claims(rows, tests, loss_rows, config)
    outcome = VowelsOutcome(config, rows, loss_rows, tests, found, format_table(rows, tests, config),
                            seconds)
    out = Path(config.out)
    outcome.files.update(_figures(results, task, config, out))
    outcome.files["results"] = _write_json(outcome, results + loss_results, out / "results.json")
    outcome.files["report"] = _write_html(outcome, results, out / "report.html")
    return outcome


def _figures(results: list[SystemResult], task: VowelTask, config: VowelsConfig,
             out: Path) -> dict[str, Path]:
    x_train, y_train = task.x_train.numpy(), task.y_train.numpy()
    files: dict[str, Path] = {}
    mixtures = [r for r in results if r.system.kind == "mixture"]
    if mixtures:
        first = min(mixtures, key=lambda r: r.system.size)
        fig = plot_partition(first.models[0], x_train, y_train, task.labels,
                             title=f"{first.system.name}, run 0, epoch {first.epochs_R[0]}")
        files["figure2"] = save_figure(fig, out / "figure2_partition.png")
        tracked = next((r for r in mixtures if r.snapshots), None)
        if tracked is not None:
            fig = plot_lines_over_time(tracked.models[0], tracked.snapshots, x_train, y_train,
                                       task.labels)
            files["figure3"] = save_figure(fig, out / "figure3_lines_over_time.png")
        for r in mixtures:
            key = f"mixing_{r.system.size}"
            fig = plot_mixing_proportions(r.models[0], x_train, y_train, task.labels)
            files[key] = save_figure(fig, out / f"mixing_proportions_{r.system.size}_experts.png")
    ylabel = f"average squared error per {'output unit' if config.average == 'unit' else 'case'}"
    fig = plot_training_curves({r.system.name: r.curves_RT for r in results}, config.criterion,
                               ylabel=ylabel)
    files["curves"] = save_figure(fig, out / "training_curves.png")
    return files


def _write_json(outcome: VowelsOutcome, results: list[SystemResult], path: Path) -> Path:
    record = {
        "moekit_version": __version__, "torch_version": torch.__version__,
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "seconds": round(outcome.seconds, 2), "config": to_jsonable(outcome.config),
        "table": rows_to_json(outcome.rows), "loss_comparison": rows_to_json(outcome.loss_rows),
        "t_tests": [t.__dict__ for t in outcome.tests],
        "claims": [c.__dict__ for c in outcome.claims],
        "runs": [describe_runs(r) for r in results],
        "files": {k: str(v) for k, v in outcome.files.items()},
    }
    write_text_atomic(path, json.dumps(record, indent=2))
    return path


def _stability_note(rows: list[Row]) -> str:
    """Say plainly when the chosen step makes gradient descent oscillate."""
    shaky = [r for r in rows if r.rising > 10]
    if not shaky:
        return "At the chosen steps the training error fell on almost every epoch."
    listed = ", ".join(f"{r.system} ({r.rising:.0f}% of epochs at step {r.lr:g})" for r in shaky)
    return (f"The fastest steps sit at the edge of stability: the training error rose on {listed}. "
            "The runs reach the criterion on a downswing of the oscillation; the exploration rule "
            "(fewest mean epochs with every run reaching the criterion) prefers such steps. Rerun "
            "with a grid of smaller steps (--lr-grid) to see smooth descent at the cost of epochs.")


def _caption(key: str) -> str:
    if key.startswith("mixing_"):
        return (f"Mixing proportion of each expert over the input plane "
                f"({key.removeprefix('mixing_')} experts, run 0).")
    return {
        "figure2": "Figure 2 analogue: training data, each active expert's decision line (dashed) "
                   "and the gate's boundaries (solid black).",
        "figure3": "Figure 3 analogue: the experts' decision lines during one run; line width "
                   "follows the expert's mean mixing proportion.",
        "curves": "Training curves: median over runs and the 10-90% band.",
    }[key]


def _write_html(outcome: VowelsOutcome, results: list[SystemResult], path: Path) -> Path:
    config = outcome.config
    verdicts = table(["Claim of the paper", "This run", "Evidence"],
                     [(c.claim, c.verdict, c.evidence) for c in outcome.claims],
                     row_classes=[c.verdict.replace(" ", "-") for c in outcome.claims])
    steps = table(["System", "step", "runs reached", "mean epochs", "outcome"],
                  [(r.system.name, t.lr, t.reached,
                    "-" if t.mean_epochs is None else f"{t.mean_epochs:.0f}",
                    t.status + (" (chosen)" if t.lr == r.lr else ""))
                   for r in results for t in r.trials])
    sections = [
        Section("What this run reproduces", verdicts),
        Section("Table 1 beside the paper's", preformatted(outcome.table_text) + text(
            f"Protocol: full-batch gradient descent, fixed step, no momentum; stop when the average "
            f"squared error on the training set reaches {config.criterion} "
            f"({'per output unit' if config.average == 'unit' else 'per case'}); epoch cap "
            f"{config.max_epochs}; {config.runs} runs per system; train speakers 1-50, test 51-75"
            f"{' and 76' if config.include_speaker_76 else ''}. Accuracies are at the criterion. "
            f"Ran in {outcome.seconds:.1f} s.") + text(_stability_note(outcome.rows))),
        Section("Step-size exploration", steps + text(
            "Every step starts from the same initial weights. The step with the fewest mean epochs "
            "among those where every run reached the criterion is kept; steps that could no longer "
            "beat it were stopped early.")),
    ]
    if outcome.loss_rows:
        sections.append(Section("Error functions: Eq. 1, Eq. 2, Eq. 3", table(
            ["System", "step", "reached", "mean epochs", "train %", "test %", "active experts",
             "experts per case"],
            [(r.system, r.lr, f"{r.reached}/{r.runs}", f"{r.epochs:.0f}", f"{r.train:.1f}",
              f"{r.test:.1f}", f"{r.active_experts:.1f}", f"{r.experts_per_case:.2f}")
             for r in outcome.loss_rows])))
    figures = "".join(figure(p, _caption(k)) for k, p in outcome.files.items() if p.suffix == ".png")
    sections.append(Section("Figures", figures))
    return write_report(path, "moekit vowels: Jacobs et al. (1991), Table 1 and Figures 2-3",
                        sections)
