"""`moekit vowels`: run the protocol and the readings, then write results.json, the figures and the
HTML report (:mod:`moekit.experiments.vowels_report`)."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit._version import __version__
from moekit.data.vowels import VowelTask, vowel_task
from moekit.experiments.solver_config import SolverRow, SolversConfig
from moekit.experiments.solvers import compare_solvers
from moekit.experiments.vowels import (
    SystemResult,
    VowelsConfig,
    loss_comparison_systems,
    run_system,
    snapshot_epochs,
    systems_of,
    to_jsonable,
)
from moekit.experiments.vowels_models import (
    ANALYSIS_DIR,
    RESULTS_FILE,
    load_vowels_run,
    save_vowels_models,
)
from moekit.experiments.vowels_readings import Reading, control_of, format_readings, readings
from moekit.experiments.vowels_report import figures, write_html
from moekit.experiments.vowels_summary import (
    Row,
    TTest,
    describe_runs,
    epoch_t_tests,
    format_table,
    rows_to_json,
    table_rows,
)
from moekit.experiments.vowels_verdict import Claim, claims
from moekit.io.files import write_text_atomic
from moekit.io.run_folder import run_folder
from moekit.reports.analysis import analyze_input

SOLVER_RUNS = 5  # initial weights per solver in the comparison: it shows passes, not spread


@dataclass
class VowelsOutcome:
    """Everything `moekit vowels` produced; ``files`` maps a short name to the path written."""

    config: VowelsConfig
    rows: list[Row]
    loss_rows: list[Row]
    tests: list[TTest]
    readings: list[Reading]
    claims: list[Claim]
    table_text: str
    readings_text: str
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    analyses: dict[str, dict] = field(default_factory=dict)  # model name -> routing statistics
    # EM and the others, to the criterion
    solver_rows: list[SolverRow] = field(default_factory=list)


def _solver_comparison(config: VowelsConfig, task: VowelTask, step: float) -> list[SolverRow]:
    """The paper's gradient descent (at ``step``, the one the exploration chose for the smallest
    mixture) against Adam, L-BFGS and EM on this task and criterion
    (:mod:`moekit.experiments.solvers`), on at most 5 of the runs' initial weights."""
    if not config.compare_solvers or not config.experts or config.average != "unit":
        return []
    solvers = SolversConfig(tasks=("vowels",), runs=min(config.runs, SOLVER_RUNS), seed=config.seed,
                            vowel_experts=min(config.experts), vowel_lr_grid=(step,),
                            progress=config.progress)
    return compare_solvers(solvers, task=task)


def _loss_rows(results: list[SystemResult], loss_results: list[SystemResult]) -> list[Row]:
    """The error functions' rows, with the main error function's row of the same mixture."""
    loss_rows = table_rows(loss_results)
    if not loss_rows:
        return []
    sizes = {r.system.size for r in loss_results}
    main = [r for r in results if r.system.kind == "mixture" and r.system.size in sizes]
    return sorted(loss_rows + table_rows(main), key=lambda r: r.system)


def run_vowels(config: VowelsConfig, task: VowelTask | None = None) -> VowelsOutcome:
    """Run every system (25 runs each, step exploration included), the readings and the controls
    beside them, the error functions and the solvers; write every output.

    The run folder (``config.out``) is built beside it and put in place whole at the end, replacing
    a previous run there (:func:`moekit.io.run_folder.run_folder`): a run killed part way leaves the
    previous run as it was.
    """
    final = Path(config.out)
    with run_folder(final, "vowels", overwrite=True, older=(RESULTS_FILE,)) as out:
        outcome = _run_into(config, task, out)
    outcome.files = {k: final / p.relative_to(out) for k, p in outcome.files.items()}
    return outcome


def _run_into(config: VowelsConfig, task: VowelTask | None, out: Path) -> VowelsOutcome:
    """:func:`run_vowels`, writing into the folder ``out`` (the partial run folder)."""
    start = time.perf_counter()
    task = task or vowel_task(include_speaker_76=config.include_speaker_76)
    track_size = max(config.experts) if config.experts else None
    results = [run_system(s, task, config,
                          track_epochs=snapshot_epochs(config.max_epochs)
                          if s.kind == "mixture" and s.size == track_size else ())
               for s in systems_of(config)]
    control = control_of(config)
    control_own = run_system(control, task, config) if control is not None else None
    found = readings(config, task, results, control_own)
    loss_results = [run_system(s, task, config) for s in loss_comparison_systems(config)]
    seconds = time.perf_counter() - start
    mixtures = [r for r in results if r.system.kind == "mixture"]
    solver_rows = (_solver_comparison(config, task, min(mixtures, key=lambda r: r.system.size).lr)
                   if mixtures else [])
    rows, loss_rows = table_rows(results), _loss_rows(results, loss_results)
    tests = epoch_t_tests(results, config.t_test)
    outcome = VowelsOutcome(config, rows, loss_rows, tests, found, claims(found, rows, loss_rows),
                            format_table(rows, tests, config), format_readings(found), seconds,
                            solver_rows=solver_rows)
    outcome.files.update(figures(results, task, config, out))
    saved = save_vowels_models(results, config, out, task)
    for item in load_vowels_run(out, task=task, saved=saved):
        outcome.analyses[item.name] = analyze_input(item, out / ANALYSIS_DIR)
        outcome.files[f"analysis_{item.name}"] = out / ANALYSIS_DIR / item.name / "analysis.html"
    extra = [control_own] if control_own is not None else []
    outcome.files["results"] = _write_json(outcome, results + extra + loss_results, out, saved)
    outcome.files["report"] = write_html(outcome, results, out / "report.html")
    return outcome


def _write_json(outcome: VowelsOutcome, results: list[SystemResult], out: Path,
                saved: dict[str, object]) -> Path:
    """results.json; its files are named where they will be once the run is in place."""
    final = Path(outcome.config.out)
    record = {
        "moekit_version": __version__, "torch_version": torch.__version__,
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "seconds": round(outcome.seconds, 2), "config": to_jsonable(outcome.config),
        "table": rows_to_json(outcome.rows), "loss_comparison": rows_to_json(outcome.loss_rows),
        "t_tests": [dataclasses.asdict(t) for t in outcome.tests],
        "readings": [r.to_dict() for r in outcome.readings],
        "claims": [dataclasses.asdict(c) for c in outcome.claims],
        "runs": [describe_runs(r) for r in results],
        "files": {k: str(final / v.relative_to(out)) for k, v in outcome.files.items()},
        "analysis": saved,
        "solvers": [dataclasses.asdict(r) for r in outcome.solver_rows],
    }
    write_text_atomic(out / RESULTS_FILE, json.dumps(record, indent=2))
    return out / RESULTS_FILE
