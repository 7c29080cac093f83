"""The localized (Gaussian) gate of Xu, Jordan & Hinton (1995), and a flat mixture that uses it.

Shape legend: N rows, D input features, O outputs, E experts.

    g_j(x) = a_j N(x | m_j, S_j) / sum_i a_i N(x | m_i, S_i)

Each expert owns a Gaussian region of the input space: a_j is its prior share (a softmax of
``mix_logits_E``), m_j its centre, S_j its covariance, full (stored as a Cholesky factor with a log
diagonal, so any value of the parameters is a valid covariance) or diagonal (a log standard
deviation per feature). The gate is the posterior of a Gaussian mixture over x; the model behind it
is the joint p(x, y) = sum_j a_j N(x | m_j, S_j) P_j(y | x), so EM's gate M-step is analytic, with
no step size: a_j, m_j and S_j are the h-weighted share, mean and covariance
(:func:`moekit.fitting.em_steps.gaussian_gate_m_step`).

:class:`~moekit.nn.localized.LocalizedMixtureOfExperts` is the flat mixture with this gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit._checks import check_choice, check_int, check_matrix
from moekit.losses import LOG_2PI
from moekit.nn.outputs import Routing

COVARIANCES = ("full", "diag")


def gaussian_log_density(x_ND: Tensor, means_ED: Tensor, scale_tril_EDD: Tensor) -> Tensor:
    """log N(x_n | m_e, L_e L_e^T) for every row and component, (N, E).

    ``scale_tril_EDD`` holds lower-triangular Cholesky factors L_e with a positive diagonal.

    Example:
        >>> eye = torch.eye(2).expand(1, 2, 2)
        >>> gaussian_log_density(torch.zeros(1, 2), torch.zeros(1, 2), eye)  # -log(2 pi)
        tensor([[-1.8379]])
    """
    diff_EDN = (x_ND.unsqueeze(0) - means_ED.unsqueeze(1)).transpose(1, 2)
    z_EDN = torch.linalg.solve_triangular(scale_tril_EDD, diff_EDN, upper=False)
    log_det_E = 2.0 * scale_tril_EDD.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    maha_NE = z_EDN.square().sum(1).T
    return -0.5 * (x_ND.shape[1] * LOG_2PI + log_det_E + maha_NE)


@dataclass(frozen=True)
class GaussianGateParams:
    """The gate's parameters in closed form: shares a_E, means m_ED and covariances (E, D, D)."""

    log_shares_E: Tensor
    means_ED: Tensor
    covariances_EDD: Tensor


class GaussianGate(nn.Module):
    """The localized gate of Xu, Jordan & Hinton (1995): g_j(x) = a_j N(x|m_j,S_j) / sum_i (...).

    Returns a dense :class:`~moekit.nn.outputs.Routing` whose ``logits_NE`` are
    log(a_j N(x|m_j,S_j)) (a softmax of them is the gate); :meth:`input_log_density` is log p(x),
    their logsumexp.

    Args:
        in_features: D. n_experts: E.
        covariance: 'full' or 'diag'.
        generator: draws the initial means, N(0, 1) per feature; the covariances start at the
            identity and the shares equal. :meth:`reset_from_data` places them on the data instead.

    Example:
        >>> gate = GaussianGate(2, 3, generator=torch.Generator().manual_seed(0))
        >>> gate(torch.zeros(4, 2)).probs_NE.sum(-1)
        tensor([1., 1., 1., 1.], grad_fn=<SumBackward1>)
    """

    def __init__(self, in_features: int, n_experts: int, *, covariance: str = "full",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = check_int("GaussianGate", "in_features", in_features, minimum=1)
        self.n_experts = check_int("GaussianGate", "n_experts", n_experts, minimum=1)
        self.covariance = check_choice("GaussianGate", "covariance", covariance, COVARIANCES)
        self.mix_logits_E = nn.Parameter(torch.zeros(n_experts))
        self.means_ED = nn.Parameter(torch.empty(n_experts, in_features))
        self.log_diag_ED = nn.Parameter(torch.zeros(n_experts, in_features))
        if covariance == "full":
            self.tril_EDD = nn.Parameter(torch.zeros(n_experts, in_features, in_features))
        with torch.no_grad():
            self.means_ED.normal_(generator=generator)

    def scale_tril(self) -> Tensor:
        """The Cholesky factors L_j of S_j = L_j L_j^T, (E, D, D)."""
        diag_EDD = torch.diag_embed(self.log_diag_ED.exp())
        if self.covariance == "diag":
            return diag_EDD
        return torch.tril(self.tril_EDD, diagonal=-1) + diag_EDD

    def covariances(self) -> Tensor:
        """S_j, (E, D, D)."""
        scale_EDD = self.scale_tril()
        return scale_EDD @ scale_EDD.transpose(1, 2)

    def params(self, dtype: torch.dtype | None = None) -> GaussianGateParams:
        """The current log shares, means and covariances, detached (in ``dtype`` if given)."""
        with torch.no_grad():
            return GaussianGateParams(*(t.to(dtype or t.dtype).clone() for t in (
                torch.log_softmax(self.mix_logits_E, -1), self.means_ED, self.covariances())))

    @torch.no_grad()
    def set_params(self, params: GaussianGateParams) -> None:
        """Set a, m, S (e.g. from an M-step); S is stored through its Cholesky factor."""
        scale_EDD = torch.linalg.cholesky(params.covariances_EDD.to(self.means_ED.dtype))
        self.mix_logits_E.copy_(params.log_shares_E)
        self.means_ED.copy_(params.means_ED)
        self.log_diag_ED.copy_(scale_EDD.diagonal(dim1=-2, dim2=-1).log())
        if self.covariance == "full":
            self.tril_EDD.copy_(torch.tril(scale_EDD, diagonal=-1))

    @torch.no_grad()
    def reset_from_data(self, x_ND: Tensor, generator: torch.Generator | None = None) -> None:
        """Centre the components on E distinct random rows of x, each with the covariance of x (or
        its diagonal), equal shares: the usual start of EM for a Gaussian mixture."""
        check_matrix("GaussianGate", "x", x_ND, n_columns=self.in_features)
        if x_ND.shape[0] == 0:
            raise ValueError("GaussianGate: x has no rows; pass at least one row.")
        # Drawn on the CPU from the caller's generator, so a seed picks the same rows on any device.
        rows = torch.randperm(x_ND.shape[0], generator=generator)[: self.n_experts]
        rows = rows.to(x_ND.device)
        rows = rows.repeat(-(-self.n_experts // rows.numel()))[: self.n_experts]
        centred_ND = x_ND - x_ND.mean(0)
        cov_DD = centred_ND.T @ centred_ND / max(x_ND.shape[0], 1)
        if self.covariance == "diag":
            cov_DD = torch.diag(cov_DD.diagonal())
        scale = float(cov_DD.diagonal().mean()) if cov_DD.numel() else 1.0
        cov_DD = cov_DD + 1e-6 * max(scale, 1e-12) * torch.eye(self.in_features, dtype=x_ND.dtype,
                                                                device=x_ND.device)
        self.set_params(GaussianGateParams(
            torch.full((self.n_experts,), -math.log(self.n_experts), dtype=x_ND.dtype,
                       device=x_ND.device),
            x_ND[rows], cov_DD.expand(self.n_experts, -1, -1)))

    def log_joint(self, x_ND: Tensor) -> Tensor:
        """log(a_j N(x_n | m_j, S_j)), (N, E)."""
        log_shares_E = torch.log_softmax(self.mix_logits_E, dim=-1)
        return log_shares_E + gaussian_log_density(x_ND, self.means_ED, self.scale_tril())

    def input_log_density(self, x_ND: Tensor) -> Tensor:
        """log p(x_n) under the gate's Gaussian mixture, (N,)."""
        return torch.logsumexp(self.log_joint(x_ND), dim=-1)

    def forward(self, x_ND: Tensor) -> Routing:
        logits_NE = self.log_joint(x_ND)
        return Routing.make_dense(logits_NE, torch.softmax(logits_NE, dim=-1))
