"""The paper's dense softmax gate and the Routing record."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.gates import GateConfig, Routing, SoftmaxGate


def test_worked_example():
    # One input feature, two experts: logits = x * w + b = 2 * (1, -1) + (0, 0) = (2, -2)
    # p = softmax(2, -2) = (e^2, e^-2) / (e^2 + e^-2) = (0.98201, 0.01799)
    gate = SoftmaxGate(1, 2, bias=True)
    with torch.no_grad():
        gate.w_DE.copy_(torch.tensor([[1.0, -1.0]]))
        gate.b_E.zero_()
    routing = gate(torch.tensor([[2.0]]))
    torch.testing.assert_close(routing.logits_NE, torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(routing.probs_NE, torch.tensor([[0.98201, 0.01799]]), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 5), e=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_rows_sum_to_one_and_dense_routing_is_k_equals_e(n, d, e, seed):
    gen = torch.Generator().manual_seed(seed)
    gate = SoftmaxGate(d, e, generator=gen)
    routing = gate(10 * torch.randn(n, d, generator=gen))
    assert isinstance(routing, Routing)
    torch.testing.assert_close(routing.probs_NE.sum(-1), torch.ones(n))
    assert routing.top_k == routing.n_experts == e
    assert torch.equal(routing.experts_NK, torch.arange(e).expand(n, e))
    assert torch.equal(routing.weights_NK, routing.probs_NE)


def test_generator_makes_weights_reproducible():
    a = SoftmaxGate(3, 4, generator=torch.Generator().manual_seed(7))
    b = SoftmaxGate(3, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.w_DE, b.w_DE) and torch.equal(a.b_E, b.b_E)


def test_no_bias():
    gate = SoftmaxGate(3, 4, bias=False)
    assert gate.b_E is None and len(list(gate.parameters())) == 1


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match=r"SoftmaxGate: n_experts must be an integer >= 1; got n_experts=0"):
        SoftmaxGate(2, 0)
    with pytest.raises(ValueError, match=r"GateConfig: kind must be one of 'softmax'; got kind='topk'"):
        GateConfig(kind="topk")
