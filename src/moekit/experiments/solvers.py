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
  run reaches the criterion). Runs through :func:`moekit.replicates.train_replicates`, one run at a
  time for the timing; one pass = one update.
- 'adam', 'lbfgs': :func:`moekit.fit` on Eq. 3 (Adam's step chosen from ``adam_lr_grid`` by the
  same rule; L-BFGS with a strong-Wolfe line search, stopped after 20 epochs without progress). One
  pass = one evaluation of the loss and its gradient (for L-BFGS, every function evaluation of the
  line search); the evaluation ``fit`` adds after each epoch for its stopping test is not counted.
- 'em': :func:`moekit.em.fit_em`, softmax gate; 'em_gaussian': EM with the localized Gaussian gate
  (:class:`~moekit.gaussian_gate.LocalizedMixtureOfExperts`). Passes as ``fit_em`` counts them (an
  E-step, which doubles as the stopping test, and every Newton trial); ``sweeps`` in the JSON counts
  also the sweeps that form the Newton systems and normal equations.
EM maximises the likelihood of its own model (multinomial-logit experts on the vowels, Gaussian
experts with learned variances on the regression), not Eq. 3; the criterion is the same for all.
Wall time covers the training call only (model construction and scoring excluded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.datasets import VowelTask, piecewise_linear, vowel_task
from moekit.em import EMConfig, fit_em
from moekit.experiments.piecewise import BREAKS, PIECES, DemoConfig
from moekit.experiments.vowels import System, VowelsConfig, run_seed, run_system
from moekit.experts import ExpertConfig
from moekit.gaussian_gate import LocalizedMixtureOfExperts
from moekit.io import write_text_atomic
from moekit.layers import MixtureOfExperts
from moekit.replicates import ReplicateConfig, train_replicates
from moekit.training import TrainConfig, fit

logger = logging.getLogger(__name__)

TASKS = ("vowels", "piecewise")
SOLVERS = ("gd", "adam", "lbfgs", "em", "em_gaussian")
SOLVER_LABELS = {"gd": "gradient descent (paper)", "adam": "Adam", "lbfgs": "L-BFGS",
                 "em": "EM", "em_gaussian": "EM, Gaussian gate"}
LBFGS_PATIENCE = 20


@dataclass(frozen=True)
class SolversConfig:
    """What :func:`compare_solvers` runs. The defaults take about a minute on 2 CPU cores."""

    tasks: tuple[str, ...] = TASKS
    solvers: tuple[str, ...] = SOLVERS
    runs: int = 5
    seed: int = 0
    vowel_experts: int = 4
    vowel_lr_grid: tuple[float, ...] = VowelsConfig().lr_grid
    regression_experts: int = 3
    regression_rows: int = 600
    regression_noise: float = 0.05
    regression_criterion: float = 0.01
    regression_variance: float = DemoConfig().variance  # Eq. 3's variance for gradient solvers
    regression_lr_grid: tuple[float, ...] = (0.02, 0.04, 0.08)
    adam_lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3)
    lbfgs_lr: float = 1.0
    max_passes: int = 6000
    em_max_iter: int = 500
    progress: bool = False

    def __post_init__(self) -> None:
        owner = "SolversConfig"
        for task in self.tasks:
            check_choice(owner, "tasks", task, TASKS)
        for solver in self.solvers:
            check_choice(owner, "solvers", solver, SOLVERS)
        for name in ("runs", "vowel_experts", "regression_experts", "regression_rows",
                     "max_passes", "em_max_iter"):
            check_int(owner, name, getattr(self, name), minimum=1)
        for name in ("regression_noise", "regression_criterion", "regression_variance",
                     "lbfgs_lr"):
            check_positive_float(owner, name, getattr(self, name))
        for name in ("vowel_lr_grid", "regression_lr_grid", "adam_lr_grid"):
            if not getattr(self, name):
                raise ValueError(f"{owner}: {name} must hold at least one step; got {name}=().")
            for lr in getattr(self, name):
                check_positive_float(owner, name, lr)


def quick_config(**overrides: object) -> SolversConfig:
    """A debug-sized comparison (seconds): one run, one step per solver, small caps."""
    base = {"runs": 1, "vowel_lr_grid": (4.0,), "regression_rows": 300,
            "regression_lr_grid": (0.08,), "adam_lr_grid": (0.3,), "max_passes": 400,
            "em_max_iter": 60}
    return SolversConfig(**{**base, **overrides})


@dataclass(frozen=True)
class SolverRow:
    """One solver on one task over R runs.

    Attributes:
        passes: the median passes to the criterion over the runs that reached it (None if none);
            ``passes_R`` has every run's count (the passes made when it stopped, if it did not).
            ``sweeps``, ``sweeps_R``: the same counting every sweep over the rows (for EM, the
            forming of Newton systems and normal equations too; for the others equal to passes).
        iterations_R: epochs (gradient solvers) or EM iterations of every run.
        seconds: the median wall time of a run (to the criterion, or to where it stopped).
        train_score, test_score: medians over runs at the stopping point (accuracy % for the vowels,
            mse for the regression: ``score``).
        setting: the step size chosen, or the EM settings.
    """

    task: str
    solver: str
    setting: str
    runs: int
    reached: int
    passes: float | None
    seconds: float
    train_score: float
    test_score: float
    score: str
    passes_R: tuple[int, ...] = ()
    sweeps_R: tuple[int, ...] = ()
    iterations_R: tuple[int, ...] = ()
    reached_R: tuple[bool, ...] = ()
    sweeps: float | None = None
    criterion: str = ""

    @property
    def label(self) -> str:
        return SOLVER_LABELS[self.solver]


@dataclass
class _Run:
    passes: int
    iterations: int
    reached: bool
    seconds: float
    model: nn.Module
    sweeps: int | None = None  # None: the same as passes (set so at construction)

    def __post_init__(self) -> None:
        if self.sweeps is None:
            self.sweeps = self.passes


@dataclass
class _Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    criterion: float
    build: Callable[[int], nn.Module]  # run index -> the softmax-gated mixture, initial weights
    build_gaussian: Callable[[int], nn.Module]
    loss_variance: float
    score: str
    extras: dict[str, object] = field(default_factory=dict)


def _run_seed(config: SolversConfig, run: int) -> int:
    """Run r's seed: the vowels module's, so both compare the same initial weights."""
    return run_seed(config.seed, run)


def _generator(config: SolversConfig, run: int) -> torch.Generator:
    """Run r's initial weights: the seeds of the vowels module's runs, for every solver."""
    return torch.Generator().manual_seed(_run_seed(config, run))


def _vowels(config: SolversConfig, task: VowelTask | None) -> _Task:
    task = task or vowel_task()
    vowels = VowelsConfig()
    size, dtype = config.vowel_experts, vowels.torch_dtype
    system = System("mixture", size, vowels.loss, vowels.expert_head)

    def build(r: int) -> nn.Module:
        return system.build(_generator(config, r), dtype)

    def build_gaussian(r: int) -> nn.Module:
        return LocalizedMixtureOfExperts(2, 4, size, expert=ExpertConfig(head=vowels.expert_head),
                                         generator=_generator(config, r)).to(dtype)

    return _Task("vowels", task.x_train.to(dtype), task.y_train, task.x_test.to(dtype), task.y_test,
                 vowels.criterion, build, build_gaussian, loss_variance=1.0, score="accuracy %",
                 extras={"task": task, "system": system})


def _piecewise(config: SolversConfig) -> _Task:
    def data(seed: int) -> tuple[Tensor, Tensor]:
        return piecewise_linear(config.regression_rows, breaks=BREAKS, pieces=PIECES,
                                noise=config.regression_noise,
                                generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def build(r: int) -> nn.Module:
        return MixtureOfExperts(1, 1, config.regression_experts,
                                generator=_generator(config, r)).double()

    def build_gaussian(r: int) -> nn.Module:
        return LocalizedMixtureOfExperts(1, 1, config.regression_experts,
                                         generator=_generator(config, r)).double()

    (x_train, y_train), (x_test, y_test) = data(config.seed), data(config.seed + 1)
    return _Task("piecewise", x_train, y_train, x_test, y_test, config.regression_criterion,
                 build, build_gaussian, loss_variance=config.regression_variance, score="mse")


def _warm_up(t: _Task) -> None:
    """One short untimed call of every code path, so that no solver pays for first-call set-up."""
    for optimizer in ("sgd", "adam", "lbfgs"):
        fit(t.build(0), t.x_train, t.y_train, TrainConfig(optimizer=optimizer, max_epochs=2,
                                                          progress=False))
    train_replicates([t.build(0)], t.x_train, t.y_train, [1e-3],
                     ReplicateConfig(max_epochs=2, progress=False))
    for build in (t.build, t.build_gaussian):
        fit_em(build(0), t.x_train, t.y_train, EMConfig(max_iter=2, progress=False))


@torch.no_grad()
def _scores(model: nn.Module, t: _Task) -> tuple[float, float]:
    def score(x: Tensor, y: Tensor) -> float:
        out = model(x).output
        if t.score == "mse":
            return (out - y).square().mean().item()
        return (out.argmax(-1) == y).double().mean().item() * 100

    return score(t.x_train, t.y_train), score(t.x_test, t.y_test)


def _gd_runs(t: _Task, config: SolversConfig) -> tuple[float, list[_Run]]:
    """The paper's gradient descent: the step by the vowels module's exploration, then each run
    alone through the same engine, timed."""
    replicate = ReplicateConfig(loss="mixture_nll", variance=t.loss_variance,
                                max_epochs=config.max_passes, stop_metric="mse",
                                stop_threshold=t.criterion, progress=False)
    if t.name == "vowels":
        explore = VowelsConfig(runs=config.runs, experts=(config.vowel_experts,), hidden=(),
                               seed=config.seed, lr_grid=config.vowel_lr_grid,
                               max_epochs=config.max_passes, compare_losses=False,
                               progress=config.progress)
        lr = run_system(t.extras["system"], t.extras["task"], explore).lr
    else:
        grid = config.regression_lr_grid
        models = [t.build(r) for _ in grid for r in range(config.runs)]
        result = train_replicates(models, t.x_train, t.y_train,
                                  [lr for lr in grid for _ in range(config.runs)], replicate)
        shape = (len(grid), config.runs)
        lr = grid[_choose(result.epochs_R.view(shape), result.reached_R.view(shape))]
    runs = []
    for r in range(config.runs):
        model = t.build(r)
        start = time.perf_counter()
        result = train_replicates([model], t.x_train, t.y_train, [lr], replicate)
        seconds = time.perf_counter() - start
        epochs = int(result.epochs_R[0])
        runs.append(_Run(epochs, epochs, bool(result.reached_R[0]), seconds, model))
    return lr, runs


def _choose(epochs_GR: Tensor, reached_GR: Tensor) -> int:
    """The step with the fewest mean epochs where every run reached the criterion; else the step
    where the most runs did (fewest mean epochs on ties)."""
    complete = reached_GR.all(1)
    mean_G = epochs_GR.double().mean(1)
    if complete.any():
        return int(torch.where(complete, mean_G, torch.inf).argmin())
    return int((-reached_GR.sum(1).double() * 1e9 + mean_G).argmin())


def _fit_run(t: _Task, r: int, optimizer: str, lr: float, config: SolversConfig) -> _Run:
    model = t.build(r)
    passes = [0]  # forwards with gradients: the closures (fit's own evaluation runs without)

    def count(*_: object) -> None:
        passes[0] += int(torch.is_grad_enabled())

    model.register_forward_hook(count)
    train = TrainConfig(loss="mixture_nll", variance=t.loss_variance, optimizer=optimizer, lr=lr,
                        max_epochs=config.max_passes, stop_metric="train_mse",
                        stop_threshold=t.criterion, progress=False,
                        patience=LBFGS_PATIENCE if optimizer == "lbfgs" else None, min_delta=1e-10)
    start = time.perf_counter()
    result = fit(model, t.x_train, t.y_train, train)
    seconds = time.perf_counter() - start
    return _Run(passes[0], result.epochs, result.reached_threshold, seconds, model)


def _gradient_runs(t: _Task, optimizer: str, config: SolversConfig) -> tuple[float, list[_Run]]:
    grid = config.adam_lr_grid if optimizer == "adam" else (config.lbfgs_lr,)
    trials = [[_fit_run(t, r, optimizer, lr, config) for r in range(config.runs)] for lr in grid]
    epochs = torch.tensor([[run.passes for run in runs] for runs in trials])
    reached = torch.tensor([[run.reached for run in runs] for runs in trials])
    best = _choose(epochs, reached)
    return grid[best], trials[best]


def _em_runs(t: _Task, gaussian: bool, config: SolversConfig) -> list[_Run]:
    runs = []
    for r in range(config.runs):
        model = (t.build_gaussian if gaussian else t.build)(r)
        em = EMConfig(max_iter=config.em_max_iter, stop_metric="train_mse",
                      stop_threshold=t.criterion, seed=_run_seed(config, r), progress=False)
        start = time.perf_counter()
        result = fit_em(model, t.x_train, t.y_train, em)
        seconds = time.perf_counter() - start
        runs.append(_Run(result.passes, result.n_iter, result.stop_reason == "threshold", seconds,
                         model, result.sweeps))
    return runs


def _row(t: _Task, solver: str, setting: str, runs: Sequence[_Run]) -> SolverRow:
    scores = [_scores(run.model, t) for run in runs]
    reached = [run.passes for run in runs if run.reached]
    swept = [run.sweeps for run in runs if run.reached]
    return SolverRow(
        task=t.name, solver=solver, setting=setting, runs=len(runs), reached=len(reached),
        passes=float(statistics.median(reached)) if reached else None,
        sweeps=float(statistics.median(swept)) if swept else None,
        seconds=statistics.median(run.seconds for run in runs),
        train_score=statistics.median(s[0] for s in scores),
        test_score=statistics.median(s[1] for s in scores), score=t.score,
        passes_R=tuple(run.passes for run in runs),
        sweeps_R=tuple(run.sweeps for run in runs),
        iterations_R=tuple(run.iterations for run in runs),
        reached_R=tuple(run.reached for run in runs), criterion=f"train mse <= {t.criterion:g}")


def compare_solvers(config: SolversConfig | None = None, *, task: VowelTask | None = None
                    ) -> list[SolverRow]:
    """Run every configured solver on every configured task; one row per (task, solver).

    Args:
        config: a :class:`SolversConfig` (``quick_config()`` for a few seconds).
        task: the vowel task, if already built (else :func:`moekit.datasets.vowel_task`).

    Example:
        >>> rows = compare_solvers(quick_config(tasks=("piecewise",), solvers=("gd", "em")))
        >>> [(row.solver, row.runs) for row in rows]
        [('gd', 1), ('em', 1)]
    """
    config = config or SolversConfig()
    rows = []
    for name in config.tasks:
        t = _vowels(config, task) if name == "vowels" else _piecewise(config)
        _warm_up(t)
        for solver in config.solvers:
            logger.info("solvers: %s on %s", solver, name)
            if solver == "gd":
                lr, runs = _gd_runs(t, config)
                setting = f"lr={lr:g}"
            elif solver in ("adam", "lbfgs"):
                lr, runs = _gradient_runs(t, solver, config)
                setting = f"lr={lr:g}"
            else:
                gaussian = solver == "em_gaussian"
                runs = _em_runs(t, gaussian, config)
                experts = "least-squares experts" if t.score == "mse" else "IRLS experts"
                gate = "analytic gate" if gaussian else "IRLS gate"
                setting = ("analytic M-steps" if gaussian and t.score == "mse"
                           else f"{experts}, {gate} (1 Newton step)")
            rows.append(_row(t, solver, setting, runs))
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
        per_run = ", ".join(f"{p}{'' if ok else '*'}" for p, ok in zip(row.passes_R, reached_R))
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
