"""EM on standardised inputs: :func:`moekit.fitting.em.fit_em` fits on x' = (x - m) / s, one m_d and
s_d per feature, and carries the weights back, so that the fit does not depend on a feature's
units (a feature in metres or in micrometres is the same problem).

Shape legend: N rows, D input features, K stacked maps (experts E or gate nodes G), Q the map's
input rows (D, then one more for the bias if it has one), O the map's outputs, E Gaussian
components.

A linear map of the raw inputs, W^T x + b, is on x' the map W'^T x' + b' with W' = s W (row d
times s_d) and b' = b + m^T W; back, W = W' / s and b = b' - (m / s)^T W'. The localized gate's
Gaussians move with the data: m'_j = (m_j - m) / s, S'_j = S_j / (s s^T); the density of x' is
prod_d s_d times that of x, so a joint log-likelihood on x' is sum_d log s_d per row higher
(:attr:`FeatureScaling.log_jacobian`). A gate without a bias cannot absorb a shift, so then
m = 0 and s is the root mean square of the feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.nn.gaussian_gate import GaussianGateParams


@dataclass(frozen=True)
class FeatureScaling:
    """x' = (x - shift_D) / scale_D; every scale positive (1 for a feature that never varies).

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0]], dtype=torch.float64)
        >>> scaling = FeatureScaling.fit(x, center=True)
        >>> scaling.transform(x).tolist()  # the second feature is constant: it becomes 0
        [[-1.0, 0.0], [1.0, 0.0]]
        >>> w_KQO = torch.tensor([[[2.0], [0.5], [1.0]]], dtype=torch.float64)  # 2 x1 + x2 / 2 + 1
        >>> scaling.weights_in(w_KQO, bias=True).flatten().tolist()  # b' = 1 + 2 * 2 + 10 / 2
        [2.0, 0.5, 10.0]
    """

    shift_D: Tensor
    scale_D: Tensor

    @classmethod
    def fit(cls, x_ND: Tensor, *, center: bool) -> FeatureScaling:
        """The mean and standard deviation of each feature (``center``), or 0 and its root mean
        square. Computed on x divided by a power of two near its largest magnitude, which is exact
        and keeps the squares of finite values finite."""
        x_ND = x_ND.to(torch.float64)
        _, exponent_D = torch.frexp(x_ND.abs().amax(0))
        unit_D = torch.ldexp(torch.ones_like(exponent_D, dtype=x_ND.dtype), exponent_D)
        u_ND = x_ND / unit_D  # |u| <= 1
        mean_D = u_ND.mean(0) if center else torch.zeros_like(unit_D)
        spread_D = (u_ND - mean_D).square().mean(0).sqrt()
        scale_D = torch.where(spread_D > 0, spread_D * unit_D, torch.ones_like(unit_D))
        return cls(mean_D * unit_D, scale_D)

    @property
    def log_jacobian(self) -> float:
        """sum_d log s_d: how much higher a log-density of x' is than the same density of x."""
        return float(self.scale_D.log().sum())

    def transform(self, x_ND: Tensor) -> Tensor:
        return (x_ND.to(self.scale_D.dtype) - self.shift_D) / self.scale_D

    def weights_in(self, w_KQO: Tensor, *, bias: bool) -> Tensor:
        """Maps of x (rows: W, then b if ``bias``) as the same maps of x'."""
        n = len(self.scale_D)
        out_KQO = w_KQO.clone()
        out_KQO[:, :n] = w_KQO[:, :n] * self.scale_D[:, None]
        if bias:
            out_KQO[:, n] = w_KQO[:, n] + torch.einsum("d,kdo->ko", self.shift_D, w_KQO[:, :n])
        return out_KQO

    def weights_out(self, w_KQO: Tensor, *, bias: bool) -> Tensor:
        """Maps of x' (as :meth:`weights_in` returns them) as the same maps of x."""
        n = len(self.scale_D)
        out_KQO = w_KQO.clone()
        out_KQO[:, :n] = w_KQO[:, :n] / self.scale_D[:, None]
        if bias:
            out_KQO[:, n] = w_KQO[:, n] - torch.einsum("d,kdo->ko", self.shift_D / self.scale_D,
                                                       w_KQO[:, :n])
        return out_KQO

    def gaussians_in(self, g: GaussianGateParams) -> GaussianGateParams:
        """The localized gate's components over x, placed over x'."""
        outer_DD = self.scale_D[:, None] * self.scale_D[None, :]
        return GaussianGateParams(g.log_shares_E, (g.means_ED - self.shift_D) / self.scale_D,
                                  g.covariances_EDD / outer_DD)

    def gaussians_out(self, g: GaussianGateParams) -> GaussianGateParams:
        """Components over x' (as :meth:`gaussians_in` returns them), over x."""
        outer_DD = self.scale_D[:, None] * self.scale_D[None, :]
        return GaussianGateParams(g.log_shares_E, g.means_ED * self.scale_D + self.shift_D,
                                  g.covariances_EDD * outer_DD)


def keep_unmoved(new_K: Tensor, start_K: Tensor, raw_new_K: Tensor, raw_start_K: Tensor
                 ) -> Tensor:
    """The maps carried back, except that a map EM never moved (an expert no row weighs on, for
    one) gets its raw start back bit for bit rather than through a round trip of rounding."""
    same_K = (new_K == start_K).flatten(1).all(1)
    return torch.where(same_K.view(-1, *([1] * (new_K.dim() - 1))), raw_start_K, raw_new_K)
