"""The errors and warnings of moekit.exceptions: data errors name Python parameters (the CLI spells
them as its flags), and the warnings are classes a caller can filter."""

import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from moekit import MixtureOfExperts, TrainConfig, fit
from moekit.cli import flag, main
from moekit.data.tabular import prepare_fit
from moekit.exceptions import (
    NAME_ONLY,
    ConvergenceWarning,
    DataError,
    DivergenceWarning,
    MoekitError,
    Setting,
)
from moekit.fitting.em import fit_em
from moekit.fitting.em_config import EMConfig

ASSETS = Path(__file__).parent / "assets"


def test_a_data_error_reads_as_python_and_renders_as_anything():
    err = DataError("column 'c' holds text; pass ", Setting("one_hot", True), " or drop it.")
    assert str(err) == "column 'c' holds text; pass one_hot=True or drop it."
    spelled = err.render(lambda s: f"<{s.name}>")
    assert spelled == "column 'c' holds text; pass <one_hot> or drop it."
    assert err.settings == (Setting("one_hot", True),)
    assert isinstance(err, ValueError) and isinstance(err, MoekitError)


def test_a_setting_without_a_value_names_the_parameter():
    assert Setting("target").value is NAME_ONLY and Setting("target").python() == "target"


@pytest.mark.parametrize("setting, spelled", [
    (Setting("missing", "drop"), "--missing drop"), (Setting("one_hot", True), "--one-hot"),
    (Setting("target"), "--target"), (Setting("n_experts", 4), "--experts 4"),
    (Setting("validation_fraction"), "--validation-fraction")])
def test_the_cli_spells_each_setting_as_its_flag(setting, spelled):
    assert flag(setting) == spelled


def test_the_library_names_the_parameter_and_the_cli_its_flag(capsys):
    frame = pd.read_csv(ASSETS / "classes_with_text.csv")
    with pytest.raises(DataError, match=r"pass one_hot=True to encode them"):
        prepare_fit(frame, "label")
    code = main(["fit", str(ASSETS / "classes_with_text.csv"), "--target", "label",
                 "--no-progress", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 1 and "pass --one-hot to encode them" in err and "one_hot=" not in err
    assert not Path("unused").exists()


def test_em_that_stops_at_its_cap_warns_a_convergence_warning_a_caller_can_filter(gen):
    x = torch.rand(60, 1, generator=gen, dtype=torch.float64)
    y = torch.where(x < 0.5, x, 1 - x)
    moe = MixtureOfExperts(1, 1, 2, generator=gen).double()
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=1 iterations"):
        fit_em(moe, x, y, EMConfig(max_iter=1, progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit_em(moe, x, y, EMConfig(max_iter=1, progress=False, init="model"))


def test_a_diverging_fit_warns_a_divergence_warning(gen):
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    moe = MixtureOfExperts(2, 1, 2, generator=gen).double()
    with pytest.warns(DivergenceWarning, match=r"the training loss became .* Lower lr"):
        result = fit(moe, x, 1e6 * x[:, :1], TrainConfig(lr=1e6, max_epochs=50, progress=False))
    assert result.stop_reason == "diverged"


def test_a_fit_that_misses_its_stop_threshold_warns(gen):
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    moe = MixtureOfExperts(2, 1, 2, generator=gen).double()
    with pytest.warns(ConvergenceWarning, match=r"train_sse did not reach 1e-09 within "
                                                r"max_epochs=3"):
        fit(moe, x, x[:, :1], TrainConfig(max_epochs=3, stop_metric="train_sse",
                                          stop_threshold=1e-9, progress=False))
