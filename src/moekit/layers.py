"""Mixture-of-experts layers: a gate, a bank of experts, and the combine that blends them.

Shape legend: N rows, D input features, O outputs, E experts, K experts chosen per row.

Every layer returns the same typed record, :class:`MoEOutput`, whatever its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int, check_matrix, check_positive_float
from moekit.dispatch import DispatchPlan, combine_rows, gather_rows, plan_dispatch
from moekit.experts import ExpertConfig, apply_head
from moekit.gates import GateConfig, RouterConfig, Routing
from moekit.losses import importance_load_loss, load_balancing_loss, router_z_loss


@dataclass(frozen=True)
class MoEOutput:
    """What a mixture-of-experts layer computed.

    Attributes:
        output: the blended output, sum_k weights_NK * expert output, shape (N, O).
        routing: the gate's decision (:class:`~moekit.gates.Routing`).
        aux_loss: auxiliary loss to add to the objective (a 0-d tensor; zero for the dense layer).
        aux_parts: the named terms that make up ``aux_loss``, for logging.
        expert_outputs: every expert's output after its head, (N, E, O), where the layer computes
            every expert (dense layers); None otherwise.
        expert_logits: the same before the head (equal to ``expert_outputs`` for an identity head).
        dispatch: for routed layers, where each assignment went, including exactly which
            (row, expert) pairs were dropped for capacity and the drop rate; None for dense layers.
    """

    output: Tensor
    routing: Routing
    aux_loss: Tensor
    aux_parts: dict[str, Tensor] = field(default_factory=dict)
    expert_outputs: Tensor | None = None
    expert_logits: Tensor | None = None
    dispatch: DispatchPlan | None = None


def combine(routing: Routing, expert_outputs_NEO: Tensor) -> Tensor:
    """Blend expert outputs with the routing weights: y_n = sum_k w_nk * o_{n, e_nk}.

    For the dense gate (K = E, e_nk = k) this is the paper's y = sum_i p_i o_i.
    """
    if routing.dense:
        return torch.einsum("ne,neo->no", routing.weights_NK, expert_outputs_NEO)
    out_features = expert_outputs_NEO.shape[-1]
    index_NKO = routing.experts_NK.unsqueeze(-1).expand(-1, -1, out_features)
    chosen_NKO = expert_outputs_NEO.gather(1, index_NKO)
    return torch.einsum("nk,nko->no", routing.weights_NK, chosen_NKO)


@dataclass(frozen=True)
class MoEConfig:
    """Everything needed to rebuild a :class:`MixtureOfExperts` (saved with its weights)."""

    in_features: int
    out_features: int
    n_experts: int
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        check_int("MixtureOfExperts", "in_features", self.in_features, minimum=1)
        check_int("MixtureOfExperts", "out_features", self.out_features, minimum=1)
        check_int("MixtureOfExperts", "n_experts", self.n_experts, minimum=1)


class MixtureOfExperts(nn.Module):
    """The dense mixture of experts of Jacobs, Jordan, Nowlan & Hinton (1991).

    A softmax gate gives mixing proportions p_i(x); every expert computes o_i(x); the output is
    sum_i p_i o_i. Train it with the paper's error functions in :mod:`moekit.losses`.

    Args:
        in_features: D, the number of input features (the gate sees the same input as the experts).
        out_features: O, the number of outputs of each expert.
        n_experts: E, the number of experts.
        expert: an :class:`ExpertConfig` (default: linear experts, identity head).
        gate: a :class:`GateConfig` (default: the paper's softmax gate).
        generator: the random generator for the initial weights, for reproducible runs.

    Example:
        >>> moe = MixtureOfExperts(2, 4, n_experts=3, expert=ExpertConfig(head="softmax"))
        >>> out = moe(torch.randn(5, 2))
        >>> out.output.shape, out.routing.probs_NE.shape, out.expert_outputs.shape
        (torch.Size([5, 4]), torch.Size([5, 3]), torch.Size([5, 3, 4]))
    """

    config_class = MoEConfig

    def __init__(self, in_features: int, out_features: int, n_experts: int, *,
                 expert: ExpertConfig | None = None, gate: GateConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = MoEConfig(in_features, out_features, n_experts,
                                expert=expert or ExpertConfig(), gate=gate or GateConfig())
        self.gate = self.config.gate.build(in_features, n_experts, generator=generator)
        self.experts = self.config.expert.build(in_features, out_features, n_experts,
                                                generator=generator)

    @classmethod
    def from_config(cls, config: MoEConfig, *, generator: torch.Generator | None = None
                    ) -> MixtureOfExperts:
        return cls(config.in_features, config.out_features, config.n_experts,
                   expert=config.expert, gate=config.gate, generator=generator)

    @property
    def head(self) -> str:
        return self.config.expert.head

    def forward(self, x_ND: Tensor) -> MoEOutput:
        check_matrix("MixtureOfExperts", "x", x_ND, n_columns=self.config.in_features)
        return dense_mixture(self.gate, self.experts, self.head, x_ND)


def dense_mixture(gate: nn.Module, experts: nn.Module, head: str, x_ND: Tensor) -> MoEOutput:
    """Every expert on every row, blended by a dense gate: the forward pass of the 1991 mixture,
    shared by the flat, hierarchical and localized mixtures (which differ only in their gate)."""
    routing = gate(x_ND)
    logits_NEO = experts(x_ND)
    outputs_NEO = apply_head(head, logits_NEO)
    return MoEOutput(output=combine(routing, outputs_NEO), routing=routing,
                     aux_loss=x_ND.new_zeros(()), expert_outputs=outputs_NEO,
                     expert_logits=logits_NEO)


@dataclass(frozen=True)
class SparseMoEConfig:
    """Everything needed to rebuild a :class:`SparseMoE`.

    Attributes:
        d_model: D, the feature size in and out.
        n_experts: E. hidden: each expert's hidden size H.
        router: a :class:`~moekit.gates.RouterConfig` (its ``top_k`` is the layer's K).
        experts: 'swiglu' (gated, as Mixtral) or 'mlp' (one hidden layer with biases).
        activation: the experts' activation ('silu' for SwiGLU).
        n_shared: experts every row goes through (DeepSeek-style shared experts), 0 for none.
        capacity_factor: None is dropless; otherwise each expert keeps at most
            ceil(capacity_factor * M / E) assignments and the rest are dropped (and reported).
        load_balance_weight, z_loss_weight, importance_weight: weights of the auxiliary losses.
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

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(kind="glu" if self.experts == "swiglu" else "mlp", hidden=self.hidden,
                            activation=self.activation)


class SparseMoE(nn.Module):
    """A routed mixture-of-experts feed-forward block: (..., D) -> (..., D); only chosen experts run.

    Args:
        d_model: D. n_experts: E. top_k: K, experts per row (1 = switch routing).
        hidden: each expert's hidden size (default 4 * d_model).
        router: 'topk', 'switch', 'expert_choice', 'sigmoid', or a RouterConfig (whose own top_k
            then applies, not the ``top_k`` argument).
        experts: 'swiglu' or 'mlp'. n_shared: always-on shared experts.
        capacity_factor: None (dropless, the default) or a factor that caps each expert's rows.
        generator: the random generator for the initial weights.

    ``forward(x, generator=...)`` draws router noise (if configured) from ``generator``.

    Example:
        >>> moe = SparseMoE(16, n_experts=8, top_k=2, hidden=32)
        >>> out = moe(torch.randn(4, 10, 16))
        >>> out.output.shape, out.routing.experts_NK.shape
        (torch.Size([4, 10, 16]), torch.Size([40, 2]))
    """

    config_class = SparseMoEConfig

    def __init__(self, d_model: int, n_experts: int, top_k: int = 2, *, hidden: int | None = None,
                 router: str | RouterConfig = "topk", experts: str = "swiglu",
                 activation: str = "silu", n_shared: int = 0,
                 capacity_factor: float | None = None, load_balance_weight: float = 0.01,
                 z_loss_weight: float = 0.0, importance_weight: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(router, str):
            router = RouterConfig(kind=router, top_k=top_k)
        self.config = SparseMoEConfig(
            d_model, n_experts, hidden if hidden is not None else 4 * d_model, router, experts,
            activation, n_shared, capacity_factor, load_balance_weight, z_loss_weight,
            importance_weight)
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
        return cls(c.d_model, c.n_experts, c.router.top_k, hidden=c.hidden, router=c.router,
                   experts=c.experts, activation=c.activation, n_shared=c.n_shared,
                   capacity_factor=c.capacity_factor, load_balance_weight=c.load_balance_weight,
                   z_loss_weight=c.z_loss_weight, importance_weight=c.importance_weight,
                   generator=generator)

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> MoEOutput:
        d_model = self.config.d_model
        if x.shape[-1] != d_model:
            raise ValueError(f"SparseMoE: x has {x.shape[-1]} features in its last axis but the "
                             f"layer expects d_model={d_model}; got x.shape={tuple(x.shape)}.")
        x_ND = x.reshape(-1, d_model)
        routing = self.router(x_ND, generator=generator)
        plan = plan_dispatch(routing, self.config.n_experts,
                             capacity_factor=self.config.capacity_factor)
        y_MD = self.experts.forward_grouped(gather_rows(x_ND, plan), plan)
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
