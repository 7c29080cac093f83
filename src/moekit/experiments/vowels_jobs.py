"""The work of `moekit vowels` as independent jobs, run side by side on the machine's cores.

A default run trains 12 batches that do not depend on one another (Table 1's four systems and the
control, each exploring 13 steps; the two other error functions; reading (b)'s five systems at the
common step); the smallest mixture's exploration releases reading (c) and the solver comparison
(they need the step it chose), Table 1's results release the figures, and its mixtures the saving
and analysis of their models. Each is a :class:`Job`;
:func:`moekit.experiments.vowels_pool.run_jobs` runs them in worker processes, the highest
priority first (its cost and that of the jobs waiting on it), each job whole and on one thread
wherever it runs. So every number is the same bit for bit however many processes run and
whichever takes a job: with two threads, torch splits some small float32 sums between the
threads, which changes their rounding, and at the oscillating steps of an exploration one rounding
changes a run's path (results.json differed in a number between 1 and 2 threads).

Time measured: benchmarks/RESULTS.md, `moekit vowels`.

Progress: one bar per job running, counting its runs finished (an exploration's runs finish in
bursts, long before the epoch cap), and one for the whole run, counting the expected work of the
jobs done. The processes: :mod:`moekit.experiments.vowels_pool`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.data.vowels import VowelTask
from moekit.experiments.solver_config import SolversConfig
from moekit.experiments.solvers import compare_solvers
from moekit.experiments.vowels import (
    System,
    VowelsConfig,
    loss_comparison_systems,
    run_steps,
    run_system,
    snapshot_epochs,
    systems_of,
)
from moekit.experiments.vowels_models import ANALYSIS_DIR, load_vowels_run, save_vowels_models
from moekit.experiments.vowels_readings import common_systems, control_of
from moekit.experiments.vowels_report import figures
from moekit.threads import caller_chose_threads, compute_threads

SOLVER_RUNS = 5  # initial weights per solver in the comparison: it shows passes, not spread
# Below this many run-epochs at most (runs x steps x cap, over Table 1's systems), one process:
# a worker's start (importing torch and the training modules, about 1.2 s) would not pay
# (--quick is 3 x 2 x 300).
PARALLEL_WORK = 1_000_000
JOB_KINDS = ("explore", "steps", "solvers", "figures", "analysis")
OUTPUT_COST = 1_000_000.0  # a job writing figures or analyses: about 1-2 s


@dataclass(frozen=True)
class Job:
    """One training of a `moekit vowels` run.

    Attributes:
        key: its name among the run's jobs ('own 4 Experts', 'common BP 6 Hid', 'sigmoid',
            'solvers', ...).
        kind: 'explore' (:func:`~moekit.experiments.vowels.run_system`: the step exploration),
            'steps' (:func:`~moekit.experiments.vowels.run_steps`: every run at ``steps``),
            'solvers' (the solver comparison at ``steps[0]``), 'figures' (the figures of Table
            1's results, ``inputs``) or 'analysis' (save the mixtures of ``inputs`` and analyse
            them), these two writing into the folder ``out``.
        system: what is trained (None for the others).
        steps: the steps of 'steps' and 'solvers' jobs.
        track_epochs: the epochs at which to snapshot run 0 (Figure 3).
        runs: the runs in its batch (the progress bar's total).
        cost: its expected run time, in arbitrary units.
        priority: its cost and that of the jobs its result releases: the highest starts first.
    """

    key: str
    kind: str
    system: System | None
    steps: tuple[float, ...] = ()
    track_epochs: tuple[int, ...] = ()
    runs: int = 0
    cost: float = 0.0
    priority: float = 0.0
    inputs: tuple[Any, ...] = field(default=(), repr=False)
    out: str = ""

    @property
    def label(self) -> str:
        return self.key if self.system is None else f"{self.key} ({self.runs} runs)"


def _width(system: System) -> int:
    """Numbers per row of one run's largest tensors: E x O for a mixture, H + O for a net."""
    return system.size * 4 if system.kind == "mixture" else system.size + 4


def _job(key: str, kind: str, system: System, config: VowelsConfig,
         steps: tuple[float, ...], track_epochs: tuple[int, ...] = ()) -> Job:
    """A training job, its cost guessed from its runs, their width and their epochs: about 400
    for an exploration (hopeless steps are stopped once the best step is complete), more for a
    fixed step (measured: 1,100 to 2,400 at the common step, the cap for most sigmoid runs)."""
    runs = config.runs * len(steps)
    epochs = min(config.max_epochs, 400 if kind == "explore" else 2_000)
    cost = float(runs * epochs * (_width(system) + 8))
    return Job(key, kind, system, steps, track_epochs, runs, cost, cost)


def first_jobs(config: VowelsConfig) -> list[Job]:
    """The jobs that depend on nothing: Table 1's systems and the control (each exploring the
    steps), the other error functions, and reading (b)."""
    track_size = max(config.experts) if config.experts else None
    jobs = [_job(f"own {s.name}", "explore", s, config, config.steps,
                 snapshot_epochs(config.max_epochs)
                 if s.kind == "mixture" and s.size == track_size else ())
            for s in systems_of(config)]
    control = control_of(config)
    if control is not None:
        jobs.append(_job("own control", "explore", control, config, config.steps))
    jobs += [_job(f"loss {s.name}", "explore", s, config, config.steps)
             for s in loss_comparison_systems(config)]
    if config.readings:
        jobs += [_job(f"common {s.name}", "steps", s, config, (config.common_step,))
                 for s in common_systems(config, control)]
    for i, job in enumerate(jobs):  # what waits on a job's result counts in its priority
        waiting = jobs_after(job, config, -1.0)  # a placeholder step: only their costs count
        jobs[i] = dataclasses.replace(job, priority=job.cost + sum(j.cost for j in waiting))
    return jobs


def jobs_after(job: Job, config: VowelsConfig, step: float) -> list[Job]:
    """The jobs that ``job``'s result releases: after the smallest mixture's exploration (which
    chose ``step``), reading (c) and the solver comparison."""
    if job.kind != "explore" or not job.key.startswith("own ") or job.system is None \
            or job.system.kind != "mixture" or job.system.size != min(config.experts, default=0):
        return []
    jobs = []
    if config.readings:
        system = dataclasses.replace(job.system, expert_head="sigmoid")
        steps = tuple(sorted({step, config.common_step}))
        sigmoid = _job("sigmoid", "steps", system, config, steps)
        jobs.append(dataclasses.replace(sigmoid, cost=2 * sigmoid.cost,  # most hit the cap
                                        priority=2 * sigmoid.cost))
    if config.compare_solvers and config.average == "unit":
        runs = min(config.runs, SOLVER_RUNS)
        cost = float(runs * 480_000)  # measured: 5 runs about as long as 'sigmoid' / 4
        jobs.append(Job("solvers", "solvers", None, (step,), runs=runs, cost=cost,
                        priority=cost))
    return jobs


def output_jobs(done: dict[str, Any], config: VowelsConfig, out: Path | None,
                released: set[str]) -> list[Job]:
    """The jobs writing into ``out`` that the results ``done`` allow and that are not yet in
    ``released``: the figures once Table 1's systems are trained, the saved mixtures' analysis
    once its mixtures are. They start first: they come late."""
    if out is None:
        return []
    own = [f"own {s.name}" for s in systems_of(config)]
    mixtures = [f"own {s.name}" for s in systems_of(config) if s.kind == "mixture"]
    jobs = []
    for key, needs in (("figures", own), ("analysis", mixtures)):
        if needs and key not in released and all(k in done for k in needs):
            jobs.append(Job(key, key, None, cost=OUTPUT_COST, priority=float("inf"),
                            inputs=tuple(done[k] for k in needs), out=str(out)))
    return jobs


def run_job(job: Job, task: VowelTask, config: VowelsConfig,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Run one job on one thread; its result: a SystemResult ('explore'), a list of them, one
    per step ('steps'), the solver comparison's rows ('solvers'), the figures' files
    ('figures'), or the saved mixtures' record, analyses and files ('analysis')."""
    if job.kind not in JOB_KINDS:
        raise ValueError(f"run_job: job.kind must be one of {JOB_KINDS}; got {job.kind!r}.")
    with compute_threads(1):
        if job.kind == "explore":
            return run_system(job.system, task, config, track_epochs=job.track_epochs,
                              on_progress=on_progress)
        if job.kind == "steps":
            return run_steps(job.system, task, config, job.steps, on_progress=on_progress)
        if job.kind == "figures":
            return figures(list(job.inputs), task, config, Path(job.out))
        if job.kind == "analysis":
            return _analysis(list(job.inputs), task, config, Path(job.out))
        solvers = SolversConfig(tasks=("vowels",), runs=job.runs, seed=config.seed,
                                vowel_experts=min(config.experts), vowel_lr_grid=job.steps,
                                progress=False)
        return compare_solvers(solvers, task=task)


def _analysis(mixtures: list[Any], task: VowelTask, config: VowelsConfig, out: Path
              ) -> tuple[dict[str, object], dict[str, dict], dict[str, Path]]:
    """Save the mixtures' models into ``out`` and analyse them: the record results.json keeps,
    the analyses by model name, and their files."""
    # imported here: moekit.reports.analysis imports SciPy and matplotlib (1 s), which the
    # workers that only train do not need
    from moekit.reports.analysis import analyze_input

    saved = save_vowels_models(mixtures, config, out, task)
    analyses, files = {}, {}
    for item in load_vowels_run(out, task=task, saved=saved):
        analyses[item.name] = analyze_input(item, out / ANALYSIS_DIR)
        files[f"analysis_{item.name}"] = out / ANALYSIS_DIR / item.name / "analysis.html"
    return saved, analyses, files


def choose_processes(config: VowelsConfig, n_jobs: int) -> int:
    """How many processes run the jobs: one for a small run (:data:`PARALLEL_WORK`), else one per
    core this process may use (or per thread, where the caller chose a thread count), at most one
    per job."""
    work = config.runs * len(config.steps) * config.max_epochs * len(systems_of(config))
    if work < PARALLEL_WORK or n_jobs < 2:
        return 1
    if caller_chose_threads():
        cores = torch.get_num_threads()
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    return max(1, min(cores, n_jobs))
