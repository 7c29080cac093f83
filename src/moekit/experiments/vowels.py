"""Jacobs, Jordan, Nowlan & Hinton (1991), section 3: the vowel experiment, Table 1, Figures 2-3.

Shape legend: R runs, N rows, E experts.

Protocol (the paper's, with our readings made explicit and configurable):
- data: Peterson & Barney [i] [I] [a] [Λ], inputs (F1, F2) / 1000, speakers 1-50 train, 51-75 test;
- systems: mixtures of 4 and 8 linear experts (softmax outputs over the 4 classes) with a softmax
  gate, trained on Eq. 3; backprop nets with 6 and 12 logistic hidden units and logistic outputs,
  trained on squared error;
- full-batch gradient descent, fixed step, no momentum, one update per epoch (error averaged over
  cases, so the step does not depend on the training-set size);
- stop when the average squared error of the output on the training set reaches 0.08. "Average" is
  read as per output unit (mean over cases and the 4 outputs): per case (summed over outputs) the
  error never gets to 0.08 on this data, even at convergence; ``average='case'`` selects that
  reading;
- the step of each system is chosen by a limited exploration: a grid, the same 25 initial weights
  for every step, keeping the step with the fewest mean epochs among those where every run reaches
  the criterion. Steps that cannot win are stopped early (the lower bound on their mean epochs
  already exceeds the best complete mean), which changes nothing in the choice.
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
from moekit.fitting.replicates import ReplicateConfig, ReplicateResult, train_replicates
from moekit.nn.dense import MixtureOfExperts
from moekit.nn.experts import ExpertConfig
from moekit.plotting.expert_lines import INACTIVE_PROPORTION

logger = logging.getLogger(__name__)

# The paper's Table 1 (25 runs each).
PAPER_TABLE = {
    "4 Experts": {"train": 88.0, "test": 90.0, "epochs": 1124.0, "sd": 23.0},
    "8 Experts": {"train": 88.0, "test": 90.0, "epochs": 1083.0, "sd": 12.0},
    "BP 6 Hid": {"train": 88.0, "test": 90.0, "epochs": 2209.0, "sd": 83.0},
    "BP 12 Hid": {"train": 88.0, "test": 90.0, "epochs": 2435.0, "sd": 124.0},
}
DEFAULT_LR_GRID = (0.5, 1.0, 2.0, 4.0)
QUICK_LR_GRID = (4.0,)


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

    @property
    def name(self) -> str:
        if self.kind == "mixture":
            return f"{self.size} Experts" + ("" if self.loss == "eq3" else f" ({self.loss})")
        return f"BP {self.size} Hid"

    def build(self, generator: torch.Generator, dtype: torch.dtype) -> MixtureOfExperts:
        """A backprop net is the one-expert case: an MLP expert with the gate fixed at p = 1, and
        Eq. 1 on one expert is plain squared error."""
        if self.kind == "mixture":
            model = MixtureOfExperts(2, 4, self.size, expert=ExpertConfig(head=self.expert_head),
                                     generator=generator)
        else:
            expert = ExpertConfig(kind="mlp", hidden=self.size, activation="sigmoid",
                                  head="sigmoid")
            model = MixtureOfExperts(2, 4, 1, expert=expert, generator=generator)
        return model.to(dtype)

    def n_parameters(self) -> int:
        model = self.build(torch.Generator(), torch.float32)
        gate = sum(p.numel() for p in model.gate.parameters()) if self.kind == "mixture" else 0
        return gate + sum(p.numel() for p in model.experts.parameters())


@dataclass
class StepTrial:
    """How one step size of the exploration fared."""

    lr: float
    reached: int
    diverged: int
    hit_cap: int
    pruned: int
    mean_epochs: float | None  # when every run reached the criterion

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
    models: list[MixtureOfExperts] = field(repr=False)
    snapshots: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list, repr=False)

    @property
    def all_reached(self) -> bool:
        return bool(self.reached_R.all())


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


def run_seed(seed: int, run: int) -> int:
    """The seed of run ``run``'s initial weights: the same for every step and every comparison."""
    return seed * 100_003 + run


def run_system(system: System, task: VowelTask, config: VowelsConfig, *,
               track_epochs: tuple[int, ...] = ()) -> SystemResult:
    """Explore the step grid for one system (runs x steps batched) and keep the best step's runs."""
    steps = config.steps
    dtype = config.torch_dtype
    x_train, x_test = task.x_train.to(dtype), task.x_test.to(dtype)
    # The same initial weights for every step: run r of every step starts from seed (seed, r).
    models = [system.build(torch.Generator().manual_seed(run_seed(config.seed, r)), dtype)
              for _ in steps for r in range(config.runs)]
    lrs = [lr for lr in steps for _ in range(config.runs)]
    replicate = ReplicateConfig(loss=system.loss, max_epochs=config.max_epochs,
                                stop_metric="mse" if config.average == "unit" else "sse",
                                stop_threshold=config.criterion, progress=config.progress)
    logger.info("%s: %d runs x %d steps", system.name, config.runs, len(steps))
    result = train_replicates(models, x_train, task.y_train, lrs, replicate,
                              prune=_lower_bound_rule(len(steps), config.runs),
                              track=([g * config.runs for g in range(len(steps))]
                                     if track_epochs else ()),
                              track_epochs=track_epochs, description=system.name)
    trials = _trials(steps, config.runs, result)
    best = choose_step(trials)
    chosen = slice(best * config.runs, (best + 1) * config.runs)
    chosen_models = models[chosen]
    return SystemResult(
        system=system, lr=steps[best], trials=trials,
        epochs_R=result.epochs_R[chosen].numpy(), reached_R=result.reached_R[chosen].numpy(),
        train_acc_R=_accuracies(chosen_models, x_train, task.y_train),
        test_acc_R=_accuracies(chosen_models, x_test, task.y_test),
        active_experts_R=np.array([_active_experts(m, x_train) for m in chosen_models]),
        experts_per_case_R=np.array([_experts_per_case(m, x_train) for m in chosen_models]),
        curves_RT=result.metric_RT[chosen].numpy(), models=chosen_models,
        snapshots=result.snapshots.get(best * config.runs, []),
    )


def _trials(steps: tuple[float, ...], n_runs: int, result: ReplicateResult) -> list[StepTrial]:
    trials = []
    for g, lr in enumerate(steps):
        part = slice(g * n_runs, (g + 1) * n_runs)
        reached = result.reached_R[part]
        trials.append(StepTrial(
            lr=lr, reached=int(reached.sum()), diverged=int(result.diverged_R[part].sum()),
            hit_cap=int(result.hit_cap_R[part].sum()), pruned=int(result.pruned_R[part].sum()),
            mean_epochs=float(result.epochs_R[part].double().mean()) if reached.all() else None))
    return trials


def choose_step(trials: list[StepTrial]) -> int:
    """The step with the fewest mean epochs among those where every run reached the criterion; if
    there is none, the step where the most runs reached it (the report says so)."""
    complete = [i for i, t in enumerate(trials) if t.mean_epochs is not None]
    if complete:
        return min(complete, key=lambda i: trials[i].mean_epochs)
    return max(range(len(trials)), key=lambda i: (trials[i].reached, -trials[i].diverged))


@torch.no_grad()
def _accuracies(models: list[MixtureOfExperts], x: Tensor, y: Tensor) -> np.ndarray:
    return np.array([(m(x).output.argmax(-1) == y).double().mean().item() * 100 for m in models])


@torch.no_grad()
def _active_experts(model: MixtureOfExperts, x: Tensor) -> int:
    """Experts whose mean mixing proportion over ``x`` is not effectively 0."""
    return int((model(x).routing.probs_NE.mean(0) >= INACTIVE_PROPORTION).sum())


@torch.no_grad()
def _experts_per_case(model: MixtureOfExperts, x: Tensor) -> float:
    """The effective number of experts blended per case, exp(entropy of p), averaged over cases."""
    p_NE = model(x).routing.probs_NE.double()
    entropy_N = -(p_NE * p_NE.clamp_min(1e-300).log()).sum(-1)
    return float(entropy_N.exp().mean())


def systems_of(config: VowelsConfig) -> list[System]:
    mixtures = [System("mixture", e, config.loss, config.expert_head) for e in config.experts]
    return mixtures + [System("backprop", h, "eq1") for h in config.hidden]


def loss_comparison_systems(config: VowelsConfig) -> list[System]:
    """The other error functions on the smallest mixture (the main run already has ``config.loss``
    for it); the paper's claims about the error functions do not depend on the size."""
    if not config.compare_losses or not config.experts:
        return []
    size = min(config.experts)
    return [System("mixture", size, loss, config.expert_head) for loss in ("eq1", "eq2", "eq3")
            if loss != config.loss]


def to_jsonable(config: VowelsConfig) -> dict[str, object]:
    return dataclasses.asdict(config)
