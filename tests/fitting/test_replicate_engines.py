"""The rows-last fast path equals the vmap reference: losses, metrics and gradients in float64."""

import pytest
import torch

from moekit import ExpertConfig, GateConfig, MixtureOfExperts
from moekit.fitting.objective import prepare_targets
from moekit.fitting.replicate_engines import StackedMixtureEngine, VmapEngine, supports_stacked

F64 = torch.float64
EXPERTS = [ExpertConfig(head="softmax"), ExpertConfig(), ExpertConfig(head="sigmoid"),
           ExpertConfig(kind="mlp", hidden=4, activation="tanh", head="softmax"),
           ExpertConfig(kind="mlp", hidden=3, activation="relu", head="identity")]
DEFAULT_GATE = GateConfig()


def _engines(gen, expert, loss, metric, gate=DEFAULT_GATE, n_runs=3):
    models = [MixtureOfExperts(3, 4, 5, expert=expert, gate=gate,
                               generator=torch.Generator().manual_seed(s)).double()
              for s in range(n_runs)]
    x = torch.randn(17, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (17,), generator=gen)
    targets = prepare_targets("test", "y", y, out_features=4, loss=loss, dtype=F64)
    args = (models, x, targets, loss, 0.7, metric)
    return StackedMixtureEngine(*args), VmapEngine(*args)


def _errors_and_grads(engine):
    work = {k: v.detach().clone().requires_grad_(True) for k, v in engine.params.items()}
    loss_R, metric_R = engine.errors(work, torch.arange(3))
    grads = torch.autograd.grad(loss_R.sum(), list(work.values()))
    grad_states = [engine.module_state(dict(zip(work, grads, strict=True)), r) for r in range(3)]
    return loss_R.detach(), metric_R.detach(), grad_states


@pytest.mark.parametrize("expert", EXPERTS, ids=lambda e: f"{e.kind}-{e.head}")
@pytest.mark.parametrize("loss", ["cooperative", "competitive", "mixture_nll", "categorical_nll"])
def test_stacked_equals_vmap_reference(gen, expert, loss):
    fast, reference = _engines(gen, expert, loss, "mse")
    loss_f, metric_f, grads_f = _errors_and_grads(fast)
    loss_r, metric_r, grads_r = _errors_and_grads(reference)
    torch.testing.assert_close(loss_f, loss_r)
    torch.testing.assert_close(metric_f, metric_r)
    for state_f, state_r in zip(grads_f, grads_r, strict=True):
        assert state_f.keys() == state_r.keys()
        for name in state_r:
            torch.testing.assert_close(state_f[name], state_r[name], msg=name)


def test_sse_metric_and_gate_without_bias(gen):
    fast, reference = _engines(gen, ExpertConfig(), "mixture_nll", "sse",
                               gate=GateConfig(bias=False))
    torch.testing.assert_close(_errors_and_grads(fast)[1], _errors_and_grads(reference)[1])


def test_layout_round_trip(gen):
    fast, _ = _engines(gen, EXPERTS[3], "mixture_nll", "mse")
    model = MixtureOfExperts(3, 4, 5, expert=EXPERTS[3],
                             generator=torch.Generator().manual_seed(1)).double()
    state = fast.module_state(fast.params, 1)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_supports_only_alike_dense_mixtures():
    a = MixtureOfExperts(2, 1, 3)
    assert supports_stacked([a, MixtureOfExperts(2, 1, 3)])
    assert not supports_stacked([a, MixtureOfExperts(2, 1, 4)])
    with pytest.raises(TypeError, match="same config"):
        StackedMixtureEngine([a, MixtureOfExperts(2, 1, 4)], None, None, "eq3", 1.0, "mse")
