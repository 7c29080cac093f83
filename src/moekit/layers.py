"""Mixture-of-experts layers: a gate, a bank of experts, and the combine that blends them.

Shape legend: N rows, D input features, O outputs, E experts, K experts chosen per row.

Every layer returns the same typed record, :class:`MoEOutput`, whatever its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit._checks import check_int, check_matrix
from moekit.experts import ExpertConfig, apply_head
from moekit.gates import GateConfig, Routing


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
    """

    output: Tensor
    routing: Routing
    aux_loss: Tensor
    aux_parts: dict[str, Tensor] = field(default_factory=dict)
    expert_outputs: Tensor | None = None
    expert_logits: Tensor | None = None


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
        routing = self.gate(x_ND)
        logits_NEO = self.experts(x_ND)
        outputs_NEO = apply_head(self.head, logits_NEO)
        return MoEOutput(
            output=combine(routing, outputs_NEO),
            routing=routing,
            aux_loss=x_ND.new_zeros(()),
            expert_outputs=outputs_NEO,
            expert_logits=logits_NEO,
        )
