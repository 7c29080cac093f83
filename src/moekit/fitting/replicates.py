"""Independent replicate runs (seeds, step sizes) trained as one batched computation.

Shape legend: R replicate runs, T epochs recorded (max_epochs + 1, epoch 0 included), N rows,
O outputs.

The paper reports 25 runs of each system. Rather than a Python loop over runs, the R models'
parameters are stacked on a leading axis (``torch.func.stack_module_state``) and one ``vmap``-ed
forward and backward serves all of them. Each run has its own step size and stops on its own: once
it reaches the criterion it is frozen (its step becomes 0), so its result equals a single run of
:func:`moekit.fitting.gradient.fit` with the same start, step and criterion (tested).

Each epoch, the engine (:mod:`moekit.fitting.replicate_engines`) gives every active run's loss,
stop metric and gradient in one call; the stop metric comes from the same forward as the update,
so the criterion is checked after every update at no extra cost.

The protocol is the paper's: full batch, plain gradient descent with no momentum, one update per
epoch, stop when the training error of the blended output reaches a threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moekit._checks import (
    check_choice,
    check_finite,
    check_int,
    check_matrix,
    check_positive_float,
    check_same_rows,
)
from moekit.fitting.objective import prepare_targets, resolve_loss_name
from moekit.fitting.replicate_engines import StackedMixtureEngine, VmapEngine, supports_stacked

STOP_METRICS = ("sse", "mse")

# Called every epoch with (epoch, ReplicateState); returns a bool mask (R,) of runs to stop now.
PruneRule = Callable[[int, "ReplicateState"], Tensor]
# Called with (runs finished, epoch) whenever runs finish (reach the criterion, diverge, are pruned
# or hit the cap): what a progress display needs.
ProgressHook = Callable[[int, int], None]


@dataclass(frozen=True)
class ReplicateConfig:
    """The paper's protocol for a batch of runs.

    Attributes:
        loss, variance: the error function minimised (see :mod:`moekit.losses`).
        max_epochs: the cap; a run that has not reached the criterion by then is reported as such.
        stop_metric: 'sse', squared error of the blended output per case (summed over outputs,
            averaged over cases), or 'mse', per output unit (averaged over cases and outputs).
        stop_threshold: stop a run once its stop_metric is at or below this (0.08 in the paper).
        progress: show a progress bar of the runs finished (it counts runs, not epochs: a batch
            ends when its last run does, long before the epoch cap as a rule).
    """

    loss: str = "mixture_nll"
    variance: float = 1.0
    max_epochs: int = 5000
    stop_metric: str = "sse"
    stop_threshold: float = 0.08
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "ReplicateConfig"
        object.__setattr__(self, "loss", resolve_loss_name(self.loss))
        check_positive_float(owner, "variance", self.variance)
        check_int(owner, "max_epochs", self.max_epochs, minimum=1)
        check_choice(owner, "stop_metric", self.stop_metric, STOP_METRICS)
        check_positive_float(owner, "stop_threshold", self.stop_threshold)


@dataclass
class ReplicateState:
    """Per-run bookkeeping, visible to a prune rule."""

    active_R: Tensor  # still training
    reached_R: Tensor  # reached the criterion
    diverged_R: Tensor  # loss became NaN or inf
    pruned_R: Tensor  # stopped by the prune rule
    epochs_R: Tensor  # updates made so far (the epoch count at the criterion for reached runs)


@dataclass(frozen=True)
class ReplicateResult:
    """What each run did. The fitted weights are written back into the models passed in.

    Attributes:
        epochs_R: epochs (updates) each run made: the epoch count at the criterion for runs that
            reached it.
        reached_R, diverged_R, pruned_R: how each run ended (none of them: it hit the cap).
        metric_RT, loss_RT: the stop metric and the loss of every run at every epoch (NaN after
            it stopped); column t is the model after t updates.
        snapshots: {run index: [(epoch, state dict), ...]} for the runs asked to be tracked.
    """

    epochs_R: Tensor
    reached_R: Tensor
    diverged_R: Tensor
    pruned_R: Tensor
    metric_RT: Tensor
    loss_RT: Tensor
    snapshots: dict[int, list[tuple[int, dict[str, Tensor]]]] = field(default_factory=dict)

    @property
    def hit_cap_R(self) -> Tensor:
        return ~(self.reached_R | self.diverged_R | self.pruned_R)


def train_replicates(models: Sequence[nn.Module], x: Tensor, y: Tensor,
                     lrs: Sequence[float] | Tensor, config: ReplicateConfig | None = None, *,
                     track: Sequence[int] = (), track_epochs: Sequence[int] = (),
                     prune: PruneRule | None = None, engine: str = "auto",
                     description: str = "runs", on_progress: ProgressHook | None = None
                     ) -> ReplicateResult:
    """Train R models of one architecture as one batched computation, each with its own step size.

    Args:
        models: R models built alike (different initial weights); trained in place.
        x: inputs (N, D); y: targets, (N, O) floats or (N,) class indices.
        lrs: the step size of each run, length R.
        config: a :class:`ReplicateConfig` (defaults: Eq. 3, criterion 0.08 per case).
        track, track_epochs: runs whose weights to snapshot at the given epochs (and at the end).
        prune: an optional rule that stops runs early (e.g. a step size that cannot win a search).
        engine: 'stacked' (the fast rows-last path for dense mixtures), 'vmap' (the reference: any
            model, its own forward under torch.func.vmap), or 'auto' (stacked where it applies).
        description: the progress bar's label.
        on_progress: called with (runs finished, epoch) whenever runs finish, e.g. to show the
            progress of a batch trained in another process.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> models = [MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(s)).double()
        ...           for s in range(3)]
        >>> x = torch.linspace(0, 1, 40, dtype=torch.float64).reshape(-1, 1)
        >>> result = train_replicates(models, x, x.square(), [0.5] * 3,
        ...                           ReplicateConfig(stop_threshold=0.01, progress=False))
        >>> result.reached_R.all().item()
        True
    """
    config = config or ReplicateConfig()
    n_runs = len(models)
    if n_runs == 0:
        raise ValueError("train_replicates: models is empty; pass at least one model.")
    lr_R = torch.as_tensor(lrs, dtype=torch.float64).flatten()
    if lr_R.numel() != n_runs:
        raise ValueError(f"train_replicates: lrs must have one step size per model ({n_runs}); "
                         f"got {lr_R.numel()}.")
    if not bool((lr_R > 0).all()) or not bool(torch.isfinite(lr_R).all()):
        raise ValueError(f"train_replicates: every lr must be a finite number > 0; "
                         f"got {lr_R.tolist()}.")
    first = models[0]
    check_matrix("train_replicates", "x", x, n_columns=first.config.in_features)
    check_finite("train_replicates", "x", x)
    check_same_rows("train_replicates", x=x, y=y)
    targets = prepare_targets("train_replicates", "y", y, out_features=first.config.out_features,
                              loss=config.loss, dtype=x.dtype)

    check_choice("train_replicates", "engine", engine, ("auto", "stacked", "vmap"))
    use_stacked = engine == "stacked" or (engine == "auto" and supports_stacked(models))
    build = StackedMixtureEngine if use_stacked else VmapEngine
    runner = build(models, x, targets, config.loss, config.variance, config.stop_metric)
    params = runner.params
    lr_R = lr_R.to(x.dtype)

    falses = torch.zeros(n_runs, dtype=torch.bool)
    state = ReplicateState(active_R=~falses, reached_R=falses.clone(), diverged_R=falses.clone(),
                           pruned_R=falses.clone(), epochs_R=torch.zeros(n_runs, dtype=torch.long))
    metric_RT = torch.full((n_runs, config.max_epochs + 1), float("nan"), dtype=x.dtype)
    loss_RT = metric_RT.clone()
    snapshots: dict[int, list[tuple[int, dict[str, Tensor]]]] = {r: [] for r in track}
    track_at = set(track_epochs)

    # Only the active runs are computed: ``rows`` indexes them, ``work`` holds their parameters.
    rows = torch.arange(n_runs)
    work = _gather(params, rows)
    bar = tqdm(total=n_runs, desc=description, disable=not config.progress, leave=False,
               bar_format="{desc}: {n}/{total} runs finished |{bar}| [{elapsed}{postfix}]")
    for epoch in range(config.max_epochs + 1):
        loss_W, metric_W, grads = runner.errors_and_grads(work, rows)
        metric_RT[rows, epoch] = metric_W
        loss_RT[rows, epoch] = loss_W
        if epoch in track_at:
            _scatter(params, work, rows)
            _snapshot(snapshots, runner, params, epoch, active_R=state.active_R)
        _update_state(state, rows, epoch, loss_W, metric_W, config)
        if prune is not None and state.active_R.any():
            stop_R = prune(epoch, state) & state.active_R
            state.pruned_R |= stop_R
            state.active_R &= ~stop_R
        keep_W = state.active_R[rows]
        n_keep = int(keep_W.sum())
        if n_keep == 0 or epoch == config.max_epochs:
            _report(bar, on_progress, n_runs, epoch)
            break
        step_W = lr_R[rows] * keep_W.to(lr_R.dtype)  # runs that stopped this epoch take no step
        with torch.no_grad():
            for k, p in work.items():
                p.sub_(step_W.view(-1, *(1,) * (p.ndim - 1)) * grads[k])
        if n_keep < len(rows):  # drop the runs that stopped from the batch
            _scatter(params, work, rows)
            rows = rows[keep_W]
            work = _gather(params, rows)
            _report(bar, on_progress, n_runs - n_keep, epoch)
        state.epochs_R[rows] += 1
    bar.close()

    _scatter(params, work, rows)
    _snapshot(snapshots, runner, params, None, final_epochs=state.epochs_R)
    _write_back(models, runner, params)
    return ReplicateResult(state.epochs_R, state.reached_R, state.diverged_R, state.pruned_R,
                           metric_RT, loss_RT, snapshots)


def _gather(stacked: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: v[rows] for k, v in stacked.items()}


def _report(bar: tqdm, on_progress: ProgressHook | None, finished: int, epoch: int) -> None:
    """Show that ``finished`` runs of the batch have finished, at ``epoch``."""
    bar.update(finished - bar.n)
    bar.set_postfix_str(f"epoch {epoch}", refresh=False)
    if on_progress is not None:
        on_progress(finished, epoch)


def _scatter(stacked: dict[str, Tensor], work: dict[str, Tensor], rows: Tensor) -> None:
    for k, v in work.items():
        stacked[k][rows] = v.detach()


def _update_state(state: ReplicateState, rows: Tensor, epoch: int, loss_W: Tensor,
                  metric_W: Tensor, config: ReplicateConfig) -> None:
    """Mark the computed runs (``rows``) that diverged or reached the criterion."""
    finite_W = torch.isfinite(loss_W) & torch.isfinite(metric_W)
    # like fit(): the criterion is checked after each update
    at_criterion_W = (metric_W <= config.stop_threshold) if epoch >= 1 else None
    if bool(finite_W.all()) and (at_criterion_W is None or not bool(at_criterion_W.any())):
        return  # no run stops: most epochs
    diverged = rows[~finite_W]
    state.diverged_R[diverged] = True
    state.active_R[diverged] = False
    if at_criterion_W is not None:
        reached = rows[at_criterion_W & state.active_R[rows]]
        state.reached_R[reached] = True
        state.active_R[reached] = False


def _snapshot(snapshots: dict[int, list[tuple[int, dict[str, Tensor]]]], runner,
              params: dict[str, Tensor], epoch: int | None, *, active_R: Tensor | None = None,
              final_epochs: Tensor | None = None) -> None:
    """Copy the tracked runs' weights: at ``epoch`` for runs still active, or each run's last
    epoch."""
    for r, frames in snapshots.items():
        if active_R is not None and not bool(active_R[r]):
            continue
        at = epoch if epoch is not None else int(final_epochs[r])
        if frames and frames[-1][0] == at:
            continue
        frames.append((at, runner.module_state(params, r)))


def _write_back(models: Sequence[nn.Module], runner, params: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for r, model in enumerate(models):
            model.load_state_dict(runner.module_state(params, r), strict=False)
