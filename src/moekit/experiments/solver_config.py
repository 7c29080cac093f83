"""What the solver comparison runs (:class:`SolversConfig`) and what it reports per solver
(:class:`SolverRow`); :mod:`moekit.experiments.solvers` says what is counted and how."""

from __future__ import annotations

from dataclasses import dataclass

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.experiments.piecewise import DemoConfig
from moekit.experiments.vowels import VowelsConfig

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
