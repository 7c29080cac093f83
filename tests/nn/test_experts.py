"""Expert banks: the batched computation equals a loop over experts (the slow reference)."""

import pytest
import torch

from moekit.nn.experts import ACTIVATIONS, ExpertConfig, LinearExperts, MLPExperts, apply_head

F64 = torch.float64


def reference_linear(bank, x_ND):
    """Slow, obviously correct: one expert at a time."""
    return torch.stack([x_ND @ bank.w_EDO[e] + bank.b_EO[e] for e in range(bank.n_experts)], dim=1)


def reference_mlp(bank, x_ND):
    act = ACTIVATIONS[bank.activation]
    outs = [act(x_ND @ bank.w1_EDH[e] + bank.b1_EH[e]) @ bank.w2_EHO[e] + bank.b2_EO[e]
            for e in range(bank.n_experts)]
    return torch.stack(outs, dim=1)


def _compare_with_reference(bank, reference, gen):
    bank = bank.double()
    x = torch.randn(9, bank.in_features, generator=gen, dtype=F64)
    fast, slow = bank(x), reference(bank, x)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), list(bank.parameters()))
    grads_slow = torch.autograd.grad((slow * weights).sum(), list(bank.parameters()))
    for gf, gs in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(gf, gs)


def test_linear_matches_loop(gen):
    _compare_with_reference(LinearExperts(3, 4, 5, generator=gen), reference_linear, gen)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_matches_loop(gen, activation):
    bank = MLPExperts(3, 2, 4, hidden=6, activation=activation, generator=gen)
    _compare_with_reference(bank, reference_mlp, gen)


def test_linear_worked_example():
    # Two experts on x = (1, 2): expert 0 = x1 + x2 + 0.5 = 3.5; expert 1 = 2*x1 - x2 - 1 = -1
    bank = LinearExperts(2, 1, 2)
    with torch.no_grad():
        bank.w_EDO.copy_(torch.tensor([[[1.0], [1.0]], [[2.0], [-1.0]]]))
        bank.b_EO.copy_(torch.tensor([[0.5], [-1.0]]))
    torch.testing.assert_close(bank(torch.tensor([[1.0, 2.0]])), torch.tensor([[[3.5], [-1.0]]]))


def test_heads():
    logits = torch.tensor([[[0.0, 1.0, -1.0]]])
    assert torch.equal(apply_head("identity", logits), logits)
    torch.testing.assert_close(apply_head("sigmoid", logits), torch.sigmoid(logits))
    torch.testing.assert_close(apply_head("softmax", logits).sum(-1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="head must be one of"):
        apply_head("tanh", logits)


def test_config_builds_the_right_bank():
    assert isinstance(ExpertConfig().build(2, 1, 3), LinearExperts)
    mlp = ExpertConfig(kind="mlp", hidden=5, activation="relu", head="softmax").build(2, 3, 4)
    assert isinstance(mlp, MLPExperts) and mlp.w1_EDH.shape == (4, 2, 5) and mlp.head == "softmax"


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "conv"},
     r"ExpertConfig: kind must be one of 'linear', 'mlp', 'glu'; got kind='conv'"),
    ({"hidden": 0}, r"ExpertConfig: hidden must be an integer >= 1; got hidden=0"),
    ({"activation": "swish"}, r"ExpertConfig: activation must be one of .*got activation='swish'"),
    ({"head": "tanh"}, r"ExpertConfig: head must be one of .*got head='tanh'"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertConfig(**kwargs)


def test_bad_bank_sizes():
    with pytest.raises(ValueError,
                       match=r"LinearExperts: n_experts must be an integer >= 1; got n_experts=0"):
        LinearExperts(2, 1, 0)
