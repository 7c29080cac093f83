"""Jacobs, Jordan, Nowlan & Hinton (1991), section 3: the vowel experiment, Table 1, Figures 2-3.

Shape legend: R runs, N rows, E experts.

Protocol (the paper's, with our readings made explicit and configurable):
- data: Peterson & Barney [i] [I] [a] [Λ], inputs (F1, F2) / 1000, speakers 1-50 train, 51-75 test;
- systems: mixtures of 4 and 8 linear experts (softmax outputs over the 4 classes) with a softmax
  gate that starts unbiased (zero weights: equal mixing proportions, ``gate_init``), trained on
  Eq. 3; backprop nets with 6 and 12 logistic hidden units and logistic outputs, trained on
  1/2 ||d - o||^2, which is Eq. 3 for one expert (``backprop_error='full'``: ||d - o||^2);
- full-batch gradient descent, fixed step, no momentum, one update per epoch (error averaged over
  cases, so the step does not depend on the training-set size);
- stop when the average squared error of the output on the training set reaches 0.08. "Average" is
  read as per output unit (mean over cases and the 4 outputs): per case (summed over outputs) the
  error never gets to 0.08 on this data, even at convergence; ``average='case'`` selects that
  reading;
- the step of each system is chosen by a limited exploration: a grid (x sqrt 2 from 0.5 to 32,
  which reaches past the steps where runs start failing), the same 25 initial weights for every
  step, keeping the step with the fewest mean epochs among those where every run reaches the
  criterion; a choice at either end of the grid is flagged (``SystemResult.edge``). Steps that
  cannot win are stopped early (the lower bound on their mean epochs already exceeds the best
  complete mean), which changes nothing in the choice.

The readings the verdict depends on, run side by side: :mod:`moekit.experiments.vowels_readings`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.data.vowels import VowelTask
from moekit.experiments.vowels_measures import (
    accuracies,
    active_experts,
    experts_per_case,
    partition_kind,
    rising_epochs,
    vowel_groups,
)
from moekit.fitting.replicates import (
    ProgressHook,
    ReplicateConfig,
    ReplicateResult,
    train_replicates,
)
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.experts import ExpertConfig

logger = logging.getLogger(__name__)

# The paper's Table 1 (25 runs each).
PAPER_TABLE = {
    "4 Experts": {"train": 88.0, "test": 90.0, "epochs": 1124.0, "sd": 23.0},
    "8 Experts": {"train": 88.0, "test": 90.0, "epochs": 1083.0, "sd": 12.0},
    "BP 6 Hid": {"train": 88.0, "test": 90.0, "epochs": 2209.0, "sd": 83.0},
    "BP 12 Hid": {"train": 88.0, "test": 90.0, "epochs": 2435.0, "sd": 124.0},
}
# x sqrt 2 from 0.5 to 32: every system's runs converge somewhere inside, and fail beyond 16-22.6.
DEFAULT_LR_GRID = tuple(round(0.5 * 2 ** (k / 2), 4) for k in range(13))
QUICK_LR_GRID = (4.0, 8.0)
GATE_INITS = ("zero", "uniform", "fan-in")
T_TESTS = ("pooled", "welch")


@dataclass(frozen=True)
class VowelsConfig:
    """Options of `moekit vowels` (defaults: the paper's protocol, 25 runs per system)."""

    runs: int = 25
    experts: tuple[int, ...] = (4, 8)
    expert_head: str = "softmax"  # the paper's experts give a distribution over the 4 classes
    hidden: tuple[int, ...] = (6, 12)
    seed: int = 0
    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID
    lr: float | None = None  # a fixed step for every system: no exploration
    criterion: float = 0.08
    average: str = "unit"
    max_epochs: int = 5000
    loss: str = "eq3"
    gate_init: str = "zero"  # the paper's unbiased start: equal mixing proportions
    backprop_error: str = "half"  # 1/2 ||d - o||^2, Eq. 3 for one expert; 'full': ||d - o||^2
    t_test: str = "pooled"  # the paper's: pooled variance (48 df for 25 and 25 runs); or 'welch'
    common_step: float = 1.0  # reading (b): every system at this one step
    readings: bool = True  # readings (b) and (c) and the one-expert control beside Table 1
    compare_losses: bool = True
    compare_solvers: bool = True
    include_speaker_76: bool = False
    dtype: str = "float32"
    out: str = "runs/vowels"
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "VowelsConfig"
        check_int(owner, "runs", self.runs, minimum=1)
        for name in ("experts", "hidden"):
            for value in getattr(self, name):
                check_int(owner, name, value, minimum=1)
        if not self.experts and not self.hidden:
            raise ValueError(f"{owner}: give at least one system (experts or hidden).")
        for value in self.lr_grid if self.lr is None else (self.lr,):
            check_positive_float(owner, "lr", value)
        check_positive_float(owner, "criterion", self.criterion)
        check_choice(owner, "average", self.average, ("unit", "case"))
        check_int(owner, "max_epochs", self.max_epochs, minimum=1)
        check_choice(owner, "loss", self.loss, ("eq1", "eq2", "eq3"))
        check_choice(owner, "dtype", self.dtype, ("float32", "float64"))
        check_choice(owner, "expert_head", self.expert_head, ("softmax", "identity", "sigmoid"))
        check_choice(owner, "gate_init", self.gate_init, GATE_INITS)
        check_choice(owner, "backprop_error", self.backprop_error, ("half", "full"))
        check_choice(owner, "t_test", self.t_test, T_TESTS)
        check_positive_float(owner, "common_step", self.common_step)

    @property
    def steps(self) -> tuple[float, ...]:
        return (self.lr,) if self.lr is not None else tuple(self.lr_grid)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def quick_config(**overrides: object) -> VowelsConfig:
    """A debug-sized run (a few seconds) exercising every output."""
    base = {"runs": 3, "lr_grid": QUICK_LR_GRID, "max_epochs": 300}
    return VowelsConfig(**{**base, **overrides})


@dataclass(frozen=True)
class System:
    """One row of Table 1: a mixture of ``size`` experts or a backprop net of ``size`` hidden
    units."""

    kind: str  # 'mixture' | 'backprop'
    size: int
    loss: str
    expert_head: str = "softmax"
    gate_init: str = "zero"

    @property
    def name(self) -> str:
        if self.kind == "backprop":
            return f"BP {self.size} Hid"
        if self.size == 1:
            return "1 Expert (no gate)"
        head = None if self.expert_head == "softmax" else f"{self.expert_head} experts"
        notes = [n for n in (None if self.loss == "eq3" else self.loss, head) if n]
        return f"{self.size} Experts" + (f" ({', '.join(notes)})" if notes else "")

    def build(self, generator: torch.Generator, dtype: torch.dtype) -> MixtureOfExperts:
        """A backprop net is the one-expert case: an MLP expert with the gate fixed at p = 1; Eq. 3
        on one expert is 1/2 ||d - o||^2, Eq. 1 is ||d - o||^2. A one-expert mixture is a softmax
        layer (the control). The gate's ``gate_init``: 'zero' (equal proportions: the paper's
        unbiased start), 'uniform' (U(-0.1, 0.1)) or 'fan-in' (nn.Linear's range); the experts'
        weights are the same whichever is chosen."""
        if self.kind == "mixture":
            model = MixtureOfExperts(2, 4, self.size, expert=ExpertConfig(head=self.expert_head),
                                     generator=generator)
            _init_gate(model, self.gate_init, generator)
        else:
            expert = ExpertConfig(kind="mlp", hidden=self.size, activation="sigmoid",
                                  head="sigmoid")
            model = MixtureOfExperts(2, 4, 1, expert=expert, generator=generator)
        return model.to(dtype)

    def n_parameters(self) -> int:
        model = self.build(torch.Generator(), torch.float32)
        gate = sum(p.numel() for p in model.gate.parameters()) if self.kind == "mixture" else 0
        return gate + sum(p.numel() for p in model.experts.parameters())


@torch.no_grad()
def _init_gate(model: MixtureOfExperts, gate_init: str, generator: torch.Generator) -> None:
    """Re-draw the gate after the experts, so that the experts' weights do not depend on
    ``gate_init``."""
    for weight in (model.gate.w_DE, model.gate.b_E):
        if gate_init == "zero":
            weight.zero_()
        elif gate_init == "uniform":
            weight.uniform_(-0.1, 0.1, generator=generator)


@dataclass
class StepTrial:
    """How one step size of the exploration fared."""

    lr: float
    reached: int
    diverged: int
    hit_cap: int
    pruned: int
    mean_epochs: float | None  # when every run reached the criterion
    rising: float = 0.0  # % of this step's updates after which the training error went up

    @property
    def status(self) -> str:
        if self.mean_epochs is not None:
            return "all runs reached the criterion"
        if self.diverged:
            return f"{self.diverged} run(s) diverged"
        if self.pruned:
            return "stopped early: cannot beat the best step"
        return f"{self.hit_cap} run(s) hit the epoch cap"


@dataclass
class SystemResult:
    """A system's runs at its chosen step, and the exploration that chose it."""

    system: System
    lr: float
    trials: list[StepTrial]
    epochs_R: np.ndarray
    reached_R: np.ndarray
    train_acc_R: np.ndarray
    test_acc_R: np.ndarray
    active_experts_R: np.ndarray
    experts_per_case_R: np.ndarray
    curves_RT: np.ndarray  # stop metric per epoch (NaN after the run stopped)
    partition_R: list[str]  # how the gate divides the vowels at the stopping point, per run
    groups_R: list[str]  # which vowels each expert takes (by majority), per run
    models: list[MixtureOfExperts] = field(repr=False)
    snapshots: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list, repr=False)

    @property
    def all_reached(self) -> bool:
        return bool(self.reached_R.all())

    @property
    def edge(self) -> str | None:
        """'low' or 'high' when the chosen step is the first or the last of the grid explored (a
        wider grid could choose another), else None; a single fixed step has no edge."""
        steps = [t.lr for t in self.trials]
        if len(steps) < 2 or self.lr not in (steps[0], steps[-1]):
            return None
        return "low" if self.lr == steps[0] else "high"


def _lower_bound_rule(n_steps: int, n_runs: int):
    """Stop the runs of any step whose mean epochs can no longer beat the best complete step's."""

    def prune(epoch: int, state) -> Tensor:
        done_GR = (~state.active_R).view(n_steps, n_runs)
        failed_G = (state.diverged_R | state.pruned_R).view(n_steps, n_runs).any(1)
        complete_G = (state.reached_R.view(n_steps, n_runs).all(1))
        epochs_GR = state.epochs_R.view(n_steps, n_runs).double()
        if not complete_G.any():
            return failed_G.repeat_interleave(n_runs)
        best = epochs_GR[complete_G].mean(1).min()
        # A run still going will need at least one more epoch than it has had.
        bound_G = torch.where(done_GR, epochs_GR, epochs_GR + 1).mean(1)
        stop_G = failed_G | (~complete_G & (bound_G > best))
        return stop_G.repeat_interleave(n_runs)

    return prune


def snapshot_epochs(max_epochs: int) -> tuple[int, ...]:
    """Epochs at which to snapshot a run for Figure 3: dense early, sparse late.

    Example:
        >>> snapshot_epochs(100)[:8]
        (0, 1, 2, 3, 4, 5, 6, 7)
    """
    return tuple(int(e) for e in np.unique(np.r_[0, np.geomspace(1, max_epochs, 40).astype(int)]))


def run_seed(seed: int, run: int) -> int:
    """The seed of run ``run``'s initial weights: the same for every step and every comparison."""
    return seed * 100_003 + run


def _train(system: System, task: VowelTask, config: VowelsConfig, steps: tuple[float, ...], *,
           prune: bool, track_epochs: tuple[int, ...] = (),
           on_progress: ProgressHook | None = None):
    """Train ``config.runs`` runs of ``system`` at every step, as one batched computation; run r of
    every step starts from the same weights (seed (seed, r)). ``on_progress``: called with the
    runs finished (:func:`~moekit.fitting.replicates.train_replicates`)."""
    dtype = config.torch_dtype
    models = [system.build(torch.Generator().manual_seed(run_seed(config.seed, r)), dtype)
              for _ in steps for r in range(config.runs)]
    lrs = [lr for lr in steps for _ in range(config.runs)]
    replicate = ReplicateConfig(loss=system.loss, max_epochs=config.max_epochs,
                                stop_metric="mse" if config.average == "unit" else "sse",
                                stop_threshold=config.criterion, progress=config.progress)
    logger.info("%s: %d runs x %d steps", system.name, config.runs, len(steps))
    result = train_replicates(models, task.x_train.to(dtype), task.y_train, lrs, replicate,
                              prune=_lower_bound_rule(len(steps), config.runs) if prune else None,
                              track=([g * config.runs for g in range(len(steps))]
                                     if track_epochs else ()),
                              track_epochs=track_epochs, description=system.name,
                              on_progress=on_progress)
    return models, result


def _result(system: System, task: VowelTask, config: VowelsConfig, models: list,
            result: ReplicateResult, trials: list[StepTrial], g: int, lr: float) -> SystemResult:
    """The runs of the batch's step ``g`` (at ``lr``; ``trials``: what the result reports of the
    steps tried), measured at their stopping point."""
    x_train = task.x_train.to(config.torch_dtype)
    x_test = task.x_test.to(config.torch_dtype)
    part = slice(g * config.runs, (g + 1) * config.runs)
    mine = models[part]
    return SystemResult(
        system=system, lr=lr, trials=trials,
        epochs_R=result.epochs_R[part].numpy(), reached_R=result.reached_R[part].numpy(),
        train_acc_R=accuracies(mine, x_train, task.y_train),
        test_acc_R=accuracies(mine, x_test, task.y_test),
        active_experts_R=np.array([active_experts(m, x_train) for m in mine]),
        experts_per_case_R=np.array([experts_per_case(m, x_train) for m in mine]),
        curves_RT=result.metric_RT[part].numpy(),
        partition_R=[partition_kind(m, x_train, task.y_train) for m in mine],
        groups_R=[vowel_groups(m, x_train, task.y_train) for m in mine],
        models=mine, snapshots=result.snapshots.get(g * config.runs, []))


def run_system(system: System, task: VowelTask, config: VowelsConfig, *,
               track_epochs: tuple[int, ...] = (), on_progress: ProgressHook | None = None
               ) -> SystemResult:
    """Explore the step grid for one system (runs x steps batched) and keep the best step's runs."""
    models, result = _train(system, task, config, config.steps, prune=True,
                            track_epochs=track_epochs, on_progress=on_progress)
    trials = _trials(config.steps, config.runs, result)
    best = choose_step(trials)
    return _result(system, task, config, models, result, trials, best, trials[best].lr)


def run_steps(system: System, task: VowelTask, config: VowelsConfig,
              steps: tuple[float, ...], *, on_progress: ProgressHook | None = None
              ) -> list[SystemResult]:
    """The system's runs at each of ``steps``, every run to its end (no choice between the steps,
    so none is stopped early), batched as one computation; a result per step."""
    models, result = _train(system, task, config, steps, prune=False, on_progress=on_progress)
    trials = _trials(steps, config.runs, result)
    return [_result(system, task, config, models, result, [trials[g]], g, lr)
            for g, lr in enumerate(steps)]


def _trials(steps: tuple[float, ...], n_runs: int, result: ReplicateResult) -> list[StepTrial]:
    trials = []
    for g, lr in enumerate(steps):
        part = slice(g * n_runs, (g + 1) * n_runs)
        reached = result.reached_R[part]
        trials.append(StepTrial(
            lr=lr, reached=int(reached.sum()), diverged=int(result.diverged_R[part].sum()),
            hit_cap=int(result.hit_cap_R[part].sum()), pruned=int(result.pruned_R[part].sum()),
            mean_epochs=float(result.epochs_R[part].double().mean()) if reached.all() else None,
            rising=rising_epochs(result.metric_RT[part].numpy())))
    return trials


def choose_step(trials: list[StepTrial]) -> int:
    """The step with the fewest mean epochs among those where every run reached the criterion; if
    there is none, the step where the most runs reached it (the report says so)."""
    complete = [i for i, t in enumerate(trials) if t.mean_epochs is not None]
    if complete:
        return min(complete, key=lambda i: trials[i].mean_epochs)
    return max(range(len(trials)), key=lambda i: (trials[i].reached, -trials[i].diverged))


def systems_of(config: VowelsConfig) -> list[System]:
    """Table 1's systems: the mixtures, then the backprop nets."""
    mixtures = [System("mixture", e, config.loss, config.expert_head, config.gate_init)
                for e in config.experts]
    error = "eq3" if config.backprop_error == "half" else "eq1"
    return mixtures + [System("backprop", h, error) for h in config.hidden]


def control_system(config: VowelsConfig) -> System:
    """The one-expert "mixture": a softmax layer with no gate to speak of (its one proportion is
    1), trained under the same protocol; what a mixture does beyond it is the mechanism's."""
    return System("mixture", 1, config.loss, config.expert_head, config.gate_init)


def loss_comparison_systems(config: VowelsConfig) -> list[System]:
    """The other error functions on the smallest mixture (the main run already has ``config.loss``
    for it); the paper's claims about the error functions do not depend on the size."""
    if not config.compare_losses or not config.experts:
        return []
    size = min(config.experts)
    return [System("mixture", size, loss, config.expert_head, config.gate_init)
            for loss in ("eq1", "eq2", "eq3") if loss != config.loss]


def to_jsonable(config: VowelsConfig) -> dict[str, object]:
    return dataclasses.asdict(config)
