"""Hostile resumes: a checkpoint of another fit (other lr, optimizer, loss, momentum, model size or
data) is refused naming the difference; a damaged checkpoint is refused naming the file; a fit
killed with SIGKILL at random moments and resumed ends bit-identical to an uninterrupted one, for
``fit`` and for the estimators' ``checkpoint`` folder."""

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from moekit import MixtureOfExperts, TrainConfig, fit
from moekit.estimators import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.exceptions import DataError

F64 = torch.float64


def _data(seed=0, n=60):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    return x, (x[:, :1] > 0) * x[:, 1:]


def _model(n_experts=3):
    return MixtureOfExperts(2, 1, n_experts, generator=torch.Generator().manual_seed(0)).double()


@pytest.fixture
def written(tmp_path):
    """A checkpoint of 6 epochs of SGD with lr=0.1 on _data(0); returns the config that wrote
    it."""
    config = TrainConfig(max_epochs=6, lr=0.1, progress=False,
                         checkpoint_path=str(tmp_path / "fit.ckpt"))
    fit(_model(), *_data(), config)
    return config


def _resume(config, model=None, data=None, **changes):
    return fit(model or _model(), *(data or _data()), replace(config, **changes), resume=True)


def test_resume_with_another_lr_is_refused_naming_it(written):
    with pytest.raises(DataError, match=r"fit: the checkpoint at '.*fit.ckpt' was written with "
                       r"lr=0\.1; this call has lr=0\.5; resume with the same TrainConfig, or "
                       r"start a new fit without resume=True\."):
        _resume(written, lr=0.5)


def test_resume_with_another_optimizer_is_refused_naming_it(written):
    with pytest.raises(DataError, match=r"written with optimizer='sgd'; this call has "
                                        r"optimizer='adam'"):
        _resume(written, optimizer="adam")


def test_resume_with_another_loss_is_refused_naming_it(written):
    with pytest.raises(DataError, match=r"written with loss='mixture_nll'; this call has "
                                        r"loss='competitive'"):
        _resume(written, loss="competitive")


def test_resume_with_another_momentum_is_refused_naming_it(written):
    with pytest.raises(DataError, match=r"written with momentum=0\.0; this call has "
                                        r"momentum=0\.9"):
        _resume(written, momentum=0.9)


def test_resume_with_another_model_size_is_refused_naming_it(written):
    with pytest.raises(DataError, match=r"written with n_experts=3; this call has n_experts=4; "
                                        r"resume with the same model, or start a new fit"):
        _resume(written, model=_model(4))


def test_resume_on_another_dataset_is_refused(written):
    x, y = _data()
    with pytest.raises(DataError, match=r"written with x: float64 \(60, 2\) sha256:\w+; this "
                                        r"call has x: float64 \(60, 2\) sha256:\w+; resume with "
                                        r"the same data"):
        _resume(written, data=(x + 1, y))


def test_every_difference_is_named_at_once(written):
    with pytest.raises(DataError, match=r"written with lr=0\.1, batch_size=None; this call has "
                                        r"lr=0\.2, batch_size=16"):
        _resume(written, lr=0.2, batch_size=16)


def test_truncated_checkpoint_is_refused_naming_the_file(written):
    path = written.checkpoint_path
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=r"fit: the checkpoint '.*fit\.ckpt' is truncated or "
                                        r"corrupted .*delete it to start the fit again"):
        _resume(written)


def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(written):
    torch.save({"weights": torch.zeros(2)}, written.checkpoint_path)
    with pytest.raises(DataError, match=r"'.*fit\.ckpt' is not a checkpoint of a gradient fit"):
        _resume(written)


def test_raising_max_epochs_continues_the_fit(written):
    straight = fit(_model(), *_data(), TrainConfig(max_epochs=10, lr=0.1, progress=False))
    resumed = _resume(written, max_epochs=10, progress=True, checkpoint_every=3)
    assert resumed.epochs == 10 and resumed.stop_reason == "max_epochs"
    assert resumed.history.to_list() == straight.history.to_list()


def test_lowering_max_epochs_below_the_epochs_run_is_refused(written):
    with pytest.raises(DataError, match=r"has run 6 epochs; this call has max_epochs=4; pass "
                                        r"max_epochs=6 or more"):
        _resume(written, max_epochs=4)


# --- SIGKILL at random moments ------------------------------------------------------------------
# Each script prints a line per epoch, so that a kill can be aimed at a random epoch and a random
# moment inside it (training, evaluating or writing the checkpoint), whatever the machine's speed.
FIT_SCRIPT = r"""
import sys, torch
from moekit import Callback, ExpertConfig, KeepBest, MixtureOfExperts, TrainConfig, fit
checkpoint, out = sys.argv[1], sys.argv[2]

class Announce(Callback):
    def on_epoch_end(self, state):
        print("epoch", state.epoch, flush=True)

gen = torch.Generator().manual_seed(0)
x = torch.randn(1200, 3, generator=gen, dtype=torch.float64)
y = torch.where(x[:, :1] > 0, x[:, 1:2], torch.sin(3 * x[:, 2:3]))
moe = MixtureOfExperts(3, 1, 3, expert=ExpertConfig(kind="mlp", hidden=16),
                       generator=torch.Generator().manual_seed(1)).double()
config = TrainConfig(optimizer="adam", lr=0.01, max_epochs=14, batch_size=50, seed=3,
                     progress=False, checkpoint_path=checkpoint or None, checkpoint_every=1)
# validation targets that disagree with the training ones: the best validation epoch is an early
# one, so that the kept weights depend on KeepBest's state surviving the kills
result = fit(moe, x[200:], y[200:], config, x_val=x[:200], y_val=-y[:200],
             callbacks=[KeepBest(), Announce()], resume=bool(checkpoint))
torch.save({"state": moe.state_dict(), "losses": torch.tensor(result.history[:, "train_loss"]),
            "best": torch.tensor(result.history[:, "val_loss"]).argmin()}, out)
"""

ESTIMATOR_SCRIPT = r"""
import sys, warnings
import numpy as np, torch
import moekit.fitting.gradient as gradient
from moekit.estimators import MixtureOfExpertsRegressor
checkpoint, out = sys.argv[1], sys.argv[2]
train_epoch = gradient.train_epoch

def announced(*args, **kwargs):
    train_epoch(*args, **kwargs)
    print("epoch", flush=True)

gradient.train_epoch = announced  # what `fit` calls each epoch, in every stage
rng = np.random.default_rng(0)
X = rng.normal(size=(3000, 4))
y = np.where(X[:, 0] > 0, X[:, 1], -X[:, 2]) + 0.1 * rng.normal(size=3000)
est = MixtureOfExpertsRegressor(n_experts="auto", auto_candidates=(1, 2), max_epochs=80,
                                batch_size=500, early_stopping=True, random_state=0,
                                checkpoint=checkpoint or None)
warnings.simplefilter("ignore")
est.fit(X, y)
torch.save({"state": est.model_.state_dict(), "predictions": torch.from_numpy(est.predict(X))},
           out)
"""


def _start(script, checkpoint, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, str(checkpoint), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run_to_end(script, checkpoint, out):
    proc = _start(script, checkpoint, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout.count("epoch"), torch.load(out, weights_only=True)


def _kill_at(script, checkpoint, out, epoch, fraction):
    """Run until ``epoch`` epoch lines were printed, wait ``fraction`` of an epoch, SIGKILL."""
    proc = _start(script, checkpoint, out)
    stamps = []
    while len(stamps) < epoch:
        line = proc.stdout.readline()
        assert line, f"the fit ended before epoch {epoch}: {proc.stderr.read()}"
        stamps.append(time.perf_counter())
    epoch_seconds = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    time.sleep(fraction * epoch_seconds)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-fit, not finished


def _assert_same(reference, resumed):
    """Every tensor of the model's state (and the predictions, if saved) equal, bit for bit."""
    assert reference["state"].keys() == resumed["state"].keys()
    for name, tensor in reference["state"].items():
        assert torch.equal(tensor, resumed["state"][name]), name
    for name in reference.keys() - {"state"}:  # predictions, or the training losses
        assert torch.equal(reference[name], resumed[name]), name


@pytest.mark.slow
def test_fit_killed_at_random_moments_resumes_bit_identical(tmp_path):
    epochs, reference = _run_to_end(FIT_SCRIPT, "", tmp_path / "straight.pt")
    assert epochs == 14 and reference["best"] < 3  # the kept weights are an early epoch's
    rng = random.Random(19)
    checkpoint = tmp_path / "fit.ckpt"
    for _ in range(3):  # three kills in a row, each 1-3 epochs into the resumed run
        _kill_at(FIT_SCRIPT, checkpoint, tmp_path / "x.pt", rng.randint(1, 3), rng.random())
    _, resumed = _run_to_end(FIT_SCRIPT, checkpoint, tmp_path / "resumed.pt")
    _assert_same(reference, resumed)
    assert not list(tmp_path.glob(".*.tmp"))  # killed writes left nothing behind


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_killed_at_a_random_moment_resumes_bit_identical(tmp_path_factory, seed):
    reference_dir = tmp_path_factory.getbasetemp() / "estimator_reference"
    if not (reference_dir / "straight.pt").exists():  # one uninterrupted fit for every seed
        reference_dir.mkdir(exist_ok=True)
        epochs, reference = _run_to_end(ESTIMATOR_SCRIPT, "", reference_dir / "straight.pt")
        (reference_dir / "epochs").write_text(str(epochs))
    reference = torch.load(reference_dir / "straight.pt", weights_only=True)
    epochs = int((reference_dir / "epochs").read_text())
    rng = random.Random(seed)
    work = tmp_path_factory.mktemp("killed")
    folder = work / "checkpoint"
    _kill_at(ESTIMATOR_SCRIPT, folder, work / "x.pt", rng.randint(1, epochs - 10), rng.random())
    ran, resumed = _run_to_end(ESTIMATOR_SCRIPT, folder, work / "resumed.pt")
    assert ran < epochs  # it went on from the checkpoint
    _assert_same(reference, resumed)


# --- an estimator's checkpoint folder of another fit ---------------------------------------------
def _classifier(folder, **params):
    settings = {"n_experts": 2, "max_epochs": 20, "random_state": 0, "checkpoint": str(folder)}
    return MixtureOfExpertsClassifier(**{**settings, **params})


@pytest.fixture
def fitted_folder(tmp_path):
    X = np.random.default_rng(0).normal(size=(60, 3))
    y = (X[:, 0] > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _classifier(tmp_path / "ck").fit(X, y)
    return tmp_path / "ck", X, y


@pytest.mark.parametrize("change, written, now", [
    ({"lr": 0.5}, "lr=0.01", "lr=0.5"),
    ({"n_experts": 3}, "n_experts=2", "n_experts=3"),
    ({"solver": "em"}, "solver='adam'", "solver='em'"),
])
def test_estimator_folder_of_a_fit_with_other_parameters_is_refused(fitted_folder, change,
                                                                    written, now):
    folder, X, y = fitted_folder
    with pytest.raises(DataError, match=rf"MixtureOfExpertsClassifier: the checkpoint folder "
                       rf"'.*ck' holds another fit: it was written with {written}; this fit has "
                       rf"{now}; fit with the same parameters"):
        _classifier(folder, **change).fit(X, y)


def test_estimator_folder_of_a_fit_on_other_data_is_refused(fitted_folder):
    folder, X, y = fitted_folder
    with pytest.raises(DataError, match=r"written with X: float64 \(60, 3\) sha256:\w+; this fit "
                                        r"has X: float64 \(60, 3\) sha256:\w+"):
        _classifier(folder).fit(X * 2, y)
    with pytest.raises(DataError, match=r"written with y: int64 \(60,\) sha256:\w+"):
        _classifier(folder).fit(X, 1 - y)


def test_estimator_folder_of_another_estimator_is_refused(fitted_folder):
    folder, X, y = fitted_folder
    with pytest.raises(DataError, match=r"written with a MixtureOfExpertsClassifier; this fit has "
                                        r"a MixtureOfExpertsRegressor"):
        MixtureOfExpertsRegressor(checkpoint=str(folder)).fit(X, y.astype(float))


def test_estimator_checkpoint_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(DataError, match=r"checkpoint='.*taken' is a file; give a folder"):
        _classifier(tmp_path / "taken").fit([[0.0], [1.0], [2.0], [3.0]], [0, 1, 0, 1])


def test_estimator_corrupted_record_is_refused_naming_it(fitted_folder):
    folder, X, y = fitted_folder
    (folder / "fit.json").write_text('{"format": 1, "estim')
    with pytest.raises(DataError, match=r"the checkpoint record '.*fit\.json' cannot be read"):
        _classifier(folder).fit(X, y)


def test_estimator_truncated_stage_is_refused_naming_it(fitted_folder):
    folder, X, y = fitted_folder
    first = folder / "alpha_2.0.pt"  # the first stage: the prior chosen among the candidates
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(DataError, match=r"the checkpoint '.*alpha_2\.0\.pt' is truncated or "
                                        r"corrupted"):
        _classifier(folder).fit(X, y)
