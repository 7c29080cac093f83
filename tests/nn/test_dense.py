"""The dense 1991 mixture: output = sum_i p_i o_i, one record type, clear errors."""

import pytest
import torch

from moekit import ExpertConfig, MixtureOfExperts, MoEOutput
from moekit.nn.dispatch import blend
from moekit.nn.outputs import Routing

F64 = torch.float64


@pytest.mark.parametrize("expert", [ExpertConfig(),
                                    ExpertConfig(kind="mlp", hidden=4, head="softmax"),
                                    ExpertConfig(head="sigmoid")])
def test_output_is_gate_weighted_sum_of_expert_outputs(gen, expert):
    moe = MixtureOfExperts(3, 2, 4, expert=expert, generator=gen).double()
    x = torch.randn(11, 3, generator=gen, dtype=F64)
    out = moe(x)
    assert isinstance(out, MoEOutput)
    p, o = out.routing.probs_NE, out.expert_outputs
    torch.testing.assert_close(p.sum(-1), torch.ones(11, dtype=F64))
    blend_NO = sum(p[:, i, None] * o[:, i, :] for i in range(4))  # the paper's sum_i p_i o_i
    torch.testing.assert_close(out.output, blend_NO)
    assert out.aux_loss.item() == 0.0 and out.aux_parts == {}


def test_softmax_head_blend_is_a_distribution(gen):
    moe = MixtureOfExperts(2, 4, 3, expert=ExpertConfig(head="softmax"), generator=gen)
    out = moe(torch.randn(6, 2, generator=gen))
    torch.testing.assert_close(out.output.sum(-1), torch.ones(6))
    torch.testing.assert_close(torch.softmax(out.expert_logits, -1), out.expert_outputs)


def test_one_expert_is_that_expert(gen):
    moe = MixtureOfExperts(2, 1, 1, generator=gen)
    x = torch.randn(5, 2, generator=gen)
    out = moe(x)
    torch.testing.assert_close(out.output, out.expert_outputs[:, 0])
    torch.testing.assert_close(out.routing.probs_NE, torch.ones(5, 1))


def test_combine_with_a_sparse_routing_worked_example():
    # Row 0 takes experts 2 and 0 with weights 0.75 and 0.25: 0.75*30 + 0.25*10 = 25.
    outputs_NEO = torch.tensor([[[10.0], [20.0], [30.0]]])
    routing = Routing(weights_NK=torch.tensor([[0.75, 0.25]]), experts_NK=torch.tensor([[2, 0]]),
                      probs_NE=torch.tensor([[0.25, 0.0, 0.75]]), logits_NE=torch.zeros(1, 3))
    torch.testing.assert_close(blend(routing, outputs_NEO), torch.tensor([[25.0]]))


def test_config_round_trip(gen):
    moe = MixtureOfExperts(3, 2, 5, expert=ExpertConfig(kind="mlp", hidden=7), generator=gen)
    again = MixtureOfExperts.from_config(moe.config)
    assert again.config == moe.config
    assert [p.shape for p in again.parameters()] == [p.shape for p in moe.parameters()]


def test_wrong_feature_count_names_it(gen):
    moe = MixtureOfExperts(2, 1, 3, generator=gen)
    with pytest.raises(ValueError,
                       match=r"x has 3 features but the model expects 2; got x.shape=\(4, 3\)"):
        moe(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        moe(torch.randn(4))


@pytest.mark.parametrize("n_experts", [0, -2])
def test_n_experts_below_one(n_experts):
    with pytest.raises(ValueError,
                       match=rf"n_experts must be an integer >= 1; got n_experts={n_experts}"):
        MixtureOfExperts(2, 1, n_experts)


def test_check_finite_is_reachable_from_the_layer_and_kept_by_from_config(gen):
    moe = MixtureOfExperts(2, 1, 3, check_finite=False, generator=gen)
    assert moe.config.check_finite is False
    assert MixtureOfExperts.from_config(moe.config).config.check_finite is False
    assert MixtureOfExperts(2, 1, 3).config.check_finite is True
    with pytest.raises(TypeError, match=r"MixtureOfExperts: check_finite must be True or False; "
                                        r"got check_finite=0"):
        MixtureOfExperts(2, 1, 3, check_finite=0)
