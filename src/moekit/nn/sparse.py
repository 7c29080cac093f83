"""A routed mixture-of-experts feed-forward block: a router, an expert bank and the combine, as
siblings with a fixed contract, so that each can be swapped alone.

Shape legend: N rows (tokens), D features in and out, E experts, K experts chosen per row, M routed
assignments.

Only the chosen experts run: the router decides (:mod:`moekit.nn.routers`), the dispatch sorts the
rows by expert (:mod:`moekit.nn.dispatch`), the bank runs each expert on its block given the
per-expert counts (:mod:`moekit.nn.grouped_mm`, by ``experts_implementation``), and the combine
adds the outputs back to their rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int, check_positive_float
from moekit.losses import importance_load_loss, load_balancing_loss, router_z_loss
from moekit.nn.dispatch import combine_rows, gather_rows, plan_dispatch
from moekit.nn.experts import ExpertConfig
from moekit.nn.finite import check_finite_rows, check_flag
from moekit.nn.grouped_mm import check_implementation
from moekit.nn.outputs import MoEOutput, Routing
from moekit.nn.routers import RouterConfig


@dataclass(frozen=True)
class SparseMoEConfig:
    """Everything needed to rebuild a :class:`SparseMoE`.

    Attributes:
        d_model: D, the feature size in and out.
        n_experts: E. hidden: each expert's hidden size H.
        router: a :class:`~moekit.nn.routers.RouterConfig` (its ``top_k`` is the layer's K).
        experts: 'swiglu' (gated, as Mixtral) or 'mlp' (one hidden layer with biases).
        activation: the experts' activation ('silu' for SwiGLU).
        n_shared: experts every row goes through (DeepSeek-style shared experts), 0 for none.
        capacity_factor: None is dropless; otherwise each expert keeps at most
            ceil(capacity_factor * M / E) assignments and the rest are dropped (and reported).
        load_balance_weight, z_loss_weight, importance_weight: weights of the auxiliary losses.
        experts_implementation: how the per-expert matmuls run: 'grouped_mm' (jagged blocks, no
            padding), 'padded' (one bmm over blocks padded to the largest), 'loop' (one matmul per
            expert: the reference), or 'auto' (grouped_mm where it runs the dtype and device, else
            padded). All are exact; they differ in speed (benchmarks/RESULTS.md).
        check_finite: refuse input rows holding NaN or inf (True, the default). Why: under
            expert-choice routing one NaN row takes a slot in every expert and pushes other rows
            out, changing their outputs; under every router it makes the loss and every gradient
            NaN. False skips the check (one reduction and one device sync per forward); a bad row
            then gives a NaN output row and NaN gradients to the router and the experts it reached;
            under token-choice routing without capacity the other rows' outputs are unchanged,
            under expert choice or a capacity factor they may change.
    """

    d_model: int
    n_experts: int
    hidden: int
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: str = "swiglu"
    activation: str = "silu"
    n_shared: int = 0
    capacity_factor: float | None = None
    load_balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    importance_weight: float = 0.0
    experts_implementation: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        owner = "SparseMoE"
        check_int(owner, "d_model", self.d_model, minimum=1)
        check_int(owner, "n_experts", self.n_experts, minimum=1)
        check_int(owner, "hidden", self.hidden, minimum=1)
        check_choice(owner, "experts", self.experts, ("swiglu", "mlp"))
        check_int(owner, "n_shared", self.n_shared, minimum=0)
        if not 1 <= self.router.top_k <= self.n_experts:
            raise ValueError(f"{owner}: top_k must be in [1, n_experts={self.n_experts}]; got "
                             f"top_k={self.router.top_k}.")
        if self.capacity_factor is not None:
            check_positive_float(owner, "capacity_factor", self.capacity_factor)
        check_implementation(owner, self.experts_implementation)
        check_flag(owner, "check_finite", self.check_finite)

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(kind="glu" if self.experts == "swiglu" else "mlp", hidden=self.hidden,
                            activation=self.activation)


def _router_config(router: str | RouterConfig, top_k: int | None) -> RouterConfig:
    """The layer's router: built from a kind and ``top_k``, or given, in which case a ``top_k``
    that disagrees with it is refused rather than silently ignored."""
    if isinstance(router, str):
        return RouterConfig(kind=router, top_k=top_k)
    if top_k is not None and top_k != router.top_k:
        raise ValueError(f"SparseMoE: top_k={top_k} conflicts with router=RouterConfig(top_k="
                         f"{router.top_k}, ...); give top_k in one place: drop the top_k argument, "
                         "or pass the router by kind (router='topk').")
    return router


class SparseMoE(nn.Module):
    """A routed mixture-of-experts feed-forward block: (..., D) -> (..., D); only chosen experts
    run.

    Args:
        d_model: D. n_experts: E. top_k: K, experts per row (default: the router's, 2; 1 for
            'switch'); with a RouterConfig, give K there.
        hidden: each expert's hidden size (default 4 * d_model).
        router: 'topk', 'switch', 'expert_choice', 'sigmoid', or a RouterConfig.
        experts: 'swiglu' or 'mlp'. n_shared: always-on shared experts.
        capacity_factor: None (dropless, the default) or a factor that caps each expert's rows.
        experts_implementation: 'auto', 'grouped_mm', 'padded' or 'loop' (see
            :class:`SparseMoEConfig`).
        check_finite: refuse input rows holding NaN or inf (default True; see
            :class:`SparseMoEConfig`).
        generator: the random generator for the initial weights.

    ``forward(x, generator=...)`` draws router noise (if configured) from ``generator``.

    Example:
        >>> moe = SparseMoE(16, n_experts=8, top_k=2, hidden=32)
        >>> out = moe(torch.randn(4, 10, 16))
        >>> out.output.shape, out.routing.experts_NK.shape
        (torch.Size([4, 10, 16]), torch.Size([40, 2]))
    """

    config_class = SparseMoEConfig

    def __init__(self, d_model: int, n_experts: int, top_k: int | None = None, *,
                 hidden: int | None = None, router: str | RouterConfig = "topk",
                 experts: str = "swiglu", activation: str = "silu", n_shared: int = 0,
                 capacity_factor: float | None = None, load_balance_weight: float = 0.01,
                 z_loss_weight: float = 0.0, importance_weight: float = 0.0,
                 experts_implementation: str = "auto", check_finite: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        router = _router_config(router, top_k)
        self.config = SparseMoEConfig(
            d_model, n_experts, hidden if hidden is not None else 4 * d_model, router, experts,
            activation, n_shared, capacity_factor, load_balance_weight, z_loss_weight,
            importance_weight, experts_implementation, check_finite)
        self.router = router.build(d_model, n_experts, generator=generator)
        self.experts = self.config.expert_config().build(d_model, d_model, n_experts,
                                                         generator=generator)
        self.shared = (self.config.expert_config().build(d_model, d_model, n_shared,
                                                         generator=generator)
                       if n_shared else None)

    @classmethod
    def from_config(cls, config: SparseMoEConfig, *, generator: torch.Generator | None = None
                    ) -> SparseMoE:
        c = config
        return cls(c.d_model, c.n_experts, hidden=c.hidden, router=c.router, experts=c.experts,
                   activation=c.activation, n_shared=c.n_shared,
                   capacity_factor=c.capacity_factor, load_balance_weight=c.load_balance_weight,
                   z_loss_weight=c.z_loss_weight, importance_weight=c.importance_weight,
                   experts_implementation=c.experts_implementation,
                   check_finite=c.check_finite, generator=generator)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> MoEOutput:
        d_model = self.config.d_model
        if x.shape[-1] != d_model:
            raise ValueError(f"SparseMoE: x has {x.shape[-1]} features in its last axis but the "
                             f"layer expects d_model={d_model}; got x.shape={tuple(x.shape)}.")
        if self.config.check_finite:
            check_finite_rows("SparseMoE", x)
        x_ND = x.reshape(-1, d_model)
        routing = self.router(x_ND, generator=generator)
        plan = plan_dispatch(routing, self.config.n_experts,
                             capacity_factor=self.config.capacity_factor)
        y_MD = self.experts.forward_grouped(gather_rows(x_ND, plan), plan.counts_E,
                                            implementation=self.config.experts_implementation)
        y_ND = combine_rows(y_MD, plan, x_ND.shape[0])
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND).sum(1)
        aux_loss, parts = self._aux_losses(routing)
        return MoEOutput(output=y_ND.reshape(x.shape), routing=routing, aux_loss=aux_loss,
                         aux_parts=parts, dispatch=plan)

    def _aux_losses(self, routing: Routing) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        parts: dict[str, Tensor] = {}
        if c.load_balance_weight:
            parts["load_balance"] = load_balancing_loss(routing.probs_NE, routing.experts_NK,
                                                        routing.mask_NK)
        if c.z_loss_weight:
            parts["z_loss"] = router_z_loss(routing.logits_NE)
        if c.importance_weight:
            load_E = routing.load_E if routing.load_E is not None else torch.bincount(
                routing.experts_NK.flatten(), minlength=c.n_experts).to(routing.probs_NE.dtype)
            parts["importance_load"] = importance_load_loss(routing.probs_NE, load_E)
        weights = {"load_balance": c.load_balance_weight, "z_loss": c.z_loss_weight,
                   "importance_load": c.importance_weight}
        total = routing.logits_NE.new_zeros(())
        for name, value in parts.items():
            total = total + weights[name] * value
        return total, parts
