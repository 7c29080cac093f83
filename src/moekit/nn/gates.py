"""The dense softmax gate of Jacobs et al. (1991): every expert, weighted by p_j(x).

Shape legend: N rows, D input features, E experts.

The gate returns a :class:`~moekit.nn.outputs.Routing` in which every expert is "chosen" with weight
p_i (K = E), so dense and routed layers share one combine path. Routed (sparse) gates are in
:mod:`moekit.nn.routers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int
from moekit.nn.init import uniform_fan_in_
from moekit.nn.outputs import Routing

GATE_KINDS = ("softmax",)


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
