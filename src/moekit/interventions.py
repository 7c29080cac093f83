"""Interventions on a mixture's routing: knock out an expert, force rows to one, change the gate's
temperature, and measure what each does to the task (the expert-importance table).

Shape legend: N rows, D input features, O outputs, E experts, K experts chosen per row.

Each intervention is a context manager that hooks the layer's forward for the duration of the
``with`` block and removes the hook on exit, even on error; no weight is touched. It works on the
layer itself or on any model that contains it (pass the layer):

    >>> with ablate_expert(moe, 2):                      # doctest: +SKIP
    ...     y = moe(x).output                            # expert 2 removed, the rest renormalised

Where every expert's output is computed (dense mixtures, hierarchical mixtures), the intervention
rewrites the mixing proportions and re-blends ``expert_outputs``. For routed layers (a ``router``
submodule) it rewrites the router's decision before dispatch, following the router's own rule:
top-k and sigmoid routers choose again among the experts left; expert choice loses the column.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit._checks import check_int, check_positive_float
from moekit.analysis import _dense_targets, record_routing
from moekit.gates import ExpertChoiceRouter, Routing, SigmoidBiasRouter, TopKRouter
from moekit.layers import MoEOutput, combine
from moekit.routing_stats import jsonable

# An edit maps (routing, the layer's input rows, the router or None) to a new routing.
Edit = Callable[[Routing, Tensor, nn.Module | None], Routing]
RowSelector = Callable[[Tensor], Tensor]


def _dense_routing(probs_NE: Tensor) -> Routing:
    logits_NE = probs_NE.clamp_min(1e-300).log().masked_fill(probs_NE == 0, -math.inf)
    return Routing.make_dense(logits_NE, probs_NE)


@contextmanager
def intervene(layer: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """Apply ``edit`` to every routing ``layer`` computes inside the block (the general form of the
    interventions below)."""
    router = getattr(layer, "router", None)
    if isinstance(router, nn.Module):
        def router_hook(module: nn.Module, args: tuple, routing: Routing) -> Routing:
            return edit(routing, args[0], module)

        handle = router.register_forward_hook(router_hook)
    else:
        def layer_hook(module: nn.Module, args: tuple, out: Any) -> MoEOutput:
            if not isinstance(out, MoEOutput) or out.expert_outputs is None:
                raise TypeError(
                    f"intervene: {type(module).__name__} must return a MoEOutput with every "
                    "expert's output (expert_outputs), or have a `router` submodule; pass the "
                    "mixture-of-experts layer itself.")
            x_ND = args[0].reshape(-1, args[0].shape[-1])
            routing = edit(out.routing, x_ND, None)
            return dataclasses.replace(out, routing=routing,
                                       output=combine(routing, out.expert_outputs))

        handle = layer.register_forward_hook(layer_hook)
    try:
        yield layer
    finally:
        handle.remove()


def _route(router: nn.Module, routing: Routing, logits_NE: Tensor, keep_E: Tensor) -> Routing:
    """Choose again with ``router``'s rule from ``logits_NE``, among the experts in ``keep_E``."""
    if isinstance(router, TopKRouter):
        masked_NE = logits_NE.masked_fill(~keep_E, -math.inf)
        probs_NE = torch.softmax(masked_NE, dim=-1)
        top_NK, experts_NK = masked_NE.topk(router.top_k, dim=-1)
        weights_NK = torch.softmax(top_NK, dim=-1) if router.config.renormalize \
            else probs_NE.gather(-1, experts_NK)
        return Routing(weights_NK, experts_NK, probs_NE, masked_NE)
    if isinstance(router, SigmoidBiasRouter):
        scores_NE = torch.sigmoid(logits_NE) * keep_E
        choice_NE = (scores_NE + router.bias_E).masked_fill(~keep_E, -math.inf)
        experts_NK = choice_NE.topk(router.top_k, dim=-1).indices
        chosen_NK = scores_NE.gather(-1, experts_NK)
        weights_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True).clamp_min(1e-30) \
            if router.config.renormalize else chosen_NK
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE)
    if isinstance(router, ExpertChoiceRouter):
        probs_NE = torch.softmax(logits_NE.masked_fill(~keep_E, -math.inf), dim=-1)
        rows_CE = probs_NE.topk(router.capacity(probs_NE.shape[0]), dim=0).indices
        chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(0, rows_CE, True)
        chosen_NE &= keep_E
        return Routing(probs_NE * chosen_NE, routing.experts_NK, probs_NE, logits_NE,
                       mask_NK=chosen_NE)
    raise TypeError(f"intervene: no rule for a router of type {type(router).__name__}; "
                    "supported: TopKRouter, SigmoidBiasRouter, ExpertChoiceRouter.")


def _keep_mask(n_experts: int, experts: Sequence[int], device: torch.device) -> Tensor:
    for e in experts:
        if not 0 <= e < n_experts:
            raise ValueError(f"ablate_expert: experts must lie in [0, {n_experts}); got "
                             f"expert={e}.")
    keep_E = torch.ones(n_experts, dtype=torch.bool, device=device)
    keep_E[list(experts)] = False
    if not keep_E.any():
        raise ValueError(f"ablate_expert: cannot remove every expert; got experts={list(experts)} "
                         f"of {n_experts}.")
    return keep_E


@contextmanager
def ablate_expert(layer: nn.Module, experts: int | Sequence[int]) -> Iterator[nn.Module]:
    """Remove expert(s) from the routing; the remaining experts' proportions are renormalised
    (dense: p_e = 0, p_j / (1 - p_e)); a routed layer chooses again among the others.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> moe = MixtureOfExperts(2, 1, 3)
        >>> with ablate_expert(moe, 0), torch.no_grad():
        ...     float(moe(torch.randn(4, 2)).routing.probs_NE[:, 0].max())
        0.0
    """
    removed = [experts] if isinstance(experts, int) else list(experts)

    def edit(routing: Routing, x_ND: Tensor, router: nn.Module | None) -> Routing:
        n_experts = routing.n_experts
        keep_E = _keep_mask(n_experts, removed, routing.probs_NE.device)
        routed = router is not None and not isinstance(router, ExpertChoiceRouter)
        if routed and int(keep_E.sum()) < routing.top_k:
            raise ValueError(f"ablate_expert: top_k={routing.top_k} experts per row cannot be "
                             f"chosen from the {int(keep_E.sum())} left.")
        if router is not None:
            return _route(router, routing, routing.logits_NE, keep_E)
        kept_NE = routing.probs_NE * keep_E
        total_N1 = kept_NE.sum(-1, keepdim=True)
        uniform_NE = keep_E.to(kept_NE.dtype).expand_as(kept_NE) / keep_E.sum()
        probs_NE = torch.where(total_N1 > 0, kept_NE / total_N1.clamp_min(1e-300), uniform_NE)
        return _dense_routing(probs_NE)

    with intervene(layer, edit) as hooked:
        yield hooked


@contextmanager
def force_expert(layer: nn.Module, expert: int, *, where: RowSelector | None = None
                 ) -> Iterator[nn.Module]:
    """Send rows to ``expert`` alone (weight 1). ``where(x_ND)`` -> bool (N,) picks the rows (the
    layer's input rows); None forces every row.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> moe = MixtureOfExperts(2, 1, 3)
        >>> x = torch.randn(4, 2)
        >>> with force_expert(moe, 1):
        ...     torch.equal(moe(x).output, moe.experts(x)[:, 1])
        True
    """
    check_int("force_expert", "expert", expert, minimum=0)

    def edit(routing: Routing, x_ND: Tensor, router: nn.Module | None) -> Routing:
        n_rows, n_experts = routing.probs_NE.shape
        if expert >= n_experts:
            raise ValueError(f"force_expert: expert must lie in [0, {n_experts}); got "
                             f"expert={expert}.")
        rows_N = torch.ones(n_rows, dtype=torch.bool, device=x_ND.device) if where is None \
            else where(x_ND).reshape(-1).bool()
        one_hot_NE = nn.functional.one_hot(torch.tensor(expert), n_experts).to(routing.probs_NE)
        probs_NE = torch.where(rows_N[:, None], one_hot_NE, routing.probs_NE)
        if router is None:
            return _dense_routing(probs_NE)
        experts_NK = routing.experts_NK.clone()
        experts_NK[rows_N, 0] = expert
        first_NK = torch.zeros_like(routing.weights_NK)
        first_NK[:, 0] = 1.0
        weights_NK = torch.where(rows_N[:, None], first_NK, routing.weights_NK)
        mask_NK = routing.mask_NK.clone() if routing.mask_NK is not None else \
            torch.ones_like(experts_NK, dtype=torch.bool)
        mask_NK[rows_N] = first_NK[rows_N] > 0
        return Routing(weights_NK, experts_NK, probs_NE, routing.logits_NE, mask_NK=mask_NK)

    with intervene(layer, edit) as hooked:
        yield hooked


@contextmanager
def scale_temperature(layer: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """Divide the gate's logits by ``temperature`` (> 1 flattens the gate, < 1 sharpens it).

    For a dense gate p becomes softmax(log p / T), which for a softmax gate is softmax(logits / T)
    and for a tree of gates sharpens the leaf proportions alike.

    Example:
        >>> from moekit import MixtureOfExperts
        >>> moe = MixtureOfExperts(2, 1, 3)
        >>> with scale_temperature(moe, 1e6), torch.no_grad():
        ...     moe(torch.randn(2, 2)).routing.probs_NE.round(decimals=3)
        tensor([[0.3330, 0.3330, 0.3330],
                [0.3330, 0.3330, 0.3330]])
    """
    temperature = check_positive_float("scale_temperature", "temperature", temperature)

    def edit(routing: Routing, x_ND: Tensor, router: nn.Module | None) -> Routing:
        if router is None:
            log_p_NE = routing.probs_NE.clamp_min(1e-300).log()
            return _dense_routing(torch.softmax(log_p_NE / temperature, dim=-1))
        keep_E = torch.ones(routing.n_experts, dtype=torch.bool, device=x_ND.device)
        return _route(router, routing, routing.logits_NE / temperature, keep_E)

    with intervene(layer, edit) as hooked:
        yield hooked


# --- the expert-importance table --------------------------------------------------------------

def _accuracy(output_NO: Tensor, y: Tensor) -> float:
    return float((output_NO.argmax(-1) == y.reshape(-1)).double().mean())


def _mse(output_NO: Tensor, y: Tensor) -> float:
    target_NO = _dense_targets(y, output_NO.shape[-1], output_NO.dtype)
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
            :func:`~moekit.analysis.record_routing` on the same ``x``), which saves a pass over
            ``x``; None measures it when ``layer`` is ``model`` (and leaves it nan otherwise).

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
