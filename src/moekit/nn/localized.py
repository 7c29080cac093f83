"""A flat mixture of experts with the localized (Gaussian) gate of Xu, Jordan & Hinton (1995).

Shape legend: N rows, D input features, O outputs, E experts.

It returns the same :class:`~moekit.nn.outputs.MoEOutput` as
:class:`~moekit.nn.dense.MixtureOfExperts`, so it trains by gradient with ``moekit.fit`` (on the
conditional likelihood) and by EM with :func:`moekit.fitting.em.fit_em` (on the joint likelihood).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit._checks import check_choice, check_int
from moekit.nn.dense import DenseMixture
from moekit.nn.experts import ExpertConfig
from moekit.nn.finite import check_flag
from moekit.nn.gaussian_gate import COVARIANCES, GaussianGate


@dataclass(frozen=True)
class LocalizedMoEConfig:
    """Everything needed to rebuild a :class:`LocalizedMixtureOfExperts`.

    Attributes:
        in_features, out_features, n_experts: D, O, E.
        expert: the experts' :class:`~moekit.nn.experts.ExpertConfig`.
        covariance: the gate's covariances, 'full' or 'diag'.
        check_finite: refuse input rows holding NaN or inf (True, the default): one such row makes
            the loss and every gradient NaN. False skips the check (one reduction and one device
            sync per forward); a bad row then gives a NaN output row and NaN gradients.
    """

    in_features: int
    out_features: int
    n_experts: int
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    covariance: str = "full"
    check_finite: bool = True

    def __post_init__(self) -> None:
        owner = "LocalizedMixtureOfExperts"
        check_int(owner, "in_features", self.in_features, minimum=1)
        check_int(owner, "out_features", self.out_features, minimum=1)
        check_int(owner, "n_experts", self.n_experts, minimum=1)
        check_choice(owner, "covariance", self.covariance, COVARIANCES)
        check_flag(owner, "check_finite", self.check_finite)


class LocalizedMixtureOfExperts(DenseMixture):
    """A flat mixture of experts with the localized Gaussian gate of Xu, Jordan & Hinton (1995).

    Args:
        in_features: D. out_features: O. n_experts: E.
        expert: an :class:`ExpertConfig` (EM needs linear experts; identity or softmax head).
        covariance: the gate's covariances, 'full' or 'diag'.
        check_finite: refuse input rows holding NaN or inf (default True; see
            :class:`LocalizedMoEConfig`).
        generator: the random generator for the initial weights.

    Example:
        >>> moe = LocalizedMixtureOfExperts(2, 1, 3, generator=torch.Generator().manual_seed(0))
        >>> out = moe(torch.randn(5, 2))
        >>> out.output.shape, out.routing.probs_NE.shape
        (torch.Size([5, 1]), torch.Size([5, 3]))
    """

    config_class = LocalizedMoEConfig

    def __init__(self, in_features: int, out_features: int, n_experts: int, *,
                 expert: ExpertConfig | None = None, covariance: str = "full",
                 check_finite: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = LocalizedMoEConfig(in_features, out_features, n_experts,
                                         expert=expert or ExpertConfig(), covariance=covariance,
                                         check_finite=check_finite)
        self.gate = GaussianGate(in_features, n_experts, covariance=covariance, generator=generator)
        self.experts = self.config.expert.build(in_features, out_features, n_experts,
                                                generator=generator)
