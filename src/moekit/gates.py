"""Gates (routers): they decide how much each expert contributes to each row.

Shape legend: N rows, D input features, E experts, K experts chosen per row.

Every gate returns a :class:`Routing`. The dense softmax gate of Jacobs et al. (1991) is the case
K = E: every expert is "chosen", with weight p_i, so dense and sparse layers share one combine path.
The sparse routers choose K < E experts per row (token choice), or C rows per expert (expert
choice); only the chosen experts are computed (:mod:`moekit.dispatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int

GATE_KINDS = ("softmax",)
ROUTER_KINDS = ("topk", "switch", "expert_choice", "sigmoid")
NOISE_KINDS = ("none", "gaussian", "jitter")


def uniform_fan_in_(tensor: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    """Fill ``tensor`` in place from nn.Linear's default range U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    drawn from the caller's generator so runs are reproducible.

    Example:
        >>> w = torch.empty(4, 3)
        >>> uniform_fan_in_(w, 4, torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= 0.5)
        True
    """
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


def _every_expert(probs_NE: Tensor) -> Tensor:
    """Experts 0..E-1 on every row, (N, E) long: the choices of a gate that uses every expert."""
    n_rows, n_experts = probs_NE.shape
    return torch.arange(n_experts, device=probs_NE.device).expand(n_rows, -1)


@dataclass(frozen=True)
class Routing:
    """What a gate decided for a batch of rows.

    Attributes:
        weights_NK: weight of each chosen expert in the combination (for the dense gate, p_i).
        experts_NK: index of each chosen expert (long); for the dense gate, 0..E-1 on every row.
        probs_NE: the full gate distribution over all experts (rows sum to 1).
        logits_NE: the gate's pre-softmax outputs (the paper's x_j).
        dense: True when every row's k-th choice is expert k (the K = E dense gate), so that a
            combine can use ``weights_NK`` as per-expert weights without gathering.
        mask_NK: where choices vary in number per row (expert choice), True for real choices;
            None when every row has exactly K.
        load_E: a differentiable estimate of the rows each expert receives (noisy top-k's smooth
            load, Shazeer et al. 2017); None where the router has none.
    """

    weights_NK: Tensor
    experts_NK: Tensor
    probs_NE: Tensor
    logits_NE: Tensor
    dense: bool = False
    mask_NK: Tensor | None = None
    load_E: Tensor | None = None

    @classmethod
    def make_dense(cls, logits_NE: Tensor, probs_NE: Tensor) -> Routing:
        """The dense routing of a gate that mixes every expert (K = E): expert k is every row's
        k-th choice, weighted by its probability.

        Example:
            >>> logits = torch.zeros(2, 3)
            >>> Routing.make_dense(logits, torch.softmax(logits, -1)).experts_NK.tolist()
            [[0, 1, 2], [0, 1, 2]]
        """
        return cls(weights_NK=probs_NE, experts_NK=_every_expert(probs_NE), probs_NE=probs_NE,
                   logits_NE=logits_NE, dense=True)

    @property
    def n_experts(self) -> int:
        return self.probs_NE.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts_NK.shape[-1]


@dataclass(frozen=True)
class GateConfig:
    """Which gate to build. ``kind='softmax'`` is the paper's: a linear layer, then a softmax."""

    kind: str = "softmax"
    bias: bool = True

    def __post_init__(self) -> None:
        check_choice("GateConfig", "kind", self.kind, GATE_KINDS)

    def build(self, in_features: int, n_experts: int, *, generator: torch.Generator | None = None
              ) -> SoftmaxGate:
        return SoftmaxGate(in_features, n_experts, bias=self.bias, generator=generator)


class SoftmaxGate(nn.Module):
    """The dense softmax gate of Jacobs et al. (1991): p_j = exp(x_j) / sum_i exp(x_i), x = W x + b.

    Example:
        >>> gate = SoftmaxGate(2, 4, generator=torch.Generator().manual_seed(0))
        >>> routing = gate(torch.zeros(3, 2))
        >>> torch.allclose(routing.probs_NE.sum(-1), torch.ones(3))
        True
    """

    def __init__(self, in_features: int, n_experts: int, *, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = check_int("SoftmaxGate", "in_features", in_features, minimum=1)
        self.n_experts = check_int("SoftmaxGate", "n_experts", n_experts, minimum=1)
        self.w_DE = nn.Parameter(torch.empty(in_features, n_experts))
        self.b_E = nn.Parameter(torch.empty(n_experts)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's default range, drawn from the caller's generator so runs are reproducible.
        uniform_fan_in_(self.w_DE, self.in_features, generator)
        if self.b_E is not None:
            uniform_fan_in_(self.b_E, self.in_features, generator)

    def forward(self, x_ND: Tensor) -> Routing:
        logits_NE = x_ND @ self.w_DE
        if self.b_E is not None:
            logits_NE = logits_NE + self.b_E
        return Routing.make_dense(logits_NE, torch.softmax(logits_NE, dim=-1))


@dataclass(frozen=True)
class RouterConfig:
    """Which sparse router to build.

    Attributes:
        kind: 'topk' (token choice, Shazeer et al. 2017), 'switch' (top-1, Fedus et al. 2021),
            'expert_choice' (each expert takes its top-C rows, Zhou et al. 2022), or 'sigmoid'
            (sigmoid scores, top-k chosen with a load-driven bias, DeepSeek-V3 2024).
        top_k: experts per row (1 for 'switch'; for 'expert_choice' the average per row).
        renormalize: weight the chosen experts by a softmax over their logits (True) or by their
            full softmax probabilities (False).
        noise: 'none', 'gaussian' (noisy top-k with a learned noise scale), or 'jitter'
            (multiplicative input noise, U(1 - eps, 1 + eps)); applied in training mode only.
        jitter_eps: the jitter's half-width.
        capacity_factor: for 'expert_choice', C = capacity_factor * N * top_k / E.
        bias_update_rate: for 'sigmoid', the step of the load-balancing bias per training batch.
    """

    kind: str = "topk"
    top_k: int = 2
    renormalize: bool = True
    noise: str = "none"
    jitter_eps: float = 0.01
    capacity_factor: float = 1.0
    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        check_choice("RouterConfig", "kind", self.kind, ROUTER_KINDS)
        check_int("RouterConfig", "top_k", self.top_k, minimum=1)
        check_choice("RouterConfig", "noise", self.noise, NOISE_KINDS)
        if self.kind == "switch" and self.top_k != 1:
            object.__setattr__(self, "top_k", 1)
        if self.noise == "gaussian" and self.kind not in ("topk", "switch"):
            raise ValueError(f"RouterConfig: noise='gaussian' (noisy top-k) needs kind 'topk' or "
                             f"'switch'; got kind={self.kind!r}. Use noise='jitter' instead.")

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


class _LinearScores(nn.Module):
    """A router's linear projection to one logit per expert (no bias, as in most MoE layers)."""

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_model = check_int(type(self).__name__, "d_model", d_model, minimum=1)
        self.n_experts = check_int(type(self).__name__, "n_experts", n_experts, minimum=1)
        self.config = config
        self.w_DE = nn.Parameter(torch.empty(d_model, n_experts))
        uniform_fan_in_(self.w_DE, d_model, generator)

    def _inputs(self, x_ND: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.training and self.config.noise == "jitter":
            eps = self.config.jitter_eps
            u_ND = torch.rand(x_ND.shape, generator=generator, dtype=x_ND.dtype, device=x_ND.device)
            return x_ND * (1.0 - eps + 2.0 * eps * u_ND)
        return x_ND


class TopKRouter(_LinearScores):
    """Token choice: each row takes its K highest-scoring experts (switch routing is K = 1).

    With ``noise='gaussian'`` (Shazeer et al. 2017): H = x W + eps * softplus(x W_noise), eps ~ N(0, 1)
    from the caller's generator, and ``Routing.load_E`` holds the smooth load estimate
    sum_n P(expert e stays in row n's top K under fresh noise).
    """

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_model, n_experts, config, generator=generator)
        self.top_k = config.top_k
        if config.noise == "gaussian":
            # Zero init: noise starts at softplus(0) = 0.69 and is learned from there.
            self.w_noise_DE = nn.Parameter(torch.zeros(d_model, n_experts))

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        x_ND = self._inputs(x_ND, generator)
        clean_NE = x_ND @ self.w_DE
        logits_NE, load_E = clean_NE, None
        if self.config.noise == "gaussian" and self.training:
            std_NE = nn.functional.softplus(x_ND @ self.w_noise_DE)
            eps_NE = torch.randn(clean_NE.shape, generator=generator, dtype=clean_NE.dtype,
                                 device=clean_NE.device)
            logits_NE = clean_NE + eps_NE * std_NE
            load_E = _smooth_load(clean_NE, logits_NE, std_NE, self.top_k)
        probs_NE = torch.softmax(logits_NE, dim=-1)
        top_logits_NK, experts_NK = logits_NE.topk(self.top_k, dim=-1)
        if self.config.renormalize:
            weights_NK = torch.softmax(top_logits_NK, dim=-1)
        else:
            weights_NK = probs_NE.gather(-1, experts_NK)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE, load_E=load_E)


def _smooth_load(clean_NE: Tensor, noisy_NE: Tensor, std_NE: Tensor, k: int) -> Tensor:
    """Shazeer et al. (2017), Appendix A: P(clean_ne + noise > the k-th best of the other noisy
    logits), summed over rows. The threshold is the k-th noisy logit if e is not in the top k,
    else the (k+1)-th."""
    n_experts = noisy_NE.shape[-1]
    top_NK1 = noisy_NE.topk(min(k + 1, n_experts), dim=-1).values
    kth_N1 = top_NK1[:, k - 1 : k]
    next_N1 = top_NK1[:, k : k + 1] if k < n_experts else torch.full_like(kth_N1, -torch.inf)
    in_top_NE = noisy_NE >= kth_N1
    threshold_NE = torch.where(in_top_NE, next_N1, kth_N1)
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.cdf((clean_NE - threshold_NE) / std_NE).sum(0)


class ExpertChoiceRouter(_LinearScores):
    """Expert choice (Zhou et al. 2022): scores S = softmax_E(x W); each expert takes the C rows with
    its highest scores, C = capacity_factor * N * top_k / E. A row may get any number of experts,
    including none; ``Routing.mask_NK`` marks the real choices (K = E, weight 0 where unchosen)."""

    def capacity(self, n_rows: int) -> int:
        c = int(math.ceil(self.config.capacity_factor * n_rows * self.config.top_k / self.n_experts))
        return max(1, min(n_rows, c))

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        logits_NE = self._inputs(x_ND, generator) @ self.w_DE
        probs_NE = torch.softmax(logits_NE, dim=-1)
        rows_CE = probs_NE.topk(self.capacity(x_ND.shape[0]), dim=0).indices
        chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool)
        chosen_NE.scatter_(0, rows_CE, True)
        weights_NE = probs_NE * chosen_NE
        return Routing(weights_NE, _every_expert(probs_NE), probs_NE, logits_NE, mask_NK=chosen_NE)


class SigmoidBiasRouter(_LinearScores):
    """DeepSeek-V3 (2024) auxiliary-loss-free balancing: scores s = sigmoid(x W); the top K of
    s + b choose the experts (b only steers the choice), weights are s over the chosen, renormalised.
    In training mode every forward moves b by ``bias_update_rate`` toward balance:
    b_e += rate * sign(mean load - load_e). No gradient flows into b."""

    def __init__(self, d_model: int, n_experts: int, config: RouterConfig, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_model, n_experts, config, generator=generator)
        self.top_k = config.top_k
        self.register_buffer("bias_E", torch.zeros(n_experts))

    def forward(self, x_ND: Tensor, *, generator: torch.Generator | None = None) -> Routing:
        logits_NE = self._inputs(x_ND, generator) @ self.w_DE
        scores_NE = torch.sigmoid(logits_NE)
        experts_NK = (scores_NE.detach() + self.bias_E).topk(self.top_k, dim=-1).indices
        chosen_NK = scores_NE.gather(-1, experts_NK)
        weights_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True) if self.config.renormalize \
            else chosen_NK
        if self.training:
            self._update_bias(experts_NK)
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        return Routing(weights_NK, experts_NK, probs_NE, logits_NE)

    @torch.no_grad()
    def _update_bias(self, experts_NK: Tensor) -> None:
        load_E = torch.bincount(experts_NK.flatten(), minlength=self.n_experts).to(self.bias_E.dtype)
        self.bias_E += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
