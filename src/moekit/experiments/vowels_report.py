"""The figures and the HTML report of a `moekit vowels` run: the verdict, Table 1, the readings
side by side, the exploration, the error functions, the solvers, Figures 2-3 and the routing
analysis of the saved mixtures."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moekit.data.vowels import VowelTask
from moekit.experiments.solver_config import SolverRow
from moekit.experiments.solvers import format_table as format_solver_table
from moekit.experiments.vowels import SystemResult, VowelsConfig
from moekit.experiments.vowels_models import ANALYSIS_DIR, FEATURE_NAMES
from moekit.experiments.vowels_readings import HEADERS, entry_cells

if TYPE_CHECKING:
    from moekit.reports.html import Section

# moekit.plotting (matplotlib) and moekit.reports (SciPy, matplotlib, pandas) are imported in the
# functions that draw and write: `moekit vowels` imports this module in its parent process before
# it starts its workers, and in every worker, most of which only train.


def figure2_run(result: SystemResult) -> int:
    """The run Figure 2 is drawn from: the first divided as Figure 2, else the first of the most
    common division."""
    typical = Counter(result.partition_R).most_common(1)[0][0] if result.partition_R else None
    return next((i for kind in ("figure 2", typical)
                 for i, p in enumerate(result.partition_R) if p == kind), 0)


def figure2_system(mixtures: list[SystemResult]) -> SystemResult:
    """The mixture Figure 2 is drawn from: the smallest with a run divided as Figure 2, else the
    smallest."""
    split = [r for r in mixtures if "figure 2" in r.partition_R] or mixtures
    return min(split, key=lambda r: r.system.size)


def figure2(result: SystemResult, task: VowelTask, *, title: str = ""):
    """The paper's Figure 2 from one of ``result``'s runs: the first whose experts divide the
    vowels as the paper's do, else the first of the most common division (the typical run); the
    title says which run and how it divides them."""
    from moekit.plotting.expert_lines import active_experts, expert_decision_lines
    from moekit.plotting.partition import plot_partition

    x_train, y_train = task.x_train.numpy(), task.y_train.numpy()
    run = figure2_run(result)
    model = result.models[run]
    inactive = [str(e) for e, a in enumerate(active_experts(model, x_train)) if not a]
    note = (f"partition: {result.partition_R[run]}; inactive experts (mean proportion < 1%): "
            + (", ".join(inactive) if inactive else "none"))
    return plot_partition(model, x_train, y_train, task.labels, feature_names=FEATURE_NAMES,
                          soft=False, lines=expert_decision_lines(model, x_train, y_train,
                                                                  task.labels),
                          title=title or f"{result.system.name}, step {result.lr:g}, run {run}, "
                                         f"epoch {result.epochs_R[run]}", note=note)


def figures(results: list[SystemResult], task: VowelTask, config: VowelsConfig,
            out: Path) -> dict[str, Path]:
    """Figures 2 and 3, each mixture's proportions, and the training curves, as PNG files."""
    from moekit.plotting.curves import plot_training_curves
    from moekit.plotting.expert_lines import plot_lines_over_time
    from moekit.plotting.partition import plot_mixing_proportions
    from moekit.plotting.style import save_figure

    x_train, y_train = task.x_train.numpy(), task.y_train.numpy()
    files: dict[str, Path] = {}
    mixtures = [r for r in results if r.system.kind == "mixture"]
    if mixtures:
        files["figure2"] = save_figure(figure2(figure2_system(mixtures), task),
                                       out / "figure2_partition.png")
        tracked = next((r for r in mixtures if r.snapshots), None)
        if tracked is not None:
            fig = plot_lines_over_time(tracked.models[0], tracked.snapshots, x_train, y_train,
                                       task.labels)
            files["figure3"] = save_figure(fig, out / "figure3_lines_over_time.png")
        for r in mixtures:
            key = f"mixing_{r.system.size}"
            fig = plot_mixing_proportions(r.models[0], x_train, axis_labels=FEATURE_NAMES)
            files[key] = save_figure(fig, out / f"mixing_proportions_{r.system.size}_experts.png")
    ylabel = f"average squared error per {'output unit' if config.average == 'unit' else 'case'}"
    fig = plot_training_curves({r.system.name: r.curves_RT for r in results}, config.criterion,
                               ylabel=ylabel)
    files["curves"] = save_figure(fig, out / "training_curves.png")
    return files


def _solver_section(rows: list[SolverRow]) -> Section:
    from moekit.reports.html import Section, table, text

    body = table(
        ["solver", "setting", "reached", "passes to the criterion (median)", "iterations (median)",
         "seconds (median)", "train %", "test %"],
        [(r.label, r.setting, f"{r.reached}/{r.runs}",
          "not reached" if r.passes is None else f"{r.passes:g}",
          f"{np.median(r.iterations_R):g}", f"{r.seconds:.3f}", f"{r.train_score:.1f}",
          f"{r.test_score:.1f}") for r in rows])
    notes = [line[2:] for line in format_solver_table(rows).splitlines() if line.startswith("- ")]
    return Section("Solvers: passes over the data to the paper's criterion", body + "".join(
        text(n) for n in notes) + text(
        "Each solver starts from the same initial weights. A pass is one sweep over the training "
        "rows that evaluates the model: one update of the paper's full-batch descent; for EM an "
        "E-step or a Newton trial (Jordan & Jacobs 1994). `moekit compare-solvers` runs the same "
        "comparison, and a regression task too."))


def _stability_note(results: list[SystemResult]) -> str:
    """Where the descent stops being smooth and where runs stop converging, from the exploration."""
    notes = []
    for r in results:
        smooth = [t.lr for t in r.trials if t.rising < 1.0 and t.reached]
        complete = [t.lr for t in r.trials if t.mean_epochs is not None]
        chosen = next(t for t in r.trials if t.lr == r.lr)
        notes.append(f"{r.system.name}: the error rose on {chosen.rising:.0f}% of the epochs at "
                     f"the chosen step {r.lr:g}"
                     + (f"; it falls smoothly (rising on under 1% of epochs) up to step "
                        f"{max(smooth):g}" if smooth else "")
                     + (f"; every run reaches the criterion at steps {min(complete):g} to "
                        f"{max(complete):g} of the grid" if complete else ""))
    return ("The exploration's rule (the fewest mean epochs with every run at the criterion) "
            "prefers steps where gradient descent oscillates but still converges: "
            + "; ".join(notes) + ". Steps not run to the end (stopped early) count as not "
            "reaching the criterion here.")


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


def write_html(outcome, results: list[SystemResult], path: Path) -> Path:
    """The self-contained report of a :class:`~moekit.experiments.vowels_run.VowelsOutcome`."""
    from moekit.reports.analysis import analysis_sections
    from moekit.reports.html import Section, figure, preformatted, table, text, write_report

    config = outcome.config
    verdicts = table(["Claim of the paper", "This run", "Evidence"],
                     [(c.claim, c.verdict, c.evidence) for c in outcome.claims],
                     row_classes=[c.verdict.replace(" ", "-") for c in outcome.claims])
    steps = table(["System", "step", "runs reached", "mean epochs", "rising", "outcome"],
                  [(r.system.name, f"{t.lr:g}", t.reached,
                    "-" if t.mean_epochs is None else f"{t.mean_epochs:.0f}", f"{t.rising:.0f}%",
                    t.status + (" (chosen)" if t.lr == r.lr else ""))
                   for r in results for t in r.trials])
    readings = "".join(
        text(r.title) + table(HEADERS, [entry_cells(e) for e in r.entries])
        for r in outcome.readings)
    sections = [
        Section("What this run reproduces", verdicts),
        Section("Table 1 beside the paper's", preformatted(outcome.table_text) + text(
            f"Protocol: full-batch gradient descent, fixed step, no momentum; stop when the "
            f"average squared error on the training set reaches {config.criterion} "
            f"({'per output unit' if config.average == 'unit' else 'per case'}); epoch cap "
            f"{config.max_epochs}; {config.runs} runs per system; train speakers 1-50, test 51-75"
            f"{' and 76' if config.include_speaker_76 else ''}. Accuracies are at the criterion. "
            f"Ran in {outcome.seconds:.1f} s.") + text(_stability_note(results))),
        Section("The readings side by side, and the one-expert control", readings + text(
            "The paper leaves each system's step to 'a limited exploration'. (a) is its stated "
            "rule; (b) puts every system at one step where the error falls smoothly; (c) uses "
            "logistic experts. '1 Expert (no gate)' is a softmax layer trained the same way: "
            "the control for what the mixture adds. Ratios are backprop's mean epochs over the "
            "system's; t-tests are one-sided with a "
            f"{'pooled' if config.t_test == 'pooled' else 'Welch'} variance.")),
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
    if outcome.solver_rows:
        sections.append(_solver_section(outcome.solver_rows))
    figures = "".join(figure(p, _caption(k)) for k, p in outcome.files.items()
                      if p.suffix == ".png")
    sections.append(Section("Figures", figures))
    for name, stats in outcome.analyses.items():
        sections += analysis_sections(stats, path.parent / ANALYSIS_DIR / name,
                                      heading=f"What the experts do ({name.replace('_', ' ')})")
    return write_report(path, "moekit vowels: Jacobs et al. (1991), Table 1 and Figures 2-3",
                        sections)
