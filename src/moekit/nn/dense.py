"""The dense mixture of experts of Jacobs, Jordan, Nowlan & Hinton (1991), and the base that the
three dense mixtures share (flat here, hierarchical in :mod:`moekit.nn.hierarchical`, localized in
:mod:`moekit.nn.localized`): a gate over every expert, an expert bank, and the blend.

Shape legend: N rows, D input features, O outputs, E experts.

Every layer returns the same typed record, :class:`~moekit.nn.outputs.MoEOutput`, whatever its
options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moekit._checks import check_int, check_matrix
from moekit.nn.dispatch import blend
from moekit.nn.experts import ExpertConfig, apply_head
from moekit.nn.finite import check_finite_rows, check_flag
from moekit.nn.gates import GateConfig
from moekit.nn.outputs import MoEOutput


class DenseMixture(nn.Module):
    """What the dense mixtures share: every expert runs on every row and the gate blends them,
    y = sum_i g_i(x) o_i(x). A subclass builds ``self.config`` (a frozen dataclass whose fields are
    the subclass's constructor arguments, with ``in_features``, an ``expert`` config and
    ``check_finite``), ``self.gate`` (returning a dense Routing) and ``self.experts`` (an expert
    bank).

    ``forward`` refuses rows holding NaN or inf unless the config's ``check_finite`` is False
    (:mod:`moekit.nn.finite`): with the check off such a row's output and the gradients of a loss
    over it are NaN (every other row's output is unchanged: a dense layer mixes no rows).
    """

    config_class: ClassVar[type]
    config: Any
    gate: nn.Module
    experts: nn.Module

    @classmethod
    def from_config(cls, config: Any, *, generator: torch.Generator | None = None) -> DenseMixture:
        """Rebuild the layer from its saved config (new weights, drawn from ``generator``)."""
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(**kwargs, generator=generator)

    @property
    def head(self) -> str:
        return self.config.expert.head

    def forward(self, x_ND: Tensor) -> MoEOutput:
        check_matrix(type(self).__name__, "x", x_ND, n_columns=self.config.in_features)
        if self.config.check_finite:
            check_finite_rows(type(self).__name__, x_ND)
        routing = self.gate(x_ND)
        logits_NEO = self.experts(x_ND)
        outputs_NEO = apply_head(self.head, logits_NEO)
        return MoEOutput(output=blend(routing, outputs_NEO), routing=routing,
                         aux_loss=x_ND.new_zeros(()), expert_outputs=outputs_NEO,
                         expert_logits=logits_NEO)


@dataclass(frozen=True)
class MoEConfig:
    """Everything needed to rebuild a :class:`MixtureOfExperts` (saved with its weights).

    Attributes:
        in_features, out_features, n_experts: D, O, E.
        expert: the experts' :class:`~moekit.nn.experts.ExpertConfig`.
        gate: the gate's :class:`~moekit.nn.gates.GateConfig`.
        check_finite: refuse input rows holding NaN or inf (True, the default): one such row makes
            the loss and every gradient NaN. False skips the check (one reduction and one device
            sync per forward); a bad row then gives a NaN output row and NaN gradients.
    """

    in_features: int
    out_features: int
    n_experts: int
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_int("MixtureOfExperts", "in_features", self.in_features, minimum=1)
        check_int("MixtureOfExperts", "out_features", self.out_features, minimum=1)
        check_int("MixtureOfExperts", "n_experts", self.n_experts, minimum=1)
        check_flag("MixtureOfExperts", "check_finite", self.check_finite)


class MixtureOfExperts(DenseMixture):
    """The dense mixture of experts of Jacobs, Jordan, Nowlan & Hinton (1991).

    A softmax gate gives mixing proportions p_i(x); every expert computes o_i(x); the output is
    sum_i p_i o_i. Train it with the paper's error functions in :mod:`moekit.losses`.

    Args:
        in_features: D, the number of input features (the gate sees the same input as the experts).
        out_features: O, the number of outputs of each expert.
        n_experts: E, the number of experts.
        expert: an :class:`ExpertConfig` (default: linear experts, identity head).
        gate: a :class:`GateConfig` (default: the paper's softmax gate).
        check_finite: refuse input rows holding NaN or inf (default True; see :class:`MoEConfig`).
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
                 check_finite: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = MoEConfig(in_features, out_features, n_experts,
                                expert=expert or ExpertConfig(), gate=gate or GateConfig(),
                                check_finite=check_finite)
        self.gate = self.config.gate.build(in_features, n_experts, generator=generator)
        self.experts = self.config.expert.build(in_features, out_features, n_experts,
                                                generator=generator)
