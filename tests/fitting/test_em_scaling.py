"""EM's standardised inputs (moekit.fitting.em_scaling): the statistics, and weights carried to the
standardised inputs and back computing the same function."""

import math

import pytest
import torch

from moekit.fitting.em_scaling import FeatureScaling, keep_unmoved
from moekit.nn.gaussian_gate import GaussianGateParams, gaussian_log_density

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def features(n=50):
    """Four features in very different units, one of them constant."""
    x = torch.randn(n, 4, generator=_gen(0), dtype=F64)
    return x * torch.tensor([1e6, 1.0, 1e-6, 0.0], dtype=F64) + torch.tensor([0, -3, 5e-6, 7],
                                                                            dtype=F64)


def test_centred_statistics_are_the_mean_and_standard_deviation():
    x = features()
    scaling = FeatureScaling.fit(x, center=True)
    torch.testing.assert_close(scaling.shift_D, x.mean(0), rtol=1e-14, atol=0)
    # the constant feature has no spread: scale 1, and it becomes 0
    want = torch.cat([x.std(0, unbiased=False)[:3], torch.ones(1, dtype=F64)])
    torch.testing.assert_close(scaling.scale_D, want, rtol=1e-14, atol=0)
    x_std = scaling.transform(x)
    torch.testing.assert_close(x_std.mean(0), torch.zeros(4, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(x_std.std(0, unbiased=False), torch.tensor([1, 1, 1, 0.0],
                                                                         dtype=F64))


def test_uncentred_statistics_are_zero_and_the_root_mean_square():
    # [3, 4]: rms sqrt((9 + 16) / 2); an all-zero feature keeps scale 1
    x = torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=F64)
    scaling = FeatureScaling.fit(x, center=False)
    assert scaling.shift_D.tolist() == [0.0, 0.0]
    assert scaling.scale_D.tolist() == pytest.approx([math.sqrt(12.5), 1.0], rel=1e-15)


def test_huge_finite_features_do_not_overflow():
    # 1e300 squared is inf; the statistics are taken on x / 2^k instead
    x = torch.tensor([[1e300], [-1e300], [3e300]], dtype=F64)
    scaling = FeatureScaling.fit(x, center=True)
    assert scaling.shift_D.item() == pytest.approx(1e300, rel=1e-14)
    assert scaling.scale_D.item() == pytest.approx(math.sqrt(8 / 3) * 1e300, rel=1e-14)
    assert torch.isfinite(scaling.transform(x)).all()


@pytest.mark.parametrize("center, bias", [(True, True), (False, True), (False, False)])
def test_maps_carried_in_compute_the_same_function(center, bias):
    x = features()
    scaling = FeatureScaling.fit(x, center=center)
    w_KQO = torch.randn(3, 4 + bias, 2, generator=_gen(1), dtype=F64)

    def apply(w, inputs):  # (K, Q, O) maps on (N, D) inputs -> (N, K, O)
        out = torch.einsum("nd,kdo->nko", inputs, w[:, :4])
        return out + w[:, 4] if bias else out

    w_in = scaling.weights_in(w_KQO, bias=bias)
    torch.testing.assert_close(apply(w_in, scaling.transform(x)), apply(w_KQO, x),
                               rtol=1e-9, atol=1e-9)
    # back: the bias is b' - (m / s)^T W', a difference of terms as large as |b'|
    torch.testing.assert_close(scaling.weights_out(w_in, bias=bias), w_KQO, rtol=1e-14,
                               atol=1e-14 * w_in.abs().max().item())


def test_gaussians_carried_in_give_the_density_of_the_standardised_inputs():
    # log N(x' | m', S') = log N(x | m, S) + sum_d log s_d: x' is x divided by s
    x = features()[:, :3]  # without the constant feature, whose variance no Gaussian can fit
    scaling = FeatureScaling.fit(x, center=True)
    a = torch.randn(2, 3, 3, generator=_gen(2), dtype=F64)
    spread = torch.tensor([1e6, 1.0, 1e-6], dtype=F64)
    cov = (a @ a.transpose(1, 2) + torch.eye(3, dtype=F64)) * spread[:, None] * spread[None, :]
    g = GaussianGateParams(torch.log(torch.tensor([0.3, 0.7], dtype=F64)), x[:2].clone(), cov)

    def log_density(params, inputs):
        return gaussian_log_density(inputs, params.means_ED,
                                    torch.linalg.cholesky(params.covariances_EDD))

    moved = scaling.gaussians_in(g)
    torch.testing.assert_close(log_density(moved, scaling.transform(x)),
                               log_density(g, x) + scaling.log_jacobian, rtol=1e-10, atol=1e-8)
    back = scaling.gaussians_out(moved)
    torch.testing.assert_close(back.means_ED, g.means_ED, rtol=1e-14, atol=0)
    torch.testing.assert_close(back.covariances_EDD, g.covariances_EDD, rtol=1e-14, atol=0)
    assert back.log_shares_E is g.log_shares_E


def test_a_map_that_did_not_move_gets_its_raw_start_back():
    start = torch.tensor([[[1.0]], [[2.0]]], dtype=F64)
    new = torch.tensor([[[1.0]], [[5.0]]], dtype=F64)  # map 0 unmoved
    raw_start = torch.tensor([[[0.1]], [[0.2]]], dtype=F64)
    raw_new = torch.tensor([[[0.1000000000000001]], [[0.5]]], dtype=F64)
    assert keep_unmoved(new, start, raw_new, raw_start).flatten().tolist() == [0.1, 0.5]
