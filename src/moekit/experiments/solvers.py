"""Solver comparison: passes over the data and wall time to reach a training criterion.

Shape legend: R runs (initial weights), N rows.

Two tasks, every solver starting from the same R initial weights:
- 'vowels': the 1991 vowel task (:mod:`moekit.experiments.vowels`): a mixture of linear softmax
  experts, the paper's criterion (average squared error of the blended class probabilities per
  output unit <= 0.08, ``VowelsConfig.criterion``); scores are accuracies in %.
- 'piecewise': 1-D regression on three straight pieces (:mod:`moekit.experiments.piecewise`), one
  linear expert per piece; criterion: training mse <= ``regression_criterion`` (4x the noise
  variance by default: reached only once the pieces are found); scores are mse.

Solvers:
- 'gd': the paper's gradient descent: full batch, fixed step, no momentum, Eq. 3. The step is the
  vowels module's choice (its exploration, :func:`moekit.experiments.vowels.run_system`); for the
  regression the same rule over ``regression_lr_grid`` (fewest mean epochs among steps where every
  run reaches the criterion). Runs through :func:`moekit.fitting.replicates.train_replicates`, one
  run at a time for the timing; one pass = one update.
- 'adam', 'lbfgs': :func:`moekit.fitting.gradient.fit` on Eq. 3 (Adam's step chosen from
  ``adam_lr_grid`` by the same rule; L-BFGS with a strong-Wolfe line search, stopped after 20
  epochs without progress). One pass = one evaluation of the loss and its gradient (for L-BFGS,
  every function evaluation of the line search); the evaluation ``fit`` adds after each epoch for
  its stopping test is not counted.
- 'em': :func:`moekit.fitting.em.fit_em`, softmax gate; 'em_gaussian': EM with the localized
  Gaussian gate (:class:`~moekit.nn.localized.LocalizedMixtureOfExperts`). Passes as ``fit_em``
  counts them (an E-step, which doubles as the stopping test, and every Newton trial); ``sweeps``
  in the JSON counts also the sweeps that form the Newton systems and normal equations.
EM maximises the likelihood of its own model (multinomial-logit experts on the vowels, Gaussian
experts with learned variances on the regression), not Eq. 3; the criterion is the same for all.
Wall time covers the training call only (model construction and scoring excluded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

from moekit._checks import check_choice
from moekit.data.vowels import VowelTask
from moekit.exceptions import ConvergenceWarning
from moekit.experiments.solver_config import SOLVER_LABELS, SolverRow, SolversConfig
from moekit.experiments.solver_runs import (
    em_runs,
    gd_runs,
    gradient_runs,
    piecewise_task,
    solver_row,
    vowels_task,
    warm_up,
)
from moekit.io.files import write_text_atomic

logger = logging.getLogger(__name__)


def compare_solvers(config: SolversConfig | None = None, *, task: VowelTask | None = None
                    ) -> list[SolverRow]:
    """Run every configured solver on every configured task; one row per (task, solver).

    Args:
        config: a :class:`SolversConfig` (``quick_config()`` for a few seconds).
        task: the vowel task, if already built (else :func:`moekit.data.vowels.vowel_task`).

    Example:
        >>> from moekit.experiments.solver_config import quick_config
        >>> rows = compare_solvers(quick_config(tasks=("piecewise",), solvers=("gd", "em")))
        >>> [(row.solver, row.runs) for row in rows]
        [('gd', 1), ('em', 1)]
    """
    config = config or SolversConfig()
    rows = []
    with warnings.catch_warnings():  # runs that miss the criterion are reported in the rows
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in config.tasks:
            rows += _compare_on(name, config, task)
    return rows


def _compare_on(name: str, config: SolversConfig, task: VowelTask | None) -> list[SolverRow]:
    """Every configured solver on one task, from the same initial weights."""
    t = vowels_task(config, task) if name == "vowels" else piecewise_task(config)
    warm_up(t)
    rows = []
    for solver in config.solvers:
        logger.info("solvers: %s on %s", solver, name)
        if solver == "gd":
            lr, runs = gd_runs(t, config)
            setting = f"lr={lr:g}"
        elif solver in ("adam", "lbfgs"):
            lr, runs = gradient_runs(t, solver, config)
            setting = f"lr={lr:g}"
        else:
            gaussian = solver == "em_gaussian"
            runs = em_runs(t, gaussian, config)
            experts = "least-squares experts" if t.score == "mse" else "IRLS experts"
            gate = "analytic gate" if gaussian else "IRLS gate"
            setting = ("analytic M-steps" if gaussian and t.score == "mse"
                       else f"{experts}, {gate} (1 Newton step)")
        rows.append(solver_row(t, solver, setting, runs))
    return rows


def pass_ratio(rows: Sequence[SolverRow], task: str, *, solver: str = "em",
               baseline: str = "gd", count: str = "passes") -> float | None:
    """Median passes of ``baseline`` over those of ``solver`` on ``task`` (e.g. 36.0: EM needs 36x
    fewer passes than the paper's gradient descent); None if either never reached the criterion.
    ``count='sweeps'`` compares every sweep over the rows instead."""
    check_choice("pass_ratio", "count", count, ("passes", "sweeps"))
    found = {row.solver: row for row in rows if row.task == task}
    if solver not in found or baseline not in found:
        return None
    a, b = getattr(found[baseline], count), getattr(found[solver], count)
    return None if a is None or b is None else a / b


def format_table(rows: Sequence[SolverRow]) -> str:
    """The rows as a markdown table, with the pass ratios of EM against the paper's descent."""
    lines = [("| task | solver | setting | reached | passes to criterion (median; per run) | "
              "iterations (median) | seconds (median) | train | test |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        passes = "not reached" if row.passes is None else f"{row.passes:g}"
        reached_R = row.reached_R or (True,) * len(row.passes_R)
        per_run = ", ".join(f"{p}{'' if ok else '*'}"
                            for p, ok in zip(row.passes_R, reached_R, strict=True))
        scores = [f"{v:.1f}%" if row.score.startswith("accuracy") else f"{v:.4f}"
                  for v in (row.train_score, row.test_score)]
        lines.append(f"| {row.task} ({row.criterion}) | {row.label} | {row.setting} | "
                     f"{row.reached}/{row.runs} | {passes} ({per_run}) | "
                     f"{statistics.median(row.iterations_R):g} | {row.seconds:.3f} | "
                     f"{scores[0]} | {scores[1]} |")
    notes = ["", "\\* the run stopped without reaching the criterion (cap, divergence or stall)."]
    for task in dict.fromkeys(row.task for row in rows):
        for solver in ("em", "em_gaussian"):
            ratio = pass_ratio(rows, task, solver=solver)
            if ratio is not None:
                strict = pass_ratio(rows, task, solver=solver, count="sweeps")
                notes.append(f"- {task}: {SOLVER_LABELS[solver]} reaches the criterion in "
                             f"{ratio:.1f}x fewer passes than the paper's gradient descent "
                             f"({strict:.1f}x counting every sweep over the rows).")
    return "\n".join(lines + notes)


def comparison_record(config: SolversConfig, rows: Sequence[SolverRow]) -> dict[str, object]:
    """The JSON record of a comparison: the config, every row, and EM's pass ratio on the vowels
    (None when the vowels were not run or a solver never reached the criterion)."""
    return {"config": dataclasses.asdict(config), "rows": [dataclasses.asdict(r) for r in rows],
            "vowels_em_pass_ratio": pass_ratio(rows, "vowels") if "vowels" in config.tasks
            else None}


def write_comparison(config: SolversConfig, out: Path | str) -> tuple[str, list[Path]]:
    """Run :func:`compare_solvers`; write ``solvers.json`` and ``solvers.md`` (the table) into
    ``out``; return the table with its verdict lines, and the files."""
    rows = compare_solvers(config)
    table = format_table(rows)
    out = Path(out)
    files = [out / "solvers.json", out / "solvers.md"]
    write_text_atomic(files[0], json.dumps(comparison_record(config, rows), indent=2))
    write_text_atomic(files[1], table + "\n")
    return table, files
