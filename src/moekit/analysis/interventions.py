"""Interventions on a mixture's routing: knock out an expert, force rows to one, change the gate's
temperature (what each does to the task: :mod:`moekit.analysis.importance`).

Shape legend: N rows, D input features, O outputs, E experts, K experts chosen per row.

Each intervention is a context manager that hooks the layer's forward for the duration of the
``with`` block and removes the hook on exit, even on error; no weight is touched. It works on the
layer itself or on any model that contains it (pass the layer):

    >>> with ablate_expert(moe, 2):                      # doctest: +SKIP
    ...     y = moe(x).output                            # expert 2 removed, the rest renormalised

Where every expert's output is computed (dense mixtures, hierarchical mixtures), the intervention
rewrites the mixing proportions and re-blends ``expert_outputs``. For routed layers (a ``router``
submodule) it rewrites the router's decision before dispatch with the router's own rule,
``router.choose(logits_NE, keep_E)`` (:mod:`moekit.nn.routers`): top-k and sigmoid routers choose
again among the experts left; expert choice loses the column.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moekit._checks import check_int, check_positive_float
from moekit.nn.dispatch import blend
from moekit.nn.outputs import MoEOutput, Routing

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
                                       output=blend(routing, out.expert_outputs))

        handle = layer.register_forward_hook(layer_hook)
    try:
        yield layer
    finally:
        handle.remove()


def _choose(router: nn.Module, logits_NE: Tensor, keep_E: Tensor | None) -> Routing:
    """Choose again with the router's own rule (:meth:`~moekit.nn.routers.TopKRouter.choose`)."""
    if not callable(getattr(router, "choose", None)):
        raise TypeError(f"intervene: the router {type(router).__name__} has no choose(logits_NE, "
                        "keep_E) method, so its rule cannot be applied again; moekit's routers "
                        "have one (moekit.nn.routers).")
    return router.choose(logits_NE, keep_E)


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
        keep_E = _keep_mask(routing.n_experts, removed, routing.probs_NE.device)
        if router is not None:
            return _choose(router, routing.logits_NE, keep_E)
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
        return _choose(router, routing.logits_NE / temperature, None)

    with intervene(layer, edit) as hooked:
        yield hooked
