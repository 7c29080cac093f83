"""`moekit vowels`: run the protocol and the readings, then write results.json, the figures and the
HTML report (:mod:`moekit.experiments.vowels_report`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit._version import __version__
from moekit.data.vowels import VowelTask, vowel_task
from moekit.experiments.solver_config import SolverRow
from moekit.experiments.vowels import (
    SystemResult,
    VowelsConfig,
    loss_comparison_systems,
    systems_of,
    to_jsonable,
)
from moekit.experiments.vowels_jobs import choose_processes, first_jobs
from moekit.experiments.vowels_models import (
    RESULTS_FILE,
    save_vowels_models,
)
from moekit.experiments.vowels_pool import Workers, run_jobs
from moekit.experiments.vowels_readings import (
    Reading,
    common_systems,
    control_of,
    format_readings,
    readings,
)
from moekit.experiments.vowels_report import write_html
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
    seconds: float  # the jobs: trainings, solver comparison, figures and analyses
    files: dict[str, Path] = field(default_factory=dict)
    analyses: dict[str, dict] = field(default_factory=dict)  # model name -> routing statistics
    # EM and the others, to the criterion
    solver_rows: list[SolverRow] = field(default_factory=list)
    processes: int = 1  # the processes that ran the jobs, each on one thread


def _loss_rows(results: list[SystemResult], loss_results: list[SystemResult]) -> list[Row]:
    """The error functions' rows, with the main error function's row of the same mixture."""
    loss_rows = table_rows(loss_results)
    if not loss_rows:
        return []
    sizes = {r.system.size for r in loss_results}
    main = [r for r in results if r.system.kind == "mixture" and r.system.size in sizes]
    return sorted(loss_rows + table_rows(main), key=lambda r: r.system)


def run_vowels(config: VowelsConfig, task: VowelTask | None = None, *,
               processes: int | None = None) -> VowelsOutcome:
    """Run every system (25 runs each, step exploration included), the readings and the controls
    beside them, the error functions and the solvers; write every output.

    The trainings run side by side in ``processes`` processes (None: one per core for a full run,
    :func:`moekit.experiments.vowels_jobs.choose_processes`), each on one thread: the results are
    the same bit for bit whatever the count. The run folder (``config.out``) is built beside it and
    put in place whole at the end, replacing a previous run there
    (:func:`moekit.io.run_folder.run_folder`): a run killed part way leaves the previous run as it
    was.
    """
    final = Path(config.out)
    with run_folder(final, "vowels", overwrite=True, older=(RESULTS_FILE,)) as out:
        outcome = _run_into(config, task, out, processes)
    outcome.files = {k: final / p.relative_to(out) for k, p in outcome.files.items()}
    return outcome


def _run_into(config: VowelsConfig, task: VowelTask | None, out: Path,
              processes: int | None) -> VowelsOutcome:
    """:func:`run_vowels`, writing into the folder ``out`` (the partial run folder)."""
    start = time.perf_counter()
    jobs = first_jobs(config)
    processes = choose_processes(config, len(jobs)) if processes is None else processes
    # the workers start first: they import torch while this process builds the task
    with Workers(processes) if processes > 1 else contextlib.nullcontext() as workers:
        task = task or vowel_task(include_speaker_76=config.include_speaker_76)
        done = run_jobs(jobs, task, config, processes=processes, out=out, workers=workers,
                        on_idle=_import_outputs)
    results = [done[f"own {s.name}"] for s in systems_of(config)]
    control = control_of(config)
    control_own = done["own control"] if control is not None else None
    common = ([done[f"common {s.name}"][0] for s in common_systems(config, control)]
              if config.readings else None)
    found = readings(config, task, results, control_own, common=common,
                     sigmoid=done.get("sigmoid"))
    loss_results = [done[f"loss {s.name}"] for s in loss_comparison_systems(config)]
    solver_rows = done.get("solvers", [])
    seconds = time.perf_counter() - start
    rows, loss_rows = table_rows(results), _loss_rows(results, loss_results)
    tests = epoch_t_tests(results, config.t_test)
    outcome = VowelsOutcome(config, rows, loss_rows, tests, found, claims(found, rows, loss_rows),
                            format_table(rows, tests, config), format_readings(found), seconds,
                            solver_rows=solver_rows, processes=processes)
    outcome.files.update(done["figures"])
    saved, analyses, files = (done["analysis"] if "analysis" in done
                              else (save_vowels_models(results, config, out, task), {}, {}))
    outcome.analyses.update(analyses)
    outcome.files.update(files)
    extra = [control_own] if control_own is not None else []
    outcome.files["results"] = _write_json(outcome, results + extra + loss_results, out, saved)
    outcome.files["report"] = write_html(outcome, results, out / "report.html")
    return outcome


def _import_outputs() -> None:
    """Import what this process needs once the jobs are done (about 1 s: SciPy for the t-tests,
    the report's plotting and analysis), while the last jobs run (:func:`run_jobs`'s
    ``on_idle``)."""
    for module in ("scipy.stats", "moekit.reports.analysis"):
        importlib.import_module(module)


def _write_json(outcome: VowelsOutcome, results: list[SystemResult], out: Path,
                saved: dict[str, object]) -> Path:
    """results.json; its files are named where they will be once the run is in place."""
    final = Path(outcome.config.out)
    record = {
        "moekit_version": __version__, "torch_version": torch.__version__,
        "machine": platform.platform(), "threads": 1, "processes": outcome.processes,
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
