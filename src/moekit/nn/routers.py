"""Routers: the gates of routed layers, which choose K of E experts per row (or rows per expert).

Shape legend: N rows, D input features, E experts, K experts chosen per row.

Every router scores the rows (``logits_NE``) and then applies its rule, :meth:`choose`, which is
public so that the interventions of :mod:`moekit.analysis.interventions` choose again with the same
rule (among the experts left, or at another temperature): the rules exist once.
Only the chosen experts are computed (:mod:`moekit.nn.dispatch`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit._checks import check_choice, check_int
from moekit.nn.init import uniform_fan_in_
from moekit.nn.outputs import Routing, every_expert

ROUTER_KINDS = ("topk", "switch", "expert_choice", "sigmoid")
NOISE_KINDS = ("none", "gaussian", "jitter")
DEFAULT_TOP_K = {"topk": 2, "switch": 1, "expert_choice": 2, "sigmoid": 2}


@dataclass(frozen=True)
class RouterConfig:
    """Which router to build.

    Attributes:
        kind: 'topk' (token choice, Shazeer et al. 2017), 'switch' (top-1, Fedus et al. 2021),
            'expert_choice' (each expert takes its top-C rows, Zhou et al. 2022), or 'sigmoid'
            (sigmoid scores, top-k chosen with a load-driven bias, DeepSeek-V3 2024).
        top_k: experts per row (for 'expert_choice' the average per row); None takes the kind's
            default, 1 for 'switch' and 2 otherwise. 'switch' refuses any other value.
        renormalize: for K > 1, weight the chosen experts by a softmax over their logits (True)
            or by their full softmax probabilities (False); for 'sigmoid', by their scores divided
            by the chosen scores' sum (True, DeepSeek-V3) or by the scores (False).
        scale_top1: for K = 1 (with ``renormalize``), weight the one chosen expert by its gate
            score, as Switch Transformer does (Fedus et al. 2021, y = p_i(x) E_i(x)): its full
            softmax probability p_i for 'topk' and 'switch', its sigmoid score s_i for 'sigmoid'.
            Renormalising one weight gives 1.0 on every row, so the router would get no gradient
            from the task loss. False keeps that weight of 1.0 (transformers' Mixtral at K = 1),
            and is what a config saved before this field reads back as (``LEGACY_DEFAULTS``), so a
            saved model reloads with the outputs it was saved with. Expert choice always weights
            by p; without ``renormalize`` the weights are p (or s) for every K.
        noise: 'none', 'gaussian' (noisy top-k with a learned noise scale), or 'jitter'
            (multiplicative input noise, U(1 - eps, 1 + eps)); applied in training mode only.
        jitter_eps: the jitter's half-width.
        capacity_factor: for 'expert_choice', C = capacity_factor * N * top_k / E.
        bias_update_rate: for 'sigmoid', the step of the load-balancing bias per optimizer step
            (:meth:`SigmoidBiasRouter.step_bias`).

    Example:
        >>> RouterConfig(kind="switch").top_k
        1
        >>> p = torch.softmax(torch.tensor([[2.0, 0.0]]), -1)  # switch: the weight is p, not 1
        >>> RouterConfig(kind="switch").build(1, 2).choose(p.log()).weights_NK
        tensor([[0.8808]])
        >>> RouterConfig(kind="switch", top_k=2)  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: RouterConfig: kind='switch' routes every row to one expert, top_k=1; got
        top_k=2. Use kind='topk' for top-2 routing, or leave top_k unset.
    """

    kind: str = "topk"
    top_k: int | None = None
    renormalize: bool = True
    noise: str = "none"
    jitter_eps: float = 0.01
    capacity_factor: float = 1.0
    bias_update_rate: float = 1e-3
    scale_top1: bool = True

    # The value a field added after the first saved folders takes when a saved config lacks it
    # (moekit.io reads these), so that a folder reloads with the outputs it was saved with.
    LEGACY_DEFAULTS: ClassVar[Mapping[str, Any]] = MappingProxyType({"scale_top1": False})

    def __post_init__(self) -> None:
        check_choice("RouterConfig", "kind", self.kind, ROUTER_KINDS)
        if self.top_k is None:  # the kind's default, resolved once so that saved configs hold it
            object.__setattr__(self, "top_k", DEFAULT_TOP_K[self.kind])
        check_int("RouterConfig", "top_k", self.top_k, minimum=1)
        check_choice("RouterConfig", "noise", self.noise, NOISE_KINDS)
        for name in ("renormalize", "scale_top1"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RouterConfig: {name} must be True or False; got "
                                f"{name}={getattr(self, name)!r}.")
        if self.kind == "switch" and self.top_k != 1:
            raise ValueError(f"RouterConfig: kind='switch' routes every row to one expert, "
                             f"top_k=1; got top_k={self.top_k}. Use kind='topk' for "
                             f"top-{self.top_k} routing, or leave top_k unset.")
        if self.noise == "gaussian" and self.kind not in ("topk", "switch"):
            raise ValueError(f"RouterConfig: noise='gaussian' (noisy top-k) needs kind 'topk' or "
                             f"'switch'; got kind={self.kind!r}. Use noise='jitter' instead.")

    @property
    def renormalizes(self) -> bool:
        """Whether the chosen experts' weights are divided by their sum: ``renormalize``, except at
        K = 1 under ``scale_top1`` (Switch's y = p_i(x) E_i(x))."""
        return self.renormalize and not (self.top_k == 1 and self.scale_top1)

    def build(self, d_model: int, n_experts: int, *, generator: torch.Generator | None = None
              ) -> nn.Module:
        if self.top_k > n_experts:
            raise ValueError(f"RouterConfig: top_k must be in [1, n_experts={n_experts}]; got "
                             f"top_k={self.top_k}.")
        if self.kind == "expert_choice":
            return ExpertChoiceRouter(d_model, n_experts, self, generator=generator)
        if self.kind == "sigmoid":
            return SigmoidBiasRouter(d_model, n_experts, self, generator=generator)
        return TopKRouter(d_model, n_experts, self, generator=generator)


def _masked(logits_NE: Tensor, keep_E: Tensor | None) -> Tensor:
    return logits_NE if keep_E is None else logits_NE.masked_fill(~keep_E, -math.inf)


class LinearScores(nn.Module):
    """What every router shares: a linear projection to one logit per expert (no bias, as in most
    MoE layers), with optional input jitter in training mode."""

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_model = check_int(type(self).__name__, "d_model", d_model, minimum=1)
        self.n_experts = check_int(type(self).__name__, "n_experts", n_experts, minimum=1)
        self.config = config
        self.top_k = config.top_k
        self.w_DE = nn.Parameter(torch.empty(d_model, n_experts))
        uniform_fan_in_(self.w_DE, d_model, generator)

    def jitter(self, x_ND: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.training and self.config.noise == "jitter":
            eps = self.config.jitter_eps
            u_ND = torch.rand(x_ND.shape, generator=generator, dtype=x_ND.dtype, device=x_ND.device)
            return x_ND * (1.0 - eps + 2.0 * eps * u_ND)
        return x_ND

    def check_keep(self, keep_E: Tensor | None) -> None:
        """Refuse a set of experts too small for the router to choose ``top_k`` from."""
        if keep_E is not None and int(keep_E.sum()) < self.top_k:
            raise ValueError(f"{type(self).__name__}: top_k={self.top_k} experts per row cannot be "
                             f"chosen from the {int(keep_E.sum())} left.")


class TopKRouter(LinearScores):
    """Token choice: each row takes its K highest-scoring experts (switch routing is K = 1).

    Weights: a softmax over the K chosen logits (``renormalize``, K > 1), else the chosen experts'
    full softmax probabilities p_i; at K = 1 that is Switch's y = p_i(x) E_i(x), so the router
    learns from the task loss (``RouterConfig.scale_top1``).

    With ``noise='gaussian'`` (Shazeer et al. 2017): H = x W + eps * softplus(x W_noise),
    eps ~ N(0, 1) from the caller's generator, and ``Routing.load_E`` holds the smooth load estimate
    sum_n P(expert e stays in row n's top K under fresh noise).
    """

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_model, n_experts, config, generator=generator)
        if config.noise == "gaussian":
            # Zero init: noise starts at softplus(0) = 0.69 and is learned from there.
            self.w_noise_DE = nn.Parameter(torch.zeros(d_model, n_experts))

    def choose(self, logits_NE: Tensor, keep_E: Tensor | None = None) -> Routing:
        """The K best of ``logits_NE`` per row, among the experts in ``keep_E`` (all if None)."""
        self.check_keep(keep_E)
        logits_NE = _masked(logits_NE, keep_E)
        probs_NE = torch.softmax(logits_NE, dim=-1)
        top_logits_NK, experts_NK = logits_NE.topk(self.top_k, dim=-1)
        if self.config.renormalizes:
            weights_NK = torch.softmax(top_logits_NK, dim=-1)
        else:
            weights_NK = probs_NE.gather(-1, experts_NK)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE)

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        x_ND = self.jitter(x_ND, generator)
        clean_NE = x_ND @ self.w_DE
        if not (self.config.noise == "gaussian" and self.training):
            return self.choose(clean_NE)
        std_NE = nn.functional.softplus(x_ND @ self.w_noise_DE)
        eps_NE = torch.randn(clean_NE.shape, generator=generator, dtype=clean_NE.dtype,
                             device=clean_NE.device)
        noisy_NE = clean_NE + eps_NE * std_NE
        load_E = smooth_load(clean_NE, noisy_NE, std_NE, self.top_k)
        return dataclasses.replace(self.choose(noisy_NE), load_E=load_E)


def smooth_load(clean_NE: Tensor, noisy_NE: Tensor, std_NE: Tensor, k: int) -> Tensor:
    """Shazeer et al. (2017), Appendix A: P(clean_ne + noise > the k-th best of the other noisy
    logits), summed over rows. The threshold is the k-th noisy logit if e is not in the top k,
    else the (k+1)-th."""
    n_experts = noisy_NE.shape[-1]
    top_NK1 = noisy_NE.topk(min(k + 1, n_experts), dim=-1).values
    kth_N1 = top_NK1[:, k - 1 : k]
    next_N1 = top_NK1[:, k : k + 1] if k < n_experts else torch.full_like(kth_N1, -torch.inf)
    in_top_NE = noisy_NE >= kth_N1
    threshold_NE = torch.where(in_top_NE, next_N1, kth_N1)
    # No argument validation: with the layer's finite check off, a NaN row stays a NaN (the
    # layer's documented behaviour) instead of a torch.distributions error.
    normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
    return normal.cdf((clean_NE - threshold_NE) / std_NE).sum(0)


class ExpertChoiceRouter(LinearScores):
    """Expert choice (Zhou et al. 2022): scores S = softmax_E(x W); each expert takes the C rows
    with its highest scores, C = capacity_factor * N * top_k / E. A row may get any number of
    experts, including none; ``Routing.mask_NK`` marks the real choices (K = E, weight 0 where
    unchosen)."""

    def capacity(self, n_rows: int) -> int:
        c = math.ceil(self.config.capacity_factor * n_rows * self.config.top_k / self.n_experts)
        return max(1, min(n_rows, c))

    def choose(self, logits_NE: Tensor, keep_E: Tensor | None = None) -> Routing:
        """Each expert in ``keep_E`` (all if None) takes its C best rows; the others take none."""
        probs_NE = torch.softmax(_masked(logits_NE, keep_E), dim=-1)
        rows_CE = probs_NE.topk(self.capacity(probs_NE.shape[0]), dim=0).indices
        chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(0, rows_CE, True)
        if keep_E is not None:
            chosen_NE &= keep_E
        return Routing(probs_NE * chosen_NE, every_expert(probs_NE), probs_NE, logits_NE,
                       mask_NK=chosen_NE)

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        return self.choose(self.jitter(x_ND, generator) @ self.w_DE)


class SigmoidBiasRouter(LinearScores):
    """DeepSeek-V3 (2024) auxiliary-loss-free balancing: scores s = sigmoid(x W); the top K of
    s + b choose the experts (b only steers the choice), weights are s over the chosen,
    renormalised (at K = 1 the score s_i itself, as Switch scales by p_i: renormalising one score
    would give 1.0 and the router no gradient; ``RouterConfig.scale_top1``). No gradient flows
    into b.

    The bias moves once per optimizer step, not per forward (why: with micro-batches, or rows
    spread over processes, a per-forward update follows each piece's local load, not the step's):
    training forwards add their assignments to ``load_counts_E``, and :meth:`step_bias` (or
    :func:`step_load_biases` over a whole model), called once after each optimizer step, applies
    b_e += rate * sign(mean load - load_e) from the counts of every forward since, summed over the
    ranks of a process group, and clears them.

    Example:
        >>> router = RouterConfig(kind="sigmoid", top_k=1, bias_update_rate=0.5).build(2, 2)
        >>> with torch.no_grad():
        ...     _ = router.w_DE.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
        >>> _ = router(torch.ones(3, 2))  # every row chooses expert 0
        >>> router.load_counts_E.tolist(), router.bias_E.tolist()
        ([3, 0], [0.0, 0.0])
        >>> router.step_bias()
        >>> router.load_counts_E.tolist(), router.bias_E.tolist()
        ([0, 0], [-0.5, 0.5])
    """

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_model, n_experts, config, generator=generator)
        self.register_buffer("bias_E", torch.zeros(n_experts))
        # int64: exact at any count, and left alone by model.to(dtype). Not in the state dict:
        # like the gradients accumulated in a step, the counts live within one optimizer step
        # (saved models and checkpoints are taken between steps, where they are zero), and a
        # model folder holds one floating dtype.
        self.register_buffer("load_counts_E", torch.zeros(n_experts, dtype=torch.long),
                             persistent=False)

    def choose(self, logits_NE: Tensor, keep_E: Tensor | None = None) -> Routing:
        """The K best of sigmoid(logits) + bias per row, among the experts in ``keep_E``."""
        self.check_keep(keep_E)
        scores_NE = torch.sigmoid(logits_NE)
        if keep_E is not None:
            scores_NE = scores_NE * keep_E
        choice_NE = _masked(scores_NE.detach() + self.bias_E, keep_E)
        experts_NK = choice_NE.topk(self.top_k, dim=-1).indices
        chosen_NK = scores_NE.gather(-1, experts_NK)
        weights_NK = (chosen_NK / chosen_NK.sum(-1, keepdim=True).clamp_min(1e-30)
                      if self.config.renormalizes else chosen_NK)
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE)

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        routing = self.choose(self.jitter(x_ND, generator) @ self.w_DE)
        if self.training:
            self.accumulate_load(routing.experts_NK)
        return routing

    @torch.no_grad()
    def accumulate_load(self, experts_NK: Tensor) -> None:
        """Add the experts these rows chose to the counts the next :meth:`step_bias` uses."""
        self.load_counts_E += torch.bincount(experts_NK.flatten(), minlength=self.n_experts)

    @torch.no_grad()
    def step_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Move the bias one step toward balance from the counts accumulated since the last call
        (every micro-batch of the step), then clear them.

        Args:
            group: a process group whose ranks' counts are summed first (all_reduce), so every
                rank applies the same update from the global load; every rank of it must call.
                None: this process's counts only.
        """
        counts_E = self.load_counts_E.clone()
        if group is not None:
            dist.all_reduce(counts_E, group=group)
        load_E = counts_E.to(self.bias_E.dtype)
        self.bias_E += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_counts_E.zero_()


    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.load_counts_E.is_meta:  # a model built on the meta device, loaded with assign
            self.load_counts_E = torch.zeros_like(self.load_counts_E, device=self.bias_E.device)

def step_load_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Apply :meth:`SigmoidBiasRouter.step_bias` to every sigmoid router in ``model``: call once
    per optimizer step, after it. Returns how many routers stepped (0 for a model without one,
    so a training loop may call it for any model).

    Example:
        >>> sigmoid, topk = RouterConfig(kind="sigmoid"), RouterConfig(kind="topk")
        >>> step_load_biases(nn.ModuleList([sigmoid.build(4, 2), topk.build(4, 2)]))
        1
    """
    routers = [m for m in model.modules() if isinstance(m, SigmoidBiasRouter)]
    for router in routers:
        router.step_bias(group)
    return len(routers)
