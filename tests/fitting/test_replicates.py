"""Batched replicate runs equal single runs of fit() with the same start, step and criterion."""

import pytest
import torch

from moekit import ExpertConfig, MixtureOfExperts, TrainConfig, fit
from moekit.fitting.replicates import ReplicateConfig, train_replicates

F64 = torch.float64


def _task(gen):
    x = torch.rand(60, 2, generator=gen, dtype=F64)
    y = (x[:, 0] + 0.3 * torch.randn(60, generator=gen, dtype=F64) > 0.5).long() + \
        2 * (x[:, 1] > 0.5).long()
    return x, y


def _models(seeds, **kwargs):
    return [MixtureOfExperts(2, 4, 3, generator=torch.Generator().manual_seed(s), **kwargs).double()
            for s in seeds]


@pytest.mark.parametrize("loss, expert", [
    ("eq3", ExpertConfig(head="softmax")),
    ("eq1", ExpertConfig(kind="mlp", hidden=5, activation="sigmoid", head="sigmoid")),
    ("eq2", ExpertConfig()),
])
@pytest.mark.filterwarnings("ignore:fit. the training loss became")
@pytest.mark.parametrize("engine", ["stacked", "vmap"])
def test_batched_runs_equal_single_runs(gen, loss, expert, engine):
    x, y = _task(gen)
    seeds, lrs = [0, 1, 2, 3], [0.5, 1.0, 2.0, 0.5]
    batched = _models(seeds, expert=expert)
    config = ReplicateConfig(loss=loss, max_epochs=400, stop_metric="mse", stop_threshold=0.12,
                             progress=False)
    result = train_replicates(batched, x, y, lrs, config, engine=engine)
    for r, (seed, lr) in enumerate(zip(seeds, lrs, strict=True)):
        single = _models([seed], expert=expert)[0]
        one = fit(single, x, y, TrainConfig(loss=loss, lr=lr, max_epochs=400,
                                            stop_metric="train_mse", stop_threshold=0.12,
                                            progress=False))
        assert int(result.epochs_R[r]) == one.epochs
        assert bool(result.reached_R[r]) == one.reached_threshold
        torch.testing.assert_close(result.metric_RT[r, one.epochs].item(),
                                   one.history[-1]["train_mse"])
        for p_batched, p_single in zip(batched[r].parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(p_batched, p_single)
    assert result.reached_R.any() and result.epochs_R.unique().numel() > 1  # not a trivial case


def test_runs_stop_on_their_own_and_record_nan_after(gen):
    x, y = _task(gen)
    models = _models([0, 1])
    result = train_replicates(models, x, y, [2.0, 0.01], ReplicateConfig(
        max_epochs=300, stop_metric="mse", stop_threshold=0.15, progress=False))
    fast, slow = result.epochs_R.tolist()
    assert result.reached_R.tolist() == [True, False] and slow == 300 and fast < 300
    assert torch.isnan(result.metric_RT[0, fast + 1:]).all()
    assert not torch.isnan(result.metric_RT[1]).any()
    assert result.hit_cap_R.tolist() == [False, True]


def test_divergence_is_reported(gen):
    x, y = _task(gen)
    y_N4 = torch.nn.functional.one_hot(y, 4).to(F64) * 100
    result = train_replicates(_models([0]), x, y_N4, [1e6], ReplicateConfig(
        loss="eq2", max_epochs=50, progress=False))
    assert result.diverged_R.tolist() == [True]


def test_snapshots_of_tracked_runs(gen):
    x, y = _task(gen)
    models = _models([0, 1])
    result = train_replicates(models, x, y, [1.0, 1.0], ReplicateConfig(
        max_epochs=20, stop_metric="mse", stop_threshold=1e-6, progress=False),
        track=[1], track_epochs=[0, 5, 10])
    frames = result.snapshots[1]
    assert [epoch for epoch, _ in frames] == [0, 5, 10, 20]
    torch.testing.assert_close(frames[-1][1]["gate.w_DE"], models[1].gate.w_DE.detach())


def test_bad_arguments(gen):
    x, y = _task(gen)
    with pytest.raises(ValueError, match=r"lrs must have one step size per model \(2\); got 3"):
        train_replicates(_models([0, 1]), x, y, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"every lr must be a finite number > 0"):
        train_replicates(_models([0]), x, y, [-1.0])
    with pytest.raises(ValueError, match=r"models is empty"):
        train_replicates([], x, y, [])
    with pytest.raises(ValueError, match=r"stop_metric must be one of 'sse', 'mse'"):
        ReplicateConfig(stop_metric="acc")


def test_rows_of_x_and_y_must_match(gen):
    x, y = _task(gen)
    with pytest.raises(ValueError, match=r"train_replicates: row counts must match; x has \d+, "
                                         r"y has 5"):
        train_replicates(_models([0]), x, y[:5], [0.1], ReplicateConfig(progress=False))


def test_progress_counts_runs_finished_not_epochs(gen):
    """Three runs: two reach the criterion early, one hits the cap of 300 epochs; the hook hears
    of each run as it finishes, the last at the cap."""
    x, y = _task(gen)
    heard = []
    result = train_replicates(_models([0, 1, 2]), x, y, [2.0, 2.0, 0.01], ReplicateConfig(
        max_epochs=300, stop_metric="mse", stop_threshold=0.15, progress=False),
        on_progress=lambda finished, epoch: heard.append((finished, epoch)))
    assert [f for f, _ in heard] == sorted(f for f, _ in heard) and heard[-1] == (3, 300)
    fast = sorted(result.epochs_R.tolist())[:2]
    assert heard[0] == (1 if fast[0] < fast[1] else 2, fast[0])
