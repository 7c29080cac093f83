"""The expert-importance table: ablate each expert, force every row to each expert, and rescale the
gate's temperature; the task metric under each beside the baseline.

Shape legend: N rows, O outputs, E experts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit._checks import check_int
from moekit.analysis.interventions import ablate_expert, force_expert, scale_temperature
from moekit.analysis.recorder import record_routing
from moekit.fitting.objective import dense_targets
from moekit.io.files import jsonable
from moekit.nn.outputs import MoEOutput


def _accuracy(output_NO: Tensor, y: Tensor) -> float:
    return float((output_NO.argmax(-1) == y.reshape(-1)).double().mean())


def _mse(output_NO: Tensor, y: Tensor) -> float:
    target_NO = dense_targets(y, output_NO.shape[-1], output_NO.dtype)
    return float((output_NO - target_NO).square().mean())


# name -> (function(output, y), higher is better)
METRICS: dict[str, tuple[Callable[[Tensor, Tensor], float], bool]] = {
    "accuracy": (_accuracy, True), "mse": (_mse, False)}


@dataclass(frozen=True)
class ImportanceRow:
    """One expert's effect on the task. ``*_change`` = metric under intervention - baseline;
    ``output_change``: root mean square over rows of ||y_ablated - y||."""

    expert: int
    load: float
    ablated: float
    ablated_change: float
    forced: float
    forced_change: float
    output_change: float


@dataclass(frozen=True)
class ImportanceTable:
    """The expert-importance table, and the task metric at other gate temperatures."""

    metric: str
    higher_is_better: bool
    baseline: float
    rows: list[ImportanceRow]
    temperatures: list[dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"metric": self.metric, "higher_is_better": self.higher_is_better,
                         "baseline": self.baseline,
                         "experts": [dataclasses.asdict(r) for r in self.rows],
                         "temperatures": self.temperatures})


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    parts = []
    for start in range(0, x.shape[0], batch_size):
        result = model(x[start:start + batch_size])
        parts.append(result.output if isinstance(result, MoEOutput) else result)
    return torch.cat(parts)


@torch.no_grad()
def expert_importance(model: nn.Module, x: Tensor, y: Tensor | None = None,
                      metric: str | Callable[[Tensor, Tensor], float] = "auto", *,
                      layer: nn.Module | None = None, higher_is_better: bool | None = None,
                      temperatures: Sequence[float] = (0.5, 2.0), batch_size: int = 4096,
                      load_E: Sequence[float] | np.ndarray | None = None) -> ImportanceTable:
    """Ablate each expert, force every row to each expert, and rescale the gate's temperature;
    report the task metric under each beside the baseline.

    Args:
        model: the model to evaluate (returns a MoEOutput or an output tensor).
        x: inputs; y: targets (class indices or floats). Without ``y`` the metric is the mean
            squared change of the output from the baseline ('output_mse').
        metric: 'accuracy', 'mse', 'auto' (accuracy for class indices, else mse), or a function
            ``metric(output_NO, y) -> float`` (say which way is better with ``higher_is_better``).
        layer: the mixture layer inside ``model`` to intervene on (default: ``model`` itself).
        temperatures: gate temperatures to try.
        load_E: each expert's load where it is known already (say ``Recording.stats.load_E`` from
            :func:`~moekit.analysis.recorder.record_routing` on the same ``x``), which saves a
            pass over ``x``; None measures it when ``layer`` is ``model`` (and leaves it nan
            otherwise).

    Example:
        >>> from moekit import MixtureOfExperts
        >>> moe = MixtureOfExperts(2, 3, 4)
        >>> table = expert_importance(moe, torch.randn(20, 2), torch.randint(0, 3, (20,)))
        >>> [r.expert for r in table.rows]
        [0, 1, 2, 3]
    """
    check_int("expert_importance", "batch_size", batch_size, minimum=1)
    layer = layer if layer is not None else model
    was_training = model.training
    model.eval()
    try:
        base_NO = _outputs(model, x, batch_size)
        if y is None:
            name, better = "output_mse", False

            def score(output_NO: Tensor) -> float:
                return float((output_NO - base_NO).square().mean())
        else:
            name, function, better = _resolve_metric(metric, y, higher_is_better)

            def score(output_NO: Tensor) -> float:
                return function(output_NO, y)

        baseline = score(base_NO)
        # The load is measured where the layer's input is x: when the layer is the model.
        if load_E is None and layer is model:
            load_E = record_routing(model, x, batch_size=batch_size,
                                    contributions=False).stats.load_E
        n_experts = len(load_E) if load_E is not None else _n_experts(layer, model, x)
        rows = []
        for e in range(n_experts):
            ablated, ablated_NO = math.nan, base_NO
            if n_experts > 1:
                with ablate_expert(layer, e):
                    ablated_NO = _outputs(model, x, batch_size)
                ablated = score(ablated_NO)
            with force_expert(layer, e):
                forced = score(_outputs(model, x, batch_size))
            change_N = (ablated_NO - base_NO).reshape(base_NO.shape[0], -1).norm(dim=-1)
            rows.append(ImportanceRow(
                expert=e, load=float(load_E[e]) if load_E is not None else math.nan,
                ablated=ablated, ablated_change=ablated - baseline, forced=forced,
                forced_change=forced - baseline,
                output_change=float(change_N.square().mean().sqrt())))
        scaled = []
        for t in temperatures:
            with scale_temperature(layer, t):
                value = score(_outputs(model, x, batch_size))
            scaled.append({"temperature": float(t), "metric": value, "change": value - baseline})
    finally:
        model.train(was_training)
    return ImportanceTable(name, better, baseline, rows, scaled)


def _resolve_metric(metric: str | Callable, y: Tensor, higher_is_better: bool | None
                    ) -> tuple[str, Callable[[Tensor, Tensor], float], bool]:
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric, bool(higher_is_better)
    if metric == "auto":
        metric = "mse" if y.is_floating_point() else "accuracy"
    if metric not in METRICS:
        listed = ", ".join(repr(m) for m in (*METRICS, "auto"))
        raise ValueError(f"expert_importance: metric must be one of {listed} or a function; "
                         f"got metric={metric!r}.")
    if metric == "accuracy" and y.is_floating_point():
        raise ValueError("expert_importance: metric='accuracy' needs class-index targets; got "
                         f"y.dtype={y.dtype}. Use metric='mse'.")
    function, better = METRICS[metric]
    return metric, function, better


@torch.no_grad()
def _n_experts(layer: nn.Module, model: nn.Module, x: Tensor) -> int:
    seen: list[int] = []

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, MoEOutput):
            seen.append(out.routing.n_experts)

    handle = layer.register_forward_hook(hook)
    try:
        model(x[:1])
    finally:
        handle.remove()
    if not seen:
        raise TypeError(f"expert_importance: {type(layer).__name__} returned no MoEOutput; pass "
                        "the mixture-of-experts layer as `layer`.")
    return seen[0]
