"""Checkpoints: what they record of the fit they belong to, what survives a resume (the callbacks'
state too), and EM fits saved whole. (The refusals of a foreign or damaged checkpoint are in
tests/hostile/test_resume.py.)"""

import pytest
import torch

from moekit import Callback, KeepBest, MixtureOfExperts, TrainConfig, fit, fit_em
from moekit.exceptions import DataError
from moekit.fitting.checkpoint import (
    FORMAT,
    fingerprint,
    load_em_result,
    save_em_result,
)
from moekit.fitting.em_config import EMConfig

F64 = torch.float64


def _data(n=80):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    return x, torch.where(x[:, :1] > 0, x[:, 1:], -x[:, 1:])


def _model():
    return MixtureOfExperts(2, 1, 2, generator=torch.Generator().manual_seed(3)).double()


def test_fingerprint_tells_tensors_apart():
    x = torch.arange(6, dtype=F64).reshape(2, 3)
    assert fingerprint(x) == fingerprint(x.clone())
    changed = x.clone()
    changed[1, 2] = torch.nextafter(changed[1, 2], torch.tensor(10.0, dtype=F64))  # one ulp
    assert fingerprint(changed) != fingerprint(x)
    assert fingerprint(x.reshape(3, 2)) != fingerprint(x)  # same bytes, another shape
    assert fingerprint(x.t()) == fingerprint(x.t().contiguous())  # a view hashes its values
    assert fingerprint(x).startswith("float64 (2, 3) sha256:")


def test_a_difference_that_follows_from_another_is_not_named(tmp_path):
    # 3 experts instead of 2 changes every gate and expert parameter's shape: only the cause,
    # n_experts, is named
    config = TrainConfig(max_epochs=2, progress=False, checkpoint_path=str(tmp_path / "c.pt"))
    fit(_model(), *_data(), config)
    other = MixtureOfExperts(2, 1, 3, generator=torch.Generator().manual_seed(3)).double()
    with pytest.raises(DataError, match=r"was written with n_experts=2; this call has "
                                        r"n_experts=3; resume with the same model, or"):
        fit(other, *_data(), config, resume=True)


def test_resume_needs_a_checkpoint_path():
    with pytest.raises(ValueError, match=r"resume=True needs the file to resume from; set "
                                         r"TrainConfig\(checkpoint_path=\.\.\.\)"):
        fit(_model(), *_data(), TrainConfig(max_epochs=1, progress=False), resume=True)


def test_resume_without_a_file_starts_from_the_first_epoch(tmp_path):
    config = TrainConfig(max_epochs=4, progress=False)
    straight = fit(_model(), *_data(), config)
    resumed = fit(_model(), *_data(), TrainConfig(max_epochs=4, progress=False,
                                                  checkpoint_path=str(tmp_path / "new.pt")),
                  resume=True)
    assert resumed.history.to_list() == straight.history.to_list()


def test_keep_best_state_survives_a_resume(tmp_path):
    x, y = _data()
    # validation targets opposite to the training ones: the best validation epoch is the first
    config = TrainConfig(optimizer="adam", lr=0.05, max_epochs=12, progress=False,
                         checkpoint_path=str(tmp_path / "c.pt"), checkpoint_every=1)
    straight_model = _model()
    fit(straight_model, x, y, TrainConfig(optimizer="adam", lr=0.05, max_epochs=12,
                                          progress=False),
        x_val=x, y_val=-y, callbacks=[KeepBest()])
    fit(_model(), x, y, TrainConfig(**{**config.__dict__, "max_epochs": 6}), x_val=x, y_val=-y,
        callbacks=[KeepBest()])
    resumed_model = _model()
    fit(resumed_model, x, y, config, x_val=x, y_val=-y, callbacks=[KeepBest()], resume=True)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_callbacks_may_change_on_resume(tmp_path):
    class Count(Callback):
        epochs = 0

        def on_epoch_end(self, state):
            self.epochs += 1

    config = TrainConfig(max_epochs=3, progress=False, checkpoint_path=str(tmp_path / "c.pt"))
    fit(_model(), *_data(), config, callbacks=[KeepBest("train_loss")])
    count = Count()
    result = fit(_model(), *_data(), TrainConfig(**{**config.__dict__, "max_epochs": 5}),
                 callbacks=[count], resume=True)
    assert result.epochs == 5 and count.epochs == 2  # only the epochs after the checkpoint


def test_resume_removes_what_killed_writes_left(tmp_path):
    config = TrainConfig(max_epochs=2, progress=False, checkpoint_path=str(tmp_path / "c.pt"))
    fit(_model(), *_data(), config)
    leftover = tmp_path / ".c.pt.abc123.tmp"  # the name atomic_path gives its temporary file
    leftover.write_bytes(b"half a checkpoint")
    fit(_model(), *_data(), config, resume=True)
    assert not leftover.exists() and (tmp_path / "c.pt").exists()


def test_a_checkpoint_of_the_old_format_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": _model().state_dict(), "epoch": 3}, path)  # no format, no identity
    config = TrainConfig(max_epochs=5, progress=False, checkpoint_path=str(path))
    with pytest.raises(DataError, match=rf"is not a checkpoint of a gradient fit written by this "
                                        rf"moekit \(format {FORMAT}\); delete it"):
        fit(_model(), *_data(), config, resume=True)


def test_em_result_is_read_back_whole(tmp_path):
    x, y = _data()
    config = EMConfig(max_iter=30, progress=False)
    model = _model()
    result = fit_em(model, x, y, config)
    path = tmp_path / "em.pt"
    save_em_result(path, model, result, {"x": x, "y": y})

    fresh = _model()
    loaded = load_em_result(path, fresh, config, {"x": x, "y": y})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert loaded.history.to_list() == result.history.to_list()
    assert (loaded.n_iter, loaded.converged, loaded.stop_reason, loaded.passes, loaded.sweeps) \
        == (result.n_iter, result.converged, result.stop_reason, result.passes, result.sweeps)
    assert torch.equal(loaded.variance_E, result.variance_E)


def test_em_result_under_another_max_iter_is_run_again(tmp_path):
    x, y = _data()
    model = _model()
    path = tmp_path / "em.pt"
    save_em_result(path, model, fit_em(model, x, y, EMConfig(max_iter=40, progress=False)),
                   {"x": x, "y": y})
    assert load_em_result(path, _model(), EMConfig(max_iter=50, progress=False),
                          {"x": x, "y": y}) is None
    assert load_em_result(tmp_path / "absent.pt", _model(), EMConfig(), {"x": x}) is None


def test_em_result_of_other_data_or_settings_is_refused(tmp_path):
    x, y = _data()
    model = _model()
    config = EMConfig(max_iter=40, progress=False)
    path = tmp_path / "em.pt"
    save_em_result(path, model, fit_em(model, x, y, config), {"x": x, "y": y})
    with pytest.raises(DataError, match=r"fit_em: the checkpoint at '.*em\.pt' was written with "
                                        r"x: .*; this call has x: .*same data"):
        load_em_result(path, _model(), config, {"x": x * 2, "y": y})
    with pytest.raises(DataError, match=r"written with tol=1e-06; this call has tol=0\.001; "
                                        r"resume with the same EMConfig"):
        load_em_result(path, _model(), EMConfig(max_iter=40, tol=1e-3), {"x": x, "y": y})
