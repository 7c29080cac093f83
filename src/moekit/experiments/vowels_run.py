"""`moekit vowels`: run the protocol, then write results.json, the figures and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit._version import __version__
from moekit.analysis.over_training import routing_summary
from moekit.data.vowels import VOWEL_LABELS, VowelTask, vowel_task
from moekit.experiments.solver_config import SolverRow, SolversConfig
from moekit.experiments.solvers import compare_solvers
from moekit.experiments.solvers import format_table as format_solver_table
from moekit.experiments.vowels import (
    SystemResult,
    VowelsConfig,
    loss_comparison_systems,
    run_system,
    systems_of,
    to_jsonable,
)
from moekit.experiments.vowels_summary import (
    Claim,
    Row,
    TTest,
    claims,
    describe_runs,
    epoch_t_tests,
    format_table,
    rows_to_json,
    table_rows,
)
from moekit.fitting.history import History
from moekit.io.files import write_text_atomic
from moekit.io.models import load_model, save_model
from moekit.nn.dense import MixtureOfExperts
from moekit.plotting.curves import plot_training_curves
from moekit.plotting.expert_lines import active_experts, expert_decision_lines, plot_lines_over_time
from moekit.plotting.partition import plot_mixing_proportions, plot_partition
from moekit.plotting.style import save_figure
from moekit.reports.analysis import AnalysisInput, analysis_sections, analyze_input
from moekit.reports.html import Section, figure, preformatted, table, text, write_report

MODELS_DIR, ANALYSIS_DIR, HISTORY_FILE = "models", "analysis", "routing_history.json"
FEATURE_NAMES = ("F1 (kHz)", "F2 (kHz)")


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
    analyses: dict[str, dict] = field(default_factory=dict)  # model name -> routing statistics
    # EM and the others, to the criterion
    solver_rows: list[SolverRow] = field(default_factory=list)


SOLVER_RUNS = 5  # initial weights per solver in the comparison: it shows passes, not spread


def _solver_comparison(config: VowelsConfig, task: VowelTask) -> list[SolverRow]:
    """The paper's gradient descent against Adam, L-BFGS and EM on this task and criterion
    (:mod:`moekit.experiments.solvers`), on at most 5 of the runs' initial weights."""
    if not config.compare_solvers or not config.experts or config.average != "unit":
        return []
    solvers = SolversConfig(tasks=("vowels",), runs=min(config.runs, SOLVER_RUNS), seed=config.seed,
                            vowel_experts=min(config.experts), vowel_lr_grid=config.lr_grid,
                            progress=config.progress)
    return compare_solvers(solvers, task=task)


def _solver_section(rows: list[SolverRow]) -> Section:
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
    solver_rows = _solver_comparison(config, task)

    rows, loss_rows = table_rows(results), table_rows(loss_results)
    if loss_rows:  # the main error function's row of the same mixture completes the comparison
        sizes = {r.system.size for r in loss_results}
        main_rows = [row for row, r in zip(rows, results, strict=True)
                     if r.system.kind == "mixture" and r.system.size in sizes]
        loss_rows = sorted(loss_rows + main_rows, key=lambda r: r.system)
    tests = epoch_t_tests(results)
    found = claims(rows, tests, loss_rows)
    outcome = VowelsOutcome(config, rows, loss_rows, tests, found,
                            format_table(rows, tests, config), seconds, solver_rows=solver_rows)
    out = Path(config.out)
    outcome.files.update(_figures(results, task, config, out))
    saved = save_vowels_models(results, config, out, task)
    for item in load_vowels_run(out, task=task, saved=saved):
        outcome.analyses[item.name] = analyze_input(item, out / ANALYSIS_DIR)
        outcome.files[f"analysis_{item.name}"] = out / ANALYSIS_DIR / item.name / "analysis.html"
    outcome.files["results"] = _write_json(outcome, results + loss_results, out / "results.json",
                                           saved)
    outcome.files["report"] = _write_html(outcome, results, out / "report.html")
    return outcome


def _figures(results: list[SystemResult], task: VowelTask, config: VowelsConfig,
             out: Path) -> dict[str, Path]:
    x_train, y_train = task.x_train.numpy(), task.y_train.numpy()
    files: dict[str, Path] = {}
    mixtures = [r for r in results if r.system.kind == "mixture"]
    if mixtures:
        first = min(mixtures, key=lambda r: r.system.size)
        model = first.models[0]
        inactive = [str(e) for e, a in enumerate(active_experts(model, x_train)) if not a]
        note = (f"inactive experts (mean proportion < 1%): {', '.join(inactive)}" if inactive
                else "every expert active")
        fig = plot_partition(model, x_train, y_train, task.labels, feature_names=FEATURE_NAMES,
                             soft=False,
                             lines=expert_decision_lines(model, x_train, y_train, task.labels),
                             title=f"{first.system.name}, run 0, epoch {first.epochs_R[0]}",
                             note=note)
        files["figure2"] = save_figure(fig, out / "figure2_partition.png")
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


def save_vowels_models(results: list[SystemResult], config: VowelsConfig, out: Path,
                       task: VowelTask) -> dict[str, object]:
    """Save run 0 of each mixture at its chosen step (and run 1, to compare routing across runs)
    into ``out/models/``; the tracked run also gets its routing over training. Returns the record
    that results.json keeps under "analysis" (what :func:`load_vowels_run` reads back)."""
    task_options = {"split": "train", "include_speaker_76": config.include_speaker_76}
    models = []
    for r in results:
        if r.system.kind != "mixture":
            continue
        name = f"{r.system.size}_experts"
        for run in range(min(2, len(r.models))):
            folder = name if run == 0 else f"{name}_run{run}"
            save_model(r.models[run], out / MODELS_DIR / folder, metadata={"vowels": {
                "system": r.system.name, "run": run, "lr": r.lr,
                "epochs": int(r.epochs_R[run]), "class_names": list(VOWEL_LABELS),
                "feature_names": list(FEATURE_NAMES), **task_options}})
        entry = {"name": name, "system": r.system.name, "run": 0, "lr": r.lr,
                 "path": f"{MODELS_DIR}/{name}",
                 "reference": f"{MODELS_DIR}/{name}_run1" if len(r.models) > 1 else None,
                 "history": None}
        if r.snapshots:
            entry["history"] = f"{MODELS_DIR}/{name}/{HISTORY_FILE}"
            write_text_atomic(out / entry["history"],
                              json.dumps(_routing_history(r, config, task), indent=1))
        models.append(entry)
    return {**task_options, "models": models}


def _routing_history(result: SystemResult, config: VowelsConfig, task: VowelTask
                     ) -> list[dict[str, float]]:
    """Load and entropy of the tracked run at each snapshot epoch, on the training set."""
    frame = MixtureOfExperts.from_config(result.models[0].config).to(config.torch_dtype)
    x = task.x_train.to(config.torch_dtype)
    records = []
    for epoch, state in result.snapshots:
        frame.load_state_dict(state)
        summary = routing_summary(frame, x)
        records.append({"epoch": epoch, **{f"routing_{k}": v for k, v in summary.items()}})
    return records


def load_vowels_run(run_dir: Path | str, *, task: VowelTask | None = None,
                    saved: dict[str, object] | None = None) -> list[AnalysisInput]:
    """The saved mixtures of a `moekit vowels` run folder, each with the data to analyse it on
    (the vowel task rebuilt as the run used it), ready for
    :func:`moekit.reports.analysis.analyze_input`.

    Example:
        >>> for item in load_vowels_run("runs/vowels"):            # doctest: +SKIP
        ...     analyze_input(item, "runs/vowels/analysis")
    """
    run_dir = Path(run_dir)
    if saved is None:
        path = run_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"load_vowels_run: no results.json in {str(run_dir)!r}; run "
                                    f"`moekit vowels --out {run_dir}` first.")
        saved = json.loads(path.read_text(encoding="utf-8")).get("analysis")
        if not saved:
            raise ValueError(f"load_vowels_run: {str(path)!r} lists no saved models (a run from "
                             "an older moekit); run `moekit vowels` again.")
    task = task or vowel_task(include_speaker_76=bool(saved["include_speaker_76"]))
    x, y = (task.x_train, task.y_train) if saved["split"] == "train" else (task.x_test,
                                                                             task.y_test)
    items = []
    for entry in saved["models"]:
        model = load_model(run_dir / entry["path"])
        dtype = next(model.parameters()).dtype
        reference = load_model(run_dir / entry["reference"]) if entry["reference"] else None
        history = None
        if entry["history"]:
            history = History(json.loads((run_dir / entry["history"]).read_text("utf-8")))
        items.append(AnalysisInput(
            name=entry["name"], model=model, x=x.to(dtype), y=y, class_names=task.labels,
            feature_names=FEATURE_NAMES, reference=reference, reference_name="run 1",
            history=history,
            description=f"{entry['system']}, run {entry['run']} at step {entry['lr']:g}, on the "
                        f"{saved['split']}ing set ({x.shape[0]} vowels of speakers "
                        f"{'1-50' if saved['split'] == 'train' else '51-75'})."))
    return items


def _write_json(outcome: VowelsOutcome, results: list[SystemResult], path: Path,
                saved: dict[str, object]) -> Path:
    record = {
        "moekit_version": __version__, "torch_version": torch.__version__,
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "seconds": round(outcome.seconds, 2), "config": to_jsonable(outcome.config),
        "table": rows_to_json(outcome.rows), "loss_comparison": rows_to_json(outcome.loss_rows),
        "t_tests": [t.__dict__ for t in outcome.tests],
        "claims": [c.__dict__ for c in outcome.claims],
        "runs": [describe_runs(r) for r in results],
        "files": {k: str(v) for k, v in outcome.files.items()},
        "analysis": saved,
        "solvers": [dataclasses.asdict(r) for r in outcome.solver_rows],
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
            f"Protocol: full-batch gradient descent, fixed step, no momentum; stop when the "
            f"average squared error on the training set reaches {config.criterion} "
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
