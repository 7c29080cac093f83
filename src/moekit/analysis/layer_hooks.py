"""The routing of every MoE layer of a model, read through forward hooks that are removed on exit.

Shape legend: N tokens of one forward pass (B * T, in (B, T) order), E experts, K experts chosen
per token in rank order.

Two kinds of router are found, by walking ``model.named_modules()``:

- moekit's :class:`~moekit.nn.sparse.SparseMoE`: the hook reads the ``routing`` of the
  :class:`~moekit.nn.outputs.MoEOutput` the layer returns (its own choice, exactly).
- transformers' softmax top-k sparse blocks, by class name (:data:`HF_BLOCKS`: Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE): the hook sits on the block's ``gate`` child. In transformers >= 5 the gate
  (``MixtralTopKRouter`` ...) returns ``(router_logits, top_k_weights, top_k_index)``, the block's
  own decision, which is read as it is; a gate that returns only the logits (an ``nn.Linear``, as in
  transformers 4) gets the blocks' rule applied: p = softmax(logits) in float32, the K largest,
  divided by their sum where the model renormalises (Mixtral always; Qwen and OLMoE when
  ``norm_topk_prob``). ``probs_NE`` is always that softmax.

The hooks live only inside :func:`routing_hooks`; they are removed on exit, after an error too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.nn.outputs import MoEOutput, Routing
from moekit.nn.sparse import SparseMoE

# transformers block class -> whether it always renormalises the top-k weights (None: it does
# when its gate's / config's norm_topk_prob says so)
HF_BLOCKS: dict[str, bool | None] = {
    "MixtralSparseMoeBlock": True,
    "Qwen2MoeSparseMoeBlock": None,
    "Qwen3MoeSparseMoeBlock": None,
    "OlmoeSparseMoeBlock": None,
}


@dataclass(frozen=True)
class LayerRouting:
    """One layer's routing of the N tokens of one forward pass (detached, on the model's device).

    Attributes:
        experts_NK: the chosen experts, long, in rank order. weights_NK: their combine weights.
        probs_NE: the full gate distribution, or None where it was not asked for.
    """

    experts_NK: Tensor
    weights_NK: Tensor
    probs_NE: Tensor | None

    @classmethod
    def from_routing(cls, routing: Routing, owner: str, *, with_probs: bool = True
                     ) -> LayerRouting:
        """A moekit :class:`~moekit.nn.outputs.Routing` with K choices on every row."""
        if routing.mask_NK is not None:
            raise ValueError(f"{owner}: the layer routes a varying number of experts per token "
                             "(expert choice: routing.mask_NK is set), which a (token, layer, k) "
                             "record cannot hold; record a token-choice router ('topk', "
                             "'switch', 'sigmoid').")
        return cls(routing.experts_NK.detach(), routing.weights_NK.detach(),
                   routing.probs_NE.detach() if with_probs else None)


@dataclass(frozen=True)
class RouterSite:
    """One hooked router: ``name`` the module path of the MoE block, ``module`` the module the hook
    sits on (the SparseMoE itself, or a transformers block's ``gate``), ``kind`` the block's class
    name; ``top_k`` and ``renormalize`` the rule applied to a gate that returns only logits."""

    name: str
    module: nn.Module
    kind: str
    top_k: int | None = None
    renormalize: bool = True


def find_routers(model: nn.Module) -> list[RouterSite]:
    """Every router of ``model`` that :func:`routing_hooks` can read, in module order.

    Example:
        >>> stack = nn.ModuleList([SparseMoE(8, 4, hidden=8), SparseMoE(8, 4, hidden=8)])
        >>> [(site.name, site.kind) for site in find_routers(stack)]
        [('0', 'SparseMoE'), ('1', 'SparseMoE')]
    """
    sites = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, SparseMoE):
            sites.append(RouterSite(name, module, "SparseMoE"))
        elif kind in HF_BLOCKS and isinstance(getattr(module, "gate", None), nn.Module):
            gate = module.gate
            top_k = getattr(gate, "top_k", getattr(module, "top_k", None))
            always = HF_BLOCKS[kind]
            renormalize = always if always is not None else bool(
                getattr(gate, "norm_topk_prob", getattr(module, "norm_topk_prob", False)))
            sites.append(RouterSite(name, gate, kind, top_k, renormalize))
    return sites


def softmax_top_k(logits_NE: Tensor, top_k: int, renormalize: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The transformers blocks' rule: ``(experts_NK, weights_NK, probs_NE)`` with p =
    softmax(logits) in float32, the K largest p, divided by their sum if ``renormalize``.

    Example:
        >>> experts, weights, _ = softmax_top_k(torch.tensor([[2.0, 0.0, 1.0]]), 2, True)
        >>> experts.tolist(), [round(w, 4) for w in weights[0].tolist()]
        ([[0, 2]], [0.7311, 0.2689])
    """
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    weights_NK, experts_NK = torch.topk(probs_NE, top_k, dim=-1)
    if renormalize:
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    return experts_NK, weights_NK, probs_NE


class RoutingCapture:
    """What the hooks of :func:`routing_hooks` saw: one :class:`LayerRouting` per router call, in
    call order. :meth:`take` hands over the calls of the forward passes since the last take."""

    def __init__(self, sites: list[RouterSite], *, with_probs: bool) -> None:
        self.sites, self.with_probs = sites, with_probs
        self._calls: list[tuple[str, LayerRouting]] = []

    def take(self) -> tuple[list[str], list[LayerRouting]]:
        """``(names, routings)`` of the router calls since the last take (a block called twice
        appears twice), and forget them."""
        calls, self._calls = self._calls, []
        return [name for name, _ in calls], [routing for _, routing in calls]

    def hook(self, site: RouterSite) -> Any:
        """The forward hook for ``site``: it reads the routing from the module's output."""
        def read(module: nn.Module, args: tuple, output: Any) -> None:
            self._calls.append((site.name, self._read(site, output)))
        return read

    def _read(self, site: RouterSite, output: Any) -> LayerRouting:
        owner = f"routing_hooks ({site.name}: {site.kind})"
        if site.kind == "SparseMoE":
            return LayerRouting.from_routing(MoEOutput.check(output, owner).routing, owner,
                                             with_probs=self.with_probs)
        if isinstance(output, (tuple, list)) and len(output) >= 3 \
                and isinstance(output[2], Tensor) and not output[2].is_floating_point():
            logits_NE, weights_NK, experts_NK = output[0], output[1], output[2]  # the block's own
            probs_NE = torch.softmax(logits_NE.float(), dim=-1) if self.with_probs else None
            return LayerRouting(experts_NK.detach().long(), weights_NK.detach(), probs_NE)
        logits_NE = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(logits_NE, Tensor) or site.top_k is None:
            raise TypeError(f"{owner}: the gate must return router logits (N, E), or (logits, "
                            f"weights, indices); got {type(output).__name__}, and top_k="
                            f"{site.top_k}. Record a Mixtral, Qwen-MoE or OLMoE model of "
                            "transformers, or moekit SparseMoE layers.")
        experts_NK, weights_NK, probs_NE = softmax_top_k(
            logits_NE.detach().reshape(-1, logits_NE.shape[-1]), site.top_k, site.renormalize)
        return LayerRouting(experts_NK, weights_NK, probs_NE if self.with_probs else None)


@contextmanager
def routing_hooks(model: nn.Module, *, with_probs: bool = True) -> Iterator[RoutingCapture]:
    """Hook every router of ``model`` (:func:`find_routers`) for the duration of the ``with``;
    the hooks are removed on exit, whether the block ends normally or by an error.

    Args:
        model: a module holding moekit SparseMoE layers or transformers Mixtral / Qwen-MoE /
            OLMoE sparse blocks.
        with_probs: also keep each call's ``probs_NE`` (N x E per layer; False saves memory).

    Example:
        >>> stack = nn.Sequential(nn.Linear(8, 8), SparseMoE(8, 4, hidden=8))
        >>> with routing_hooks(stack) as capture:
        ...     _ = stack(torch.randn(5, 8))
        >>> names, routings = capture.take()
        >>> names, routings[0].experts_NK.shape, stack[1]._forward_hooks
        (['1'], torch.Size([5, 2]), OrderedDict())
    """
    sites = find_routers(model)
    if not sites:
        raise ValueError(f"routing_hooks: found no router in {type(model).__name__}: it holds no "
                         f"moekit SparseMoE and no transformers block of {sorted(HF_BLOCKS)}. "
                         "Pass the model that contains the MoE layers.")
    capture = RoutingCapture(sites, with_probs=with_probs)
    handles = []
    try:
        handles.extend(site.module.register_forward_hook(capture.hook(site)) for site in sites)
        yield capture
    finally:
        for handle in handles:
            handle.remove()
