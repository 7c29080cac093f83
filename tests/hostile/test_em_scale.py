"""EM is indifferent to the units of a feature (issue 19, item 6).

Multiplying one input feature by c (or adding t to it) is a reparametrisation: the same models
exist, only the weights that read that feature change (W -> W / c, b -> b - W t / c; a Gaussian
gate's means m -> c m + t and covariances S -> C S C, C = diag(c)). So from the equivalent start EM
must reach the same log-likelihood and return a model that computes the same function.

Before fit_em standardised its inputs, every case below failed. Mean log-likelihood short of the
unscaled fit, nats per row (x 1e6 / x 1e-6 / + 1e6): Gaussian experts 0.17 / 0.21 / 0.27, logit
experts 0.15 / 0.04 / 0.18, hierarchical 0.50 / 0.29 / 0.93 (bias-free gates 0.41 / 0.88), all
stopped at max_iter=1000 (the raw fits converge in 113-260 iterations); the localized gate stopped
at iteration 0 with a DivergenceWarning when scaled (1.38 short) and reported 'converged' 0.78
short when shifted; placed on the data, it reported 'converged' 6.9 / 7.0 / 0.91 short.

Tolerance: inside fit_em both runs see the same standardised inputs up to rounding (a few ulp for a
scale; for the shift, x + 1e6 is rounded by up to 6e-11, 5e-11 of the feature's standard
deviation) and stop by the same test, so they agree to ~1e-11 relative (measured: at most 5e-12
nats per row); 1e-6 would still hold if they stopped one iteration apart at tol = 1e-8.
"""

from __future__ import annotations

import copy
import math
from functools import cache
from itertools import pairwise

import pytest
import torch
from torch import nn

from moekit import ExpertConfig, GateConfig, MixtureOfExperts
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig, EMResult
from moekit.nn.gaussian_gate import GaussianGate, GaussianGateParams
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts
from moekit.nn.localized import LocalizedMixtureOfExperts

F64 = torch.float64
FEATURE = 0  # the feature whose units change
# name: (multiplier, shift) applied to FEATURE
TRANSFORMS = {"times_1e6": (1e6, 0.0), "times_1e-6": (1e-6, 0.0), "plus_1e6": (1.0, 1e6)}
REL = 1e-6


def lines(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn from a 2-expert mixture with a smooth gate, so the likelihood has a finite maximum:
    x ~ U(-2, 2)^2, z ~ Bernoulli(sigmoid(1.5 x2)), y = 1 + 2 x1 or -1 - x1, noise sd 0.5."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g, dtype=F64) * 4 - 2
    z = torch.rand(n, 1, generator=g, dtype=F64) < torch.sigmoid(1.5 * x[:, 1:])
    y = torch.where(z, 1 + 2 * x[:, :1], -1 - x[:, :1])
    return x, y + 0.5 * torch.randn(n, 1, generator=g, dtype=F64)


def classes(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes drawn from a 2-expert mixture of logit models with the same smooth gate (no
    subset separable, so the maximum is finite)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g, dtype=F64) * 4 - 2
    z = torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(1.5 * x[:, 1])
    logits = x @ torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.5, -0.5]], dtype=F64)
    probs = torch.softmax(torch.where(z[:, None], logits, -logits), -1)
    return x, torch.multinomial(probs, 1, generator=g).flatten()


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(7)


SOFTMAX = ExpertConfig(head="softmax")
# name: (model builder, data, fit_em's init); every model fit_em supports, with both expert kinds.
CASES = {
    "gaussian_experts": (lambda: MixtureOfExperts(2, 1, 2, generator=_g()), lines, "model"),
    "logit_experts": (lambda: MixtureOfExperts(2, 3, 2, expert=SOFTMAX, generator=_g()), classes,
                      "model"),
    "localized_gate": (lambda: LocalizedMixtureOfExperts(2, 1, 2, generator=_g()), lines,
                       "model"),
    "localized_gate_on_data": (lambda: LocalizedMixtureOfExperts(2, 1, 2, generator=_g()), lines,
                               "data"),
    "localized_diag_logit": (lambda: LocalizedMixtureOfExperts(2, 3, 2, expert=SOFTMAX,
                                                               covariance="diag", generator=_g()),
                             classes, "model"),
    "hierarchical": (lambda: HierarchicalMixtureOfExperts(2, 1, depth=2, branching=2,
                                                          generator=_g()), lines, "model"),
    "hierarchical_no_gate_bias": (
        lambda: HierarchicalMixtureOfExperts(2, 1, depth=2, branching=2,
                                             gate=GateConfig(bias=False), generator=_g()),
        lines, "model"),
}
# A gate without a bias cannot absorb a shift: shifted data is another model class for it.
PAIRS = [(case, t) for case in CASES for t in TRANSFORMS
         if not (case.endswith("no_gate_bias") and TRANSFORMS[t][1] != 0.0)]


def moved(x: torch.Tensor, transform: str) -> torch.Tensor:
    c, t = TRANSFORMS[transform]
    out = x.clone()
    out[:, FEATURE] = out[:, FEATURE] * c + t
    return out


@torch.no_grad()
def equivalent(model: nn.Module, transform: str) -> nn.Module:
    """A copy of ``model`` that computes on moved inputs what ``model`` computes on the raw ones."""
    c, t = TRANSFORMS[transform]
    other = copy.deepcopy(model)
    linear = [(other.experts.w_EDO, other.experts.b_EO)]  # (..., D, O) weights, (..., O) biases
    if isinstance(other.gate, GaussianGate):
        p = other.gate.params()
        means = p.means_ED.clone()
        means[:, FEATURE] = means[:, FEATURE] * c + t
        cov = p.covariances_EDD.clone()
        cov[:, FEATURE, :] *= c
        cov[:, :, FEATURE] *= c
        other.gate.set_params(GaussianGateParams(p.log_shares_E, means, cov))
    elif hasattr(other.gate, "w_DE"):
        linear.append((other.gate.w_DE, other.gate.b_E))
    else:
        linear.append((other.gate.w_GDB, other.gate.b_GB))
    for w, b in linear:
        w_row = w.select(-2, FEATURE)
        if b is not None:
            b.sub_(w_row * (t / c))
        w_row /= c
    return other


@cache  # each fit is shared by the tests below, which only read it
def fitted(case: str, transform: str | None) -> tuple[nn.Module, EMResult, torch.Tensor]:
    build, data, init = CASES[case]
    model = build().double()
    x, y = data()
    if transform is not None:
        model, x = equivalent(model, transform), moved(x, transform)
    result = fit_em(model, x, y, EMConfig(max_iter=1000, tol=1e-8, init=init, progress=False))
    return model, result, x


def reference(case: str) -> tuple[nn.Module, EMResult, torch.Tensor]:
    return fitted(case, None)


def log_jacobian(case: str, transform: str) -> float:
    """How much the joint log-likelihood of the localized gate (a density over x) falls per row
    when the feature is multiplied by c: log |c|. The conditional one does not change."""
    return math.log(TRANSFORMS[transform][0]) if case.startswith("localized") else 0.0


@pytest.mark.parametrize("case, transform", PAIRS)
def test_a_rescaled_feature_reaches_the_same_log_likelihood(case, transform):
    _, ref, _ = reference(case)
    _, got, _ = fitted(case, transform)
    assert ref.converged
    assert got.log_likelihood[0] + log_jacobian(case, transform) == pytest.approx(
        ref.log_likelihood[0], rel=1e-9)  # the same start
    assert got.log_likelihood[-1] + log_jacobian(case, transform) == pytest.approx(
        ref.log_likelihood[-1], rel=REL)
    assert got.history[-1]["conditional_log_likelihood"] == pytest.approx(
        ref.history[-1]["conditional_log_likelihood"], rel=REL)


@pytest.mark.parametrize("case, transform", PAIRS)
def test_the_fit_on_rescaled_inputs_predicts_what_the_raw_fit_predicts(case, transform):
    ref_model, _, x = reference(case)
    model, _, x_moved = fitted(case, transform)
    with torch.no_grad():
        want, got = ref_model(x), model(x_moved)
    torch.testing.assert_close(got.output, want.output, rtol=REL, atol=REL)
    torch.testing.assert_close(got.routing.probs_NE, want.routing.probs_NE, rtol=REL, atol=REL)


@pytest.mark.parametrize("case, transform", PAIRS)
def test_log_likelihood_never_decreases_on_a_rescaled_feature(case, transform):
    _, got, _ = fitted(case, transform)
    ll = got.log_likelihood
    assert all(math.isfinite(v) for v in ll)
    assert all(b >= a for a, b in pairwise(ll)), ll


@pytest.mark.parametrize("case, transform", PAIRS)
def test_em_stops_for_the_same_reason_at_the_same_iteration(case, transform):
    # The stopping test is scale-free: 'converged' where the raw fit converged, not earlier
    # because a step was small in some feature's units.
    _, ref, _ = reference(case)
    _, got, _ = fitted(case, transform)
    assert (got.stop_reason, got.n_iter) == (ref.stop_reason, ref.n_iter)
