"""The localized Gaussian gate (Xu, Jordan & Hinton 1995): the gate formula against an independent
computation, its analytic M-step, and the flat mixture that uses it, by gradient and by EM."""

import math
from itertools import pairwise

import pytest
import torch

from moekit import ExpertConfig, TrainConfig, fit
from moekit import io as moekit_io
from moekit.data.synthetic import piecewise_linear
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig
from moekit.fitting.em_steps import gaussian_gate_m_step
from moekit.nn.gaussian_gate import GaussianGate, GaussianGateParams, gaussian_log_density
from moekit.nn.localized import LocalizedMixtureOfExperts, LocalizedMoEConfig

F64 = torch.float64


def random_params(gen, n_experts=3, d=2):
    a = torch.randn(n_experts, d, d, generator=gen, dtype=F64)
    cov = a @ a.transpose(1, 2) + 0.5 * torch.eye(d, dtype=F64)
    shares = torch.softmax(torch.randn(n_experts, generator=gen, dtype=F64), -1)
    return GaussianGateParams(shares.log(), torch.randn(n_experts, d, generator=gen, dtype=F64),
                              cov)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gate_is_the_normalised_weighted_density(gen, covariance):
    gate = GaussianGate(2, 3, covariance=covariance).double()
    params = random_params(gen)
    if covariance == "diag":
        params = GaussianGateParams(
            params.log_shares_E, params.means_ED,
            torch.diag_embed(params.covariances_EDD.diagonal(dim1=1, dim2=2)))
    gate.set_params(params)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    # Independently: torch.distributions' multivariate normal, a_j N(x|m_j,S_j) / sum_i (...).
    weighted = torch.stack([
        params.log_shares_E[j].exp() * torch.distributions.MultivariateNormal(
            params.means_ED[j], params.covariances_EDD[j]).log_prob(x).exp() for j in range(3)], 1)
    routing = gate(x)
    torch.testing.assert_close(routing.probs_NE, weighted / weighted.sum(1, keepdim=True))
    torch.testing.assert_close(gate.input_log_density(x), weighted.sum(1).log())
    assert routing.dense and routing.weights_NK is routing.probs_NE
    torch.testing.assert_close(gate.covariances(), params.covariances_EDD)
    back = gate.params()
    torch.testing.assert_close(back.log_shares_E, params.log_shares_E)
    torch.testing.assert_close(back.means_ED, params.means_ED)


def test_log_density_worked_example():
    # N(x = (1, 0) | 0, diag(4, 1)): -log(2 pi) - log(2) - (1/4) / 2.
    value = gaussian_log_density(torch.tensor([[1.0, 0.0]], dtype=F64),
                                 torch.zeros(1, 2, dtype=F64),
                                 torch.diag(torch.tensor([2.0, 1.0], dtype=F64)).unsqueeze(0))
    assert value.item() == pytest.approx(-math.log(2 * math.pi) - math.log(2) - 0.125)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gradcheck_in_float64(gen, covariance):
    gate = GaussianGate(2, 3, covariance=covariance, generator=gen).double()
    gate.set_params(random_params(gen))
    x = torch.randn(5, 2, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_in: gate(x_in).probs_NE, (x,))
    probe = torch.randn(5, 3, generator=gen, dtype=F64)
    params = list(gate.parameters())
    grads = torch.autograd.grad((gate(x).probs_NE * probe).sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_m_step_worked_example():
    # Component 0 takes x = 0 and 2 (mean 1, variance 1), component 1 takes x = 10 alone (variance
    # 0, clipped to the floor); shares 2/3 and 1/3.
    x = torch.tensor([[0.0], [2.0], [10.0]], dtype=F64)
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    old = GaussianGateParams(torch.zeros(2, dtype=F64), torch.zeros(2, 1, dtype=F64),
                             torch.ones(2, 1, 1, dtype=F64))
    new = gaussian_gate_m_step(x, h, old, floor=1e-3)
    torch.testing.assert_close(new.log_shares_E.exp(), torch.tensor([2 / 3, 1 / 3], dtype=F64))
    torch.testing.assert_close(new.means_ED.flatten(), torch.tensor([1.0, 10.0], dtype=F64))
    torch.testing.assert_close(new.covariances_EDD.flatten(), torch.tensor([1.0, 1e-3], dtype=F64))


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_m_step_maximises_the_expected_log_likelihood(gen, covariance):
    # Q(a, m, S) = sum_n sum_j h_nj log(a_j N(x_n | m_j, S_j)): the M-step's answer beats any nudge.
    x = torch.randn(50, 2, generator=gen, dtype=F64) * torch.tensor([1.0, 3.0], dtype=F64)
    h = torch.softmax(torch.randn(50, 3, generator=gen, dtype=F64) * 2, -1)
    new = gaussian_gate_m_step(x, h, random_params(gen), covariance=covariance)

    def q(p):
        scale = torch.linalg.cholesky(p.covariances_EDD)
        return (h * (p.log_shares_E + gaussian_log_density(x, p.means_ED, scale))).sum().item()

    best = q(new)
    for _ in range(20):
        cov_noise = 0.05 * torch.randn(3, 2, 2, generator=gen, dtype=F64)
        cov_noise = cov_noise @ cov_noise.transpose(1, 2)
        if covariance == "diag":
            cov_noise = torch.diag_embed(cov_noise.diagonal(dim1=1, dim2=2))
        nudged = GaussianGateParams(
            torch.log_softmax(new.log_shares_E
                              + 0.05 * torch.randn(3, generator=gen, dtype=F64), -1),
            new.means_ED + 0.05 * torch.randn(3, 2, generator=gen, dtype=F64),
            new.covariances_EDD + cov_noise)
        assert q(nudged) <= best
    if covariance == "diag":
        off_diagonal = new.covariances_EDD - torch.diag_embed(new.covariances_EDD.diagonal(0, 1, 2))
        assert off_diagonal.abs().max() == 0


def test_m_step_clips_eigenvalues_and_keeps_an_empty_component(gen):
    # Points on a line have a singular covariance: its zero eigenvalue is raised to the floor. A
    # component with no posterior mass keeps its old mean and covariance.
    x = torch.linspace(-1, 1, 20, dtype=F64).unsqueeze(1) * torch.tensor([[1.0, 2.0]], dtype=F64)
    h = torch.stack([torch.ones(20, dtype=F64), torch.zeros(20, dtype=F64)], 1)
    old = random_params(gen, n_experts=2)
    new = gaussian_gate_m_step(x, h, old, floor=0.01)
    eigenvalues = torch.linalg.eigvalsh(new.covariances_EDD[0])
    assert eigenvalues[0].item() == pytest.approx(0.01) and eigenvalues[1].item() > 1
    torch.testing.assert_close(new.means_ED[1], old.means_ED[1])
    torch.testing.assert_close(new.covariances_EDD[1], old.covariances_EDD[1])
    assert torch.isfinite(new.log_shares_E).all()


def test_reset_from_data_places_the_components_on_rows(gen):
    gate = GaussianGate(2, 4).double()
    x = torch.randn(30, 2, generator=gen, dtype=F64) + 5
    gate.reset_from_data(x, torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(m) in rows for m in gate.means_ED.tolist())
    assert len({tuple(m) for m in gate.means_ED.tolist()}) == 4
    torch.testing.assert_close(gate.params().log_shares_E.exp(), torch.full((4,), 0.25, dtype=F64))


def test_reset_from_data_rejects_zero_rows():
    gate = GaussianGate(2, 3).double()
    with pytest.raises(ValueError, match=r"GaussianGate: x has no rows; pass at least one row\."):
        gate.reset_from_data(torch.zeros(0, 2, dtype=F64))


def test_mixture_output_is_gate_weighted_experts(gen):
    moe = LocalizedMixtureOfExperts(2, 3, 4, expert=ExpertConfig(head="softmax"), generator=gen)
    out = moe(torch.randn(5, 2, generator=gen))
    torch.testing.assert_close(out.output, torch.einsum("ne,neo->no", out.routing.probs_NE,
                                                        out.expert_outputs))
    torch.testing.assert_close(out.output.sum(-1), torch.ones(5))


def test_trains_by_gradient(gen):
    x, y = piecewise_linear(200, generator=gen, dtype=F64)
    moe = LocalizedMixtureOfExperts(1, 1, 2, generator=gen).double()
    moe.gate.reset_from_data(x, gen)
    result = fit(moe, x, y, TrainConfig(optimizer="adam", lr=0.05, max_epochs=200, variance=0.05,
                                        progress=False))
    assert result.history[-1]["train_mse"] < result.history[0]["train_mse"] / 5


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_fits_the_pieces_with_analytic_steps(covariance):
    # EM with Gaussian experts and the Gaussian gate: every M-step in closed form, one pass each.
    x, y = piecewise_linear(300, breaks=(0.4,), pieces=((2.0, 0.0), (-3.0, 2.0)), noise=0.05,
                            generator=torch.Generator().manual_seed(0), dtype=F64)
    moe = LocalizedMixtureOfExperts(1, 1, 2, covariance=covariance,
                                    generator=torch.Generator().manual_seed(1)).double()
    result = fit_em(moe, x, y, EMConfig(progress=False))
    ll = result.log_likelihood
    assert result.converged and all(b >= a for a, b in pairwise(ll))
    assert result.passes == result.n_iter + 1
    slopes = sorted(moe.experts.w_EDO.flatten().tolist())
    assert slopes == pytest.approx([-3.0, 2.0], abs=0.15)
    # EM's objective is the joint log p(x, y) = log p(x) + log p(y | x); the conditional one is
    # recorded beside it, and the difference is the gate's density of x.
    cond = result.history[:, "conditional_log_likelihood"]
    assert cond[-1] > cond[0]
    with torch.no_grad():
        log_px = moe.gate.input_log_density(x).mean().item()
    assert ll[-1] - cond[-1] == pytest.approx(log_px, rel=1e-9)


def test_save_and_load(tmp_path, gen):
    moe = LocalizedMixtureOfExperts(2, 1, 3, covariance="diag", generator=gen)
    loaded = moekit_io.load_model(moekit_io.save_model(moe, tmp_path / "m"))
    x = torch.randn(4, 2, generator=gen)
    assert loaded.config == moe.config
    assert torch.equal(loaded(x).output, moe(x).output)


def test_bad_input():
    with pytest.raises(ValueError, match=r"GaussianGate: covariance must be one of 'full', 'diag'; "
                                         r"got covariance='spherical'"):
        GaussianGate(2, 3, covariance="spherical")
    with pytest.raises(ValueError, match=r"LocalizedMixtureOfExperts: n_experts must be an integer "
                                         r">= 1; got n_experts=0"):
        LocalizedMoEConfig(2, 1, 0)
    with pytest.raises(ValueError, match=r"LocalizedMixtureOfExperts: x has 1 features but the "
                                         r"model expects 2"):
        LocalizedMixtureOfExperts(2, 1, 3)(torch.randn(4, 1))
