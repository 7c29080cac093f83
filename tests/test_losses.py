"""The paper's error functions: worked examples, gradcheck, and the paper's gradients."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from moekit.fitting.objective import mixture_loss, resolve_loss_name
from moekit.losses import (
    categorical_mixture_nll,
    competitive_loss,
    cooperative_loss,
    cv_squared,
    importance_load_loss,
    load_balancing_loss,
    mixture_nll,
    responsibilities,
    router_z_loss,
)

F64 = torch.float64


def _random_case(gen, n=5, e=3, o=2):
    logits_NE = torch.randn(n, e, generator=gen, dtype=F64, requires_grad=True)
    outputs_NEO = torch.randn(n, e, o, generator=gen, dtype=F64, requires_grad=True)
    target_NO = torch.randn(n, o, generator=gen, dtype=F64)
    return logits_NE, outputs_NEO, target_NO


# Two experts, equal gates (logits 0, 0 -> p = 0.5, 0.5), outputs o = 0 and 2, target d = 1.
HALF_LOGITS = torch.zeros(1, 2, dtype=F64)
OUTPUTS_0_2 = torch.tensor([[[0.0], [2.0]]], dtype=F64)
TARGET_1 = torch.ones(1, 1, dtype=F64)


def test_cooperative_worked_example():
    # blend = 0.5*0 + 0.5*2 = 1 = d, so E = ||1 - 1||^2 = 0
    assert cooperative_loss(HALF_LOGITS, OUTPUTS_0_2, TARGET_1).item() == 0.0


def test_competitive_worked_example():
    # E = 0.5 * (1-0)^2 + 0.5 * (1-2)^2 = 1
    assert competitive_loss(HALF_LOGITS, OUTPUTS_0_2, TARGET_1).item() == pytest.approx(1.0)


def test_mixture_nll_worked_example():
    # E = -log(0.5 e^{-1/2} + 0.5 e^{-1/2}) = -log(e^{-1/2}) = 0.5
    assert mixture_nll(HALF_LOGITS, OUTPUTS_0_2, TARGET_1).item() == pytest.approx(0.5)
    # variance 2: E = -log(e^{-1/4}) = 0.25
    assert (mixture_nll(HALF_LOGITS, OUTPUTS_0_2, TARGET_1, variance=2.0).item()
            == pytest.approx(0.25))


def test_categorical_worked_example():
    # Expert 0 gives class 1 probability e/(e+1) (logits 0, 1); expert 1 gives it 1/2 (logits 0, 0).
    # E = -log(0.5 * e/(e+1) + 0.5 * 0.5)
    expert_logits_NEC = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=F64)
    expected = -math.log(0.5 * math.e / (math.e + 1) + 0.25)
    got = categorical_mixture_nll(HALF_LOGITS, expert_logits_NEC, torch.tensor([1]))
    assert got.item() == pytest.approx(expected)


def test_reductions(gen):
    logits, outputs, target = _random_case(gen)
    rows = mixture_nll(logits, outputs, target, reduction="none")
    assert rows.shape == (5,)
    assert (mixture_nll(logits, outputs, target, reduction="sum").item()
            == pytest.approx(rows.sum().item()))
    assert mixture_nll(logits, outputs, target).item() == pytest.approx(rows.mean().item())


@pytest.mark.parametrize("loss", [cooperative_loss, competitive_loss, mixture_nll])
def test_gradcheck_squared_error_losses(gen, loss):
    logits, outputs, target = _random_case(gen)
    assert gradcheck(lambda lg, out: loss(lg, out, target), (logits, outputs))


def test_gradcheck_mixture_nll_with_variance(gen):
    logits, outputs, target = _random_case(gen)
    assert gradcheck(lambda lg, out: mixture_nll(lg, out, target, variance=0.3), (logits, outputs))


def test_gradcheck_categorical(gen):
    logits = torch.randn(6, 3, generator=gen, dtype=F64, requires_grad=True)
    expert_logits = torch.randn(6, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    target = torch.randint(0, 4, (6,), generator=gen)
    assert gradcheck(lambda lg, ex: categorical_mixture_nll(lg, ex, target),
                     (logits, expert_logits))


def test_eq3_gradients_are_the_papers(gen):
    logits, outputs, target = _random_case(gen)
    mixture_nll(logits, outputs, target, reduction="sum").backward()
    # h computed independently, straight from the definition (no logsumexp):
    # h_i = p_i exp(-||d - o_i||^2 / 2) / sum_j p_j exp(-||d - o_j||^2 / 2)
    with torch.no_grad():
        p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
        resid = target[:, None, :] - outputs
        unnorm = p * torch.exp(-0.5 * (resid**2).sum(-1))
        h = unnorm / unnorm.sum(-1, keepdim=True)
    torch.testing.assert_close(outputs.grad, -h[..., None] * resid)  # dE/do_i = -h_i (d - o_i)
    torch.testing.assert_close(logits.grad, p - h)  # dE/dx_j = p_j - h_j
    torch.testing.assert_close(responsibilities(logits, outputs, target), h)


def test_eq3_gradient_with_variance_scales_by_one_over_variance(gen):
    logits, outputs, target = _random_case(gen)
    mixture_nll(logits, outputs, target, variance=0.5, reduction="sum").backward()
    h = responsibilities(logits, outputs, target, variance=0.5)
    resid = target[:, None, :] - outputs
    torch.testing.assert_close(outputs.grad, -h[..., None] * resid.detach() / 0.5)


def test_eq2_gradients_are_the_papers(gen):
    logits, outputs, target = _random_case(gen)
    loss = competitive_loss(logits, outputs, target, reduction="sum")
    loss.backward()
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        resid = target[:, None, :] - outputs
        sq = (resid**2).sum(-1)
        per_row_E = (p * sq).sum(-1, keepdim=True)
    # dE/do_i = -2 p_i (d - o_i)
    torch.testing.assert_close(outputs.grad, -2 * p[..., None] * resid)
    torch.testing.assert_close(logits.grad, p * (sq - per_row_E))  # dE/dx_j = p_j (||d-o_j||^2 - E)


def test_eq1_gradient(gen):
    logits, outputs, target = _random_case(gen)
    cooperative_loss(logits, outputs, target, reduction="sum").backward()
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        blend = torch.einsum("ne,neo->no", p, outputs)
    # dE/do_i = -2 p_i (d - sum_j p_j o_j): every expert is pulled toward the blend's error
    torch.testing.assert_close(outputs.grad, -2 * p[..., None] * (target - blend)[:, None, :])


def test_eq3_huge_errors_stay_finite():
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float32, requires_grad=True)
    outputs = torch.tensor([[[1e4], [-1e4]]], dtype=torch.float32, requires_grad=True)
    target = torch.zeros(1, 1)
    loss = mixture_nll(logits, outputs, target)
    loss.backward()
    # Both errors are 1e8; with exp() directly both terms underflow to 0 and log gives inf.
    # Through logsumexp: E = 0.5e8 - log(p_0 + p_1) = 5e7.
    assert torch.isfinite(loss) and loss.item() == pytest.approx(5e7)
    assert torch.isfinite(outputs.grad).all() and torch.isfinite(logits.grad).all()


def test_categorical_extreme_logits_stay_finite():
    logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
    expert_logits = torch.tensor([[[1e4, -1e4], [1e4, -1e4]]], requires_grad=True)
    loss = categorical_mixture_nll(logits, expert_logits, torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(expert_logits.grad).all()


def test_unknown_loss_name_names_the_value():
    with pytest.raises(ValueError, match=r"loss must be one of .*got loss='eq4'"):
        resolve_loss_name("eq4")


def test_aliases():
    assert [resolve_loss_name(n) for n in ("eq1", "eq2", "eq3")] == [
        "cooperative", "competitive", "mixture_nll"]


def test_shape_mismatch_is_reported(gen):
    logits, outputs, target = _random_case(gen)
    with pytest.raises(ValueError, match=r"target must have shape \(5, 2\); got \(4, 2\)"):
        mixture_nll(logits, outputs, target[:4])
    with pytest.raises(ValueError, match=r"expert outputs must be \(N, E, O\)"):
        competitive_loss(logits, outputs[:, :2], target)


def test_bad_variance_and_reduction(gen):
    logits, outputs, target = _random_case(gen)
    with pytest.raises(ValueError, match=r"variance must be a finite number > 0; got variance=0"):
        mixture_nll(logits, outputs, target, variance=0)
    with pytest.raises(ValueError, match=r"reduction must be one of .*got reduction='avg'"):
        mixture_nll(logits, outputs, target, reduction="avg")


def test_mixture_loss_dispatches_on_layer_output(gen):
    from moekit import MixtureOfExperts

    moe = MixtureOfExperts(2, 3, 4, generator=gen).double()
    x = torch.randn(7, 2, generator=gen, dtype=F64)
    y = torch.randn(7, 3, generator=gen, dtype=F64)
    out = moe(x)
    expected = mixture_nll(out.routing.logits_NE, out.expert_outputs, y)
    torch.testing.assert_close(mixture_loss("eq3", out, y), expected)


# --- auxiliary losses of sparse routers ----------------------------------------------------------

def test_load_balancing_worked_examples():
    # Uniform: f_i = 1/E and P_i = 1/E, so E * sum_i f_i P_i = E * E * (1/E)(1/E) = 1.
    probs = torch.full((8, 4), 0.25)
    experts = torch.arange(8).remainder(4).view(8, 1)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0)
    # Collapse on expert 0: f = (1, 0, 0, 0), P = (1, 0, 0, 0), so the loss is E = 4.
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1
    assert (load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item()
            == pytest.approx(4.0))


def test_load_balancing_gradient_flows_through_probabilities(gen):
    logits = torch.randn(6, 3, generator=gen, dtype=F64, requires_grad=True)
    experts = torch.randint(0, 3, (6, 2), generator=gen)
    assert gradcheck(lambda lg: load_balancing_loss(torch.softmax(lg, -1), experts), (logits,))


def test_z_loss_and_cv():
    # logits 0 over E = 4: logsumexp = log 4, z-loss = (log 4)^2
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    # values (0, 2): mean 1, variance 1, CV^2 = 1
    assert cv_squared(torch.tensor([0.0, 2.0])).item() == pytest.approx(1.0)
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # importance (2, 0): CV^2 = 1
    assert importance_load_loss(probs, torch.tensor([1.0, 1.0])).item() == pytest.approx(1.0)
