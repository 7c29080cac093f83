"""EM (moekit.fitting.em): it recovers known pieces, its log-likelihood never falls, it agrees with
gradient training, and it says clearly what it cannot fit."""

import math
from itertools import pairwise

import pytest
import torch

from moekit import ExpertConfig, GateConfig, MixtureOfExperts, TrainConfig, fit
from moekit.data.synthetic import piecewise_linear
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig
from moekit.losses import mixture_nll
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts
from moekit.nn.localized import LocalizedMixtureOfExperts

F64 = torch.float64
QUIET = {"progress": False}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- data sets ------------------------------------------------------------------------------------

def piecewise_1d(seed, n=300):
    return piecewise_linear(n, breaks=(0.4,), pieces=((2.0, 0.0), (-3.0, 2.0)), noise=0.05,
                            generator=_gen(seed), dtype=F64)


def planes_2d(seed, n=300):
    """y = x1 where x2 > 0, else 1 - 2 x1: a 2-D input, two linear regimes."""
    g = _gen(seed)
    x = torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1
    y = torch.where(x[:, 1:] > 0, x[:, :1], 1 - 2 * x[:, :1])
    return x, y + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)


def blobs(seed, n=240):
    """Three overlapping Gaussian classes in 2-D."""
    g = _gen(seed)
    centres = torch.tensor([[0.0, 0.0], [2.0, 0.5], [0.5, 2.0]], dtype=F64)
    y = torch.arange(n) % 3
    return centres[y] + torch.randn(n, 2, generator=g, dtype=F64), y


def soft_mixture(seed, n=400):
    """Data drawn from a true 2-expert mixture with a smooth gate, so the likelihood has a finite
    maximum: z ~ Bernoulli(sigmoid(1.5 x)); y = 1 + 2x or -1 - x, plus N(0, 0.5^2) noise."""
    g = _gen(seed)
    x = torch.rand(n, 1, generator=g, dtype=F64) * 4 - 2
    z = torch.rand(n, 1, generator=g, dtype=F64) < torch.sigmoid(1.5 * x)
    return x, torch.where(z, 1 + 2 * x, -1 - x) + 0.5 * torch.randn(n, 1, generator=g, dtype=F64)


DATA = {"piecewise_1d": piecewise_1d, "planes_2d": planes_2d, "blobs": blobs}


def build(kind, data, seed):
    x, y = DATA[data](seed)
    classify = not y.is_floating_point()
    d, o = x.shape[1], 3 if classify else 1
    expert = ExpertConfig(head="softmax" if classify else "identity")
    g = _gen(100 + seed)
    if kind == "flat":
        model = MixtureOfExperts(d, o, 3, expert=expert, generator=g)
    elif kind == "hme":
        model = HierarchicalMixtureOfExperts(d, o, depth=2, branching=2, expert=expert, generator=g)
    elif kind == "hme_b3":
        model = HierarchicalMixtureOfExperts(d, o, depth=2, branching=3, expert=expert, generator=g,
                                             gate=GateConfig(bias=False))
    else:
        model = LocalizedMixtureOfExperts(d, o, 3, expert=expert, generator=g,
                                          covariance="diag" if kind == "gaussian_diag" else "full")
    return model.double(), x, y


# --- the worked example of the issue --------------------------------------------------------------

def test_two_experts_recover_the_break_and_the_slopes():
    # y = 2x on [0, 0.4), y = 2 - 3x on [0.4, 1], noise sd 0.05.
    x, y = piecewise_1d(seed=0)
    moe = MixtureOfExperts(1, 1, 2, generator=_gen(1)).double()
    result = fit_em(moe, x, y, EMConfig(**QUIET))
    assert result.converged and result.stop_reason == "converged"
    slopes = sorted(moe.experts.w_EDO.flatten().tolist())
    intercepts = [b for _, b in sorted(zip(moe.experts.w_EDO.flatten().tolist(),
                                           moe.experts.b_EO.flatten().tolist(), strict=True))]
    assert slopes == pytest.approx([-3.0, 2.0], abs=0.1)
    assert intercepts == pytest.approx([2.0, 0.0], abs=0.05)
    # Where the gate's top choice switches: the break at 0.4.
    grid = torch.linspace(0, 1, 2001, dtype=F64).reshape(-1, 1)
    with torch.no_grad():
        winner = moe(grid).routing.probs_NE.argmax(-1)
    switches = grid[1:, 0][winner.diff() != 0]
    assert len(switches) == 1 and abs(switches.item() - 0.4) < 0.02
    # Each expert's learned variance is the noise variance, 0.05^2 = 0.0025.
    assert result.variance_E.tolist() == pytest.approx([0.0025, 0.0025], rel=0.25)


# --- monotone log-likelihood ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind, data", [
    ("flat", "piecewise_1d"), ("flat", "planes_2d"), ("flat", "blobs"),
    ("hme", "piecewise_1d"), ("hme", "planes_2d"), ("hme_b3", "blobs"),
    ("gaussian", "piecewise_1d"), ("gaussian_diag", "planes_2d"), ("gaussian", "blobs"),
])
def test_log_likelihood_never_decreases(kind, data, seed):
    model, x, y = build(kind, data, seed)
    result = fit_em(model, x, y, EMConfig(max_iter=40, tol=1e-10, **QUIET))
    ll = result.log_likelihood
    assert len(ll) == result.n_iter + 1 >= 3
    assert all(math.isfinite(v) for v in ll)
    assert all(b >= a for a, b in pairwise(ll)), ll  # exactly: a fall is never kept
    assert result.stop_reason in ("converged", "max_iter")
    assert ll[-1] > ll[0]


def test_the_written_back_model_has_the_reported_likelihood():
    # The last history entry, recomputed from the model's own forward and the learned variances.
    model, x, y = build("hme", "planes_2d", 0)
    result = fit_em(model, x, y, EMConfig(max_iter=15, **QUIET))
    with torch.no_grad():
        out = model(x)
    var_E = result.variance_E
    log_normal_NE = -0.5 * (torch.log(2 * math.pi * var_E)
                            + (y.unsqueeze(1) - out.expert_outputs).square().sum(-1) / var_E)
    ll = torch.logsumexp(out.routing.probs_NE.log() + log_normal_NE, dim=-1).mean().item()
    assert ll == pytest.approx(result.log_likelihood[-1], rel=1e-10)
    mse = (out.output - y).square().mean().item()
    assert mse == pytest.approx(result.history[-1]["train_mse"], rel=1e-10)


def test_gaussian_gate_log_likelihood_is_the_joint_one_on_the_callers_inputs():
    # EM runs on standardised inputs, where the density of x is sum_d log s_d higher; the history
    # records log p(x, y) on x as given, recomputed here from the written-back gate and experts.
    x, y = planes_2d(seed=0)
    x = x * torch.tensor([1000.0, 0.01], dtype=F64) + torch.tensor([5.0, 0.0], dtype=F64)
    model = LocalizedMixtureOfExperts(2, 1, 2, generator=_gen(1)).double()
    result = fit_em(model, x, y, EMConfig(max_iter=15, **QUIET))
    with torch.no_grad():
        out = model(x)
        var_E = result.variance_E
        log_normal_NE = -0.5 * (torch.log(2 * math.pi * var_E)
                                + (y.unsqueeze(1) - out.expert_outputs).square().sum(-1) / var_E)
        joint = torch.logsumexp(model.gate.log_joint(x) + log_normal_NE, -1).mean().item()
        conditional = torch.logsumexp(out.routing.probs_NE.log() + log_normal_NE, -1).mean().item()
    assert joint == pytest.approx(result.log_likelihood[-1], rel=1e-10)
    assert conditional == pytest.approx(result.history[-1]["conditional_log_likelihood"],
                                        rel=1e-10)


def test_fit_em_leaves_its_inputs_and_the_global_generator_alone():
    x, y = planes_2d(seed=0)
    x_before, y_before, rng_before = x.clone(), y.clone(), torch.get_rng_state()
    fit_em(LocalizedMixtureOfExperts(2, 1, 2, generator=_gen(1)).double(), x, y,
           EMConfig(max_iter=3, **QUIET))  # init='data' places the gate on standardised rows
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_classification_likelihood_from_the_model():
    model, x, y = build("flat", "blobs", 0)
    result = fit_em(model, x, y, EMConfig(max_iter=10, **QUIET))
    with torch.no_grad():
        out = model(x)
    likelihood_N = (out.routing.probs_NE * out.expert_outputs[torch.arange(len(y)), :, y]).sum(-1)
    assert likelihood_N.log().mean().item() == pytest.approx(result.log_likelihood[-1], rel=1e-10)
    assert result.variance_E is None
    assert result.history[-1]["train_accuracy"] > 0.7


# --- EM and gradient descent agree ----------------------------------------------------------------

def test_em_and_gradient_training_reach_the_same_solution():
    # With the variance held at Eq. 3's value, EM and Adam maximise the same likelihood; on data
    # from a smooth-gated mixture the maximum is finite and both get there from the same start.
    x, y = soft_mixture(seed=0)
    variance = 0.25
    by_em = MixtureOfExperts(1, 1, 2, generator=_gen(2)).double()
    by_grad = MixtureOfExperts(1, 1, 2, generator=_gen(2)).double()
    result = fit_em(by_em, x, y, EMConfig(fixed_variance=variance, tol=1e-12, **QUIET))
    fit(by_grad, x, y, TrainConfig(variance=variance, optimizer="adam", lr=0.05, max_epochs=700,
                                   progress=False))
    assert result.converged and result.n_iter < 50
    with torch.no_grad():
        losses = [mixture_nll(m(x).routing.logits_NE, m(x).expert_outputs, y, variance=variance)
                  .item() for m in (by_em, by_grad)]
        grid = torch.linspace(-2, 2, 101, dtype=F64).reshape(-1, 1)
        gap = (by_em(grid).output - by_grad(grid).output).abs().max().item()
    assert losses[0] == pytest.approx(losses[1], rel=1e-7)
    assert gap < 1e-3
    for m in (by_em, by_grad):  # the true lines, 1 + 2x and -1 - x, and the gate's slope 1.5
        lines = sorted(zip(m.experts.w_EDO.flatten().tolist(), m.experts.b_EO.flatten().tolist(),
                           strict=True))
        assert lines == [pytest.approx((-1.0, -1.0), abs=0.2), pytest.approx((2.0, 1.0), abs=0.2)]
    torch.testing.assert_close(by_em.experts.w_EDO, by_grad.experts.w_EDO, atol=1e-4, rtol=0)
    gate_slope = [(m.gate.w_DE[0, 1] - m.gate.w_DE[0, 0]).item() for m in (by_em, by_grad)]
    assert gate_slope[0] == pytest.approx(gate_slope[1], abs=1e-3)


def test_depth_one_tree_is_the_flat_mixture():
    # The same weights in a flat MixtureOfExperts and a depth-1 HME give the same EM history.
    x, y = planes_2d(seed=3)
    flat = MixtureOfExperts(2, 1, 3, generator=_gen(4)).double()
    tree = HierarchicalMixtureOfExperts(2, 1, depth=1, branching=3).double()
    with torch.no_grad():
        tree.gate.w_GDB.copy_(flat.gate.w_DE.unsqueeze(0))
        tree.gate.b_GB.copy_(flat.gate.b_E.unsqueeze(0))
        tree.experts.load_state_dict(flat.experts.state_dict())
    a = fit_em(flat, x, y, EMConfig(max_iter=8, **QUIET))
    b = fit_em(tree, x, y, EMConfig(max_iter=8, **QUIET))
    assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-12)
    assert a.passes == b.passes


# --- bookkeeping ----------------------------------------------------------------------------------

def test_passes_and_sweeps_are_counted():
    # Gaussian experts + softmax gate, one Newton step: per iteration one E-step and at least one
    # trial of the gate's step; sweeps add the normal equations and the gate's Newton system.
    x, y = piecewise_1d(seed=0)
    result = fit_em(MixtureOfExperts(1, 1, 2, generator=_gen(1)).double(), x, y,
                    EMConfig(max_iter=5, **QUIET))
    passes = result.history[:, "passes"]
    assert passes[0] == 1 and all(b - a >= 2 for a, b in pairwise(passes))
    assert result.sweeps == result.passes + 2 * result.n_iter
    # With the Gaussian gate and Gaussian experts every M-step is analytic: one pass per iteration.
    gated = fit_em(LocalizedMixtureOfExperts(1, 1, 2, generator=_gen(1)).double(), x, y,
                   EMConfig(max_iter=5, **QUIET))
    assert gated.history[:, "passes"] == list(range(1, gated.n_iter + 2))


def test_stop_metric_threshold_and_max_iter():
    x, y = piecewise_1d(seed=0)
    model = MixtureOfExperts(1, 1, 2, generator=_gen(1)).double()
    result = fit_em(model, x, y, EMConfig(stop_metric="train_mse", stop_threshold=0.01, **QUIET))
    assert result.stop_reason == "threshold" and not result.converged
    assert result.history[-1]["train_mse"] <= 0.01 < result.history[-2]["train_mse"]
    capped = fit_em(MixtureOfExperts(1, 1, 2, generator=_gen(1)).double(), x, y,
                    EMConfig(max_iter=2, **QUIET))
    assert capped.stop_reason == "max_iter" and capped.n_iter == 2 and len(capped.history) == 3


def test_float32_model_stays_float32():
    x, y = piecewise_1d(seed=0)
    model = MixtureOfExperts(1, 1, 2, generator=_gen(1))
    result = fit_em(model, x.float(), y.float(), EMConfig(max_iter=20, **QUIET))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_mse"] < 0.01


def test_a_dead_expert_keeps_its_weights():
    # An expert the gate never chooses (logit -1000) gets no posterior mass and is left as it was.
    x, y = piecewise_1d(seed=0)
    moe = MixtureOfExperts(1, 1, 3, generator=_gen(1)).double()
    with torch.no_grad():
        moe.gate.w_DE[:, 2] = 0.0
        moe.gate.b_E[2] = -1000.0
    before = moe.experts.w_EDO[2].clone()
    result = fit_em(moe, x, y, EMConfig(max_iter=10, **QUIET))
    assert torch.equal(moe.experts.w_EDO[2], before)
    assert all(math.isfinite(v) for v in result.log_likelihood)


# --- bad input ------------------------------------------------------------------------------------

def test_singular_least_squares_warns_and_fits():
    # The second feature is twice the first: every expert's weighted least squares is singular.
    x1, y = piecewise_1d(seed=0)
    x = torch.cat([x1, 2 * x1], dim=1)
    moe = MixtureOfExperts(2, 1, 2, generator=_gen(1)).double()
    with pytest.warns(RuntimeWarning, match=r"least-squares problem of expert [01] is singular "
                                            r"\(rank 2 < 3 parameters") as caught:
        result = fit_em(moe, x, y, EMConfig(max_iter=30, **QUIET))
    # One warning per expert, not one per iteration.
    singular = [str(w.message) for w in caught if "is singular" in str(w.message)]
    assert sorted(m.split("expert ")[1][0] for m in singular) == ["0", "1"]
    assert all(math.isfinite(v) for v in result.log_likelihood)
    assert all(torch.isfinite(p).all() for p in moe.parameters())
    assert result.history[-1]["train_mse"] < 0.01  # the ridge fit still finds both pieces


def test_non_linear_experts_are_rejected():
    x, y = piecewise_1d(seed=0)
    mlp = MixtureOfExperts(1, 1, 2, expert=ExpertConfig(kind="mlp", hidden=3)).double()
    with pytest.raises(ValueError, match=r"fit_em: EM needs linear experts .* got "
                                         r"experts=MLPExperts, head='identity'"):
        fit_em(mlp, x, y, EMConfig(**QUIET))
    sig = MixtureOfExperts(1, 1, 2, expert=ExpertConfig(head="sigmoid")).double()
    with pytest.raises(ValueError, match=r"head='sigmoid'"):
        fit_em(sig, x, y, EMConfig(**QUIET))


def test_classification_needs_class_indices():
    x, y = blobs(seed=0)
    model = MixtureOfExperts(2, 3, 2, expert=ExpertConfig(head="softmax")).double()
    with pytest.raises(ValueError,
                       match=r"need integer class indices in y; got dtype=torch.float64"):
        fit_em(model, x, y.double(), EMConfig(**QUIET))
    with pytest.raises(ValueError, match=r"class indices in y must lie in \[0, 3\)"):
        fit_em(model, x, y + 1, EMConfig(**QUIET))


def test_bad_data_is_named():
    x, y = piecewise_1d(seed=0)
    model = MixtureOfExperts(1, 1, 2).double()
    with pytest.raises(ValueError, match=r"fit_em: x has 2 features but the model expects 1"):
        fit_em(model, torch.cat([x, x], 1), y, EMConfig(**QUIET))
    with pytest.raises(ValueError, match=r"fit_em: row counts must match; x has 300, y has 10"):
        fit_em(model, x, y[:10], EMConfig(**QUIET))
    x_bad = x.clone()
    x_bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fit_em: x must be finite; got x\[5, 0\]=nan"):
        fit_em(model, x_bad, y, EMConfig(**QUIET))


def test_unknown_gate_is_rejected():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(1, 2)
            self.experts = MixtureOfExperts(1, 1, 2).experts

    with pytest.raises(TypeError, match=r"EM needs a SoftmaxGate, a TreeGate \(hierarchical\) or "
                                        r"a GaussianGate; got gate=Linear"):
        fit_em(Odd(), *piecewise_1d(seed=0), EMConfig(**QUIET))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_iter": 0}, r"EMConfig: max_iter must be an integer >= 1; got max_iter=0"),
    ({"irls_steps": 0}, r"EMConfig: irls_steps must be an integer >= 1; got irls_steps=0"),
    ({"max_halvings": -1}, r"EMConfig: max_halvings must be an integer >= 0"),
    ({"tol": 0.0}, r"EMConfig: tol must be a finite number > 0; got tol=0.0"),
    ({"ridge": -1.0}, r"EMConfig: ridge must be a finite number > 0; got ridge=-1.0"),
    ({"fixed_variance": 0}, r"EMConfig: fixed_variance must be a finite number > 0"),
    ({"stop_metric": "train_mse"}, r"stop_metric and stop_threshold go together"),
    ({"stop_metric": "val_mse", "stop_threshold": 1.0}, r"stop_metric must be one of"),
    ({"init": "random"}, r"EMConfig: init must be one of 'data', 'model'; got init='random'"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMConfig(**kwargs)


def test_log_likelihood_stop_metric_reads_the_recorded_log_likelihood():
    x, y = piecewise_1d(seed=0)
    model = MixtureOfExperts(1, 1, 2, generator=_gen(1)).double()
    result = fit_em(model, x, y, EMConfig(stop_metric="train_log_likelihood",
                                          stop_threshold=-1e9, **QUIET))
    assert result.stop_reason == "threshold" and result.n_iter == 1
    high = fit_em(MixtureOfExperts(1, 1, 2, generator=_gen(1)).double(), x, y,
                  EMConfig(stop_metric="train_log_likelihood", stop_threshold=1e9, max_iter=3,
                           **QUIET))
    assert high.stop_reason in ("max_iter", "converged")


def test_accuracy_stop_metric_needs_class_indices_and_is_checked_first():
    x, y = piecewise_1d(seed=0)
    model = LocalizedMixtureOfExperts(1, 1, 2, generator=_gen(1)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"fit_em: stop_metric='train_accuracy' needs class-index "
                                         r"targets; .*stop_metric='train_mse'"):
        fit_em(model, x, y, EMConfig(stop_metric="train_accuracy", stop_threshold=0.9, **QUIET))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # With class indices it is recorded and can stop the fit.
    xb, yb = blobs(seed=0)
    clf = MixtureOfExperts(2, 3, 2, expert=ExpertConfig(head="softmax"),
                           generator=_gen(1)).double()
    result = fit_em(clf, xb, yb, EMConfig(stop_metric="train_accuracy", stop_threshold=0.0,
                                          **QUIET))
    assert result.stop_reason == "threshold" and result.n_iter == 1


@pytest.mark.parametrize("build", [
    lambda: MixtureOfExperts(1, 1, 2).double(),
    lambda: LocalizedMixtureOfExperts(1, 1, 2).double(),
])
def test_zero_rows_are_rejected(build):
    with pytest.raises(ValueError, match=r"fit_em: x has no rows; pass at least one row\."):
        fit_em(build(), torch.zeros(0, 1, dtype=F64), torch.zeros(0, 1, dtype=F64),
               EMConfig(**QUIET))
