"""Hierarchical mixtures of experts: the output is the path-product mixture, gradients are right, it
trains by gradient with the flat layer's losses, and bad trees are refused."""

import itertools

import pytest
import torch

from moekit import ExpertConfig, GateConfig, MixtureOfExperts, MoEOutput, TrainConfig, fit
from moekit import io as moekit_io
from moekit.fitting.objective import mixture_loss
from moekit.losses import mixture_nll
from moekit.nn.hierarchical import HierarchicalMixtureOfExperts, HMEConfig
from moekit.nn.tree_gate import TreeGate, level_slice, n_gate_nodes, node_posteriors, path_log_probs

F64 = torch.float64


def reference_forward(hme, x):
    """The slow, obvious HME: for each leaf, walk its path from the root multiplying the gate
    probabilities, each node's softmax computed on its own; then sum_e pi_e o_e."""
    depth, branching = hme.config.depth, hme.config.branching
    w, b = hme.gate.w_GDB, hme.gate.b_GB
    outputs = hme.experts(x)  # linear experts: pre-head = output for the identity head
    total = torch.zeros(x.shape[0], hme.config.out_features, dtype=x.dtype)
    probs = []
    for e, digits in enumerate(itertools.product(range(branching), repeat=depth)):
        assert e == sum(d * branching ** (depth - 1 - i) for i, d in enumerate(digits))
        pi = torch.ones(x.shape[0], dtype=x.dtype)
        node_in_level = 0
        for level, digit in enumerate(digits):
            node = n_gate_nodes(level, branching) + node_in_level if level else 0
            logits = x @ w[node] + (b[node] if b is not None else 0)
            pi = pi * torch.softmax(logits, dim=-1)[:, digit]
            node_in_level = node_in_level * branching + digit
        probs.append(pi)
        total = total + pi[:, None] * outputs[:, e]
    return total, torch.stack(probs, dim=1)


@pytest.mark.parametrize("depth, branching, bias", [(1, 3, True), (2, 2, True), (2, 3, False),
                                                    (3, 2, True)])
def test_forward_is_the_path_product_mixture(gen, depth, branching, bias):
    hme = HierarchicalMixtureOfExperts(3, 2, depth, branching, gate=GateConfig(bias=bias),
                                       generator=gen).double()
    x = torch.randn(7, 3, generator=gen, dtype=F64)
    out = hme(x)
    assert isinstance(out, MoEOutput)
    n_experts = branching**depth
    assert out.routing.probs_NE.shape == (7, n_experts) and out.routing.dense
    assert out.expert_outputs.shape == (7, n_experts, 2)
    torch.testing.assert_close(out.routing.probs_NE.sum(-1), torch.ones(7, dtype=F64))
    want_output, want_probs = reference_forward(hme, x)
    torch.testing.assert_close(out.output, want_output)
    torch.testing.assert_close(out.routing.probs_NE, want_probs)
    # The logits are the log path probabilities: a softmax gives them back (the losses rely on it).
    torch.testing.assert_close(torch.softmax(out.routing.logits_NE, -1), want_probs)


def test_gradients_match_the_reference(gen):
    hme = HierarchicalMixtureOfExperts(2, 1, 2, 3, generator=gen).double()
    x = torch.randn(9, 2, generator=gen, dtype=F64)
    y = torch.randn(9, 1, generator=gen, dtype=F64)
    params = list(hme.parameters())
    out = hme(x)
    fast = torch.autograd.grad(mixture_nll(out.routing.logits_NE, out.expert_outputs, y), params)
    # Eq. 3 from the reference: -mean log sum_e pi_e exp(-||y - o_e||^2 / 2).
    _, probs = reference_forward(hme, x)
    sq = (y.unsqueeze(1) - hme.experts(x)).square().sum(-1)
    slow_loss = -torch.log((probs * torch.exp(-sq / 2)).sum(-1)).mean()
    slow = torch.autograd.grad(slow_loss, params)
    for gf, gs in zip(fast, slow, strict=True):
        torch.testing.assert_close(gf, gs)


def test_gradcheck_in_float64(gen):
    hme = HierarchicalMixtureOfExperts(2, 2, 2, 2, expert=ExpertConfig(head="softmax"),
                                       generator=gen).double()
    x = torch.randn(5, 2, generator=gen, dtype=F64, requires_grad=True)
    w, b = hme.gate.w_GDB, hme.gate.b_GB

    def blended(x_in, w_in, b_in):  # the layer's computation, as a function of x and the gates
        node = torch.log_softmax(torch.einsum("nd,gdb->ngb", x_in, w_in) + b_in, -1)
        pi = path_log_probs(node, 2, 2).exp()
        return torch.einsum("ne,neo->no", pi, torch.softmax(hme.experts(x_in), -1))

    inputs = (x, w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(blended, inputs)
    # And the layer itself, with respect to its input.
    assert torch.autograd.gradcheck(lambda x_in: hme(x_in).output, (x,))


def test_depth_one_is_the_flat_mixture(gen):
    flat = MixtureOfExperts(3, 2, 4, generator=gen).double()
    tree = HierarchicalMixtureOfExperts(3, 2, depth=1, branching=4).double()
    with torch.no_grad():
        tree.gate.w_GDB.copy_(flat.gate.w_DE.unsqueeze(0))
        tree.gate.b_GB.copy_(flat.gate.b_E.unsqueeze(0))
        tree.experts.load_state_dict(flat.experts.state_dict())
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(tree(x).output, flat(x).output)
    torch.testing.assert_close(tree(x).routing.probs_NE, flat(x).routing.probs_NE)


def test_node_posteriors_worked_example():
    # Leaves 0..3 with posteriors 0.1, 0.2, 0.3, 0.4 (depth 2, B = 2): the root's children hold
    # 0.1 + 0.2 = 0.3 and 0.3 + 0.4 = 0.7; node 1's children 0.1, 0.2; node 2's 0.3, 0.4.
    h = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=F64)
    want = torch.tensor([[[0.3, 0.7], [0.1, 0.2], [0.3, 0.4]]], dtype=F64)
    torch.testing.assert_close(node_posteriors(h, 2, 2), want)


def test_node_posteriors_are_consistent(gen):
    # Each node's children sum to the mass its parent sends it; the root's sum to 1.
    h = torch.softmax(torch.randn(5, 27, generator=gen, dtype=F64), -1)
    t = node_posteriors(h, 3, 3)
    assert t.shape == (5, 13, 3)
    torch.testing.assert_close(t[:, 0].sum(-1), torch.ones(5, dtype=F64))
    for level in (1, 2):
        parents = t[:, level_slice(level - 1, 3)].reshape(5, -1)
        torch.testing.assert_close(t[:, level_slice(level, 3)].sum(-1), parents)


def test_node_probs_are_per_node_distributions(gen):
    hme = HierarchicalMixtureOfExperts(2, 1, 3, 2, generator=gen)
    probs = hme.node_probs(torch.randn(4, 2, generator=gen))
    assert probs.shape == (4, 7, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 7))
    assert [level_slice(level, 2) for level in range(3)] == [slice(0, 1), slice(1, 3), slice(3, 7)]


def test_trains_by_gradient_with_the_flat_losses(gen):
    # Two regimes in 2-D; the tree learns them with moekit.fit on Eq. 3, unchanged.
    x = torch.rand(200, 2, generator=gen, dtype=F64) * 2 - 1
    y = torch.where(x[:, 1:] > 0, x[:, :1], 1 - 2 * x[:, :1])
    hme = HierarchicalMixtureOfExperts(2, 1, 2, 2, generator=gen).double()
    with torch.no_grad():
        start = mixture_loss("eq3", hme(x), y, variance=0.1).item()
    result = fit(hme, x, y, TrainConfig(optimizer="adam", lr=0.05, max_epochs=150, variance=0.1,
                                        progress=False))
    assert result.history[-1]["train_loss"] < start - 0.5
    # The best single plane by least squares has mse 0.87 on this data; the tree gets 10x below.
    design = torch.cat([x, torch.ones(200, 1, dtype=F64)], 1)
    plane_mse = (design @ torch.linalg.lstsq(design, y).solution - y).square().mean().item()
    assert result.history[-1]["train_mse"] < plane_mse / 10


def test_classification_with_softmax_leaves(gen):
    hme = HierarchicalMixtureOfExperts(2, 3, 2, 2, expert=ExpertConfig(head="softmax"),
                                       generator=gen)
    out = hme(torch.randn(4, 2, generator=gen))
    torch.testing.assert_close(out.output.sum(-1), torch.ones(4))
    loss = mixture_loss("categorical_nll", out, torch.tensor([0, 1, 2, 0]))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_config_round_trip_and_save_load(tmp_path, gen):
    hme = HierarchicalMixtureOfExperts(3, 2, 2, 3, expert=ExpertConfig(head="softmax"),
                                       gate=GateConfig(bias=False), generator=gen)
    again = HierarchicalMixtureOfExperts.from_config(hme.config)
    assert again.config == hme.config and hme.config.n_experts == 9 and hme.config.n_gates == 4
    assert [p.shape for p in again.parameters()] == [p.shape for p in hme.parameters()]
    loaded = moekit_io.load_model(moekit_io.save_model(hme, tmp_path / "hme"))
    x = torch.randn(5, 3, generator=gen)
    assert loaded.config == hme.config
    assert torch.equal(loaded(x).output, hme(x).output)


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one(depth):
    with pytest.raises(ValueError, match=rf"HierarchicalMixtureOfExperts: depth must be an integer "
                                         rf">= 1; got depth={depth}\."):
        HierarchicalMixtureOfExperts(2, 1, depth=depth, branching=2)


@pytest.mark.parametrize("branching", [1, 0])
def test_branching_below_two(branching):
    with pytest.raises(ValueError, match=rf"HierarchicalMixtureOfExperts: branching must be an "
                                         rf"integer >= 2; got branching={branching}\."):
        HierarchicalMixtureOfExperts(2, 1, depth=2, branching=branching)


def test_other_bad_input(gen):
    with pytest.raises(ValueError, match=r"depth must be an integer >= 1; got depth=1.5"):
        HMEConfig(2, 1, depth=1.5)
    with pytest.raises(ValueError, match=r"branching\*\*depth \(the number of experts\) must be at "
                                         r"most 65536; got branching=4, depth=9"):
        HierarchicalMixtureOfExperts(2, 1, depth=9, branching=4)
    with pytest.raises(ValueError, match=r"TreeGate: branching must be an integer >= 2"):
        TreeGate(2, depth=1, branching=1)
    hme = HierarchicalMixtureOfExperts(2, 1, generator=gen)
    with pytest.raises(ValueError, match=r"x has 3 features but the model expects 2"):
        hme(torch.randn(4, 3))
