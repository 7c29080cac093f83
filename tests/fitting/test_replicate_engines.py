"""The rows-last fast path equals the vmap reference (losses, metrics and gradients in float64), and
its chunked gradients equal autograd's through its own errors bit for bit."""

import pytest
import torch

from moekit import ExpertConfig, GateConfig, MixtureOfExperts
from moekit.fitting import replicate_engines
from moekit.fitting.objective import prepare_targets
from moekit.fitting.replicate_engines import StackedMixtureEngine, VmapEngine, supports_stacked
from moekit.threads import compute_threads

F64 = torch.float64
EXPERTS = [ExpertConfig(head="softmax"), ExpertConfig(), ExpertConfig(head="sigmoid"),
           ExpertConfig(kind="mlp", hidden=4, activation="tanh", head="softmax"),
           ExpertConfig(kind="mlp", hidden=3, activation="relu", head="identity")]
DEFAULT_GATE = GateConfig()


def _engines(gen, expert, loss, metric, gate=DEFAULT_GATE, n_runs=3, n_rows=17):
    models = [MixtureOfExperts(3, 4, 5, expert=expert, gate=gate,
                               generator=torch.Generator().manual_seed(s)).double()
              for s in range(n_runs)]
    x = torch.randn(n_rows, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (n_rows,), generator=gen)
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


def _autograd_of_errors(engine, params):
    work = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss_R, metric_R = engine.errors(work, torch.arange(len(next(iter(params.values())))))
    grads = torch.autograd.grad(loss_R.sum(), list(work.values()))
    return loss_R.detach(), metric_R.detach(), dict(zip(work, grads, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("expert", EXPERTS, ids=lambda e: f"{e.kind}-{e.head}")
@pytest.mark.parametrize("loss", ["cooperative", "competitive", "mixture_nll", "categorical_nll"])
def test_fast_path_gives_autograds_gradients_bit_for_bit(gen, expert, loss, dtype, monkeypatch):
    """errors_and_grads runs the runs in chunks (nominally 3 runs of 5 experts x 4 outputs x 32
    rows; at least 16 rows in the gate's product with x, so 4 runs: 13 runs make chunks of 5, 4
    and 4): the same numbers as autograd through errors, whose products with x run on the whole
    batch, to the last bit, in float32 too. The conditions: one thread (on two, torch may split a
    small sum of a chunk otherwise than the batch's), and rows in whole vectors of the CPU (32
    here, 400 in the vowel task: an elementwise kernel computes the last numbers of a tensor that
    does not fill its vectors by a scalar formula, which may round them otherwise)."""
    monkeypatch.setattr(replicate_engines, "CHUNKED_BATCH", 0)
    monkeypatch.setattr(replicate_engines, "CHUNK_ELEMENTS", 3 * 5 * 4 * 32)
    fast, _ = _engines(gen, expert, loss, "sse", n_runs=13, n_rows=32)
    fast = _cast(fast, dtype)
    with compute_threads(1):
        assert fast.chunk_runs(13) == 3
        assert fast.chunks(13) == [slice(0, 5), slice(5, 9), slice(9, 13)]
        want = _autograd_of_errors(fast, fast.params)
        loss_R, metric_R, grads = fast.errors_and_grads(fast.params, torch.arange(13))
    assert torch.equal(loss_R, want[0]) and torch.equal(metric_R, want[1])
    assert grads.keys() == want[2].keys()
    for name, grad in grads.items():
        assert torch.equal(grad, want[2][name]), name


@pytest.mark.parametrize("n_inputs", [2, 3, 5])
@pytest.mark.parametrize("n_rows", [32, 400])
def test_a_products_rows_do_not_depend_on_the_other_rows_from_min_product_rows(gen, n_inputs,
                                                                                n_rows):
    """What chunking the products with x rests on (float32, one thread): from MIN_PRODUCT_ROWS
    rows up, rows of a product (w @ x, and grad @ x^T) are the same numbers as in a larger one."""
    x = torch.randn(n_inputs, n_rows, generator=gen)
    w = torch.randn(700, n_inputs, generator=gen)
    grad = torch.randn(700, n_rows, generator=gen)
    with compute_threads(1):
        w_x, grad_x = w.mm(x), grad.mm(x.t())
        for rows in range(replicate_engines.MIN_PRODUCT_ROWS, 70):
            part = slice(9, 9 + rows)
            assert torch.equal(w[part].mm(x), w_x[part]), rows
            assert torch.equal(grad[part].mm(x.t()), grad_x[part]), rows


def test_chunks_are_nearly_equal_and_keep_min_product_rows(gen, monkeypatch):
    monkeypatch.setattr(replicate_engines, "CHUNKED_BATCH", 0)
    fast, _ = _engines(gen, ExpertConfig(), "mixture_nll", "mse")  # 5 experts: 4 runs at least
    per_run = 5 * 4 * 17
    with compute_threads(1):
        monkeypatch.setattr(replicate_engines, "CHUNK_ELEMENTS", 10 * per_run)
        assert [p.stop - p.start for p in fast.chunks(32)] == [8, 8, 8, 8]
        assert [p.stop - p.start for p in fast.chunks(21)] == [7, 7, 7]
        monkeypatch.setattr(replicate_engines, "CHUNK_ELEMENTS", per_run)  # nominally 1 run
        assert [p.stop - p.start for p in fast.chunks(9)] == [5, 4]
        assert fast.chunks(3) == [slice(0, 3)]  # too few runs to split: whole


def _cast(engine, dtype):
    engine.x_DN, engine.target_ON = engine.x_DN.to(dtype), engine.target_ON.to(dtype)
    engine.params = {k: v.to(dtype) for k, v in engine.params.items()}
    return engine


def test_small_batches_run_whole_and_large_ones_in_chunks_on_one_thread(gen):
    fast, _ = _engines(gen, ExpertConfig(), "mixture_nll", "mse")
    per_run = 5 * 4 * 17  # E x O x N numbers per run in each (R, E, O, N) tensor
    big = replicate_engines.CHUNKED_BATCH // per_run + 1
    with compute_threads(1):
        assert fast.chunk_runs(3) == 3
        assert fast.chunk_runs(big) == replicate_engines.CHUNK_ELEMENTS // per_run
    with compute_threads(2):  # where chunks could round otherwise: whole
        assert fast.chunk_runs(big) == big


def test_reference_engine_gives_autograds_gradients(gen):
    _, reference = _engines(gen, EXPERTS[3], "mixture_nll", "mse")
    want = _autograd_of_errors(reference, reference.params)
    loss_R, metric_R, grads = reference.errors_and_grads(reference.params, torch.arange(3))
    torch.testing.assert_close(loss_R, want[0], rtol=0, atol=0)
    torch.testing.assert_close(metric_R, want[1], rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[2][name], rtol=0, atol=0)


@pytest.mark.parametrize("expert", EXPERTS, ids=lambda e: f"{e.kind}-{e.head}")
@pytest.mark.parametrize("loss", ["cooperative", "competitive", "mixture_nll"])
def test_on_two_threads_the_whole_batch_gives_autograds_numbers(gen, expert, loss):
    """Callers on two threads (vowels-sweep) get the numbers autograd gave them before."""
    fast, _ = _engines(gen, expert, loss, "mse", n_runs=7)
    fast = _cast(fast, torch.float32)
    with compute_threads(2):
        want = _autograd_of_errors(fast, fast.params)
        loss_R, metric_R, grads = fast.errors_and_grads(fast.params, torch.arange(7))
    assert torch.equal(loss_R, want[0]) and torch.equal(metric_R, want[1])
    assert all(torch.equal(grads[k], want[2][k]) for k in grads)
