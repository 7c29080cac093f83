"""The runs of the solver comparison: its two tasks, and each solver run from the same initial
weights, timed (:mod:`moekit.experiments.solvers` says what is counted)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.data.synthetic import piecewise_linear
from moekit.data.vowels import VowelTask, vowel_task
from moekit.experiments.piecewise import BREAKS, PIECES
from moekit.experiments.solver_config import LBFGS_PATIENCE, SolverRow, SolversConfig
from moekit.experiments.vowels import System, VowelsConfig, run_seed, run_system
from moekit.fitting.config import TrainConfig
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig
from moekit.fitting.gradient import fit
from moekit.fitting.replicates import ReplicateConfig, train_replicates
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.experts import ExpertConfig
from moekit.nn.localized import LocalizedMixtureOfExperts


@dataclass
class SolverRun:
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
class SolverTask:
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


def solver_run_seed(config: SolversConfig, run: int) -> int:
    """Run r's seed: the vowels module's, so both compare the same initial weights."""
    return run_seed(config.seed, run)


def run_generator(config: SolversConfig, run: int) -> torch.Generator:
    """Run r's initial weights: the seeds of the vowels module's runs, for every solver."""
    return torch.Generator().manual_seed(solver_run_seed(config, run))


def vowels_task(config: SolversConfig, task: VowelTask | None) -> SolverTask:
    task = task or vowel_task()
    vowels = VowelsConfig()
    size, dtype = config.vowel_experts, vowels.torch_dtype
    system = System("mixture", size, vowels.loss, vowels.expert_head)

    def build(r: int) -> nn.Module:
        return system.build(run_generator(config, r), dtype)

    def build_gaussian(r: int) -> nn.Module:
        return LocalizedMixtureOfExperts(2, 4, size, expert=ExpertConfig(head=vowels.expert_head),
                                         generator=run_generator(config, r)).to(dtype)

    return SolverTask("vowels", task.x_train.to(dtype), task.y_train, task.x_test.to(dtype),
                      task.y_test, vowels.criterion, build, build_gaussian, loss_variance=1.0,
                      score="accuracy %", extras={"task": task, "system": system})


def piecewise_task(config: SolversConfig) -> SolverTask:
    def data(seed: int) -> tuple[Tensor, Tensor]:
        return piecewise_linear(config.regression_rows, breaks=BREAKS, pieces=PIECES,
                                noise=config.regression_noise,
                                generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def build(r: int) -> nn.Module:
        return MixtureOfExperts(1, 1, config.regression_experts,
                                generator=run_generator(config, r)).double()

    def build_gaussian(r: int) -> nn.Module:
        return LocalizedMixtureOfExperts(1, 1, config.regression_experts,
                                         generator=run_generator(config, r)).double()

    (x_train, y_train), (x_test, y_test) = data(config.seed), data(config.seed + 1)
    return SolverTask("piecewise", x_train, y_train, x_test, y_test, config.regression_criterion,
                 build, build_gaussian, loss_variance=config.regression_variance, score="mse")


def warm_up(t: SolverTask) -> None:
    """One short untimed call of every code path, so that no solver pays for first-call set-up."""
    for optimizer in ("sgd", "adam", "lbfgs"):
        fit(t.build(0), t.x_train, t.y_train, TrainConfig(optimizer=optimizer, max_epochs=2,
                                                          progress=False))
    train_replicates([t.build(0)], t.x_train, t.y_train, [1e-3],
                     ReplicateConfig(max_epochs=2, progress=False))
    for build in (t.build, t.build_gaussian):
        fit_em(build(0), t.x_train, t.y_train, EMConfig(max_iter=2, progress=False))


@torch.no_grad()
def task_scores(model: nn.Module, t: SolverTask) -> tuple[float, float]:
    def score(x: Tensor, y: Tensor) -> float:
        out = model(x).output
        if t.score == "mse":
            return (out - y).square().mean().item()
        return (out.argmax(-1) == y).double().mean().item() * 100

    return score(t.x_train, t.y_train), score(t.x_test, t.y_test)


def gd_runs(t: SolverTask, config: SolversConfig) -> tuple[float, list[SolverRun]]:
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
        lr = grid[best_step(result.epochs_R.view(shape), result.reached_R.view(shape))]
    runs = []
    for r in range(config.runs):
        model = t.build(r)
        start = time.perf_counter()
        result = train_replicates([model], t.x_train, t.y_train, [lr], replicate)
        seconds = time.perf_counter() - start
        epochs = int(result.epochs_R[0])
        runs.append(SolverRun(epochs, epochs, bool(result.reached_R[0]), seconds, model))
    return lr, runs


def best_step(epochs_GR: Tensor, reached_GR: Tensor) -> int:
    """The step with the fewest mean epochs where every run reached the criterion; else the step
    where the most runs did (fewest mean epochs on ties)."""
    complete = reached_GR.all(1)
    mean_G = epochs_GR.double().mean(1)
    if complete.any():
        return int(torch.where(complete, mean_G, torch.inf).argmin())
    return int((-reached_GR.sum(1).double() * 1e9 + mean_G).argmin())


def fit_run(t: SolverTask, r: int, optimizer: str, lr: float, config: SolversConfig) -> SolverRun:
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
    return SolverRun(passes[0], result.epochs, result.reached_threshold, seconds, model)


def gradient_runs(t: SolverTask, optimizer: str,
                  config: SolversConfig) -> tuple[float, list[SolverRun]]:
    grid = config.adam_lr_grid if optimizer == "adam" else (config.lbfgs_lr,)
    trials = [[fit_run(t, r, optimizer, lr, config) for r in range(config.runs)] for lr in grid]
    epochs = torch.tensor([[run.passes for run in runs] for runs in trials])
    reached = torch.tensor([[run.reached for run in runs] for runs in trials])
    best = best_step(epochs, reached)
    return grid[best], trials[best]


def em_runs(t: SolverTask, gaussian: bool, config: SolversConfig) -> list[SolverRun]:
    runs = []
    for r in range(config.runs):
        model = (t.build_gaussian if gaussian else t.build)(r)
        em = EMConfig(max_iter=config.em_max_iter, stop_metric="train_mse",
                      stop_threshold=t.criterion, seed=solver_run_seed(config, r), progress=False)
        start = time.perf_counter()
        result = fit_em(model, t.x_train, t.y_train, em)
        seconds = time.perf_counter() - start
        runs.append(SolverRun(result.passes, result.n_iter, result.stop_reason == "threshold",
                              seconds, model, result.sweeps))
    return runs


def solver_row(t: SolverTask, solver: str, setting: str, runs: Sequence[SolverRun]) -> SolverRow:
    scores = [task_scores(run.model, t) for run in runs]
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
