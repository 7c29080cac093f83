"""Gates (routers): they decide how much each expert contributes to each row.

Shape legend: N rows, D input features, E experts, K experts chosen per row.

Every gate returns a :class:`Routing`. The dense softmax gate of Jacobs et al. (1991) is the case
K = E: every expert is "chosen", with weight p_i, so dense and sparse layers share one combine path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int

GATE_KINDS = ("softmax",)


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
    """

    weights_NK: Tensor
    experts_NK: Tensor
    probs_NE: Tensor
    logits_NE: Tensor
    dense: bool = False

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
        >>> routing.probs_NE.sum(-1)
        tensor([1., 1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(self, in_features: int, n_experts: int, *, bias: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = check_int("SoftmaxGate", "in_features", in_features, minimum=1)
        self.n_experts = check_int("SoftmaxGate", "n_experts", n_experts, minimum=1)
        self.w_DE = nn.Parameter(torch.empty(in_features, n_experts))
        self.b_E = nn.Parameter(torch.empty(n_experts)) if bias else None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # nn.Linear's default range, drawn from the caller's generator so runs are reproducible.
        bound = 1.0 / math.sqrt(self.in_features)
        self.w_DE.uniform_(-bound, bound, generator=generator)
        if self.b_E is not None:
            self.b_E.uniform_(-bound, bound, generator=generator)

    def forward(self, x_ND: Tensor) -> Routing:
        logits_NE = x_ND @ self.w_DE
        if self.b_E is not None:
            logits_NE = logits_NE + self.b_E
        probs_NE = torch.softmax(logits_NE, dim=-1)
        experts_NE = torch.arange(self.n_experts, device=x_ND.device).expand(x_ND.shape[0], -1)
        return Routing(weights_NK=probs_NE, experts_NK=experts_NE, probs_NE=probs_NE,
                       logits_NE=logits_NE, dense=True)
