"""The fitting loop: it learns the pieces, stops when told, is reproducible, and rejects bad
data."""

import math

import pytest
import torch

from moekit import Callback, ExpertConfig, MixtureOfExperts, TrainConfig, fit
from moekit.data.synthetic import piecewise_linear

F64 = torch.float64
BREAK = 0.4
PIECES = ((2.0, 0.0), (-3.0, 2.0))  # y = 2x on [0, 0.4); y = 2 - 3x on [0.4, 1]


def _piecewise(seed, n=400):
    return piecewise_linear(n, breaks=(BREAK,), pieces=PIECES, noise=0.05,
                            generator=torch.Generator().manual_seed(seed), dtype=F64)


def _switch_points(moe, grid_N1):
    """Where the gate's top choice changes along a 1-D grid."""
    winner = moe(grid_N1).routing.probs_NE.argmax(-1)
    return grid_N1[1:, 0][winner.diff() != 0]


def test_two_linear_experts_fit_both_pieces():
    x, y = _piecewise(seed=0)
    x_test, y_test = _piecewise(seed=1)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(1)).double()
    result = fit(moe, x, y, TrainConfig(optimizer="adam", lr=0.05, max_epochs=500, variance=0.1,
                                        progress=False))
    assert result.stop_reason == "max_epochs" and result.epochs == 500

    grid = torch.linspace(0, 1, 2001, dtype=F64).reshape(-1, 1)
    with torch.no_grad():
        switches = _switch_points(moe, grid)
        test_mse = (moe(x_test).output - y_test).square().mean().item()
    assert len(switches) == 1 and abs(switches.item() - BREAK) < 0.05

    # The best single line, by least squares on the same training data.
    design = torch.cat([x, torch.ones_like(x)], dim=1)
    coef = torch.linalg.lstsq(design, y).solution
    line_mse = ((torch.cat([x_test, torch.ones_like(x_test)], 1) @ coef - y_test)
                .square().mean().item())
    # Noise variance is 0.05^2 = 0.0025; a line cannot follow the bend (its error is ~0.3).
    assert test_mse < 0.01 and test_mse < line_mse / 20

    slopes = sorted(moe.experts.w_EDO.flatten().tolist())
    assert slopes == pytest.approx([-3.0, 2.0], abs=0.25)


def _fit_once(**overrides):
    x, y = _piecewise(seed=3, n=120)
    moe = MixtureOfExperts(1, 1, 3, generator=torch.Generator().manual_seed(5)).double()
    config = TrainConfig(**{"max_epochs": 15, "batch_size": 32, "lr": 0.1, "progress": False,
                            "seed": 11, **overrides})
    return moe, fit(moe, x, y, config)


def test_same_seed_same_result():
    moe_a, result_a = _fit_once()
    moe_b, result_b = _fit_once()
    assert result_a.history.to_list() == result_b.history.to_list()
    for pa, pb in zip(moe_a.parameters(), moe_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    _, result_c = _fit_once(seed=12)  # another shuffle order gives another path
    assert result_c.history[:, "train_loss"] != result_a.history[:, "train_loss"]


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.5), ("adam", 0.05), ("lbfgs", 1.0)])
def test_each_optimizer_lowers_the_loss(optimizer, lr):
    x, y = _piecewise(seed=2, n=200)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    first = fit(moe, x, y, TrainConfig(optimizer=optimizer, lr=lr, max_epochs=1, progress=False))
    later = fit(moe, x, y, TrainConfig(optimizer=optimizer, lr=lr, max_epochs=40, progress=False))
    assert later.history[-1]["train_loss"] < 0.8 * first.history[0]["train_loss"]


def test_threshold_stop_on_the_papers_metric():
    x, y = _piecewise(seed=4, n=200)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    config = TrainConfig(optimizer="adam", lr=0.05, max_epochs=2000, stop_metric="train_sse",
                         stop_threshold=0.05, progress=False)
    result = fit(moe, x, y, config)
    sse = result.history[:, "train_sse"]
    assert result.stop_reason == "threshold" and result.reached_threshold
    # stopped at the first epoch under it
    assert sse[-1] <= 0.05 and all(v > 0.05 for v in sse[:-1])
    assert result.epochs == len(sse) < 2000


def test_max_epochs_is_reported():
    _, result = _fit_once(stop_metric="train_sse", stop_threshold=1e-9)
    assert result.stop_reason == "max_epochs" and not result.reached_threshold


def test_patience_stop_and_validation_metrics():
    x, y = _piecewise(seed=6, n=100)
    x_val, y_val = _piecewise(seed=7, n=50)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    config = TrainConfig(optimizer="sgd", lr=1e-9, max_epochs=100, patience=3, min_delta=1e-3,
                         monitor="val_loss", progress=False)
    result = fit(moe, x, y, config, x_val=x_val, y_val=y_val)
    # With a step this small nothing improves by 1e-3: epoch 1 sets the best, 2-4 fail, stop at 4.
    assert result.stop_reason == "patience" and result.epochs == 4
    assert "val_sse" in result.history[-1]


def test_callbacks_see_every_epoch_and_can_stop():
    class StopAtThree(Callback):
        def __init__(self):
            self.calls = []

        def on_train_begin(self, state):
            self.calls.append("begin")

        def on_epoch_end(self, state):
            self.calls.append(state.epoch)
            state.stop = state.epoch == 3

        def on_train_end(self, state):
            self.calls.append("end")

    callback = StopAtThree()
    x, y = _piecewise(seed=8, n=50)
    moe = MixtureOfExperts(1, 1, 2).double()
    result = fit(moe, x, y, TrainConfig(max_epochs=10, progress=False), callbacks=[callback])
    assert callback.calls == ["begin", 1, 2, 3, "end"] and result.stop_reason == "callback"


def test_classification_with_categorical_loss_reports_accuracy(gen):
    # Two well separated blobs, class = sign of the first feature.
    x = torch.randn(200, 2, generator=gen, dtype=F64)
    y = (x[:, 0] > 0).long()
    moe = MixtureOfExperts(2, 2, 2, expert=ExpertConfig(head="softmax"), generator=gen).double()
    result = fit(moe, x, y, TrainConfig(loss="categorical_nll", optimizer="adam", lr=0.1,
                                        max_epochs=100, stop_metric="train_accuracy",
                                        stop_threshold=0.97, progress=False))
    assert result.stop_reason == "threshold" and result.history[-1]["train_accuracy"] >= 0.97


def test_squared_error_losses_take_class_indices_as_one_hot(gen):
    x = torch.randn(30, 2, generator=gen, dtype=F64)
    y = (x[:, 0] > 0).long()
    moe = MixtureOfExperts(2, 2, 2, expert=ExpertConfig(head="softmax"), generator=gen).double()
    result = fit(moe, x, y, TrainConfig(loss="eq3", max_epochs=2, progress=False))
    assert {"train_sse", "train_mse", "train_accuracy"} <= set(result.history[-1])


def test_divergence_stops_with_a_warning():
    x, y = _piecewise(seed=9, n=50)
    y = y * 1e3
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    with pytest.warns(RuntimeWarning, match=r"training loss became .* Lower lr"):
        result = fit(moe, x, y, TrainConfig(loss="eq2", lr=10.0, max_epochs=200, progress=False))
    assert result.stop_reason == "diverged" and not math.isfinite(result.history[-1]["train_loss"])


def test_resume_continues_exactly(tmp_path):
    checkpoint = str(tmp_path / "run.ckpt")
    _, straight = _fit_once(max_epochs=20)
    _moe, _ = _fit_once(max_epochs=10, checkpoint_path=checkpoint, checkpoint_every=5)
    x, y = _piecewise(seed=3, n=120)
    fresh = MixtureOfExperts(1, 1, 3, generator=torch.Generator().manual_seed(99)).double()
    resumed = fit(fresh, x, y, TrainConfig(max_epochs=20, batch_size=32, lr=0.1, progress=False,
                                           seed=11, checkpoint_path=checkpoint), resume=True)
    assert resumed.history.to_list() == straight.history.to_list()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temporary files


def test_momentum_is_sgds_heavy_ball():
    # with momentum 0.5 the second step is the gradient step plus half the first step
    plain, _ = _fit_once(max_epochs=1, batch_size=None)
    heavy, _ = _fit_once(max_epochs=2, batch_size=None, momentum=0.5)
    start = MixtureOfExperts(1, 1, 3, generator=torch.Generator().manual_seed(5)).double()
    first_step = {k: plain.state_dict()[k] - v for k, v in start.state_dict().items()}
    one_more = MixtureOfExperts(1, 1, 3).double()
    one_more.load_state_dict(plain.state_dict())
    fit(one_more, *_piecewise(seed=3, n=120), TrainConfig(max_epochs=1, lr=0.1, progress=False))
    for name, value in heavy.state_dict().items():
        expected = one_more.state_dict()[name] + 0.5 * first_step[name]
        assert torch.allclose(value, expected, rtol=0, atol=1e-12), name


def test_progress_bar_can_be_switched_off(capsys):
    _fit_once(progress=False)
    assert capsys.readouterr().err == ""
    _fit_once(progress=True)
    assert "epoch" in capsys.readouterr().err


class TestBadInput:
    def setup_method(self):
        self.moe = MixtureOfExperts(2, 1, 2).double()
        self.x = torch.randn(10, 2, dtype=F64)
        self.y = torch.randn(10, 1, dtype=F64)
        self.config = TrainConfig(max_epochs=1, progress=False)

    def test_nan_in_inputs(self):
        self.x[3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"fit: x must be finite; got x\[3, 1\]=nan"):
            fit(self.moe, self.x, self.y, self.config)

    def test_inf_in_targets(self):
        self.y[7, 0] = float("inf")
        with pytest.raises(ValueError, match=r"fit: y must be finite; got y\[7, 0\]=inf"):
            fit(self.moe, self.x, self.y, self.config)

    def test_mismatched_rows(self):
        with pytest.raises(ValueError, match=r"row counts must match; x has 10, y has 9"):
            fit(self.moe, self.x, self.y[:9], self.config)

    def test_wrong_feature_count(self):
        with pytest.raises(ValueError, match=r"x has 3 features but the model expects 2"):
            fit(self.moe, torch.randn(10, 3, dtype=F64), self.y, self.config)

    def test_wrong_target_width(self):
        with pytest.raises(ValueError, match=r"y must have shape \(N, 1\) .* got \(10, 2\)"):
            fit(self.moe, self.x, torch.randn(10, 2, dtype=F64), self.config)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the model's weights "
                                            r"are torch.float64"):
            fit(self.moe, self.x.float(), self.y, self.config)

    def test_class_index_out_of_range(self):
        with pytest.raises(ValueError, match=r"class indices in y must lie in \[0, 1\).* to 3"):
            fit(self.moe, self.x, torch.tensor([0, 3] * 5), self.config)

    def test_categorical_loss_needs_class_indices(self):
        with pytest.raises(ValueError, match=r"loss='categorical_nll' needs integer class indices"):
            fit(self.moe, self.x, self.y, TrainConfig(loss="categorical_nll", progress=False))

    def test_unknown_loss_name(self):
        with pytest.raises(ValueError, match=r"loss must be one of .*got loss='mse'"):
            TrainConfig(loss="mse")

    @pytest.mark.parametrize("kwargs, message", [
        ({"optimizer": "rmsprop"},
         r"optimizer must be one of 'sgd', 'adam', 'lbfgs'; got optimizer='rmsprop'"),
        ({"lr": -1.0}, r"lr must be a finite number > 0; got lr=-1.0"),
        ({"max_epochs": 0}, r"max_epochs must be an integer >= 1; got max_epochs=0"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1; got batch_size=0"),
        ({"stop_metric": "train_sse"}, r"stop_metric and stop_threshold go together"),
        ({"stop_metric": "train_r2", "stop_threshold": 1.0},
         r"stop_metric must be one of .*got stop_metric='train_r2'"),
        ({"patience": 0}, r"patience must be an integer >= 1; got patience=0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\); got momentum=1.0"),
        ({"momentum": 0.9, "optimizer": "adam"},
         r"momentum applies to optimizer='sgd' only; got momentum=0.9 with optimizer='adam'"),
    ])
    def test_bad_config(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)


def test_weight_decay_shrinks_the_weights_and_rejects_negative_values():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ torch.tensor([[3.0], [-2.0], [1.0]], dtype=torch.float64)
    norms = []
    for decay in (0.0, 1.0):
        model = MixtureOfExperts(3, 1, 2, generator=torch.Generator().manual_seed(0)).double()
        fit(model, x, y, TrainConfig(optimizer="adam", lr=0.05, max_epochs=200, weight_decay=decay,
                                     progress=False))
        norms.append(sum(p.square().sum().item() for p in model.parameters()))
    assert norms[1] < 0.5 * norms[0]
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0; got weight_decay=-1"):
        TrainConfig(weight_decay=-1)


@pytest.mark.parametrize("kwargs, message", [
    ({"stop_metric": "val_mse", "stop_threshold": 0.1},
     (r"fit: stop_metric='val_mse' needs a validation set; pass x_val and y_val, or use "
      r"stop_metric='train_mse'")),
    ({"patience": 3, "monitor": "val_loss"},
     r"fit: monitor='val_loss' needs a validation set"),
    ({"stop_metric": "train_accuracy", "stop_threshold": 0.9},
     (r"fit: stop_metric='train_accuracy' needs class-index targets .*y holds floats.*"
      r"stop_metric='train_mse'")),
    ({"patience": 3, "monitor": "train_accuracy"},
     r"fit: monitor='train_accuracy' needs class-index targets"),
])
def test_metrics_no_epoch_records_are_rejected_before_training(kwargs, message):
    x, y = _piecewise(seed=0, n=40)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fit(moe, x, y, TrainConfig(max_epochs=3, progress=False, **kwargs))
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in before.items())


def test_val_accuracy_needs_class_indices_in_y_val_and_unused_monitor_is_not_checked():
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = (x[:, 0] > 0).long()
    moe = MixtureOfExperts(2, 2, 2, expert=ExpertConfig(head="softmax")).double()
    config = TrainConfig(max_epochs=2, stop_metric="val_accuracy", stop_threshold=1.1,
                         progress=False)
    with pytest.raises(ValueError, match=r"stop_metric='val_accuracy' needs class-index targets"
                                         r".*y_val holds floats"):
        fit(moe, x, y, config, x_val=x, y_val=y.double().reshape(-1, 1).repeat(1, 2))
    assert fit(moe, x, y, config, x_val=x, y_val=y).epochs == 2
    # monitor only matters with patience: without it, a 'val_*' monitor is never read.
    assert fit(moe, x, y, TrainConfig(max_epochs=2, monitor="val_loss", progress=False)).epochs == 2


def test_running_train_metrics_are_the_row_weighted_means_of_the_batches():
    """With train_metrics='running' no second pass is made: each batch's metrics come from the
    forward pass of its update (the weights before it), averaged over rows."""
    x, y = _piecewise(seed=0, n=100)
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    start = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    config = TrainConfig(max_epochs=1, progress=False, train_metrics="running")
    record = fit(moe, x, y, config).history[-1]
    # full batch: one update, so the running loss is the starting weights' loss on every row
    from moekit.fitting.gradient import evaluate
    from moekit.fitting.objective import prepare_targets

    targets = prepare_targets("t", "y", y, out_features=1, loss=config.loss, dtype=F64)
    expected = evaluate(start, x, targets, config, "train")
    for name, value in expected.items():
        assert record[name] == pytest.approx(value, rel=1e-12), name
    # minibatches of 30, 30, 30, 10 rows: the mean weighs each batch by its rows
    moe = MixtureOfExperts(1, 1, 2, generator=torch.Generator().manual_seed(0)).double()
    batched = TrainConfig(max_epochs=1, progress=False, train_metrics="running", batch_size=30,
                          optimizer="sgd", lr=1e-12)  # the weights barely move
    record = fit(moe, x, y, batched).history[-1]
    assert record["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-9)


def test_ctrl_c_with_on_interrupt_stop_ends_the_fit_with_the_best_epoch(interrupt_at):
    from moekit import KeepBest

    x, y = _piecewise(seed=0, n=100)
    calls = interrupt_at(6)
    moe = MixtureOfExperts(1, 1, 2).double()
    config = TrainConfig(max_epochs=50, progress=False, on_interrupt="stop")
    result = fit(moe, x, y, config, x_val=x, y_val=y, callbacks=[KeepBest("val_loss")])
    assert result.stop_reason == "interrupted" and result.epochs == 5 == len(result.history)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # the default: Ctrl-C is the caller's
        fit(MixtureOfExperts(1, 1, 2).double(), x, y, TrainConfig(max_epochs=50, progress=False))


def test_the_progress_bar_is_labelled_and_counts_to_the_cap_only_without_early_stops(capsys):
    from moekit.fitting.gradient import _progress_bar

    assert _progress_bar(TrainConfig(progress=False), 0).total == 1000
    assert _progress_bar(TrainConfig(progress=False, patience=5), 0).total is None
    x, y = _piecewise(seed=0, n=50)
    fit(MixtureOfExperts(1, 1, 2).double(), x, y,
        TrainConfig(max_epochs=2, progress=True, progress_label="final fit"))
    assert "final fit" in capsys.readouterr().err
