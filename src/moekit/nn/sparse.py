"""A routed mixture-of-experts feed-forward block: a router, an expert bank and the combine, as
siblings with a fixed contract, so that each can be swapped alone.

Shape legend: N rows (tokens), D features in and out, E experts, K experts chosen per row, M routed
assignments.

Only the chosen experts run: the router decides (:mod:`moekit.nn.routers`), the dispatch sorts the
rows by expert (:mod:`moekit.nn.dispatch`), the bank runs each expert on its block given the
per-expert counts (:mod:`moekit.nn.grouped_mm`, by ``experts_implementation``), and the combine
adds the outputs back to their rows.

Routing controls, for analysis (``forward``'s keyword arguments; each None by default, and then the
layer runs exactly as without them): ``logit_offset_E`` is added to the router's logits before its
rule chooses (steering), ``keep_E`` leaves the router only those experts to choose from (ablation),
``forced_experts_NK`` replaces the choice by given experts (replay, :func:`replay_routing`).
"""

from __future__ import annotations

import dataclasses
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
from moekit.nn.routers import RouterConfig, SigmoidBiasRouter, TopKRouter


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

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None,
                logit_offset_E: Tensor | None = None, keep_E: Tensor | None = None,
                forced_experts_NK: Tensor | None = None) -> MoEOutput:
        """Route the rows of ``x`` (..., D), run the chosen experts, combine.

        The routing controls (see :meth:`route`) default to None: the layer's own routing.
        """
        d_model = self.config.d_model
        if x.shape[-1] != d_model:
            raise ValueError(f"SparseMoE: x has {x.shape[-1]} features in its last axis but the "
                             f"layer expects d_model={d_model}; got x.shape={tuple(x.shape)}.")
        if self.config.check_finite:
            check_finite_rows("SparseMoE", x)
        x_ND = x.reshape(-1, d_model)
        routing = self.route(x_ND, generator=generator, logit_offset_E=logit_offset_E,
                             keep_E=keep_E, forced_experts_NK=forced_experts_NK)
        out = self.forward_routed(x_ND, routing)
        return dataclasses.replace(out, output=out.output.reshape(x.shape))

    def forward_routed(self, x_ND: Tensor, routing: Routing) -> MoEOutput:
        """Everything after the router, for rows ``x_ND`` (N, D) routed by ``routing``: dispatch,
        the experts, the combine, the shared experts and the auxiliary losses (what
        :meth:`forward` runs after :meth:`route`; a routing made elsewhere, e.g. the one-process
        reference of :mod:`moekit.parallel`, runs through the same path)."""
        plan = plan_dispatch(routing, self.config.n_experts,
                             capacity_factor=self.config.capacity_factor)
        y_MD = self.experts.forward_grouped(gather_rows(x_ND, plan), plan.counts_E,
                                            implementation=self.config.experts_implementation)
        y_ND = combine_rows(y_MD, plan, x_ND.shape[0])
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND).sum(1)
        aux_loss, parts = self._aux_losses(routing)
        return MoEOutput(output=y_ND, routing=routing, aux_loss=aux_loss, aux_parts=parts,
                         dispatch=plan)

    def route(self, x_ND: Tensor, *, generator: torch.Generator | None = None,
              logit_offset_E: Tensor | None = None, keep_E: Tensor | None = None,
              forced_experts_NK: Tensor | None = None) -> Routing:
        """The router's decision for the rows ``x_ND``, under optional controls.

        Args:
            logit_offset_E: (E,) added to every row's router logits before the router's rule
                chooses (steering; the weights follow the shifted logits too).
            keep_E: (E,) bool, the experts the router may choose (ablation: the router's own
                ``choose(logits_NE, keep_E)``).
            forced_experts_NK: (N, K') long, the experts each row goes to (replay), weighted by the
                router's rule over them (:func:`replay_routing`); not with ``keep_E``.

        With any control the router runs as usual first (its noise, and in training mode the
        sigmoid router's load counts, come from that uncontrolled pass), then its rule is
        applied again to its logits, shifted and restricted; noisy top-k's smooth load estimate
        is then not kept (the importance loss falls back to counted loads).
        """
        routing = self.router(x_ND, generator=generator)
        if logit_offset_E is None and keep_E is None and forced_experts_NK is None:
            return routing
        n_experts, logits_NE = self.config.n_experts, routing.logits_NE
        if logit_offset_E is not None:
            _check_per_expert("logit_offset_E", logit_offset_E, n_experts, floating=True)
            logits_NE = logits_NE + logit_offset_E.to(logits_NE)  # its dtype and device
        if forced_experts_NK is not None:
            if keep_E is not None:
                raise ValueError("SparseMoE: forced_experts_NK already fixes every row's experts; "
                                 "got keep_E too. Pass one of them.")
            _check_forced(forced_experts_NK, x_ND.shape[0], n_experts)
            return replay_routing(self.router, logits_NE, forced_experts_NK.to(logits_NE.device))
        if keep_E is not None:
            _check_per_expert("keep_E", keep_E, n_experts, floating=False)
            keep_E = keep_E.to(logits_NE.device)
        return self.router.choose(logits_NE, keep_E)

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


def replay_routing(router: nn.Module, logits_NE: Tensor, experts_NK: Tensor) -> Routing:
    """Route each row to the given experts, weighted by the router's own rule over them.

    For a top-k (and switch) router the weights are those :meth:`TopKRouter.choose` gives its
    chosen experts: with ``renormalize`` (K > 1) the softmax over the given experts' logits, i.e.
    the live probabilities renormalised over them; else their full softmax probabilities p_i
    (Switch's K = 1). For the sigmoid router: their sigmoid scores, divided by their sum when it
    renormalises. Replaying the experts a router chose from the same logits therefore reproduces
    its routing bit for bit, and the weights stay functions of the logits, so the task loss
    reaches the router. Expert choice (a variable number of experts per row) is refused.

    Example:
        >>> router = RouterConfig(kind="topk", top_k=2).build(3, 4)
        >>> logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
        >>> replay_routing(router, logits, torch.tensor([[0, 2]])).weights_NK
        tensor([[0.8808, 0.1192]])
    """
    if isinstance(router, TopKRouter):
        probs_NE = torch.softmax(logits_NE, dim=-1)
        if router.config.renormalizes:
            weights_NK = torch.softmax(logits_NE.gather(-1, experts_NK), dim=-1)
        else:
            weights_NK = probs_NE.gather(-1, experts_NK)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE)
    if isinstance(router, SigmoidBiasRouter):
        scores_NE = torch.sigmoid(logits_NE)
        chosen_NK = scores_NE.gather(-1, experts_NK)
        weights_NK = (chosen_NK / chosen_NK.sum(-1, keepdim=True).clamp_min(1e-30)
                      if router.config.renormalizes else chosen_NK)
        return Routing(weights_NK, experts_NK, scores_NE / scores_NE.sum(-1, keepdim=True),
                       logits_NE)
    raise ValueError(f"SparseMoE: forced_experts_NK replays token-choice routing (router kind "
                     f"'topk', 'switch' or 'sigmoid'); got {type(router).__name__}. Under expert "
                     "choice restrict the experts with keep_E instead.")


def _check_per_expert(name: str, value: Tensor, n_experts: int, *, floating: bool) -> None:
    kind = "a floating" if floating else "a bool"
    ok = isinstance(value, Tensor) and (value.is_floating_point() if floating
                                        else value.dtype == torch.bool)
    if not ok or tuple(value.shape) != (n_experts,):
        got = (f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor)
               else type(value).__name__)
        raise ValueError(f"SparseMoE: {name} must be {kind} tensor of shape (n_experts,) = "
                         f"({n_experts},); got {got}.")


def _check_forced(experts_NK: Tensor, n_rows: int, n_experts: int) -> None:
    ok = (isinstance(experts_NK, Tensor) and experts_NK.dtype == torch.long
          and experts_NK.ndim == 2 and experts_NK.shape[0] == n_rows
          and 1 <= experts_NK.shape[1] <= n_experts)
    if not ok:
        got = (f"{experts_NK.dtype} of shape {tuple(experts_NK.shape)}"
               if isinstance(experts_NK, Tensor) else type(experts_NK).__name__)
        raise ValueError(f"SparseMoE: forced_experts_NK must be a long tensor of shape (N, K) = "
                         f"({n_rows}, K), 1 <= K <= n_experts={n_experts}, one row per input "
                         f"row; got {got}.")
    if experts_NK.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(experts_NK))
    if low < 0 or high >= n_experts:
        raise ValueError(f"SparseMoE: forced_experts_NK must hold experts in [0, {n_experts}); "
                         f"got values from {low} to {high}.")
